import pytest
import torch

from evaluation.entropy_summaries import by_position, forking_stats
from experiments.run import main as run_main
from tests.test_run import scalars


def test_forking_stats_on_hand_set_entropies():
    entropy = torch.tensor([0.1, 0.2, 0.3, 0.4, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    correct = torch.tensor([True, True, True, False, False, True, True, True, True, True])
    stats = forking_stats(entropy, correct, threshold=0.672)
    assert stats["forking_share"] == pytest.approx(0.2)
    assert stats["forking_entropy_share"] == pytest.approx(5.0 / 6.0)
    assert stats["forking_accuracy"] == pytest.approx(0.5)
    assert stats["non_forking_accuracy"] == pytest.approx(7 / 8)


def test_by_position_buckets_on_hand_set_values():
    rank = torch.tensor([0, 4, 3, 2, 1, 2, 1, 7])
    entropy = torch.tensor([9.0, 4.0, 3.0, 2.0, 1.0, 2.5, 0.5, 6.0])
    correct = rank == 1
    buckets = {b["name"]: b for b in by_position(entropy, correct, entropy, rank, max_offset=3)}
    assert list(buckets) == ["earlier", "-3", "penultimate", "last", "unfinished sentence"]
    assert buckets["earlier"]["count"] == 2 and buckets["earlier"]["mean_entropy"] == pytest.approx(
        5.0
    )  # ranks 4 and 7
    assert buckets["penultimate"]["mean_entropy"] == pytest.approx(2.25)
    assert buckets["last"]["accuracy"] == 1.0 and buckets["-3"]["accuracy"] == 0.0
    assert buckets["unfinished sentence"]["count"] == 1


def test_callback_logs_analysis_tags_to_tensorboard(tiny_args, tmp_path):
    # penultimate.yaml carries the callback (every 250 steps: step 0 is analysed)
    run_main(["--config", "experiments/configs/penultimate.yaml", *tiny_args, "--trainer.max_steps", "2"])
    logged = scalars(tmp_path / "runs" / "penultimate" / "version_0")
    for tag in (
        "analysis/entropy_mean",
        "analysis/accuracy",
        "analysis/forking_share",
        "analysis/forking_entropy_share",
    ):
        assert 0 in logged[tag], tag
    # by position: whichever of last / penultimate / -3 the few masked validation tokens hit
    positions = {
        t for t in logged if t.startswith("analysis/entropy_") and t.split("_", 1)[1] in ("last", "penultimate", "-3")
    }
    assert positions and all(0 in logged[t] for t in positions)
    assert {t.replace("entropy_", "acc_") for t in positions} <= set(logged)
    # an untrained model is unsure everywhere: entropy near log(vocab size)
    assert 4.0 < logged["analysis/entropy_mean"][0] <= torch.log(torch.tensor(512.0)).item() + 1e-3
