"""The standard objectives as policies: no masking (next-token prediction), BERT's random MLM
mask, and MEAP's masked input for a decoder."""

from __future__ import annotations

import torch
from torch import Tensor

from core.batch import IGNORE_INDEX
from datamodules.masking import NEXT_TOKENS, MaskingPolicy, Objective, SelectionPolicy, TokenBlock


class NoMask(MaskingPolicy):
    """Plain next-token prediction: the input is the text, every token is a label."""

    objective = "causal"
    default_ratio = None
    needs_mask_token = False

    def __call__(self, block: TokenBlock, generator: torch.Generator) -> dict[str, Tensor]:
        ids = block.input_ids
        return {
            "input_ids": ids,
            "labels": ids.masked_fill(block.attention_mask == 0, IGNORE_INDEX),
            "attention_mask": block.attention_mask,
            "masked": torch.zeros_like(ids, dtype=torch.bool),
        }

    @property
    def loss_targets(self) -> str:
        return NEXT_TOKENS


class RandomMLMMask(SelectionPolicy):
    """BERT masking: each non-special token is chosen with probability `ratio`, then 80/10/10."""

    def __init__(self, mask_prob: float = 0.8, random_prob: float = 0.1) -> None:
        super().__init__("mlm", mask_prob, random_prob)

    def select(self, block: TokenBlock, generator: torch.Generator) -> Tensor:
        u = torch.rand(block.input_ids.shape, generator=generator)  # [B, L]
        return (u < self.ratio) & ~block.special


class MEAPInputMask(SelectionPolicy):
    """MEAP pre-training (Zhuang et al. 2025): replace a share `ratio` of the input tokens by
    [MASK] and train plain next-token prediction on the original text.

    Args:
        shared_positions: draw one set of positions for the whole batch, as the released code
            does (the paper's text, and our default, draws per sequence).
        mask_special_tokens: also allow BOS/EOS to be masked, as the released code does.
    """

    def __init__(self, shared_positions: bool = False, mask_special_tokens: bool = False) -> None:
        super().__init__("causal")
        self.shared_positions = shared_positions
        self.mask_special_tokens = mask_special_tokens

    def select(self, block: TokenBlock, generator: torch.Generator) -> Tensor:
        batch, length = block.input_ids.shape
        rows = 1 if self.shared_positions else batch
        masked = torch.rand(rows, length, generator=generator) < self.ratio  # [rows, L]
        masked = masked.expand(batch, length)
        protected = block.special if not self.mask_special_tokens else block.attention_mask == 0
        return masked & ~protected


def standard_validation(objective: Objective, val_mask_ratio: float) -> MaskingPolicy:
    """The validation rule every policy of an objective shares (unless its `validation_policy` names
    its own), so every variant is judged on the same task: MLM on a uniform mask at `val_mask_ratio`,
    causal objectives on clean next-token prediction. Every chosen MLM token becomes [MASK] (no
    80/10/10): a token left in the input would score the model for copying it, not for predicting it."""
    if objective == "causal":
        return NoMask()
    policy = RandomMLMMask(mask_prob=1.0, random_prob=0.0)
    policy.ratio = val_mask_ratio
    return policy
