"""Corpora, tokenizer, packing, masking policies and the collate that applies them."""

from datamodules.finetune import FineTuneDataModule
from datamodules.masking import MaskingPolicy, SelectionPolicy, TokenBlock, Vocab
from datamodules.policies.adaptive import AdaptiveMLMMask
from datamodules.policies.entropy import EntropyPositionMask
from datamodules.policies.finetune import MEAPSFT, FineTunePolicy, PlainSFT
from datamodules.policies.sentence import LastTokenMask, MatchedRandomMask, PenultimateTokenMask, SentencePositionMask
from datamodules.policies.span import FixedSpanMask, GeometricSpanMask, WholeWordMask
from datamodules.policies.standard import MEAPInputMask, NoMask, RandomMLMMask
from datamodules.policies.swap import SecondToLastSwap
from datamodules.pretraining import PretrainingDataModule

__all__ = [
    "AdaptiveMLMMask",
    "EntropyPositionMask",
    "FineTuneDataModule",
    "FineTunePolicy",
    "FixedSpanMask",
    "GeometricSpanMask",
    "LastTokenMask",
    "MEAPSFT",
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
