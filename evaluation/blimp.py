"""blimp: linguistic minimal pairs (Warstadt et al. 2020), scored without fine-tuning.

A pair counts as correct when the model gives the grammatical sentence the strictly higher score:
its summed log-probability for a decoder (`<bos> sentence`), its pseudo-log-likelihood for an
encoder (`<bos> sentence <eos>`, every regular token masked in turn, batched). Accuracy overall,
per linguistic field and per paradigm (UID).
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Patch

from core.errors import ConfigError, DataError
from datamodules.sources import open_hf_split
from evaluation.model import LoadedModel
from evaluation.options import as_names
from evaluation.result import SuiteResult
from evaluation.scoring import sentence_scores

REQUIRED_FIELDS = ("sentence_good", "sentence_bad", "field", "UID")


@dataclass
class Options:
    """Where the minimal pairs come from, and how many are scored.

    Args:
        data: a BLiMP .jsonl / .jsonl.gz file or a folder of them (one paradigm per file), e.g. ../shared/data/blimp.
        hf_dataset: a `datasets` source instead of `data` (a save_to_disk folder or a hub id), split `train`.
        paradigms: only these paradigms (UIDs): a list, one name, or comma-separated names; None = all.
        max_pairs: at most this many pairs per paradigm (the first ones); None = all.
        batch_size: sentences per forward pass (decoders); an encoder runs 8x this many masked rows per pass.
    """

    data: str | None = None
    hf_dataset: str | None = None
    paradigms: list[str] | str | None = None
    max_pairs: int | None = None
    batch_size: int = 64


@dataclass(frozen=True)
class MinimalPair:
    good: str
    bad: str
    field: str  # e.g. "syntax", "morphology", "syntax_semantics"
    paradigm: str  # the UID, e.g. "adjunct_island"


def read_pair(record: dict, where: str) -> MinimalPair:
    missing = [name for name in REQUIRED_FIELDS if not isinstance(record.get(name), str)]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {', '.join(missing)} (a BLiMP pair needs {', '.join(REQUIRED_FIELDS)})"
        )
    # BLiMP spells one field both "syntax_semantics" and "syntax/semantics"
    return MinimalPair(
        record["sentence_good"], record["sentence_bad"], record["field"].replace("/", "_"), record["UID"]
    )


def read_jsonl(path: Path) -> list[MinimalPair]:
    opener = gzip.open if path.name.endswith(".gz") else open
    pairs = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not JSON ({error.msg})") from None
                pairs.append(read_pair(record, f"{path}:{number}"))
    return pairs


def load_pairs(options: Options) -> list[MinimalPair]:
    if (options.data is None) == (options.hf_dataset is None):
        raise ConfigError("blimp: give exactly one of blimp.data (jsonl file or folder) and blimp.hf_dataset")
    if options.hf_dataset:
        pairs = [
            read_pair(r, f"{options.hf_dataset} row {i}")
            for i, r in enumerate(open_hf_split(options.hf_dataset, None, "train"))
        ]
    else:
        root = Path(options.data)
        files = (
            [root] if root.is_file() else sorted(p for p in root.glob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
        )
        if not files:
            raise DataError(f"blimp.data: {options.data!r} is neither a .jsonl(.gz) file nor a folder holding some")
        pairs = [pair for path in files for pair in read_jsonl(path)]
    return select(pairs, options)


def select(pairs: list[MinimalPair], options: Options) -> list[MinimalPair]:
    if options.paradigms:
        chosen = set(as_names(options.paradigms))
        unknown = sorted(chosen - {p.paradigm for p in pairs})
        if unknown:
            raise ConfigError(f"blimp.paradigms: {', '.join(unknown)} not in the data")
        pairs = [p for p in pairs if p.paradigm in chosen]
    if options.max_pairs is not None:
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for pair in pairs:
            seen[pair.paradigm] += 1
            if seen[pair.paradigm] <= options.max_pairs:
                kept.append(pair)
        pairs = kept
    return pairs


def accuracies(pairs: list[MinimalPair], correct: torch.Tensor) -> dict[str, float]:
    """`acc` overall, `field/<field>` and `paradigm/<UID>`: the share of pairs scored correctly."""
    metrics = {"acc": float(correct.float().mean())}
    for key, group in (("field", lambda p: p.field), ("paradigm", lambda p: p.paradigm)):
        names = sorted({group(p) for p in pairs})
        for name in names:
            chosen = torch.tensor([group(p) == name for p in pairs])
            metrics[f"{key}/{name}"] = float(correct[chosen].float().mean())
    return metrics


def plot(metrics: dict[str, float], pairs: list[MinimalPair]):
    paradigms = sorted({(p.field, p.paradigm) for p in pairs}, key=lambda fp: (fp[0], metrics[f"paradigm/{fp[1]}"]))
    fields = sorted({f for f, _ in paradigms})
    colours = {f: plt.cm.tab10(i) for i, f in enumerate(fields)}
    figure, axes = plt.subplots(figsize=(7, 0.22 * len(paradigms) + 1.2))
    axes.barh(
        [p for _, p in paradigms],
        [metrics[f"paradigm/{p}"] for _, p in paradigms],
        color=[colours[f] for f, _ in paradigms],
    )
    axes.axvline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    handles = [Patch(color=colours[f], label=f"{f} ({metrics[f'field/{f}']:.2f})") for f in fields]
    axes.set_xlim(0, 1)
    axes.set_xlabel("accuracy (good sentence scored higher)")
    axes.set_title(f"BLiMP: {metrics['acc']:.3f} over {len(pairs)} pairs")
    axes.tick_params(axis="y", labelsize=7)
    axes.legend(
        handles=[*handles, *axes.get_legend_handles_labels()[0]],
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.6 / figure.get_figheight()),
        ncol=3,
    )
    figure.tight_layout()
    return figure


# a pair is two sentences: picking one at random is right half of the time
CHANCE = {"acc": 0.5, "field/<field>": 0.5, "paradigm/<paradigm>": 0.5}


def metric_names(options: Options, objective: str) -> list[str]:
    """The metrics `run` writes, so a study can check its metric names before training."""
    return ["acc", "field/<field>", "paradigm/<paradigm>"]


def run(loaded: LoadedModel, options: Options) -> SuiteResult:
    pairs = load_pairs(options)
    scores = sentence_scores(loaded, [p.good for p in pairs] + [p.bad for p in pairs], options.batch_size)
    good, bad = scores[: len(pairs)], scores[len(pairs) :]
    correct = good > bad  # a tie is not a preference
    metrics = accuracies(pairs, correct)
    fields = sorted(name.split("/", 1)[1] for name in metrics if name.startswith("field/"))
    table = "\n".join(
        ["| field | pairs | accuracy |", "| --- | --- | --- |"]
        + [f"| {f} | {sum(p.field == f for p in pairs)} | {metrics[f'field/{f}']:.3f} |" for f in fields]
        + [f"| **all** | {len(pairs)} | {metrics['acc']:.3f} |"]
    )
    method = "log-probability" if loaded.objective == "causal" else "pseudo-log-likelihood"
    return SuiteResult(metrics, {"paradigms": plot(metrics, pairs)}, table, {"pairs": len(pairs), "method": method})
