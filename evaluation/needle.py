"""needle: a fact hidden at depths 0–100% of haystacks of growing length; can the model recall it?

For each (length, depth) cell, `samples` prompts of exactly `length` tokens are built in token
space: `<bos>`, haystack text, the needle sentence ("The code of Velora is 4812.") inserted at the
sentence boundary nearest to `depth` of the haystack, more haystack, then the question ("Recall:
the code of Velora is"). The model answers greedily (an encoder fills [MASK] slots). Scores:
exact match (the answer starts with the value) and ROUGE-1 recall of the value's words, and the
value's log-probability after the prompt (teacher-forced), which moves before exact match does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.text.rouge import rouge_score

from core.errors import ConfigError
from datamodules.corpus import ATTRIBUTES, BuiltinCorpus
from datamodules.sources import load_text_files, text_files
from evaluation.heatmap import heatmap
from evaluation.model import LoadedModel
from evaluation.result import SuiteResult
from evaluation.scoring import Answerer, answer_logprobs, answers, exact_match


@dataclass
class Options:
    """How haystacks, needles and answers are made.

    Args:
        haystack: text file or folder for the haystack (e.g. ../shared/data/pg_essays); None = built-in corpus text.
        lengths: prompt lengths in tokens; None = 4 lengths evenly spaced up to the model's context.
        depths: how many needle depths, evenly spaced from 0% to 100% of the haystack.
        samples: prompts per (length, depth) cell, each with its own needle and haystack window.
        needle: the needle sentence; {attribute}, {name} and {value} are filled in.
        question: what follows the haystack; the model must continue it with the value.
        seed: seed of the needles, the haystack windows and the built-in haystack.
        batch_size: prompts per generate call.
        use_cache: decode with the KV cache (False recomputes the whole prompt for every new token).
    """

    haystack: str | None = None
    lengths: list[int] | None = None
    depths: int = 11
    samples: int = 4
    needle: str = "The {attribute} of {name} is {value}."
    question: str = "Recall: the {attribute} of {name} is"
    seed: int = 0
    batch_size: int = 16
    use_cache: bool = True


@dataclass(frozen=True)
class Case:
    ids: list[int]  # the prompt, exactly `length` tokens
    value: str
    length: int
    depth: float  # the needle's actual place: its first token's offset / haystack tokens


def haystack_ids(
    loaded: LoadedModel, haystack: str | None, seed: int, tokens_needed: int, option: str = "needle.haystack"
) -> list[int]:
    """Haystack text (the files at `haystack`, or built-in corpus text of `seed`) as one token list,
    long enough for every window; `option` names the option in errors."""
    if haystack:
        texts = list(load_text_files(text_files(haystack, option), option)["text"])
    else:
        texts = BuiltinCorpus(seed).documents(max(20, tokens_needed // 150), "test")
    ids = loaded.tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    while len(ids) < tokens_needed:  # a short haystack repeats, as in the original test
        ids = ids + ids
    return ids


def needle_lengths(loaded: LoadedModel, options: Options, new_tokens: int, suite: str = "needle") -> list[int]:
    """The prompt lengths of `options.lengths` (default: 4 up to the context), checked against the
    model's context (prompt + answer must fit); `suite` names the option in the error."""
    limit = loaded.context_length - new_tokens
    lengths = options.lengths or [int(x) for x in np.linspace(limit / 4, limit, 4)]
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ConfigError(
            f"{suite}.lengths {too_long} exceed the model's context: {loaded.context_length} tokens "
            f"minus {new_tokens} answer tokens leaves at most {limit}"
        )
    return sorted(lengths)


def insert_needles(
    window: list[int], is_end: np.ndarray, needles: list[list[int]], depths: list[float]
) -> tuple[list[int], list[int]]:
    """`window` with needle i inserted at the sentence boundary (the window's start or just after a
    sentence end; `is_end` flags the window's tokens) nearest to `depths[i]` of the window, so no
    needle splits a sentence. Needles at the same boundary keep their order. Returns the ids and
    each needle's offset in the window."""
    boundaries = np.concatenate([[0], np.flatnonzero(is_end) + 1])
    cuts = boundaries[np.abs(boundaries[None, :] - np.asarray(depths)[:, None] * len(window)).argmin(1)].tolist()
    ids, start = [], 0
    for i in sorted(range(len(needles)), key=lambda i: cuts[i]):
        ids += [*window[start : cuts[i]], *needles[i]]
        start = cuts[i]
    return [*ids, *window[start:]], cuts


