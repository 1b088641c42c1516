"""Mask-ratio schedules: the ratio as a function of the optimiser step (AMLM decays 40% -> 15%)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L

from callbacks.policy_driver import PolicyDriver
from core.errors import raise_if_any


class MaskRatioSchedule(PolicyDriver):
    """Sets the masking policy's ratio before every training step, from `start` to `end` over
    `steps` optimiser steps (default: the whole run), then holds `end`.

    Works with every policy that has a ratio (random MLM, MEAP, AMLM, MEAP SFT, ...); one without
    (e.g. PenultimateTokenMask) is a config error. The ratio is a pure
    function of the optimiser step, so a resumed run continues on the same curve. A new value
    reaches the collate with the DataLoader's prefetch lag (one batch with `num_workers=0`).

    Args:
        start: ratio at step 0.
        end: ratio at the end of the schedule.
        shape: ``"linear"`` (the AMLM paper) or ``"cosine"``.
        steps: length of the schedule in optimiser steps; None = the whole run.
    """

    needs_ratio = True

    def __init__(
        self,
        start: float = 0.4,
        end: float = 0.15,
        shape: Literal["linear", "cosine"] = "linear",
        steps: int | None = None,
    ) -> None:
        errors = [
            f"MaskRatioSchedule.{k} must be in [0, 1], got {v}"
            for k, v in (("start", start), ("end", end))
            if not 0 <= v <= 1
        ]
        if end > start:
            errors.append(f"MaskRatioSchedule.end={end} is above start={start}: the schedule decays")
        if shape not in ("linear", "cosine"):
            errors.append(f"MaskRatioSchedule.shape must be 'linear' or 'cosine', got {shape!r}")
        if steps is not None and steps < 1:
            errors.append(f"MaskRatioSchedule.steps must be >= 1, got {steps}")
        raise_if_any(errors)
        self.start, self.end, self.shape, self.steps = start, end, shape, steps

    def ratio_at(self, step: int, total: int) -> float:
        progress = min(step / max(total, 1), 1.0)
        if self.shape == "cosine":
            progress = (1 - math.cos(math.pi * progress)) / 2
        return self.start + (self.end - self.start) * progress

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.policy = self.find_policy(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        total = self.steps or int(trainer.estimated_stepping_batches)
        self.policy.ratio = self.ratio_at(trainer.global_step, total)
