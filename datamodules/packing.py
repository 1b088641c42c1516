"""Tokenise documents once and pack them into fixed-length blocks."""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Batched, with no special tokens: packing adds BOS/EOS around each document, and a special
    token's string in the text (WikiText's `<unk>`) is tokenised as the characters it is."""
    return dataset.map(
        lambda batch: {
            "input_ids": tokenizer(batch["text"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        },
        batched=True,
        remove_columns=dataset.column_names,
        desc="tokenising",
    )


def pack(tokenized: Dataset, bos_id: int, eos_id: int, block_size: int) -> np.ndarray:
    """Concatenate ``<bos> doc <eos>`` for every document and cut into [N, block_size] int32 blocks.

    The tail that does not fill a block is dropped, so blocks carry no padding.
    """
    column = tokenized.data.column("input_ids").combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy().astype(np.int32)
    framed_lengths = np.diff(offsets) + 2  # + bos + eos
    starts = np.concatenate([[0], np.cumsum(framed_lengths)[:-1]])
    stream = np.empty(int(framed_lengths.sum()), dtype=np.int32)
    body = np.ones(len(stream), dtype=bool)
    body[starts] = False
    body[starts + framed_lengths - 1] = False
    stream[starts] = bos_id
    stream[starts + framed_lengths - 1] = eos_id
    stream[body] = values
    blocks = len(stream) // block_size
    return stream[: blocks * block_size].reshape(blocks, block_size)
