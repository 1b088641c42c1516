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


def trained_step(run_dir: Path) -> int:
    """The step a run's training ended at (its `status.json`), 0 for a folder no run wrote: where an
    evaluation of its final weights belongs on the run's TensorBoard axis."""
    status = run_dir / STATUS_FILE
    return int(json.loads(status.read_text()).get("step", 0)) if status.is_file() else 0


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


def find_checkpoint(root: Path, ckpt_path: str | None) -> tuple[str | None, Path | None]:
    """The checkpoint file `--ckpt_path` names, and the run dir it resumes in place (None: a new one).

    `last` picks the newest unfinished run of the experiment; a run directory stands for its
    `checkpoints/last.ckpt`. A checkpoint of an unfinished run resumes into that run; any other
    checkpoint (a finished run's, or one from elsewhere) starts a new version directory, so a
    finished run is never changed. Nothing is written: the caller checks the checkpoint first."""
    if ckpt_path == "last":
        ckpt_path = str(_last_unfinished(root))
    elif ckpt_path and Path(ckpt_path).is_dir():
        ckpt_path = str(Path(ckpt_path) / "checkpoints" / "last.ckpt")
    if not ckpt_path:
        return None, None
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: {ckpt_path!r} is not a checkpoint file")
    version_dir = _version_of(Path(ckpt_path), root)
    return ckpt_path, version_dir if version_dir is not None and run_status(version_dir) != FINISHED else None


def claim_run(root: Path, ckpt_path: str | None, resume_dir: Path | None) -> Resolution:
    """The version directory this run logs into: `resume_dir`, or a new `version_<n>` made now.

    The version is None on the ranks > 0 of a run started by an external launcher (torchrun,
    SLURM's srun): rank 0 claims the directory and the trainer hands it to the others
    (`trainer.log_dir` is a broadcast)."""
    if resume_dir is not None:
        note = f"resuming the unfinished run {root / resume_dir.name} from {ckpt_path}"
        return Resolution(int(resume_dir.name.removeprefix("version_")), ckpt_path, note)
    note = None
    if ckpt_path:
        owner = "the finished run's checkpoint" if _version_of(Path(ckpt_path), root) else "checkpoint"
        note = f"continuing from {owner} {ckpt_path} in a new run dir"
    if RUN_VERSION_ENV in os.environ:
        return Resolution(int(os.environ[RUN_VERSION_ENV]), ckpt_path)
    if rank_zero_only.rank != 0:  # read by Lightning from the launcher's RANK / SLURM_PROCID
        return Resolution(None, ckpt_path)
    missing = [folder for folder in (root, *root.parents) if not folder.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # runs_dir is a file, or a folder this user may not write to
        raise ConfigError(f"runs_dir: cannot make {root}: {err.strerror}") from None
    version = 0
    while True:  # mkdir claims the number, so two runs started together never share a directory
        try:
            (root / f"version_{version}").mkdir()
            note = note and f"{note} {root / f'version_{version}'}"
            return Resolution(version, ckpt_path, note, claimed=True, made_from=missing[-1] if missing else None)
        except FileExistsError:
            version += 1
        except OSError as err:
            raise ConfigError(f"runs_dir: cannot make {root / f'version_{version}'}: {err.strerror}") from None


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
