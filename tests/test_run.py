"""End to end through the entry point, as a user runs it."""

import gzip
import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from datamodules import PretrainingDataModule
from experiments.run import default_threads, main, set_threads
from lightning_modules import CausalLMModule
from lightning_modules.base import OptimizerConfig

CONFIGS = sorted(Path("experiments/configs").glob("*.yaml"))
REQUIRED_TAGS = {"train/loss", "val/loss", "val/ppl", "mask/share", "perf/tokens_per_sec"}


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a run dir's TensorBoard events: {tag: {step: value}}."""
    out: dict[str, dict[int, float]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return out


def run(config: str, tiny_args: list[str], *extra: str):
    return main(["--config", f"experiments/configs/{config}.yaml", *tiny_args, *extra])


@pytest.mark.parametrize(
    ("config", "auto_class"),
    [("mlm_random", AutoModelForMaskedLM), ("ntp", AutoModelForCausalLM), ("meap", AutoModelForCausalLM)],
)
def test_each_objective_end_to_end(config, auto_class, tiny_args, tmp_path):
    cli = run(
        config,
        tiny_args,
        "--trainer.max_steps",
        "20",
        "--trainer.val_check_interval",
        "20",
        "--model.init_args.optimizer.warmup_steps",
        "2",
        "--model.init_args.optimizer.lr",
        "0.01",
        "--trainer.log_every_n_steps",
        "5",
    )
    run_dir = tmp_path / "runs" / config / "version_0"
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "checkpoints", "hf_model", "metrics.json"}
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"last.ckpt", "best-step20.ckpt"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert metrics["val/ppl"] == pytest.approx(torch.tensor(metrics["val/loss"]).exp().item(), rel=1e-4)
    logged = scalars(run_dir)
    assert set(logged) >= REQUIRED_TAGS
    assert ("mask/ratio" in logged) == (config != "ntp")  # NoMask has no ratio to log
    losses = list(logged["train/loss"].values())
    assert losses[-1] < losses[0]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["init_args"]["block_size"] == 32

    # the export reloads offline with the Auto classes and computes what the trained module computes
    model = auto_class.from_pretrained(run_dir / "hf_model", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf_model", local_files_only=True)
    ids = tokenizer("The code of Velora is 4812.", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tokenizer.bos_token_id  # framed as training framed every document
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, cli.model.eval()(ids))
    # issue 21.14: a decoder pads on the left (batched generate continues each row's own last token), an
    # encoder on the right; the length limit is the model's context, not transformers' 1e30
    assert tokenizer.padding_side == ("left" if auto_class is AutoModelForCausalLM else "right")
    assert tokenizer.model_max_length == model.config.max_position_embeddings < 1e6
    batch = tokenizer(["The code of Velora is 4812.", "Hi."], padding=True, return_tensors="pt")
    last = batch["input_ids"][:, -1 if tokenizer.padding_side == "left" else 0]
    assert (last != tokenizer.pad_token_id).all()
    # issue 21.17: the unigram predictor's scores on the validation targets, the level a plot marks
    assert 0 < metrics["val/unigram_acc"] < 1
    assert metrics["val/unigram_ppl"] == pytest.approx(math.exp(metrics["val/unigram_loss"]), rel=1e-4)


TEACHER = "runs/mlm_random/version_0/hf_model"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_runs(config, tiny_args, tmp_path):
    text = config.read_text()
    assert text.startswith("# "), f"{config} needs a comment header saying what it is for"
    if TEACHER in text:  # distillation / teacher entropy: train a tiny teacher with the same tokenizer first
        main(["--config", "experiments/configs/mlm_random.yaml", *tiny_args, "--trainer.max_steps", "2"])
        config = tmp_path / config.name
        models = Path("experiments/configs/models").resolve()  # the copy's relative model path must still resolve
        config.write_text(text.replace(TEACHER, str(tmp_path / TEACHER)).replace(": models/", f": {models}/"))
    main(["--config", str(config), *tiny_args, "--trainer.max_steps", "2"])
    assert (tmp_path / "runs" / config.stem / "version_0" / "hf_model" / "config.json").exists()


def test_a_second_run_never_overwrites_the_first(tiny_args, tmp_path):
    run("ntp", tiny_args, "--trainer.max_steps", "1")
    first = (tmp_path / "runs" / "ntp" / "version_0" / "config.yaml").read_text()
    run("ntp", tiny_args, "--trainer.max_steps", "1", "--experiment", "ntp")
    assert (tmp_path / "runs" / "ntp" / "version_1" / "config.yaml").exists()
    assert (tmp_path / "runs" / "ntp" / "version_0" / "config.yaml").read_text() == first


def test_resumed_run_matches_an_uninterrupted_one(tiny_args, tmp_path):
    common = [
        *tiny_args,
        "--trainer.max_steps",
        "8",
        "--trainer.val_check_interval",
        "3",
        "--checkpoint.every_n_train_steps",
        "1",
        "--model.init_args.dropout",
        "0.1",
    ]
    run(
        "mlm_random",
        common,
        "--experiment",
        "full",
        "--checkpoint.monitor",
        "null",
        "--checkpoint.save_top_k",
        "-1",
        "--checkpoint.filename",
        "step{step}",
    )
    full_dir = tmp_path / "runs" / "full" / "version_0"
    # an "interrupted" run: a copy of the full run's directory as it was at step 4
    resumed_dir = tmp_path / "runs" / "part" / "version_0"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    (resumed_dir / "config.yaml").write_text("original")
    (resumed_dir / "checkpoints" / "last.ckpt").write_bytes((full_dir / "checkpoints" / "step4.ckpt").read_bytes())
    run("mlm_random", common, "--experiment", "part", "--ckpt_path", "last")
    full, resumed = scalars(full_dir)["train/loss"], scalars(resumed_dir)["train/loss"]
    assert sorted(resumed) == [4, 5, 6, 7]
    torch.testing.assert_close(
        torch.tensor([resumed[s] for s in range(4, 8)]), torch.tensor([full[s] for s in range(4, 8)])
    )
    assert (resumed_dir / "config.yaml").read_text() == "original"  # kept; the resume adds its own
    assert (resumed_dir / "config.resume-1.yaml").exists()
    assert not (tmp_path / "runs" / "part" / "version_1").exists()


def test_ddp_with_two_cpu_processes_makes_one_run_dir(tiny_args, tmp_path):
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config",
        "experiments/configs/meap.yaml",
        *tiny_args,
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs" / "meap").iterdir()] == ["version_0"]
    assert (tmp_path / "runs" / "meap" / "version_0" / "hf_model" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--data.mask_ratio", "1.5"], "data.mask_ratio must be in [0, 1], got 1.5"),
        (["--data.data_path", "/no/such/corpus"], "data.data_path: '/no/such/corpus' does not exist"),
        (["--data.block_size", "4096"], "data.block_size=4096 is larger than the model's"),
        (["--model.init_args.max_position_embeddings", "16"], "data.block_size=32 is larger than the model's 16"),
        (
            ["--data.masking", "datamodules.NoMask", "--data.mask_ratio", "null"],  # NoMask takes no ratio
            "data.masking=NoMask builds 'causal' batches but model=MaskedLMModule",
        ),
    ],
)
def test_bad_input_is_one_clear_line(override, message, tiny_args, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run("mlm_random", tiny_args, *override)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list((tmp_path / "runs").glob("*/version_*"))  # nothing half-written, no number taken


def test_strategy_the_machine_cannot_run_is_one_line(tiny_args, capsys):
    with pytest.raises(SystemExit):
        run("meap", tiny_args, "--trainer.strategy", "fsdp", "--trainer.devices", "2")
    assert "error: trainer: The strategy `fsdp` requires a GPU accelerator" in capsys.readouterr().err


def test_bf16_mixed_precision_trains(tiny_args, tmp_path):
    run("meap", tiny_args, "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2")
    assert (tmp_path / "runs" / "meap" / "version_0" / "hf_model" / "model.safetensors").exists()


WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


@pytest.mark.skipif(not WIKITEXT.is_dir(), reason="../shared/data/wikitext-2 is not here")
def test_a_folder_of_real_text_trains_like_the_builtin_corpus(tiny_args, tmp_path):
    cli = run("mlm_random", tiny_args, "--data.data_path", str(WIKITEXT), "--data.vocab_size", "2000")
    assert "the" in cli.datamodule.tokenizer.get_vocab() or "Ġthe" in cli.datamodule.tokenizer.get_vocab()
    metrics = json.loads((tmp_path / "runs" / "mlm_random" / "version_0" / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


def test_a_data_folder_gives_its_txt_files_only_and_the_run_dir_lists_them(tiny_args, tmp_path):
    """Issue 21.13: a folder's SOURCE.md (provenance) was trained on as corpus text. A folder gives its
    `.txt` / `.txt.gz` files, as the docs say; a file the user names is read whatever its name; the run
    dir's data_files.json lists what each split read."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    text = "".join(f"Velora {i} wrote the code {i}.\n\n" for i in range(300))
    (folder / "a.txt").write_text(text)
    with gzip.open(folder / "b.txt.gz", "wt") as out:
        out.write(text)
    (folder / "SOURCE.md").write_text("# Provenance\n\nDownloaded from somewhere, licence CC-BY.\n")
    (folder / "notes.raw").write_text("not corpus text\n")
    run("mlm_random", tiny_args, "--data.data_path", str(folder), "--data.vocab_size", "300")
    listed = json.loads((tmp_path / "runs" / "mlm_random" / "version_0" / "data_files.json").read_text())
    assert listed == {
        "train": [str(folder / "a.txt"), str(folder / "b.txt.gz")],
        "validation": "held out from the train files (data.val_fraction)",
    }
    (tmp_path / "val.md").write_text(text)
    run(
        "mlm_random",
        tiny_args,
        "--data.data_path",
        str(folder / "a.txt"),
        "--data.val_data_path",
        str(tmp_path / "val.md"),
    )
    listed = json.loads((tmp_path / "runs" / "mlm_random" / "version_1" / "data_files.json").read_text())
    assert listed == {"train": [str(folder / "a.txt")], "validation": [str(tmp_path / "val.md")]}


def test_help_starts_with_masklab_keys_that_exist(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "usage: python -m experiments.run --config CONFIG [--KEY VALUE ...]"
    top = "\n".join(lines[:30])
    assert {"--data.mask_ratio", "--data.block_size", "--model.hidden_size", "--threads"} <= set(top.split())
    data_keys = inspect.signature(PretrainingDataModule).parameters
    model_keys = {
        *inspect.signature(CausalLMModule).parameters,
        *(f"optimizer.{f.name}" for f in fields(OptimizerConfig)),
    }
    for group, key in re.findall(r"--(data|model)\.([\w.]+)", top):
        if not key.endswith("help"):
            assert key in (data_keys if group == "data" else model_keys), f"--{group}.{key} in --help is no key"
    for class_path in re.findall(r"--[\w.]+\.help ([\w.]+)", top):  # every class the help points to exists
        module, name = class_path.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), class_path


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(os, "getloadavg", lambda: (1.4, 0.0, 0.0))
    assert default_threads() == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert default_threads() == 1
    before = torch.get_num_threads()
    try:
        set_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_finished_runs_checkpoint_continues_in_a_new_run_dir(tiny_args, tmp_path, capsys):
    run("quickstart", tiny_args, "--trainer.max_steps", "2")
    finished_dir = tmp_path / "runs" / "quickstart" / "version_0"
    before = {p: p.read_bytes() for p in finished_dir.rglob("*") if p.is_file()}
    run("quickstart", tiny_args, "--trainer.max_steps", "4", "--ckpt_path", str(finished_dir))
    new_dir = tmp_path / "runs" / "quickstart" / "version_1"
    assert (
        f"continuing from the finished run's checkpoint {finished_dir}/checkpoints/last.ckpt in a new run dir {new_dir}"
        in capsys.readouterr().out
    )
    assert {p: p.read_bytes() for p in finished_dir.rglob("*") if p.is_file()} == before
    assert torch.load(new_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert json.loads((new_dir / "status.json").read_text()) | {"time": None} == {
        "status": "finished",
        "step": 4,
        "time": None,
    }


def test_error_from_the_command_line_has_no_traceback(tmp_path):
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config",
        "experiments/configs/ntp.yaml",
        "--runs_dir",
        str(tmp_path),
        "--data.mask_ratio",
        "-0.2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: data.mask_ratio must be in [0, 1], got -0.2"
    assert "Traceback" not in result.stderr