def build_cases(loaded: LoadedModel, options: Options, new_tokens: int) -> list[Case]:
    rng = np.random.default_rng(options.seed)
    names = BuiltinCorpus(options.seed).names
    lengths = needle_lengths(loaded, options, new_tokens)
    haystack = haystack_ids(loaded, options.haystack, options.seed, 2 * max(lengths))
    is_end = loaded.vocab.is_sentence_end[torch.tensor(haystack)].numpy()
    encode = lambda text: loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    cases = []
    for length in lengths:
        for depth in np.linspace(0, 1, options.depths):
            for _ in range(options.samples):
                fact = {
                    "attribute": rng.choice(ATTRIBUTES),
                    "name": rng.choice(names),
                    "value": str(rng.integers(1000, 10000)),
                }
                needle, question = (
                    encode(" " + options.needle.format(**fact)),
                    encode("\n" + options.question.format(**fact)),
                )
                size = length - 1 - len(needle) - len(question)
                if size < 0:
                    raise ConfigError(f"needle.lengths: {length} tokens cannot hold the needle and the question")
                start = int(rng.integers(0, len(haystack) - size + 1))
                body, (cut,) = insert_needles(
                    haystack[start : start + size], is_end[start : start + size], [needle], [depth]
                )
                cases.append(Case([loaded.vocab.bos_id, *body, *question], fact["value"], length, cut / max(size, 1)))
    return cases


# the value is one of the 9000 four-digit numbers: a uniform guess gives each the log-probability ln(1/9000)
CHANCE = {"value_logprob": -math.log(9000)}


def metric_names(options: Options, objective: str) -> list[str]:
    """The metrics `run` writes (`<n>`: a prompt length), so a study can check its metric names before training."""
    return ["acc", "rouge1_recall", "value_logprob", "acc_length_<n>"]


def run(loaded: LoadedModel, options: Options, answerer: Answerer | None = None) -> SuiteResult:
    new_tokens = len(loaded.tokenizer(" 10000.", add_special_tokens=False)["input_ids"]) + 1
    cases = build_cases(loaded, options, new_tokens)
    answerer = answerer or (lambda prompts, n: answers(loaded, prompts, n, options.batch_size, options.use_cache))
    predictions = answerer([c.ids for c in cases], new_tokens)
    correct = np.array([exact_match(p, c.value) for p, c in zip(predictions, cases)], dtype=float)
    rouge = np.array(
        [float(rouge_score(p, c.value, rouge_keys="rouge1")["rouge1_recall"]) for p, c in zip(predictions, cases)]
    )
    lengths = sorted({c.length for c in cases})
    grid = (
        correct.reshape(len(lengths), options.depths, options.samples).mean(-1).T
    )  # [depths, lengths]: cases are length-major
    depths = [f"{100 * d:.0f}%" for d in np.linspace(0, 1, options.depths)]
    figure = heatmap(grid, depths, lengths, f"needle: exact match {correct.mean():.2f}", "needle depth", "exact match")
    values = [loaded.tokenizer(" " + c.value, add_special_tokens=False)["input_ids"] for c in cases]
    value_logprob = answer_logprobs(loaded, [c.ids for c in cases], values, options.batch_size)  # [cases]
    metrics = {
        "acc": float(correct.mean()),
        "rouge1_recall": float(rouge.mean()),
        "value_logprob": float(value_logprob.mean()),
    }
    metrics |= {f"acc_length_{n}": float(grid[:, i].mean()) for i, n in enumerate(lengths)}
    table = "\n".join(
        [
            "| length | " + " | ".join(f"{100 * d:.0f}%" for d in np.linspace(0, 1, options.depths)) + " | mean |",
            "| --- " * (options.depths + 2) + "|",
        ]
        + [
            f"| {n} | " + " | ".join(f"{v:.2f}" for v in grid[:, i]) + f" | {grid[:, i].mean():.2f} |"
            for i, n in enumerate(lengths)
        ]
    )
    details = {
        "lengths": lengths,
        "depths": np.linspace(0, 1, options.depths).tolist(),
        "exact_match": grid.tolist(),
        "examples": [
            {"value": c.value, "depth": c.depth, "length": c.length, "answer": p}
            for c, p in zip(cases[:: options.samples], predictions[:: options.samples])
        ],
    }
    return SuiteResult(metrics, {"heatmap": figure}, table, details)
