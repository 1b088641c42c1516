"""retrieval: accuracy by the gold item's position in the context ("lost in the middle").

Liu et al. (2023) give a model `items` records or documents, one of which holds the answer, and
move that gold item through every position. Two built-in synthetic tasks follow the protocol:

* `kv`: JSON key–value records (`{"Velora": "4812", ...}`) and a question about one key;
* `qa`: documents of corpus sentences, each stating one fact of the same attribute about a
  different name; the question asks for the gold document's fact.

Files in lost-in-the-middle's jsonl(.gz) format (`ordered_kv_records`/`key`/`value` for kv,
`question`/`answers`/`ctxs` for multi-document QA, the one-document "oracle" files included) are
read instead when `data` is given, each file a task, with the gold item moved to each position.
Examples whose prompt does not fit the model's context are skipped and counted, not refused; without
`items`, the suite runs the most items at which at least half of the examples fit, else the most at
which any fits, and says which in its table.
An answer is correct when it contains a gold answer after normalisation (their metric); every
prompt's answer is kept in the suite's json. The prompt is put into the run's fine-tuning template when the run
has one (`data.prompt_template`), else `{prompt}\\nAnswer:`.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from core.errors import ConfigError, DataError
from datamodules.corpus import ATTRIBUTES, BuiltinCorpus
from evaluation.model import LoadedModel
from evaluation.options import as_names
from evaluation.result import SuiteResult
from evaluation.scoring import Answerer, answers, contains_answer

TASKS = ("kv", "qa")


@dataclass
class Options:
    """Which retrieval tasks run, and how large their prompts are.

    Args:
        tasks: built-in synthetic tasks to run: kv (JSON key–value records) and/or qa (documents).
        data: lost-in-the-middle .jsonl / .jsonl.gz files (a list, one path, or paths joined by commas), each
            a task; replaces the built-in tasks.
        items: records / documents per prompt (the gold one included); None = the most (at most 10 synthetic
            ones, at most a file's own count) at which at least half of the examples fit the model's context,
            else the most at which any fits (the rest are skipped and counted).
        positions: gold positions to test, spread evenly from the first item to the last; None = every position.
        examples: prompts per gold position.
        prompt_template: wraps the prompt; None = the run's data.prompt_template, else "{prompt}\\nAnswer:".
        seed: seed of the synthetic examples.
        batch_size: prompts per generate call.
    """

    tasks: list[str] | None = None
    data: list[str] | str | None = None
    items: int | None = None
    positions: int | None = 5
    examples: int = 20
    prompt_template: str | None = None
    seed: int = 0
    batch_size: int = 16


@dataclass(frozen=True)
class Example:
    """Items in their original order; `gold` is the index of the one holding the answer."""

    items: list[str]
    gold: int
    question: str
    answers: list[str]
    kind: str  # "kv" or "qa"

    def truncated(self, items: int) -> Example:
        """The gold item and the first `items - 1` others."""
        others = [item for i, item in enumerate(self.items) if i != self.gold]
        return Example([self.items[self.gold], *others[: items - 1]], 0, self.question, self.answers, self.kind)

    def with_gold_at(self, position: int) -> list[str]:
        others = [item for i, item in enumerate(self.items) if i != self.gold]
        return [*others[:position], self.items[self.gold], *others[position:]]

    def prompt(self, position: int) -> str:
        items = self.with_gold_at(position)
        if self.kind == "kv":
            records = ", ".join(items)
            return f"JSON data: {{{records}}}\nQuestion: what is the value of {self.question}?"
        documents = "\n".join(f"Document [{i + 1}] {text}" for i, text in enumerate(items))
        return f"{documents}\nQuestion: {self.question}?"


def synthetic(kind: str, count: int, items: int, seed: int) -> list[Example]:
    """`count` examples of `items` items; distractors state facts of the same kind about other names."""
    world = BuiltinCorpus(seed)
    rng = np.random.default_rng([seed, TASKS.index(kind)])
    examples = []
    for _ in range(count):
        names = rng.choice(world.names, size=items, replace=False)
        values = [str(v) for v in rng.integers(1000, 10000, size=items)]
        if kind == "kv":
            records = [f'"{name}": "{value}"' for name, value in zip(names, values)]
            examples.append(Example(records, 0, f'"{names[0]}"', [values[0]], kind))
        else:
            attribute = rng.choice(ATTRIBUTES)
            documents = [
                f"{world.sentence(rng)} The {attribute} of {name} is {value}. {world.sentence(rng)}"
                for name, value in zip(names, values)
            ]
            examples.append(Example(documents, 0, f"what is the {attribute} of {names[0]}", [values[0]], kind))
    return examples


def read_lost_in_the_middle(path: str) -> list[Example]:
    """Examples from lost-in-the-middle's kv or multi-document QA jsonl(.gz)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"retrieval.data: {path!r} is not a file")
    opener = gzip.open if file.name.endswith(".gz") else open
    examples = []
    with opener(file, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                examples.append(_litm_example(json.loads(line), f"{path}:{number}"))
    if not examples:
        raise DataError(f"retrieval.data: {path!r} holds no examples")
    return examples


def _litm_example(record: dict, where: str) -> Example:
    if "ordered_kv_records" in record:
        missing = [k for k in ("key", "value") if k not in record]
        if missing:
            raise DataError(f"{where}: a key–value record needs {', '.join(missing)}")
        pairs = record["ordered_kv_records"]
        gold = next((i for i, (k, _) in enumerate(pairs) if k == record["key"]), None)
        if gold is None:
            raise DataError(f"{where}: key {record['key']!r} is not among its ordered_kv_records")
        return Example([f'"{k}": "{v}"' for k, v in pairs], gold, f'"{record["key"]}"', [record["value"]], "kv")
    missing = [k for k in ("question", "answers", "ctxs") if k not in record]
    if missing:
        raise DataError(
            f"{where}: neither a key–value record (ordered_kv_records) nor a QA record (missing {', '.join(missing)})"
        )
    contexts = record["ctxs"]
    gold = next((i for i, c in enumerate(contexts) if c.get("isgold") or c.get("hasanswer")), None)
    if gold is None:
        raise DataError(f"{where}: no document has isgold or hasanswer set")
    documents = [f"(Title: {c.get('title', '')}) {c['text']}" for c in contexts]
    return Example(documents, gold, record["question"].rstrip("?"), list(record["answers"]), "qa")


def gold_positions(items: int, positions: int | None) -> list[int]:
    if positions is None or positions >= items:
        return list(range(items))
    return sorted(set(np.linspace(0, items - 1, positions).round().astype(int).tolist()))


def curve(details: dict[str, dict]):
    """Accuracy against the gold item's relative position (0 = first item, 1 = last)."""
    figure, axes = plt.subplots(figsize=(5.5, 3.5))
    for task, d in details.items():
        relative = [(p - 1) / max(d["items"] - 1, 1) for p in d["positions"]]  # one item: position 0
        axes.plot(relative, d["accuracy"], marker="o", label=f"{task} ({d['items']} items)")
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("position of the gold item (0 = first, 1 = last)")
    axes.set_ylabel("accuracy")
    axes.set_title("retrieval by gold position")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def prompt_ids(loaded: LoadedModel, template: str, prompt: str) -> list[int]:
    return [
        loaded.vocab.bos_id,
        *loaded.tokenizer(template.format(prompt=prompt), add_special_tokens=False)["input_ids"],
    ]


def fitted(
    loaded: LoadedModel, examples: list[Example], items: int | None, template: str, new_tokens: int, task: str
) -> tuple[list[Example], int, str]:
    """The examples cut to `items` items, less those whose prompt does not fit the context; how many
    were skipped; and how the item count was chosen. Without `items`: the most at which at least
    half of the examples fit, else (a file of long documents) the most at which any fits; refused
    only when none fits even with one item."""
    available = min(len(e.items) for e in examples)
    if items is not None and items > available:
        raise ConfigError(f"retrieval.items={items}: the {task} examples have only {available} items")
    context = loaded.context_length
    fits = lambda e, k: len(prompt_ids(loaded, template, e.truncated(k).prompt(k - 1))) + new_tokens <= context
    chosen = f"retrieval.items={items}"
    if items is None:
        counts = {k: sum(fits(e, k) for e in examples) for k in range(available, 0, -1)}
        half = next((k for k, n in counts.items() if 2 * n >= len(examples)), None)
        items = half or next((k for k, n in counts.items() if n), 0)
        if items == 0:
            raise DataError(
                f"retrieval: no {task} example fits the model's context of {context} tokens, even with 1 item"
            )
        chosen = (
            f"{items} items: the most at which at least half of the examples fit"
            if half
            else f"{items} items: the most at which any example fits ({counts[items]} of {len(examples)})"
        )
    kept = [e.truncated(items) for e in examples if fits(e, items)]
    if not kept:
        raise ConfigError(
            f"retrieval.items={items}: no {task} prompt of {items} items fits the model's context of {context} tokens;"
            " lower retrieval.items"
        )
    return kept, len(examples) - len(kept), chosen


def file_tasks(data: str | list[str], examples: int) -> dict[str, list[Example]]:
    """Each file a task: `litm_<kind>` for one file, the file's name without suffixes for several."""
    files = as_names(data)
    read = {file: read_lost_in_the_middle(file)[:examples] for file in files}
    if len(files) == 1:
        return {f"litm_{read[files[0]][0].kind}": read[files[0]]}
    names = [Path(file).name.split(".")[0] for file in files]
    if len(set(names)) < len(names):
        raise ConfigError(f"retrieval.data: two files share a name ({', '.join(names)}); each file's name is its task")
    return {name: read[file] for name, file in zip(names, files)}


def metric_names(options: Options, objective: str) -> list[str]:
    """The metrics `run` writes (`<p>`: a gold position), so a study can check its metric names before training."""
    if options.data:
        files = as_names(options.data)
        tasks = [f"litm_{kind}" for kind in TASKS] if len(files) == 1 else [Path(f).name.split(".")[0] for f in files]
    else:
        tasks = options.tasks or list(TASKS)
    return ["acc", *(name for task in tasks for name in (f"{task}/acc", f"{task}/acc_position_<p>"))]


def run(loaded: LoadedModel, options: Options, answerer: Answerer | None = None) -> SuiteResult:
    tasks = options.tasks or list(TASKS)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ConfigError(f"retrieval.tasks: unknown {', '.join(unknown)} (known: {', '.join(TASKS)})")
    if options.items is not None and options.items < 1:
        raise ConfigError(f"retrieval.items must be at least 1, got {options.items}")
    template = (
        options.prompt_template
        or loaded.run_config.get("data", {}).get("init_args", {}).get("prompt_template")
        or "{prompt}\nAnswer:"
    )
    if options.data:
        by_task = file_tasks(options.data, options.examples)
    else:
        by_task = {task: synthetic(task, options.examples, options.items or 10, options.seed) for task in tasks}
    answerer = answerer or (lambda prompts, n: answers(loaded, prompts, n, options.batch_size))
    metrics: dict[str, float] = {}
    accuracy: dict[str, list[float]] = {}
    details: dict[str, dict] = {}
    for task, examples in by_task.items():
        new_tokens = (
            max(
                len(loaded.tokenizer(" " + a, add_special_tokens=False)["input_ids"])
                for e in examples
                for a in e.answers
            )
            + 1
        )
        examples, skipped, chosen = fitted(loaded, examples, options.items, template, new_tokens, task)
        items = len(examples[0].items)
        positions = gold_positions(items, options.positions)
        asked = [(p, e) for p in positions for e in examples]  # position-major
        predictions = answerer([prompt_ids(loaded, template, e.prompt(p)) for p, e in asked], new_tokens)
        hits = [contains_answer(a, e.answers) for a, (_, e) in zip(predictions, asked)]
        correct = np.array(hits, dtype=float).reshape(len(positions), -1)
        accuracy[task] = correct.mean(1).tolist()
        details[task] = {
            "items": items,
            "positions": [p + 1 for p in positions],
            "examples_per_position": len(examples),
            "skipped_too_long": skipped,
            "items_chosen": chosen,
            "accuracy": accuracy[task],
            "answers": [
                {"position": p + 1, "question": e.question, "gold": e.answers, "answer": a, "correct": hit}
                for (p, e), a, hit in zip(asked, predictions, hits)
            ],
        }
        metrics[f"{task}/acc"] = float(correct.mean())
        metrics |= {f"{task}/acc_position_{p + 1}": float(a) for p, a in zip(positions, accuracy[task])}
    metrics = {"acc": float(np.mean([metrics[f"{t}/acc"] for t in by_task])), **metrics}
    table = "\n".join(
        ["| task | items | examples (skipped: too long) | accuracy by gold position | mean |", "| --- " * 5 + "|"]
        + [
            f"| {t} | {d['items']} | {d['examples_per_position']} ({d['skipped_too_long']}) | "
            + ", ".join(f"{p}: {a:.2f}" for p, a in zip(d["positions"], d["accuracy"]))
            + f" | {metrics[f'{t}/acc']:.2f} |"
            for t, d in details.items()
        ]
        + [""]
        + [
            f"{t}: {d['items_chosen']}; {d['skipped_too_long']} of {d['examples_per_position'] + d['skipped_too_long']}"
            " examples skipped (too long for the context)"
            for t, d in details.items()
        ]
    )
    return SuiteResult(metrics, {"by_position": curve(details)}, table, details)
