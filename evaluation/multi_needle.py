"""multi_needle: several facts hidden in a haystack that must be combined to answer (MEAP §4.1.4).

Each prompt holds k needles (k in `needles`, 2-5) at chosen depths of a haystack window, then one
question whose answer needs all k of them:

- `chain`: k relations "Velora is the parent of Quenby." linking k+1 fresh names in a chain,
  shuffled in the text; "Recall: the eldest ancestor of <last name> is" must be answered with the
  chain's first name (NeedleBench's multi-needle reasoning). Candidates: the k ancestors.
- `values`: k facts "The code of Velora is 4812." about k names with one attribute; "Recall: the
  codes of A, B and C are" must be answered with the k values in the asked order. Candidates: the
  k rotations of that list, so every wrong one binds each name to another needle's value.

Names are fresh per prompt and the haystack window never mentions them (the built-in corpus states
facts about the same names), so the needles alone decide the answer.

Scoring is teacher-forced multiple choice (`scoring.answer_logprobs`: a decoder's log p(candidate |
prompt), an encoder's [MASK] slots): a case scores 1 when the gold candidate has the highest
log-probability, 1/t when it ties with t-1 others. Every candidate of a case has the same number
of tokens (names are drawn from one token-length class; rotations reuse the same values), so a
model that ignores the needles scores chance, 1/k, and only the needles tell the candidates apart.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from core.errors import ConfigError
from datamodules.corpus import ATTRIBUTES, BuiltinCorpus
from evaluation.heatmap import heatmap
from evaluation.model import LoadedModel
from evaluation.needle import haystack_ids, insert_needles, needle_lengths
from evaluation.options import as_names
from evaluation.result import SuiteResult
from evaluation.scoring import answer_logprobs

TASKS = ("chain", "values")
CHAIN_NEEDLE = "{parent} is the parent of {child}."
CHAIN_QUESTION = "Recall: the eldest ancestor of {name} is"
VALUES_NEEDLE = "The {attribute} of {name} is {value}."
VALUES_QUESTION = "Recall: the {attribute}s of {names} are"
MIN_NEEDLES, MAX_NEEDLES = 2, 5
MAX_WINDOW_TRIES = 1000

# (prompts, candidate answers) -> [N] log-probabilities: `answer_logprobs` on a model; tests plug in oracles
Scorer = Callable[[list[list[int]], list[list[int]]], Tensor]


@dataclass
class Options:
    """Which haystacks, needles and questions are built.

    Args:
        haystack: text file or folder for the haystack (e.g. ../shared/data/pg_essays); None = built-in corpus text.
        lengths: prompt lengths in tokens; None = 4 lengths evenly spaced up to the model's context.
        needles: numbers of needles per prompt (each 2-5); accuracy is reported for each.
        depths: depth of needle i (fraction of the haystack, 0-1), at least max(needles) of them; a prompt
            with k needles uses the first k; None = needle i of k at (i + 0.5) / k (k equal parts).
        tasks: `chain` (follow k relations to the eldest ancestor) and/or `values` (k values together).
        samples: prompts per (task, needles, length) cell, each with its own names, values and window.
        shuffle: put the needles in the haystack in a random order (False: the chain's / question's order).
        seed: seed of the needles, the haystack windows and the built-in haystack.
        batch_size: sequences per forward pass.
    """

    haystack: str | None = None
    lengths: list[int] | None = None
    needles: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    depths: list[float] | None = None
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    samples: int = 4
    shuffle: bool = True
    seed: int = 0
    batch_size: int = 16


@dataclass(frozen=True)
class Case:
    ids: list[int]  # the prompt, exactly `length` tokens
    candidates: list[str]  # answer texts, the gold one first; all of one token length
    task: str
    needles: int
    length: int
    depths: list[float]  # each needle's actual place (in chain / question order): its offset / window tokens
    facts: list[str]  # the needle sentences, in chain / question order
    names: list[str]  # the names they use, which the haystack window never mentions


def checked(options: Options) -> tuple[list[str], list[int]]:
    """The tasks and needle counts, refused in one line when out of range."""
    tasks = as_names(options.tasks)
    if not tasks or set(tasks) - set(TASKS):
        raise ConfigError(f"multi_needle.tasks {tasks} must be a non-empty subset of {list(TASKS)}")
    counts = sorted(set(options.needles))
    if not counts or counts[0] < MIN_NEEDLES or counts[-1] > MAX_NEEDLES:
        raise ConfigError(f"multi_needle.needles {options.needles} must each be {MIN_NEEDLES}-{MAX_NEEDLES}")
    if options.depths is not None and (
        len(options.depths) < counts[-1] or not all(0 <= d <= 1 for d in options.depths)
    ):
        raise ConfigError(
            f"multi_needle.depths {options.depths} must hold at least {counts[-1]} fractions between 0 and 1"
        )
    if options.samples < 1:
        raise ConfigError(f"multi_needle.samples must be at least 1, got {options.samples}")
    return tasks, counts


def name_pool(loaded: LoadedModel, seed: int) -> list[str]:
    """The corpus world's names of the most common token length (as ` Name`), so that candidate
    names are equally long and a model blind to the needles cannot prefer one."""
    names = BuiltinCorpus(seed).names
    sizes = [len(ids) for ids in loaded.tokenizer([" " + n for n in names], add_special_tokens=False)["input_ids"]]
    common = max(set(sizes), key=sizes.count)
    return [n for n, size in zip(names, sizes) if size == common]


def values_answer(values: list[str]) -> str:
    return ", ".join(values[:-1]) + " and " + values[-1]


def make_facts(
    rng: np.random.Generator, names: list[str], task: str, k: int
) -> tuple[list[str], str, list[str], list[str]]:
    """k needle sentences (chain / question order), the question, the candidate answers (gold
    first) and the names they use."""
    chosen = [str(n) for n in rng.choice(names, k + 1, replace=False)]
    if task == "chain":  # chosen[0] -> chosen[1] -> ... -> chosen[k]
        needles = [CHAIN_NEEDLE.format(parent=a, child=b) for a, b in itertools.pairwise(chosen)]
        return needles, CHAIN_QUESTION.format(name=chosen[-1]), chosen[:-1], chosen
    attribute = str(rng.choice(ATTRIBUTES))
    values = [str(v) for v in rng.choice(np.arange(1000, 10000), k, replace=False)]
    needles = [VALUES_NEEDLE.format(attribute=attribute, name=n, value=v) for n, v in zip(chosen, values)]
    question = VALUES_QUESTION.format(attribute=attribute, names=values_answer(chosen[:k]))
    return needles, question, [values_answer(values[r:] + values[:r]) for r in range(k)], chosen[:k]


def clean_window(
    loaded: LoadedModel, haystack: list[int], size: int, avoid: list[str], rng: np.random.Generator
) -> int:
    """Start of a random haystack window of `size` tokens that names nobody in `avoid`: the
    built-in corpus states facts about the same names, which must not add to or contradict the needles."""
    for _ in range(MAX_WINDOW_TRIES):
        start = int(rng.integers(0, len(haystack) - size + 1))
        words = set(re.findall(r"\w+", loaded.tokenizer.decode(haystack[start : start + size])))
        if words.isdisjoint(avoid):
            return start
    raise ConfigError(f"multi_needle.haystack: no window of {size} tokens in {MAX_WINDOW_TRIES} tries avoids {avoid}")


def answer_budget(loaded: LoadedModel, counts: list[int]) -> int:
    """Tokens the longest candidate (k five-digit values; a name is shorter) may take after the
    prompt, +1 for an encoder's closing EOS."""
    return len(loaded.tokenizer(" " + values_answer(["10000"] * counts[-1]), add_special_tokens=False)["input_ids"]) + 1


