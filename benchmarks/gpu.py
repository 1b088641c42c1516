"""Training throughput at scale: tokens/s, MFU and peak memory of one objective on one device.

``python -m benchmarks.gpu --shape 134m|500m|tiny --objective ntp|meap|mlm [--steps N] [--compile] ...``

One model, measured three ways in one process, each for ``--steps`` optimiser steps of which the
first ``--skip`` (warm-up, compilation) are not timed:

1. the Lightning Trainer running the masklab module (``Trainer.fit`` with the
   ``TokenThroughputMonitor`` of every real run, no logger, no checkpoints, no validation);
2. a plain PyTorch loop on the same module: ``module.loss(batch)`` (the output head on the
   labelled positions only), backward, AdamW step, zero_grad;
3. a plain PyTorch loop on transformers' own loss: ``model(input_ids, attention_mask,
   labels=labels).loss`` (logits at every position), the baseline masklab's loss path is judged
   against.

Both loops use the same optimiser (``LanguageModelModule.build_optimizer``: fused AdamW on a GPU),
the same precision (``--precision``; bf16 autocast in the loops, as Lightning's ``bf16-mixed``),
no gradient clipping, and the same batches: ``--batches`` distinct batches of uniformly random
token ids of the shape's vocabulary, collated once by the objective's real masking policy and
served in turn from pinned memory. A step is timed from one step start to the next with the device
synchronised at each start. Tokens/s counts every token of a batch; MFU = model FLOPs per step
(``lightning_modules/flops.py``) / step time / the device's dense peak FLOP/s at the training
precision (``callbacks/peak_flops.py``, or ``--peak-flops``; none on a CPU). Peak memory: the device's peak
allocated memory per side (on a CPU, the process' peak resident memory, one number). FLOPs are
always masklab's model FLOPs (the head at the labelled positions), also for transformers' loss,
which computes more: the three sides compare as useful work per second.

Shapes: ``134m`` and ``500m`` are the MEAP paper's Llama shapes
(``experiments/configs/models/llama_{100m,500m}.yaml``; with the 32,000-token vocabulary used here
122M and 0.5B parameters, the line above the table says), at T = 2048; ``--objective mlm`` builds
a BERT (``--arch``; DeBERTa-v2 with the relative attention of ``models/deberta_v2_amlm.yaml``) of the
same width, depth and heads with a 4x feed-forward (``134m`` is BERT-base: 768 x 12, 12 heads) at
T = 512 and a 30,522-token vocabulary. ``tiny`` (the default without a GPU) is for smoke tests: its
numbers say nothing about a GPU.

Levers (model keys): ``--liger`` (``liger_kernel``), ``--compile-loss`` (``compile_loss``),
``--attn sdpa`` for DeBERTa-v2 (masklab's SDPA disentangled attention), ``--batch-size``; the
Trainer side clips with ``--clip`` and the optimiser is ``--fused true|false``.

``python -m benchmarks.gpu --suite`` runs every row of ``SUITE`` (issue 14's table, then the levers
one against the other) in one process, at most ``--budget`` seconds of rows (480 by default; a row
that does not fit says so), and prints one markdown table with the device, versions and date. On a
CPU, ``--suite --shape tiny`` smoke-tests it (the rows that need CUDA say so).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import re
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import DataLoader, Dataset
from transformers.models.llama import modeling_llama

from benchmarks.common import CpuContention, markdown_table, median_time, quiet
from callbacks import TokenThroughputMonitor
from callbacks.peak_flops import peak_flops
from core.errors import MasklabError
from datamodules import MEAPInputMask, NoMask, RandomMLMMask
from datamodules.collate import MaskingCollator
from datamodules.masking import IGNORE_INDEX, Vocab
from lightning_modules import CausalLMModule, LanguageModelModule, MaskedLMModule, OptimizerConfig

MODELS = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "models"
PAD, BOS, EOS, UNK, MASK = range(5)
TRAINER_TARGET = 0.97
MFU_TARGET = 0.45  # MEAP / NTP at the 134m and 500m shapes, T = 2048, one H100
HF_TARGETS = {"bert": 1.5, "deberta-v2": 2.0}  # masklab MLM / transformers' own MLM, tokens/s
# DeBERTa-v2's relative attention as in experiments/configs/models/deberta_v2_amlm.yaml
DEBERTA_RELATIVE = yaml.safe_load((MODELS / "deberta_v2_amlm.yaml").read_text())["init_args"]["config_overrides"]


@dataclass(frozen=True)
class Shape:
    model: dict  # model keys shared by the decoder and the encoder built from it
    block_size: int  # decoder; the encoder uses min(block_size, 512)
    batch_size: int
    vocab_size: int  # decoder; the encoder uses 30,522 unless tiny


def paper_shape(name: str, batch_size: int) -> Shape:
    args = yaml.safe_load((MODELS / f"llama_{name}.yaml").read_text())["init_args"]
    keys = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_position_embeddings")
    return Shape({k: args[k] for k in keys}, block_size=2048, batch_size=batch_size, vocab_size=32000)


SHAPES = {
    "tiny": lambda: Shape(
        {
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "intermediate_size": 192,
            "max_position_embeddings": 128,
        },
        64,
        4,
        512,
    ),
    "134m": lambda: paper_shape("100m", batch_size=8),
    "500m": lambda: paper_shape("500m", batch_size=4),
}


class PlainAdamW:
    """Mixed into a module: AdamW without a scheduler, so the plain loops can match it."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.build_optimizer()


