"""Per-position entropy-aware masking on the device (see datamodules/policies/entropy.py for why here)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from callbacks.policy_driver import PolicyDriver
from core.errors import raise_if_any
from datamodules.masking import TokenBlock, Vocab, corrupt_mlm
from datamodules.policies.entropy import EntropyPositionMask
from lightning_modules.base import predictive_entropy
from lightning_modules.teacher import load_teacher


def choose_by_entropy(
    entropy: Tensor,
    maskable: Tensor,
    ratio: float,
    selection: str,
    strategy: str,
    temperature: float,
    generator: torch.Generator,
) -> Tensor:
    """Exactly round(ratio · maskable count) positions per sequence, [B, L] bool.

    top-k takes the highest (or lowest) entropies; sampling draws without replacement with
    probability ∝ exp(±entropy / temperature) (Gumbel top-k).
    """
    score = entropy.float() if selection == "high" else -entropy.float()  # [B, L]
    if strategy == "sample":
        uniform = torch.rand(score.shape, generator=generator, device=score.device).clamp_min(1e-20)
        score = score / temperature - torch.log(-torch.log(uniform))
    score = score.masked_fill(~maskable, float("-inf"))
    budget = (ratio * maskable.sum(1)).round().long()  # [B]
    rank = score.argsort(1, descending=True).argsort(1)  # [B, L] rank of each position
    return (rank < budget[:, None]) & maskable


class EntropyMaskingCallback(PolicyDriver):
    """Before every training step: a no-grad forward on the clean batch gives each position's
    predictive entropy; the chosen positions go through 80/10/10, in place in the batch.

    Args:
        source: ``"self"`` (the model being trained, in eval mode) or ``"teacher"``.
        teacher_path: local masked-LM folder for ``source="teacher"`` (same vocabulary).
        selection: ``"high"`` (mask the most uncertain positions) or ``"low"``.
        strategy: ``"topk"`` or ``"sample"`` (∝ exp(±entropy / temperature)).
        temperature: sampling temperature, > 0.
        seed: seed of the sampling and of the 80/10/10 draw (mixed with the step).
    """

    drives = EntropyPositionMask

    def __init__(
        self,
        source: Literal["self", "teacher"] = "self",
        teacher_path: str | None = None,
        selection: Literal["high", "low"] = "high",
        strategy: Literal["topk", "sample"] = "topk",
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        errors = []
        if source not in ("self", "teacher"):
            errors.append(f"EntropyMaskingCallback.source must be 'self' or 'teacher', got {source!r}")
        if source == "teacher" and not teacher_path:
            errors.append("EntropyMaskingCallback.teacher_path is required with source='teacher'")
        if selection not in ("high", "low"):
            errors.append(f"EntropyMaskingCallback.selection must be 'high' or 'low', got {selection!r}")
        if strategy not in ("topk", "sample"):
            errors.append(f"EntropyMaskingCallback.strategy must be 'topk' or 'sample', got {strategy!r}")
        if temperature <= 0:
            errors.append(f"EntropyMaskingCallback.temperature must be > 0, got {temperature}")
        raise_if_any(errors)
        self.source, self.teacher_path, self.selection = source, teacher_path, selection
        self.strategy, self.temperature, self.seed = strategy, temperature, seed
        self.teacher = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.policy = self.find_policy(trainer)
        if self.source == "teacher" and self.teacher is None:
            self.teacher = load_teacher(
                self.teacher_path, pl_module.vocab["tokens"], "EntropyMaskingCallback.teacher_path"
            )
        self._vocab: Vocab | None = None

    def _device_vocab(self, vocab: Vocab, device: torch.device) -> Vocab:
        if self._vocab is None or self._vocab.is_special.device != device:
            tensors = {
                f.name: getattr(vocab, f.name).to(device)
                for f in dataclasses.fields(vocab)
                if isinstance(getattr(vocab, f.name), Tensor)
            }
            self._vocab = dataclasses.replace(vocab, **tensors)
        return self._vocab

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Tensor], batch_idx: int
    ) -> None:
        ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        model = self.teacher.to(ids.device) if self.teacher is not None else pl_module.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            entropy = predictive_entropy(model(input_ids=ids, attention_mask=attention_mask).logits)  # [B, L]
        model.train(was_training)
        block = TokenBlock.from_ids(ids, self._device_vocab(trainer.datamodule.vocab, ids.device))
        generator = torch.Generator(device=ids.device).manual_seed(self.seed * 1_000_003 + trainer.global_step)
        chosen = choose_by_entropy(
            entropy, ~block.special, self.policy.ratio, self.selection, self.strategy, self.temperature, generator
        )
        batch.update(corrupt_mlm(block, chosen, generator, self.policy.mask_prob, self.policy.random_prob))
        maskable = ~block.special
        pl_module.log_dict(
            {
                "mask/entropy_mean_chosen": entropy[chosen].mean() if chosen.any() else entropy.new_zeros(()),
                "mask/entropy_mean_all": entropy[maskable].mean(),
            }
        )
