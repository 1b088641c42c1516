"""Masking overhead: how fast the collate masks, and what share of a training step it costs.

``python -m benchmarks.masking [--batch-size 32] [--repeats 30] ...``

Measured, in one run, on the built-in corpus tokenised and packed as training does it:

1. Collate throughput (tokens/s) of masklab's ``MaskingCollator`` + ``RandomMLMMask`` (ratio 0.15,
   80/10/10) against transformers' ``DataCollatorForLanguageModeling(tokenizer,
   mlm_probability=0.15)`` on the same token ids, the same tokenizer and the same batches
   (``--batch-size`` x ``--block-size``). Each side gets what its API expects: ours a list of
   ``(index, LongTensor[L])`` samples, transformers' a list of ``{"input_ids": LongTensor[L]}``.
   The two are timed alternately, one pass over ``--batches`` distinct batches per repeat;
   the median pass gives tokens/s. Target: ours >= 10x faster.
2. Collate share of a quickstart training step: the model of ``experiments/configs/quickstart.yaml``
   with the MEAP policy (``MEAPInputMask``, ratio 0.15) at the quickstart batch size; one collate
   call and one optimiser step (forward + backward + AdamW step + zero_grad, via the module's
   ``loss(batch)``) are timed alternately, as in a training loop with ``num_workers=0``;
   reported is median(collate) / (median(collate) + median(step)). Target: <= 3%.

Times are wall-clock (``time.perf_counter``) medians after warm-up; torch threads at their default;
denormals flushed to zero, as ``experiments/run.py`` does.
The run also reports how much CPU other processes used meanwhile (ratios are unreliable if not ~0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DataCollatorForLanguageModeling

from benchmarks.common import (
    CpuContention,
    markdown_table,
    quickstart_data_args,
    quickstart_model,
    quiet,
    samples,
    tiny_datamodule,
    verdict,
)
from datamodules import MEAPInputMask, PretrainingDataModule, RandomMLMMask
from datamodules.collate import MaskingCollator

SPEEDUP_TARGET = 10.0
SHARE_TARGET = 0.03


def collate_throughput(dm: PretrainingDataModule, args: argparse.Namespace) -> dict[str, float]:
    """Tokens/s of our collate and of transformers', timed alternately on the same batches."""
    policy = RandomMLMMask()
    policy.ratio = 0.15
    ours = MaskingCollator(policy, dm.vocab, seed=0)
    theirs = DataCollatorForLanguageModeling(dm.tokenizer, mlm_probability=0.15, seed=0)
    our_batches = [samples(dm, args.batch_size, b) for b in range(args.batches)]
    their_batches = [[{"input_ids": block} for _, block in batch] for batch in our_batches]
    tokens = args.batches * args.batch_size * dm.block_size

    def one_pass(collate, batches) -> float:
        start = time.perf_counter()
        for batch in batches:
            collate(batch)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        one_pass(ours, our_batches)
        one_pass(theirs, their_batches)
    our_times, their_times = [], []
    for repeat in range(args.repeats):
        # alternate which side goes first, so slow drift (thermal, other load) hits both alike
        sides = [(ours, our_batches, our_times), (theirs, their_batches, their_times)]
        for collate, batches, times in sides[:: 1 if repeat % 2 == 0 else -1]:
            times.append(one_pass(collate, batches))

    # sanity: both mask about 15% of the tokens (HF puts labels on its masked positions only)
    our_batch, their_batch = ours(our_batches[0]), theirs(their_batches[0])
    return {
        "ours": tokens / statistics.median(our_times),
        "theirs": tokens / statistics.median(their_times),
        "our_masked": our_batch["masked"].float().mean().item(),
        "their_masked": (their_batch["labels"] != -100).float().mean().item(),
    }


