"""AMLM: turn the model's per-type accuracy (or loss) into per-type masking weights.

Edman & Fraser 2025, "Adaptive masking for MLM" (arXiv 2510.20475). Every step, the statistics of
the labelled positions are added into vocabulary-sized counters on the device (no host sync);
every `every_n_batches` optimiser steps the counters are all-reduced across ranks and turned into
new weights for `datamodules.policies.adaptive.AdaptiveMLMMask`, then reset.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from callbacks.policy_driver import PolicyDriver
from core.errors import raise_if_any
from datamodules.policies.adaptive import AdaptiveMLMMask
from lightning_modules.base import IGNORE_INDEX, TokenStats
from lightning_modules.teacher import load_teacher

COUNTERS = ("correct", "seen", "masked_loss", "masked_seen", "entropy", "entropy_seen")


def difficulty_targets(counters: dict[str, Tensor], scoring: str, ratio: float, selection: str = "high") -> Tensor:
    """target_t per type, before smoothing: p · score_t, or p · (1 − score_t) for `selection="low"`.

    accuracy ("hard"): score_t = 1 − acc_t, acc_t = (correct_t + 0.5) / (seen_t + 1).
    loss ("soft"): mean loss at [MASK] inputs with one pseudo-observation of log V, divided by
        log V, min–max normalised over the vocabulary.
    entropy: like loss, with the mean predictive entropy at labelled positions.
    """
    vocab_size = len(counters["seen"])
    if scoring == "accuracy":
        score = 1 - (counters["correct"].double() + 0.5) / (counters["seen"].double() + 1)
    else:
        total, count = {"loss": ("masked_loss", "masked_seen"), "entropy": ("entropy", "entropy_seen")}[scoring]
        log_v = math.log(vocab_size)
        mean = (counters[total].double() + log_v) / (counters[count].double() + 1) / log_v
        score = (mean - mean.min()) / (mean.max() - mean.min()).clamp_min(1e-12)
    return (ratio * (score if selection == "high" else 1 - score)).float()


def update_weights(weights: Tensor, targets: Tensor, ratio: float, smoothing: float, floor: float) -> Tensor:
    """w ← λ·w + (1−λ)·target; w ← max(w, floor); w ← p·V·w / Σw (mean over the vocabulary = p)."""
    smoothed = (smoothing * weights + (1 - smoothing) * targets).clamp_min(floor)
    return ratio * len(smoothed) * smoothed / smoothed.sum()


class AdaptiveMaskingCallback(PolicyDriver):
    """Learns the per-type masking weights of `AdaptiveMLMMask` from the model's difficulty.

    Args:
        every_n_batches: optimiser steps between weight updates (the first at that step, not 0).
        scoring: ``"accuracy"`` (the paper's "hard"), ``"loss"`` ("soft") or ``"entropy"``
            (mean predictive entropy per type, for entropy-aware masking).
        selection: ``"high"`` masks the hardest (least accurate, highest loss / entropy) types most,
            ``"low"`` the easiest.
        smoothing: λ, the weight of the old value in w ← λ·w + (1−λ)·target.
        floor: lowest weight a type can get, so that no type is never masked.
        log_top_k: hardest / easiest types shown in the TensorBoard text panel.
        entropy_source: with ``scoring="entropy"``: the model being trained (``"self"``) or a
            frozen ``"teacher"``, run on the same masked batch.
        teacher_path: local masked-LM folder for ``entropy_source="teacher"`` (same vocabulary).
    """

    drives = AdaptiveMLMMask

    def __init__(
        self,
        every_n_batches: int = 200,
        scoring: Literal["accuracy", "loss", "entropy"] = "accuracy",
        selection: Literal["high", "low"] = "high",
        smoothing: float = 0.2,
        floor: float = 0.005,
        log_top_k: int = 20,
        entropy_source: Literal["self", "teacher"] = "self",
        teacher_path: str | None = None,
    ) -> None:
        errors = []
        if entropy_source not in ("self", "teacher"):
            errors.append(f"AdaptiveMaskingCallback.entropy_source must be 'self' or 'teacher', got {entropy_source!r}")
        if entropy_source == "teacher" and not teacher_path:
            errors.append("AdaptiveMaskingCallback.teacher_path is required with entropy_source='teacher'")
        if every_n_batches < 1:
            errors.append(f"AdaptiveMaskingCallback.every_n_batches must be >= 1, got {every_n_batches}")
        if scoring not in ("accuracy", "loss", "entropy"):
            errors.append(f"AdaptiveMaskingCallback.scoring must be 'accuracy', 'loss' or 'entropy', got {scoring!r}")
        if selection not in ("high", "low"):
            errors.append(f"AdaptiveMaskingCallback.selection must be 'high' or 'low', got {selection!r}")
        if not 0 <= smoothing < 1:
            errors.append(f"AdaptiveMaskingCallback.smoothing must be in [0, 1), got {smoothing}")
        if floor < 0:
            errors.append(f"AdaptiveMaskingCallback.floor must be >= 0, got {floor}")
        raise_if_any(errors)
        self.every_n_batches, self.scoring, self.selection = every_n_batches, scoring, selection
        self.smoothing, self.floor = smoothing, floor
        self.log_top_k = log_top_k
        self.entropy_source, self.teacher_path, self.teacher = entropy_source, teacher_path, None
        self.counters: dict[str, Tensor] = {}
        self.last_update_step = 0

    # ---- set-up ------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        policy = self.policy = self.find_policy(trainer)
        if self.floor >= policy.ratio:
            raise_if_any([f"AdaptiveMaskingCallback.floor={self.floor} must be below the mask ratio {policy.ratio}"])
        if self.scoring == "entropy" and self.entropy_source == "teacher":
            if self.teacher is None:
                self.teacher = load_teacher(
                    self.teacher_path, pl_module.vocab["tokens"], "AdaptiveMaskingCallback.teacher_path"
                )
        else:
            pl_module.collect_entropy = pl_module.collect_entropy or self.scoring == "entropy"
        if not self.counters:
            self._reset(len(policy.weights), pl_module.device)

    def _reset(self, vocab_size: int, device: torch.device) -> None:
        self.counters = {
            name: torch.zeros(
                vocab_size, dtype=torch.float32 if name in ("masked_loss", "entropy") else torch.int64, device=device
            )
            for name in COUNTERS
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counters = {name: c.to(pl_module.device) for name, c in self.counters.items()}

    # ---- every step: accumulate on the device ------------------------------------------------

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stats = outputs["token_stats"]
        if self.teacher is not None:
            stats = dataclasses.replace(stats, entropy=self.teacher_entropy(pl_module, batch, stats))
        self.accumulate(stats, pl_module.vocab["mask_token_id"])
        step = trainer.global_step  # optimiser steps; equal across the micro-batches of one step
        if step % self.every_n_batches == 0 and step > self.last_update_step:
            self.update(trainer, pl_module)
            self.last_update_step = step

    @torch.no_grad()
    def teacher_entropy(self, pl_module: L.LightningModule, batch: dict[str, Tensor], stats: TokenStats) -> Tensor:
        """The teacher's predictive entropy at the labelled positions of the same masked batch."""
        teacher = self.teacher.to(batch["input_ids"].device)
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, _ = pl_module.align(logits, batch["labels"])
        return pl_module.labelled_entropy(logits, stats.labels != IGNORE_INDEX)

    def accumulate(self, stats: TokenStats, mask_id: int | None) -> None:
        labelled = stats.labels != IGNORE_INDEX  # [B, L']
        types = stats.labels[labelled]  # [N]
        c = self.counters
        c["seen"].index_add_(0, types, torch.ones_like(types))
        c["correct"].index_add_(0, types, stats.correct[labelled].long())
        at_mask = stats.inputs[labelled] == mask_id  # soft scoring counts [MASK] inputs only
        c["masked_seen"].index_add_(0, types, at_mask.long())
        c["masked_loss"].index_add_(0, types, stats.loss[labelled].float() * at_mask)
        if stats.entropy is not None:
            c["entropy_seen"].index_add_(0, types, torch.ones_like(types))
            c["entropy"].index_add_(0, types, stats.entropy[labelled].float())

    # ---- every N steps: new weights ----------------------------------------------------------

    def update(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        policy = self.policy
        counters = {name: trainer.strategy.reduce(c.clone(), reduce_op="sum") for name, c in self.counters.items()}
        targets = difficulty_targets(counters, self.scoring, policy.ratio, self.selection)
        weights = update_weights(policy.weights.to(targets.device), targets, policy.ratio, self.smoothing, self.floor)
        policy.weights.copy_(weights.cpu())
        self._log(trainer, pl_module, policy.weights, counters)
        for c in self.counters.values():
            c.zero_()

    def _log(
        self, trainer: L.Trainer, pl_module: L.LightningModule, weights: Tensor, counters: dict[str, Tensor]
    ) -> None:
        """`mask/prob_mean` / `mask/prob_std`: mean and spread of the masking probability a token
        occurrence gets, p · w_t / E[w] with E over the occurrences of the last window (sampling
        renormalises per sequence, so w_t itself is only a relative weight)."""
        frequency = counters["seen"].double().cpu()
        frequency = frequency / frequency.sum().clamp_min(1)
        w = weights.double()
        mean_w = (frequency * w).sum().clamp_min(1e-12)
        effective = self.policy.ratio * w / mean_w
        mean = (frequency * effective).sum()
        std = (frequency * (effective - mean) ** 2).sum().sqrt()
        pl_module.log_dict({"mask/prob_mean": mean.float(), "mask/prob_std": std.float()})
        experiment = getattr(trainer.logger, "experiment", None)
        if trainer.is_global_zero and hasattr(experiment, "add_histogram"):
            experiment.add_histogram("mask/type_weights", weights, trainer.global_step)
            experiment.add_text("mask/hardest_easiest", self._table(trainer, weights, counters), trainer.global_step)

    def _table(self, trainer: L.Trainer, weights: Tensor, counters: dict[str, Tensor]) -> str:
        """Markdown: the types with the highest and lowest weight among those seen this window."""
        seen = counters["seen"].cpu()
        candidates = (seen > 0).nonzero().squeeze(1)
        order = candidates[weights[candidates].argsort(descending=True)]
        tokenizer = trainer.datamodule.tokenizer
        accuracy = counters["correct"].cpu().double() / seen.clamp_min(1)
        rows = ["| rank | hardest | weight | acc | easiest | weight | acc |", "|---|---|---|---|---|---|---|"]
        k = min(self.log_top_k, len(order) // 2)
        for rank, (hard, easy) in enumerate(zip(order[:k].tolist(), order.flip(0)[:k].tolist()), 1):
            rows.append(
                f"| {rank} | `{tokenizer.decode([hard])!r}` | {weights[hard]:.4f} | {accuracy[hard]:.2f} "
                f"| `{tokenizer.decode([easy])!r}` | {weights[easy]:.4f} | {accuracy[easy]:.2f} |"
            )
        return "\n".join(rows)

    # ---- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "counters": {n: c.cpu() for n, c in self.counters.items()},
            "weights": self.policy.weights.clone(),
            "last_update_step": self.last_update_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after `setup`, before the first batch is collated: the
        # weights go straight into the policy so that batch already samples from them.
        self.counters = {n: c.clone() for n, c in state_dict["counters"].items()}
        self.policy.weights.copy_(state_dict["weights"])
        self.last_update_step = state_dict["last_update_step"]
