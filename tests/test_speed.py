"""Speed switches (issue 9): each trains a few steps through the entry point, and MFU logging.

The switches that must not change the arithmetic (attention kernel, activation checkpointing,
fused AdamW, compile) are checked against the losses of the same run without them.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from datamodules import PretrainingDataModule
from experiments.run import main
from tests.conftest import TINY
from tests.test_run import scalars

STEPS = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"]


def run(config: str, tiny_args: list[str], *extra: str):
    return main(["--config", f"experiments/configs/{config}.yaml", *tiny_args, *extra])


def train_losses(run_dir: Path) -> list[float]:
    logged = scalars(run_dir)["train/loss"]
    return [logged[step] for step in sorted(logged)]


@pytest.fixture(scope="module")
def plain_losses(tmp_path_factory) -> dict[str, list[float]]:
    """Train losses of the quickstart decoder and the random-MLM encoder without any switch."""
    root = tmp_path_factory.mktemp("plain")
    out = {}
    for config in ("quickstart", "mlm_random"):
        main(
            [
                "--config",
                f"experiments/configs/{config}.yaml",
                *TINY,
                *STEPS,
                "--runs_dir",
                str(root / "runs"),
                "--data.cache_dir",
                str(root / "cache"),
            ]
        )
        out[config] = train_losses(root / "runs" / config / "version_0")
    return out


def test_mfu_is_logged_next_to_tokens_per_sec_when_the_peak_is_known(tiny_args, tmp_path):
    cli = run("quickstart", tiny_args, "--throughput.window_size", "2", "--throughput.peak_flops", "1e9")
    logged = scalars(tmp_path / "runs" / "quickstart" / "version_0")
    assert {"perf/tokens_per_sec", "perf/flops_per_sec", "perf/mfu"} <= set(logged)
    per_batch = cli.model.flop_counts.training_flops(4, 32, 4 * 31)  # batch 4 x 32, next token at 31 positions
    for step, mfu in logged["perf/mfu"].items():
        flops_per_sec = logged["perf/flops_per_sec"][step]
        assert mfu == pytest.approx(flops_per_sec / 1e9, rel=1e-5) and mfu > 0
        assert flops_per_sec / logged["perf/batches_per_sec"][step] == pytest.approx(per_batch, rel=1e-4)


def test_no_mfu_on_a_device_without_a_known_peak(tiny_args, tmp_path):
    run("mlm_random", tiny_args, "--throughput.window_size", "2")
    logged = scalars(tmp_path / "runs" / "mlm_random" / "version_0")
    assert "perf/flops_per_sec" in logged and "perf/mfu" not in logged


@pytest.mark.parametrize(
    ("config", "switch"),
    [
        ("quickstart", ["--model.init_args.attn_implementation", "eager"]),
        ("mlm_random", ["--model.init_args.attn_implementation", "eager"]),
        ("quickstart", ["--model.init_args.gradient_checkpointing", "true"]),
        ("mlm_random", ["--model.init_args.gradient_checkpointing", "true"]),
        ("quickstart", ["--model.init_args.optimizer.fused", "true"]),
    ],
    ids=["eager-llama", "eager-bert", "checkpointing-llama", "checkpointing-bert", "fused-adamw"],
)
def test_switch_trains_to_the_same_losses(config, switch, plain_losses, tiny_args, tmp_path):
    cli = run(config, tiny_args, *STEPS, *switch)
    torch.testing.assert_close(
        train_losses(tmp_path / "runs" / config / "version_0"), plain_losses[config], rtol=1e-4, atol=1e-5
    )
    key, value = switch[0].removeprefix("--model.init_args."), switch[1]
    if key == "attn_implementation":
        assert cli.model.model.config._attn_implementation == value
    elif key == "gradient_checkpointing":
        assert any(getattr(m, "gradient_checkpointing", False) for m in cli.model.modules())
    else:
        assert cli.trainer.optimizers[0].defaults["fused"] is True


def test_gradient_checkpointing_recomputes_each_layer_in_the_backward():
    from lightning_modules import CausalLMModule
    from tests.test_lightning_modules import TINY as MODULE
    from tests.test_lightning_modules import toy_batch

    calls = {}
    for checkpointing in (False, True):
        module = CausalLMModule(**MODULE, gradient_checkpointing=checkpointing).train()
        runs = []
        module.model.model.layers[0].mlp.register_forward_pre_hook(
            lambda *_, runs=runs: runs.append(1)
        )  # inside the checkpoint
        ids, mask = toy_batch()
        module.step({"input_ids": ids, "attention_mask": mask, "labels": ids})[0].backward()
        calls[checkpointing] = len(runs)
    assert calls == {False: 1, True: 2}


def test_an_attention_kernel_the_model_lacks_is_one_line(tiny_args, capsys):
    with pytest.raises(SystemExit):
        run(
            "mlm_random",
            tiny_args,
            "--model.init_args.arch",
            "deberta-v2",
            "--model.init_args.attn_implementation",
            "flex_attention",
        )
    err = capsys.readouterr().err
    assert "error: model.attn_implementation='flex_attention': DebertaV2ForMaskedLM does not support" in err
    assert "Traceback" not in err


def test_gradient_accumulation_takes_one_optimiser_step_per_n_batches(tiny_args):
    cli = run("quickstart", tiny_args, *STEPS, "--trainer.accumulate_grad_batches", "2")
    assert cli.trainer.global_step == 3
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on CPU needs a C++ compiler (g++ or c++)",
)
def test_compiled_model_trains_to_the_same_losses(plain_losses, tiny_args, tmp_path):
    torch._dynamo.reset()
    run("quickstart", tiny_args, *STEPS, "--model.init_args.compile", "true")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was compiled
    torch.testing.assert_close(
        train_losses(tmp_path / "runs" / "quickstart" / "version_0"), plain_losses["quickstart"], rtol=1e-4, atol=1e-4
    )


def test_fsdp_config_builds_an_fsdp_strategy_wrapping_each_decoder_layer():
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    trainer = yaml.safe_load(Path("experiments/configs/trainers/fsdp.yaml").read_text())["trainer"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy | str)
    strategy = parser.instantiate(parser.parse_object({"strategy": trainer["strategy"]})).strategy
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {LlamaDecoderLayer}
    assert trainer["precision"] == "bf16-mixed"


def test_torchrun_with_two_cpu_processes_makes_one_run_dir(tiny_args, tmp_path):
    """The launch of several nodes, on one machine: an external launcher starts every rank, and
    only rank 0 claims a run directory."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "experiments.run",
        "--config",
        "experiments/configs/quickstart.yaml",
        "--config",
        "experiments/configs/trainers/ddp.yaml",
        *tiny_args,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.precision",
        "32",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs" / "quickstart").iterdir()] == ["version_0"]
    assert (tmp_path / "runs" / "quickstart" / "version_0" / "hf_model" / "model.safetensors").exists()


def test_pin_memory_reaches_both_dataloaders(tiny_args):
    cli = run(
        "quickstart",
        tiny_args,
        "--trainer.max_steps",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--data.pin_memory",
        "true",
        "--data.num_workers",
        "1",
    )
    dm = cli.datamodule
    assert dm.train_dataloader().pin_memory and dm.val_dataloader().pin_memory
    assert dm.train_dataloader().num_workers == 1
    assert PretrainingDataModule().loaders.pin_memory == torch.cuda.is_available()  # None = pin when there is a GPU
