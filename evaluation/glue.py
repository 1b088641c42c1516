"""glue: fine-tune the model with a classification head on GLUE tasks, several seeds, dev scores.

Each task is read from a GLUE-format folder (`data_dir/<task>/train.tsv`, `dev.tsv`; CoLA's raw release
files too) or a `datasets` source with one config per task. For every seed a fresh copy of the model gets
a randomly initialised two-class head (transformers' `AutoModelForSequenceClassification`: the pooled first
token of an encoder, the last token of a decoder) and is fine-tuned with AdamW and a linear warm-up/decay;
the dev split is scored after the last epoch. Metrics are GLUE's: Matthews correlation for CoLA, accuracy
for SST-2 and RTE, accuracy and F1 for MRPC; the mean over seeds and the sample standard deviation are
reported, and `score` is the mean over tasks of each task's main number (MRPC: the mean of accuracy and F1).
"""

from __future__ import annotations

import csv
import logging
import random
import re
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from datasets import load_dataset
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_f1_score,
    binary_matthews_corrcoef,
)
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    get_linear_schedule_with_warmup,
)

from core.errors import DataError, raise_if_any
from evaluation.model import LoadedModel
from evaluation.result import SuiteResult

DEFAULT_MAX_LENGTH = 128
SPLITS = {"train": "train", "dev": "validation"}  # our split name -> the `datasets` split


@dataclass
class Options:
    """How to fine-tune and score (see the module docstring).

    Args:
        tasks: GLUE tasks: cola, sst2, mrpc, rte (case and punctuation ignored: SST-2 = sst2).
        data_dir: a folder of GLUE task folders (CoLA/, SST-2/, MRPC/, RTE/) with train and dev TSVs,
            e.g. ../shared/data/glue.
        hf_dataset: a `datasets` source instead of data_dir: a config per task, splits train and
            validation (nyu-mll/glue).
        seeds: one fine-tuning run per seed and task; the mean and sample standard deviation over seeds are reported.
        epochs: passes over each task's training set.
        lr: peak AdamW learning rate, reached after the warm-up and decayed linearly to 0.
        warmup_ratio: share of the optimiser steps spent warming up linearly from 0.
        weight_decay: AdamW weight decay of the weight matrices (not of biases and norms).
        batch_size: examples per optimiser step and per evaluation batch.
        max_length: tokens per example, longer ones cut (a pair's longer text first); None = min(128,
            the model's context).
        max_train_examples: train on a fixed random subset of this many examples, the same for every seed; None = all.
        max_eval_examples: score a fixed random subset of this many dev examples; None = all.
        accelerator: Lightning accelerator for fine-tuning: auto, cpu, gpu, ...
    """

    tasks: list[str] = field(default_factory=lambda: ["cola", "sst2", "mrpc", "rte"])
    data_dir: str | None = None
    hf_dataset: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 3
    lr: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    batch_size: int = 32
    max_length: int | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    accelerator: str = "auto"


@dataclass(frozen=True)
class Task:
    name: str  # the metric prefix and the `datasets` config, e.g. "sst2"
    folder: str  # the GLUE folder name, e.g. "SST-2"
    columns: tuple[str, ...] | tuple[int, ...]  # text(s) then label: header names, or positions in a headerless file
    hf_columns: tuple[str, ...]  # the same in the `datasets` layout
    metrics: tuple[str, ...]  # what GLUE reports for the task
    main: tuple[str, ...]  # averaged into the task's headline number
    train_files: tuple[tuple[str, ...], ...] = (("train.tsv",),)  # alternatives, each a set of files read together
    dev_files: tuple[tuple[str, ...], ...] = (("dev.tsv",),)
    labels: tuple[tuple[str, int], ...] = (("0", 0), ("1", 1))  # label as written -> class

    @property
    def main_name(self) -> str:
        return f"({'+'.join(self.main)})/{len(self.main)}" if len(self.main) > 1 else self.main[0]


