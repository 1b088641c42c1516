"""The pieces both datamodules compose: the policy and its ratio, the tokenizer, the shared
config checks, and DataLoaders that shard, reshuffle and resume. Pre-training and fine-tuning
differ in their text and their samples, not in these."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from transformers import PreTrainedTokenizerBase

from core.errors import ConfigError, DataError
from datamodules.masking import Policy, Vocab
from datamodules.sources import stable_hash
from datamodules.tokenizer import cached_bpe, load_tokenizer, vocab_of

DATA_FILES = "data_files.json"  # in the run dir: the files each split reads
T = TypeVar("T")  # what a datamodule reads from its sources: documents or (prompt, answer) pairs


def common_config_errors(**args) -> list[str]:
    """Problems with the init arguments every datamodule has, each naming its key."""
    errors = []
    for key in ("mask_ratio", "val_fraction", "val_mask_ratio"):
        value = args.get(key)
        if value is not None and not 0.0 <= value <= 1.0:
            errors.append(f"data.{key} must be in [0, 1], got {value}")
    for key in ("block_size", "batch_size", "vocab_size", "builtin_documents"):
        value = args.get(key)
        if value is not None and value < 1:
            errors.append(f"data.{key} must be >= 1, got {value}")
    if args.get("num_workers", 0) < 0:
        errors.append(f"data.num_workers must be >= 0, got {args['num_workers']}")
    if args.get("data_path") and args.get("hf_dataset"):
        errors.append("data.data_path and data.hf_dataset are both set; choose one source")
    for key in ("data_path", "val_data_path", "tokenizer_path"):
        if args.get(key) and not Path(args[key]).exists():
            errors.append(f"data.{key}: {args[key]!r} does not exist")
    return errors


def adopt_policy(policy: Policy, protocol: type[Policy], other_datamodule: str, mask_ratio: float | None) -> Policy:
    """The datamodule's policy, checked and given its ratio. Pre-training and fine-tuning policies take
    different blocks, so the other kind is refused; `data.mask_ratio` goes to the policy, the ratio's one
    home (None = the policy's default), and a policy without a ratio refuses one, so a config cannot
    believe it set a budget it did not."""
    if not isinstance(policy, protocol):
        raise ConfigError(
            f"data.masking={type(policy).__name__} is not a {protocol.__name__}: it belongs with {other_datamodule}"
        )
    if policy.uses_ratio:
        policy.ratio = policy.default_ratio if mask_ratio is None else mask_ratio
    elif mask_ratio is not None:
        raise ConfigError(
            f"data.mask_ratio={mask_ratio} is set, but data.masking={type(policy).__name__} has no ratio "
            "(its budget is set by the text): remove data.mask_ratio"
        )
    return policy


@dataclass(frozen=True)
class Sources:
    """Where a datamodule's data comes from: files (`data_path`), a `datasets` source (`hf_dataset`)
    or the built-in generator; and its validation split: a file or split of its own, else
    `val_fraction` held out. Pre-training and fine-tuning choose the same way and differ only in
    what they read from each, which `read` takes as functions."""

    data_path: str | None
    val_data_path: str | None
    hf_dataset: str | None
    hf_config: str | None
    hf_split: str
    hf_val_split: str | None

    def read(
        self,
        split: str,
        files: Callable[[str, str], T],
        hf: Callable[[str], T],
        builtin: Callable[[], T],
        holdout: Callable[[T], T],
    ) -> T:
        """The "train" or "validation" data: `files(path, key)` reads files, `hf(split_name)` a
        `datasets` split, `builtin()` the generator's split; `holdout(data)` takes this split's
        share of a source that has no validation of its own."""
        if self.data_path:
            if split == "validation" and self.val_data_path:
                return files(self.val_data_path, "data.val_data_path")
            data = files(self.data_path, "data.data_path")
            return holdout(data) if not self.val_data_path else data
        if self.hf_dataset:
            if split == "validation" and self.hf_val_split:
                return hf(self.hf_val_split)
            data = hf(self.hf_split)
            return holdout(data) if not self.hf_val_split else data
        return builtin()

    def files(self, list_files: Callable[[str, str], list[Path]]) -> dict[str, object] | None:
        """Which files each split reads (`list_files(path, key)` lists a file or folder as the reader
        does), or None when the data is not files: what a run dir records in `data_files.json`."""
        if not self.data_path:
            return None
        train = [str(f) for f in list_files(self.data_path, "data.data_path")]
        if not self.val_data_path:
            return {"train": train, "validation": "held out from the train files (data.val_fraction)"}
        return {"train": train, "validation": [str(f) for f in list_files(self.val_data_path, "data.val_data_path")]}


def check_mask_token(policy: Policy, tokenizer: PreTrainedTokenizerBase, vocab: Vocab) -> None:
    if policy.needs_mask_token and vocab.mask_id is None:
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} has no mask token, but {type(policy).__name__} needs one"
        )


class TokenizerSource:
    """A datamodule's tokenizer: a local folder, or a byte-level BPE trained once on the training
    text and cached under a key of what it was trained on.

    Args:
        path: a local HF tokenizer folder; None = train the BPE.
        vocab_size: size of the trained BPE.
        cache_dir: where trained tokenizers are cached.
        source_key: the key of the training text (called only when a BPE is trained or looked up).
        texts: the training text (called only when the BPE is not cached yet).
        build: makes the tokenizer in memory instead of training a BPE (a corpus with its own id
            vocabulary, such as `recall`); a `path` still wins.
    """

    def __init__(
        self,
        path: str | None,
        vocab_size: int,
        cache_dir: Path,
        source_key: Callable[[], str],
        texts: Callable[[], Sequence[str]],
        build: Callable[[], PreTrainedTokenizerBase] | None = None,
    ) -> None:
        self.path, self.vocab_size, self.cache_dir = path, vocab_size, cache_dir
        self.source_key, self.texts, self.build = source_key, texts, build

    @cached_property
    def key(self) -> str:
        """Names this tokenizer in cache keys of what is tokenised with it."""
        return self.path or stable_hash("bpe", self.source_key(), self.vocab_size)

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self.path:
            return load_tokenizer(self.path)
        if self.build is not None:
            return self.build()
        return cached_bpe(self.cache_dir, self.key, self.texts, self.vocab_size)

    @cached_property
    def vocab(self) -> Vocab:
        return vocab_of(self.tokenizer)

    @cached_property
    def fingerprint(self) -> str:
        """The tokenizer by its vocabulary, wherever it was loaded from or trained."""
        return stable_hash(sorted(self.tokenizer.get_vocab().items()))

    def describe(self, corpus: str) -> str:
        return repr(self.path) if self.path else f"a {self.vocab_size}-token BPE trained on {corpus}"

    def model_vocab(self) -> dict:
        """What the model needs of the tokenizer (ids for its config, token strings for n-hot
        embeddings); linked to `model.vocab` by the CLI."""
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab.size)))
        return {
            **self.vocab.as_dict(),
            "tokens": ["" if s else t for t, s in zip(tokens, self.vocab.is_special.tolist())],
        }


class TokenizedDataModule(L.LightningDataModule):
    """A datamodule whose tokenizer comes from a `TokenizerSource`: what the entry point and the
    evaluation read from either kind (the CLI links `model_vocab` into the model). A subclass
    gives `source_key` (names its data in cache keys) and `_texts(split)` (a dataset with a
    "text" column: what a new BPE is trained on)."""

    builtin_documents: int  # the subclass's: names the built-in corpus in `corpus`

    def __init__(
        self,
        sources: Sources,
        tokenizer_path: str | None,
        vocab_size: int,
        cache_dir: str,
        batch_size: int,
        num_workers: int,
        pin_memory: bool | None,
        seed: int,
        build_tokenizer: Callable[[], PreTrainedTokenizerBase] | None = None,
    ) -> None:
        super().__init__()
        self.sources, self.batch_size, self.seed = sources, batch_size, seed
        self.cache_dir = Path(cache_dir)
        self.tokenizer_source = TokenizerSource(
            tokenizer_path,
            vocab_size,
            self.cache_dir,
            lambda: self.source_key,
            lambda: self._texts("train")["text"],
            build_tokenizer,
        )
        self.loaders = Loaders(batch_size, num_workers, pin_memory, seed)

    def record_files(self, list_files: Callable[[str, str], list[Path]]) -> None:
        """Write the files the data comes from into the run dir (`data_files.json`), so what a folder
        contributed is on record, not a guess; nothing when the data is not files or there is no run."""
        files = self.sources.files(list_files)
        if files is None or self.trainer is None:
            return
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks, rank 0 writes
        if not self.trainer.is_global_zero or log_dir is None:
            return
        run_dir = Path(log_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / DATA_FILES).write_text(json.dumps(files, indent=2) + "\n")

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.tokenizer_source.tokenizer

    @property
    def vocab(self) -> Vocab:
        return self.tokenizer_source.vocab

    @property
    def model_vocab(self) -> dict:
        return self.tokenizer_source.model_vocab()

    @property
    def corpus(self) -> str:
        """The training text as the user named it."""
        sources = self.sources
        if sources.data_path:
            return f"data.data_path {str(Path(sources.data_path).resolve())!r}"
        if sources.hf_dataset:
            return f"data.hf_dataset {sources.hf_dataset!r} ({sources.hf_config}, {sources.hf_split})"
        return f"the built-in corpus ({self.builtin_documents} documents, seed {self.seed})"

    def state_dict(self) -> dict[str, str]:
        """What the run trains on. Lightning saves it in every checkpoint, so that a resume on another
        tokenizer or corpus is refused before it trains (experiments/checkpoints.py)."""
        return {
            "tokenizer": self.tokenizer_source.describe(self.corpus),
            "tokenizer_hash": self.tokenizer_source.fingerprint,
            "corpus": self.corpus,
        }


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (each rank its own shard, reshuffled by epoch) that can skip the
    samples an interrupted epoch already trained on, so a resumed run sees the same batches."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class Loaders:
    """Builds a datamodule's DataLoaders: sharded by rank, reshuffled by epoch, resumed mid-epoch,
    with worker seeds from a private generator."""

    def __init__(self, batch_size: int, num_workers: int, pin_memory: bool | None, seed: int) -> None:
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory

    def train(self, dataset: Dataset, collate_fn: Callable, trainer: L.Trainer | None) -> DataLoader:
        sampler = self._sampler(dataset, True, trainer)
        sampler.skip = batches_done_this_epoch(trainer) * self.batch_size
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=True,
            generator=self._private_generator(),
        )

    def validation(self, dataset: Dataset, trainer: L.Trainer | None, collate_fn: Callable | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._sampler(dataset, False, trainer),
            collate_fn=collate_fn,
            pin_memory=self.pin_memory,
            generator=self._private_generator(),
        )

    def _sampler(self, dataset: Dataset, shuffle: bool, trainer: L.Trainer | None) -> ResumableSampler:
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        return ResumableSampler(
            dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed, drop_last=shuffle
        )

    def _private_generator(self) -> torch.Generator:
        """DataLoaders draw their worker seeds from this instead of the global RNG, so opening
        one does not shift the dropout RNG (and a resumed run matches an uninterrupted one)."""
        return torch.Generator().manual_seed(self.seed)


def batches_done_this_epoch(trainer: L.Trainer | None) -> int:
    """Batches of the current epoch a resumed run has already trained on."""
    if trainer is None or not trainer.fit_loop.restarting:
        return 0
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed
