"""Encoder objectives (MLM and its masking variants): predict the masked tokens."""

from __future__ import annotations

from typing import Literal

import copy

from transformers import AutoConfig, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from datamodules.errors import ConfigError
from lightning_modules.base import LanguageModelModule, OptimizerConfig
from lightning_modules.nhot import NHotEmbedding


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
        optimizer: AdamW and learning-rate schedule.
        config_overrides: any other field of the transformers config, passed through unchanged.
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
        optimizer: OptimizerConfig = OptimizerConfig(),
        config_overrides: dict | None = None,
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
        if nhot:  # the output layer keeps the plain table; only the input gets the n-hot term
            model_args["tie_word_embeddings"] = False
        super().__init__(vocab, block_size, optimizer, config_overrides, model_args)
        self.save_hyperparameters(ignore=["vocab"])
        self.nhot = nhot
        if nhot:
            tokens = vocab.get("tokens") if vocab else None
            if not tokens:
                raise ConfigError("model.nhot needs the vocabulary's token strings (model.vocab['tokens'])")
            self.model.set_input_embeddings(NHotEmbedding(self.model.get_input_embeddings(), tokens))

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
