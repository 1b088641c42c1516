"""entropy: held-out accuracy, loss and predictive entropy by position in the sentence.

Every regular token of held-out blocks is predicted once. A causal model predicts each next token
from its left context. A masked model predicts each token while it is hidden by [MASK]: the tokens
of a block are split at random into 1/mlm_mask_ratio groups and each group is masked in its own
pass, so every token is predicted in a context as masked as the validation mask's. The metrics
split the tokens by their place in the sentence: `penultimate` (the second-to-last token of a
finished sentence), `last`, and `other` (every other token of a finished sentence); tokens of a
sentence the block cuts off are in the overall numbers only. `python -m experiments.analyze_entropy`
gives the same scores with plots, the frequency split and the forking-token statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import DataError
from datamodules.masking import TokenBlock
from datamodules.policies.sentence import rank_from_end
from evaluation.entropy_summaries import FORKING_THRESHOLD, forking_stats
from evaluation.heldout import heldout_blocks, heldout_texts
from evaluation.model import LoadedModel
from evaluation.result import SuiteResult
from lightning_modules.base import predictive_entropy


@dataclass
class Options:
    """Which held-out text is scored, and how a masked model hides it.

    Args:
        text: held-out text file or folder (.txt, .txt.gz); None = the built-in corpus' validation split.
        documents: built-in validation documents to generate when `text` is None.
        seed: seed of the built-in corpus (0, as in training) and of a masked model's groups.
        block_size: tokens per block; None = the run's data.block_size, else 128.
        max_blocks: score at most this many blocks.
        batch_size: blocks per forward pass.
        mlm_mask_ratio: masked models: the share of tokens hidden in each pass.
        forking_threshold: entropy (nats) above which a token counts as forking (arXiv 2506.01939).
    """

    text: str | None = None
    documents: int = 200
    seed: int = 0
    block_size: int | None = None
    max_blocks: int = 32
    batch_size: int = 16
    mlm_mask_ratio: float = 0.15
    forking_threshold: float = FORKING_THRESHOLD


@torch.no_grad()
def score_tokens(
    loaded: LoadedModel, blocks: Tensor, batch_size: int, mlm_mask_ratio: float, seed: int
) -> dict[str, Tensor]:
    """Per predicted token, flattened to [N]: target id, entropy, correct, loss, sentence rank
    (`rank_from_end`: 1 = last, 2 = penultimate, 0 = a sentence the block cuts off). Special-token
    targets (BOS, EOS, padding) are left out."""
    if not 0 < mlm_mask_ratio <= 1:
        raise DataError(f"mlm_mask_ratio must be in (0, 1], got {mlm_mask_ratio}")
    rank = rank_from_end(TokenBlock.from_ids(blocks, loaded.vocab))  # [B, L]
    entropy = torch.zeros(blocks.shape)
    log_p_true = torch.zeros(blocks.shape)
    correct = torch.zeros(blocks.shape, dtype=torch.bool)
    scored = torch.zeros(blocks.shape, dtype=torch.bool)
    groups = max(1, round(1 / mlm_mask_ratio))
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]  # [b, L]
        rows = slice(start, start + len(ids))
        if loaded.objective == "causal":
            logits = loaded.model(input_ids=ids.to(loaded.device)).logits[:, :-1].float().cpu()  # predicts ids[:, 1:]
            everywhere = torch.ones_like(ids[:, 1:], dtype=torch.bool)
            _fill(rows, slice(1, None), logits, ids[:, 1:], everywhere, entropy, log_p_true, correct, scored)
            continue
        group = torch.rand(ids.shape, generator=generator).argsort(1) % groups  # [b, L] each token in one group
        for g in range(groups):
            hidden = (group == g) & ~loaded.vocab.is_special[ids]
            masked = ids.masked_fill(hidden, loaded.vocab.mask_id).to(loaded.device)
            logits = loaded.model(input_ids=masked).logits.float().cpu()
            _fill(rows, slice(None), logits, ids, hidden, entropy, log_p_true, correct, scored)
    keep = scored & ~loaded.vocab.is_special[blocks]
    return {
        "token": blocks[keep],
        "entropy": entropy[keep],
        "correct": correct[keep],
        "loss": -log_p_true[keep],
        "rank": rank[keep],
    }


def _fill(
    rows: slice,
    cols: slice,
    logits: Tensor,
    targets: Tensor,
    where: Tensor,
    entropy: Tensor,
    log_p_true: Tensor,
    correct: Tensor,
    scored: Tensor,
) -> None:
    """Write the scores of `logits` [b, l, V] for `targets` [b, l] at the positions `where`."""
    log_p = F.log_softmax(logits, -1)
    for out, value in (
        (entropy, predictive_entropy(logits)),
        (log_p_true, log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)),
        (correct, logits.argmax(-1) == targets),
        (scored, torch.ones_like(where)),
    ):
        view = out[rows, cols]
        view[where] = value[where]


POSITIONS = {"penultimate": lambda rank: rank == 2, "last": lambda rank: rank == 1, "other": lambda rank: rank > 2}


def position_metrics(scores: dict[str, Tensor], threshold: float) -> dict[str, float]:
    """Overall accuracy, loss and entropy, then each by position in the sentence (NaN where no token is)."""
    metrics = {
        "acc": scores["correct"].float().mean().item(),
        "loss": scores["loss"].mean().item(),
        "mean_entropy": scores["entropy"].mean().item(),
        "forking_share": forking_stats(scores["entropy"], scores["correct"], threshold)["forking_share"],
    }
    for name, where in POSITIONS.items():
        at = where(scores["rank"])
        for key, values in (
            ("acc", scores["correct"].float()),
            ("loss", scores["loss"]),
            ("entropy", scores["entropy"]),
        ):
            metrics[f"{key}_{name}"] = values[at].mean().item() if at.any() else float("nan")
    return metrics


def metric_names(options: Options, objective: str) -> list[str]:
    """The metrics `run` writes (those of `position_metrics`), so a study can check its metric names."""
    by_position = [f"{key}_{name}" for name in POSITIONS for key in ("acc", "loss", "entropy")]
    return ["acc", "loss", "mean_entropy", "forking_share", *by_position]


def run(loaded: LoadedModel, options: Options) -> SuiteResult:
    block_size = options.block_size or loaded.block_size or 128
    blocks = heldout_blocks(
        heldout_texts(options.text, options.seed, options.documents), loaded, block_size, options.max_blocks
    )
    scores = score_tokens(loaded, blocks, options.batch_size, options.mlm_mask_ratio, options.seed)
    metrics = position_metrics(scores, options.forking_threshold)
    counts = {name: int(where(scores["rank"]).sum()) for name, where in POSITIONS.items()}
    source = options.text or f"built-in validation split (seed {options.seed})"
    how = "next token" if loaded.objective == "causal" else f"hidden by [MASK], {options.mlm_mask_ratio:.0%} per pass"
    rows = "\n".join(
        f"| {name} | {counts[name]} | {metrics[f'acc_{name}']:.4f} | {metrics[f'loss_{name}']:.3f} | "
        f"{metrics[f'entropy_{name}']:.3f} |"
        for name in POSITIONS
    )
    return SuiteResult(
        metrics=metrics,
        table=(
            f"{source}, {len(blocks)} blocks × {block_size} tokens, every regular token predicted once ({how}); "
            f"accuracy {metrics['acc']:.4f} over {len(scores['correct'])} tokens\n\n"
            "| position in the sentence | tokens | accuracy | loss | entropy |\n"
            f"| --- | ---: | ---: | ---: | ---: |\n{rows}"
        ),
        details={
            "text": source,
            "blocks": len(blocks),
            "block_size": block_size,
            "tokens": len(scores["correct"]),
            "counts": counts,
        },
    )
