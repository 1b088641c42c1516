"""Suites by name, and where their results go: metrics.json keys, TensorBoard tags and files.

Used by `python -m experiments.evaluate` and by `EvaluationCallback`, so a finished run and a run
in training report the same numbers under the same names. A suite's results form one *group*: `s`
on the suite's default data, `s@<tag>` when its options choose other data (`data_tag`), so results
on different data never share a key. Metric `m` of group `g` is the flat key and TensorBoard tag
`eval/g/m`; figure `f` is `<out>/g_f.png` and the TB image `eval/g/f`; the group's markdown is
`<out>/g.md`, its extras `<out>/g.json` and its per-item records (if any) `<out>/g.jsonl`;
`<out>/report.md` gathers every group evaluated so far.
Saving a group replaces all of its earlier keys in metrics.json (see docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from core.errors import ConfigError
from evaluation.model import LoadedModel
from evaluation.options import as_names
from evaluation.result import SuiteResult, update_metrics_json

# suite name -> module of the evaluation package (imported when first used: GLUE pulls in a Trainer)
SUITES = {
    "needle": "needle",
    "retrieval": "retrieval",
    "blimp": "blimp",
    "ppl": "perplexity",
    "glue": "glue",
    "attention": "attention",
    "second_to_last": "second_to_last",
    "entropy": "entropy",
    "recall": "recall",
    "multi_needle": "multi_needle",
    "hallucination": "hallucination",
}


# Options fields that choose which data a suite scores (not how it scores them); any of them away
# from its default gives the results a group of their own. Files are told apart by name.
DATA_FIELDS = {
    "needle": ("haystack",),
    "retrieval": ("data",),
    "blimp": ("paradigms",),
    "ppl": ("text",),
    "glue": ("tasks",),
    "attention": ("text",),
    "second_to_last": ("text",),
    "entropy": ("text",),
    "recall": (),
    "multi_needle": ("haystack",),
    "hallucination": ("data", "hf_dataset"),
}
MAX_TAG_NAMES = 3  # more names than this are shortened to the first one, a count and a hash


def suite_module(name: str) -> ModuleType:
    if name not in SUITES:
        raise ConfigError(f"unknown suite {name!r} (known: {', '.join(SUITES)})")
    return importlib.import_module(f"evaluation.{SUITES[name]}")


def parse_suites(names: str | list[str]) -> list[str]:
    """`"needle,ppl"` or `["needle", "ppl"]` -> checked names, in the given order."""
    listed = names.split(",") if isinstance(names, str) else list(names)
    chosen = [n.strip() for n in listed if n.strip()]
    unknown = [n for n in chosen if n not in SUITES]
    if unknown or not chosen:
        raise ConfigError(
            f"unknown suite(s) {', '.join(map(repr, unknown)) or '(none given)'} (known: {', '.join(SUITES)})"
        )
    return chosen


def options_for(name: str, values: dict[str, Any] | None) -> Any:
    """The suite's `Options` from plain values (a config file's), naming any unknown key."""
    options_class = suite_module(name).Options
    known = {f.name for f in dataclasses.fields(options_class)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise ConfigError(
            [
                f"{name}.{key} is not an option of suite {name!r} (options: {', '.join(sorted(known))})"
                for key in unknown
            ]
        )
    return options_class(**(values or {}))


def data_tag(name: str, options: Any) -> str | None:
    """None on the suite's default data; else a short label of the data: the files' names without
    suffixes (`nq-open-oracle`), or the chosen names (`wh_island`), joined by `+`."""
    fields = {f.name: f for f in dataclasses.fields(options)}
    names = []
    for key in DATA_FIELDS.get(name, ()):
        field = fields[key]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        value = getattr(options, key)
        if value is None or (default is not None and sorted(as_names(value)) == sorted(as_names(default))):
            continue
        names += sorted(re.sub(r"[^\w.-]", "_", Path(v).name.split(".")[0]) for v in as_names(value))
    if not names:
        return None
    if len(names) > MAX_TAG_NAMES:
        digest = hashlib.sha256("+".join(names).encode()).hexdigest()[:6]
        return f"{names[0]}+{len(names) - 1}more-{digest}"
    return "+".join(names)


PLACEHOLDER = re.compile(r"<[^<>/]+>")  # a part of a metric name that depends on the data: `acc_position_<p>`


def metric_names(name: str, options: Any, objective: str) -> list[str]:
    """The metric names (relative to the group) that suite `name` writes with `options` for a model of
    `objective` ("causal" or "mlm"), `<x>` standing for a part that depends on the data."""
    return suite_module(name).metric_names(options, objective)


def name_matches(template: str, name: str) -> bool:
    """Whether `name` is one that `template` (from `metric_names`) stands for."""
    return re.fullmatch(PLACEHOLDER.sub("[^/]+", re.escape(template)), name) is not None


def chance_level(metric: str) -> float | None:
    """The score of guessing at random, for an `eval/<group>/<name>` metric whose suite knows it
    (`CHANCE` in its module: BLiMP's 0.5, the needle value's ln(1/9000)); None elsewhere."""
    group, _, name = metric.removeprefix("eval/").partition("/")
    suite = group.partition("@")[0]
    if not metric.startswith("eval/") or suite not in SUITES:
        return None
    chance = getattr(suite_module(suite), "CHANCE", {})
    return next((level for template, level in chance.items() if name_matches(template, name)), None)


def group_name(name: str, options: Any) -> str:
    tag = data_tag(name, options)
    return f"{name}@{tag}" if tag else name


def run_suites(loaded: LoadedModel, options: dict[str, Any]) -> dict[str, SuiteResult]:
    """Every suite in `options` (name -> Options), in order, on `loaded`; keyed by result group."""
    return {
        group_name(name, suite_options): suite_module(name).run(loaded, suite_options)
        for name, suite_options in options.items()
    }


def flat_metrics(results: dict[str, SuiteResult]) -> dict[str, float]:
    return {
        f"eval/{group}/{name}": value for group, result in results.items() for name, value in result.metrics.items()
    }


def save_results(
    results: dict[str, SuiteResult], out_dir: Path, metrics_file: Path | None, writer: Any = None, step: int = 0
) -> Path:
    """Write figures, tables and extras under `out_dir`, put the metrics into `metrics_file` (each
    group's earlier keys replaced, every other key kept), and log scalars and images to a
    TensorBoard `writer` when given. Returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for suite, result in results.items():
        for name, figure in result.figures.items():
            figure.savefig(out_dir / f"{suite}_{name}.png", dpi=120)
            if writer is not None:
                writer.add_figure(f"eval/{suite}/{name}", figure, step, close=False)
            plt.close(figure)
        images = "".join(f"\n\n![{suite} {name}]({suite}_{name}.png)" for name in result.figures)
        (out_dir / f"{suite}.md").write_text(f"## {suite}\n\n{result.table}{images}\n")
        (out_dir / f"{suite}.json").write_text(
            json.dumps({"metrics": result.metrics, **result.details}, indent=2) + "\n"
        )
        if result.records:
            (out_dir / f"{suite}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.records))
    metrics = flat_metrics(results)
    if writer is not None:
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)
        writer.flush()
    if metrics_file is not None:
        update_metrics_json(metrics_file, metrics, replace=[f"eval/{group}/" for group in results])
    report = out_dir / "report.md"
    report.write_text(report_text(out_dir))
    return report


def report_text(out_dir: Path) -> str:
    """Every group evaluated into `out_dir` so far: a headline table, then each group's section."""
    suite_of = lambda group: group.split("@")[0]
    groups = [p.stem for p in out_dir.glob("*.md") if suite_of(p.stem) in SUITES and p.with_suffix(".json").is_file()]
    done = sorted(groups, key=lambda g: (list(SUITES).index(suite_of(g)), g))
    headline = [
        (group, *next(iter(json.loads((out_dir / f"{group}.json").read_text())["metrics"].items()))) for group in done
    ]
    rows = [f"| {group} | {name} | {value:.4g} |" for group, name, value in headline]
    sections = [(out_dir / f"{group}.md").read_text() for group in done]
    return "\n".join(
        ["# Evaluation", "", "| suite | headline metric | value |", "| --- | --- | --- |", *rows, "", *sections]
    )
