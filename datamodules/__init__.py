"""Corpora, tokenizer, packing, masking policies and the collate that applies them."""

from datamodules.adaptive import AdaptiveMLMMask
from datamodules.entropy import EntropyPositionMask
from datamodules.masking import MaskingPolicy, MEAPInputMask, NoMask, RandomMLMMask, SelectionPolicy, TokenBlock, Vocab
from datamodules.pretraining import PretrainingDataModule
from datamodules.sentence_policies import LastTokenMask, MatchedRandomMask, PenultimateTokenMask, SentencePositionMask
from datamodules.span_policies import FixedSpanMask, GeometricSpanMask, WholeWordMask
from datamodules.swap_policies import SecondToLastSwap

__all__ = [
    "AdaptiveMLMMask",
    "EntropyPositionMask",
    "FixedSpanMask",
    "GeometricSpanMask",
    "LastTokenMask",
    "MaskingPolicy",
    "MatchedRandomMask",
    "MEAPInputMask",
    "NoMask",
    "PenultimateTokenMask",
    "PretrainingDataModule",
    "RandomMLMMask",
    "SecondToLastSwap",
    "SelectionPolicy",
    "SentencePositionMask",
    "TokenBlock",
    "Vocab",
    "WholeWordMask",
]
