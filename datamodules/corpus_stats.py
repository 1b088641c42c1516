"""Corpus statistics a policy can ask for: token counts and n-gram counts over the training blocks.

A policy declares what it needs (`Policy.corpus_stats`, a `StatsRequest`); the pre-training
datamodule counts it once over the training blocks, caches it beside the tokenizer and the blocks
(keyed by both and by the request), and hands it to the policy (`Policy.setup_corpus`) before any
DataLoader worker starts. Workers inherit the policy with what it derived; DDP ranks load the cache
that rank 0 wrote in `prepare_data`.

N-grams are counted within a block and over regular tokens only (no BOS, EOS or padding inside):
those are the contexts the model ever sees together. Counting is level by level (apriori): an
n-gram is counted only when its (n-1)-token prefix was kept, which loses nothing, because a prefix
occurs at least as often as the n-gram.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

STATS_VERSION = 1  # bump when the counting rules change: cached statistics are then recounted


@dataclass(frozen=True)
class StatsRequest:
    """The corpus statistics a policy needs.

    Args:
        max_n: n-grams are counted for n = 1..max_n (1 = token counts only).
        min_count: n-grams seen fewer times are dropped (token counts are always complete).
    """

    max_n: int = 1
    min_count: int = 1

    def __post_init__(self) -> None:
        if self.max_n < 1:
            raise ValueError(f"corpus_stats.max_n must be >= 1, got {self.max_n}")
        if self.min_count < 1:
            raise ValueError(f"corpus_stats.min_count must be >= 1, got {self.min_count}")


class NgramIndex:
    """Exact look-up of n-grams of ids, vectorised: level k holds the sorted keys of the k-token
    prefixes, key = (index of the (k-1)-token prefix in level k-1) * V + (k-th id), so a key fits in
    int64 for any n and sorted keys are the n-grams in lexicographic order."""

    def __init__(self, levels: list[Tensor], size: int) -> None:
        self.levels = levels  # levels[k-1]: [K_k] int64, sorted
        self.size = size

    @classmethod
    def of(cls, grams: list[Tensor], size: int) -> NgramIndex:
        """The index of these n-grams ([K, n] long tensors, any n) and of all their prefixes."""
        longest = max((g.shape[1] for g in grams if len(g)), default=0)
        levels: list[Tensor] = []
        for k in range(1, longest + 1):
            prefixes = torch.cat([g[:, :k] for g in grams if g.shape[1] >= k and len(g)])  # [M, k]
            parent = prefixes[:, 0] if k == 1 else cls(levels, size).lookup(prefixes[:, :-1]) * size + prefixes[:, -1]
            levels.append(parent.unique())
        return cls(levels, size)

    @staticmethod
    def find(keys: Tensor, query: Tensor) -> Tensor:
        """Index of each query in the sorted `keys`, -1 where it is absent (or the query is < 0)."""
        if len(keys) == 0:
            return torch.full_like(query, -1)
        pos = torch.searchsorted(keys, query.contiguous()).clamp(max=len(keys) - 1)
        return torch.where((keys[pos] == query) & (query >= 0), pos, -1)

    def lookup(self, grams: Tensor) -> Tensor:
        """[M, n] ids -> [M] index in level n; -1 where the n-gram is not indexed."""
        n = grams.shape[1]
        if n > len(self.levels):
            return torch.full((len(grams),), -1, dtype=torch.long)
        node = self.find(self.levels[0], grams[:, 0])
        for k in range(1, n):
            node = self.find(self.levels[k], torch.where(node >= 0, node * self.size + grams[:, k], -1))
        return node

    def walk(self, ids: Tensor, longest: int) -> list[Tensor]:
        """For every position of [B, L] ids and k = 1..longest, the level-k index of the k-gram
        starting there ([B, L-k+1], -1 where absent): one look-up per level, not per n-gram."""
        if not self.levels:
            return []
        nodes = [self.find(self.levels[0], ids)]
        for k in range(1, min(longest, len(self.levels))):
            prev = nodes[-1][:, :-1]
            nodes.append(self.find(self.levels[k], torch.where(prev >= 0, prev * self.size + ids[:, k:], -1)))
        return nodes

    def grams(self, n: int) -> Tensor:
        """[K_n, n] the ids of level n, in its (lexicographic) order."""
        out = self.levels[0][:, None]
        for k in range(1, n):
            keys = self.levels[k]
            out = torch.cat([out[keys // self.size], (keys % self.size)[:, None]], 1)
        return out


@dataclass(frozen=True, eq=False)
class CorpusStats:
    """Counts over the training blocks.

    token_counts: [V] int64, occurrences of each id among the regular tokens (specials are 0).
    windows: [max_n] int64, positions where an n-gram of regular tokens starts, per n: the
        denominators of n-gram probabilities.
    counts: counts[n-1] is [K_n] int64, the count of each kept n-gram, in the order of
        `index.grams(n)` (n-grams seen at least `min_count` times).
    word_counts: word_counts[n-1] is [K_n] int64, the occurrences of each kept n-gram that are
        whole words: it starts a word and the token after it does too (or is special, or the
        block ends there), by the vocabulary's `is_word_start`.
    """

    token_counts: Tensor
    windows: Tensor
    counts: list[Tensor]
    word_counts: list[Tensor]
    index: NgramIndex
    min_count: int

    @property
    def max_n(self) -> int:
        return len(self.counts)

    def ngrams(self, n: int) -> tuple[Tensor, Tensor]:
        """The kept n-grams, [K_n, n], and their counts, [K_n]."""
        return self.index.grams(n), self.counts[n - 1]

    def count(self, grams: Tensor) -> Tensor:
        """[M, n] ids -> [M] counts; 0 for an n-gram not kept (unseen or below `min_count`)."""
        node = self.index.lookup(grams)
        return torch.where(node >= 0, self.counts[grams.shape[1] - 1][node.clamp(min=0)], 0)

    def save(self, path: Path) -> None:
        """Written to a temporary file and renamed: a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{np.random.randint(1 << 30)}.tmp")
        state = {
            "token_counts": self.token_counts,
            "windows": self.windows,
            "counts": self.counts,
            "word_counts": self.word_counts,
            "levels": self.index.levels,
            "min_count": self.min_count,
        }
        torch.save(state, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> CorpusStats:
        state = torch.load(path, weights_only=True)
        index = NgramIndex(state["levels"], len(state["token_counts"]))
        return cls(
            state["token_counts"], state["windows"], state["counts"], state["word_counts"], index, state["min_count"]
        )


class TokenKinds(Protocol):
    """What counting needs of a vocabulary (a `datamodules.masking.Vocab` has it; the policy contract
    imports this module, so this module does not import the contract)."""

    size: int
    is_special: Tensor  # [V] bool
    is_word_start: Tensor  # [V] bool


def count_corpus(blocks: np.ndarray | Tensor, vocab: TokenKinds, request: StatsRequest) -> CorpusStats:
    """Token and n-gram counts of [N, L] blocks of ids, vectorised: one sort per n."""
    ids = blocks.long() if isinstance(blocks, Tensor) else torch.from_numpy(np.array(blocks, dtype=np.int64))  # [N, L]
    size = vocab.size
    regular = ~vocab.is_special[ids]  # [N, L]
    starts_word = vocab.is_word_start[ids] | ~regular  # [N, L]
    starts_word[:, 0] = True
    starts_word[:, 1:] |= ~regular[:, :-1]
    ends_word = torch.ones_like(regular)  # [N, L]: the next token starts a word, or the block ends
    ends_word[:, :-1] = starts_word[:, 1:]
    token_counts = torch.bincount(ids[regular], minlength=size)
    kept = ((token_counts >= request.min_count) & ~vocab.is_special).nonzero().squeeze(1)  # level 1, sorted
    levels, counts = [kept], [token_counts[kept]]
    node = torch.where(regular, NgramIndex.find(kept, ids), -1)  # [N, L]: level-1 index at each position
    word_counts = [whole_word_counts(node, starts_word, ends_word, 1, len(kept))]
    whole = regular  # [N, L-n+1]: the n-gram starting here is all regular tokens
    windows = [int(regular.sum())]
    for n in range(2, request.max_n + 1):
        whole = whole[:, :-1] & regular[:, n - 1 :]
        windows.append(int(whole.sum()))
        prev = node[:, :-1]  # [N, L-n+1]: the (n-1)-gram starting here, if kept
        keys = torch.where((prev >= 0) & regular[:, n - 1 :], prev * size + ids[:, n - 1 :], -1)
        unique, count = keys[keys >= 0].unique(return_counts=True)
        frequent = count >= request.min_count
        levels.append(unique[frequent])
        counts.append(count[frequent])
        node = NgramIndex.find(levels[-1], keys)
        word_counts.append(whole_word_counts(node, starts_word, ends_word, n, len(levels[-1])))
    index = NgramIndex(levels, size)
    return CorpusStats(token_counts, torch.tensor(windows), counts, word_counts, index, request.min_count)


def whole_word_counts(node: Tensor, starts_word: Tensor, ends_word: Tensor, n: int, kept: int) -> Tensor:
    """[kept] occurrences of each kept n-gram (its index at each start, `node` [N, L-n+1]) that
    start a word and end where a word ends."""
    whole = (node >= 0) & starts_word[:, : node.shape[1]] & ends_word[:, n - 1 :]
    return torch.bincount(node[whole], minlength=kept)
