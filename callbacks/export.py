"""Write what a finished run leaves behind: `hf_model/` and `metrics.json`."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from datamodules.tokenizer import exported_tokenizer
from evaluation.result import update_metrics_json


def scalar_metrics(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """The finite scalars among Lightning's logged metrics."""
    out = {}
    for name, value in metrics.items():
        value = float(value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value)
        if math.isfinite(value):
            out[name] = value
    return out


def exported_state_dict(sharded: nn.Module) -> dict[str, torch.Tensor]:
    """The transformers model's full state dict (`LightningModule.model`, without that prefix)
    gathered from a sharded (FSDP) LightningModule; every rank must call it. On a GPU the full
    tensors are gathered to CPU memory on rank 0 only (the other ranks get {}), so a model whose
    unsharded size exceeds one GPU still exports."""
    on_gpu = any(p.is_cuda for p in sharded.parameters())
    options = StateDictOptions(full_state_dict=True, cpu_offload=on_gpu)  # FSDP's CPU offload needs a GPU
    full = get_model_state_dict(sharded, options=options)
    return {name.removeprefix("model."): value for name, value in full.items() if name.startswith("model.")}


class ExportCallback(L.Callback):
    """At the end of `fit`, save the model and tokenizer with `save_pretrained` into
    `<run dir>/hf_model/` (loadable with transformers' Auto classes) and the final metrics into
    `<run dir>/metrics.json`."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = Path(trainer.log_dir)  # a collective under DDP: every rank must ask
        state = None  # None = the exported model's own (whole) parameters
        if isinstance(trainer.strategy, FSDPStrategy):  # each rank holds a shard: gather (a collective)
            state = exported_state_dict(trainer.strategy.model)
        if not trainer.is_global_zero:
            return
        export_dir = run_dir / "hf_model"
        model = pl_module.export_model()
        model.save_pretrained(export_dir, state_dict=state)
        exported_tokenizer(trainer.datamodule.tokenizer, pl_module.objective, model.config).save_pretrained(export_dir)
        update_metrics_json(run_dir / "metrics.json", scalar_metrics(trainer.callback_metrics))
