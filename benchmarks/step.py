"""Training-step overheads: MEAP against NTP, and the Lightning Trainer against a plain loop.

``python -m benchmarks.step [--repeats 100] [--rounds 16] [--steps 12] [--overhead-rounds 12] ...``

Measured, in one run, on the model of ``experiments/configs/quickstart.yaml`` (read from the file)
and the built-in corpus at the quickstart batch size:

1. MEAP vs NTP step time: one ``CausalLMModule``; batches of the same blocks collated with
   ``MEAPInputMask`` (ratio 0.15) and with ``NoMask``; a full optimiser step each (forward and
   loss via ``module.loss(batch)``, backward, AdamW step, zero_grad). Each repeat runs a MEAP
   step, an NTP step and (A/A control) a second NTP step on other blocks, in rotating order, so
   drift hits all alike. Reported: median MEAP step / median NTP step; the control's ratio to
   NTP shows how far noise alone moves such a ratio. MEAP only rewrites input ids, so the ratio
   should be 1. Target: <= 1.02.
2. Lightning Trainer vs plain PyTorch loop: the same module (a subclass whose
   ``configure_optimizers`` returns the AdamW of ``LanguageModelModule`` without the scheduler,
   so both sides run the same optimiser) and one precomputed MEAP batch, served repeatedly by
   the same kind of DataLoader. The Trainer side is
   ``Trainer(max_steps=N, logger=False, enable_checkpointing=False, enable_progress_bar=False,
   enable_model_summary=False, accelerator="cpu", limit_val_batches=0).fit`` calling the module's
   ``training_step`` (which also ``self.log``s loss and accuracy); the plain side is a hand loop
   over the DataLoader: ``module.loss(batch)`` (training_step without the logging, which needs a
   Trainer), backward, AdamW step, zero_grad. A step is the interval between the starts of two
   consecutive steps (so the data fetch and every hook count), the first ``--skip`` steps of each
   run left out; the two sides alternate for ``--rounds`` short runs each (after one untimed
   warm-up round) and all their intervals are pooled. Reported: throughput ratio Trainer / plain
   = median plain step / median Trainer step. Target: >= 0.97.
3. The same comparison on a tiny model of the quickstart's depth (hidden 16, batch 2 x 16), where
   the step is a few milliseconds and Lightning's fixed per-step cost (hooks, ``self.log``,
   output handling) stands out of the noise: overhead = median Trainer step - median plain step,
   and the Trainer / plain ratio it implies at quickstart size = plain / (plain + overhead).
   On a 2-core machine (2) moves by several percent between runs; (3) is the steadier estimate.

No gradient clipping on either side (quickstart.yaml clips at 1.0; that cost is the same for any
loop); denormals flushed to zero, as ``experiments/run.py`` does. Times are wall-clock
(``time.perf_counter``); torch threads at their default. The run also
reports how much CPU other processes used meanwhile: on a 2-core machine a busy neighbour moves
step times by far more than the targets' margins, and the ratios then mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import (
    CpuContention,
    markdown_table,
    quickstart_data_args,
    quickstart_model,
    quickstart_model_args,
    quiet,
    samples,
    step_timer,
    tiny_datamodule,
    verdict,
)
from datamodules import MEAPInputMask, NoMask, PretrainingDataModule
from datamodules.collate import MaskingCollator
from lightning_modules import CausalLMModule

MEAP_TARGET = 1.02
TRAINER_TARGET = 0.97


class PlainAdamWModule(CausalLMModule):
    """The quickstart module with a plain AdamW (no scheduler), so a hand loop can match it."""

    def configure_optimizers(self):
        return self.build_optimizer()


class RepeatedBatch(Dataset):
    """Serves the same precomputed batch `length` times (use with `batch_size=None`)."""

    def __init__(self, batch: dict[str, torch.Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batch


class StepStarts(L.Callback):
    """Records `perf_counter()` at the start of every training batch."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())


def intervals(starts: list[float], skip: int) -> list[float]:
    """Intervals between consecutive step starts (one step plus one data fetch and the hooks
    around it each), the first `skip` steps excluded."""
    return [b - a for a, b in zip(starts[skip:], starts[skip + 1 :])]


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(num) / statistics.median(den)


def halves(num: list[float], den: list[float]) -> tuple[float, float]:
    """The ratio on the first and on the second half of the repeats: how far noise moves it."""
    h = len(num) // 2
    return median_ratio(num[:h], den[:h]), median_ratio(num[h:], den[h:])


