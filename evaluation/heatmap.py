"""The needle-style figure the needle, multi_needle and recall suites share: a score in [0, 1] by one
setting (rows) and the prompt or sequence length (columns), each cell labelled with its value."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def heatmap(grid: np.ndarray, rows: list[str], lengths: list[int], title: str, ylabel: str, score: str):
    """`grid` [rows, lengths] of `score` values, red (0) to green (1)."""
    figure, axes = plt.subplots(figsize=(1.1 * len(lengths) + 2.5, 0.35 * len(rows) + 1.5))
    image = axes.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (row, col), value in np.ndenumerate(grid):
        axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
    axes.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    axes.set_yticks(range(len(rows)), rows)
    axes.set_xlabel("length (tokens)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=score)
    figure.tight_layout()
    return figure
