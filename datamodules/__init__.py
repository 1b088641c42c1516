"""Corpora, tokenizer, packing, masking policies and the collate that applies them."""

from core.errors import ConfigError
from datamodules.corpus_stats import CorpusStats, StatsRequest
from datamodules.finetune import FineTuneDataModule
from datamodules.masking import MaskingPolicy, Policy, SelectionPolicy, TokenBlock, Vocab
from datamodules.policies.adaptive import AdaptiveMLMMask
from datamodules.policies.corpus import FrequencyMask, PMIMask
from datamodules.policies.entropy import EntropyPositionMask
from datamodules.policies.finetune import MEAPSFT, FineTunePolicy, PlainSFT
from datamodules.policies.sentence import LastTokenMask, MatchedRandomMask, PenultimateTokenMask, SentencePositionMask
from datamodules.policies.span import FixedSpanMask, GeometricSpanMask, WholeWordMask
from datamodules.policies.standard import MEAPInputMask, NoMask, RandomMLMMask
from datamodules.policies.swap import SecondToLastSwap
from datamodules.pretraining import PretrainingDataModule

__all__ = [
    "MEAPSFT",
    "AdaptiveMLMMask",
    "CorpusStats",
    "EntropyPositionMask",
    "FineTuneDataModule",
    "FineTunePolicy",
    "FixedSpanMask",
    "FrequencyMask",
    "GeometricSpanMask",
    "LastTokenMask",
    "MEAPInputMask",
    "MaskingPolicy",
    "MatchedRandomMask",
    "NoMask",
    "PMIMask",
    "PenultimateTokenMask",
    "PlainSFT",
    "Policy",
    "PretrainingDataModule",
    "RandomMLMMask",
    "SecondToLastSwap",
    "SelectionPolicy",
    "SentencePositionMask",
    "StatsRequest",
    "TokenBlock",
    "Vocab",
    "WholeWordMask",
]

RENAMED = {"MEAPFineTuneCollate": "MEAPSFT (its init_args.ratio is now data.mask_ratio)"}


def __getattr__(name: str):
    """A class path that was renamed fails with one line naming the new one."""
    if name in RENAMED:
        raise ConfigError(f"{name} was renamed: use datamodules.{RENAMED[name]}")
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
