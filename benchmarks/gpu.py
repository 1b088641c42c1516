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
(``lightning_modules/flops.py``) / step time / the device's peak FLOP/s (Lightning's table of GPUs
at the training precision, or ``--peak-flops``; none on a CPU). Peak memory: the device's peak
allocated memory per side (on a CPU, the process' peak resident memory, one number). FLOPs are
always masklab's model FLOPs (the head at the labelled positions), also for transformers' loss,
which computes more: the three sides compare as useful work per second.

Shapes: ``134m`` and ``500m`` are the MEAP paper's Llama shapes
(``experiments/configs/models/llama_{100m,500m}.yaml``; with the 32,000-token vocabulary used here
122M and 0.5B parameters, the line above the table says), at T = 2048; ``--objective mlm`` builds a BERT (``--arch``) of the same width, depth
and heads with a 4x feed-forward (``134m`` is BERT-base: 768 x 12, 12 heads) at T = 512 and a
30,522-token vocabulary. ``tiny`` (the default without a GPU) is for smoke tests: its numbers say
nothing about a GPU.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.throughput import get_available_flops
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import CpuContention, markdown_table, median_time, quiet
from callbacks import TokenThroughputMonitor
from datamodules import MEAPInputMask, NoMask, RandomMLMMask
from datamodules.collate import MaskingCollator
from datamodules.masking import IGNORE_INDEX, Vocab
from lightning_modules import CausalLMModule, LanguageModelModule, MaskedLMModule

MODELS = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "models"
PAD, BOS, EOS, UNK, MASK = range(5)
TRAINER_TARGET = 0.97
MFU_TARGET = 0.45  # MEAP / NTP at the 134m and 500m shapes, T = 2048, one H100
HF_TARGETS = {"bert": 1.5, "deberta-v2": 2.0}  # masklab MLM / transformers' own MLM, tokens/s


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
    return f"{side.tokens_per_sec:,.0f} tok/s ({side.step_seconds * 1e3:.1f} ms/step, {side.flops_per_step / side.step_seconds / 1e12:.3g} TFLOP/s{memory})"


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
    parser.add_argument("--steps", type=int, default=30 if gpu else 4, help="optimiser steps per side")
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
    parser.add_argument(
        "--peak-flops",
        type=float,
        default=None,
        help="the device's peak FLOP/s for MFU (default: Lightning's table of GPUs; none on a CPU)",
    )
    args = parser.parse_args(argv)
    if args.skip is None:
        args.skip = (10 if args.compile else 5) if gpu else 1
    if args.steps < args.skip + 1:
        parser.error("--steps must be at least --skip + 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Side]:
    args = parse_args(argv)
    quiet()
    torch.set_flush_denormal(True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module, collate, block_size, batch_size = build(args, SHAPES[args.shape]())
    samples = make_samples(collate.vocab, args.batches, batch_size, block_size)
    batches = [collate(s) for s in samples]
    if device.type == "cuda":
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    flops = [module.flop_counts.training_flops(batch_size, block_size, labelled_positions(module, b)) for b in batches]
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    peak_flops = args.peak_flops or (get_available_flops(device, dtype) if device.type == "cuda" else None)
    params = sum(p.numel() for p in module.parameters())
    model_name = args.arch if args.objective == "mlm" else "llama"
    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; "
        f"{model_name} {args.shape} ({params / 1e6:.1f}M parameters), {args.objective}, batch {batch_size} x {block_size}, "
        f"{args.precision}, attention {module.model.config._attn_implementation}, compile {args.compile}; "
        f"{args.steps} steps per side, first {args.skip} untimed"
    )

    contention = CpuContention()
    sides = {
        "plain": plain_side(
            "plain PyTorch loop, masklab loss", module, masklab_loss(module), batches, flops, args, device
        ),
        "trainer": trainer_side(module, batches, flops, args, device),
        "hf": plain_side(
            "plain PyTorch loop, transformers' own loss", module, hf_loss(module), batches, flops, args, device
        ),
    }
    collate_seconds = median_time(lambda: collate(samples[0]), repeats=5, warmup=1)

    trainer_ratio = sides["trainer"].tokens_per_sec / sides["plain"].tokens_per_sec
    hf_ratio = sides["plain"].tokens_per_sec / sides["hf"].tokens_per_sec
    hf_target = HF_TARGETS.get(args.arch) if args.objective == "mlm" else None
    trainer = sides["trainer"]
    rows = [(side.name, fmt_side(side), "reported") for side in sides.values()]
    rows += [
        (
            "MFU, Lightning Trainer",
            f"{trainer.flops_per_step / trainer.step_seconds / peak_flops:.1%} of {peak_flops / 1e12:.3g} TFLOP/s"
            if peak_flops
            else "n/a: no peak FLOP/s known for this device (--peak-flops)",
            f">= {MFU_TARGET:.0%} (134m/500m, T=2048, H100)" if args.objective != "mlm" else "reported",
        ),
        ("throughput Lightning Trainer / plain loop", f"{trainer_ratio:.3f}", f">= {TRAINER_TARGET}"),
        (
            "throughput masklab loss / transformers' own loss (plain loops)",
            f"{hf_ratio:.2f}x",
            f">= {hf_target}x ({args.arch}, GPU)" if hf_target else "reported",
        ),
        (
            "collate share of a step (main process, no workers)",
            f"{collate_seconds / sides['plain'].step_seconds:.2%} ({collate_seconds * 1e3:.2f} ms)",
            "<= 3%",
        ),
    ]
    if device.type == "cpu":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        rows.append(("peak resident memory of the process (all sides)", f"{rss:.2f} GiB", "reported"))
        rows.append(contention.report()[1])
    print()
    print(markdown_table(rows))
    return sides


if __name__ == "__main__":
    main()