class CausalBench(PlainAdamW, CausalLMModule):
    pass


class MaskedBench(PlainAdamW, MaskedLMModule):
    pass


class CycledBatches(Dataset):
    """`length` steps serving the precollated batches in turn (use with `batch_size=None`)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index % len(self.batches)]


@dataclass
class Side:
    """One way of training, measured."""

    name: str
    step_seconds: float  # mean over the timed steps
    tokens_per_step: int
    flops_per_step: float
    peak_memory: int | None  # bytes; None on a CPU

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens_per_step / self.step_seconds


def synthetic_vocab(size: int) -> Vocab:
    """Five special tokens, the rest regular: what the masking policies need of a tokenizer."""
    special = torch.zeros(size, dtype=torch.bool)
    special[[PAD, BOS, EOS, UNK, MASK]] = True
    sentence_end = torch.zeros(size, dtype=torch.bool)
    sentence_end[EOS] = True
    return Vocab(size, PAD, BOS, EOS, MASK, special, sentence_end, torch.ones(size, dtype=torch.bool))


def make_samples(vocab: Vocab, batches: int, batch_size: int, block_size: int) -> list[list[tuple[int, torch.Tensor]]]:
    """Per batch, the `(index, block)` samples a DataLoader hands the collate: random regular
    tokens after a BOS."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(MASK + 1, vocab.size, (batches * batch_size, block_size), generator=g)
    ids[:, 0] = BOS
    return [[(i, ids[i]) for i in range(b * batch_size, (b + 1) * batch_size)] for b in range(batches)]


