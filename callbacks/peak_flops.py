"""Dense peak FLOP/s of common GPUs, for `perf/mfu`.

Lightning's own table misses names that `torch.cuda.get_device_name()` returns (e.g. "NVIDIA
H200") and lists some chips with their 2:4-sparsity figures, which would halve every MFU. These are
the vendors' datasheet figures for *dense* tensor-core math (NVIDIA prints the sparse figure with
an asterisk; dense is half of it): bf16 (= fp16) with fp32 accumulation, TF32, and plain fp32.

Sources: NVIDIA datasheets for H200 (SXM, NVL), H100 (SXM, PCIe, NVL), GH200, HGX B200 (per GPU =
system / 8), A100 (SXM and PCIe have the same figures), A10, A40, L4, L40, L40S, RTX A6000 and RTX
6000 Ada; the Ada and Ampere GA102 architecture whitepapers for the GeForce RTX 4090 and 3090
(fp32-accumulate column). AWS publishes no datasheet for the A10G: the A10's figures are used, an
upper bound, so its MFU is a lower bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peak:
    """Dense FLOP/s of one GPU."""

    bf16: float  # bf16 / fp16 tensor cores, fp32 accumulation
    tf32: float  # fp32 matmuls on tensor cores (torch.set_float32_matmul_precision("high"))
    fp32: float  # plain fp32 (CUDA cores)


# (pattern on the lower-cased device name, peak); the first match wins, so specific names first
PEAKS: tuple[tuple[str, Peak], ...] = (
    (r"\bgh200\b", Peak(989.5e12, 494.5e12, 67e12)),
    (r"\bh200\b.*\bnvl\b", Peak(835.5e12, 417.5e12, 60e12)),
    (r"\bh200\b", Peak(989.5e12, 494.5e12, 67e12)),
    (r"\bh100\b.*\bnvl\b", Peak(835.5e12, 417.5e12, 60e12)),
    (r"\bh100\b.*\b(pcie|hbm2e)\b", Peak(756.5e12, 378e12, 51.2e12)),
    (r"\bh100\b", Peak(989.5e12, 494.5e12, 66.9e12)),  # SXM5: "NVIDIA H100 80GB HBM3"
    (r"\bb200\b", Peak(2250e12, 1125e12, 75e12)),
    (r"\ba100\b", Peak(312e12, 156e12, 19.5e12)),
    (r"\ba10g?\b", Peak(125e12, 62.5e12, 31.2e12)),
    (r"\ba40\b", Peak(149.7e12, 74.8e12, 37.4e12)),
    (r"\bl40s\b", Peak(362.05e12, 183e12, 91.6e12)),
    (r"\bl40\b", Peak(181.05e12, 90.5e12, 90.5e12)),
    (r"\bl4\b", Peak(121e12, 60e12, 30.3e12)),
    (r"\brtx 6000 ada\b", Peak(364.2e12, 182.1e12, 91.1e12)),
    (r"\brtx a6000\b", Peak(154.8e12, 77.4e12, 38.7e12)),
    (r"\brtx 4090\b", Peak(165.2e12, 82.6e12, 82.6e12)),
    (r"\brtx 3090\b", Peak(71e12, 35.6e12, 35.6e12)),
)


def gpu_peak(device_name: str) -> Peak | None:
    """The table's row for a `torch.cuda.get_device_name()` string; None when unlisted."""
    name = device_name.lower()
    return next((peak for pattern, peak in PEAKS if re.search(pattern, name)), None)


def peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of the named GPU for matmuls in `dtype` (float32 counts as TF32 unless
    torch's float32 matmul precision is "highest"); None when the GPU is unlisted."""
    peak = gpu_peak(device_name)
    if peak is None:
        return None
    if dtype in (torch.bfloat16, torch.float16):
        return peak.bf16
    return peak.fp32 if torch.get_float32_matmul_precision() == "highest" else peak.tf32
