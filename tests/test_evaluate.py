"""`experiments.evaluate` and `EvaluationCallback` on a tiny trained run: files, tags, metrics.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from callbacks import EvaluationCallback
from core.errors import ConfigError
from experiments.evaluate import main as evaluate
from experiments.run import main as train
from tests.test_run import scalars

SMALL_SUITES = {
    "needle": {"lengths": [96, 192], "depths": 3, "samples": 1},
    "retrieval": {"examples": 2, "positions": 2, "items": 3},
    "ppl": {"max_blocks": 4},
    "attention": {"blocks": 2, "prompts": 2},
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny NTP run trained for 4 steps with the suites evaluated every 2 steps and at the end."""
    tmp = tmp_path_factory.mktemp("trained")
    callbacks = [
        {"class_path": "callbacks.EvaluationCallback", "init_args": {"suites": SMALL_SUITES, "every_n_steps": 2}}
    ]
    (tmp / "small_suites.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    from tests.conftest import TINY

    train(
        [
            "--config",
            "experiments/configs/ntp.yaml",
            "--config",
            str(tmp / "small_suites.yaml"),  # replaces ntp.yaml's evaluation callback
            "--experiment",
            "ntp_eval",
            "--model.init_args.max_position_embeddings",
            "256",
            *TINY,
            "--runs_dir",
            str(tmp / "runs"),
            "--data.cache_dir",
            str(tmp / "cache"),
        ]
    )
    return tmp / "runs" / "ntp_eval" / "version_0"


def test_the_callback_logs_every_suite_during_and_after_training(trained_run):
    tags = scalars(trained_run)
    for tag in ("eval/needle/acc", "eval/retrieval/acc", "eval/ppl/ppl", "eval/attention/masked_score_decay"):
        assert sorted(tags[tag]) == [2, 4], tag
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert {"val/loss", "eval/needle/acc", "eval/retrieval/kv/acc", "eval/ppl/ppl"} <= set(metrics)
    assert metrics["eval/ppl/ppl"] == pytest.approx(tags["eval/ppl/ppl"][4])
    files = {p.name for p in (trained_run / "eval").iterdir()}
    assert {
        "report.md",
        "needle_heatmap.png",
        "retrieval_by_position.png",
        "attention_segments.png",
        "ppl.json",
    } <= files


def tiny_rte(folder: Path) -> Path:
    """An RTE-format task folder of a few lines."""
    (folder / "RTE").mkdir(parents=True)
    rows = "".join(f"A cat sat {i}.\tA cat sat.\t{i % 2}\t{i}\n" for i in range(8))
    for split in ("train", "dev"):
        (folder / "RTE" / f"{split}.tsv").write_text("sentence1\tsentence2\tlabel\tidx\n" + rows)
    return folder


def test_evaluate_merges_into_metrics_json_and_keeps_earlier_keys(trained_run, tmp_path, capsys):
    blimp = tmp_path / "blimp.jsonl"
    blimp.write_text(
        json.dumps(
            {"sentence_good": "The cat sits.", "sentence_bad": "The cat sit.", "field": "morphology", "UID": "agr"}
        )
        + "\n"
    )
    before = json.loads((trained_run / "metrics.json").read_text())
    metrics = evaluate(
        [
            "--run",
            str(trained_run),
            "--suites",
            "blimp,ppl,glue",
            "--blimp.data",
            str(blimp),
            "--ppl.max_blocks",
            "2",
            "--glue.data_dir",
            str(tiny_rte(tmp_path / "glue")),
            "--glue.tasks",
            "[rte]",
            "--glue.seeds",
            "[0]",
            "--glue.epochs",
            "1",
            "--glue.accelerator",
            "cpu",
            "--step",
            "7",
        ]
    )
    # GLUE on one task of the default four is other data: its own group, glue@rte
    assert 0.0 <= metrics["eval/glue@rte/rte/acc"] <= 1.0 and "eval/glue@rte/score" in metrics
    after = json.loads((trained_run / "metrics.json").read_text())
    assert after["eval/needle/acc"] == before["eval/needle/acc"] and after["val/loss"] == before["val/loss"]
    assert after["eval/blimp/acc"] == metrics["eval/blimp/acc"] and after["eval/ppl/ppl"] == metrics["eval/ppl/ppl"]
    assert scalars(trained_run)["eval/blimp/acc"] == {7: pytest.approx(metrics["eval/blimp/acc"])}
    # without --step, at the step the run's training ended (its status.json), not at 0 before its curve
    ended = json.loads((trained_run / "status.json").read_text())["step"]
    again = evaluate(["--run", str(trained_run), "--suites", "ppl", "--ppl.max_blocks", "2"])
    logged = scalars(trained_run)["eval/ppl/ppl"]
    assert logged[ended] == pytest.approx(again["eval/ppl/ppl"]) and ended > 0 and 0 not in logged
    report = (trained_run / "eval" / "report.md").read_text()
    assert "## blimp" in report and "## needle" in report  # sections of earlier evaluations stay in the report
    assert "| blimp | acc |" in capsys.readouterr().out


def test_a_bare_hf_model_folder_is_evaluated_in_place(tiny_mlm_dir, tmp_path):
    metrics = evaluate(
        [
            "--run",
            str(tiny_mlm_dir),
            "--suites",
            "ppl",
            "--ppl.block_size",
            "16",
            "--ppl.max_blocks",
            "1",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert "eval/ppl/pseudo_ppl" in metrics and (tmp_path / "out" / "report.md").is_file()
    assert "eval/ppl/pseudo_ppl" in json.loads((tiny_mlm_dir / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--suites", "ppl"], "neither a run dir with an hf_model/ folder nor an hf_model folder"),
        (["--suites", "ppl,spelling"], "unknown suite(s) 'spelling'"),
        (["--suites", "needle", "--needle.lengths", "[100000]"], "exceed the model's context"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tiny_causal_dir, tmp_path, capsys):
    run = tmp_path if args == ["--suites", "ppl"] else tiny_causal_dir
    with pytest.raises(SystemExit) as exit_info:
        evaluate(["--run", str(run), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_callback_options_are_checked_before_training():
    with pytest.raises(ConfigError, match="needle.depth is not an option of suite 'needle'"):
        EvaluationCallback({"needle": {"depth": 3}})
    with pytest.raises(ConfigError, match="unknown suite 'bleu'"):
        EvaluationCallback({"bleu": {}})


def test_the_command_starts_in_a_fresh_interpreter(tiny_causal_dir):
    """Import order matters only when `experiments.evaluate` is the first module loaded."""
    done = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", "--run", str(tiny_causal_dir), "--suites", "bleu"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: unknown suite(s) 'bleu'")
