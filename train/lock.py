"""One training process per run directory: an exclusive ``flock`` on ``RUN/.lock``.

Two trainers on one run dir would overwrite each other's checkpoints, nets and metrics.
The lock is held for the rest of the process and released by the OS on any exit, kill -9
included, so a dead holder never leaves a stale lock behind; the file only records who
holds it (for the refusal message). On multi-host runs only process 0 takes it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

from yoro_jax.config import ConfigError

LOCK_FILE = ".lock"
_held: dict[Path, IO[str]] = {}  # run dirs this process holds (kept open: the lock lives)


class RunDirLocked(ConfigError):
    """Another live process trains in this run directory."""


def lock_run_dir(run_dir: str | Path) -> None:
    """Hold ``run_dir``'s lock from now until this process exits (a no-op if it already
    does); raises :class:`RunDirLocked` naming the holder if another process has it."""
    path = Path(run_dir).resolve()
    if path in _held:
        return
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / LOCK_FILE, "a+")  # noqa: SIM115 (held open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirLocked(
            f"{run_dir} is in use by {holder}; wait for that run to end (or stop it), or "
            "give this one another run_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(
        f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    handle.flush()
    _held[path] = handle
