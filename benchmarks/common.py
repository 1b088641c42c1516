"""Helpers shared by the benchmark commands: timing, the tiny datamodule, the quickstart model."""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from torch import Tensor

from datamodules import MaskingPolicy, PretrainingDataModule, RandomMLMMask
from lightning_modules import CausalLMModule, OptimizerConfig

RELIABLE_CONTENTION = 0.05  # other processes + steal, as a share of all cores
QUICKSTART = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "quickstart.yaml"


def quiet() -> None:
    """Silence progress bars, Lightning's info lines and its data-loader hints: a benchmark's
    output should be its numbers."""
    import datasets

    datasets.disable_progress_bars()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")


class CpuContention:
    """How much CPU *other* processes used while a benchmark ran (Linux: /proc/stat), and how
    much the hypervisor stole. Ratios of wall times are only trustworthy when both are ~0: on a
    2-core machine one busy neighbour process moves a step time by tens of percent."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[list[int], float, float] | None:
        try:
            with open("/proc/stat") as f:
                jiffies = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        own = os.times()
        return jiffies, own.user + own.system, time.perf_counter()

    def measure(self) -> tuple[float, float] | None:
        """(share of the machine's CPU used by other processes, share stolen by the hypervisor)
        since construction; None where /proc/stat is missing."""
        end = self._sample()
        if self.start is None or end is None:
            return None
        (j0, own0, _), (j1, own1, _) = self.start, end
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq, steal = ((b - a) / hz for a, b in zip(j0, j1))
        total = user + nice + system + idle + iowait + irq + softirq + steal  # CPU-seconds, all cores
        others = max(user + nice + system + irq + softirq - (own1 - own0), 0.0)
        return others / total, steal / total

    def report(self) -> tuple[str, tuple[str, str, str]]:
        """A sentence for the log and a row for the results table."""
        shares = self.measure()
        if shares is None:
            return "CPU contention: unknown (no /proc/stat)", (
                "CPU used by other processes during the run",
                "unknown",
                "~0%",
            )
        others, steal = shares
        line = (
            f"CPU contention during this run: other processes {others:.0%} of the machine's CPU, hypervisor "
            f"steal {steal:.0%}"
        )
        if others + steal > RELIABLE_CONTENTION:
            line += "\nWARNING: the machine was busy; the ratios above are unreliable, run again on an idle machine"
        return line, (
            "CPU used by other processes (+ steal) during the run",
            f"{others:.0%} (+ {steal:.0%})",
            f"~0% (ratios unreliable above {RELIABLE_CONTENTION:.0%})",
        )


def median_time(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of `fn()` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def tiny_datamodule(
    masking: MaskingPolicy | None = None,
    builtin_documents: int = 300,
    vocab_size: int = 2048,
    block_size: int = 128,
    batch_size: int = 32,
) -> Iterator[PretrainingDataModule]:
    """The built-in corpus tokenised and packed the way training does it, cached in a temp dir
    that is removed afterwards (set up for "fit": `tokenizer`, `vocab`, `train_blocks`)."""
    with tempfile.TemporaryDirectory(prefix="masklab-bench-") as cache_dir:
        dm = PretrainingDataModule(
            masking=masking if masking is not None else RandomMLMMask(),
            builtin_documents=builtin_documents,
            vocab_size=vocab_size,
            block_size=block_size,
            batch_size=batch_size,
            cache_dir=cache_dir,
        )
        dm.prepare_data()
        dm.setup("fit")
        yield dm


def samples(dm: PretrainingDataModule, batch_size: int, batch_index: int = 0) -> list[tuple[int, Tensor]]:
    """The `(index, LongTensor[L])` samples of one batch, as the training DataLoader hands them
    to the collate (consecutive blocks, wrapping around the training set)."""
    n = len(dm.train_blocks)
    indices = [(batch_index * batch_size + i) % n for i in range(batch_size)]
    return [(i, torch.from_numpy(dm.train_blocks[i].astype("int64"))) for i in indices]


def quickstart_config() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def _init_args(section: dict | None) -> dict:
    """A config section's arguments, written either flat or as `class_path` + `init_args`."""
    section = section or {}
    return dict(section.get("init_args", section)) if "class_path" in section else dict(section)


def quickstart_model_args() -> dict:
    """`model.init_args` of quickstart.yaml (the optimiser as an `OptimizerConfig`)."""
    args = _init_args(quickstart_config().get("model"))
    args["optimizer"] = OptimizerConfig(**(args.get("optimizer") or {}))
    return args


def quickstart_data_args() -> dict:
    """`data` (or `data.init_args`) of quickstart.yaml."""
    return _init_args(quickstart_config().get("data"))


def quickstart_model(dm: PretrainingDataModule, cls: type[CausalLMModule] = CausalLMModule) -> CausalLMModule:
    """The model of `experiments/configs/quickstart.yaml` (read from the file, so it stays in
    sync), with the datamodule's vocabulary and block size."""
    torch.manual_seed(0)
    return cls(vocab=dm.model_vocab, block_size=dm.block_size, **quickstart_model_args())


def step_timer(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[dict[str, Tensor]], float]:
    """A function timing one full optimiser step (forward, backward, AdamW, zero_grad) on a batch."""

    def step(batch: dict[str, Tensor]) -> float:
        start = time.perf_counter()
        loss, _, _ = module.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def markdown_table(rows: list[tuple[str, str, str]]) -> str:
    """A `metric | measured | target` table to paste into the README."""
    lines = ["| metric | measured | target |", "| --- | --- | --- |"]
    lines += [f"| {metric} | {measured} | {target} |" for metric, measured, target in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def save_tiny_hf_model(
    folder, objective: str, max_positions: int = 256, hidden_size: int = 32, num_layers: int = 2, heads: int = 4
):
    """A random transformers model (Llama for "causal", BERT for "mlm"; 2 layers of 32 by default)
    and a small BPE tokenizer trained on the built-in corpus, saved as an `hf_model/` folder: the
    evaluation benchmarks time suites on it at a larger shape, the tests use it as a fixture."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from datamodules.corpus import BuiltinCorpus
    from datamodules.tokenizer import exported_tokenizer, train_bpe

    torch.manual_seed(0)
    tokenizer = train_bpe(BuiltinCorpus(0).documents(60), vocab_size=300)
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    shape = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "intermediate_size": 2 * hidden_size,
        "max_position_embeddings": max_positions,
    }
    if objective == "causal":
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **ids, **shape))
    else:
        model = AutoModelForMaskedLM.from_config(AutoConfig.for_model("bert", type_vocab_size=1, **ids, **shape))
    model.save_pretrained(folder)
    exported_tokenizer(tokenizer, objective, model.config).save_pretrained(folder)  # as ExportCallback saves it
    return folder
