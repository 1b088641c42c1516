"""Faster loss paths for the decoder (`model.liger_kernel`, `model.compile_loss`).

* Liger Kernel (the `liger-kernel` package, `pip install -e ".[gpu]"`): Triton kernels for the
  Llama body's RMSNorm, SwiGLU and RoPE, and a fused linear cross-entropy that computes the head
  and the loss chunk by chunk, so the [N, V] vocabulary logits never exist in memory. CUDA only.
* `compile_loss`: the head and the cross-entropy over *every* position, compiled. Causal
  objectives label (almost) every position, so running the head densely costs little and gives
  torch.compile static shapes, where the head on the labelled positions (`hidden[labelled]`) has
  a data-dependent size.

Both return what the default path returns (per-position loss and argmax), so `train/acc` and the
per-token statistics stay; a callback that needs the entropy (`collect_entropy`) gets the
default path.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from core.batch import IGNORE_INDEX


def liger_errors() -> list[str]:
    """Why `model.liger_kernel: true` cannot run here (none when it can)."""
    errors = []
    if not torch.cuda.is_available():
        errors.append("model.liger_kernel=true needs a CUDA GPU (Liger Kernel is Triton code); this machine has none")
    if importlib.util.find_spec("liger_kernel") is None:
        errors.append('model.liger_kernel=true needs the liger-kernel package: pip install -e ".[gpu]"')
    return errors


def apply_liger_to_llama(model: PreTrainedModel) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE kernels in this Llama instance. Liger patches the norm and
    MLP of the instance (the module-level classes are restored, so other models stay plain); its
    RoPE replaces transformers' `apply_rotary_pos_emb` for every Llama in the process (Liger has no
    per-instance RoPE). Parameters and state-dict names are unchanged: `hf_model/` is a plain Llama."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers.models.llama import modeling_llama

    classes = modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP
    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model
    )
    modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP = classes


@cache
def _liger_loss():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="none", return_predicted_tokens=True)


def liger_head_loss(weight: Tensor, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy [N] and argmax [N] of the linear head `weight` [V, H] on `hidden` [N, H]."""
    out = _liger_loss()(weight, hidden, targets)
    return out.loss, out.predicted_tokens


def dense_head_loss(weight: Tensor, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy and argmax at every position of `hidden` [B, L, H] (0 loss where `labels` is
    -100), flattened to [B*L]: static shapes, for torch.compile."""
    logits = F.linear(hidden, weight).float().flatten(0, 1)  # [B*L, V]
    loss = F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return loss, logits.argmax(-1)


@cache
def _compiled_dense_head_loss():
    return torch.compile(dense_head_loss, dynamic=False)


def compiled_dense_head_loss(weight: Tensor, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """`dense_head_loss`, compiled on first use (importing the compiler costs seconds)."""
    return _compiled_dense_head_loss()(weight, hidden, labels)
