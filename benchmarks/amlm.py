"""AMLM overhead: what adaptive masking adds to random MLM.

Measured in one run on the same model and data (``python -m benchmarks.amlm``):

* statistic gathering (`AdaptiveMaskingCallback.accumulate`) as a share of a training step — target ≤ 2%;
* one weight update over a 32k vocabulary (after the all-reduce) — target ≤ 50 ms on CPU;
* AMLM step time / random-MLM step time, collate + step + statistics — target ≤ 1.03.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import markdown_table, median_time, quiet, samples, tiny_datamodule, verdict
from callbacks.adaptive_masking import AdaptiveMaskingCallback, difficulty_targets, update_weights
from datamodules import AdaptiveMLMMask, RandomMLMMask
from datamodules.collate import MaskingCollator
from lightning_modules import MaskedLMModule, OptimizerConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--update-vocab", type=int, default=32_000)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    torch.set_flush_denormal(True)
    adaptive = AdaptiveMLMMask()
    with tiny_datamodule(masking=adaptive, block_size=args.block_size, batch_size=args.batch_size) as dm:
        random = RandomMLMMask()
        random.ratio = adaptive.ratio
        collates = {"amlm": MaskingCollator(adaptive, dm.vocab, 0), "random": MaskingCollator(random, dm.vocab, 0)}
        torch.manual_seed(0)
        module = MaskedLMModule(vocab=dm.model_vocab, block_size=args.block_size, hidden_size=args.hidden_size,
                                num_layers=2, num_heads=4, optimizer=OptimizerConfig())
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
        callback = AdaptiveMaskingCallback()
        callback._reset(dm.vocab.size, torch.device("cpu"))
        batch_samples = samples(dm, args.batch_size)
        last_stats = {}

        def train_step(batch) -> None:
            loss, stats = module.step(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            last_stats["stats"] = stats

        def full_step(kind: str) -> None:
            train_step(collates[kind](batch_samples))
            if kind == "amlm":
                callback.accumulate(last_stats["stats"], dm.vocab.mask_id)

        batch = collates["amlm"](batch_samples)
        step_time = median_time(lambda: train_step(batch), args.repeats, warmup=3)
        gather_time = median_time(lambda: callback.accumulate(last_stats["stats"], dm.vocab.mask_id), args.repeats * 10, warmup=3)

        times = {"amlm": [], "random": []}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for kind in times:
                times[kind].append(median_time(lambda k=kind: full_step(k), 1, warmup=0))
        step_ratio = torch.tensor(times["amlm"]).median().item() / torch.tensor(times["random"]).median().item()

    vocab = args.update_vocab
    g = torch.Generator().manual_seed(0)
    counters = {
        "seen": torch.randint(0, 50, (vocab,), generator=g), "correct": torch.randint(0, 50, (vocab,), generator=g),
        "masked_loss": torch.rand(vocab, generator=g) * 100, "masked_seen": torch.randint(0, 50, (vocab,), generator=g),
    }
    weights = torch.full((vocab,), 0.15)
    update_time = median_time(
        lambda: update_weights(weights, difficulty_targets(counters, "accuracy", 0.15), 0.15, 0.2, 0.005), args.repeats, warmup=2
    )

    share = gather_time / step_time
    rows = [
        ("statistics gathering / training step", f"{share:.2%}", f"≤ 2% ({verdict(share <= 0.02)})"),
        (f"one weight update, V={vocab:,}", f"{update_time * 1e3:.1f} ms", f"≤ 50 ms ({verdict(update_time <= 0.05)})"),
        ("AMLM step / random-MLM step", f"{step_ratio:.3f}", f"≤ 1.03 ({verdict(step_ratio <= 1.03)})"),
    ]
    print(f"training step {step_time * 1e3:.1f} ms, statistics {gather_time * 1e3:.2f} ms (batch {args.batch_size}x{args.block_size})")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
