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
given, so a mask is a pure function of (block, generator state, ratio). Fine-tuning policies
(`datamodules.policies.finetune`) share the declarations and the ratio (`Policy`) but take an
`SFTBlock`, so they have a base class of their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor

from core.batch import IGNORE_INDEX

if TYPE_CHECKING:
    from datamodules.corpus_stats import CorpusStats, StatsRequest

Objective = Literal["mlm", "causal"]
NEXT_TOKENS = "every next token"  # the loss targets of next-token prediction, with or without a corrupted input


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


class Policy:
    """What every policy (pre-training and fine-tuning) declares, and the live mask ratio it owns.

    The declarations let the entry point check a config before training (see
    `callbacks.policy_driver.compatibility_errors`) instead of a run training on a silent fault:

    - `objective`: the labels it builds, ``"mlm"`` or ``"causal"``; the model must train that one.
    - `default_ratio`: the ratio it starts at when `data.mask_ratio` is not set; None = the policy
      has no ratio (its budget comes from the text, e.g. one token per sentence), and setting
      `data.mask_ratio` for it is a config error.
    - `needs_mask_token`: the tokenizer must have a [MASK] token.
    - `needs_model`: the collate cannot choose the positions; a callback does it on the device, with
      the model (the collate's batch carries no labels until then).
    - `required_callbacks`: class names of the callbacks it cannot train as meant without (a policy
      never imports a callback, so it names them).
    - `corpus_stats`: the corpus statistics it needs (a `StatsRequest`: token counts, n-gram counts
      up to n), or None; the pre-training datamodule counts them once over the training blocks
      and hands them to `setup_corpus`. An instance may set it in `__init__` from its arguments.

    The ratio lives in one place, this policy. The datamodule passes `data.mask_ratio` in when it
    receives the policy; afterwards only a callback changes it, through the `ratio` setter (the
    schedules). Until the datamodule has set it, reading it is an error, not a silent default.
    """

    objective: ClassVar[Objective]
    default_ratio: ClassVar[float | None] = 0.15
    needs_mask_token: ClassVar[bool] = True
    needs_model: ClassVar[bool] = False
    required_callbacks: ClassVar[tuple[str, ...]] = ()
    corpus_stats: StatsRequest | None = None

    def __init__(self) -> None:
        # A shared-memory scalar: a callback in the main process changes the ratio and the
        # collate in every DataLoader worker reads the new value on its next batch. NaN = not set.
        self._ratio = torch.full((1,), float("nan")).share_memory_()

    @property
    def uses_ratio(self) -> bool:
        return self.default_ratio is not None

    @property
    def ratio(self) -> float:
        if not self.uses_ratio:
            raise AttributeError(f"{type(self).__name__} has no mask ratio: its budget is set by the text")
        value = float(self._ratio[0])
        if value != value:  # NaN
            raise RuntimeError(
                f"{type(self).__name__}.ratio is read before the datamodule set it from data.mask_ratio: "
                "read it in setup() or later, not in __init__"
            )
        return value

    @ratio.setter
    def ratio(self, value: float) -> None:
        """The one setter: the datamodule's `mask_ratio` at construction, a schedule callback later."""
        if not self.uses_ratio:
            raise AttributeError(f"{type(self).__name__} has no mask ratio to set")
        check_ratio(value)
        self._ratio[0] = float(value)

    @property
    def loss_targets(self) -> str | None:
        """What the training loss is computed on when other policies share it (e.g. "every next token"),
        so that their training losses compare; None: targets of its own choosing, comparable with no other
        policy's (a study plots such training losses apart)."""
        return None

    def setup(self, vocab: Vocab) -> None:
        """Called by the datamodule once the tokenizer is known, before any DataLoader worker
        starts: allocate per-type state here (in shared memory, if callbacks update it)."""

    def setup_corpus(self, stats: CorpusStats) -> None:
        """Called by the pre-training datamodule after `setup(vocab)`, before any DataLoader worker
        starts, with the statistics `corpus_stats` asked for (counted once and cached): derive what
        the masks need here, so workers inherit it and no worker or rank counts again."""

    def _ratio_repr(self) -> str:
        if not self.uses_ratio:
            return ""
        value = float(self._ratio[0])
        return "ratio=unset" if value != value else f"ratio={value:.3f}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._ratio_repr()})"


class MaskingPolicy(Policy, ABC):
    """Base of the pre-training policies: a `TokenBlock` of packed text in, a masked batch out."""

    @abstractmethod
    def __call__(self, block: TokenBlock, generator: torch.Generator) -> dict[str, Tensor]:
        """Mask `block`; returns input_ids, labels, attention_mask, masked."""

    def validation_policy(self, val_mask_ratio: float) -> MaskingPolicy | None:
        """The policy validation batches are made with, when it is not the objective's standard rule
        (None, the default: `datamodules.policies.standard.standard_validation`, one fixed rule per
        objective so every variant is judged on the same task). A policy whose objective is a
        different task (e.g. second-to-last prediction) returns itself."""
        return None


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

    @property
    def loss_targets(self) -> str | None:
        """A decoder's chosen positions only corrupt the input: every next token stays a target."""
        return NEXT_TOKENS if self.objective == "causal" else None

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
