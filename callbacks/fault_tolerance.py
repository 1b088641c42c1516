"""Keep a run's progress through Ctrl-C and crashes, and stop a diverged run before it saves anything.

`InterruptCheckpoint` writes `last.ckpt` when training stops early, so `--ckpt_path last` resumes
at the exact step; `NonFiniteLossGuard` raises at the first non-finite loss, before a "best"
checkpoint or `hf_model/` can be made from a broken model.
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch

from core.errors import MasklabError


class NonFiniteLossError(MasklabError):
    """Training diverged; the entry point reports it as one line and exits with `exit_code`."""

    exit_code = 1


class NonFiniteLossGuard(L.Callback):
    """Stop at the first non-finite training or validation loss.

    The training loss is checked before each backward pass (one host sync per step); `val/loss` is checked
    before `ModelCheckpoint` sees it (Lightning runs checkpoint callbacks last), so no checkpoint is
    ever written from a NaN state."""

    def __init__(self) -> None:
        self.last_saved: tuple[str, int] | None = None  # (path, step) of this session's latest checkpoint

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or Path(trainer.log_dir or ".") / "checkpoints"
        self.last_saved = (str(Path(folder) / "last.ckpt"), trainer.global_step)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss).all():  # before backward: the weights are still those of the last good step
            self.fail(trainer, "train/loss", float(loss.detach().float().mean()), trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if not trainer.sanity_checking and loss is not None and not math.isfinite(float(loss)):
            self.fail(trainer, "val/loss", float(loss), trainer.global_step)

    def fail(self, trainer: L.Trainer, name: str, value: float, step: int) -> None:
        if self.last_saved is not None:
            kept = f"last finite checkpoint kept: {self.last_saved[0]} (step {self.last_saved[1]})"
        else:
            folder = Path(getattr(trainer.checkpoint_callback, "dirpath", None) or ".")
            existing = folder / "last.ckpt"
            kept = f"last finite checkpoint kept: {existing}" if existing.is_file() else "no checkpoint was saved"
        raise NonFiniteLossError(f"{name} is {value} at step {step}; training stopped, {kept}")


class InterruptCheckpoint(L.Callback):
    """Save `last.ckpt` when training stops on Ctrl-C or an exception, unless the model is not worth
    resuming (a non-finite loss or non-finite weights) or this session trained nothing.

    The first Ctrl-C only asks to stop: `last.ckpt` is saved at the end of the current training
    batch, where `ModelCheckpoint(every_n_train_steps)` saves (a state Lightning resumes exactly,
    TensorBoard steps included; a Ctrl-C in the middle of an optimiser step would leave half-updated
    weights), and training stops when the next batch would start. A second Ctrl-C stops at once.
    Single-process runs only: under DDP saving is a collective that a dying rank cannot join, so
    the last periodic checkpoint stays.

    Not Lightning's `OnExceptionCheckpoint`: its mere presence turns `fit(ckpt_path=None)` into
    `ckpt_path="last"`, so a fresh run would look for a checkpoint to resume."""

    def __init__(self) -> None:
        self.ckpt_path: Path | None = None  # <run dir>/checkpoints/last.ckpt, known once training starts
        self.start_step: int | None = None  # global step when this session's training started
        self.stop_requested = False
        self.saved_step: int | None = None  # global step of the checkpoint saved on a stop or an exception
        self._saving_on_exception = False
        self._previous_handler: Any = None

    def trained(self, trainer: L.Trainer) -> bool:
        """Whether this session completed at least one optimiser step (else there is nothing to keep)."""
        return self.start_step is not None and trainer.global_step > self.start_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = trainer.checkpoint_callback  # set up by now: Lightning sets checkpoint callbacks up last
        folder = getattr(callback, "dirpath", None) or Path(trainer.log_dir or ".") / "checkpoints"
        self.ckpt_path = Path(folder) / f"{getattr(callback, 'CHECKPOINT_NAME_LAST', None) or 'last'}.ckpt"
        self.start_step = trainer.global_step
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._request_stop)

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\nstopping at the end of this step (Ctrl-C again to stop now)", flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.stop_requested and self.saved_step is None and trainer.world_size == 1:
            trainer.save_checkpoint(self.ckpt_path)
            self.saved_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.saved_step is not None:
            raise KeyboardInterrupt

    def restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.restore_handler()
        worth = (
            trainer.world_size == 1
            and self.saved_step is None  # a requested stop saved already
            and self.trained(trainer)
            and not isinstance(exception, NonFiniteLossError)
            and all(torch.isfinite(p).all() for p in pl_module.parameters())
        )
        if worth:
            self._saving_on_exception = True
            try:
                trainer.save_checkpoint(self.ckpt_path)
                self.saved_step = trainer.global_step
            finally:
                self._saving_on_exception = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """On resume Lightning advances the loop's logging step by one unless the checkpoint was saved
        after the last batch had completed: right for checkpoints saved at the end of a training batch,
        one too many for an exception in the middle of a step. Set it so the resumed run logs the
        next batch at its own step: no TensorBoard step twice, none missing."""
        if not self._saving_on_exception:
            return
        fit_loop = checkpoint["loops"]["fit_loop"]
        total = fit_loop["epoch_loop.batch_progress"]["total"]
        after_last = total["ready"] == total["started"] == total["processed"] == total["completed"]
        fit_loop["epoch_loop.state_dict"]["_batches_that_stepped"] = trainer.global_step - (0 if after_last else 1)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore_handler()
