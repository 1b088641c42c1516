"""One training process per run dir: a second one (two `--ckpt_path last` started together) would
write into the same checkpoints and event files.

The lock is `flock` on `<run dir>/run.lock`, which holds the pid of the process that took it. The
kernel drops the lock when that process ends, however it ends, so a lock left by a killed run
never blocks (its file stays, naming a pid that no longer holds it).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from core.errors import ConfigError

LOCK_FILE = "run.lock"


class RunLock:
    """Held while this process trains in a run dir; `release` (or the process's end) frees it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 32).decode().strip()
            self.release()
            raise ConfigError(
                f"{run_dir} is in use: process {holder or '(unknown pid)'} is training in it; "
                "wait for it to end or stop it"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
