"""Corpora, tokenizer, packing, masking policies and the collate that applies them."""

from datamodules.adaptive import AdaptiveMLMMask
from datamodules.entropy import EntropyPositionMask
from datamodules.finetune import FineTuneDataModule
from datamodules.finetune_policies import FineTunePolicy, MEAPFineTuneCollate, PlainSFT
from datamodules.masking import MaskingPolicy, MEAPInputMask, NoMask, RandomMLMMask, SelectionPolicy, TokenBlock, Vocab
from datamodules.pretraining import PretrainingDataModule
from datamodules.sentence_policies import LastTokenMask, MatchedRandomMask, PenultimateTokenMask, SentencePositionMask
from datamodules.span_policies import FixedSpanMask, GeometricSpanMask, WholeWordMask
from datamodules.swap_policies import SecondToLastSwap

__all__ = [
    "AdaptiveMLMMask",
    "EntropyPositionMask",
    "FineTuneDataModule",
    "FineTunePolicy",
    "FixedSpanMask",
    "GeometricSpanMask",
    "LastTokenMask",
    "MEAPFineTuneCollate",
    "MEAPInputMask",
    "MaskingPolicy",
    "MatchedRandomMask",
    "NoMask",
    "PenultimateTokenMask",
    "PlainSFT",
    "PretrainingDataModule",
    "RandomMLMMask",
    "SecondToLastSwap",
    "SelectionPolicy",
    "SentencePositionMask",
    "TokenBlock",
    "Vocab",
    "WholeWordMask",
]