def meap_vs_ntp(model: CausalLMModule, dm: PretrainingDataModule, batch_size: int, args: argparse.Namespace) -> dict:
    meap, ntp = MEAPInputMask(), NoMask()
    meap.ratio = 0.15
    collates = {"meap": MaskingCollator(meap, dm.vocab, seed=0), "ntp": MaskingCollator(ntp, dm.vocab, seed=0)}
    blocks = [samples(dm, batch_size, b) for b in range(args.batches)]
    batches = {name: [collate(s) for s in blocks] for name, collate in collates.items()}
    optimizer = model.build_optimizer()
    model.train()

    step = step_timer(model, optimizer)

    # Each repeat runs MEAP, NTP and a second NTP step on another batch (an A/A control: its
    # ratio to NTP shows how far noise alone moves a ratio), in rotating order.
    names = ["meap", "ntp", "control"] if args.control else ["meap", "ntp"]
    times = {name: [] for name in names}
    for i in range(args.warmup + args.repeats):
        k = i % len(names)
        pair = {}
        for name in names[k:] + names[:k]:
            source = "ntp" if name == "control" else name
            offset = args.batches // 2 if name == "control" else 0
            pair[name] = step(batches[source][(i + offset) % args.batches])
        if i >= args.warmup:
            for name, t in pair.items():
                times[name].append(t)
    return {
        "meap": statistics.median(times["meap"]),
        "ntp": statistics.median(times["ntp"]),
        "ratio": median_ratio(times["meap"], times["ntp"]),
        "halves": halves(times["meap"], times["ntp"]),
        "control": median_ratio(times["control"], times["ntp"]) if args.control else None,
        "masked": statistics.mean(b["masked"].float().mean().item() for b in batches["meap"]),
    }


