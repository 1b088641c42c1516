"""Model FLOPs of a training step, for MFU (model FLOPs utilisation).

One training step (forward + backward = 3 x forward) on a batch of B sequences of T tokens, of
which S positions carry a label (the only positions the output head runs on, see
`LanguageModelModule.step`), costs

    FLOPs = 6 * N_body * B * T  +  12 * n_layers * d_attn * B * T^2  +  6 * N_head * S

* N_body: parameters of the transformer body except embedding tables (every weight is used by
  one multiply-add per token: 2 FLOPs forward, 4 backward). Norms and biases count too; they are
  <1% at any real width.
* 12 * n_layers * d_attn * T^2 per sequence: the attention scores QK^T and their product with V
  (2 * T^2 * d_attn FLOPs each forward, x3 for training), d_attn = num_heads * head_dim. Counted
  over the full T x T square even for causal models, as in the PaLM paper (Chowdhery et al. 2022,
  appendix B), whose MFU definition this is; FlashAttention skipping the upper triangle does not
  change the count. DeBERTa's relative-position terms (c2p, p2c) are not counted, so its MFU is a
  lower bound.
* N_head: the output head's per-position parameters, vocab_size * hidden (the decoder, tied or
  not) plus hidden^2 for the MLM heads' dense transform.

Activation checkpointing recomputes the forward but does not change the count (model FLOPs, not
hardware FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class FlopCounts:
    """The model's sizes that the FLOP formula needs (module docstring)."""

    body_params: int
    head_params: int
    layers: int
    attention_width: int

    def training_flops(self, batch_size: int, seq_len: int, selected: int) -> int:
        """FLOPs of one forward + backward on `batch_size` x `seq_len` tokens with the head on
        `selected` positions."""
        body = 6 * self.body_params * batch_size * seq_len
        attention = 12 * self.layers * self.attention_width * batch_size * seq_len**2
        return body + attention + 6 * self.head_params * selected


def flop_counts(model: PreTrainedModel, head_transform: bool) -> FlopCounts:
    """Counts for a transformers model; `head_transform`: the head has a hidden x hidden dense
    layer before the decoder (the BERT-style MLM heads)."""
    config = model.config
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    return FlopCounts(
        body_params=non_embedding_params(model.base_model),
        head_params=config.vocab_size * hidden + (hidden * hidden if head_transform else 0),
        layers=config.num_hidden_layers,
        attention_width=config.num_attention_heads * head_dim,
    )


def non_embedding_params(module: nn.Module) -> int:
    """Parameters of `module` outside embedding tables (lookups, not multiplications)."""
    embedding_ids = {
        id(p) for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for p in m.parameters()
    }
    return sum(p.numel() for p in module.parameters() if id(p) not in embedding_ids)
