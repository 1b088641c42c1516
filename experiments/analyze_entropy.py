"""Token-entropy analysis of a finished model on held-out text.

    python -m experiments.analyze_entropy --run runs/penultimate/version_0

Writes `entropy.json` and three plots into `<run>/analysis/entropy/` (or `--out`): the entropy
distribution with the share of "forking" tokens above a threshold (arXiv 2506.01939), mean
entropy and accuracy by position within the sentence (..., -3, penultimate, last), and by
token-frequency bucket. This is how a user sees *why* a position is worth masking.

Tokens are scored as the `entropy` evaluation suite scores them (evaluation/entropy.py, whose
accuracy by position a study can compare): a causal model on each next token, a masked model on
each token while it is hidden by [MASK], every token once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from core.errors import MasklabError
from evaluation.entropy import score_tokens
from evaluation.entropy_summaries import FORKING_THRESHOLD, by_position, forking_stats
from evaluation.heldout import add_text_arguments, heldout_blocks, heldout_texts
from evaluation.model import LoadedModel, load_model

FREQUENCY_BUCKETS = ((1, 10), (11, 100), (101, 1000), (1001, None))  # type ranks, most frequent = 1


def by_frequency(scores: dict[str, Tensor]) -> list[dict]:
    """Mean entropy and accuracy of tokens grouped by their type's frequency rank in the text."""
    counts = torch.bincount(scores["token"])
    type_rank = torch.empty_like(counts)
    type_rank[counts.argsort(descending=True, stable=True)] = torch.arange(1, len(counts) + 1)
    token_rank = type_rank[scores["token"]]
    buckets = []
    for low, high in FREQUENCY_BUCKETS:
        at = (token_rank >= low) & (token_rank <= (high or len(counts)))
        buckets.append(
            {
                "types": f"{low}-{high}" if high else f"{low}+",
                "count": int(at.sum()),
                "distinct": int(scores["token"][at].unique().numel()),
                "mean_entropy": scores["entropy"][at].mean().item() if at.any() else float("nan"),
                "accuracy": scores["correct"][at].float().mean().item() if at.any() else float("nan"),
            }
        )
    return buckets


def summarize(scores: dict[str, Tensor], threshold: float, max_offset: int, bins: int = 40) -> dict:
    entropy, correct = scores["entropy"], scores["correct"]
    top = entropy >= entropy.quantile(0.8)
    counts, edges = torch.histogram(entropy, bins=bins)
    return {
        "n_tokens": len(entropy),
        "mean_entropy": entropy.mean().item(),
        "accuracy": correct.float().mean().item(),
        "mean_loss": scores["loss"].mean().item(),
        "forking_threshold": threshold,
        **forking_stats(entropy, correct, threshold),
        "top20_entropy_share": (entropy[top].sum() / entropy.sum().clamp_min(1e-12)).item(),
        "quantiles": {f"p{q}": entropy.quantile(q / 100).item() for q in (50, 80, 90, 99)},
        "histogram": {"edges": edges.tolist(), "counts": counts.long().tolist()},
        "by_position": by_position(entropy, correct, scores["loss"], scores["rank"], max_offset),
        "by_frequency": by_frequency(scores),
    }


