"""Token-entropy analysis: which tokens carry the model's uncertainty, and where they sit.

A few tokens carry most of a language model's uncertainty: the high-entropy "forking" tokens
(Wang et al. 2025, arXiv 2506.01939, find ~20% of tokens above 0.672 nats in their models).
Entropy and accuracy by position within the sentence (..., -3, penultimate, last) show why a
position is worth masking: a position the model already predicts with certainty teaches little.

The summaries (`evaluation/entropy_summaries.py`) are shared with the `entropy` suite and
`python -m experiments.analyze_entropy` (JSON and plots, on a finished model).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from datamodules.masking import IGNORE_INDEX, TokenBlock
from datamodules.policies.sentence import rank_from_end
from evaluation.entropy_summaries import FORKING_THRESHOLD, by_position, forking_stats


class EntropyAnalysisCallback(L.Callback):
    """Every `every_n_steps` steps (from step 0), the model's predictive entropy on the first
    `batches` validation batches, logged under `analysis/`: mean entropy and accuracy, the
    forking-token share, entropy and accuracy of the last, penultimate, ... token of each
    sentence, and a histogram of token entropies.

    Validation batches are the same for every policy of an objective (a fixed uniform 15% mask
    for MLM, clean text for causal models), so runs with different policies compare directly.

    Args:
        every_n_steps: analyse every this many optimiser steps.
        batches: validation batches per analysis.
        forking_threshold: entropy (nats) above which a token counts as forking.
        max_offset: positions from the sentence end logged one by one.
    """

    def __init__(
        self,
        every_n_steps: int = 250,
        batches: int = 2,
        forking_threshold: float = FORKING_THRESHOLD,
        max_offset: int = 3,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"EntropyAnalysisCallback.every_n_steps must be >= 1, got {every_n_steps}")
        if batches < 1:
            raise ValueError(f"EntropyAnalysisCallback.batches must be >= 1, got {batches}")
        self.every_n_steps = every_n_steps
        self.batches = batches
        self.forking_threshold = forking_threshold
        self.max_offset = max_offset

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps or not trainer.is_global_zero:
            return
        entropy, correct, loss, rank = self.measure(trainer, pl_module)
        metrics = {
            "analysis/entropy_mean": entropy.mean().item(),
            "analysis/accuracy": correct.float().mean().item(),
            **{f"analysis/{k}": v for k, v in forking_stats(entropy, correct, self.forking_threshold).items()},
        }
        for bucket in by_position(entropy, correct, loss, rank, self.max_offset)[1:-1]:
            if bucket["count"]:
                metrics[f"analysis/entropy_{bucket['name']}"] = bucket["mean_entropy"]
                metrics[f"analysis/acc_{bucket['name']}"] = bucket["accuracy"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if hasattr(logger.experiment, "add_histogram"):  # TensorBoard
                logger.experiment.add_histogram("analysis/entropy", entropy, trainer.global_step)

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """[N] entropy, correct, loss and sentence-end rank of every labelled regular token."""
        data = trainer.datamodule
        rows = self.batches * data.batch_size
        batch = {k: v[:rows].to(pl_module.device) for k, v in data.val_batches.items()}
        was_training = pl_module.training
        pl_module.eval()
        collect, pl_module.collect_entropy = pl_module.collect_entropy, True
        try:
            _, stats = pl_module.step(batch)
        finally:
            pl_module.collect_entropy = collect
            pl_module.train(was_training)
        # the original text (MLM labels hold the hidden tokens), to find each label's place in its sentence
        original = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"]).cpu()
        rank = rank_from_end(TokenBlock.from_ids(original, data.vocab))
        _, rank = pl_module.align(rank, rank)  # line up with the labels, as the module does
        labels = stats.labels.cpu()
        keep = (labels != IGNORE_INDEX) & ~data.vocab.is_special[labels.clamp_min(0)]  # [B, L'] regular targets
        return stats.entropy.cpu()[keep], stats.correct.cpu()[keep], stats.loss.cpu()[keep], rank[keep]
