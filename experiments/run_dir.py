"""A run directory's life: which one a run writes to, whether it finished, and undoing a failed start.

A run is *finished* when its `status.json` says so (written by the entry point after the final
validation and `metrics.json`); runs from before `status.json` existed count as finished when they
hold a `metrics.json`. `--ckpt_path last` only ever resumes an unfinished run, so a finished run's
artifacts are never trained over.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only

from core.errors import ConfigError

RUN_VERSION_ENV = "MASKLAB_RUN_VERSION"  # hands the run dir chosen by rank 0 to the DDP workers it launches
STATUS_FILE = "status.json"
FINISHED = "finished"
SNAPSHOT_MAX_BYTES = 1 << 20  # files up to this size are kept in memory so a failed start can restore them


def run_status(run_dir: Path) -> str | None:
    """`finished`, `interrupted`, `failed`, or None for a run that never ended cleanly (killed, or running)."""
    status = run_dir / STATUS_FILE
    if status.is_file():
        return json.loads(status.read_text()).get("status")
    return FINISHED if (run_dir / "metrics.json").is_file() else None


def write_status(run_dir: Path, status: str, step: int, message: str | None = None) -> None:
    """Record how the run ended, so `--ckpt_path last` and a reader of the run dir can tell."""
    record = {"status": status, "step": step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if message:
        record["message"] = message
    (run_dir / STATUS_FILE).write_text(json.dumps(record, indent=2) + "\n")


@dataclass
class Resolution:
    """Where a run writes and what it resumes from; `note` tells the user which run was picked."""

    version: int | None
    ckpt_path: str | None
    note: str | None = None
    claimed: bool = False  # this run made the directory (so a failed start removes it)
    made_from: Path | None = None  # the outermost folder made for it (runs/ or runs/<experiment>/), if any


def _version_of(ckpt: Path, root: Path) -> Path | None:
    version_dir = ckpt.resolve().parent.parent
    if version_dir.name.startswith("version_") and version_dir.parent == root.resolve():
        return version_dir
    return None


def _last_unfinished(root: Path) -> Path:
    """The newest `last.ckpt` of a run of this experiment that did not finish."""
    candidates = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    unfinished = [c for c in candidates if run_status(c.parent.parent) != FINISHED]
    if unfinished:
        return unfinished[-1]
    if candidates:
        finished = ", ".join(c.parent.parent.name for c in candidates)
        raise ConfigError(
            f"ckpt_path=last: every run of {root} with a checkpoint has finished ({finished}); "
            "name a checkpoint (--ckpt_path <run dir>/checkpoints/last.ckpt) to train one further in a new run dir"
        )
    raise ConfigError(f"ckpt_path=last: no {root}/version_*/checkpoints/last.ckpt to resume from")


def resolve_run(runs_dir: Path, experiment: str, ckpt_path: str | None) -> Resolution:
    """The version directory this run logs into, and the checkpoint to resume from.

    `last` picks the newest unfinished run of the experiment; a run directory stands for its
    `checkpoints/last.ckpt`. A checkpoint of an unfinished run resumes into that run; any other
    checkpoint (a finished run's, or one from elsewhere) starts a new version directory, so a
    finished run is never changed. The version is None on the ranks > 0 of a run started by an
    external launcher (torchrun, SLURM's srun): rank 0 claims the directory and the trainer hands
    it to the others (`trainer.log_dir` is a broadcast)."""
    root = runs_dir / experiment
    if ckpt_path == "last":
        ckpt_path = str(_last_unfinished(root))
    elif ckpt_path and Path(ckpt_path).is_dir():
        ckpt_path = str(Path(ckpt_path) / "checkpoints" / "last.ckpt")
    note = None
    if ckpt_path:
        ckpt = Path(ckpt_path)
        if not ckpt.is_file():
            raise ConfigError(f"ckpt_path: {ckpt_path!r} is not a checkpoint file")
        version_dir = _version_of(ckpt, root)
        if version_dir is not None and run_status(version_dir) != FINISHED:
            note = f"resuming the unfinished run {root / version_dir.name} from {ckpt_path}"
            return Resolution(int(version_dir.name.removeprefix("version_")), ckpt_path, note)
        owner = "the finished run's checkpoint" if version_dir is not None else "checkpoint"
        note = f"continuing from {owner} {ckpt_path} in a new run dir"
    if RUN_VERSION_ENV in os.environ:
        return Resolution(int(os.environ[RUN_VERSION_ENV]), ckpt_path)
    if rank_zero_only.rank != 0:  # read by Lightning from the launcher's RANK / SLURM_PROCID
        return Resolution(None, ckpt_path)
    missing = [folder for folder in (root, *root.parents) if not folder.exists()]
    root.mkdir(parents=True, exist_ok=True)
    version = 0
    while True:  # mkdir claims the number, so two runs started together never share a directory
        try:
            (root / f"version_{version}").mkdir()
            note = note and f"{note} {root / f'version_{version}'}"
            return Resolution(version, ckpt_path, note, claimed=True, made_from=missing[-1] if missing else None)
        except FileExistsError:
            version += 1


@dataclass
class RunDirSnapshot:
    """The run directory as it was before this session wrote to it, so a start that fails before
    the first training step can leave it exactly as it was (or remove it, if this session made it)."""

    run_dir: Path
    created: bool
    made_from: Path | None = None  # with `created`: the outermost parent folder made for it, removed when empty
    files: dict[Path, bytes | None] = field(default_factory=dict)  # None: too large to keep, left as it is

    @classmethod
    def take(cls, run_dir: Path, created: bool, made_from: Path | None = None) -> RunDirSnapshot:
        files = {}
        for path in run_dir.rglob("*") if run_dir.is_dir() else []:
            if path.is_file():
                files[path] = path.read_bytes() if path.stat().st_size <= SNAPSHOT_MAX_BYTES else None
        return cls(run_dir, created, made_from, files)

    def restore(self) -> None:
        if not self.run_dir.is_dir():
            return
        if self.created:
            shutil.rmtree(self.run_dir)
            folder = self.run_dir.parent
            while self.made_from is not None and folder.is_relative_to(self.made_from) and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent
            return
        for path in sorted(self.run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_file() and path not in self.files:
                path.unlink()
            elif path.is_file() and self.files[path] is not None and path.read_bytes() != self.files[path]:
                path.write_bytes(self.files[path])
            elif path.is_dir() and not any(path.iterdir()) and not any(f.is_relative_to(path) for f in self.files):
                path.rmdir()


def objective_word(module_class: type) -> str:
    objective = getattr(module_class, "objective", None)
    kind = {"causal": "decoder", "mlm": "encoder"}.get(objective, "model")
    return f"{module_class.__name__} ({kind}, {objective!r} objective)"


def checkpoint_step(ckpt_path: str) -> int | None:
    """The optimiser step a checkpoint was saved at (None when unreadable: `checkpoint_errors` says why)."""
    try:
        return int(torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception:
        return None


def checkpoint_errors(ckpt_path: str, model: torch.nn.Module) -> list[str]:
    """Why `ckpt_path` cannot resume `model`, found before the trainer writes anything.

    The checkpoint is memory-mapped, so even a large one costs little to look into."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # torch raises RuntimeError, OSError, pickle errors... for a damaged file
        try:  # without mmap, for the reason (mmap of a truncated file only says "Invalid argument")
            torch.load(ckpt_path, map_location="cpu", weights_only=False)
            reason = "it cannot be memory-mapped"
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return [f"ckpt_path: {ckpt_path!r} is not a readable checkpoint (truncated or damaged? {reason})"]
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return [f"ckpt_path: {ckpt_path!r} is not a Lightning training checkpoint (no state_dict)"]
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if class_path:
        module_name, _, class_name = class_path.rpartition(".")
        try:
            saved_class = getattr(__import__(module_name, fromlist=[class_name]), class_name)
        except (ImportError, AttributeError):
            saved_class = None
        if saved_class is not type(model):
            saved = objective_word(saved_class) if saved_class else class_path
            wanted = objective_word(type(model))
            return [f"ckpt_path: {ckpt_path!r} holds a {saved} checkpoint, but the config trains {wanted}"]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    differ = [k for k in expected.keys() & saved.keys() if expected[k] != saved[k]]
    missing, unexpected = expected.keys() - saved.keys(), saved.keys() - expected.keys()
    if differ or missing or unexpected:
        example = (
            f"e.g. {differ[0]}: checkpoint {list(saved[differ[0]])}, config {list(expected[differ[0]])}; "
            if differ
            else ""
        )
        return [
            f"ckpt_path: {ckpt_path!r} does not fit the configured model ({example}{len(differ)} tensors differ in "
            f"shape, {len(missing)} missing, {len(unexpected)} unexpected): resume with the run's own config"
        ]
    return []
