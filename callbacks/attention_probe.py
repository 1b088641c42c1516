"""MEAP's attention statistics during training, on a fixed probe batch.

MEAP (Zhuang et al. 2025, arXiv 2502.07490) explains its gains by what masking does to attention:
less attention on the masked positions, sharper attention on the rest. Logging both statistics
as training goes shows when (and whether) a model learns this. Definitions: `evaluation.attention`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from core.errors import ConfigError
from datamodules.masking import IGNORE_INDEX
from evaluation.attention import compare_runs, probe_mask


class AttentionProbeCallback(L.Callback):
    """Every `every_n_steps` optimiser steps (from step 0) and at the end of training, the
    masked-score decay and the variance increase of the training model on a fixed probe batch:
    the first `blocks` validation sequences (their original, unmasked text), against a copy with
    a fixed-seed share `mask_ratio` of its regular tokens replaced by [MASK].

    Logged as `attention/masked_score_decay` and `attention/variance_increase`, and per layer as
    `attention/masked_score_decay_layer<i>` and `attention/variance_increase_layer<i>` (1 = first).
    The probe runs in eval mode with eager attention (SDPA returns no weights); the training mode
    and the attention implementation are restored afterwards.

    Args:
        every_n_steps: probe every this many optimiser steps.
        blocks: validation sequences in the probe batch.
        mask_ratio: share of the probe's regular tokens replaced by [MASK] in the masked run.
        seed: seed of the probe mask.
    """

    def __init__(self, every_n_steps: int = 250, blocks: int = 4, mask_ratio: float = 0.15, seed: int = 0) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"AttentionProbeCallback.every_n_steps must be >= 1, got {every_n_steps}")
        if blocks < 1:
            raise ConfigError(f"AttentionProbeCallback.blocks must be >= 1, got {blocks}")
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"AttentionProbeCallback.mask_ratio must be in (0, 1), got {mask_ratio}")
        self.every_n_steps = every_n_steps
        self.blocks = blocks
        self.mask_ratio = mask_ratio
        self.seed = seed
        self.probe: Tensor | None = None  # [blocks, L] long, fixed on the first probe
        self.last_step: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.log_probe(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_probe(trainer, pl_module)

    def log_probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure and log once per global step, on rank zero."""
        if not trainer.is_global_zero or trainer.global_step == self.last_step:
            return
        self.last_step = trainer.global_step
        metrics = self.measure(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The two statistics, overall and per layer, keyed by their TensorBoard tags."""
        vocab = trainer.datamodule.vocab
        if self.probe is None:
            self.probe = self.probe_batch(trainer)
        ids = self.probe.to(pl_module.device)  # [blocks, L]
        is_masked = probe_mask(ids, vocab, self.mask_ratio, self.seed)
        was_training = pl_module.training
        pl_module.eval()
        try:
            decay, variance = compare_runs(pl_module.model, vocab, ids, is_masked, pl_module.objective == "causal")
        finally:
            pl_module.train(was_training)
        metrics = {"attention/masked_score_decay": decay.relative, "attention/variance_increase": variance.relative}
        for layer, (d, v) in enumerate(zip(decay.per_layer, variance.per_layer), start=1):
            metrics[f"attention/masked_score_decay_layer{layer}"] = d
            metrics[f"attention/variance_increase_layer{layer}"] = v
        return metrics

    def probe_batch(self, trainer: L.Trainer) -> Tensor:
        """[blocks, L] the original text of the first `blocks` validation sequences (MLM
        validation batches are masked; their labels hold the hidden tokens)."""
        rows: list[Tensor] = []
        for batch in trainer.datamodule.val_dataloader():
            rows += list(torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"]))
            if len(rows) >= self.blocks:
                break
        return torch.stack(rows[: self.blocks])