def build(args: argparse.Namespace, shape: Shape) -> tuple[LanguageModelModule, MaskingCollator, int, int]:
    """The module, the objective's collate, and the block and batch size the objective trains on."""
    batch_size = args.batch_size or shape.batch_size
    common = {
        "hidden_size": shape.model["hidden_size"],
        "num_layers": shape.model["num_layers"],
        "num_heads": shape.model["num_heads"],
        "compile": args.compile,
        "attn_implementation": args.attn,
        "optimizer": OptimizerConfig(fused={"auto": None, "true": True, "false": False}[args.fused]),
    }
    torch.manual_seed(0)
    if args.objective == "mlm":
        block_size = args.block_size or min(shape.block_size, 512)
        vocab = synthetic_vocab(shape.vocab_size if args.shape == "tiny" else 30522)
        module = MaskedBench(
            vocab=vocab.as_dict(),
            block_size=block_size,
            arch=args.arch,
            max_position_embeddings=max(block_size, 512),
            config_overrides=DEBERTA_RELATIVE if args.arch == "deberta-v2" else None,
            **common,
        )
        policy = RandomMLMMask()
    else:
        block_size = args.block_size or shape.block_size
        vocab = synthetic_vocab(shape.vocab_size)
        module = CausalBench(
            vocab=vocab.as_dict(),
            block_size=block_size,
            num_kv_heads=shape.model["num_kv_heads"],
            intermediate_size=shape.model["intermediate_size"],
            max_position_embeddings=max(block_size, shape.model["max_position_embeddings"]),
            liger_kernel=args.liger,
            compile_loss=args.compile_loss,
            **common,
        )
        policy = MEAPInputMask() if args.objective == "meap" else NoMask()
    if policy.uses_ratio:
        policy.ratio = policy.default_ratio  # what data.mask_ratio defaults to
    return module, MaskingCollator(policy, vocab, seed=0), block_size, batch_size


def labelled_positions(module: LanguageModelModule, batch: dict[str, torch.Tensor]) -> int:
    """Positions the output head runs on (after the causal shift)."""
    _, labels = module.align(batch["labels"], batch["labels"])
    return int((labels != IGNORE_INDEX).sum())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(L.Callback):
    """`perf_counter()` at every step start and at the end of training, the device synchronised."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.marks = device, []

    def on_train_batch_start(self, *args) -> None:
        synchronize(self.device)
        self.marks.append(time.perf_counter())

    def on_train_end(self, *args) -> None:
        synchronize(self.device)
        self.marks.append(time.perf_counter())


def measure(name: str, marks: list[float], skip: int, flops: list[float], tokens: int, device: torch.device) -> Side:
    """A side from its step marks (steps + 1 of them): the steps after `skip`, averaged."""
    timed = range(skip, len(marks) - 1)
    seconds = (marks[-1] - marks[skip]) / len(timed)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Side(name, seconds, tokens, statistics.mean(flops[i % len(flops)] for i in timed), peak)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def trainer_side(module, batches, flops, args, device) -> Side:
    reset_memory(device)
    clock = StepClock(device)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator=device.type,
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=args.clip,
        callbacks=[clock, TokenThroughputMonitor()],
    )
    loader = DataLoader(CycledBatches(batches, args.steps), batch_size=None, pin_memory=device.type == "cuda")
    trainer.fit(module, train_dataloaders=loader)
    return measure(
        "Lightning Trainer, masklab loss", clock.marks, args.skip, flops, batches[0]["input_ids"].numel(), device
    )


def plain_side(name: str, module, loss_fn, batches, flops, args, device) -> Side:
    """A hand-written loop: to device, `loss_fn(batch)` under autocast, backward, AdamW, zero_grad."""
    reset_memory(device)
    module.to(device).train()
    module.configure_model()
    optimizer = module.build_optimizer()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed" else nullcontext()
    marks = []
    for i in range(args.steps):
        synchronize(device)
        marks.append(time.perf_counter())
        batch = {k: v.to(device, non_blocking=True) for k, v in batches[i % len(batches)].items()}
        with autocast:
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    marks.append(time.perf_counter())
    del optimizer
    return measure(name, marks, args.skip, flops, batches[0]["input_ids"].numel(), device)


def masklab_loss(module: LanguageModelModule):
    """masklab's loss: the output head on the labelled positions only."""
    return lambda batch: module.loss(batch)[0]


def hf_loss(module: LanguageModelModule):
    """transformers' own loss: logits at every position, its cross-entropy (shifted for causal)."""
    return lambda batch: (
        module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    )


