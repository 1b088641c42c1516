"""Checkpoints a run can trust, driven through the real entry point (issue 21, items 1-5 and 9):
periodic saves from the first interval, checksums, one process per run dir, the data a checkpoint
trained on, max_steps, and refusals before a run dir is made (docs/reliability.md)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from experiments.run import main
from experiments.run_lock import LOCK_FILE, RunLock
from tests.test_reliability import ENTRY, QUICKSTART, common, entry, last_line, tree

ALLOW = "or set --allow_other_data true to continue on this data"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step quickstart run (built-in corpus, trained BPE): its run dir."""
    tmp = tmp_path_factory.mktemp("finished")
    main([*QUICKSTART, *common(tmp), "--trainer.max_steps", "4", "--progress.when", "never"])
    return tmp / "runs" / "quickstart" / "version_0"


def other_corpus(path: Path) -> Path:
    """A text file unlike the built-in corpus, long enough for a few blocks."""
    path.write_text("".join(f"Ships number {i} sailed past the harbour light at dawn.\n\n" for i in range(300)))
    return path


def test_periodic_checkpoints_start_before_the_first_validation_and_a_killed_run_resumes(tmp_path):
    args = [*QUICKSTART, *common(tmp_path), "--trainer.max_steps", "12", "--trainer.val_check_interval", "10"]
    args += ["--checkpoint.every_n_train_steps", "2"]
    run = subprocess.Popen(
        [*ENTRY, *args, "--progress.every_n_steps", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in run.stdout:
        if line.startswith("step 5/12"):
            run.kill()  # SIGKILL: no handler runs, only what was already written is kept
            break
    run.communicate(timeout=600)
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]  # no "best" yet
    step = torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"]
    assert step >= 4 and step % 2 == 0  # before the first validation (step 10)
    digest = hashlib.sha256((checkpoints / "last.ckpt").read_bytes()).hexdigest()
    assert (checkpoints / "last.ckpt.sha256").read_text() == f"{digest}  last.ckpt\n"  # sha256sum's format

    resumed = entry(*args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming the unfinished run {run_dir} from {checkpoints / 'last.ckpt'}" in resumed.stdout
    assert json.loads((run_dir / "status.json").read_text())["step"] == 12
    best = [p.name for p in checkpoints.glob("best-*.ckpt")]
    assert best == ["best-step10.ckpt"] and (checkpoints / "best-step10.ckpt.sha256").is_file()


def test_a_damaged_checkpoint_is_refused_naming_the_file(finished, tmp_path):
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    (run_dir / "checkpoints").mkdir(parents=True)  # an unfinished run with a copy of the finished one's files
    for name in ("last.ckpt", "last.ckpt.sha256"):
        (run_dir / "checkpoints" / name).write_bytes((finished / "checkpoints" / name).read_bytes())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    data = bytearray(ckpt.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])  # loads fine without a check
    ckpt.write_bytes(bytes(data))
    before = tree(tmp_path / "runs")
    result = entry(*QUICKSTART, *common(tmp_path), "--trainer.max_steps", "8", "--ckpt_path", "last")
    assert (result.returncode, last_line(result.stderr)) == (
        2,
        f"error: ckpt_path: '{ckpt}' does not match the checksum recorded when it was written (last.ckpt.sha256): "
        "the file was damaged or changed since",
    )
    assert "resuming" not in result.stdout and tree(tmp_path / "runs") == before


def test_a_second_process_in_the_same_run_dir_is_refused_and_a_dead_ones_lock_does_not_block(tmp_path):
    args = [*QUICKSTART, *common(tmp_path), "--trainer.val_check_interval", "10", "--checkpoint.every_n_train_steps"]
    args += ["1"]
    first = subprocess.Popen(
        [*ENTRY, *args, "--trainer.max_steps", "100000", "--progress.every_n_steps", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in first.stdout:
            if line.startswith("step 2/"):
                break
        run_dir = tmp_path / "runs" / "quickstart" / "version_0"
        second = entry(*args, "--trainer.max_steps", "100000", "--ckpt_path", "last")
        assert (second.returncode, last_line(second.stderr)) == (
            2,
            f"error: {run_dir} is in use: process {first.pid} is training in it; wait for it to end or stop it",
        )
    finally:
        first.kill()
        first.communicate(timeout=600)
    assert (run_dir / LOCK_FILE).read_text() == f"{first.pid}\n"  # left by the killed process, held by none
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    resumed = entry(*args, "--trainer.max_steps", str(step + 2), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


def test_the_lock_names_its_holder_and_is_free_again_once_released(tmp_path):
    lock = RunLock(tmp_path)
    with pytest.raises(ConfigError, match=f"is in use: process {os.getpid()} is training in it"):
        RunLock(tmp_path)
    lock.release()
    RunLock(tmp_path).release()


@pytest.mark.parametrize("allow", [False, True])
def test_continuing_on_another_tokenizer_is_refused_unless_allowed(allow, finished, tmp_path, capsys):
    ckpt = finished / "checkpoints" / "last.ckpt"
    args = [*QUICKSTART, *common(tmp_path), "--trainer.max_steps", "6", "--ckpt_path", str(finished)]
    args += ["--data.data_path", str(other_corpus(tmp_path / "other.txt"))]
    if allow:
        main([*args, "--allow_other_data", "true"])
        assert json.loads((tmp_path / "runs" / "quickstart" / "version_0" / "status.json").read_text())["step"] == 6
        return
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert last_line(capsys.readouterr().err) == (
        f"error: ckpt_path: '{ckpt}' was trained with another tokenizer (then a 512-token BPE trained on the "
        "built-in corpus (120 documents, seed 0); now a 512-token BPE trained on data.data_path "
        f"'{tmp_path / 'other.txt'}') and was trained on another corpus (then the built-in corpus (120 documents, "
        f"seed 0); now data.data_path '{tmp_path / 'other.txt'}'): resume on its own data, {ALLOW}"
    )
    assert not (tmp_path / "runs").exists()


def test_continuing_with_the_same_tokenizer_on_another_corpus_is_refused(tiny_causal_dir, tmp_path, capsys):
    base = [*QUICKSTART, *common(tmp_path), "--data.tokenizer_path", str(tiny_causal_dir)]
    main([*base, "--trainer.max_steps", "2", "--progress.when", "never"])
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    other = other_corpus(tmp_path / "other.txt")
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--trainer.max_steps", "4", "--ckpt_path", str(run_dir), "--data.data_path", str(other)])
    assert exit_info.value.code == 2
    assert last_line(capsys.readouterr().err) == (
        f"error: ckpt_path: '{run_dir / 'checkpoints' / 'last.ckpt'}' was trained on another corpus (then the "
        f"built-in corpus (120 documents, seed 0); now data.data_path '{other}'): resume on its own data, {ALLOW}"
    )
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]


def test_a_finished_run_continued_without_raising_max_steps_is_one_line(finished, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*QUICKSTART, *common(tmp_path), "--trainer.max_steps", "4", "--ckpt_path", str(finished)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert last_line(err) == (
        "error: ckpt_path: the run already reached max_steps 4 (its checkpoint is at step 4); "
        "raise --trainer.max_steps to continue"
    )
    assert "continuing" not in out and not (tmp_path / "runs").exists()


def test_a_checkpoint_of_the_wrong_kind_is_refused_before_a_run_dir_is_announced(finished, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "experiments/configs/mlm_random.yaml", *common(tmp_path), "--ckpt_path", str(finished)])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert last_line(err) == (
        f"error: ckpt_path: '{finished / 'checkpoints' / 'last.ckpt'}' holds a CausalLMModule (decoder, 'causal' "
        "objective) checkpoint, but the config trains MaskedLMModule (encoder, 'mlm' objective)"
    )
    assert "continuing" not in out and not (tmp_path / "runs").exists()


def test_an_interrupted_save_keeps_the_previous_checkpoint_whole(finished, tmp_path, monkeypatch):
    """The new file is written beside the old one and moved in place once complete; a failed write is removed."""
    from experiments.checkpoints import ChecksummedCheckpointIO, checksum_errors

    target = tmp_path / "last.ckpt"
    for name in ("last.ckpt", "last.ckpt.sha256"):
        (tmp_path / name).write_bytes((finished / "checkpoints" / name).read_bytes())
    before = target.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("experiments.checkpoints.file_sha256", disk_full)  # fails after writing, before moving
    with pytest.raises(OSError):
        ChecksummedCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    monkeypatch.undo()
    assert target.read_bytes() == before and checksum_errors(str(target)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]  # no partial file left
    ChecksummedCheckpointIO().remove_checkpoint(target)
    assert not target.exists() and not (tmp_path / "last.ckpt.sha256").exists()
