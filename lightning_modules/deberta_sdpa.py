"""DeBERTa-v2's disentangled attention through `scaled_dot_product_attention`.

transformers runs DeBERTa-v2 attention as plain matmuls + softmax (no SDPA). Its relative-position
terms (content->position and position->content) only add a [B, H, L, L] score bias, so the same
attention is SDPA with that bias, plus the padding mask, as an additive float mask: PyTorch then
picks a fused kernel (memory-efficient attention on a GPU) that never stores the probabilities.
The bias itself is computed by transformers' own `disentangled_attention_bias`.

Only the forward of each `DisentangledSelfAttention` changes (its class is swapped for the
subclass below): parameter names, checkpoints and the exported `hf_model/` are those of the
plain transformers model, which loads and runs eager as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention, scaled_size_sqrt


class SdpaDisentangledSelfAttention(DisentangledSelfAttention):
    """`DisentangledSelfAttention` with the softmax(QK^T + bias)V done by SDPA."""

    def forward(
        self,
        hidden_states,
        attention_mask,
        output_attentions=False,
        query_states=None,
        relative_pos=None,
        rel_embeddings=None,
    ):
        if output_attentions:  # the probabilities are asked for: only eager has them
            return super().forward(hidden_states, attention_mask, True, query_states, relative_pos, rel_embeddings)
        if query_states is None:
            query_states = hidden_states
        heads = self.num_attention_heads
        # [B*H, L, d], the layout transformers' bias function expects
        query = self.transpose_for_scores(self.query_proj(query_states), heads)
        key = self.transpose_for_scores(self.key_proj(hidden_states), heads)
        value = self.transpose_for_scores(self.value_proj(hidden_states), heads)
        scale_factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
        batch, length = hidden_states.shape[0], query.size(-2)
        # padding as in eager: a pair (i, j) is blocked unless both tokens are real (mask [B, 1, L, L])
        mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~attention_mask.bool(), torch.finfo(query.dtype).min)
        if self.relative_attention:
            bias = self.disentangled_attention_bias(
                query, key, relative_pos, self.pos_dropout(rel_embeddings), scale_factor
            )  # [B*H, L, L]
            mask = mask + bias.view(batch, heads, length, -1)
        context = F.scaled_dot_product_attention(
            query.view(batch, heads, length, -1),
            key.view(batch, heads, key.size(-2), -1),
            value.view(batch, heads, value.size(-2), -1),
            attn_mask=mask,
            dropout_p=self.dropout.p if self.training else 0.0,
            scale=1 / float(scaled_size_sqrt(query, scale_factor)),
        )  # [B, H, L, d]
        return context.transpose(1, 2).reshape(batch, length, -1), None


def use_sdpa_attention(model: PreTrainedModel) -> int:
    """Swap every DeBERTa-v2 self-attention of `model` for the SDPA one, in place; returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is DisentangledSelfAttention:
            module.__class__ = SdpaDisentangledSelfAttention
            swapped += 1
    return swapped
