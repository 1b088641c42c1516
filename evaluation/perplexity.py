"""ppl: perplexity of a decoder, pseudo-perplexity of an encoder, on held-out text.

Held-out text is packed into blocks exactly as training text is (`<bos> doc <eos>`, cut every
`block_size` tokens). A decoder's perplexity is exp of the mean next-token cross-entropy over every
position of every block; an encoder's pseudo-perplexity is exp of minus the mean log-probability
of each regular token when it alone is masked (Salazar et al. 2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.errors import DataError
from evaluation.heldout import heldout_blocks, heldout_texts
from evaluation.model import LoadedModel
from evaluation.result import SuiteResult
from evaluation.scoring import masked_token_logprobs, token_losses


@dataclass
class Options:
    """Which held-out text is scored, and in what blocks.

    Args:
        text: held-out text file or folder (.txt, .txt.gz), e.g. ../shared/data/wikitext-2/valid.txt;
            None = the built-in corpus' validation split.
        documents: built-in validation documents to generate when `text` is None.
        seed: seed of the built-in corpus (0, as in training).
        block_size: tokens per block; None = the run's data.block_size, else min(128, the model's context).
        max_blocks: score at most this many blocks.
        batch_size: blocks per forward pass (decoders); an encoder runs 8x this many masked rows per pass.
    """

    text: str | None = None
    documents: int = 200
    seed: int = 0
    block_size: int | None = None
    max_blocks: int = 32
    batch_size: int = 16


@torch.no_grad()
def causal_nll(loaded: LoadedModel, blocks: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Summed next-token cross-entropy over all blocks, and the number of predicted tokens."""
    total = 0.0
    for batch in blocks.split(batch_size):
        batch = batch.to(loaded.device)
        logits = loaded.model(input_ids=batch).logits[:, :-1]  # [B, L-1, V]
        total += float(token_losses(logits, batch[:, 1:]).sum())
    return total, blocks.shape[0] * (blocks.shape[1] - 1)


def masked_nll(loaded: LoadedModel, blocks: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Summed -log p(token | the rest) over every regular token, and their number."""
    scored = (~loaded.vocab.is_special[blocks]).tolist()
    logp, _ = masked_token_logprobs(loaded, blocks.tolist(), scored, rows_per_batch=8 * batch_size)
    return float(-logp.sum()), len(logp)


def metric_names(options: Options, objective: str) -> list[str]:
    """The metrics `run` writes for a model of `objective`: a decoder's perplexity, an encoder's pseudo-perplexity."""
    return ["ppl" if objective == "causal" else "pseudo_ppl", "nll"]


def run(loaded: LoadedModel, options: Options) -> SuiteResult:
    block_size = options.block_size or loaded.block_size or min(128, loaded.context_length)
    if block_size > loaded.context_length:
        raise DataError(
            f"ppl.block_size={block_size} is longer than the model's context of {loaded.context_length} tokens"
        )
    texts = heldout_texts(options.text, options.seed, options.documents)
    blocks = heldout_blocks(texts, loaded, block_size, options.max_blocks)  # [N, block_size]
    nll, tokens = (causal_nll if loaded.objective == "causal" else masked_nll)(loaded, blocks, options.batch_size)
    name = "ppl" if loaded.objective == "causal" else "pseudo_ppl"
    value = math.exp(nll / tokens)
    source = options.text or f"built-in validation split (seed {options.seed})"
    return SuiteResult(
        metrics={name: value, "nll": nll / tokens},
        table=(
            f"| text | blocks × tokens | {name} |\n| --- | --- | --- |\n| {source} | {len(blocks)} × "
            f"{block_size} | {value:.3f} |"
        ),
        details={"text": source, "blocks": len(blocks), "block_size": block_size, "scored_tokens": tokens},
    )
