"""Write what a finished run leaves behind: `hf_model/` and `metrics.json`."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from datamodules.tokenizer import framed_like_training
from evaluation.result import update_metrics_json


def scalar_metrics(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """The finite scalars among Lightning's logged metrics."""
    out = {}
    for name, value in metrics.items():
        value = float(value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value)
        if math.isfinite(value):
            out[name] = value
    return out


class ExportCallback(L.Callback):
    """At the end of `fit`, save the model and tokenizer with `save_pretrained` into
    `<run dir>/hf_model/` (loadable with transformers' Auto classes) and the final metrics into
    `<run dir>/metrics.json`."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = Path(trainer.log_dir)  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        export_dir = run_dir / "hf_model"
        pl_module.export_model().save_pretrained(export_dir)
        framed_like_training(trainer.datamodule.tokenizer, pl_module.objective).save_pretrained(export_dir)
        update_metrics_json(run_dir / "metrics.json", scalar_metrics(trainer.callback_metrics))
