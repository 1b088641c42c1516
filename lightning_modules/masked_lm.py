"""Encoder objectives (MLM and its masking variants): predict the masked tokens."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    PretrainedConfig,
    PreTrainedModel,
)

from core.errors import ConfigError, raise_if_any
from lightning_modules.base import IGNORE_INDEX, LanguageModelModule, OptimizerConfig
from lightning_modules.deberta_sdpa import use_sdpa_attention
from lightning_modules.nhot import NHotEmbedding
from lightning_modules.teacher import load_teacher


class MaskedLMModule(LanguageModelModule):
    """A BERT, RoBERTa or DeBERTa-v2 encoder trained from scratch; loss on masked positions only.

    Args:
        vocab: token ids from the tokenizer; filled in from the datamodule by the CLI.
        block_size: sequence length the data will feed; filled in from `data.block_size`.
        arch: transformers model type.
        hidden_size: model width.
        num_layers: transformer blocks.
        num_heads: attention heads.
        intermediate_size: feed-forward width; None = 4 * hidden_size.
        max_position_embeddings: longest sequence the model is built for.
        dropout: hidden and attention dropout.
        nhot: add n-hot sub-token embeddings (lightning_modules/nhot.py); unties input and output
            embeddings, and folds into a plain embedding table at export.
        distill_from: a local masked-LM folder to distil from (same vocabulary); None = no KD.
        distill_alpha: weight α of α·T²·KL(teacher ‖ student) over the masked positions, in [0, 1].
        distill_temperature: softmax temperature T of the distillation term.
        optimizer: AdamW and learning-rate schedule.
        config_overrides: any other field of the transformers config, passed through unchanged.
        attn_implementation: transformers attention kernel: "sdpa" (PyTorch's fused attention),
            "flash_attention_2" (needs the flash-attn package and a GPU), "flex_attention", "eager"
            (plain matmuls; only what needs attention weights); None = the transformers default.
            DeBERTa-v2 with "sdpa": masklab's SDPA form of its disentangled attention
            (lightning_modules/deberta_sdpa.py); the export stays a plain (eager) DeBERTa-v2.
        compile: torch.compile the transformer body (needs a C++ compiler on CPU, Triton on GPU).
        gradient_checkpointing: recompute each layer's activations in the backward pass
            (less memory, ~1/3 more compute).
    """

    objective = "mlm"
    auto_model_class = AutoModelForMaskedLM

    def __init__(
        self,
        vocab: dict | None = None,
        block_size: int = 128,
        arch: Literal["bert", "roberta", "deberta-v2"] = "bert",
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 512,
        dropout: float = 0.0,
        nhot: bool = False,
        distill_from: str | None = None,
        distill_alpha: float = 0.5,
        distill_temperature: float = 2.0,
        optimizer: OptimizerConfig = OptimizerConfig(),
        config_overrides: dict | None = None,
        attn_implementation: str | None = None,
        compile: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        model_args = dict(
            arch=arch,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size or 4 * hidden_size,
            max_position_embeddings=max_position_embeddings,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        errors = []
        if not 0 <= distill_alpha <= 1:
            errors.append(f"model.distill_alpha must be in [0, 1], got {distill_alpha}")
        if distill_temperature <= 0:
            errors.append(f"model.distill_temperature must be > 0, got {distill_temperature}")
        raise_if_any(errors)
        if nhot:  # the output layer keeps the plain table; only the input gets the n-hot term
            model_args["tie_word_embeddings"] = False
        super().__init__(
            vocab,
            block_size,
            optimizer,
            config_overrides,
            model_args,
            attn_implementation,
            compile,
            gradient_checkpointing,
        )
        self.save_hyperparameters(ignore=["vocab"])
        self.nhot = nhot
        if nhot:
            tokens = vocab.get("tokens") if vocab else None
            if not tokens:
                raise ConfigError("model.nhot needs the vocabulary's token strings (model.vocab['tokens'])")
            self.model.set_input_embeddings(NHotEmbedding(self.model.get_input_embeddings(), tokens))
        self.distill_alpha, self.distill_temperature = distill_alpha, distill_temperature
        # a plain list keeps the frozen teacher out of the state dict, the optimiser and DDP
        self._teacher = [load_teacher(distill_from, vocab["tokens"], "model.distill_from")] if distill_from else []

    def build_model(self, config: PretrainedConfig, attn_implementation: str | None) -> PreTrainedModel:
        """transformers has no SDPA for DeBERTa-v2: `sdpa` swaps in masklab's (deberta_sdpa.py)."""
        if config.model_type == "deberta-v2" and attn_implementation == "sdpa":
            model = super().build_model(config, None)
            use_sdpa_attention(model)
            return model
        return super().build_model(config, attn_implementation)

    def output_logits(self, hidden: Tensor) -> Tensor:
        """The MLM head (dense + activation + LayerNorm + decoder), as the transformers model applies it."""
        return mlm_head(self.model)(hidden)

    def auxiliary_losses(self, batch: dict[str, Tensor], logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Knowledge distillation: α·T²·KL(teacher ‖ student) averaged over the masked positions."""
        if not self._teacher:
            return {}
        teacher = self._teacher[0].to(logits.device)
        masked = labels != IGNORE_INDEX  # [B, L]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
                masked
            ]
        t = self.distill_temperature
        kl = F.kl_div(
            F.log_softmax(logits.float() / t, -1),
            F.log_softmax(teacher_logits.float() / t, -1),
            log_target=True,
            reduction="sum",
        ) / masked.sum().clamp_min(1)
        return {"kd": self.distill_alpha * t * t * kl}

    @classmethod
    def build_config(cls, vocab: dict, arch: str = "bert", **model_args) -> PretrainedConfig:
        ids = {k: vocab[k] for k in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")}
        extra = {"type_vocab_size": 1} if arch != "deberta-v2" else {}
        return AutoConfig.for_model(arch, **ids, **extra, **model_args)

    def export_model(self) -> PreTrainedModel:
        """With n-hot embeddings, a copy whose input embedding is the folded plain table."""
        if not self.nhot:
            return self.model
        exported = copy.deepcopy(self.model)
        exported.set_input_embeddings(self.model.get_input_embeddings().folded())
        return exported

    @staticmethod
    def usable_positions(model_args: dict, vocab: dict) -> int:
        if model_args["arch"] == "roberta":  # RoBERTa numbers positions from pad_token_id + 1
            return model_args["max_position_embeddings"] - vocab["pad_token_id"] - 1
        return model_args["max_position_embeddings"]


def mlm_head(model: PreTrainedModel) -> Callable[[Tensor], Tensor]:
    """The output head of a transformers masked LM as a function of the body's hidden states
    [..., H] -> logits [..., V], so logits can be computed at chosen positions only."""
    if hasattr(model, "lm_predictions"):  # DeBERTa-v2 with `legacy: false`
        return lambda hidden: model.lm_predictions(hidden, model.deberta.embeddings.word_embeddings)
    if hasattr(model, "cls"):  # BERT, DeBERTa-v2
        return model.cls
    if hasattr(model, "lm_head"):  # RoBERTa
        return model.lm_head
    raise ValueError(f"{type(model).__name__}: no known masked-LM head (cls, lm_head or lm_predictions)")
