"""Key–value retrieval accuracy by the gold fact's position in the context.

``python -m experiments.eval_retrieval --run runs/sft_meap/version_0 [--examples 200] [--bins 5]``

A small, honest stand-in until the evaluation suite exists. The examples are the built-in QA
generator's held-out key–value examples (its "test" stream, never trained on), templated and fitted
like the run's training data (the run's `data.*` keys: templates, block size, `builtin_max_facts`);
a context longer than the block loses its start (`prompts_cut` in the JSON says how many did).
An example counts as correct when, teacher-forced, the model's argmax is the gold token at every
token of the value — exactly when greedy decoding would produce the value. Accuracy is reported
overall and by where the gold fact sits among the context's facts (0 = first, 1 = last), in
`--bins` equal bins. Writes ``<run>/eval_retrieval.json``.
"""

from __future__ import annotations

import argparse
import json

import torch

from datamodules.finetune import SFTCollator, encode
from datamodules.policies.finetune import PlainSFT
from datamodules.masking import IGNORE_INDEX
from datamodules.qa_corpus import QACorpus
from evaluation.model import LoadedModel, load_model


def kv_examples(seed: int, max_facts: int, count: int) -> list:
    generated = QACorpus(seed, max_facts).examples(2 * count, "test")
    return [e for e in generated if e.kind == "kv"][:count]


@torch.no_grad()
def correct_by_example(loaded: LoadedModel, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """[N] bool: every labelled regular token (the value, not the EOS) predicted right."""
    results = []
    for batch in batches:
        logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, L, V]
        labels = batch["labels"][:, 1:]  # [B, L-1]: position t predicts token t+1
        scored = (labels != IGNORE_INDEX) & ~loaded.vocab.is_special[labels.clamp_min(0)]
        wrong = (logits[:, :-1].argmax(-1) != labels) & scored
        results.append(~wrong.any(1))
    return torch.cat(results)


def evaluate(run: str, examples: int = 200, bins: int = 5, seed: int = 0, batch_size: int = 8) -> dict:
    loaded = load_model(run)
    if loaded.objective != "causal":
        raise SystemExit(f"error: {run} is not a causal language model")
    data = loaded.run_config.get("data", {}).get("init_args", {})
    chosen = kv_examples(seed, data.get("builtin_max_facts", 16), examples)
    prepared = encode(
        [(e.prompt, e.answer) for e in chosen],
        loaded.tokenizer,
        loaded.vocab,
        data.get("prompt_template", "{prompt}\nAnswer:"),
        data.get("answer_template", " {answer}"),
        data.get("block_size") or loaded.model.config.max_position_embeddings,
        "prompt_start",
    )
    if len(prepared.ids) != len(chosen):
        raise SystemExit(f"error: {prepared.summary()}: the run's block size is too small for key–value answers")
    collate = SFTCollator(PlainSFT(), loaded.vocab, seed, max(len(ids) for ids in prepared.ids))
    samples = [
        (i, torch.from_numpy(ids), *span) for i, (ids, span) in enumerate(zip(prepared.ids, prepared.answer_spans))
    ]
    batches = [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    correct = correct_by_example(loaded, batches)
    positions = torch.tensor([e.gold_position for e in chosen])
    bin_of = (positions * bins).long().clamp_max(bins - 1)
    by_position = [
        {
            "from": b / bins,
            "to": (b + 1) / bins,
            "n": int((bin_of == b).sum()),
            "accuracy": float(correct[bin_of == b].float().mean()) if (bin_of == b).any() else None,
        }
        for b in range(bins)
    ]
    result = {
        "run": str(run),
        "examples": len(chosen),
        "prompts_cut": sum(n for what, n in prepared.events.items() if what.startswith("prompts cut")),
        "accuracy": float(correct.float().mean()),
        "by_position": by_position,
    }
    (loaded.path.parent / "eval_retrieval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.eval_retrieval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run dir (its hf_model/ is used) or an hf_model folder")
    parser.add_argument("--examples", type=int, default=200, help="held-out key–value examples (default 200)")
    parser.add_argument("--bins", type=int, default=5, help="position bins (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the QA generator (default 0, as in training)")
    args = parser.parse_args(argv)
    result = evaluate(args.run, args.examples, args.bins, args.seed)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
