"""Decoder objectives (NTP, MEAP): a Llama model predicting the next token."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from core.errors import ConfigError, raise_if_any
from lightning_modules.base import HeadLoss, LanguageModelModule, OptimizerConfig
from lightning_modules.fused_loss import (
    apply_liger_to_llama,
    compiled_dense_head_loss,
    liger_errors,
    liger_head_loss,
)

# config fields a pre-trained model must share with the configured one, and their config keys
SHAPE_KEYS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "intermediate_size": "intermediate_size",
    "tie_word_embeddings": "tie_word_embeddings",
}


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
        attn_implementation: transformers attention kernel: "sdpa" (PyTorch's fused attention),
            "flash_attention_2" (needs the flash-attn package and a GPU), "flex_attention", "eager"
            (plain matmuls; only what needs attention weights); None = the transformers default.
        compile: torch.compile the transformer body (needs a C++ compiler on CPU, Triton on GPU).
        gradient_checkpointing: recompute each layer's activations in the backward pass
            (less memory, ~1/3 more compute).
        init_from: start from these weights (fine-tuning): a masklab run dir (its `hf_model/`) or
            a local transformers causal-LM folder. The model is built from this config first, so
            its shape keys must match the saved model's; its vocabulary must be the data's.
        liger_kernel: Liger Kernel's Triton RMSNorm, SwiGLU and RoPE in the body and its fused
            linear cross-entropy (no [N, V] logits in memory); CUDA and `pip install -e ".[gpu]"`
            (lightning_modules/fused_loss.py).
        compile_loss: torch.compile the output head and the loss, run over every position
            (static shapes); an alternative to `liger_kernel` for the loss.
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
        attn_implementation: str | None = None,
        compile: bool = False,
        gradient_checkpointing: bool = False,
        init_from: str | None = None,
        liger_kernel: bool = False,
        compile_loss: bool = False,
    ) -> None:
        errors = liger_errors() if liger_kernel else []
        if liger_kernel and compile_loss:
            errors.append("model.liger_kernel and model.compile_loss are two ways to compute the loss: choose one")
        raise_if_any(errors)
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
        if init_from is not None:
            self.model.load_state_dict(load_pretrained(init_from, self.model, vocab.get("tokens")).state_dict())
        self.liger_kernel, self.compile_loss = liger_kernel, compile_loss
        if liger_kernel:
            apply_liger_to_llama(self.model)
        self.save_hyperparameters(ignore=["vocab"])

    @classmethod
    def build_config(cls, vocab: dict, **model_args) -> PretrainedConfig:
        ids = {k: vocab[k] for k in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")}
        return AutoConfig.for_model("llama", **ids, **model_args)

    def output_logits(self, hidden: Tensor) -> Tensor:
        return self.model.lm_head(hidden)

    def head_loss(self, hidden: Tensor, labels: Tensor, labelled: Tensor) -> HeadLoss:
        """Liger's fused linear cross-entropy or the compiled dense loss when configured and
        nothing asks for the logits' entropy; the default path otherwise."""
        if self.collect_entropy or not (self.liger_kernel or self.compile_loss):
            return super().head_loss(hidden, labels, labelled)
        weight = self.model.lm_head.weight
        if self.liger_kernel:
            loss, predicted = liger_head_loss(weight, hidden[labelled], labels[labelled])
        else:
            loss, predicted = compiled_dense_head_loss(weight, hidden, labels)
            loss, predicted = loss[labelled.flatten()], predicted[labelled.flatten()]
        return HeadLoss(loss, predicted, None, None)

    def align(self, logits: Tensor, *per_position: Tensor) -> tuple[Tensor, ...]:
        # position t predicts token t+1: drop the last logit (or hidden state) and the first label / input
        return (logits[:, :-1], *(t[:, 1:] for t in per_position))


def load_pretrained(path: str, built: PreTrainedModel, tokens: list[str] | None) -> PreTrainedModel:
    """The causal LM saved at `path` (a run dir or an HF folder, local files only), refused with a
    ConfigError naming what differs when it does not fit `built`, the model of the config, or when
    its saved tokenizer is not the data's (`tokens`: the data's token strings, "" = special)."""
    folder = Path(path) / "hf_model" if (Path(path) / "hf_model").is_dir() else Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.init_from: {path!r} is neither a run dir with an hf_model/ folder nor a "
            "transformers model folder (no config.json)"
        )
    saved = AutoConfig.from_pretrained(folder, local_files_only=True)
    if saved.vocab_size != built.config.vocab_size:
        raise ConfigError(
            f"model.init_from: {folder} has a vocabulary of {saved.vocab_size} tokens, the data's "
            f"tokenizer {built.config.vocab_size}; fine-tune with the pre-trained run's tokenizer "
            f"(data.init_args.tokenizer_path: {path})"
        )
    differing = [
        f"model.init_args.{key}={getattr(built.config, field)} (saved: {getattr(saved, field, None)})"
        for field, key in SHAPE_KEYS.items()
        if getattr(saved, field, None) != getattr(built.config, field)
    ]
    if differing:
        raise ConfigError(f"model.init_from: {folder} does not fit the configured model: {', '.join(differing)}")
    if tokens and (folder / "tokenizer.json").is_file():
        saved_tokens = AutoTokenizer.from_pretrained(folder, local_files_only=True).convert_ids_to_tokens(
            list(range(len(tokens)))
        )
        differing_ids = [i for i, (mine, theirs) in enumerate(zip(tokens, saved_tokens)) if mine and mine != theirs]
        if differing_ids:
            raise ConfigError(
                f"model.init_from: the tokenizer saved in {folder} differs from the data's at "
                f"{len(differing_ids)} of {len(tokens)} ids (first: {differing_ids[0]}); fine-tune with "
                f"the pre-trained run's tokenizer (data.init_args.tokenizer_path: {path})"
            )
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
