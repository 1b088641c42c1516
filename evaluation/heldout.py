"""Held-out text cut into blocks, for the commands that analyse a finished model.

Held-out text is the built-in corpus' validation split, or a text file / folder given with
`--text`, packed exactly as the datamodule packs training text.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset

from core.errors import DataError
from datamodules.corpus import BuiltinCorpus
from datamodules.packing import pack, tokenize
from datamodules.sources import load_text_files, text_files
from evaluation.model import LoadedModel


def heldout_texts(text: str | None, seed: int, documents: int) -> list[str]:
    """`--text` (a file or folder), or `documents` documents of the built-in validation split."""
    if text:
        return list(load_text_files(text_files(text, "--text"), "--text")["text"])
    return BuiltinCorpus(seed).documents(documents, "validation")


def heldout_blocks(texts: list[str], loaded: LoadedModel, block_size: int, max_blocks: int) -> torch.Tensor:
    """[N, block_size] long: `<bos> doc <eos>` packed and cut like the training data."""
    tokenized = tokenize(Dataset.from_dict({"text": texts}), loaded.tokenizer)
    blocks = pack(tokenized, loaded.vocab.bos_id, loaded.vocab.eos_id, block_size)[:max_blocks]
    if len(blocks) == 0:
        raise DataError(f"the held-out text is shorter than one block of {block_size} tokens")
    return torch.from_numpy(blocks).long()


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text", help="held-out text file or folder (.txt, .txt.gz); default: built-in validation split"
    )
    parser.add_argument(
        "--documents", type=int, default=200, help="built-in validation documents to generate (default 200)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in corpus (default 0, as in training)")
    parser.add_argument("--block-size", type=int, help="tokens per block; default: the run's data.block_size, else 128")
    parser.add_argument("--max-blocks", type=int, default=64, help="analyse at most this many blocks (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="blocks per forward pass (default 16)")
