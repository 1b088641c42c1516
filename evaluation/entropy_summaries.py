"""Token-entropy summaries: the high-entropy "forking" tokens and entropy by position in the sentence.

A few tokens carry most of a language model's uncertainty: the high-entropy "forking" tokens
(Wang et al. 2025, arXiv 2506.01939, find ~20% of tokens above 0.672 nats in their models).
Shared by `EntropyAnalysisCallback` (during training), the `entropy` suite and
`python -m experiments.analyze_entropy`; here, in the evaluation package, because a suite must not
import training code (callbacks may import evaluation, not the other way).
"""

from __future__ import annotations

from torch import Tensor

FORKING_THRESHOLD = 0.672  # nats: the 80th entropy percentile in arXiv 2506.01939
POSITION_NAMES = {1: "last", 2: "penultimate"}


def forking_stats(entropy: Tensor, correct: Tensor, threshold: float = FORKING_THRESHOLD) -> dict[str, float]:
    """Share of tokens above `threshold`, the share of all entropy they carry, and the accuracy
    on them and on the rest. `entropy`, `correct`: [N]."""
    forking = entropy > threshold
    total = entropy.sum().clamp_min(1e-12)
    return {
        "forking_share": forking.float().mean().item(),
        "forking_entropy_share": (entropy[forking].sum() / total).item(),
        "forking_accuracy": correct[forking].float().mean().item() if forking.any() else float("nan"),
        "non_forking_accuracy": correct[~forking].float().mean().item() if (~forking).any() else float("nan"),
    }


def _bucket(entropy: Tensor, correct: Tensor, loss: Tensor) -> dict[str, float]:
    count = len(entropy)
    return {
        "count": count,
        "mean_entropy": entropy.mean().item() if count else float("nan"),
        "accuracy": correct.float().mean().item() if count else float("nan"),
        "mean_loss": loss.mean().item() if count else float("nan"),
    }


def by_position(entropy: Tensor, correct: Tensor, loss: Tensor, rank: Tensor, max_offset: int = 5) -> list[dict]:
    """Entropy, accuracy and loss by position from the end of the sentence.

    All inputs [N]; `rank` from `rank_from_end` (1 = last, 2 = penultimate, 0 = a sentence the
    text cuts off). Buckets: -max_offset .. -1 (earliest first), then every earlier position
    together, then the unfinished sentences.
    """
    buckets = []
    earlier = rank > max_offset
    buckets.append(
        {
            "position": f"<=-{max_offset + 1}",
            "name": "earlier",
            **_bucket(entropy[earlier], correct[earlier], loss[earlier]),
        }
    )
    for k in range(max_offset, 0, -1):
        at = rank == k
        buckets.append(
            {"position": f"-{k}", "name": POSITION_NAMES.get(k, f"-{k}"), **_bucket(entropy[at], correct[at], loss[at])}
        )
    cut = rank == 0
    buckets.append({"position": "cut", "name": "unfinished sentence", **_bucket(entropy[cut], correct[cut], loss[cut])})
    return buckets
