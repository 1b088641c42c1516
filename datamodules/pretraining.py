"""`PretrainingDataModule`: text -> tokenizer -> packed blocks -> masked batches."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset as HFDataset
from torch.utils.data import DataLoader, Dataset

from core.errors import DataError, raise_if_any
from datamodules.collate import MaskingCollator
from datamodules.corpus import VARIANTS
from datamodules.corpus_stats import STATS_VERSION, CorpusStats, count_corpus
from datamodules.loading import (
    Loaders,
    TokenizedDataModule,
    TokenizerSource,
    bind_ratio,
    check_mask_token,
    check_protocol,
    common_config_errors,
)
from datamodules.masking import MaskingPolicy, TokenBlock
from datamodules.packing import pack, tokenize
from datamodules.policies.standard import NoMask
from datamodules.recall import RecallConfig, generate, recall_tokenizer
from datamodules.sources import (
    TEXT_RULES,
    builtin_dataset,
    files_fingerprint,
    load_hf_dataset,
    load_text_files,
    stable_hash,
    text_files,
)

RECALL = "recall"
BUILTIN_VARIANTS = sorted([*VARIANTS, RECALL])


class IndexedBlocks(Dataset):
    """Packed blocks; each sample carries its index so the collate can seed its mask by it."""

    def __init__(self, blocks: np.ndarray) -> None:
        self.blocks = blocks  # [N, L] int32

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, torch.from_numpy(np.asarray(self.blocks[index], dtype=np.int64))


class TensorDictDataset(Dataset):
    """Rows of pre-masked validation tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}


