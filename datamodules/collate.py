"""The collate function: the one place where masking happens."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from datamodules.masking import MaskingPolicy, TokenBlock, Vocab


def batch_generator(seed: int, indices: list[int]) -> torch.Generator:
    """A generator seeded by the base seed and the batch's sample indices.

    A mask is then a function of *which* samples form the batch, not of the worker, the rank or
    how many batches came before: runs reproduce under any `num_workers`, and a resumed run draws
    exactly the masks an uninterrupted one would. Shuffling puts samples in new company every
    epoch, so masks still change between epochs.
    """
    # Python's hash of a tuple of ints is fixed across processes and runs (no hash randomisation
    # for ints) and mixes every member; masking to 64 bits makes it a valid torch seed.
    return torch.Generator().manual_seed(hash((seed, *indices)) & 0xFFFF_FFFF_FFFF_FFFF)


class MaskingCollator:
    """Stacks `(index, block)` samples and applies the masking policy."""

    def __init__(self, policy: MaskingPolicy, vocab: Vocab, seed: int) -> None:
        self.policy = policy
        self.vocab = vocab
        self.seed = seed

    def __call__(self, samples: list[tuple[int, Tensor]]) -> dict[str, Tensor]:
        indices = [index for index, _ in samples]
        input_ids = torch.stack([block for _, block in samples]).long()  # [B, L]
        batch = self.policy(TokenBlock.from_ids(input_ids, self.vocab), batch_generator(self.seed, indices))
        if self.policy.objective == "mlm" and not self.policy.chooses_on_device and not batch["masked"].any():
            rank_zero_warn(
                f"{self.policy!r} masked no token in a batch of {input_ids.numel()} tokens; "
                "its MLM loss is 0 and it teaches nothing"
            )
        return batch
