"""Policies that learn where to mask from the corpus: PMI masking of collocations (Levine et al.
2021) and rarity-weighted masking. Both ask for corpus statistics (`corpus_stats`) and derive
their tables from them in `setup_corpus`, before any DataLoader worker starts."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from datamodules.corpus_stats import CorpusStats, NgramIndex, StatsRequest
from datamodules.masking import SelectionPolicy, TokenBlock, Vocab
from datamodules.policies.span import maskable, take_units

PAPER_LENGTH_SHARES = (0.5, 0.25, 0.125, 0.125)  # of the vocabulary: bigrams, trigrams, 4-grams, 5-grams


def segmentations(n: int) -> list[list[tuple[int, int]]]:
    """Every way of cutting n tokens into two or more contiguous parts, as (start, end) pairs."""
    out = []
    for cuts in itertools.product((False, True), repeat=n - 1):
        if any(cuts):
            bounds = [0, *(i + 1 for i, cut in enumerate(cuts) if cut), n]
            out.append(list(itertools.pairwise(bounds)))
    return out


def ngram_pmi(stats: CorpusStats, n: int) -> tuple[Tensor, Tensor]:
    """PMI_n of every kept n-gram (Levine et al. 2021, eq. 3): log p(w1..wn) / prod_s p(s),
    minimised over the segmentations of w1..wn into two or more contiguous parts s, where an
    m-gram's probability is its count over the corpus' m-gram positions. Returns [K, n] n-grams
    and [K] float64 scores. Every part of a kept n-gram occurs at least as often, so it is kept too."""
    grams = stats.index.grams(n)
    log_p: dict[tuple[int, int], Tensor] = {}
    for start, end in itertools.combinations(range(n + 1), 2):
        part = grams[:, start:end]
        part_counts = stats.token_counts[part[:, 0]] if end - start == 1 else stats.count(part)
        log_p[start, end] = part_counts.double().log() - math.log(stats.windows[end - start - 1])
    whole = log_p[0, n]
    scores = [whole - sum(log_p[part] for part in parts) for parts in segmentations(n)]
    return grams, torch.stack(scores).amin(0)


class PMIMask(SelectionPolicy):
    """PMI-Masking (Levine et al. 2021, ICLR): mask whole collocations.

    The masking vocabulary: n-grams of n = 2..max_n tokens seen at least `min_count` times in the
    training blocks, ranked by PMI_n (`ngram_pmi`) within each length, the top
    `vocabulary_size * length_shares[n-2]` of each length kept: only n-grams with PMI_n > 0 that
    span at least two words and occur as whole words (starting a word and ending where one ends)
    at least `min_count` times, the token n-grams nearest the paper's word n-grams. At training,
    the whole-word occurrences of vocabulary n-grams are found in the batch; where occurrences
    overlap, the longer one wins, then the higher-ranked, then the leftmost. Each kept occurrence
    and each remaining whole word is a masking unit; units are taken in random order until the
    batch's budget of `ratio` of its maskable tokens is met (to within one unit, exactly in expectation), and the
    chosen tokens are corrupted 80/10/10.

    Args:
        vocabulary_size: n-grams in the masking vocabulary (the paper: 800K on 3.3B words).
        max_n: longest n-gram (the paper: 5).
        min_count: fewest occurrences of a vocabulary n-gram (the paper: more than 10).
        length_shares: share of the vocabulary for n = 2, 3, ... (the paper: 1/2, 1/4, 1/8, 1/8).
        mask_prob: share of chosen tokens replaced by [MASK].
        random_prob: share replaced by a random non-special token.
    """

    def __init__(
        self,
        vocabulary_size: int = 800_000,
        max_n: int = 5,
        min_count: int = 10,
        length_shares: tuple[float, ...] = PAPER_LENGTH_SHARES,
        mask_prob: float = 0.8,
        random_prob: float = 0.1,
    ) -> None:
        super().__init__("mlm", mask_prob, random_prob)
        if vocabulary_size < 1:
            raise ValueError(f"data.masking.init_args.vocabulary_size must be >= 1, got {vocabulary_size}")
        if max_n < 2:
            raise ValueError(f"data.masking.init_args.max_n must be >= 2, got {max_n}")
        if min_count < 1:
            raise ValueError(f"data.masking.init_args.min_count must be >= 1, got {min_count}")
        if len(length_shares) != max_n - 1 or any(s < 0 for s in length_shares) or sum(length_shares) <= 0:
            raise ValueError(
                f"data.masking.init_args.length_shares must be {max_n - 1} shares >= 0 (n = 2..{max_n}), "
                f"got {list(length_shares)}"
            )
        self.vocabulary_size, self.max_n = vocabulary_size, max_n
        self.length_shares = tuple(s / sum(length_shares) for s in length_shares)
        self.corpus_stats = StatsRequest(max_n=max_n, min_count=min_count)
        self.word_start: Tensor | None = None  # [V] bool, from setup(vocab)
        self.index: NgramIndex | None = None
        self.rank: list[Tensor] = []  # rank[n-1]: [K_n] vocabulary rank of each indexed n-gram; -1 = a prefix only

    def setup(self, vocab: Vocab) -> None:
        self.word_start = vocab.is_word_start & ~vocab.is_special

    def setup_corpus(self, stats: CorpusStats) -> None:
        """Build the masking vocabulary from the statistics, once, before the workers start."""
        word_start = self.word_start
        if word_start is None or len(word_start) != len(stats.token_counts):
            raise RuntimeError("PMIMask.setup(vocab) must run before setup_corpus(stats)")
        chosen: list[Tensor] = []
        for n in range(2, self.max_n + 1):
            grams, scores = ngram_pmi(stats, n)
            words = word_start[grams].long().sum(1)  # word starts among the n tokens
            whole_words = stats.word_counts[n - 1] >= stats.min_count  # often a run of whole words
            eligible = (scores > 0) & whole_words & (words >= 2)
            quota = round(self.vocabulary_size * self.length_shares[n - 2])
            order = scores.masked_fill(~eligible, -math.inf).argsort(descending=True, stable=True)
            chosen.append(grams[order[: min(quota, int(eligible.sum()))]])
        self.index = NgramIndex.of(chosen, stats.index.size)
        self.rank = [torch.full((len(level),), -1, dtype=torch.long) for level in self.index.levels]
        for grams in chosen:
            if len(grams):
                self.rank[grams.shape[1] - 1][self.index.lookup(grams)] = torch.arange(len(grams))

    @property
    def vocabulary(self) -> list[Tensor]:
        """The masking vocabulary: for n = 2..max_n, [K_n, n] n-grams, best PMI_n first."""
        if self.index is None:
            raise RuntimeError("PMIMask.setup_corpus(stats) must run before masking")
        out = []
        for n in range(2, self.max_n + 1):
            if n > len(self.index.levels):
                out.append(torch.zeros(0, n, dtype=torch.long))
                continue
            rank = self.rank[n - 1]
            member = (rank >= 0).nonzero().squeeze(1)
            out.append(self.index.grams(n)[member[rank[member].argsort()]])
        return out

    def units(self, block: TokenBlock) -> Tensor:
        """[B, L] long: the masking unit of each position (kept vocabulary occurrences, then whole
        words), numbered in reading order; special tokens and padding are units of their own."""
        if self.index is None:
            raise RuntimeError("PMIMask.setup_corpus(stats) must run before masking")
        ids, allowed = block.input_ids, maskable(block)
        batch, length = ids.shape
        after_allowed = torch.zeros_like(allowed)
        after_allowed[:, 1:] = allowed[:, :-1]
        word_start = block.vocab.is_word_start[ids] | ~allowed | ~after_allowed  # [B, L]
        boundary_after = torch.ones_like(allowed)
        boundary_after[:, :-1] = word_start[:, 1:]  # the next position starts a word (or there is none)
        starts, lengths, priority = self._occurrences(ids, word_start, boundary_after)
        kept = self._non_overlapping(starts, lengths, priority, batch * length)
        first = torch.zeros(batch * length, dtype=torch.bool)  # an occurrence's first token
        first[starts[kept]] = True
        inside = torch.zeros_like(first)  # an occurrence's later tokens
        for k in range(1, self.max_n):
            inside[starts[kept & (lengths > k)] + k] = True
        after_occurrence = torch.zeros_like(first)
        after_occurrence[1:] = inside[:-1] | first[:-1]
        unit_start = first | (~inside & (word_start.flatten() | after_occurrence))
        return (unit_start.long().cumsum(0) - 1).view(batch, length)

    def _occurrences(self, ids: Tensor, word_start: Tensor, boundary_after: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flat start, length and priority of every vocabulary occurrence that begins a word and
        ends at a word boundary. Priority orders longer first, then higher-ranked, then leftmost."""
        batch, length = ids.shape
        positions = batch * length
        top_rank = max((len(r) for r in self.rank), default=1)
        starts, lengths, priority = [], [], []
        for n, node in enumerate(self.index.walk(ids, self.max_n), start=1):
            if n < 2:
                continue
            rank = torch.where(node >= 0, self.rank[n - 1][node.clamp(min=0)], -1)  # [B, L-n+1]
            hit = (rank >= 0) & word_start[:, : length - n + 1] & boundary_after[:, n - 1 :]
            row, col = hit.nonzero(as_tuple=True)
            flat = row * length + col
            starts.append(flat)
            lengths.append(torch.full_like(flat, n))
            priority.append((n * (top_rank + 1) + top_rank - rank[row, col]) * positions + positions - 1 - flat)
        if not starts:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, empty
        return torch.cat(starts), torch.cat(lengths), torch.cat(priority)

    def _non_overlapping(self, starts: Tensor, lengths: Tensor, priority: Tensor, positions: int) -> Tensor:
        """[M] bool: occurrences kept so that none overlap. In rounds, every occurrence whose
        priority is the highest over all the tokens it covers wins, and those overlapping a winner
        drop out; at least the highest remaining one wins each round (a loop over rounds, not tokens)."""
        offsets = torch.arange(self.max_n)
        covers = offsets < lengths[:, None]  # [M, max_n]
        tokens = (starts[:, None] + offsets).clamp(max=max(positions - 1, 0))  # [M, max_n]
        kept = torch.zeros(len(starts), dtype=torch.bool)
        active = torch.ones(len(starts), dtype=torch.bool)
        while active.any():
            live = covers & active[:, None]
            best = torch.full((positions,), -1, dtype=torch.long)
            best.scatter_reduce_(0, tokens[live], priority[:, None].expand_as(tokens)[live], "amax")
            wins = active & (best[tokens].masked_fill(~covers, -1).amax(1) == priority)
            kept |= wins
            taken = torch.zeros(positions, dtype=torch.bool)
            taken[tokens[covers & wins[:, None]]] = True
            active &= ~(taken[tokens] & covers).any(1)
        return kept

    def select(self, block: TokenBlock, generator: torch.Generator) -> Tensor:
        return take_units(self.units(block), maskable(block), self.ratio, generator)

    def __repr__(self) -> str:
        return f"PMIMask(vocabulary_size={self.vocabulary_size}, max_n={self.max_n}, {self._ratio_repr()})"


