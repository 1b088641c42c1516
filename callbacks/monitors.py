"""Logging callbacks: the live mask ratio and throughput under masklab's tag names."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.peak_flops import peak_flops


class MaskRatioLogger(L.Callback):
    """Logs `mask/ratio`, the ratio the masking policy is set to, and `mask/share`, the share of
    real tokens the batch actually masked (they differ for policies whose budget is not the
    ratio, e.g. penultimate-token masking, which has no `mask/ratio`)."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict, *args: Any
    ) -> None:
        share = batch["masked"].sum() / batch["attention_mask"].sum().clamp_min(1)
        policy = trainer.datamodule.policy
        pl_module.log_dict({"mask/share": share.float(), **({"mask/ratio": policy.ratio} if policy.uses_ratio else {})})


def _batch_size(batch: dict) -> int:
    return batch["input_ids"].size(0)


def _batch_tokens(batch: dict) -> int:
    return batch["input_ids"].numel()


class TokenThroughputMonitor(ThroughputMonitor):
    """Lightning's `ThroughputMonitor`, counting tokens and logging under `perf/`
    (`perf/tokens_per_sec`, `perf/samples_per_sec`, `perf/device/tokens_per_sec`, ...) and, when
    the device's peak FLOP/s is known, `perf/mfu`: the module's `flops_per_batch` per second over
    the peak (lightning_modules/flops.py).

    Args:
        window_size: batches the rates are averaged over.
        peak_flops: the device's peak FLOP/s at the training precision (e.g. 989e12 for an H100 SXM
            in bf16). None = masklab's table of dense GPU peaks (callbacks/peak_flops.py); a CPU
            or an unlisted GPU then logs no `perf/mfu`.
    """

    RENAMES: ClassVar[dict[str, str]] = {"items": "tokens", "lengths": "tokens"}

    def __init__(self, window_size: int = 10, peak_flops: float | None = None) -> None:
        super().__init__(batch_size_fn=_batch_size, length_fn=_batch_tokens, window_size=window_size)
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():  # Lightning's table is replaced by ours: its misses are not ours
            warnings.filterwarnings("ignore", message="FLOPs not found|.* does not support")
            super().setup(trainer, pl_module, stage)
        peak = self.peak_flops
        device = trainer.strategy.root_device
        if peak is None and device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = peak_flops(name, _plugin_to_compute_dtype(trainer.precision_plugin))
            if peak is None:
                rank_zero_warn(f"no perf/mfu: {name!r} is not in callbacks/peak_flops.py; set --throughput.peak_flops")
        self.available_flops = peak
        for throughput in self._throughputs.values():
            throughput.available_flops = peak

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        if not trainer._logger_connector.should_update_logs or trainer.state.stage != "train":
            return
        metrics = {}
        for name, value in self._throughputs[trainer.state.stage].compute().items():
            for old, new in self.RENAMES.items():
                name = name.replace(old, new)
            metrics[f"perf/{name}"] = value
            single = trainer.world_size == 1 and name.startswith("device/") and name.endswith("_per_sec")
            if single or name == "device/mfu":  # Lightning adds totals only for >1 device; MFU is per device
                metrics[f"perf/{name.removeprefix('device/')}"] = value
        trainer._logger_connector.log_metrics(metrics, step=iter_num)
