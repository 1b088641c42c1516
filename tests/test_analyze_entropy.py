import json
import math
from types import SimpleNamespace

import pytest
import torch

from evaluation import entropy
from evaluation.entropy import position_metrics, score_tokens
from evaluation.entropy_summaries import FORKING_THRESHOLD
from evaluation.model import LoadedModel, load_model
from experiments.analyze_entropy import main
from experiments.run import main as run_main
from tests.conftest import BOS, FULL_STOP, make_vocab

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KEYS = {
    "model",
    "objective",
    "n_tokens",
    "mean_entropy",
    "accuracy",
    "mean_loss",
    "forking_threshold",
    "forking_share",
    "forking_entropy_share",
    "top20_entropy_share",
    "quantiles",
    "histogram",
    "by_position",
    "by_frequency",
    "plots",
}


@pytest.mark.parametrize(("config", "objective"), [("ntp", "causal"), ("mlm_random", "mlm")])
def test_analysis_of_a_tiny_run_writes_json_and_plots(config, objective, tiny_args, tmp_path):
    run_main(["--config", f"experiments/configs/{config}.yaml", *tiny_args, "--trainer.max_steps", "3"])
    run = tmp_path / "runs" / config / "version_0"
    summary = main(["--run", str(run), "--documents", "20", "--max-blocks", "8"])
    out = run / "analysis" / "entropy"
    written = json.loads((out / "entropy.json").read_text())  # strict JSON: no NaN
    assert set(written) >= KEYS and written["objective"] == objective
    assert written["block_size"] == 32  # the run's own
    for name in written["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    assert len(written["plots"]) == 3
    # every regular token is scored once: causal = all but the first of a block; MLM = all
    positions = {b["name"]: b for b in written["by_position"]}
    assert {"earlier", "-3", "penultimate", "last", "unfinished sentence"} <= set(positions)
    assert sum(b["count"] for b in written["by_position"]) == written["n_tokens"]
    assert sum(b["count"] for b in written["by_frequency"]) == written["n_tokens"]
    assert sum(written["histogram"]["counts"]) == written["n_tokens"]
    assert written["n_tokens"] > 200 and 0 <= summary["forking_share"] <= 1
    # the entropy suite scores the same tokens the same way
    suite = entropy.run(load_model(str(run)), entropy.Options(documents=20, max_blocks=8))
    assert suite.metrics["acc"] == pytest.approx(written["accuracy"])
    assert suite.metrics["acc_penultimate"] == pytest.approx(positions["penultimate"]["accuracy"])
    assert suite.metrics["entropy_last"] == pytest.approx(positions["last"]["mean_entropy"])
    assert suite.details["counts"]["last"] == positions["last"]["count"]


def test_an_hf_model_folder_and_a_text_file_work_too(tiny_args, tmp_path):
    run_main(["--config", "experiments/configs/ntp.yaml", *tiny_args, "--trainer.max_steps", "1"])
    text = tmp_path / "held_out.txt"
    text.write_text(
        "\n\n".join(f"The cat number {i} sat on the mat. A dog ran away! Did it come back?" for i in range(30))
    )
    hf_model = tmp_path / "runs" / "ntp" / "version_0" / "hf_model"
    summary = main(["--run", str(hf_model), "--text", str(text), "--block-size", "16", "--out", str(tmp_path / "out")])
    assert summary["block_size"] == 16 and (tmp_path / "out" / "entropy.json").exists()


def test_a_path_without_a_model_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "neither a run dir with an hf_model/ folder nor an hf_model folder" in capsys.readouterr().err


class FixedLogits(torch.nn.Module):
    """A fake model: logits 2.0 for `favourite` (None: the input token itself) and 0 elsewhere."""

    def __init__(self, size: int, favourite: int | None) -> None:
        super().__init__()
        self.size, self.favourite = size, favourite
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        chosen = input_ids if self.favourite is None else torch.full_like(input_ids, self.favourite)
        return SimpleNamespace(logits=2.0 * torch.nn.functional.one_hot(chosen, self.size).float())


# three finished sentences (ranks 4 3 2 1 / 3 2 1 / 2 1) and one the block cuts off (rank 0)
BLOCK = torch.tensor([[BOS, 20, 21, 22, FULL_STOP, 23, 24, FULL_STOP, 25, FULL_STOP, 26, 27]])


@pytest.mark.parametrize("objective", ["mlm", "causal"])
def test_entropy_suite_splits_accuracy_by_position_in_the_sentence(objective):
    size = 32
    loaded = LoadedModel(FixedLogits(size, FULL_STOP), None, make_vocab(size), objective)
    metrics = position_metrics(score_tokens(loaded, BLOCK, 1, 0.15, 0), FORKING_THRESHOLD)
    hit, miss = -math.log(math.exp(2) / (math.exp(2) + size - 1)), math.log(math.exp(2) + size - 1)
    assert metrics == pytest.approx(
        {
            "acc": 3 / 11,  # always ".": right on the three full stops of the 11 regular tokens
            "loss": (3 * hit + 8 * miss) / 11,
            "mean_entropy": metrics["entropy_last"],  # the same distribution everywhere
            "forking_share": 1.0,
            "acc_penultimate": 0.0,  # 22, 24, 25
            "loss_penultimate": miss,
            "entropy_penultimate": metrics["entropy_last"],
            "acc_last": 1.0,
            "loss_last": hit,
            "entropy_last": metrics["entropy_last"],
            "acc_other": 0.0,  # 20, 21, 23; 26 and 27 belong to no finished sentence
            "loss_other": miss,
            "entropy_other": metrics["entropy_last"],
        }
    )


def test_a_masked_model_is_scored_on_tokens_it_cannot_see():
    """A model that copies its input scores nothing: every token is hidden when it is predicted."""
    size = 32
    loaded = LoadedModel(FixedLogits(size, None), None, make_vocab(size), "mlm")
    scores = score_tokens(loaded, BLOCK.repeat(3, 1), 2, 0.15, 0)
    assert len(scores["correct"]) == 3 * 11 and not scores["correct"].any()
