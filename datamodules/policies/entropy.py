"""Entropy-aware masking, per position (Srinivasagan, Hartung & Georges 2026, arXiv 2605.28526).

Choosing positions by predictive entropy needs a model, so this is the one documented exception
to "the collate masks": the collate hands over clean blocks and
`callbacks.entropy_masking.EntropyMaskingCallback` picks and corrupts the positions on the device,
just before the training step. (The per-type variant needs no exception: it is
`AdaptiveMLMMask` with `AdaptiveMaskingCallback(scoring="entropy")`.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules.masking import SelectionPolicy, TokenBlock


class EntropyPositionMask(SelectionPolicy):
    """MLM whose positions are chosen on the device by `EntropyMaskingCallback`; the collate
    only delivers clean input (nothing masked, no labels). Needs that callback in the config.

    Args:
        mask_prob: share of chosen tokens replaced by [MASK].
        random_prob: share replaced by a random non-special token.
    """

    needs_model = True
    required_callbacks = ("EntropyMaskingCallback",)  # without it no position is ever chosen

    def __init__(self, mask_prob: float = 0.8, random_prob: float = 0.1) -> None:
        super().__init__("mlm", mask_prob, random_prob)

    def select(self, block: TokenBlock, generator: torch.Generator) -> Tensor:
        return torch.zeros_like(block.input_ids, dtype=torch.bool)