def plot(summary: dict, title: str, out: Path) -> list[Path]:
    """Three PNGs: distribution, by position, by frequency."""
    files = [out / "entropy_distribution.png", out / "entropy_by_position.png", out / "entropy_by_frequency.png"]
    edges, counts = summary["histogram"]["edges"], summary["histogram"]["counts"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    ax.axvline(summary["forking_threshold"], color="C3", linestyle="--")
    ax.set(
        xlabel="predictive entropy (nats)",
        ylabel="tokens",
        title=(
            f"{title}: entropy of {summary['n_tokens']} tokens\n"
            f"forking (> {summary['forking_threshold']:.3g} nats, dashed): "
            f"{summary['forking_share']:.1%} of tokens, {summary['forking_entropy_share']:.1%} of all entropy"
        ),
    )
    _save(fig, files[0])

    buckets = [b for b in summary["by_position"] if b["count"]]
    _two_axes(
        [b["name"] for b in buckets],
        buckets,
        "position in the sentence",
        f"{title}: by position from the sentence end",
        files[1],
    )
    buckets = [b for b in summary["by_frequency"] if b["count"]]
    _two_axes(
        [f"rank {b['types']}" for b in buckets],
        buckets,
        "token type, by frequency rank in the text",
        f"{title}: by token frequency",
        files[2],
    )
    return files


def _two_axes(labels: list[str], buckets: list[dict], xlabel: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(labels))
    ax.bar(x, [b["mean_entropy"] for b in buckets], color="C0", alpha=0.7, label="mean entropy")
    ax.set(xlabel=xlabel, ylabel="mean entropy (nats)", title=title)
    ax.set_xticks(list(x), labels, rotation=20, ha="right")
    acc = ax.twinx()
    acc.plot(list(x), [b["accuracy"] for b in buckets], color="C3", marker="o", label="accuracy")
    acc.set(ylabel="accuracy", ylim=(0, 1))
    for i, b in zip(x, buckets):
        ax.annotate(f"n={b['count']}", (i, 0), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    handles = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    ax.legend(
        handles, [h.get_label() for h in handles], loc="lower right", bbox_to_anchor=(1.0, 1.08), ncol=2, frameon=False
    )
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_out(loaded: LoadedModel) -> Path:
    """`<run dir>/analysis/entropy`; for a bare hf_model folder, `<folder>/analysis/entropy`."""
    return (loaded.path.parent if loaded.run_config else loaded.path) / "analysis" / "entropy"


def finite_or_null(value):
    """`value` with NaN (an empty bucket) as None, so the JSON is strict."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_null(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.analyze_entropy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run dir (its hf_model/ is used) or an hf_model folder")
    parser.add_argument("--out", help="output folder; default <run>/analysis/entropy")
    parser.add_argument(
        "--threshold",
        type=float,
        default=FORKING_THRESHOLD,
        help=f"entropy (nats) above which a token is 'forking' (default {FORKING_THRESHOLD}, arXiv 2506.01939)",
    )
    parser.add_argument(
        "--max-offset", type=int, default=5, help="positions from the sentence end shown one by one (default 5)"
    )
    parser.add_argument(
        "--mlm-mask-ratio", type=float, default=0.15, help="masked models: share hidden per pass (default 0.15)"
    )
    add_text_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        loaded = load_model(args.run)
        block_size = args.block_size or loaded.block_size or 128
        blocks = heldout_blocks(
            heldout_texts(args.text, args.seed, args.documents), loaded, block_size, args.max_blocks
        )
        scores = score_tokens(loaded, blocks, args.batch_size, args.mlm_mask_ratio, args.seed)
    except MasklabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    summary = {
        "model": str(loaded.path),
        "objective": loaded.objective,
        "text": args.text or f"builtin validation split (seed {args.seed}, {args.documents} documents)",
        "blocks": len(blocks),
        "block_size": block_size,
        **summarize(scores, args.threshold, args.max_offset),
    }
    out = Path(args.out) if args.out else default_out(loaded)
    out.mkdir(parents=True, exist_ok=True)
    title = "/".join(loaded.path.parent.parts[-2:]) if loaded.run_config else loaded.path.name
    summary["plots"] = [p.name for p in plot(summary, title, out)]
    (out / "entropy.json").write_text(json.dumps(finite_or_null(summary), indent=2) + "\n")
    print(
        f"{summary['n_tokens']} tokens: mean entropy {summary['mean_entropy']:.3f} nats, "
        f"accuracy {summary['accuracy']:.3f}, forking share {summary['forking_share']:.3f}\n"
        f"wrote {out / 'entropy.json'} and {', '.join(summary['plots'])}"
    )
    return summary


if __name__ == "__main__":
    main()
