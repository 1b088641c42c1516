"""`PretrainingDataModule`: text -> tokenizer -> packed blocks -> masked batches."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
from datasets import Dataset as HFDataset
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from core.errors import DataError, raise_if_any
from datamodules.collate import MaskingCollator
from datamodules.corpus import VARIANTS
from datamodules.masking import MaskingPolicy, TokenBlock, Vocab
from datamodules.packing import pack, tokenize
from datamodules.policies.standard import NoMask
from datamodules.sources import (
    TEXT_RULES,
    builtin_dataset,
    files_fingerprint,
    load_hf_dataset,
    load_text_files,
    stable_hash,
    text_files,
)
from datamodules.tokenizer import cached_bpe, load_tokenizer, vocab_of


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


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (each rank its own shard, reshuffled by epoch) that can skip the
    samples an interrupted epoch already trained on, so a resumed run sees the same batches."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class PretrainingDataModule(L.LightningDataModule):
    """Pre-training text for every objective; the masking policy is the only thing that differs.

    Args:
        masking: the policy that hides tokens (e.g. RandomMLMMask, MEAPInputMask); None = no
            masking, plain next-token prediction.
        mask_ratio: share of tokens the policy masks at the start of training.
        data_path: a text file or a folder of text files (.txt, .txt.gz); None = built-in corpus.
        val_data_path: validation text; None = hold out `val_fraction` of the documents.
        hf_dataset: a `datasets` source instead: hub id or a local `save_to_disk` folder.
        hf_config: the `datasets` config name.
        hf_split: the split to train on.
        hf_val_split: the split to validate on; None = hold out `val_fraction`.
        text_column: the column holding the text.
        builtin_documents: documents the built-in corpus generates for training.
        builtin_variant: which built-in corpus: "default" (language-like text with a few facts
            recalled late) or "retrieval_dense" (short documents of facts, recalls and the
            retrieval suite's prompt forms, so that a small model learns to retrieve early).
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
        mask_ratio: float = 0.15,
        data_path: str | None = None,
        val_data_path: str | None = None,
        hf_dataset: str | None = None,
        hf_config: str | None = None,
        hf_split: str = "train",
        hf_val_split: str | None = None,
        text_column: str = "text",
        builtin_documents: int = 2000,
        builtin_variant: str = "default",
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
        self.policy.ratio = mask_ratio
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
        self.val_fraction = val_fraction
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.val_mask_ratio = val_mask_ratio
        self.seed = seed
        self.cache_dir = Path(cache_dir)

    @staticmethod
    def config_errors(**args) -> list[str]:
        """Every problem with these init arguments, each naming its key (empty when valid)."""
        errors = []
        for key in ("mask_ratio", "val_fraction", "val_mask_ratio"):
            value = args.get(key)
            if value is not None and not 0.0 <= value <= 1.0:
                errors.append(f"data.{key} must be in [0, 1], got {value}")
        for key in ("block_size", "batch_size", "vocab_size", "builtin_documents"):
            value = args.get(key)
            if value is not None and value < 1:
                errors.append(f"data.{key} must be >= 1, got {value}")
        if args.get("builtin_variant", "default") not in VARIANTS:
            errors.append(f"data.builtin_variant must be one of {sorted(VARIANTS)}, got {args['builtin_variant']!r}")
        if args.get("num_workers", 0) < 0:
            errors.append(f"data.num_workers must be >= 0, got {args['num_workers']}")
        if args.get("data_path") and args.get("hf_dataset"):
            errors.append("data.data_path and data.hf_dataset are both set; choose one source")
        for key in ("data_path", "val_data_path", "tokenizer_path"):
            if args.get(key) and not Path(args[key]).exists():
                errors.append(f"data.{key}: {args[key]!r} does not exist")
        return errors

    # ---- tokenizer ---------------------------------------------------------------------------

    @cached_property
    def source_key(self) -> str:
        if self.data_path:
            files = text_files(self.data_path, "data.data_path")
            val_files = text_files(self.val_data_path, "data.val_data_path") if self.val_data_path else []
            return stable_hash(
                "files", TEXT_RULES, files_fingerprint(files), files_fingerprint(val_files), self.val_fraction, self.seed
            )
        if self.hf_dataset:
            return stable_hash(
                "hf", TEXT_RULES, self.hf_dataset, self.hf_config, self.hf_split, self.hf_val_split, self.text_column
            )
        return stable_hash("builtin", self.seed, self.builtin_documents, self.builtin_variant)

    @cached_property
    def tokenizer(self):
        if self.tokenizer_path:
            return load_tokenizer(self.tokenizer_path)
        key = stable_hash("bpe", self.source_key, self.vocab_size)
        return cached_bpe(self.cache_dir, key, self._texts("train")["text"], self.vocab_size)

    @cached_property
    def vocab(self) -> Vocab:
        return vocab_of(self.tokenizer)

    @property
    def model_vocab(self) -> dict:
        """What the model needs of the tokenizer (ids for its config, token strings for n-hot
        embeddings); linked to `model.vocab` by the CLI."""
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab.size)))
        return {
            **self.vocab.as_dict(),
            "tokens": ["" if s else t for t, s in zip(tokens, self.vocab.is_special.tolist())],
        }

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
        documents = (
            self.builtin_documents if split == "train" else max(1, round(self.builtin_documents * self.val_fraction))
        )
        return builtin_dataset(self.seed, documents, split, self.builtin_variant)

    def _holdout(self, dataset: HFDataset, split: str) -> HFDataset:
        if len(dataset) < 2:
            raise DataError(f"data: only {len(dataset)} document(s); cannot hold out a validation split")
        parts = dataset.train_test_split(test_size=self.val_fraction, seed=self.seed, shuffle=True)
        return parts["train" if split == "train" else "test"]

    def _blocks(self, split: str) -> np.ndarray:
        tokenizer_key = self.tokenizer_path or stable_hash("bpe", self.source_key, self.vocab_size)
        path = self.cache_dir / "blocks" / f"{stable_hash(self.source_key, tokenizer_key, split, self.block_size)}.npy"
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

    # ---- Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        for split in ("train", "validation"):
            self._blocks(split)

    def setup(self, stage: str | None = None) -> None:
        if self.policy.needs_mask_token and self.vocab.mask_id is None:
            raise DataError(
                f"tokenizer {self.tokenizer.name_or_path!r} has no mask token, but {type(self.policy).__name__} needs one"
            )
        self.policy.setup(self.vocab)
        self.train_blocks = self._blocks("train")
        self.val_batches = self._masked_validation(self._blocks("validation"))

    def _masked_validation(self, blocks: np.ndarray) -> dict[str, torch.Tensor]:
        """Validation batches are masked once, with a fixed seed, by the policy's validation rule."""
        policy = self.policy.validation_policy(self.val_mask_ratio)
        ids = torch.from_numpy(np.asarray(blocks, dtype=np.int64))  # [N, L]
        return policy(TokenBlock.from_ids(ids, self.vocab), torch.Generator().manual_seed(self.seed))

    def _sampler(self, dataset: Dataset, shuffle: bool) -> ResumableSampler:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        return ResumableSampler(
            dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed, drop_last=shuffle
        )

    def train_dataloader(self) -> DataLoader:
        dataset = IndexedBlocks(self.train_blocks)
        sampler = self._sampler(dataset, shuffle=True)
        sampler.skip = self._batches_done_this_epoch() * self.batch_size
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=MaskingCollator(self.policy, self.vocab, self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=True,
            generator=self._private_generator(),
        )

    def val_dataloader(self) -> DataLoader:
        dataset = TensorDictDataset(self.val_batches)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._sampler(dataset, shuffle=False),
            pin_memory=self.pin_memory,
            generator=self._private_generator(),
        )

    def _private_generator(self) -> torch.Generator:
        """DataLoaders draw their worker seeds from this instead of the global RNG, so opening
        one does not shift the dropout RNG (and a resumed run matches an uninterrupted one)."""
        return torch.Generator().manual_seed(self.seed)

    def _batches_done_this_epoch(self) -> int:
        """Batches of the current epoch a resumed run has already trained on."""
        if self.trainer is None or not self.trainer.fit_loop.restarting:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
