"""Speed of the evaluation suites' two hot paths, measured in one run on the same models:

* BLiMP pseudo-log-likelihoods: every masked copy of every sentence as rows of large batches
  (`evaluation.scoring.pseudo_log_likelihoods`) vs one sentence at a time (its masked copies as
  one batch) — sentences/s, target ≥ 10x — and vs one masked copy per forward pass (a Python loop
  over tokens), reported;
* needle answers: greedy decoding with the KV cache vs recomputing the prompt for every new
  token — prompts/s, reported.

``python -m benchmarks.evaluation [--sentences 256] [--needle-length 1000]``

The models are quickstart-sized (hidden 256, 4 layers, random weights: speed does not depend on
what the weights know) with a BPE tokenizer trained on the built-in corpus; the sentences are
real BLiMP sentences when ../shared/data/blimp exists, else built-in corpus sentences.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import markdown_table, median_time, quiet, save_tiny_hf_model, verdict
from datamodules.corpus import BuiltinCorpus
from evaluation import blimp, needle
from evaluation.model import LoadedModel, load_model
from evaluation.scoring import answers, pseudo_log_likelihoods

BLIMP = Path(__file__).parents[1] / "../shared/data/blimp"


def sentences(count: int) -> list[str]:
    if BLIMP.is_dir():
        pairs = blimp.load_pairs(blimp.Options(data=str(BLIMP), max_pairs=max(1, count // 40)))
        return [p.good for p in pairs][:count]
    rng = np.random.default_rng(0)
    corpus = BuiltinCorpus(0)
    return [corpus.sentence(rng) for _ in range(count)]


def pll_rows(encoder: LoadedModel, texts: list[str], shape: str, repeats: int) -> list[tuple[str, str, str]]:
    bos, eos = encoder.vocab.bos_id, encoder.vocab.eos_id
    ids = [[bos, *s, eos] for s in encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    batched = median_time(lambda: pseudo_log_likelihoods(encoder, ids, rows_per_batch=512), repeats, 1)
    one_at_a_time = median_time(
        lambda: [pseudo_log_likelihoods(encoder, [s], rows_per_batch=512) for s in ids], repeats, 1
    )
    token_loop = (
        median_time(lambda: [pseudo_log_likelihoods(encoder, [s], rows_per_batch=1) for s in ids[:16]], repeats, 1)
        * len(ids)
        / 16
    )
    same = torch.cat([pseudo_log_likelihoods(encoder, [s]) for s in ids[:8]])
    torch.testing.assert_close(pseudo_log_likelihoods(encoder, ids[:8]), same, atol=1e-3, rtol=1e-4)
    ratio = one_at_a_time / batched
    return [
        (f"BLiMP PLL {shape}, batched (sentences/s)", f"{len(ids) / batched:.1f}", ""),
        (f"BLiMP PLL {shape}, one sentence at a time (sentences/s)", f"{len(ids) / one_at_a_time:.1f}", ""),
        (f"BLiMP PLL {shape}, one masked token per forward (sentences/s)", f"{len(ids) / token_loop:.1f}", ""),
        (
            f"BLiMP PLL {shape}, batched / one sentence at a time",
            f"{ratio:.1f}x",
            verdict(ratio >= 10) + " (target >= 10x)",
        ),
        (f"BLiMP PLL {shape}, batched / one masked token per forward", f"{token_loop / batched:.1f}x", "reported"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--needle-length", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    quiet()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, hidden, layers in (("tiny 32x2", 32, 2), ("quickstart 256x4", 256, 4)):
            encoder = load_model(str(save_tiny_hf_model(Path(tmp) / name, "mlm", 1024, hidden, layers)))
            rows += pll_rows(encoder, sentences(args.sentences), name, args.repeats)
        decoder = load_model(str(save_tiny_hf_model(Path(tmp) / "causal", "causal", 1024, 256, 4)))

    options = needle.Options(lengths=[args.needle_length], depths=4, samples=2)
    prompts = [c.ids for c in needle.build_cases(decoder, options, new_tokens=6)]
    cached = median_time(lambda: answers(decoder, prompts, 6, batch_size=8, use_cache=True), args.repeats, 1)
    uncached = median_time(lambda: answers(decoder, prompts, 6, batch_size=8, use_cache=False), args.repeats, 1)
    assert answers(decoder, prompts, 6, use_cache=True) == answers(decoder, prompts, 6, use_cache=False)

    print(
        f"{args.sentences} BLiMP sentences; needle: {len(prompts)} prompts of {args.needle_length} tokens, 6 "
        f"new tokens, quickstart shape\n"
    )
    print(
        markdown_table(
            [
                *rows,
                ("needle with KV cache (prompts/s)", f"{len(prompts) / cached:.2f}", ""),
                ("needle without KV cache (prompts/s)", f"{len(prompts) / uncached:.2f}", ""),
                ("KV cache / no cache", f"{uncached / cached:.1f}x", "reported"),
            ]
        )
    )


if __name__ == "__main__":
    main()
