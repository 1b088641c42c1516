"""MEAP fine-tuning vs plain SFT: what the masked copy costs, at the same *original* tokens.

``python -m benchmarks.sft [--samples 32] [--batch-size 8] [--repeats 4]``

The same built-in QA samples (the `FineTuneDataModule` defaults: block 1024, answers on both
sides of 50 tokens) are collated by three policies — `PlainSFT`, `MEAPSFT` with the
paper's `layout: concat` and with the code's `layout: separate_rows` — and each batch gets a full
optimiser step (forward and loss via ``module.loss``, backward, AdamW step, zero_grad) on the
quickstart model's shape (128 wide, 2 layers; 1024 positions). Each repeat runs every batch under
every policy, in rotating order, so drift hits all alike; the median step time per batch is
reported. Tokens/s counts the *original* tokens (the samples' own, without padding or copies),
which are the same for all three, so it is the training throughput a user gets per sample.
The copy doubles the row (concat) or adds a row (separate_rows) for every sample whose answer
has > 50 tokens. Rows of the same length cost in proportion to the tokens processed (padding
included), so `separate_rows` targets a step-time ratio ≤ 1.1 × its processed-token ratio; `concat`
makes rows twice as long, and attention grows with the square of the row length, so its bound is
1.1 × the square of its token ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings

import torch

from benchmarks.common import CpuContention, markdown_table, quiet, step_timer, verdict
from datamodules import MEAPSFT, FineTuneDataModule, PlainSFT
from datamodules.finetune import SFTCollator
from lightning_modules import CausalLMModule

POLICIES = {
    "plain SFT": PlainSFT(),
    "MEAP concat": MEAPSFT(),
    "MEAP separate_rows": MEAPSFT(layout="separate_rows"),
}
for _policy in POLICIES.values():
    if _policy.uses_ratio:
        _policy.ratio = _policy.default_ratio  # what data.mask_ratio defaults to (MEAP: 0.10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32, help="samples timed (default 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8)")
    parser.add_argument("--repeats", type=int, default=4, help="timed passes over the batches (default 4)")
    args = parser.parse_args(argv)
    quiet()
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory(prefix="masklab-bench-") as cache_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = FineTuneDataModule(builtin_documents=max(args.samples, 200), vocab_size=2048, cache_dir=cache_dir)
        dm.setup("fit")
    prepared = dm.prepared["train"]
    samples = [(i, torch.from_numpy(prepared.ids[i]), *prepared.answer_spans[i]) for i in range(args.samples)]
    groups = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    batches = {name: [SFTCollator(p, dm.vocab, 0, dm.block_size)(g) for g in groups] for name, p in POLICIES.items()}
    original = sum(len(s[1]) for s in samples)
    processed = {name: sum(b["input_ids"].numel() for b in bs) for name, bs in batches.items()}

    torch.manual_seed(0)
    module = CausalLMModule(
        vocab=dm.model_vocab,
        block_size=dm.block_size,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=1024,
    )
    optimizer = module.build_optimizer()

    step = step_timer(module, optimizer)

    contention = CpuContention()
    for name in POLICIES:  # warm-up
        step(batches[name][0])
    times: dict[str, list[float]] = {name: [] for name in POLICIES}
    names = list(POLICIES)
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for index in range(len(groups)):
            for name in order:
                times[name].append(step(batches[name][index]))
    per_pass = {name: statistics.median(t) * len(groups) for name, t in times.items()}

    base = "plain SFT"
    copies = sum(int(b["masked"].any(1).sum()) for b in batches["MEAP separate_rows"])
    rows = [
        ("samples timed; of them with a masked copy (answer > 50 tokens)", f"{len(samples)}; {copies}", "—"),
        ("original tokens (same for every policy)", f"{original}", "—"),
    ]
    for name in POLICIES:
        rows.append(
            (
                f"{name}: tokens processed (incl. padding, copies)",
                f"{processed[name]} ({processed[name] / processed[base]:.2f}×)",
                "—",
            )
        )
        rows.append((f"{name}: median step time, ms", f"{1000 * per_pass[name] / len(groups):.0f}", "—"))
        rows.append((f"{name}: original tokens/s", f"{original / per_pass[name]:.0f}", "—"))
    for name, power, what in (("MEAP concat", 2, "token ratio²"), ("MEAP separate_rows", 1, "token ratio")):
        ratio = per_pass[name] / per_pass[base]
        bound = 1.1 * (processed[name] / processed[base]) ** power
        rows.append(
            (
                f"{name} / plain SFT step time",
                f"{ratio:.2f}×",
                f"≤ 1.1 × {what} ({bound:.2f}×): {verdict(ratio <= bound)}",
            )
        )
    line, row = contention.report()
    rows.append(row)
    print(markdown_table(rows))
    print(line)


if __name__ == "__main__":
    main()