def fmt_side(side: Side) -> str:
    memory = f", peak {side.peak_memory / 2**30:.1f} GiB" if side.peak_memory is not None else ""
    tflops = side.flops_per_step / side.step_seconds / 1e12
    return f"{side.tokens_per_sec:,.0f} tok/s ({side.step_seconds * 1e3:.1f} ms/step, {tflops:.3g} TFLOP/s{memory})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="134m" if gpu else "tiny",
        help="model shape (default: 134m on a GPU, tiny otherwise)",
    )
    parser.add_argument("--objective", choices=["ntp", "meap", "mlm"], default="ntp")
    parser.add_argument(
        "--arch", choices=["bert", "roberta", "deberta-v2"], default="bert", help="encoder for --objective mlm"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimiser steps per side (default: 30 on a GPU, 20 with --suite; 4)"
    )
    parser.add_argument(
        "--skip",
        type=int,
        default=None,
        help="first steps of each side not timed (default: 5, or 10 with --compile; 1 on a CPU)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the shape's)")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per sequence (default: 2048; 512 for mlm)")
    parser.add_argument("--batches", type=int, default=4, help="distinct precollated batches served in turn")
    parser.add_argument("--precision", choices=["bf16-mixed", "32-true"], default="bf16-mixed" if gpu else "32-true")
    parser.add_argument(
        "--attn", default=None, help="model.attn_implementation (sdpa, flash_attention_2, ...; default: transformers')"
    )
    parser.add_argument("--compile", action="store_true", help="model.compile: torch.compile the transformer body")
    parser.add_argument("--liger", action="store_true", help="model.liger_kernel: Liger Kernel (decoder; CUDA)")
    parser.add_argument(
        "--compile-loss", action="store_true", help="model.compile_loss: compiled dense head + loss (decoder)"
    )
    parser.add_argument(
        "--fused", choices=["auto", "true", "false"], default="auto", help="model.optimizer.fused (auto: on a GPU)"
    )
    parser.add_argument(
        "--clip", type=float, default=None, help="trainer.gradient_clip_val of the Trainer side (default: none)"
    )
    parser.add_argument(
        "--sides",
        default="plain,trainer,hf",
        help="comma-separated sides to run: plain (masklab loss), trainer, hf (transformers' loss)",
    )
    parser.add_argument(
        "--suite",
        action="store_true",
        help="run every row of issue 14's table and the speed levers (SUITE), one markdown table",
    )
    parser.add_argument("--budget", type=float, default=480, help="--suite: seconds after which no further row starts")
    parser.add_argument("--table-out", help="--suite: a markdown file rewritten with the table after every row")
    parser.add_argument("--rows", help="--suite: only the rows whose name matches this regular expression")
    parser.add_argument(
        "--peak-flops",
        type=float,
        default=None,
        help="the device's peak FLOP/s for MFU (default: callbacks/peak_flops.py; none on a CPU)",
    )
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = (20 if args.suite else 30) if gpu else 4
    args.skip_given = args.skip is not None  # --suite passes it on only when given
    if args.skip is None:
        args.skip = (10 if args.compile else 5) if gpu else 1
    if args.steps < args.skip + 1:
        parser.error("--steps must be at least --skip + 1")
    return args


