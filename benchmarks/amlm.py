"""Overhead of difficulty- and entropy-driven masking over random MLM.

Measured in one run on the same model and data (``python -m benchmarks.amlm``):

* statistic gathering (`AdaptiveMaskingCallback.accumulate`) as a share of a training step — target ≤ 2%;
* one weight update over a 32k vocabulary (after the all-reduce) — target ≤ 50 ms on CPU;
* AMLM (and per-type entropy) step time / random-MLM step time, collate + step + statistics —
  target ≤ 1.03 (entropy per type: ≤ 1.03 too, it adds one softmax pass over the logits);
* per-position entropy masking (one extra no-grad forward) and distillation (a teacher forward)
  step time / random-MLM step time — reported, no target.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import markdown_table, median_time, quiet, samples, tiny_datamodule, verdict
from callbacks.adaptive_masking import AdaptiveMaskingCallback, difficulty_targets, update_weights
from callbacks.entropy_masking import choose_by_entropy
from datamodules import AdaptiveMLMMask, RandomMLMMask
from datamodules.collate import MaskingCollator
from datamodules.masking import TokenBlock, corrupt_mlm
from lightning_modules import MaskedLMModule, OptimizerConfig
from lightning_modules.base import predictive_entropy


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
        module = MaskedLMModule(
            vocab=dm.model_vocab,
            block_size=args.block_size,
            hidden_size=args.hidden_size,
            num_layers=2,
            num_heads=4,
            optimizer=OptimizerConfig(),
        )
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

        teacher_dir = Path(tempfile.mkdtemp(prefix="masklab-teacher-"))
        module.model.save_pretrained(teacher_dir)
        student = MaskedLMModule(
            vocab=dm.model_vocab,
            block_size=args.block_size,
            hidden_size=args.hidden_size,
            num_layers=2,
            num_heads=4,
            distill_from=str(teacher_dir),
        )
        student.train()
        student_optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        vocab = dm.vocab
        generator = torch.Generator().manual_seed(0)

        def entropy_position_batch() -> dict:
            batch = collates["random"](batch_samples)
            module.eval()
            with torch.no_grad():
                entropy = predictive_entropy(module(batch["input_ids"], batch["attention_mask"]))
            module.train()
            block = TokenBlock.from_ids(batch["input_ids"], vocab)
            chosen = choose_by_entropy(entropy, ~block.special, 0.15, "high", "topk", 1.0, generator)
            return corrupt_mlm(block, chosen, generator)

        def kd_step() -> None:
            loss, _ = student.step(collates["random"](batch_samples))
            student_optimizer.zero_grad()
            loss.backward()
            student_optimizer.step()

        def full_step(kind: str) -> None:
            if kind == "kd":
                return kd_step()
            if kind == "entropy_position":
                return train_step(entropy_position_batch())
            module.collect_entropy = kind == "entropy_type"
            collate = collates["amlm" if kind in ("amlm", "entropy_type") else "random"]
            train_step(collate(batch_samples))
            if kind != "random":
                callback.accumulate(last_stats["stats"], dm.vocab.mask_id)

        batch = collates["amlm"](batch_samples)
        step_time = median_time(lambda: train_step(batch), args.repeats, warmup=3)
        gather_time = median_time(
            lambda: callback.accumulate(last_stats["stats"], dm.vocab.mask_id), args.repeats * 10, warmup=3
        )

        times = {kind: [] for kind in ("random", "amlm", "entropy_type", "entropy_position", "kd")}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for kind in times:
                times[kind].append(median_time(lambda k=kind: full_step(k), 1, warmup=0))
        medians = {kind: torch.tensor(t).median().item() for kind, t in times.items()}
        ratios = {kind: medians[kind] / medians["random"] for kind in medians}
        step_ratio = ratios["amlm"]

    vocab = args.update_vocab
    g = torch.Generator().manual_seed(0)
    counters = {
        "seen": torch.randint(0, 50, (vocab,), generator=g),
        "correct": torch.randint(0, 50, (vocab,), generator=g),
        "masked_loss": torch.rand(vocab, generator=g) * 100,
        "masked_seen": torch.randint(0, 50, (vocab,), generator=g),
    }
    weights = torch.full((vocab,), 0.15)
    update_time = median_time(
        lambda: update_weights(weights, difficulty_targets(counters, "accuracy", 0.15), 0.15, 0.2, 0.005),
        args.repeats,
        warmup=2,
    )

    share = gather_time / step_time
    rows = [
        ("statistics gathering / training step", f"{share:.2%}", f"≤ 2% ({verdict(share <= 0.02)})"),
        (f"one weight update, V={vocab:,}", f"{update_time * 1e3:.1f} ms", f"≤ 50 ms ({verdict(update_time <= 0.05)})"),
        ("AMLM step / random-MLM step", f"{step_ratio:.3f}", f"≤ 1.03 ({verdict(step_ratio <= 1.03)})"),
        (
            "entropy per type step / random-MLM step",
            f"{ratios['entropy_type']:.3f}",
            f"≤ 1.03 ({verdict(ratios['entropy_type'] <= 1.03)})",
        ),
        (
            "entropy per position step / random-MLM step",
            f"{ratios['entropy_position']:.3f}",
            "reported (one extra forward)",
        ),
        ("distillation step / random-MLM step", f"{ratios['kd']:.3f}", "reported (one teacher forward)"),
    ]
    print(
        f"training step {step_time * 1e3:.1f} ms, statistics {gather_time * 1e3:.2f} ms (batch "
        f"{args.batch_size}x{args.block_size})"
    )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
