"""AMLM: masking probability per vocabulary type, following how hard the model finds it
(Edman & Fraser 2025, arXiv 2510.20475). The weights are learned by
`callbacks.adaptive_masking.AdaptiveMaskingCallback`; this policy only samples from them."""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules.masking import SelectionPolicy, TokenBlock, Vocab


class AdaptiveMLMMask(SelectionPolicy):
    """Chooses token i of a sequence with probability

        p_i = min(1, p · L · w[tok_i] / Σ_j w[tok_j])

    over the L maskable positions (special tokens and padding excluded), so each sequence's
    expected masked count is p · L whatever the weights; chosen tokens go through 80/10/10.
    `w` starts uniform (plain random MLM) and lives in shared memory, so the callback's updates
    reach every DataLoader worker without restarting it.

    Args:
        mask_prob: share of chosen tokens replaced by [MASK].
        random_prob: share replaced by a random non-special token.
    """

    required_callbacks = ("AdaptiveMaskingCallback",)  # without it the weights stay uniform: plain random MLM

    def __init__(self, mask_prob: float = 0.8, random_prob: float = 0.1) -> None:
        super().__init__("mlm", mask_prob, random_prob)
        self.weights: Tensor | None = None  # [V] float32, shared memory

    def setup(self, vocab: Vocab) -> None:
        if self.weights is None or len(self.weights) != vocab.size:
            self.weights = torch.full((vocab.size,), self.ratio).share_memory_()

    def token_probabilities(self, block: TokenBlock) -> Tensor:
        """p_i of every position, [B, L] float32 (0 at special tokens and padding)."""
        if self.weights is None:
            raise RuntimeError("AdaptiveMLMMask.setup(vocab) must run before masking")
        maskable = ~block.special  # [B, L]
        w = self.weights[block.input_ids] * maskable  # [B, L]
        length = maskable.sum(1, keepdim=True)  # [B, 1]
        total = w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)  # [B, 1]
        return (self.ratio * length * w / total).clamp(max=1.0)

    def select(self, block: TokenBlock, generator: torch.Generator) -> Tensor:
        p = self.token_probabilities(block)  # [B, L]
        return torch.rand(p.shape, generator=generator) < p
