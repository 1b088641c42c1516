"""Where pre-training text comes from: the built-in corpus, local text files, or `datasets`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datasets import Dataset, load_dataset, load_from_disk

from datamodules.corpus import BuiltinCorpus
from datamodules.errors import DataError

TEXT_SUFFIXES = (".txt", ".txt.gz", ".raw", ".md")
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


def stable_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def text_files(path: str, key: str) -> list[Path]:
    """A text file, or every text file under a folder (sorted, so the order is reproducible)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"{key}: {path!r} does not exist")
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise DataError(f"{key}: folder {path!r} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    return files


def files_fingerprint(files: list[Path]) -> str:
    return stable_hash([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def load_text_files(files: list[Path], key: str) -> Dataset:
    """One example per paragraph (blank-line separated), empty ones dropped."""
    dataset = load_dataset("text", data_files=[str(f) for f in files], sample_by="paragraph", split="train")
    dataset = dataset.filter(lambda batch: [bool(t.strip()) for t in batch["text"]], batched=True)
    if len(dataset) == 0:
        raise DataError(f"{key}: {', '.join(str(f) for f in files[:3])} contain no text (empty corpus)")
    return dataset


def open_hf_split(name: str, config: str | None, split: str) -> Dataset:
    """A `datasets` source: a folder written by `save_to_disk`, or anything `load_dataset` takes."""
    try:
        folder = Path(name)
        if folder.is_dir() and any((folder / f).exists() for f in SAVED_DATASET_MARKERS):
            loaded = load_from_disk(name)
            return loaded[split] if hasattr(loaded, "keys") else loaded
        return load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types; the user needs the source named
        raise DataError(
            f"data.hf_dataset: could not load {name!r} (config {config!r}, split {split!r}): {err}"
        ) from err


def load_hf_dataset(name: str, config: str | None, split: str, text_column: str) -> Dataset:
    """The text column of a `datasets` source, renamed "text"."""
    dataset = open_hf_split(name, config, split)
    if text_column not in dataset.column_names:
        raise DataError(
            f"data.text_column: {text_column!r} is not a column of {name!r}; columns: {dataset.column_names}"
        )
    dataset = dataset.select_columns([text_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    if len(dataset) == 0:
        raise DataError(f"data.hf_dataset: {name!r} split {split!r} is empty")
    return dataset


def builtin_dataset(seed: int, documents: int, split: str) -> Dataset:
    return Dataset.from_dict({"text": BuiltinCorpus(seed).documents(documents, split)})