class FrequencyMask(SelectionPolicy):
    """Rarity-weighted MLM: token i is chosen with probability p[tok_i] = min(1, c · r^power),
    r = 1 / count its rarity in the training blocks, c set so that the expected masked share over
    the corpus, Σ_v count_v p_v / Σ_v count_v, is exactly `ratio`.
    power = 0 is random MLM; power > 0 masks rare types more often.

    Args:
        power: the exponent on rarity.
        mask_prob: share of chosen tokens replaced by [MASK].
        random_prob: share replaced by a random non-special token.
    """

    corpus_stats = StatsRequest(max_n=1)

    def __init__(self, power: float = 0.5, mask_prob: float = 0.8, random_prob: float = 0.1) -> None:
        super().__init__("mlm", mask_prob, random_prob)
        if not math.isfinite(power):
            raise ValueError(f"data.masking.init_args.power must be a finite number, got {power}")
        self.power = power
        self.counts: Tensor | None = None  # [V] float64, 0 for special tokens
        self._table: tuple[float, Tensor] | None = None  # (ratio, [V] probabilities) of the last ratio read

    def setup_corpus(self, stats: CorpusStats) -> None:
        self.counts = stats.token_counts.double()
        self._table = None

    def probabilities(self) -> Tensor:
        """[V] float32 p_v at the current ratio; solved again only when the ratio changes."""
        if self.counts is None:
            raise RuntimeError("FrequencyMask.setup_corpus(stats) must run before masking")
        ratio = self.ratio
        if self._table is None or self._table[0] != ratio:
            self._table = (ratio, self._solve(ratio))
        return self._table[1]

    def _solve(self, ratio: float) -> Tensor:
        """Bisection on log c: the expected share is increasing in c, and clipped at 1 per type."""
        counts = self.counts
        weight = counts.clamp(min=1.0) ** -self.power  # a type the training blocks lack never meets p
        if ratio >= 1.0:
            return torch.ones_like(weight, dtype=torch.float32)
        total = counts.sum().clamp(min=1.0)
        low, high = -200.0, 200.0  # log c: bracketing any rarity^power of float64 counts
        for _ in range(100):
            mid = (low + high) / 2
            share = float((counts * (math.exp(mid) * weight).clamp(max=1.0)).sum() / total)
            low, high = (mid, high) if share < ratio else (low, mid)
        return (math.exp((low + high) / 2) * weight).clamp(max=1.0).float()

    def select(self, block: TokenBlock, generator: torch.Generator) -> Tensor:
        p = self.probabilities()[block.input_ids]  # [B, L]
        return (torch.rand(p.shape, generator=generator) < p) & maskable(block)

    def __repr__(self) -> str:
        return f"FrequencyMask(power={self.power}, {self._ratio_repr()})"
