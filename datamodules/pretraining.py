"""`PretrainingDataModule`: text -> tokenizer -> packed blocks -> masked batches."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from datasets import Dataset as HFDataset
from torch.utils.data import DataLoader, Dataset

from core.errors import DataError, raise_if_any
from datamodules.collate import MaskingCollator
from datamodules.corpus import VARIANTS
from datamodules.corpus_stats import STATS_VERSION, CorpusStats, count_corpus
from datamodules.loading import (
    Sources,
    TokenizedDataModule,
    adopt_policy,
    check_mask_token,
    common_config_errors,
)
from datamodules.masking import MaskingPolicy, TokenBlock
from datamodules.packing import pack, tokenize
from datamodules.policies.standard import NoMask, standard_validation
from datamodules.recall import RecallConfig, generate, recall_options, recall_tokenizer
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
        raise_if_any(self.config_errors(**{k: v for k, v in locals().items() if k not in ("self", "__class__")}))
        sources = Sources(data_path, val_data_path, hf_dataset, hf_config, hf_split, hf_val_split)
        super().__init__(
            sources,
            tokenizer_path,
            vocab_size,
            cache_dir,
            batch_size,
            num_workers,
            pin_memory,
            seed,
            (lambda: recall_tokenizer(recall)) if builtin_variant == RECALL else None,
        )
        policy = masking if masking is not None else NoMask()
        self.policy = adopt_policy(policy, MaskingPolicy, "datamodules.FineTuneDataModule", mask_ratio)
        self.text_column = text_column
        self.builtin_documents = builtin_documents
        self.builtin_variant = builtin_variant
        self.recall = recall
        self.val_fraction = val_fraction
        self.block_size = block_size
        self.val_mask_ratio = val_mask_ratio

    @staticmethod
    def config_errors(**args) -> list[str]:
        """Every problem with these init arguments, each naming its key (empty when valid)."""
        errors = common_config_errors(**args)
        variant = args.get("builtin_variant", "default")
        if variant not in BUILTIN_VARIANTS:
            errors.append(f"data.builtin_variant must be one of {BUILTIN_VARIANTS}, got {variant!r}")
        if variant == RECALL:
            recall, source_errors = recall_options(args)
            errors += source_errors + recall.errors(args.get("block_size", 128))
        return errors

    @property
    def is_recall(self) -> bool:
        return self.builtin_variant == RECALL

    # ---- tokenizer ---------------------------------------------------------------------------

    @cached_property
    def source_key(self) -> str:
        sources = self.sources
        if sources.data_path:
            files = text_files(sources.data_path, "data.data_path")
            val_files = text_files(sources.val_data_path, "data.val_data_path") if sources.val_data_path else []
            return stable_hash(
                "files",
                TEXT_RULES,
                files_fingerprint(files),
                files_fingerprint(val_files),
                self.val_fraction,
                self.seed,
            )
        if sources.hf_dataset:
            return stable_hash(
                "hf",
                TEXT_RULES,
                sources.hf_dataset,
                sources.hf_config,
                sources.hf_split,
                sources.hf_val_split,
                self.text_column,
            )
        return stable_hash("builtin", self.seed, self.builtin_documents, self.builtin_variant, self.recall)

    # ---- text and blocks ---------------------------------------------------------------------

    def _texts(self, split: str) -> HFDataset:
        share = self._documents(split)
        return self.sources.read(
            split,
            files=lambda path, key: load_text_files(text_files(path, key), key),
            hf=lambda name: load_hf_dataset(self.sources.hf_dataset, self.sources.hf_config, name, self.text_column),
            builtin=lambda: builtin_dataset(self.seed, share, split, self.builtin_variant),
            holdout=lambda dataset: self._holdout(dataset, split),
        )

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
        self.record_files(text_files)
        if (stats := self._corpus_stats()) is not None:
            self.policy.setup_corpus(stats)  # before any DataLoader worker starts: workers inherit it
        self.train_blocks = self._blocks("train")
        self.val_batches = self._masked_validation(self._blocks("validation"))

    def _masked_validation(self, blocks: np.ndarray) -> dict[str, torch.Tensor]:
        """Validation batches are masked once, with a fixed seed, by the policy's validation rule."""
        ratio = self.val_mask_ratio
        policy = self.policy.validation_policy(ratio) or standard_validation(self.policy.objective, ratio)
        ids = torch.from_numpy(np.asarray(blocks, dtype=np.int64))  # [N, L]
        return policy(TokenBlock.from_ids(ids, self.vocab), torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        collate = MaskingCollator(self.policy, self.vocab, self.seed)
        return self.loaders.train(IndexedBlocks(self.train_blocks), collate, self.trainer)

    def val_dataloader(self) -> DataLoader:
        return self.loaders.validation(TensorDictDataset(self.val_batches), self.trainer)
