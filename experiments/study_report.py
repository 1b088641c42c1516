"""What a finished study writes: `results.csv`, `report.md`, `plots/*.png`, and each run's
hyperparameters and final metrics in TensorBoard's HParams dashboard.

Everything is read back from the runs' own files (`metrics.json`, TensorBoard events, `config.yaml`,
`eval/<needle group>.json`), so a report can be rebuilt from a study folder at any time.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from datamodules.masking import MaskingPolicy
from evaluation.suites import chance_level
from experiments.stats import Estimate, adjusted_verdict, estimate, holm, p_value, paired_differences, verdict
from experiments.study_config import Study

POSITION_KEY = re.compile(r"^eval/retrieval(@[^/]+)?/(?P<task>.+)/acc_position_(?P<position>\d+)$")
CURVES = ("train/loss", "val/loss")
SEED_NOTE = (
    "One seed sets the model initialisation, the data order and the masks together "
    "(`--seed_everything S --data.init_args.seed S`; on the built-in corpus it also generates that seed's "
    "corpus, and the evaluation suites draw their examples with it), so the spread over seeds is all of "
    "these at once, and a difference is paired over runs that share all of them."
)


@dataclass
class RunResult:
    """One run of the study, as its files tell it."""

    arm: str
    seed: int
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    train_s: float = 0.0
    eval_s: float = 0.0
    tokens: int = 0
    run_dir: Path | None = None
    error: str | None = None


def collect(outcomes: list[Any]) -> list[RunResult]:
    """Outcomes (experiments.study.Outcome) joined with each run's metrics.json."""
    results = []
    for o in outcomes:
        run_dir = Path(o.run_dir) if o.run_dir else None
        metrics_file = run_dir / "metrics.json" if run_dir else None
        metrics = json.loads(metrics_file.read_text()) if metrics_file and metrics_file.is_file() else {}
        results.append(RunResult(o.arm, o.seed, o.status, metrics, o.train_s, o.eval_s, o.tokens, run_dir, o.error))
    return results


def write_csv(results: list[RunResult], path: Path) -> None:
    keys = sorted({k for r in results for k in r.metrics})
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["arm", "seed", "status", "tokens_seen", "train_s", "eval_s", *keys, "error"])
        for r in results:
            writer.writerow(
                [r.arm, r.seed, r.status, r.tokens, f"{r.train_s:.1f}", f"{r.eval_s:.1f}"]
                + [r.metrics.get(k, "") for k in keys]
                + [r.error or ""]
            )


def by_seed(results: list[RunResult], arm: str, metric: str) -> dict[int, float]:
    """{seed: value} of `metric` over the arm's successful runs that report it."""
    return {
        r.seed: float(r.metrics[metric]) for r in results if r.arm == arm and r.status == "ok" and metric in r.metrics
    }


def fmt(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.4g}"


def interval(e: Estimate, signed: bool = False) -> str:
    if e.n == 0:
        return "–"
    sign = "+" if signed else ""
    mean = f"{e.mean:{sign}.4g}"
    return mean if e.n < 2 else f"{mean} [{e.low:{sign}.4g}, {e.high:{sign}.4g}]"


def differences(study: Study, results: list[RunResult]) -> dict[tuple[str, str], Estimate]:
    """Every comparison the study makes: (metric, arm) -> the paired difference arm - baseline."""
    return {
        (metric, arm): estimate(
            list(paired_differences(by_seed(results, arm, metric), by_seed(results, study.baseline, metric)).values())
        )
        for metric in study.metrics
        for arm in study.compared
        if arm != study.baseline
    }


def holm_adjusted(compared: dict[tuple[str, str], Estimate]) -> dict[tuple[str, str], float]:
    """Each comparison's p-value, Holm-adjusted over all the study's comparisons."""
    return dict(zip(compared, holm([p_value(d) for d in compared.values()])))


