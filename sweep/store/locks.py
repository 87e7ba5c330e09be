"""Who may write a run, and a job of it: advisory locks the kernel drops when their holder
dies, however it dies."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DRIVER_LOCK = "driver.lock"  # job locks are <slug>.lock, and a slug always ends in -<hash>


class RunBusy(Exception):
    """Another driver holds the run; the message says which and what to do."""


@contextmanager
def driver_lock(locks_dir: Path, run_dir: Path) -> Iterator[None]:
    """Exclusive right to drive the run, for a whole session: a second driver on the same
    run id is refused (RunBusy) rather than both running and both claiming the rows."""
    locks_dir.mkdir(parents=True, exist_ok=True)
    with open(locks_dir / DRIVER_LOCK, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunBusy(f"{run_dir}: run is being written by another sweep ({holder}); "
                          f"wait for it to finish, or use another --run-id") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def job_lock(locks_dir: Path, slug: str, timeout_s: float = 300.0) -> Iterator[None]:
    """Exclusive right to write one job. A writer left over from a killed driver still
    holds it until it exits, so a quick rerun waits instead of writing twice."""
    locks_dir.mkdir(parents=True, exist_ok=True)
    with open(locks_dir / f"{slug}.lock", "w") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {slug} is held by another process") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
