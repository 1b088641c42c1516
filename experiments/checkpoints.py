"""What a run writes into its checkpoints, and what is checked before one is trained on again.

Every checkpoint file gets a SHA-256 beside it (`<file>.sha256`, the format of `sha256sum`, so
`sha256sum -c` checks it too), and is moved into place only once complete: a kill while saving
leaves the previous checkpoint whole. Before a resume, the file is checked against its checksum,
against the configured model (kind, then shapes), against the data (tokenizer, corpus), and
against `max_steps`: each refusal is one line naming the file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import Strategy

CHECKSUM_SUFFIX = ".sha256"
ALLOW_OTHER_DATA = "--allow_other_data true"


def checksum_path(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + CHECKSUM_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ChecksummedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, plus a checksum and an atomic replace.

    The checksum of the old file is removed before the new file takes its place and written after,
    so a kill at any moment leaves a checkpoint with its own checksum or with none, never a good
    file with a stale checksum (which would refuse it)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            digest = file_sha256(partial)
        except BaseException:  # e.g. a full disk: free what was written, keep the previous checkpoint
            partial.unlink(missing_ok=True)
            raise
        checksum = checksum_path(path)
        checksum.unlink(missing_ok=True)
        partial.replace(path)
        written = checksum.with_name(f".{checksum.name}.partial")
        written.write_text(f"{digest}  {path.name}\n")
        written.replace(checksum)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        checksum_path(Path(path)).unlink(missing_ok=True)


def use_checksums(strategy: Strategy) -> None:
    """Write the strategy's checkpoints with checksums, unless the user configured another writer."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = ChecksummedCheckpointIO()


def checkpoint_callbacks(checkpoint: ModelCheckpoint, settings: dict[str, Any]) -> list[ModelCheckpoint]:
    """The callbacks that carry out `--checkpoint.*` (`checkpoint`, made from `settings`).

    With a monitor, Lightning holds `every_n_train_steps` saves back until the monitored metric
    exists (the first validation), so a run killed before it loses every step. Then the interval
    goes to a second, unmonitored callback that writes `last.ckpt` every N steps from the first
    interval on, and the monitored one keeps "best" (and `last.ckpt`) at each validation."""
    every = settings.get("every_n_train_steps") or 0
    if not settings.get("monitor") or not settings.get("save_last") or every < 1:
        return [checkpoint]
    best = ModelCheckpoint(**{**settings, "every_n_train_steps": None})
    last = ModelCheckpoint(
        dirpath=settings.get("dirpath"),
        save_last=True,
        save_top_k=0,
        every_n_train_steps=every,
        enable_version_counter=False,
    )
    return [best, last]


def checksum_errors(ckpt_path: str) -> list[str]:
    """A checkpoint whose bytes changed since it was written (a checkpoint without a recorded
    checksum, e.g. from before checksums, is not checked)."""
    checksum = checksum_path(Path(ckpt_path))
    if not checksum.is_file():
        return []
    recorded = checksum.read_text().split()[:1]
    if recorded != [file_sha256(Path(ckpt_path))]:
        return [
            f"ckpt_path: {ckpt_path!r} does not match the checksum recorded when it was written ({checksum.name}): "
            "the file was damaged or changed since"
        ]
    return []


def load(ckpt_path: str) -> dict | list[str]:
    """The checkpoint, memory-mapped (cheap even for a large one), or why it cannot be read."""
    try:
        return torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # torch raises RuntimeError, OSError, pickle errors... for a damaged file
        try:  # without mmap, for the reason (mmap of a truncated file only says "Invalid argument")
            torch.load(ckpt_path, map_location="cpu", weights_only=False)
            reason = "it cannot be memory-mapped"
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return [f"ckpt_path: {ckpt_path!r} is not a readable checkpoint (truncated or damaged? {reason})"]