def metric_table(
    study: Study,
    results: list[RunResult],
    metric: str,
    compared: dict[tuple[str, str], Estimate],
    adjusted: dict[tuple[str, str], float],
) -> str:
    """Each arm's mean and interval, its paired difference to the baseline with the verdict, and the
    verdict Holm-adjusted over the study's comparisons (`adjusted`: their adjusted p-values)."""
    higher = study.metrics[metric] == "higher"
    family = sum(not math.isnan(p) for p in adjusted.values())
    rows = [
        f"| arm | n | mean ± 95% CI | 95% CI | paired difference to {study.baseline} [95% CI] | pairs | verdict "
        "| Holm-adjusted p | adjusted verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for arm in study.compared:
        values = by_seed(results, arm, metric)
        e = estimate(list(values.values()))
        spread = "–" if e.n == 0 else fmt(e.mean) if e.n < 2 else f"{e.mean:.4g} ± {e.half_width:.3g}"
        ci = "–" if e.n < 2 else f"[{e.low:.4g}, {e.high:.4g}]"
        if arm == study.baseline:
            rows.append(f"| {arm} (baseline) | {e.n} | {spread} | {ci} | – | – | – | – | – |")
            continue
        d, p = compared[metric, arm], adjusted[metric, arm]
        rows.append(
            f"| {arm} | {e.n} | {spread} | {ci} | {interval(d, signed=True)} | {d.n} | {verdict(d, higher)} "
            f"| {fmt(p) if math.isnan(p) or p >= 0.001 else '<0.001'} | {adjusted_verdict(d, p, higher, family)} |"
        )
    return "\n".join(rows)


def cost_table(study: Study, results: list[RunResult]) -> str:
    """What each arm's runs cost: tokens per run and the median training and evaluation time."""
    rows = [
        "| arm | finished runs | tokens per run | median train time | median eval time |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for arm in study.arms:
        done = [r for r in results if r.arm == arm and r.status == "ok"]
        if not done:
            rows.append(f"| {arm} | 0 | – | – | – |")
            continue
        rows.append(
            f"| {arm} | {len(done)} | {done[0].tokens:,} | {np.median([r.train_s for r in done]):.0f} s | "
            f"{np.median([r.eval_s for r in done]):.0f} s |"
        )
    return "\n".join(rows)


def report_text(study: Study, results: list[RunResult], plots: list[Path], command: str) -> str:
    failed = [r for r in results if r.status != "ok"]
    compared = differences(study, results)
    adjusted = holm_adjusted(compared)
    family = sum(not math.isnan(p) for p in adjusted.values())
    lines = [
        f"# Study: {study.name}",
        "",
        study.question,
        "",
        f"Command: `{command}`  ",
        f"Size: {study.size}; seeds: {list(study.seeds)}; baseline: {study.baseline}; "
        f"runs: {len(results)} ({len(results) - len(failed)} finished, {len(failed)} failed).",
        "",
        SEED_NOTE + " Intervals are t-based 95% confidence intervals over seeds; a difference is arm − "
        'baseline per seed, over the seeds both finished. The verdict is "better" or "worse" when the '
        'difference\'s interval excludes 0, else "no difference detected at n=<pairs>".',
        "",
        f"This study makes {family} comparisons (metrics x arms against the baseline), so some of those verdicts "
        "are expected by chance at 95% each. The adjusted verdict is Holm's over all of them (paired t-test "
        "p-values, multiplied step-down so that the chance of any false call in the study stays at 5%): a "
        "claim should rest on it.",
        "",
    ]
    for metric, direction in study.metrics.items():
        table = metric_table(study, results, metric, compared, adjusted)
        lines += [f"## {metric} ({direction} is better)", "", table, ""]
        values = {v for arm in study.compared for v in by_seed(results, arm, metric).values()}
        if not values:
            lines += [f"No run wrote {metric!r} to its metrics.json.", ""]
        elif len(values) == 1:
            lines += [f"Every run scored {values.pop():.4g}: this comparison answers nothing at this size.", ""]
    if steps := learning_steps(study, results):
        lines += steps
    lines += ["## Cost", "", cost_table(study, results), ""]
    if failed:
        lines += ["## Failed runs", "", "| arm | seed | error |", "| --- | --- | --- |"]
        lines += [f"| {r.arm} | {r.seed} | {(r.error or '').replace('|', '/')} |" for r in failed]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += ["", "Every run's numbers: [results.csv](results.csv); TensorBoard: `tensorboard --logdir runs`."]
    return "\n".join(lines) + "\n"


LEARNING_THRESHOLDS = (0.5, 0.9)


def learning_steps(study: Study, results: list[RunResult]) -> list[str] | None:
    """Report lines: per run, the first in-training evaluation at which the study's main (first)
    metric reached each threshold, when that metric is an evaluation suite's proportion (`eval/...`)
    that the runs logged during training (an `EvaluationCallback`). A claim about learning an ability
    faster is about this step, not only the final value; the objective's own `val/acc` makes no such claim."""
    metric = next(iter(study.metrics))
    if not (metric.startswith("eval/") and UNIT_INTERVAL.match(metric.rsplit("/", 1)[-1])):
        return None
    rows = []
    for arm in study.compared:
        for r in sorted((r for r in results if r.arm == arm and r.status == "ok" and r.run_dir), key=lambda r: r.seed):
            curve = scalars(r.run_dir).get(metric, {})
            if len(curve) < 2:
                continue
            steps = sorted(curve)
            first = [next((str(s) for s in steps if curve[s] >= t), "never") for t in LEARNING_THRESHOLDS]
            rows.append(f"| {arm} | {r.seed} | {' | '.join(first)} | {steps[-1]} | {curve[steps[-1]]:.3f} |")
    if not rows:
        return None
    reached = " | ".join(f"first eval >= {t:g}" for t in LEARNING_THRESHOLDS)
    return [
        f"## Learning steps: {metric}",
        "",
        "The step of the first in-training evaluation at which each run reached each level (never: not by its last).",
        "",
        f"| arm | seed | {reached} | last eval step | at the last eval |",
        "| --- | ---: |" + " ---: |" * (len(LEARNING_THRESHOLDS) + 2),
        *rows,
        "",
    ]


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of a run's TensorBoard events (the run dir's own files, not subfolders)."""
    out: dict[str, dict[int, float]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return out


def loss_targets(run_dir: Path | None) -> tuple[str | None, bool]:
    """What a run's `train/loss` is computed on when other policies share it (its policy's
    `loss_targets`, None: a choice of its own), and whether its `val/loss` is on a task of its own
    (`validation_policy`) rather than its objective's shared validation. A run without a config
    (hand-made in tests) counts as shared."""
    config = run_dir / "config.yaml" if run_dir else None
    if config is None or not config.is_file():
        return "unknown", False
    data = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("init_args", {})
    masking = data.get("masking") or {"class_path": "datamodules.policies.standard.NoMask"}
    module, _, name = masking["class_path"].rpartition(".")
    policy = getattr(importlib.import_module(module), name)(**(masking.get("init_args") or {}))
    ratio = data.get("val_mask_ratio", 0.15)
    return policy.loss_targets, isinstance(policy, MaskingPolicy) and policy.validation_policy(ratio) is not None


def curve_panels(study: Study, results: list[RunResult]) -> list[tuple[str, list[str], str]]:
    """(tag, arms, title) per panel: one loss drawn on one axis only for arms whose losses are on the
    same targets. `train/loss` of a policy that chooses its own targets (MLM, second-to-last, MEAP-SFT)
    compares with no other arm's, so it gets a panel of its own; so does a `val/loss` on an arm's own task."""
    kinds = {r.arm: loss_targets(r.run_dir) for r in results if r.status == "ok"}
    panels = []
    for tag, key in (("val/loss", lambda arm: "shared" if not kinds[arm][1] else arm), ("train/loss", None)):
        groups: dict[str, list[str]] = {}
        for arm in (a for a in study.compared if a in kinds):
            shared = key(arm) if key else kinds[arm][0] or arm
            groups.setdefault(shared, []).append(arm)
        for shared, arms in groups.items():
            if len(groups) == 1:
                title = f"{tag}: same targets for every arm"
            elif shared in arms:
                title = f"{tag} of {arms[0]}: on its own targets, not comparable with other panels"
            else:
                title = f"{tag} on {shared}: comparable within this panel only"
            panels.append((tag, arms, title))
    return panels


def reference_line(ax: Any, level: float, label: str) -> None:
    """A dashed line at `level` (chance, the unigram predictor), labelled at its right end."""
    ax.axhline(level, color="grey", linestyle="--", linewidth=1)
    ax.annotate(  # outside the axes, right of the line's end: it covers no data
        label.replace(" (", "\n("), (1.01, level), xycoords=("axes fraction", "data"), va="center", fontsize=7
    )


def unigram_level(results: list[RunResult], arms: list[str], metric: str) -> float | None:
    """The unigram predictor's score on the validation targets (`val/unigram_*`, logged by runs since
    issue 21), averaged over the arms' runs; None when their runs did not log it."""
    name = {"val/loss": "val/unigram_loss", "val/ppl": "val/unigram_ppl", "val/acc": "val/unigram_acc"}.get(metric)
    values = [r.metrics[name] for r in results if r.arm in arms and r.status == "ok" and name in r.metrics]
    return float(np.mean(values)) if values else None


