"""n-hot sub-token embeddings (AMLM paper, Edman & Fraser 2025; their model code is not public,
so this definition is ours).

For each vocabulary entry, the n-hot vector marks the *other* entries whose surface form is a
substring of its own (word-boundary markers stripped: byte-level ``Ġ``, SentencePiece ``▁``,
WordPiece ``##``). The input embedding of token t becomes

    E[t] + mean_{s in substrings(t)} P[s]

with P a learned V×H table: a learned projection of the count-normalised n-hot vector, computed as
an `EmbeddingBag` over the sparse lists, never as a dense V×V matrix. Because the vector is fixed
per token, the sum folds into a plain embedding table, so the exported model is an ordinary
transformers model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WORD_MARKERS = ("Ġ", "▁", "##")


def strip_marker(token: str) -> str:
    for marker in WORD_MARKERS:
        if token.startswith(marker):
            return token[len(marker) :]
    return token


def substring_lists(tokens: list[str]) -> list[list[int]]:
    """For every id, the ids of the other entries whose stripped surface occurs inside its own.
    Empty strings (special tokens are passed as "") have and are no substrings."""
    by_surface: dict[str, list[int]] = {}
    surfaces = [strip_marker(t) for t in tokens]
    for index, surface in enumerate(surfaces):
        if surface:
            by_surface.setdefault(surface, []).append(index)
    lists = []
    for index, surface in enumerate(surfaces):
        found = {
            other
            for start in range(len(surface))
            for end in range(start + 1, len(surface) + 1)
            for other in by_surface.get(surface[start:end], ())
            if other != index
        }
        lists.append(sorted(found))
    return lists


class NHotEmbedding(nn.Module):
    """Token embedding plus the mean of its substrings' learned vectors (see module docstring)."""

    def __init__(self, base: nn.Embedding, tokens: list[str], init_std: float = 0.02) -> None:
        super().__init__()
        self.base = base
        lists = substring_lists(tokens)
        self.register_buffer("indices", torch.tensor([i for ids in lists for i in ids], dtype=torch.long))
        lengths = torch.tensor([len(ids) for ids in lists], dtype=torch.long)
        self.register_buffer("offsets", torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]]))
        self.substrings = nn.EmbeddingBag(len(tokens), base.embedding_dim, mode="mean")
        nn.init.normal_(self.substrings.weight, std=init_std)

    @property
    def weight(self) -> Tensor:
        """The folded table [V, H]: what a plain embedding of the same model must hold."""
        return self.base.weight + self.substrings(self.indices, self.offsets)  # empty bags give 0

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.weight)  # [B, L, H]

    def folded(self) -> nn.Embedding:
        with torch.no_grad():
            return nn.Embedding.from_pretrained(
                self.weight.detach().clone(), freeze=False, padding_idx=self.base.padding_idx
            )
