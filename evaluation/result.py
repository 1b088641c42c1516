"""What a suite returns, and how results become metrics.json keys, TensorBoard tags and files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure


@dataclass
class SuiteResult:
    """One suite's numbers. Metric names are relative: `acc` of suite `needle` is stored as
    `eval/needle/acc` in metrics.json and TensorBoard."""

    metrics: dict[str, float]  # relative name -> value; the headline metric first
    figures: dict[str, Figure] = field(default_factory=dict)  # name -> figure: <suite>_<name>.png, TB image eval/<suite>/<name>
    table: str = ""  # markdown for the report (a table or a few lines), without a heading
    details: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable extras, written to eval/<suite>.json