def evaluation_panels(study: Study, runs: dict[Path, dict[str, dict[int, float]]]) -> list[tuple[str, list[str], str]]:
    """(tag, arms, title) per study metric of a suite that the runs evaluated during training (an
    `EvaluationCallback`): the curve a claim about learning faster is about, beside the losses."""
    return [
        (metric, study.compared, f"{metric} during training ({study.metrics[metric]} is better)")
        for metric in study.metrics
        if metric.startswith("eval/") and any(len(run.get(metric, {})) > 1 for run in runs.values())
    ]


def learning_curves(study: Study, results: list[RunResult], tokens_per_step: dict[str, int]):
    """train/loss and val/loss against tokens, and the study's metrics evaluated during training: the
    mean over seeds, and the band from the lowest to the highest seed, per arm; losses on different
    targets in different panels; the unigram predictor's validation loss and a suite's chance level as
    lines where known. None when no run logged a loss."""
    runs = {r.run_dir: scalars(r.run_dir) for r in results if r.status == "ok" and r.run_dir}
    if not any(tag in run for run in runs.values() for tag in CURVES):
        return None
    panels = curve_panels(study, results) + evaluation_panels(study, runs)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(6 * columns, 4.2 * rows + 0.6), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    handles = {}
    for ax, (tag, arms, title) in zip(axes.flat, panels):
        for arm in arms:
            colour = f"C{study.compared.index(arm)}"
            curves = [runs[r.run_dir].get(tag, {}) for r in results if r.arm == arm and r.run_dir in runs]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
            if not steps:
                continue
            values = np.array([[c[s] for s in steps] for c in curves])  # [seeds, steps]
            x = np.array(steps) * tokens_per_step[arm]
            (handles[arm],) = ax.plot(x, values.mean(0), color=colour, label=f"{arm} (n={len(curves)})")
            ax.fill_between(x, values.min(0), values.max(0), color=colour, alpha=0.2)
        if tag == "val/loss" and (level := unigram_level(results, arms, tag)) is not None:
            reference_line(ax, level, f"unigram predictor ({level:.3g})")
        elif tag.startswith("eval/") and (level := reference_level(results, arms, tag)) is not None:
            reference_line(ax, *level)
        ax.set_xlabel("tokens trained")
        ax.set_ylabel(tag)
        ax.set_title(f"{title}\nmean over seeds, band = lowest to highest seed", fontsize=9)
        ax.grid(alpha=0.3)
    if handles:  # below the panels, where it covers no curve
        figure.legend(handles.values(), [h.get_label() for h in handles.values()], loc="outside lower center", ncols=4)
    return figure


