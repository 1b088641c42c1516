"""Faults, driven through the real entry point in a subprocess: the exit code, the one line the
user reads, and the run directories byte for byte where nothing may change (docs/reliability.md)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.run import main
from tests.conftest import TINY

ENTRY = [sys.executable, "-m", "experiments.run"]
QUICKSTART = ["--config", "experiments/configs/quickstart.yaml"]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def common(tmp_path: Path) -> list[str]:
    return [*TINY, "--runs_dir", str(tmp_path / "runs"), "--data.cache_dir", str(tmp_path / "cache")]


def entry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ENTRY, *args], capture_output=True, text=True, timeout=600)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def train_loss_steps(run_dir: Path) -> tuple[list[int], dict[int, float]]:
    """The `train/loss` steps of every TensorBoard file of a run, in file order (a step logged by
    two sessions appears twice), and the values by step."""
    steps, values = [], {}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars("train/loss"):
                steps.append(event.step)
                values[event.step] = event.value
    return steps, values


def shown_steps(run_dir: Path) -> tuple[list[int], dict[int, float]]:
    """The `train/loss` steps TensorBoard shows for a run dir (all its files read together, so what a
    resumed session purged is gone), and the values by step."""
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    events = accumulator.Scalars("train/loss")
    return [e.step for e in events], {e.step: e.value for e in events}


def test_ctrl_c_saves_the_exact_step_and_resume_picks_only_the_unfinished_run(tmp_path):
    args = [*QUICKSTART, *common(tmp_path), "--trainer.max_steps", "24", "--trainer.val_check_interval", "5"]
    main([*args, "--progress.when", "never"])  # an uninterrupted run: version_0, finished
    root = tmp_path / "runs" / "quickstart"
    finished = tree(root / "version_0")
    assert json.loads((root / "version_0" / "status.json").read_text())["status"] == "finished"

    # Ctrl-C during a run whose output goes to a pipe: it prints progress lines, stops at a step boundary
    run = subprocess.Popen(
        [*ENTRY, *args, "--progress.every_n_steps", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines = []
    for line in run.stdout:
        lines.append(line)
        if line.startswith("step 2/24"):
            run.send_signal(signal.SIGINT)
            break
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 130, stderr[-2000:]
    assert re.fullmatch(r"step 1/24 \(4%\)  train/loss \d+\.\d+  \d+ s, ~\d+ s left\n", lines[0])
    version_1 = root / "version_1"
    stopped = json.loads((version_1 / "status.json").read_text())
    step = stopped["step"]
    assert stopped["status"] == "interrupted" and 2 <= step < 24
    saved = version_1 / "checkpoints" / "last.ckpt"
    assert last_line(stderr) == f"interrupted at step {step}: saved {saved}; resume with --ckpt_path last"
    assert torch.load(saved, weights_only=False)["global_step"] == step
    assert not (version_1 / "hf_model").exists() and not (version_1 / "metrics.json").exists()
    interrupted_ckpt = saved.read_bytes()

    resumed = entry(*args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming the unfinished run {version_1} from {saved}" in resumed.stdout
    assert json.loads((version_1 / "status.json").read_text())["status"] == "finished"
    assert tree(root / "version_0") == finished
    # every step logged once, and each loss what the uninterrupted run had at that step
    steps, losses = train_loss_steps(version_1)
    assert steps == list(range(24))
    _, reference = train_loss_steps(root / "version_0")
    torch.testing.assert_close(torch.tensor([losses[s] for s in steps]), torch.tensor([reference[s] for s in steps]))

    # a run killed outright after its events were flushed past its last checkpoint (here: the full
    # run's events with the interrupted run's step-N checkpoint) resumes, and TensorBoard shows
    # each of the steps logged twice once
    version_2 = root / "version_2"
    (version_2 / "checkpoints").mkdir(parents=True)
    for events in (root / "version_0").glob("events.out.tfevents.*"):
        (version_2 / events.name).write_bytes(events.read_bytes())
    (version_2 / "checkpoints" / "last.ckpt").write_bytes(interrupted_ckpt)
    assert entry(*args, "--ckpt_path", "last").returncode == 0
    assert sorted(train_loss_steps(version_2)[0]) != list(range(24))  # both sessions' files hold steps N..23
    steps, losses = shown_steps(version_2)
    assert steps == list(range(24))
    torch.testing.assert_close(torch.tensor([losses[s] for s in steps]), torch.tensor([reference[s] for s in steps]))

    before = tree(root)
    again = entry(*args, "--ckpt_path", "last")
    assert again.returncode == 2
    assert last_line(again.stderr).startswith(f"error: ckpt_path=last: every run of {root} with a checkpoint has")
    assert tree(root) == before and sorted(p.name for p in root.iterdir()) == ["version_0", "version_1", "version_2"]


class CrashOnce(L.Callback):
    """Raises in the middle of training step `at` (after the forward pass, before the backward)."""

    at: int | None = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if trainer.global_step == CrashOnce.at:
            CrashOnce.at = None
            raise RuntimeError("boom")


def test_a_crash_keeps_its_step_and_resumes_without_a_gap(tmp_path, monkeypatch):
    args = [*QUICKSTART, *common(tmp_path), "--trainer.max_steps", "8", "--trainer.val_check_interval", "5"]
    main(args)
    root = tmp_path / "runs" / "quickstart"
    monkeypatch.setattr(CrashOnce, "at", 3)
    with pytest.raises(RuntimeError, match="boom"):
        main([*args, "--trainer.callbacks+=tests.test_reliability.CrashOnce"])
    status = json.loads((root / "version_1" / "status.json").read_text())
    assert status | {"time": None} == {"status": "failed", "step": 3, "message": "RuntimeError: boom", "time": None}
    assert torch.load(root / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    main([*args, "--ckpt_path", "last"])
    steps, losses = train_loss_steps(root / "version_1")
    _, reference = train_loss_steps(root / "version_0")
    assert steps == list(range(8))
    torch.testing.assert_close(torch.tensor([losses[s] for s in steps]), torch.tensor([reference[s] for s in steps]))


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    args = [*QUICKSTART, *common(tmp_path), "--trainer.max_steps", "30", "--model.init_args.optimizer.lr", "1e6"]
    result = entry(*args)
    assert result.returncode == 1, result.stderr[-2000:]
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    found = re.fullmatch(
        r"error: train/loss is (nan|inf|-inf) at step (\d+); training stopped, "
        r"last finite checkpoint kept: (\S+) \(step (\d+)\)",
        last_line(result.stderr),
    )
    assert found, last_line(result.stderr)
    step, kept, kept_step = int(found[2]), Path(found[3]), int(found[4])
    assert kept == run_dir / "checkpoints" / "last.ckpt" and kept_step < step
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["step"] == step and "NonFiniteLossError" in status["message"]
    assert not (run_dir / "hf_model").exists() and not (run_dir / "metrics.json").exists()
    for checkpoint in (run_dir / "checkpoints").glob("*.ckpt"):  # "best" and "last" alike: from finite states only
        state = torch.load(checkpoint, weights_only=False)
        assert state["global_step"] <= kept_step
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values())


def test_failed_starts_are_one_line_and_leave_every_run_dir_as_it_was(tmp_path):
    base = common(tmp_path)
    runs = tmp_path / "runs"
    main(["--config", "experiments/configs/mlm_random.yaml", *base, "--trainer.max_steps", "2", "--experiment", "enc"])
    encoder_ckpt = runs / "enc" / "version_0" / "checkpoints" / "last.ckpt"
    for name, content in (
        ("dec", encoder_ckpt.read_bytes()),
        ("cut", encoder_ckpt.read_bytes()[: encoder_ckpt.stat().st_size // 2]),
    ):
        (runs / name / "version_0" / "checkpoints").mkdir(parents=True)  # unfinished runs (no status, no metrics)
        (runs / name / "version_0" / "config.yaml").write_text("original")
        (runs / name / "version_0" / "checkpoints" / "last.ckpt").write_bytes(content)
    short_text = tmp_path / "short.txt"
    short_text.write_text("hi.\n\nyo.\n\nok.\n\nno.\n")
    before = tree(runs)

    mismatch = entry(*QUICKSTART, *base, "--experiment", "dec", "--ckpt_path", "last")
    dec_ckpt = runs / "dec" / "version_0" / "checkpoints" / "last.ckpt"
    assert (mismatch.returncode, last_line(mismatch.stderr)) == (
        2,
        f"error: ckpt_path: '{dec_ckpt}' holds a MaskedLMModule (encoder, 'mlm' objective) checkpoint, "
        "but the config trains CausalLMModule (decoder, 'causal' objective)",
    )
    truncated = entry(*QUICKSTART, *base, "--experiment", "cut", "--ckpt_path", "last")
    assert truncated.returncode == 2
    assert last_line(truncated.stderr).startswith(
        f"error: ckpt_path: '{runs / 'cut' / 'version_0' / 'checkpoints' / 'last.ckpt'}' is not a readable "
        "checkpoint (truncated or damaged? "
    )
    short = entry(*QUICKSTART, *base, "--data.data_path", str(short_text))
    assert (short.returncode, last_line(short.stderr)) == (
        2,
        "error: data: the train text is shorter than one block of 32 tokens",
    )
    for result in (mismatch, truncated, short):
        assert "Traceback" not in result.stderr
    assert tree(runs) == before
    assert sorted(p.name for p in runs.iterdir()) == ["cut", "dec", "enc"]  # no quickstart/ folder left behind


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["--data.mask_ration", "0.2"],
            "error: unknown key data.mask_ration; did you mean data.mask_ratio? "
            "(see --data.help datamodules.PretrainingDataModule)",
        ),
        (
            ["--model.init_args.hiden_size", "64"],
            "error: unknown key model.hiden_size; did you mean model.hidden_size? "
            "(see --model.help lightning_modules.CausalLMModule)",
        ),
        (["--no_such_option", "1"], "error: unknown key no_such_option"),
        (["--trainer.max_step", "3"], "error: unknown key trainer.max_step; did you mean trainer.max_steps?"),
        (["--data.masking.init_args.ratio", "0.2"], "error: data.masking.ratio was renamed: use data.mask_ratio"),
        (["--data.block_size", "x"], "error: data.block_size: Expected a <class 'int'>. Got value: x"),
        (["--config", "no/such.yaml"], f"error: config: File does not exist: '{Path.cwd() / 'no/such.yaml'}'"),
        (
            ["--trainer.max_steps", "0"],
            "error: trainer.max_steps=0 trains nothing: give a positive number (-1: no limit)",
        ),
        (
            ["--data.vocab_size", "5"],
            "error: data.vocab_size=5 is below 263, the smallest byte-level BPE (256 bytes + 7 special tokens)",
        ),
        (["--threads", "0"], "error: threads must be >= 1, got 0"),
    ],
)
def test_bad_command_lines_are_one_line_without_usage(override, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*QUICKSTART, *common(tmp_path), *override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert last_line(err) == message and "usage" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