def collate_share(dm: PretrainingDataModule, args: argparse.Namespace) -> dict[str, float]:
    """Median collate time and median optimiser-step time of the quickstart MEAP set-up."""
    policy = MEAPInputMask()
    policy.ratio = 0.15
    collate = MaskingCollator(policy, dm.vocab, seed=0)
    batch_size = args.step_batch_size or quickstart_data_args()["batch_size"]
    batches = [samples(dm, batch_size, b) for b in range(args.batches)]
    model = quickstart_model(dm)
    model.train()
    optimizer = model.build_optimizer()

    def step(batch) -> None:
        loss, _, _ = model.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    collate_times, step_times = [], []
    for i in range(args.step_warmup + args.step_repeats):
        start = time.perf_counter()
        batch = collate(batches[i % len(batches)])
        middle = time.perf_counter()
        step(batch)
        end = time.perf_counter()
        if i >= args.step_warmup:
            collate_times.append(middle - start)
            step_times.append(end - middle)
    collate_time, step_time = statistics.median(collate_times), statistics.median(step_times)
    return {
        "batch_size": batch_size,
        "collate": collate_time,
        "step": step_time,
        "share": collate_time / (collate_time + step_time),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.masking", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch in the throughput comparison")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batches", type=int, default=16, help="distinct batches per timed pass")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes per collate")
    parser.add_argument("--warmup", type=int, default=3, help="untimed passes per collate")
    parser.add_argument(
        "--step-batch-size",
        type=int,
        default=None,
        help="batch size of the step-share measurement (default: quickstart.yaml's data.batch_size)",
    )
    parser.add_argument("--step-repeats", type=int, default=30, help="timed collate + step pairs")
    parser.add_argument("--step-warmup", type=int, default=5, help="untimed collate + step pairs")
    parser.add_argument("--documents", type=int, default=300, help="documents of the built-in corpus")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    quiet()
    torch.set_flush_denormal(True)  # as experiments/run.py does: AdamW states go denormal on CPU
    contention = CpuContention()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tiny_datamodule(
        builtin_documents=args.documents,
        vocab_size=args.vocab_size,
        block_size=args.block_size,
        batch_size=args.batch_size,
    ) as dm:
        print(f"data: {len(dm.train_blocks)} blocks of {dm.block_size} tokens, vocabulary {dm.vocab.size}")
        speed = collate_throughput(dm, args)
        ratio = speed["ours"] / speed["theirs"]
        print(
            f"\ncollate throughput, {args.batch_size} x {dm.block_size} tokens per batch, "
            f"median of {args.repeats} passes:"
        )
        print(
            f"  masklab MaskingCollator + RandomMLMMask:       {speed['ours']:>11,.0f} tokens/s "
            f"(masked share {speed['our_masked']:.3f})"
        )
        print(
            f"  transformers DataCollatorForLanguageModeling: {speed['theirs']:>11,.0f} tokens/s "
            f"(masked share {speed['their_masked']:.3f})"
        )
        print(
            f"  speed-up ours / transformers: {ratio:.1f}x  "
            f"(target >= {SPEEDUP_TARGET:.0f}x: {verdict(ratio >= SPEEDUP_TARGET)})"
        )

        share = collate_share(dm, args)
        print(
            f"\ncollate share of a quickstart MEAP step, batch {share['batch_size']} x {dm.block_size}, "
            f"median of {args.step_repeats}:"
        )
        print(
            f"  collate: {share['collate'] * 1e3:.3f} ms   "
            f"step (fwd + bwd + AdamW + zero_grad): {share['step'] * 1e3:.1f} ms"
        )
        print(
            f"  share collate / (collate + step): {share['share']:.3%}  "
            f"(target <= {SHARE_TARGET:.0%}: {verdict(share['share'] <= SHARE_TARGET)})"
        )

    contention_line, contention_row = contention.report()
    print(f"\n{contention_line}\n")
    print(
        markdown_table(
            [
                (
                    f"collate tokens/s, masklab / transformers (MLM 0.15, {args.batch_size}x{args.block_size})",
                    f"{ratio:.1f}x ({speed['ours'] / 1e6:.1f}M vs {speed['theirs'] / 1e6:.2f}M tok/s)",
                    f">= {SPEEDUP_TARGET:.0f}x",
                ),
                (
                    f"collate share of a quickstart MEAP step (batch {share['batch_size']}x{args.block_size})",
                    f"{share['share']:.2%} ({share['collate'] * 1e3:.2f} ms of "
                    f"{(share['collate'] + share['step']) * 1e3:.0f} ms)",
                    f"<= {SHARE_TARGET:.0%}",
                ),
                contention_row,
            ]
        )
    )


if __name__ == "__main__":
    main()
