"""One line instead of a traceback or a usage dump, from both entry points (issue 21, items 6-8):
the exit code, the line, and the run dir left as it was (docs/reliability.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from datamodules import PretrainingDataModule
from experiments.evaluate import main as evaluate
from experiments.run import main
from tests.test_reliability import ENTRY, QUICKSTART, common, last_line


class InterruptedWhilePreparing(PretrainingDataModule):
    """Presses Ctrl-C (sends this process SIGINT) while the data is prepared: while the tokenizer is
    made (the model's vocabulary), or while the blocks are packed (`prepare_data`)."""

    at = os.environ.get("INTERRUPT_AT", "")

    def interrupt(self, where: str) -> None:
        if self.at == where:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)  # the KeyboardInterrupt is raised here

    @property
    def model_vocab(self) -> dict:
        self.interrupt("tokenizer")
        return super().model_vocab

    def prepare_data(self) -> None:
        self.interrupt("blocks")
        super().prepare_data()


@pytest.mark.parametrize("where", ["tokenizer", "blocks"])
def test_ctrl_c_during_data_preparation_exits_130_and_leaves_no_run_dir(where, tmp_path):
    result = subprocess.run(
        [*ENTRY, *QUICKSTART, *common(tmp_path), "--data.class_path", f"{__name__}.InterruptedWhilePreparing"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "INTERRUPT_AT": where},
    )
    assert (result.returncode, last_line(result.stderr)) == (
        130,
        "interrupted before the first training step: nothing to keep",
    ), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.init_args.optimizer.lr", "-0.1"], "error: model.optimizer.lr must be >= 0, got -0.1"),
        (["--runs_dir", "{file}"], "error: runs_dir: cannot make {file}/quickstart: Not a directory"),
        (["--runs_dir", "{file}/sub"], "error: runs_dir: cannot make {file}/sub/quickstart: Not a directory"),
    ],
)
def test_bad_training_input_is_one_line(override, message, tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main([*QUICKSTART, *common(tmp_path), *(o.format(file=file) for o in override)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert last_line(err) == message.format(file=file) and "Traceback" not in err
    assert not (tmp_path / "runs").exists() and file.read_text() == "not a folder"


def test_yaml_syntax_errors_name_the_file_and_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n  val_check_interval: [1, 2\n")
    with pytest.raises(SystemExit) as exit_info:
        main([*QUICKSTART, "--config", str(bad), *common(tmp_path)])
    assert exit_info.value.code == 2
    assert last_line(capsys.readouterr().err) == (
        f"error: config: {bad}: expected ',' or ']', but got '<stream end>' at line 4, column 1 "
        "(while parsing a flow sequence at line 3)"
    )
    # a file that a config names (here the model's) is found too
    (tmp_path / "models").mkdir()
    broken = tmp_path / "models" / "broken.yaml"
    broken.write_text("class_path: lightning_modules.CausalLMModule\ninit_args:\n  a: 1\n   b: 2\n")
    top = tmp_path / "top.yaml"
    top.write_text("model: models/broken.yaml\n")
    with pytest.raises(SystemExit):
        main([*QUICKSTART, "--config", str(top), *common(tmp_path)])
    assert last_line(capsys.readouterr().err) == (
        f"error: config: {broken}: mapping values are not allowed here at line 4, column 5"
    )
    with pytest.raises(SystemExit) as exit_info:
        evaluate(["--config", str(bad), "--run", str(tmp_path), "--suites", "ppl"])
    assert exit_info.value.code == 2
    assert last_line(capsys.readouterr().err).startswith(f"error: config: {bad}: expected ',' or ']'")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ppl.max_block", "2"], "error: unknown key ppl.max_block; did you mean ppl.max_blocks?"),
        (["--ppl.max_blockz", "2"], "error: unknown key ppl.max_blockz; did you mean ppl.max_blocks?"),
        (["--suite", "ppl"], "error: unknown key suite; did you mean suites?"),
    ],
)
def test_evaluate_options_are_one_line_and_never_abbreviated(args, message, tiny_causal_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate(["--run", str(tiny_causal_dir), "--suites", "ppl", *args])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [message] and captured.out == ""


def test_evaluate_out_that_cannot_be_made_is_one_line_and_logs_nothing(tiny_causal_dir, tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("")
    before = sorted(p.name for p in tiny_causal_dir.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        evaluate(["--run", str(tiny_causal_dir), "--suites", "ppl", "--out", str(file / "eval")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert last_line(err) == f"error: out: cannot make {file / 'eval'}: Not a directory" and "Traceback" not in err
    assert sorted(p.name for p in tiny_causal_dir.iterdir()) == before  # no event file, no metrics.json