PERPLEXITY = re.compile(r"(^|_)ppl$")  # val/ppl, eval/ppl/pseudo_ppl: spans orders of magnitude, drawn on a log axis
# a proportion (not a gain, the difference of two): its interval lies in [0, 1]
UNIT_INTERVAL = re.compile(r"^(?!.*_gain$).*(^|_)(acc|accuracy|share|recall|f1)(_|$)")


def whiskers(metric: str, e: Estimate) -> tuple[float, float]:
    """The 95% interval as drawn: clipped to the values the metric can take (a proportion to [0, 1],
    a perplexity to >= 1), since a t interval over 3 seeds can reach past them."""
    name = metric.rpartition("/")[2]
    low, high = e.low, e.high
    if UNIT_INTERVAL.search(name):
        low, high = max(low, 0.0), min(high, 1.0)
    if PERPLEXITY.search(name):
        low = max(low, 1.0)
    return low, high


def run_chance(results: list[RunResult], arms: list[str], metric: str) -> float | None:
    """Chance for an accuracy whose suite wrote it beside the accuracies, because it depends on the run's
    data (`eval/recall/chance`, 1/pairs); None unless every run of the arms wrote the same level."""
    group, _, name = metric.rpartition("/")
    if not (group.startswith("eval/") and name != "chance" and UNIT_INTERVAL.search(name)):
        return None
    levels = {r.metrics.get(f"{group}/chance") for r in results if r.arm in arms and r.status == "ok"}
    return levels.pop() if len(levels) == 1 and None not in levels else None


