"""The collate function: the one place where masking happens."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block.

    A collate's ops are small ([B, L] masks): split over every core of a big host (torch's default
    in the main process, `data.num_workers: 0`), each op waits for all threads to be scheduled,
    which on a busy host costs far more than the op (measured on 2 busy cores: 1.3 ms on one
    thread, 40 ms on two, for a 64 x 512 MLM batch). DataLoader workers already run on one thread;
    this gives the main process the same.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class MaskingCollator:
    """Stacks `(index, block)` samples and applies the masking policy."""

    def __init__(self, policy: MaskingPolicy, vocab: Vocab, seed: int) -> None:
        self.policy = policy
        self.vocab = vocab
        self.seed = seed

    def __call__(self, samples: list[tuple[int, Tensor]]) -> dict[str, Tensor]:
        with one_thread():
            return self.collate(samples)

    def collate(self, samples: list[tuple[int, Tensor]]) -> dict[str, Tensor]:
        indices = [index for index, _ in samples]
        input_ids = torch.stack([block for _, block in samples]).long()  # [B, L]
        batch = self.policy(TokenBlock.from_ids(input_ids, self.vocab), batch_generator(self.seed, indices))
        if self.policy.objective == "mlm" and not self.policy.needs_model and not batch["masked"].any():
            rank_zero_warn(
                f"{self.policy!r} masked no token in a batch of {input_ids.numel()} tokens; "
                "its MLM loss is 0 and it teaches nothing"
            )
        return batch
