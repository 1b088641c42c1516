"""Where pre-training text comes from: the built-in corpus, local text files, or `datasets`."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

from datasets import Dataset, load_dataset, load_from_disk

from core.errors import DataError
from datamodules.corpus import BuiltinCorpus

TEXT_SUFFIXES = (".txt", ".txt.gz")  # what a folder contributes (a file named on its own is read whatever its name)
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
BLANK_LINE = re.compile(r"\n[^\S\n]*\n")  # a line break, a line of only whitespace, a line break
# Bumped when the way raw text becomes documents or tokens changes, so cached tokenizers and blocks are rebuilt.
TEXT_RULES = "paragraphs-at-whitespace-lines;special-token-strings-are-text"


def stable_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def text_files(path: str, key: str) -> list[Path]:
    """A text file, or every `.txt` / `.txt.gz` file under a folder (sorted, so the order is reproducible):
    a folder's README or SOURCE.md is provenance, not corpus text."""
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


def read_text(file: Path, key: str) -> str:
    """The file's text (gunzipped for .gz), strictly UTF-8: a bad byte is named by its offset,
    not replaced, so a wrongly encoded corpus cannot train silently on mojibake."""
    raw = gzip.decompress(file.read_bytes()) if file.name.endswith(".gz") else file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = "of the decompressed text " if file.name.endswith(".gz") else ""
        raise DataError(
            f"{key}: {file} is not UTF-8 text: byte 0x{raw[err.start]:02x} at byte offset {err.start} "
            f"{where}({err.reason})"
        ) from None


def paragraphs(text: str) -> list[str]:
    """Paragraphs split at blank lines, a line holding only whitespace counting as blank
    (WikiText's blank lines are a single space); each stripped at its edges, empty ones dropped."""
    return [p.strip() for p in BLANK_LINE.split(text) if p.strip()]


def load_text_files(files: list[Path], key: str) -> Dataset:
    """One example per paragraph of every file, in file order."""
    texts = [paragraph for file in files for paragraph in paragraphs(read_text(file, key))]
    if not texts:
        named = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise DataError(f"{key}: {named} {'holds' if len(files) == 1 else 'hold'} no text (empty corpus)")
    return Dataset.from_dict({"text": texts})


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


def builtin_dataset(seed: int, documents: int, split: str, variant: str = "default") -> Dataset:
    return Dataset.from_dict({"text": BuiltinCorpus(seed).documents(documents, split, variant)})
