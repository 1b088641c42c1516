"""Contiguous masks: fixed-length spans, SpanBERT's geometric spans, whole words.

Every policy here masks a share `ratio` of the batch's maskable (regular, non-padding) tokens,
to within one span (or one word): spans are taken in order until the next one would pass the
budget, and that last one is kept with the probability that makes the *expected* masked share
exactly `ratio`. The budget is the batch's, so a 50-token span is usable even where a sequence
holds fewer than 50/ratio tokens.

Spans are laid over the batch's maskable tokens in reading order (row after row), skipping
special tokens: like a span that covers a document boundary (the EOS/BOS between stay
unmasked), a span may run from the end of one row into the start of the next.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor

from core.errors import DataError
from datamodules.masking import Objective, SelectionPolicy, TokenBlock


def maskable(block: TokenBlock) -> Tensor:
    """[B, L] bool: regular, non-padding tokens."""
    return ~block.special & (block.attention_mask == 1)


def take_in_order(lengths: Tensor, budget: float, capacity: int, generator: torch.Generator) -> Tensor:
    """[K] bool, a prefix: the spans (of these lengths, in this order) that fill `budget` tokens.

    Span k is taken when the tokens before it plus a uniform share u of its own length are
    below the budget (one u for all spans): the spans wholly inside the budget always are, the
    one crossing it with probability (budget - before) / length, so the expected total is the
    budget and any total is within one span of it. Spans that would pass `capacity` are not.
    """
    ends = lengths.cumsum(0)  # [K]
    u = torch.rand(1, generator=generator)
    return ((ends - lengths) + u * lengths < budget) & (ends <= capacity)


def take_units(unit: Tensor, allowed: Tensor, ratio: float, generator: torch.Generator) -> Tensor:
    """[B, L] bool: whole units (words, n-grams), taken in random order until `ratio` of the
    allowed tokens is chosen (`take_in_order`). `unit` [B, L] numbers each token's unit, counting
    up from 0 over the flattened batch; only `allowed` tokens are chosen or counted."""
    unit = unit.flatten()  # [B*L]
    count = int(unit[-1]) + 1
    length = torch.zeros(count, dtype=torch.long).index_add_(0, unit, allowed.flatten().long())  # [U]
    tokens = int(allowed.sum())
    order = torch.randperm(count, generator=generator)  # units in the order they are taken
    taken = torch.zeros(count, dtype=torch.bool)
    taken[order[take_in_order(length[order], ratio * tokens, tokens, generator)]] = True
    return taken[unit].view_as(allowed) & allowed


def lay_out(lengths: Tensor, tokens: int, generator: torch.Generator) -> Tensor:
    """[tokens] bool: spans of these lengths at uniformly random, non-overlapping places.

    Stars and bars: the `tokens - sum(lengths)` unmasked tokens and the spans form a row of
    items; choosing which items are spans uniformly at random places the spans uniformly among
    all non-overlapping layouts.
    """
    spans = len(lengths)
    items = tokens - int(lengths.sum()) + spans
    is_span = torch.zeros(items, dtype=torch.bool)
    is_span[torch.randperm(items, generator=generator)[:spans]] = True
    item_length = torch.ones(items, dtype=torch.long)
    item_length[is_span] = lengths
    item_of_token = torch.searchsorted(item_length.cumsum(0), torch.arange(tokens), right=True)  # [tokens]
    return is_span[item_of_token]


class SpanMask(SelectionPolicy):
    """Base of the span policies: draw span lengths, take them up to the budget, lay them out."""

    max_length: int

    @abstractmethod
    def draw_lengths(self, count: int, generator: torch.Generator) -> Tensor:
        """[count] long span lengths, each in [1, max_length]."""

    def check_fits(self, tokens: int, budget: float) -> None:
        """Raise if no span can be placed in a batch that needs one."""

    def select(self, block: TokenBlock, generator: torch.Generator) -> Tensor:
        allowed = maskable(block)  # [B, L]
        tokens = int(allowed.sum())
        budget = self.ratio * tokens
        self.check_fits(tokens, budget)
        lengths = self.draw_lengths(int(budget) + 1, generator)  # enough: every span is >= 1 token
        lengths = lengths[take_in_order(lengths, budget, tokens, generator)]
        masked = torch.zeros(allowed.numel(), dtype=torch.bool)
        masked[allowed.flatten()] = lay_out(lengths, tokens, generator)
        return masked.view_as(allowed)


class FixedSpanMask(SpanMask):
    """Spans of exactly `span_length` tokens (the MEAP ablation: 5 and 50).

    Args:
        span_length: tokens per span.
        objective: "mlm" (encoder) or "causal" (decoder, MEAP-style input masking).
        mask_prob: MLM only: share of chosen tokens replaced by [MASK].
        random_prob: MLM only: share replaced by a random token.
    """

    def __init__(
        self, span_length: int = 5, objective: Objective = "mlm", mask_prob: float = 0.8, random_prob: float = 0.1
    ) -> None:
        super().__init__(objective, mask_prob, random_prob)
        if span_length < 1:
            raise ValueError(f"data.masking.init_args.span_length must be >= 1, got {span_length}")
        self.span_length = self.max_length = span_length

    def draw_lengths(self, count: int, generator: torch.Generator) -> Tensor:
        return torch.full((count,), self.span_length)

    def check_fits(self, tokens: int, budget: float) -> None:
        if budget > 0 and self.span_length > tokens:
            raise DataError(
                f"data.masking.init_args.span_length={self.span_length} is longer than the {tokens} maskable tokens "
                f"of a whole batch, so data.mask_ratio={self.ratio:.3g} cannot be met: use shorter spans or "
                "a larger data.block_size / data.batch_size"
            )

    def __repr__(self) -> str:
        return f"FixedSpanMask(span_length={self.span_length}, {self._ratio_repr()}, objective={self.objective!r})"


class GeometricSpanMask(SpanMask):
    """SpanBERT (Joshi et al. 2020): span lengths from a geometric distribution Geo(p) limited
    to `max_length`, P(l) proportional to p (1 - p)^(l - 1) for l = 1..max_length. The paper
    says it "clips" at 10 and gets a mean of 3.8 tokens with p = 0.2: that mean is the
    renormalised (resampled) distribution, which its code uses too, so that is what this is.
    Lengths count tokens; SpanBERT counts whole words.

    Args:
        p: success probability of the geometric distribution (larger = shorter spans).
        max_length: longest span.
        objective: "mlm" (encoder) or "causal" (decoder, MEAP-style input masking).
        mask_prob: MLM only: share of chosen tokens replaced by [MASK].
        random_prob: MLM only: share replaced by a random token.
    """

    def __init__(
        self,
        p: float = 0.2,
        max_length: int = 10,
        objective: Objective = "mlm",
        mask_prob: float = 0.8,
        random_prob: float = 0.1,
    ) -> None:
        super().__init__(objective, mask_prob, random_prob)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"data.masking.init_args.p must be in (0, 1], got {p}")
        if max_length < 1:
            raise ValueError(f"data.masking.init_args.max_length must be >= 1, got {max_length}")
        self.p, self.max_length = p, max_length
        self.length_probs = p * (1 - p) ** torch.arange(max_length, dtype=torch.float64)  # [max_length]

    @property
    def mean_length(self) -> float:
        lengths = torch.arange(1, self.max_length + 1, dtype=torch.float64)
        return float((lengths * self.length_probs).sum() / self.length_probs.sum())

    def draw_lengths(self, count: int, generator: torch.Generator) -> Tensor:
        return torch.multinomial(self.length_probs, count, replacement=True, generator=generator) + 1

    def __repr__(self) -> str:
        return f"GeometricSpanMask(p={self.p}, max_length={self.max_length}, {self._ratio_repr()})"


class WholeWordMask(SelectionPolicy):
    """Whole-word masking (BERT WWM): choose words at random and mask all of their tokens, up to
    the budget to within one word. A word starts at a token the vocabulary marks as a word
    start (`Vocab.is_word_start`: a leading space in byte-level BPE), at a row's start, or after
    a special token.

    Args:
        objective: "mlm" (encoder) or "causal" (decoder, MEAP-style input masking).
        mask_prob: MLM only: share of chosen tokens replaced by [MASK].
        random_prob: MLM only: share replaced by a random token.
    """

    def select(self, block: TokenBlock, generator: torch.Generator) -> Tensor:
        allowed = maskable(block)  # [B, L]
        after_allowed = torch.zeros_like(allowed)
        after_allowed[:, 1:] = allowed[:, :-1]
        starts = block.vocab.is_word_start[block.input_ids] | ~allowed | ~after_allowed  # [B, L]
        word = starts.flatten().long().cumsum(0).view_as(allowed) - 1  # [B, L] word id of each token
        return take_units(word, allowed, self.ratio, generator)