def build_cases(loaded: LoadedModel, options: Options) -> list[Case]:
    """Cases task-major, then needles, then length, then sample."""
    tasks, counts = checked(options)
    rng = np.random.default_rng(options.seed)
    names = name_pool(loaded, options.seed)
    lengths = needle_lengths(loaded, options, answer_budget(loaded, counts), "multi_needle")
    haystack = haystack_ids(loaded, options.haystack, options.seed, 2 * max(lengths), "multi_needle.haystack")
    is_end = loaded.vocab.is_sentence_end[torch.tensor(haystack)].numpy()
    encode = lambda texts: loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    cases = []
    for task in tasks:
        for k in counts:
            depths = options.depths[:k] if options.depths is not None else [(i + 0.5) / k for i in range(k)]
            for length in lengths:
                for _ in range(options.samples):
                    needles, question, candidates, used = make_facts(rng, names, task, k)
                    order = rng.permutation(k) if options.shuffle else np.arange(k)
                    needle_ids = encode([" " + needles[i] for i in order])  # needle j of the text is needles[order[j]]
                    question_ids = encode("\n" + question)
                    size = length - 1 - sum(map(len, needle_ids)) - len(question_ids)
                    if size < 0:
                        raise ConfigError(
                            f"multi_needle.lengths: {length} tokens cannot hold {k} needles and the question"
                        )
                    start = clean_window(loaded, haystack, size, used, rng)
                    window, ends = haystack[start : start + size], is_end[start : start + size]
                    body, cuts = insert_needles(window, ends, needle_ids, sorted(depths))
                    placed = np.empty(k)
                    placed[order] = np.array(cuts) / max(size, 1)
                    ids = [loaded.vocab.bos_id, *body, *question_ids]
                    cases.append(Case(ids, candidates, task, k, length, placed.tolist(), needles, used))
    return cases


