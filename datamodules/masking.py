"""Masking policies: which tokens a model must predict, and what it sees in their place.

A policy turns a `TokenBlock` (packed token ids plus what the datamodule knows about them) into
the batch a LightningModule consumes::

    input_ids       [B, L] long   what the model reads
    labels          [B, L] long   what it must predict; -100 = no loss at this position
    attention_mask  [B, L] long   1 = real token, 0 = padding
    masked          [B, L] bool   positions the policy hid

Label conventions follow the objective: ``"mlm"`` policies put labels on hidden positions only;
``"causal"`` policies keep every original token as a label (the module shifts them for
next-token prediction) and only corrupt the *input* (MEAP).

Policies are vectorised over the batch and draw all randomness from the generator they are
given, so a mask is a pure function of (block, generator state, ratio).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import torch
from torch import Tensor

from core.batch import IGNORE_INDEX

Objective = Literal["mlm", "causal"]


@dataclass(frozen=True, eq=False)
class Vocab:
    """What a policy needs to know about the tokenizer."""

    size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int | None
    is_special: Tensor  # [V] bool: never masked, never drawn as a random replacement
    is_sentence_end: Tensor  # [V] bool: token closes a sentence (., !, ?) or a document
    is_word_start: Tensor  # [V] bool: token begins a word (whole-word masking); special tokens too

    @cached_property
    def regular_ids(self) -> Tensor:
        """Ids a random replacement may be drawn from."""
        return (~self.is_special).nonzero().squeeze(1)

    def as_dict(self) -> dict[str, int | None]:
        """The ids a model config needs (plain data, so it can travel through the CLI)."""
        return {
            "vocab_size": self.size,
            "pad_token_id": self.pad_id,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "mask_token_id": self.mask_id,
        }


@dataclass
class TokenBlock:
    """A batch of packed token ids, before masking."""

    input_ids: Tensor  # [B, L] long
    attention_mask: Tensor  # [B, L] long, 1 = real token
    special: Tensor  # [B, L] bool
    sentence_end: Tensor  # [B, L] bool, last token of a sentence or document
    vocab: Vocab

    @classmethod
    def from_ids(cls, input_ids: Tensor, vocab: Vocab) -> TokenBlock:
        return cls(
            input_ids=input_ids,
            attention_mask=(input_ids != vocab.pad_id).long(),
            special=vocab.is_special[input_ids],
            sentence_end=vocab.is_sentence_end[input_ids],
            vocab=vocab,
        )


def check_ratio(value: float, key: str = "mask ratio") -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{key} must be in [0, 1], got {value}")


class MaskingPolicy(ABC):
    """Base of every policy: a live mask ratio plus the objective the labels are built for."""

    objective: ClassVar[Objective]
    needs_mask_token: ClassVar[bool] = True
    chooses_on_device: ClassVar[bool] = False  # positions are picked later, by a callback with the model

    def __init__(self) -> None:
        # A shared-memory scalar: a callback in the main process changes the ratio and the
        # collate in every DataLoader worker reads the new value on its next batch.
        self._ratio = torch.full((1,), 0.15).share_memory_()

    @property
    def ratio(self) -> float:
        return float(self._ratio[0])

    @ratio.setter
    def ratio(self, value: float) -> None:
        check_ratio(value)
        self._ratio[0] = float(value)

    def setup(self, vocab: Vocab) -> None:
        """Called by the datamodule once the tokenizer is known, before any DataLoader worker
        starts: allocate per-type state here (in shared memory, if callbacks update it)."""

    @abstractmethod
    def __call__(self, block: TokenBlock, generator: torch.Generator) -> dict[str, Tensor]:
        """Mask `block`; returns input_ids, labels, attention_mask, masked."""

    def validation_policy(self, val_mask_ratio: float) -> MaskingPolicy:
        """The policy validation batches are made with: one fixed rule per objective, so every
        variant of an objective is judged on the same task — MLM on a uniform mask at
        `val_mask_ratio`, causal objectives on clean next-token prediction. A policy whose
        objective is a different task (e.g. second-to-last prediction) returns itself."""
        from datamodules.policies.standard import NoMask, RandomMLMMask  # the standard policies subclass this one

        if self.objective == "causal":
            return NoMask()
        policy = RandomMLMMask()
        policy.ratio = val_mask_ratio
        return policy

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio:.3f})"


class SelectionPolicy(MaskingPolicy):
    """A policy that only decides *where* to mask; how the chosen tokens are hidden follows
    from the objective.

    Args:
        objective: ``"mlm"`` (encoder: 80/10/10 corruption, loss on chosen tokens only) or
            ``"causal"`` (decoder, MEAP-style: chosen input tokens become [MASK], every next token
            stays a target).
        mask_prob: MLM only: share of chosen tokens replaced by [MASK].
        random_prob: MLM only: share replaced by a random non-special token (the rest is kept).
    """

    def __init__(self, objective: Objective = "mlm", mask_prob: float = 0.8, random_prob: float = 0.1) -> None:
        super().__init__()
        if objective not in ("mlm", "causal"):
            raise ValueError(f"objective must be 'mlm' or 'causal', got {objective!r}")
        check_ratio(mask_prob, "mask_prob")
        check_ratio(random_prob, "random_prob")
        if mask_prob + random_prob > 1.0:
            raise ValueError(f"mask_prob + random_prob must be <= 1, got {mask_prob} + {random_prob}")
        self.objective = objective
        self.mask_prob = mask_prob
        self.random_prob = random_prob

    @abstractmethod
    def select(self, block: TokenBlock, generator: torch.Generator) -> Tensor:
        """Return the positions to mask, a [B, L] bool tensor."""

    def __call__(self, block: TokenBlock, generator: torch.Generator) -> dict[str, Tensor]:
        masked = self.select(block, generator)
        if self.objective == "mlm":
            return corrupt_mlm(block, masked, generator, self.mask_prob, self.random_prob)
        return corrupt_input(block, masked)


def corrupt_mlm(
    block: TokenBlock, masked: Tensor, generator: torch.Generator, mask_prob: float = 0.8, random_prob: float = 0.1
) -> dict[str, Tensor]:
    """BERT corruption of the chosen positions: [MASK] / random token / unchanged."""
    ids, vocab = block.input_ids, block.vocab
    u = torch.rand(ids.shape, generator=generator, device=ids.device).masked_fill_(~masked, 2.0)  # [B, L]
    regular = vocab.regular_ids.to(ids.device)
    random_ids = regular[torch.randint(len(regular), ids.shape, generator=generator, device=ids.device)]  # [B, L]
    inputs = ids.masked_fill(u < mask_prob, vocab.mask_id)  # unchosen positions have u = 2: never hit
    inputs = torch.where((u >= mask_prob) & (u < mask_prob + random_prob), random_ids, inputs)
    return {
        "input_ids": inputs,
        "labels": ids.masked_fill(~masked, IGNORE_INDEX),
        "attention_mask": block.attention_mask,
        "masked": masked,
    }


def corrupt_input(block: TokenBlock, masked: Tensor) -> dict[str, Tensor]:
    """MEAP corruption: chosen input tokens become [MASK]; labels stay the original tokens."""
    ids = block.input_ids
    return {
        "input_ids": torch.where(masked, block.vocab.mask_id, ids),
        "labels": ids.masked_fill(block.attention_mask == 0, IGNORE_INDEX),
        "attention_mask": block.attention_mask,
        "masked": masked,
    }