TASKS = {
    "cola": Task(
        "cola",
        "CoLA",
        (3, 1),
        ("sentence", "label"),
        ("mcc",),
        ("mcc",),
        train_files=(("train.tsv",), ("in_domain_train.tsv",)),
        dev_files=(("dev.tsv",), ("in_domain_dev.tsv", "out_of_domain_dev.tsv")),
    ),
    "sst2": Task("sst2", "SST-2", ("sentence", "label"), ("sentence", "label"), ("acc",), ("acc",)),
    "mrpc": Task(
        "mrpc",
        "MRPC",
        ("#1 String", "#2 String", "Quality"),
        ("sentence1", "sentence2", "label"),
        ("acc", "f1"),
        ("acc", "f1"),
    ),
    "rte": Task(
        "rte",
        "RTE",
        ("sentence1", "sentence2", "label"),
        ("sentence1", "sentence2", "label"),
        ("acc",),
        ("acc",),
        labels=(("0", 0), ("1", 1), ("entailment", 0), ("not_entailment", 1)),  # HF layout and original GLUE
    ),
}


@dataclass
class Examples:
    """One split of one task."""

    texts: list[tuple[str, ...]]  # one or two texts per example
    labels: list[int]  # 0 or 1


def canonical(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def task_named(name: str) -> Task:
    task = TASKS.get(canonical(name))
    if task is None:
        raise DataError(f"glue.tasks: unknown task {name!r}; known: {', '.join(TASKS)}")
    return task


def check_options(options: Options, context_length: int) -> None:
    errors = []
    if (options.data_dir is None) == (options.hf_dataset is None):
        errors.append("glue: give exactly one of data_dir and hf_dataset")
    if not options.tasks:
        errors.append("glue.tasks: no task given")
    if not options.seeds:
        errors.append("glue.seeds: no seed given")
    for key in ("epochs", "batch_size", "max_train_examples", "max_eval_examples"):
        value = getattr(options, key)
        if value is not None and value < 1:
            errors.append(f"glue.{key} must be >= 1, got {value}")
    if options.max_length is not None and not 8 <= options.max_length <= context_length:
        errors.append(
            f"glue.max_length must be in [8, {context_length}] (the model's context), got {options.max_length}"
        )
    if not 0 <= options.warmup_ratio <= 1:
        errors.append(f"glue.warmup_ratio must be in [0, 1], got {options.warmup_ratio}")
    raise_if_any(errors)


# --- reading the data ---------------------------------------------------------------------------


def task_folder(data_dir: str, task: Task) -> Path:
    """The task's folder under data_dir, its name matched without case and punctuation (sst2 = SST-2)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"glue.data_dir: {data_dir!r} is not a folder")
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and canonical(folder.name) == task.name:
            return folder
    raise DataError(f"glue.data_dir: {data_dir!r} has no folder for task {task.name} (expected {task.folder}/)")


def split_files(folder: Path, task: Task, split: str) -> list[Path]:
    """The first alternative whose files all exist, e.g. CoLA dev = dev.tsv, else in_domain_dev + out_of_domain_dev."""
    alternatives = task.train_files if split == "train" else task.dev_files
    for names in alternatives:
        if all((folder / name).is_file() for name in names):
            return [folder / name for name in names]
    expected = " or ".join(" + ".join(names) for names in alternatives)
    raise DataError(f"{folder}: no {split} split for task {task.name} (expected {expected})")


def column_positions(path: Path, header: list[str], task: Task) -> list[int]:
    missing = [name for name in task.columns if name not in header]
    if missing:
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))} in the header (columns: {header})")
    return [header.index(name) for name in task.columns]


def label_of(value: str, task: Task, where: str) -> int:
    labels = dict(task.labels)
    if value.strip() not in labels:
        raise DataError(f"{where}: label {value!r} is not one of {', '.join(labels)}")
    return labels[value.strip()]


def read_tsv(path: Path, task: Task) -> Examples:
    """GLUE TSV: tab-separated, quotes taken literally (MRPC has unbalanced ones), a UTF-8 BOM ignored."""
    with path.open(encoding="utf-8-sig", newline="") as file:
        lines = enumerate(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE), 1)
        rows = [(number, row) for number, row in lines if row]  # (line number, fields), blank lines dropped
    if isinstance(task.columns[0], str):
        positions = column_positions(path, rows[0][1] if rows else [], task)
        rows = rows[1:]
    else:
        positions = list(task.columns)
    examples = Examples([], [])
    for number, row in rows:
        if len(row) <= max(positions):
            raise DataError(f"{path}:{number}: {len(row)} tab-separated fields, expected at least {max(positions) + 1}")
        examples.texts.append(tuple(row[p] for p in positions[:-1]))
        examples.labels.append(label_of(row[positions[-1]], task, f"{path}:{number}"))
    if not examples.labels:
        raise DataError(f"{path}: no examples")
    return examples


def read_split(data_dir: str, task: Task, split: str) -> Examples:
    """`split` ("train" or "dev") of the task's GLUE folder; several files are concatenated."""
    parts = [read_tsv(path, task) for path in split_files(task_folder(data_dir, task), task, split)]
    return Examples([t for p in parts for t in p.texts], [y for p in parts for y in p.labels])


def load_hf_split(source: str, task: Task, split: str) -> Examples:
    """`split` of config `task.name` of a `datasets` source (train, or validation for dev)."""
    where = f"glue.hf_dataset {source!r} (config {task.name!r}, split {SPLITS[split]!r})"
    try:
        dataset = load_dataset(source, task.name, split=SPLITS[split])
    except Exception as err:  # datasets raises many types; the user needs the source named
        raise DataError(f"{where}: could not load: {err}") from err
    missing = [c for c in task.hf_columns if c not in dataset.column_names]
    if missing:
        raise DataError(f"{where}: no column {', '.join(map(repr, missing))} (columns: {dataset.column_names})")
    columns = [dataset[c] for c in task.hf_columns]
    texts = list(zip(*columns[:-1]))
    labels = [label_of(str(value), task, f"{where} row {i}") for i, value in enumerate(columns[-1])]
    if not labels:
        raise DataError(f"{where}: no examples")
    return Examples(texts, labels)


def subset(examples: Examples, limit: int | None) -> Examples:
    """A fixed random subset (seed 0, file order kept): every fine-tuning seed sees the same examples."""
    if limit is None or limit >= len(examples.labels):
        return examples
    keep = sorted(random.Random(0).sample(range(len(examples.labels)), limit))
    return Examples([examples.texts[i] for i in keep], [examples.labels[i] for i in keep])


def load_task(task: Task, options: Options) -> dict[str, Examples]:
    def read(split: str) -> Examples:
        if options.data_dir is not None:
            return read_split(options.data_dir, task, split)
        return load_hf_split(options.hf_dataset, task, split)

    limits = {"train": options.max_train_examples, "dev": options.max_eval_examples}
    return {split: subset(read(split), limit) for split, limit in limits.items()}


# --- encoding -----------------------------------------------------------------------------------


def longest_first(lengths: list[int], budget: int) -> list[int]:
    """Tokens to keep of each text so that they fit the budget, cutting the longest one first."""
    kept = list(lengths)
    while sum(kept) > budget:
        kept[kept.index(max(kept))] -= 1
    return kept


def encode(examples: Examples, loaded: LoadedModel, max_length: int) -> list[dict[str, Any]]:
    """Features for `DataCollatorWithPadding`. A tokenizer with a template of its own (BERT, RoBERTa) uses it;
    one without (masklab's BPE) gets `<bos> a <eos> [<bos> b <eos>]`, as pre-training packs documents."""
    tokenizer, labels = loaded.tokenizer, [{"label": y} for y in examples.labels]
    columns = [list(column) for column in zip(*examples.texts)]  # [texts of example 0, ...] per column
    if tokenizer.num_special_tokens_to_add(pair=len(columns) == 2) > 0:
        token_types = getattr(loaded.model.config, "type_vocab_size", 0) > 1
        encoded = tokenizer(*columns, truncation=True, max_length=max_length, return_token_type_ids=token_types)
        return [dict(zip(encoded.keys(), values)) | y for values, y in zip(zip(*encoded.values()), labels)]
    pieces = [tokenizer(column, add_special_tokens=False)["input_ids"] for column in columns]
    bos, eos = loaded.vocab.bos_id, loaded.vocab.eos_id
    features = []
    for texts, y in zip(zip(*pieces), labels):
        kept = longest_first([len(t) for t in texts], max_length - 2 * len(texts))
        features.append({"input_ids": [i for t, k in zip(texts, kept) for i in (bos, *t[:k], eos)]} | y)
    return features


# --- fine-tuning --------------------------------------------------------------------------------


class Classifier(L.LightningModule):
    """Fine-tunes a sequence classifier; `test` on the dev split keeps its predictions."""

    def __init__(self, model: PreTrainedModel, options: Options) -> None:
        super().__init__()
        self.model, self.options = model.train(), options  # from_pretrained leaves it in eval mode: no dropout
        self.predictions: list[Tensor] = []
        self.labels: list[Tensor] = []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def on_test_epoch_start(self) -> None:
        self.predictions, self.labels = [], []

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.model(**batch).logits  # [B, 2]
        self.predictions.append(logits.argmax(-1).cpu())  # [B]
        self.labels.append(batch["labels"].cpu())  # [B]

    def configure_optimizers(self):
        decayed = [p for p in self.model.parameters() if p.ndim >= 2]  # weight matrices, not biases and norms
        others = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [
            {"params": decayed, "weight_decay": self.options.weight_decay},
            {"params": others, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.options.lr)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.options.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def binary_scores(predictions: Tensor, labels: Tensor) -> dict[str, float]:
    """GLUE's metrics of [N] 0/1 predictions: accuracy, F1 of class 1, Matthews correlation."""
    return {
        "acc": binary_accuracy(predictions, labels).item(),
        "f1": binary_f1_score(predictions, labels).item(),
        "mcc": binary_matthews_corrcoef(predictions, labels).item(),
    }


@contextmanager
def quiet() -> Iterator[None]:
    """Mute what every seed would repeat: the new head's "missing weights" report and Lightning's set-up lines."""
    levels = {"transformers": logging.ERROR, "lightning.pytorch": logging.WARNING, "lightning.fabric": logging.WARNING}
    before = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def fine_tune(
    folder: Path, data: dict[str, list[dict]], collate: DataCollatorWithPadding, seed: int, options: Options
) -> dict[str, float]:
    """One seed: a fresh head on the pre-trained weights, `epochs` passes over train, then the dev scores."""
    L.seed_everything(seed, workers=True, verbose=False)  # the head's initialisation and the batch order
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, local_files_only=True)
    module = Classifier(model, options)
    trainer = L.Trainer(
        max_epochs=options.epochs,
        accelerator=options.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train = DataLoader(data["train"], batch_size=options.batch_size, shuffle=True, collate_fn=collate)
    dev = DataLoader(data["dev"], batch_size=options.batch_size, collate_fn=collate)
    trainer.fit(module, train_dataloaders=train)
    trainer.test(module, dataloaders=dev, verbose=False)  # a test, not a validation, step: fit has no val loop
    return binary_scores(torch.cat(module.predictions), torch.cat(module.labels))


@contextmanager
def pretrained_folder(loaded: LoadedModel) -> Iterator[Path]:
    """The model's hf_model folder; a model still in training is saved to a temporary one first."""
    if loaded.path is not None:
        yield loaded.path
        return
    with tempfile.TemporaryDirectory(prefix="glue-") as folder:
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
        yield Path(folder)


# --- results ------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main_scores(task: Task, per_seed: list[dict[str, float]]) -> list[float]:
    """The task's headline number for each seed (MRPC: the mean of accuracy and F1, as GLUE ranks it)."""
    return [statistics.fmean(scores[m] for m in task.main) for scores in per_seed]


def summarise(tasks: list[Task], per_seed: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """`score` (and `score_std` over seeds) first, then `<task>/<metric>` and `<task>/<metric>_std`."""
    mains = [main_scores(task, per_seed[task.name]) for task in tasks]  # [task][seed]
    score, score_std = mean_std([statistics.fmean(by_seed) for by_seed in zip(*mains)])
    metrics = {"score": score, "score_std": score_std}
    for task in tasks:
        for name in task.metrics:
            mean, std = mean_std([scores[name] for scores in per_seed[task.name]])
            metrics[f"{task.name}/{name}"], metrics[f"{task.name}/{name}_std"] = mean, std
    return metrics


def scores_figure(tasks: list[Task], per_seed: dict[str, list[dict[str, float]]]) -> Figure:
    stats = [mean_std(main_scores(task, per_seed[task.name])) for task in tasks]
    figure = Figure(figsize=(max(4.5, 1.8 * len(tasks) + 1.2), 3.5))  # wide enough for the title
    axes = figure.subplots()
    names = [f"{t.name}: {t.main_name}\n{mean:.3f} ± {std:.3f}" for t, (mean, std) in zip(tasks, stats)]
    axes.bar(names, [mean for mean, _ in stats], yerr=[std for _, std in stats], capsize=5)
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_ylabel("dev score")
    seeds = len(next(iter(per_seed.values())))
    axes.set_title(f"GLUE dev: mean ± std over {seeds} seed{'s' * (seeds > 1)}")
    figure.tight_layout()
    return figure


def markdown_table(tasks: list[Task], metrics: dict[str, float], seeds: int) -> str:
    keys = [(t.name, name, f"{t.name}/{name}") for t in tasks for name in t.metrics]
    keys.append(("**score**", "mean of main metrics", "score"))
    rows = [(task, name, metrics[key], metrics[f"{key}_std"]) for task, name, key in keys]
    return "\n".join(
        ["| task | metric | mean ± std | seeds |", "| --- | --- | --- | --- |"]
        + [f"| {task} | {name} | {mean:.3f} ± {std:.3f} | {seeds} |" for task, name, mean, std in rows]
    )


def metric_names(options: Options, objective: str) -> list[str]:
    """The metrics `run` writes, each with its spread over seeds, so a study can check its metric names."""
    tasks = [TASKS[canonical(name)] for name in options.tasks if canonical(name) in TASKS]
    names = ["score", *(f"{task.name}/{metric}" for task in tasks for metric in task.metrics)]
    return [n for name in names for n in (name, f"{name}_std")]


def run(loaded: LoadedModel, options: Options) -> SuiteResult:
    check_options(options, loaded.context_length)
    tasks = list(dict.fromkeys(task_named(name) for name in options.tasks))  # SST-2 and sst2 run once
    if loaded.model.config.pad_token_id is None:
        raise DataError(
            f"{loaded.path or 'the model'}: its config has no pad_token_id, which sequence classification needs"
        )
    raw = {task.name: load_task(task, options) for task in tasks}  # every file is checked before any training
    max_length = options.max_length or min(DEFAULT_MAX_LENGTH, loaded.context_length)
    collate = DataCollatorWithPadding(loaded.tokenizer)
    per_seed: dict[str, list[dict[str, float]]] = {}
    with pretrained_folder(loaded) as folder:
        for task in tasks:
            data = {split: encode(examples, loaded, max_length) for split, examples in raw[task.name].items()}
            with quiet():
                per_seed[task.name] = [fine_tune(folder, data, collate, seed, options) for seed in options.seeds]
    metrics = summarise(tasks, per_seed)
    details = {
        "seeds": list(options.seeds),
        "examples": {name: {split: len(e.labels) for split, e in splits.items()} for name, splits in raw.items()},
        "per_seed": {t.name: {m: [s[m] for s in per_seed[t.name]] for m in t.metrics} for t in tasks},
    }
    table = markdown_table(tasks, metrics, len(options.seeds))
    return SuiteResult(metrics, {"scores": scores_figure(tasks, per_seed)}, table, details)
