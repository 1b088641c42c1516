"""What a suite returns, and the run's metrics.json that results are merged into."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


@dataclass
class SuiteResult:
    """One suite's numbers. Metric names are relative: `acc` of suite `needle` is stored as
    `eval/needle/acc` in metrics.json and TensorBoard."""

    metrics: dict[str, float]  # relative name -> value; the headline metric first
    figures: dict[str, Figure] = field(
        default_factory=dict
    )  # name -> figure: <suite>_<name>.png, TB image eval/<suite>/<name>
    table: str = ""  # markdown for the report (a table or a few lines), without a heading
    details: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable extras, written to eval/<suite>.json
    records: list[dict[str, Any]] = field(
        default_factory=list
    )  # one JSON line each (per-item outputs): eval/<suite>.jsonl


def update_metrics_json(path: Path, metrics: dict[str, float], replace: Iterable[str] = ()) -> dict[str, float]:
    """Merge `metrics` into the flat `{"name": value}` file at `path` (created if missing), first
    dropping its keys that start with any prefix in `replace` (a re-run suite's old results)."""
    prefixes = tuple(replace)
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged = {name: value for name, value in merged.items() if not (prefixes and name.startswith(prefixes))}
    merged.update({name: float(value) for name, value in metrics.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return merged
