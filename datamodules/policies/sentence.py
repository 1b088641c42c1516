"""Sentence-position masking: the penultimate token of every sentence, its controls.

The seed question is *why* masking the penultimate token of a sentence would beat random
masking. Answering it needs two controls beside the policy itself: the last token (is it just
"near the end"?) and random masking with exactly the same number of masked tokens per sequence
(is it just a smaller budget?). All three read the sentence boundaries the datamodule keeps
(`TokenBlock.sentence_end`: ., !, ? and the end of each document).

Positions are counted over regular tokens (never BOS/EOS/padding) from the end of a *unit*:
``"sentence"`` (the default), ``"document"`` (ends at EOS) or ``"block"`` (the whole row). A
unit cut off by the end of the block has no known end, so it contributes nothing; a sentence
whose only token is its end (e.g. the EOS after a full stop) has no penultimate token.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from core.errors import DataError
from datamodules.masking import Objective, SelectionPolicy, TokenBlock

Unit = Literal["sentence", "document", "block"]


def unit_ends(block: TokenBlock, unit: Unit) -> Tensor:
    """[B, L] bool: the last token of each unit."""
    if unit == "sentence":
        return block.sentence_end
    if unit == "document":
        return block.input_ids == block.vocab.eos_id
    ends = torch.zeros_like(block.sentence_end)
    ends[:, -1] = True
    return ends


def rank_from_end(block: TokenBlock, unit: Unit = "sentence") -> Tensor:
    """[B, L] long: 1 for the last regular token of its unit, 2 for the penultimate, ...;
    0 for special tokens, padding and tokens of a unit the block cuts off before its end."""
    ends = unit_ends(block, unit).flip(1)  # reversed, a unit starts at its end token
    regular = (~block.special & (block.attention_mask == 1)).flip(1)  # [B, L]
    seen = regular.long().cumsum(1)  # regular tokens from the row's end up to here, inclusive
    # regular tokens after the current unit: the count just before its end token, carried forward
    after = torch.where(ends, seen - regular.long(), 0).cummax(1).values  # [B, L]
    complete = ends.long().cumsum(1) > 0
    return torch.where(regular & complete, seen - after, 0).flip(1)


def check_unit(unit: str) -> None:
    if unit not in get_args(Unit):
        raise ValueError(f"data.masking.init_args.unit must be one of {get_args(Unit)}, got {unit!r}")


class SentencePositionMask(SelectionPolicy):
    """Mask the regular token `from_end` places from the end of each unit (1 = last,
    2 = penultimate). The budget is set by the text (one token per unit): the policy has no ratio.

    Args:
        from_end: which token, counted from the unit's end.
        unit: "sentence", "document" or "block".
        objective: "mlm" (encoder) or "causal" (decoder, MEAP-style input masking).
        mask_prob: MLM only: share of chosen tokens replaced by [MASK].
        random_prob: MLM only: share replaced by a random token.
    """

    default_ratio = None

    def __init__(
        self,
        from_end: int = 2,
        unit: Unit = "sentence",
        objective: Objective = "mlm",
        mask_prob: float = 0.8,
        random_prob: float = 0.1,
    ) -> None:
        super().__init__(objective, mask_prob, random_prob)
        if from_end < 1:
            raise ValueError(f"data.masking.init_args.from_end must be >= 1, got {from_end}")
        check_unit(unit)
        self.from_end = from_end
        self.unit = unit

    def positions(self, block: TokenBlock) -> Tensor:
        """[B, L] bool: the `from_end`-th token of every complete unit."""
        if self.unit == "sentence" and not block.sentence_end.any():
            raise DataError(
                f"{type(self).__name__} needs sentence boundaries, but a batch of "
                f"{block.input_ids.numel()} tokens has no sentence end (no ., !, ? token and no EOS): "
                "use text with sentence punctuation, or data.masking.init_args.unit=block"
            )
        return rank_from_end(block, self.unit) == self.from_end

    def select(self, block: TokenBlock, generator: torch.Generator) -> Tensor:
        return self.positions(block)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(from_end={self.from_end}, unit={self.unit!r}, objective={self.objective!r})"


class PenultimateTokenMask(SentencePositionMask):
    """Mask the second-to-last token of every sentence (or document / block, see `unit`)."""

    def __init__(
        self, unit: Unit = "sentence", objective: Objective = "mlm", mask_prob: float = 0.8, random_prob: float = 0.1
    ) -> None:
        super().__init__(2, unit, objective, mask_prob, random_prob)


class LastTokenMask(SentencePositionMask):
    """Control: mask the last token of every sentence (mostly its . ! or ?)."""

    def __init__(
        self, unit: Unit = "sentence", objective: Objective = "mlm", mask_prob: float = 0.8, random_prob: float = 0.1
    ) -> None:
        super().__init__(1, unit, objective, mask_prob, random_prob)


class MatchedRandomMask(SentencePositionMask):
    """Control: uniformly random regular tokens, exactly as many per sequence as
    `SentencePositionMask(from_end, unit)` masks on that sequence (penultimate by default), so a
    difference in results cannot come from a different budget."""

    def select(self, block: TokenBlock, generator: torch.Generator) -> Tensor:
        count = self.positions(block).sum(1, keepdim=True)  # [B, 1]
        eligible = ~block.special & (block.attention_mask == 1)  # [B, L]
        keys = torch.rand(block.input_ids.shape, generator=generator).masked_fill(~eligible, 2.0)
        rank = keys.argsort(1).argsort(1)  # [B, L] 0 = smallest key; ineligible tokens rank last
        return rank < count
