"""Decoder objectives (NTP, MEAP): a Llama model predicting the next token."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from torch import Tensor

from lightning_modules.base import LanguageModelModule, OptimizerConfig


class CausalLMModule(LanguageModelModule):
    """Llama-style decoder (RoPE, RMSNorm, SwiGLU, grouped-query attention) trained from scratch.

    NTP and MEAP use this same module: they differ only in the masking policy of the data.

    Args:
        vocab: token ids from the tokenizer; filled in from the datamodule by the CLI.
        block_size: sequence length the data will feed; filled in from `data.block_size`.
        hidden_size: model width.
        num_layers: transformer blocks.
        num_heads: attention heads.
        num_kv_heads: key/value heads (grouped-query attention); None = num_heads.
        intermediate_size: SwiGLU hidden width; None = the multiple of 64 nearest 8/3 * hidden_size.
        max_position_embeddings: longest sequence the model is built for.
        rope_theta: RoPE base.
        tie_word_embeddings: share input and output embeddings.
        optimizer: AdamW and learning-rate schedule.
        config_overrides: any other `LlamaConfig` field, passed through unchanged.
    """

    objective = "causal"
    auto_model_class = AutoModelForCausalLM

    def __init__(
        self,
        vocab: dict | None = None,
        block_size: int = 128,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        tie_word_embeddings: bool = False,
        optimizer: OptimizerConfig = OptimizerConfig(),
        config_overrides: dict | None = None,
    ) -> None:
        model_args = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads or num_heads,
            intermediate_size=intermediate_size or 64 * round(8 * hidden_size / 3 / 64),
            max_position_embeddings=max_position_embeddings,
            rope_theta=rope_theta,
            tie_word_embeddings=tie_word_embeddings,
        )
        super().__init__(vocab, block_size, optimizer, config_overrides, model_args)
        self.save_hyperparameters(ignore=["vocab"])

    @classmethod
    def build_config(cls, vocab: dict, **model_args) -> PretrainedConfig:
        ids = {k: vocab[k] for k in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")}
        return AutoConfig.for_model("llama", **ids, **model_args)

    def align(self, logits: Tensor, *per_position: Tensor) -> tuple[Tensor, ...]:
        # position t predicts token t+1: drop the last logit and the first label / input
        return (logits[:, :-1], *(t[:, 1:] for t in per_position))
