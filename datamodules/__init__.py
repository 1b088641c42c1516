"""Corpora, tokenizer, packing, masking policies and the collate that applies them."""

from datamodules.masking import MaskingPolicy, MEAPInputMask, NoMask, RandomMLMMask, SelectionPolicy, TokenBlock, Vocab
from datamodules.pretraining import PretrainingDataModule

__all__ = [
    "MaskingPolicy",
    "MEAPInputMask",
    "NoMask",
    "PretrainingDataModule",
    "RandomMLMMask",
    "SelectionPolicy",
    "TokenBlock",
    "Vocab",
]