def reference_level(results: list[RunResult], arms: list[str], metric: str) -> tuple[float, str] | None:
    """The level at which a metric says nothing was learnt, where it is known: the unigram predictor's
    for the final validation (when every run validates on its objective's shared task, so one level fits
    all), chance for a suite that knows it or wrote it."""
    shared = not any(loss_targets(r.run_dir)[1] for r in results if r.arm in arms and r.status == "ok")
    if shared and (level := unigram_level(results, arms, metric)) is not None:
        return level, f"unigram predictor ({level:.3g})"
    if (level := chance_level(metric)) is not None or (level := run_chance(results, arms, metric)) is not None:
        return level, f"chance ({level:.3g})"
    return None


def metric_bars(study: Study, results: list[RunResult]):
    """One panel per metric: each arm's mean with its 95% CI whiskers (clipped to the metric's range),
    and the seeds as dots; perplexities on a log axis; the chance or unigram level as a line."""
    metrics = list(study.metrics)
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    width = max(4.5, 1.1 * len(study.compared) + 2)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    arms = study.compared
    for ax, metric in zip(axes.flat, metrics):
        name = metric.rpartition("/")[2]
        log = bool(PERPLEXITY.search(name))
        clipped = False
        for i, arm in enumerate(arms):
            values = list(by_seed(results, arm, metric).values())
            e = estimate(values)
            if e.n == 0:
                continue
            low, high = whiskers(metric, e) if e.n > 1 else (e.mean, e.mean)
            clipped |= e.n > 1 and (low, high) != (e.low, e.high)
            error = [[max(e.mean - low, 0)], [max(high - e.mean, 0)]]
            ax.errorbar(i, e.mean, yerr=error, fmt="_", markersize=22, capsize=8, color=f"C{i}", linewidth=2)
            ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
        if (level := reference_level(results, arms, metric)) is not None:
            reference_line(ax, *level)
        if log:
            ax.set_yscale("log")
        if UNIT_INTERVAL.search(name):  # no axis below 0 or far above 1 for a proportion
            bottom, top = ax.get_ylim()
            ax.set_ylim(max(bottom, -0.02), min(max(top, 0.1), 1.02))
        ax.set_xticks(
            range(len(arms)), arms, rotation=20 if len(arms) > 3 else 0, ha="right" if len(arms) > 3 else "center"
        )
        ax.set_xlim(-0.6, len(arms) - 0.4)
        ax.set_ylabel(metric + (" (log scale)" if log else ""))
        note = " (clipped to the metric's range)" if clipped else ""
        ax.set_title(f"{metric} ({study.metrics[metric]} is better)\nmean, 95% CI{note}, dots = seeds", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def suite_group(study: Study, suite: str) -> str:
    """The results group of `suite` that the study compares (`needle@pg_essays` when its evaluate args
    name other data), else the suite's own name."""
    groups = [key.split("/")[1] for key in study.metrics if key.startswith(f"eval/{suite}")]
    return groups[0] if groups else suite


def retrieval_by_position(study: Study, results: list[RunResult]):
    """Retrieval accuracy by the gold item's position, per task, each arm's mean over seeds with 95%
    CI whiskers; None when no run has per-position retrieval metrics."""
    group = suite_group(study, "retrieval")
    found = {
        (m["task"], int(m["position"]))
        for r in results
        for key in r.metrics
        if (m := POSITION_KEY.match(key)) and key.startswith(f"eval/{group}/")
    }
    if not found:
        return None
    tasks = sorted({task for task, _ in found})
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        positions = sorted(p for t, p in found if t == task)
        spacing = min(np.diff(positions), default=1)
        for i, arm in enumerate(study.compared):
            estimates = [
                estimate(list(by_seed(results, arm, f"eval/{group}/{task}/acc_position_{p}").values()))
                for p in positions
            ]
            means = np.array([e.mean for e in estimates])
            drawn = [whiskers("acc", e) if e.n > 1 else (e.mean, e.mean) for e in estimates]  # within [0, 1]
            errors = np.array(
                [
                    [e.mean - low for e, (low, _) in zip(estimates, drawn)],
                    [high - e.mean for e, (_, high) in zip(estimates, drawn)],
                ]
            )
            offset = (i - (len(study.compared) - 1) / 2) * 0.06 * spacing  # arms side by side at each position
            ax.errorbar(
                np.array(positions) + offset, means, yerr=errors, marker="o", capsize=4, color=f"C{i}", label=arm
            )
        ax.set_xticks(positions)
        ax.set_xlim(positions[0] - 0.5 * spacing, positions[-1] + 0.5 * spacing)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("position of the gold item (1 = first)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"retrieval ({task}) by gold position: mean, 95% CI over seeds")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the axes: it covers no curve
    figure.tight_layout()
    return figure


def needle_heatmaps(study: Study, results: list[RunResult]):
    """Each arm's needle exact match by depth x length, averaged over seeds, side by side on one
    colour scale; None when no run has a needle result."""
    group = suite_group(study, "needle")
    grids = {}
    for arm in study.compared:
        found = [
            json.loads(path.read_text())
            for r in results
            if r.arm == arm
            and r.status == "ok"
            and r.run_dir
            and (path := r.run_dir / "eval" / f"{group}.json").is_file()
        ]
        if found and all("exact_match" in f for f in found):
            grids[arm] = (np.mean([f["exact_match"] for f in found], axis=0), found[0], len(found))
    if not grids:
        return None
    figure, axes = plt.subplots(
        1, len(grids), figsize=(3.6 * len(grids) + 1.5, 4.4), squeeze=False, sharey=True, layout="constrained"
    )
    for ax, (arm, (grid, details, n)) in zip(axes[0], grids.items()):
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (row, col), value in np.ndenumerate(grid):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(details["lengths"])), [str(n_) for n_ in details["lengths"]])
        ax.set_yticks(range(len(details["depths"])), [f"{100 * d:.0f}%" for d in details["depths"]])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(f"{arm}: mean of {n} seed(s)")
    axes[0][0].set_ylabel("needle depth")
    figure.colorbar(image, ax=list(axes[0]), label="exact match")
    figure.suptitle("needle in a haystack: exact match by depth and length")
    return figure


