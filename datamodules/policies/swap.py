"""Second-to-last prediction (Schneider 2024, arXiv 2411.15661; code JohnTailor/AutoEncGenerateThenRefine).

In blocks of l tokens the tokens at positions p and p + 1 swap places, for p = l-1, 2l-1, ...
A causal model reading the swapped text has, at position p, seen t0 .. t(p-1) and t(p+1), and
must predict t(p), which now sits at p + 1: a second-to-last prediction, with the next token
already known. Only those positions carry a loss. The paper reports such predictions to be
over 15% more accurate than next-token predictions, and uses them to refine next-token
candidates (experiments/second_to_last_eval.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules.masking import IGNORE_INDEX, MaskingPolicy, TokenBlock


def swap_positions(length: int, block_length: int) -> Tensor:
    """[P] long: the positions p = l-1, 2l-1, ... whose pair (p, p + 1) fits in `length` tokens."""
    return torch.arange(block_length - 1, length - 1, block_length)


def swap_pairs(ids: Tensor, block_length: int) -> Tensor:
    """[B, L] `ids` with the tokens at p and p + 1 exchanged for every swap position p."""
    p = swap_positions(ids.shape[1], block_length)
    swapped = ids.clone()
    swapped[:, p], swapped[:, p + 1] = ids[:, p + 1], ids[:, p]
    return swapped


class SecondToLastSwap(MaskingPolicy):
    """The second-to-last objective as a masking policy for `CausalLMModule`.

    The module predicts labels[t + 1] from position t, so the label t(p) goes at p + 1 (where
    the swapped input holds it) and every other label is -100. A pair that touches padding is
    left alone. It has no ratio: the budget is one token in `block_length`.

    Args:
        block_length: l, the period of the swaps (4 in the paper and its code).
    """

    objective = "causal"
    default_ratio = None
    needs_mask_token = False

    def __init__(self, block_length: int = 4) -> None:
        super().__init__()
        if block_length < 2:
            raise ValueError(f"data.masking.init_args.block_length must be >= 2, got {block_length}")
        self.block_length = block_length

    def __call__(self, block: TokenBlock, generator: torch.Generator) -> dict[str, Tensor]:
        ids = block.input_ids  # [B, L]
        p = swap_positions(ids.shape[1], self.block_length)  # [P]
        real = (block.attention_mask[:, p] == 1) & (block.attention_mask[:, p + 1] == 1)  # [B, P]
        targets = torch.zeros_like(ids, dtype=torch.bool)
        targets[:, p + 1] = real
        inputs = torch.where(targets | targets.roll(-1, 1), swap_pairs(ids, self.block_length), ids)
        return {
            "input_ids": inputs,
            "labels": torch.where(targets, ids.roll(1, 1), IGNORE_INDEX),
            "attention_mask": block.attention_mask,
            "masked": targets,
        }

    def validation_policy(self, val_mask_ratio: float) -> MaskingPolicy:
        """Validate on the second-to-last task itself: next-token loss means nothing here."""
        return self

    def __repr__(self) -> str:
        return f"SecondToLastSwap(block_length={self.block_length})"