def choice_credit(scores: Tensor) -> Tensor:
    """[N] credit from [N, C] candidate scores (gold in column 0, -inf for absent candidates): 1/t
    when the gold score is the highest, tied with t-1 others (t = 1: a clear win), else 0."""
    best = scores.max(1, keepdim=True).values
    tied = torch.isclose(scores, best, rtol=1e-6, atol=1e-6) & scores.isfinite()
    return tied[:, 0] / tied.sum(1)


def metric_names(options: Options, objective: str) -> list[str]:
    """The metrics `run` writes (`<k>`: a needle count, `<n>`: a context length), so a study can check
    its metric names before training."""
    tasks = as_names(options.tasks)
    return ["acc", "chance", "answer_logprob", *(f"{t}/acc" for t in tasks), "acc_needles_<k>", "acc_length_<n>"]


def run(loaded: LoadedModel, options: Options, scorer: Scorer | None = None) -> SuiteResult:
    cases = build_cases(loaded, options)
    tasks, counts = checked(options)
    lengths = sorted({c.length for c in cases})
    scorer = scorer or (lambda prompts, targets: answer_logprobs(loaded, prompts, targets, options.batch_size))
    flat = [(row, col, text) for row, c in enumerate(cases) for col, text in enumerate(c.candidates)]
    targets = loaded.tokenizer([" " + text for _, _, text in flat], add_special_tokens=False)["input_ids"]
    logprobs = scorer([cases[row].ids for row, _, _ in flat], targets)  # [candidates of all cases]
    scores = torch.full((len(cases), counts[-1]), -torch.inf)
    scores[[row for row, _, _ in flat], [col for _, col, _ in flat]] = logprobs.float()
    credit = choice_credit(scores).numpy()  # [cases]
    cells = credit.reshape(len(tasks), len(counts), len(lengths), options.samples)
    grid = cells.mean((0, 3))  # [needles, lengths]
    metrics = {
        "acc": float(credit.mean()),
        "chance": float(np.mean([1 / len(c.candidates) for c in cases])),
        "answer_logprob": float(scores[:, 0].mean()),
    }
    metrics |= {f"{task}/acc": float(cells[i].mean()) for i, task in enumerate(tasks)}
    metrics |= {f"acc_needles_{k}": float(grid[i].mean()) for i, k in enumerate(counts)}
    metrics |= {f"acc_length_{n}": float(grid[:, i].mean()) for i, n in enumerate(lengths)}
    needles = [str(k) for k in counts]
    figure = heatmap(grid, needles, lengths, f"multi_needle: accuracy {credit.mean():.2f}", "needles", "accuracy")
    table = "\n".join(
        [
            "| needles | chance | " + " | ".join(str(n) for n in lengths) + " | mean |",
            "| --- " * (len(lengths) + 3) + "|",
        ]
        + [
            f"| {k} | {1 / k:.2f} | " + " | ".join(f"{v:.2f}" for v in grid[i]) + f" | {grid[i].mean():.2f} |"
            for i, k in enumerate(counts)
        ]
    )
    details = {
        "lengths": lengths,
        "needles": counts,
        "accuracy": grid.tolist(),
        "examples": [
            {"task": c.task, "needles": c.needles, "length": c.length, "depths": c.depths, "answer": c.candidates[0]}
            for c in cases[:: options.samples]
        ],
    }
    return SuiteResult(metrics, {"heatmap": figure}, table, details)
