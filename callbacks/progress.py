"""A plain progress line for runs whose output goes to a file, where the progress bar never prints."""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L


class ProgressLine(L.Callback):
    """Print `step 120/300 (40%)  train/loss 3.214  val/loss 3.305  41 s, ~62 s left` every
    `every_n_steps` optimiser steps and at the last one.

    Args:
        every_n_steps: steps between two lines.
        when: "auto" prints only when stdout is not a terminal (a terminal has the progress bar),
            "always" and "never" do what they say.
    """

    def __init__(self, every_n_steps: int = 50, when: str = "auto") -> None:
        if every_n_steps < 1:
            raise ValueError(f"progress.every_n_steps must be >= 1, got {every_n_steps}")
        if when not in ("auto", "always", "never"):
            raise ValueError(f"progress.when must be auto, always or never, got {when!r}")
        self.every_n_steps = every_n_steps
        self.when = when
        self._start: tuple[float, int] | None = None
        self._printed_step = -1

    @property
    def enabled(self) -> bool:
        return self.when == "always" or (self.when == "auto" and not sys.stdout.isatty())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step, total = trainer.global_step, trainer.max_steps
        due = step % self.every_n_steps == 0 or step == total
        if not (due and step != self._printed_step and trainer.is_global_zero and self.enabled):
            return
        self._printed_step = step  # gradient accumulation: several batches end on the same step
        print(self.line(trainer), flush=True)

    def line(self, trainer: L.Trainer) -> str:
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"step {step}/{total} ({100 * step // total}%)" if total > 0 else f"step {step}"]
        for name in ("train/loss", "val/loss"):
            if (value := trainer.callback_metrics.get(name)) is not None:
                parts.append(f"{name} {float(value):.4g}")
        start_time, start_step = self._start or (time.perf_counter(), step)
        elapsed, done = time.perf_counter() - start_time, step - start_step
        timing = f"{elapsed:.0f} s"
        if total > 0 and done > 0:
            timing += f", ~{elapsed / done * (total - step):.0f} s left"
        return "  ".join([*parts, timing])