@dataclass
class Run:
    """One benchmark run: its sides and what the table reports next to them."""

    args: argparse.Namespace
    sides: dict[str, Side]
    collate_seconds: float
    peak_flops: float | None
    description: str

    def mfu(self, side: str = "trainer") -> float | None:
        if side not in self.sides or not self.peak_flops:
            return None
        return self.sides[side].flops_per_step / self.sides[side].step_seconds / self.peak_flops

    def ratio(self, a: str, b: str) -> float | None:
        if a not in self.sides or b not in self.sides:
            return None
        return self.sides[a].tokens_per_sec / self.sides[b].tokens_per_sec

    @property
    def collate_share(self) -> float:
        """Collate time over the step time of the fastest side measured."""
        return self.collate_seconds / min(side.step_seconds for side in self.sides.values())


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def measure_run(args: argparse.Namespace) -> Run:
    """Build the module and batches of `args` and measure the sides it asks for."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module, collate, block_size, batch_size = build(args, SHAPES[args.shape]())
    samples = make_samples(collate.vocab, args.batches, batch_size, block_size)
    batches = [collate(s) for s in samples]
    if device.type == "cuda":
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    flops = [module.flop_counts.training_flops(batch_size, block_size, labelled_positions(module, b)) for b in batches]
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    peak = args.peak_flops or (peak_flops(device_name(device), dtype) if device.type == "cuda" else None)
    params = sum(p.numel() for p in module.parameters())
    model_name = args.arch if args.objective == "mlm" else "llama"
    description = (
        f"{model_name} {args.shape} ({params / 1e6:.1f}M parameters), {args.objective}, "
        f"batch {batch_size} x {block_size}, {args.precision}, attention "
        f"{args.attn or module.model.config._attn_implementation}, compile {args.compile}, "
        f"liger {args.liger}, compile_loss {args.compile_loss}, fused {args.fused}, clip {args.clip}; "
        f"{args.steps} steps per side, first {args.skip} untimed"
    )
    wanted = args.sides.split(",")
    makers = {
        "plain": lambda: plain_side(
            "plain PyTorch loop, masklab loss", module, masklab_loss(module), batches, flops, args, device
        ),
        "trainer": lambda: trainer_side(module, batches, flops, args, device),
        "hf": lambda: plain_side(
            "plain PyTorch loop, transformers' own loss", module, hf_loss(module), batches, flops, args, device
        ),
    }
    sides = {name: make() for name, make in makers.items() if name in wanted}
    collate_seconds = median_time(lambda: collate(samples[0]), repeats=5, warmup=1)
    return Run(args, sides, collate_seconds, peak, description)


def report(run: Run) -> list[tuple[str, str, str]]:
    """The `metric | measured | target` rows of one run."""
    args = run.args
    rows = [(side.name, fmt_side(side), "reported") for side in run.sides.values()]
    if "trainer" in run.sides:
        mfu = run.mfu()
        rows.append(
            (
                "MFU, Lightning Trainer",
                f"{mfu:.1%} of {run.peak_flops / 1e12:.3g} TFLOP/s"
                if mfu is not None
                else "n/a: no peak FLOP/s known for this device (--peak-flops)",
                f">= {MFU_TARGET:.0%} (134m/500m, T=2048, H100)" if args.objective != "mlm" else "reported",
            )
        )
    if (trainer_ratio := run.ratio("trainer", "plain")) is not None:
        rows.append(("throughput Lightning Trainer / plain loop", f"{trainer_ratio:.3f}", f">= {TRAINER_TARGET}"))
    if (hf_ratio := run.ratio("plain", "hf")) is not None:
        hf_target = HF_TARGETS.get(args.arch) if args.objective == "mlm" else None
        rows.append(
            (
                "throughput masklab loss / transformers' own loss (plain loops)",
                f"{hf_ratio:.2f}x",
                f">= {hf_target}x ({args.arch}, GPU)" if hf_target else "reported",
            )
        )
    rows.append(
        (
            "collate share of a step (main process, no workers)",
            f"{run.collate_share:.2%} ({run.collate_seconds * 1e3:.2f} ms)",
            "<= 3%",
        )
    )
    return rows


# issue 14's table, then the levers one against the other: (row, arguments), most wanted first, as
# --budget stops starting rows once it is spent: the rows the issue measured, clipping, Liger at
# 134m, compile, the larger Liger rows, and compile + Liger last (minutes of compiling). Liger's
# RoPE patch is global to the process: `run_suite` undoes it after every row.
_SUITE_ROWS = (
    ("134m NTP, B=16, eager", "--objective ntp --shape 134m --batch-size 16"),
    ("134m MEAP, B=16, eager", "--objective meap --shape 134m --batch-size 16 --sides plain,trainer"),
    ("500m NTP, B=8, eager", "--objective ntp --shape 500m --batch-size 8 --sides plain,trainer"),
    ("BERT-base MLM, 64 x 512", "--objective mlm --arch bert --batch-size 64 --sides plain,hf"),
    ("DeBERTa-v2 MLM, 64 x 512, eager", "--objective mlm --arch deberta-v2 --batch-size 64 --sides plain,hf"),
    (
        "DeBERTa-v2 MLM, 64 x 512, SDPA",
        "--objective mlm --arch deberta-v2 --batch-size 64 --attn sdpa --sides plain,hf",
    ),
    (
        "134m NTP, B=16, clip 1.0, fused AdamW",
        "--objective ntp --shape 134m --batch-size 16 --clip 1.0 --fused true --sides trainer",
    ),
    (
        "134m NTP, B=16, clip 1.0, foreach AdamW",
        "--objective ntp --shape 134m --batch-size 16 --clip 1.0 --fused false --sides trainer",
    ),
    ("134m NTP, B=16, Liger", "--objective ntp --shape 134m --batch-size 16 --liger --sides trainer"),
    ("134m MEAP, B=16, Liger", "--objective meap --shape 134m --batch-size 16 --liger --sides trainer"),
    (
        "134m NTP, B=16, compile + compile_loss",
        "--objective ntp --shape 134m --batch-size 16 --compile --compile-loss --sides trainer",
    ),
    ("134m NTP, B=16, compile", "--objective ntp --shape 134m --batch-size 16 --compile --sides plain,trainer,hf"),
    ("134m NTP, B=32, Liger", "--objective ntp --shape 134m --batch-size 32 --liger --sides trainer"),
    ("500m NTP, B=8, Liger", "--objective ntp --shape 500m --batch-size 8 --liger --sides trainer"),
    ("500m MEAP, B=16, Liger", "--objective meap --shape 500m --batch-size 16 --liger --sides trainer"),
    ("134m NTP, B=64, Liger", "--objective ntp --shape 134m --batch-size 64 --liger --sides trainer"),
    ("134m MEAP, B=32, Liger", "--objective meap --shape 134m --batch-size 32 --liger --sides trainer"),
    ("500m NTP, B=16, Liger", "--objective ntp --shape 500m --batch-size 16 --liger --sides trainer"),
    ("500m MEAP, B=32, Liger", "--objective meap --shape 500m --batch-size 32 --liger --sides trainer"),
    (
        "134m NTP, B=32, compile + Liger",
        "--objective ntp --shape 134m --batch-size 32 --compile --liger --sides trainer",
    ),
    (
        "500m MEAP, B=16, compile + Liger",
        "--objective meap --shape 500m --batch-size 16 --compile --liger --sides trainer",
    ),
)
SUITE: tuple[tuple[str, list[str]], ...] = tuple((name, args.split()) for name, args in _SUITE_ROWS)
SUITE_COLUMNS = (
    "row",
    "Trainer tok/s",
    "MFU",
    "Trainer / plain",
    "masklab / transformers' loss",
    "collate share",
    "peak GiB",
    "s",
)


def suite_row(name: str, run: Run, seconds: float) -> list[str]:
    def fmt(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    trainer = run.sides.get("trainer")
    memory = [side.peak_memory for side in run.sides.values() if side.peak_memory is not None]
    return [
        name,
        fmt(trainer and trainer.tokens_per_sec, ",.0f"),
        fmt(run.mfu(), ".1%"),
        fmt(run.ratio("trainer", "plain"), ".3f"),
        fmt(run.ratio("plain", "hf"), ".2f"),
        f"{run.collate_share:.2%}",
        fmt(max(memory) / 2**30 if memory else None, ".1f"),
        f"{seconds:.1f}",
    ]


def run_suite(args: argparse.Namespace) -> list[list[str]]:
    """Every SUITE row at `args.shape` (the paper shapes on a GPU; `tiny` smoke-tests the suite on
    a CPU, where the rows that need CUDA or a compiler's minutes say so instead of running)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("torch", "transformers", "lightning", "liger-kernel")
        if importlib.util.find_spec(name.replace("-", "_"))
    )
    header = f"{device_name(device)}; {versions}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    print(header)
    plain_rope = modeling_llama.apply_rotary_pos_emb
    common = [f"--steps={args.steps}", f"--precision={args.precision}"]
    if args.skip_given:
        common.append(f"--skip={args.skip}")
    if args.peak_flops:
        common.append(f"--peak-flops={args.peak_flops}")
    start, table = time.perf_counter(), []
    rows = [(name, row_args) for name, row_args in SUITE if not args.rows or re.search(args.rows, name)]
    for name, row_args in rows:
        row = parse_args([*row_args, *common, "--shape", args.shape if args.shape == "tiny" else _shape(row_args)])
        if args.shape == "tiny":
            row.batch_size = None  # the tiny shape's own batch
        why_not = suite_skip(row, device)
        if why_not is None and table and time.perf_counter() - start > args.budget:  # the first row always runs
            why_not = f"skipped: --budget {args.budget:.0f} s spent"
        if why_not is not None:
            table.append([name, why_not, *[""] * (len(SUITE_COLUMNS) - 2)])
            continue
        row_start = time.perf_counter()
        try:
            run = measure_run(row)
        except (RuntimeError, MasklabError) as err:  # e.g. out of memory: the other rows still run
            table.append([name, f"failed: {str(err).splitlines()[0][:200]}", *[""] * (len(SUITE_COLUMNS) - 2)])
            print(f"{name}: failed: {err}", flush=True)
        else:
            table.append(suite_row(name, run, time.perf_counter() - row_start))
            print(f"{name}: {run.description}", flush=True)
            del run
        finally:
            modeling_llama.apply_rotary_pos_emb = plain_rope
        free_memory(device)
        if args.table_out:  # after every row: a suite stopped from outside keeps what it measured
            Path(args.table_out).write_text(f"{header}\n\n{suite_table(table)}\n")
    print()
    print(suite_table(table))
    return table


