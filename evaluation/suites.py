"""Suites by name, and where their results go: metrics.json keys, TensorBoard tags and files.

Used by `python -m experiments.evaluate` and by `EvaluationCallback`, so a finished run and a run
in training report the same numbers under the same names: metric `m` of suite `s` is the flat key
and TensorBoard tag `eval/s/m`; figure `f` is `<out>/s_f.png` and the TB image `eval/s/f`; the
suite's markdown is `<out>/s.md` and its extras `<out>/s.json`; `<out>/report.md` gathers every
suite evaluated so far.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from core.errors import ConfigError
from evaluation.model import LoadedModel
from evaluation.result import SuiteResult, update_metrics_json

# suite name -> module of the evaluation package (imported when first used: GLUE pulls in a Trainer)
SUITES = {
    "needle": "needle",
    "retrieval": "retrieval",
    "blimp": "blimp",
    "ppl": "perplexity",
    "glue": "glue",
    "attention": "attention",
}


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


def run_suites(loaded: LoadedModel, options: dict[str, Any]) -> dict[str, SuiteResult]:
    """Every suite in `options` (name -> Options), in order, on `loaded`."""
    return {name: suite_module(name).run(loaded, suite_options) for name, suite_options in options.items()}


def flat_metrics(results: dict[str, SuiteResult]) -> dict[str, float]:
    return {
        f"eval/{suite}/{name}": value for suite, result in results.items() for name, value in result.metrics.items()
    }


def save_results(
    results: dict[str, SuiteResult], out_dir: Path, metrics_file: Path | None, writer: Any = None, step: int = 0
) -> Path:
    """Write figures, tables and extras under `out_dir`, merge the metrics into `metrics_file`
    (keeping every other key), and log scalars and images to a TensorBoard `writer` when given.
    Returns the report's path."""
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
    metrics = flat_metrics(results)
    if writer is not None:
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)
        writer.flush()
    if metrics_file is not None:
        update_metrics_json(metrics_file, metrics)
    report = out_dir / "report.md"
    report.write_text(report_text(out_dir))
    return report


def report_text(out_dir: Path) -> str:
    """Every suite evaluated into `out_dir` so far: a headline table, then each suite's section."""
    done = [suite for suite in SUITES if (out_dir / f"{suite}.md").is_file()]
    headline = [
        (suite, *next(iter(json.loads((out_dir / f"{suite}.json").read_text())["metrics"].items()))) for suite in done
    ]
    rows = [f"| {suite} | {name} | {value:.4g} |" for suite, name, value in headline]
    sections = [(out_dir / f"{suite}.md").read_text() for suite in done]
    return "\n".join(
        ["# Evaluation", "", "| suite | headline metric | value |", "| --- | --- | --- |", *rows, "", *sections]
    )