def trainer_vs_plain(model: PlainAdamWModule, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    steps = args.steps

    def loader() -> DataLoader:
        return DataLoader(RepeatedBatch(batch, 2 * steps), batch_size=None)

    def trainer_run() -> list[float]:
        timer = StepStarts()
        trainer = L.Trainer(
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            limit_val_batches=0,
            callbacks=[timer],
        )
        trainer.fit(model, train_dataloaders=loader())
        assert len(timer.starts) == steps, f"expected {steps} steps, timed {len(timer.starts)}"
        return intervals(timer.starts, args.skip)

    def plain_run() -> list[float]:
        model.train()
        optimizer = model.build_optimizer()
        starts = []
        for i, b in enumerate(loader()):
            if i == steps:
                break
            starts.append(time.perf_counter())
            loss, _, _ = model.loss(b)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return intervals(starts, args.skip)

    times = {"trainer": [], "plain": []}
    runs = [("trainer", trainer_run), ("plain", plain_run)]
    for r in range(1 + args.rounds):  # round 0 warms both up and is not counted
        for name, run in runs[:: 1 if r % 2 == 0 else -1]:  # alternate who goes first
            result = run()
            if r > 0:
                times[name].extend(result)
    return {
        "trainer": statistics.median(times["trainer"]),
        "plain": statistics.median(times["plain"]),
        "ratio": median_ratio(times["plain"], times["trainer"]),
        "halves": halves(times["plain"], times["trainer"]),
        "timed": len(times["plain"]),
    }


def fixed_overhead(dm: PretrainingDataModule, batch: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    """Lightning's per-step cost on its own: the Trainer / plain comparison on a model of the
    quickstart's depth and parameter tensors but almost no arithmetic, where a millisecond of
    overhead stands out of the noise that hides it beside a 100 ms step."""
    torch.manual_seed(0)
    tiny = PlainAdamWModule(
        vocab=dm.model_vocab,
        block_size=dm.block_size,
        **dict(quickstart_model_args(), hidden_size=16, intermediate_size=16),
    )
    tiny_batch = {name: t[:2, :16] for name, t in batch.items()}
    settings = argparse.Namespace(steps=args.overhead_steps, skip=5, rounds=args.overhead_rounds)
    result = trainer_vs_plain(tiny, tiny_batch, settings)
    return {**result, "overhead": max(result["trainer"] - result["plain"], 0.0)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch-size", type=int, default=None, help="sequences per batch (default: quickstart.yaml's data.batch_size)"
    )
    parser.add_argument("--block-size", type=int, default=None, help="tokens per sequence (default: quickstart.yaml's)")
    parser.add_argument("--batches", type=int, default=8, help="distinct batches cycled in the MEAP/NTP comparison")
    parser.add_argument("--repeats", type=int, default=100, help="timed MEAP/NTP(/control) step groups")
    parser.add_argument("--warmup", type=int, default=5, help="untimed MEAP/NTP(/control) step groups")
    parser.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the A/A control (a second NTP step per repeat) of the MEAP/NTP comparison",
    )
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per Trainer / plain run")
    parser.add_argument("--skip", type=int, default=2, help="first steps of each run left out of its timing")
    parser.add_argument("--rounds", type=int, default=16, help="timed alternating Trainer / plain runs per side")
    parser.add_argument(
        "--overhead-steps", type=int, default=30, help="steps per run of the fixed-overhead measurement (tiny model)"
    )
    parser.add_argument(
        "--overhead-rounds",
        type=int,
        default=12,
        help="timed alternating runs per side of the fixed-overhead measurement",
    )
    parser.add_argument("--documents", type=int, default=300, help="documents of the built-in corpus")
    parser.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default: quickstart.yaml's)")
    args = parser.parse_args(argv)
    if args.steps < args.skip + 2:
        parser.error("--steps must be at least --skip + 2")
    if args.overhead_steps < 7:
        parser.error("--overhead-steps must be at least 7")
    return args


def main() -> None:
    args = parse_args()
    quiet()
    torch.set_flush_denormal(True)  # as experiments/run.py does: AdamW states go denormal on CPU
    contention = CpuContention()
    data = quickstart_data_args()
    batch_size = args.batch_size or data["batch_size"]
    block_size = args.block_size or data["block_size"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; quickstart model, batch {batch_size} x "
        f"{block_size}"
    )
    with tiny_datamodule(
        MEAPInputMask(),
        builtin_documents=args.documents,
        vocab_size=args.vocab_size or data["vocab_size"],
        block_size=block_size,
        batch_size=batch_size,
    ) as dm:
        model = quickstart_model(dm, PlainAdamWModule)
        meap = meap_vs_ntp(model, dm, batch_size, args)
        print(f"\nMEAP vs NTP optimiser step, medians of {args.repeats} interleaved repeats:")
        print(
            f"  MEAP {meap['meap'] * 1e3:.1f} ms (masked share {meap['masked']:.3f})   NTP {meap['ntp'] * 1e3:.1f} ms"
        )
        print(
            f"  ratio MEAP / NTP: {meap['ratio']:.3f}  (target <= {MEAP_TARGET}: "
            f"{verdict(meap['ratio'] <= MEAP_TARGET)})"
        )
        noise = f"halves {meap['halves'][0]:.3f} / {meap['halves'][1]:.3f}"
        if meap["control"] is not None:
            noise += f"; A/A control NTP / NTP {meap['control']:.3f}"
        print(f"  noise: {noise}")

        batch = MaskingCollator(dm.policy, dm.vocab, seed=0)(samples(dm, batch_size))
        loop = trainer_vs_plain(model, batch, args)
        print(
            f"\nLightning Trainer vs plain loop, {args.rounds} alternating rounds of {args.steps} steps, "
            f"medians of {loop['timed']} step intervals per side:"
        )
        print(f"  Trainer {loop['trainer'] * 1e3:.1f} ms/step   plain {loop['plain'] * 1e3:.1f} ms/step")
        print(
            f"  throughput ratio Trainer / plain: {loop['ratio']:.3f}  "
            f"(target >= {TRAINER_TARGET}: {verdict(loop['ratio'] >= TRAINER_TARGET)})"
        )
        print(f"  noise: halves {loop['halves'][0]:.3f} / {loop['halves'][1]:.3f}")

        fixed = fixed_overhead(dm, batch, args)
        implied = loop["plain"] / (loop["plain"] + fixed["overhead"])
        print(
            f"\nLightning's fixed per-step cost, same comparison on a tiny model of the same depth "
            f"(hidden 16, batch 2 x 16): Trainer {fixed['trainer'] * 1e3:.2f} ms/step, plain "
            f"{fixed['plain'] * 1e3:.2f} ms/step"
        )
        print(
            f"  overhead {fixed['overhead'] * 1e3:.2f} ms/step; implied Trainer / plain at quickstart size: "
            f"{implied:.3f}  "
            f"(target >= {TRAINER_TARGET}: {verdict(implied >= TRAINER_TARGET)})"
        )

    contention_line, contention_row = contention.report()
    print(f"\n{contention_line}\n")
    print(
        markdown_table(
            [
                (
                    f"step time MEAP / NTP (quickstart model, batch {batch_size}x{block_size})",
                    f"{meap['ratio']:.3f} ({meap['meap'] * 1e3:.0f} vs {meap['ntp'] * 1e3:.0f} ms)",
                    f"<= {MEAP_TARGET}",
                ),
                (
                    "throughput Lightning Trainer / plain PyTorch loop",
                    f"{loop['ratio']:.3f} ({loop['trainer'] * 1e3:.0f} vs {loop['plain'] * 1e3:.0f} ms/step)",
                    f">= {TRAINER_TARGET}",
                ),
                (
                    "same, from Lightning's fixed per-step overhead (tiny model)",
                    f"{implied:.3f} ({fixed['overhead'] * 1e3:.1f} ms per {loop['plain'] * 1e3:.0f} ms step)",
                    f">= {TRAINER_TARGET}",
                ),
                contention_row,
            ]
        )
    )


if __name__ == "__main__":
    main()
