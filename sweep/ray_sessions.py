"""Ray instances this machine's sweeps started, so that what a killed driver leaves
behind can be ended.

Ray ends most of a local instance with its driver, but not all of it: after a SIGKILL of
the driver its dashboard agent, runtime-env agent and idle workers stay. A driver that
starts its own instance records it here (the Ray session folder, the driver's pid and
start time); the next `python -m sweep` on the machine ends the processes of recorded
instances whose driver is gone: only processes with files open in that instance's session
folder, never another Ray instance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil

from sweep.presets import cache_root


def _records() -> Path:
    return cache_root() / "ray-sessions"


def _alive(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.Error:
        return False


def record(session_dir: str) -> Path | None:
    """Note that this process started the Ray instance of `session_dir`; returns the record."""
    me = psutil.Process()
    path = _records() / f"{me.pid}-{int(me.create_time())}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"pid": me.pid, "started": me.create_time(), "session_dir": session_dir}))
    except OSError:  # an unwritable cache: leftovers then stay, as without this
        return None
    return path


def forget(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def _in_session(proc: psutil.Process, session_dir: str) -> bool:
    prefix = session_dir.rstrip("/") + "/"
    try:
        if any(prefix in arg or arg.endswith(session_dir) for arg in proc.cmdline()):
            return True
        return any(f.path.startswith(prefix) for f in proc.open_files())
    except psutil.Error:
        return False


def end_orphans() -> list[int]:
    """End the processes left by recorded Ray instances whose driver is gone; returns their pids."""
    folder = _records()
    if not folder.is_dir():
        return []
    ended: list[int] = []
    for path in folder.glob("*.json"):
        try:
            rec = json.loads(path.read_text())
            pid, started, session_dir = int(rec["pid"]), float(rec["started"]), str(rec["session_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if _alive(pid, started):
            continue
        me = os.getpid()
        left = [p for p in psutil.process_iter() if p.pid != me and _in_session(p, session_dir)]
        for p in left:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(left, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        ended += [p.pid for p in left]
        path.unlink(missing_ok=True)
    return ended