def suite_table(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(SUITE_COLUMNS) + " |", "|" + " --- |" * len(SUITE_COLUMNS)]
    return "\n".join([*lines, *("| " + " | ".join(cells) + " |" for cells in table)])


def _shape(row_args: list[str]) -> str:
    return row_args[row_args.index("--shape") + 1] if "--shape" in row_args else "134m"


def suite_skip(row: argparse.Namespace, device: torch.device) -> str | None:
    """Why a suite row cannot run here, or None."""
    if row.liger and device.type != "cuda":
        return "n/a: Liger Kernel needs a CUDA GPU"
    if row.liger and importlib.util.find_spec("liger_kernel") is None:
        return 'n/a: liger-kernel is not installed (pip install -e ".[gpu]")'
    if (row.compile or row.compile_loss) and device.type != "cuda":
        return "n/a on a CPU: compiling takes minutes here"
    return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict[str, Side] | list[list[str]]:
    args = parse_args(argv)
    quiet()
    torch.set_flush_denormal(True)
    if args.suite:
        return run_suite(args)
    contention = CpuContention()
    run = measure_run(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, {device_name(device)}; {run.description}")
    rows = report(run)
    if not torch.cuda.is_available():
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        rows.append(("peak resident memory of the process (all sides)", f"{rss:.2f} GiB", "reported"))
        rows.append(contention.report()[1])
    print()
    print(markdown_table(rows))
    return run.sides


if __name__ == "__main__":
    main()