class PretrainingDataModule(TokenizedDataModule):
    """Pre-training text for every objective; the masking policy is the only thing that differs.

    Args:
        masking: the policy that hides tokens (e.g. RandomMLMMask, MEAPInputMask); None = no
            masking, plain next-token prediction.
        mask_ratio: share of tokens the policy masks at the start of training, handed to the policy
            (the ratio's one home); None = the policy's default (0.15). A policy without a ratio
            (e.g. PenultimateTokenMask, NoMask) refuses one.
        data_path: a text file or a folder of text files (.txt, .txt.gz); None = built-in corpus.
        val_data_path: validation text; None = hold out `val_fraction` of the documents.
        hf_dataset: a `datasets` source instead: hub id or a local `save_to_disk` folder.
        hf_config: the `datasets` config name.
        hf_split: the split to train on.
        hf_val_split: the split to validate on; None = hold out `val_fraction`.
        text_column: the column holding the text.
        builtin_documents: documents the built-in corpus generates for training.
        builtin_variant: which built-in corpus: "default" (language-like text with a few facts
            recalled late), "retrieval_dense" (short documents of facts, recalls and the
            retrieval suite's prompt forms) or "recall" (associative recall over ids, its own
            vocabulary, one sequence per block: the retrieval probe a CPU-sized decoder learns).
        recall: the recall corpus' options (pairs, queries, key/value vocabularies, filler,
            distance); builtin_documents counts its training sequences.
        val_fraction: share of documents held out for validation when no validation source is given.
        tokenizer_path: a local HF tokenizer folder; None = train a byte-level BPE on the training text.
        vocab_size: vocabulary size of the trained BPE.
        block_size: tokens per packed training sequence.
        batch_size: sequences per batch on each device.
        num_workers: DataLoader worker processes (masking runs in them).
        pin_memory: DataLoaders hand out batches in page-locked memory, so the copy to the GPU
            overlaps compute; None = when a GPU is available.
        val_mask_ratio: MLM only: ratio of the fixed-seed uniform mask every MLM variant is validated on.
        seed: seed of the corpus, the split, the shuffling and the masks.
        cache_dir: where tokenizers and packed blocks are cached.
    """

    def __init__(
        self,
        masking: MaskingPolicy | None = None,
        mask_ratio: float | None = None,
        data_path: str | None = None,
        val_data_path: str | None = None,
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_split: str = "train",
        hf_val_split: str | None = None,
        text_column: str = "text",
        builtin_documents: int = 2000,
        builtin_variant: str = "default",
        recall: RecallConfig = RecallConfig(),
        val_fraction: float = 0.05,
        tokenizer_path: str | None = None,
        vocab_size: int = 4096,
        block_size: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        val_mask_ratio: float = 0.15,
        seed: int = 0,
        cache_dir: str = ".cache/masklab",
    ) -> None:
        super().__init__()
        raise_if_any(self.config_errors(**{k: v for k, v in locals().items() if k not in ("self", "__class__")}))
        self.policy = masking if masking is not None else NoMask()
        check_protocol(self.policy, MaskingPolicy, "datamodules.FineTuneDataModule")
        bind_ratio(self.policy, mask_ratio)
        self.data_path, self.val_data_path = data_path, val_data_path
        self.hf_dataset, self.hf_config, self.hf_split, self.hf_val_split = (
            hf_dataset,
            hf_config,
            hf_split,
            hf_val_split,
        )
        self.text_column = text_column
        self.builtin_documents = builtin_documents
        self.builtin_variant = builtin_variant
        self.recall = recall
        self.val_fraction = val_fraction
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_mask_ratio = val_mask_ratio
        self.seed = seed
        self.cache_dir = Path(cache_dir)
        self.tokenizer_source = TokenizerSource(
            tokenizer_path,
            vocab_size,
            self.cache_dir,
            lambda: self.source_key,
            lambda: self._texts("train")["text"],
            (lambda: recall_tokenizer(recall)) if self.is_recall else None,
        )
        self.loaders = Loaders(batch_size, num_workers, pin_memory, seed)

    @staticmethod
    def config_errors(**args) -> list[str]:
        """Every problem with these init arguments, each naming its key (empty when valid)."""
        errors = common_config_errors(**args)
        variant = args.get("builtin_variant", "default")
        if variant not in BUILTIN_VARIANTS:
            errors.append(f"data.builtin_variant must be one of {BUILTIN_VARIANTS}, got {variant!r}")
        if variant == RECALL:
            if args.get("data_path") or args.get("hf_dataset"):
                errors.append("data.builtin_variant='recall' is built in: unset data.data_path / data.hf_dataset")
            recall = args.get("recall")
            if not isinstance(recall, RecallConfig):  # the CLI's early check passes nested keys flat: "recall.pairs"
                recall = RecallConfig(**{k[len("recall.") :]: v for k, v in args.items() if k.startswith("recall.")})
            errors += recall.errors(args.get("block_size", 128))
        return errors

    @property
    def is_recall(self) -> bool:
        return self.builtin_variant == RECALL

    # ---- tokenizer ---------------------------------------------------------------------------

    @cached_property
    def source_key(self) -> str:
        if self.data_path:
            files = text_files(self.data_path, "data.data_path")
            val_files = text_files(self.val_data_path, "data.val_data_path") if self.val_data_path else []
            return stable_hash(
                "files",
                TEXT_RULES,
                files_fingerprint(files),
                files_fingerprint(val_files),
                self.val_fraction,
                self.seed,
            )
        if self.hf_dataset:
            return stable_hash(
                "hf", TEXT_RULES, self.hf_dataset, self.hf_config, self.hf_split, self.hf_val_split, self.text_column
            )
        return stable_hash("builtin", self.seed, self.builtin_documents, self.builtin_variant, self.recall)

    # ---- text and blocks ---------------------------------------------------------------------

    def _texts(self, split: str) -> HFDataset:
        if self.data_path:
            if split == "validation" and self.val_data_path:
                return load_text_files(text_files(self.val_data_path, "data.val_data_path"), "data.val_data_path")
            dataset = load_text_files(text_files(self.data_path, "data.data_path"), "data.data_path")
            return self._holdout(dataset, split) if not self.val_data_path else dataset
        if self.hf_dataset:
            if split == "validation" and self.hf_val_split:
                return load_hf_dataset(self.hf_dataset, self.hf_config, self.hf_val_split, self.text_column)
            dataset = load_hf_dataset(self.hf_dataset, self.hf_config, self.hf_split, self.text_column)
            return self._holdout(dataset, split) if not self.hf_val_split else dataset
        return builtin_dataset(self.seed, self._documents(split), split, self.builtin_variant)

    def _documents(self, split: str) -> int:
        """Built-in documents (recall sequences) of `split`; validation holds out `val_fraction` as many."""
        return self.builtin_documents if split == "train" else max(1, round(self.builtin_documents * self.val_fraction))

    def _holdout(self, dataset: HFDataset, split: str) -> HFDataset:
        if len(dataset) < 2:
            raise DataError(f"data: only {len(dataset)} document(s); cannot hold out a validation split")
        parts = dataset.train_test_split(test_size=self.val_fraction, seed=self.seed, shuffle=True)
        return parts["train" if split == "train" else "test"]

    def _blocks(self, split: str) -> np.ndarray:
        if self.is_recall:  # one sequence per block, generated in milliseconds: nothing to cache
            count = self._documents(split)
            return generate(self.recall, self.block_size, count, self.seed, split, self.vocab.bos_id).ids
        key = stable_hash(self.source_key, self.tokenizer_source.key, split, self.block_size)
        path = self.cache_dir / "blocks" / f"{key}.npy"
        if not path.exists():
            blocks = pack(
                tokenize(self._texts(split), self.tokenizer), self.vocab.bos_id, self.vocab.eos_id, self.block_size
            )
            if len(blocks) == 0:
                raise DataError(f"data: the {split} text is shorter than one block of {self.block_size} tokens")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{np.random.randint(1 << 30)}.tmp.npy")
            np.save(tmp, blocks)
            tmp.replace(path)
        return np.load(path, mmap_mode="r")

    def _corpus_stats(self) -> CorpusStats | None:
        """The statistics the policy asks for, over the training blocks: counted once, cached beside
        the blocks under a key of the data, the tokenizer, the block size and the request."""
        request = self.policy.corpus_stats
        if request is None:
            return None
        key = stable_hash("stats", STATS_VERSION, self.source_key, self.tokenizer_source.key, self.block_size, request)
        path = self.cache_dir / "stats" / f"{key}.pt"
        if path.exists():
            return CorpusStats.load(path)
        stats = count_corpus(self._blocks("train"), self.vocab, request)
        stats.save(path)
        return stats

    # ---- Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        for split in ("train", "validation"):
            self._blocks(split)
        self._corpus_stats()  # rank 0 counts and caches; every rank's setup() then loads the file

    def setup(self, stage: str | None = None) -> None:
        check_mask_token(self.policy, self.tokenizer, self.vocab)
        self.policy.setup(self.vocab)
        if (stats := self._corpus_stats()) is not None:
            self.policy.setup_corpus(stats)  # before any DataLoader worker starts: workers inherit it
        self.train_blocks = self._blocks("train")
        self.val_batches = self._masked_validation(self._blocks("validation"))

    def _masked_validation(self, blocks: np.ndarray) -> dict[str, torch.Tensor]:
        """Validation batches are masked once, with a fixed seed, by the policy's validation rule."""
        policy = self.policy.validation_policy(self.val_mask_ratio)
        ids = torch.from_numpy(np.asarray(blocks, dtype=np.int64))  # [N, L]
        return policy(TokenBlock.from_ids(ids, self.vocab), torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        collate = MaskingCollator(self.policy, self.vocab, self.seed)
        return self.loaders.train(IndexedBlocks(self.train_blocks), collate, self.trainer)

    def val_dataloader(self) -> DataLoader:
        return self.loaders.validation(TensorDictDataset(self.val_batches), self.trainer)