def flat(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat(value, f"{name}.")
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) or value is None else json.dumps(value)
    return out


RUN_SPECIFIC = (
    "seed",
    "seed_everything",
    "runs_dir",
    "experiment",
    "ckpt_path",
    "init_from",
    "tokenizer_path",
    "config",
)


def write_hparams(study: Study, results: list[RunResult]) -> None:
    """Each finished run's hyperparameters (arm, seed, and every config key whose value differs
    between the study's runs) and final study metrics, into `<run>/hparams/` for TensorBoard's
    HParams dashboard. Rewritten on every report, so it always matches results.csv."""
    done = [r for r in results if r.status == "ok" and r.run_dir and (r.run_dir / "config.yaml").is_file()]
    configs = {r.run_dir: flat(yaml.safe_load((r.run_dir / "config.yaml").read_text())) for r in done}
    keys = sorted({k for c in configs.values() for k in c})
    varying = [
        k for k in keys if len({json.dumps(c.get(k)) for c in configs.values()}) > 1 and not k.endswith(RUN_SPECIFIC)
    ]
    # a key set in some runs only (or of mixed types) is given as text, so that one hparam has one type
    as_text = {k for k in varying if len({type(c.get(k)) for c in configs.values()}) > 1}
    for r in done:
        folder = r.run_dir / "hparams"
        shutil.rmtree(folder, ignore_errors=True)
        values = {k: configs[r.run_dir].get(k) for k in varying}
        hparams = {"arm": r.arm, "seed": r.seed} | {k: str(v) if k in as_text else v for k, v in values.items()}
        metrics = {f"hparams/{m}": float(r.metrics[m]) for m in study.metrics if m in r.metrics}
        metrics["hparams/train_s"] = r.train_s
        with SummaryWriter(str(folder)) as writer:
            writer.add_hparams(hparams, metrics, run_name=".")


def write_report(
    study: Study, tokens_per_step: dict[str, int], outcomes: list[Any], folder: Path, command: str
) -> Path:
    """results.csv, report.md, plots/ and the HParams records of a study folder; returns report.md."""
    results = collect(outcomes)
    write_csv(results, folder / "results.csv")
    (folder / "plots").mkdir(exist_ok=True)
    figures = {
        "learning_curves": learning_curves(study, results, tokens_per_step),
        "metrics": metric_bars(study, results),
        "retrieval_by_position": retrieval_by_position(study, results),
        "needle": needle_heatmaps(study, results),
    }
    plots = []
    for name, figure in figures.items():
        if figure is None:
            continue
        plots.append(folder / "plots" / f"{name}.png")
        figure.savefig(plots[-1], dpi=120, bbox_inches="tight")
        plt.close(figure)
    write_hparams(study, results)
    report = folder / "report.md"
    report.write_text(report_text(study, results, plots, command))
    return report