def checkpoint_step(ckpt_path: str) -> int | None:
    """The optimiser step a checkpoint was saved at (None when unreadable: `start_errors` says why)."""
    checkpoint = load(ckpt_path)
    return int(checkpoint["global_step"]) if isinstance(checkpoint, dict) and "global_step" in checkpoint else None


def objective_word(module_class: type) -> str:
    objective = getattr(module_class, "objective", None)
    kind = {"causal": "decoder", "mlm": "encoder"}.get(objective, "model")
    return f"{module_class.__name__} ({kind}, {objective!r} objective)"


def _import(class_path: str) -> type | None:
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(__import__(module_name, fromlist=[class_name]), class_name)
    except (ImportError, AttributeError, ValueError):
        return None


def start_errors(ckpt_path: str, model_class_path: str, max_steps: int | None, new_run: bool) -> list[str]:
    """Why `ckpt_path` cannot start this run, from the file and the config alone: checked before a
    run dir is chosen or announced. `new_run`: the checkpoint would continue in a new run dir."""
    if errors := checksum_errors(ckpt_path):
        return errors
    checkpoint = load(ckpt_path)
    if isinstance(checkpoint, list):
        return checkpoint
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return [f"ckpt_path: {ckpt_path!r} is not a Lightning training checkpoint (no state_dict)"]
    saved_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    wanted = _import(model_class_path)
    if saved_path and wanted is not None and (saved := _import(saved_path)) is not wanted:
        holds = objective_word(saved) if saved else saved_path
        return [f"ckpt_path: {ckpt_path!r} holds a {holds} checkpoint, but the config trains {objective_word(wanted)}"]
    step = int(checkpoint.get("global_step", 0))
    if new_run and max_steps is not None and 0 < max_steps <= step:
        return [
            f"ckpt_path: the run already reached max_steps {max_steps} (its checkpoint is at step {step}); "
            "raise --trainer.max_steps to continue"
        ]
    return []


def model_errors(ckpt_path: str, model: torch.nn.Module) -> list[str]:
    """Tensors of the checkpoint that do not fit the instantiated model."""
    checkpoint = load(ckpt_path)
    assert isinstance(checkpoint, dict)  # `start_errors` refused an unreadable file
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    differ = [k for k in expected.keys() & saved.keys() if expected[k] != saved[k]]
    missing, unexpected = expected.keys() - saved.keys(), saved.keys() - expected.keys()
    if not (differ or missing or unexpected):
        return []
    example = (
        f"e.g. {differ[0]}: checkpoint {list(saved[differ[0]])}, config {list(expected[differ[0]])}; " if differ else ""
    )
    return [
        f"ckpt_path: {ckpt_path!r} does not fit the configured model ({example}{len(differ)} tensors differ in "
        f"shape, {len(missing)} missing, {len(unexpected)} unexpected): resume with the run's own config"
    ]


def data_errors(ckpt_path: str, data: Any) -> list[str]:
    """A tokenizer or corpus other than the one the checkpoint trained on (the datamodule's
    `state_dict`, which Lightning saves in every checkpoint under the datamodule's class name)."""
    checkpoint = load(ckpt_path)
    assert isinstance(checkpoint, dict)
    saved = checkpoint.get(type(data).__qualname__)
    if not isinstance(saved, dict):  # saved by another datamodule, or before this record existed
        return []
    now = data.state_dict()
    errors = []
    if saved.get("tokenizer_hash") != now["tokenizer_hash"]:
        errors.append(f"was trained with another tokenizer (then {saved.get('tokenizer')}; now {now['tokenizer']})")
    if saved.get("corpus") != now["corpus"]:
        errors.append(f"was trained on another corpus (then {saved.get('corpus')}; now {now['corpus']})")
    if not errors:
        return []
    return [
        f"ckpt_path: {ckpt_path!r} {' and '.join(errors)}: resume on its own data, "
        f"or set {ALLOW_OTHER_DATA} to continue on this data"
    ]
