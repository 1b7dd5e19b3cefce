"""Stopping a training run cleanly on SIGTERM / SIGINT (batch schedulers, Ctrl-C).

Kept free of JAX so the command line can catch :class:`Preempted` without importing it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SIGTERM_ENV = "YORO_JAX_SIGTERM_AFTER_STEP"  # tests: the run sends itself SIGTERM there
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint; rerun to resume


class Preempted(Exception):
    """SIGTERM / SIGINT: the run saved a checkpoint at ``step`` and stopped."""

    def __init__(self, run_dir: Path, step: int, signal_name: str):
        super().__init__(
            f"{signal_name}: stopped after optimizer step {step} with a checkpoint in "
            f"{run_dir / 'checkpoints'}; run the same command again to resume"
        )
        self.step = step


@contextmanager
def stop_requests() -> Iterator[list[str]]:
    """While open, SIGTERM (what schedulers send) and SIGINT ask the training loop to stop
    after the step in flight, with a checkpoint; a second signal stops at once. Yields the
    names of the signals received so far."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if received:  # the second: at once, as without the handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(name)
        print(
            f"\n{name}: stopping after this step with a checkpoint (again to stop at once)",
            file=sys.stderr,
        )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
