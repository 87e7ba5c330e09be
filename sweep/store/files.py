"""Whole files written so that a reader or a power loss never sees half of one, and JSON
read as sweep writes it."""

from __future__ import annotations

import errno
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Callable


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync(path)
    except OSError as exc:  # some filesystems (FUSE, SMB) cannot fsync a folder: the files themselves are safe
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Create or replace `path` whole: `write(tmp)` fills a dot-named file beside it (one
    no reader lists), which is fsync'ed, renamed over `path`, and the folder fsync'ed so
    the rename itself survives a power loss. On any error the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _not_finite(text: str) -> float:
    raise ValueError(f"{text} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _not_finite(text)
    return value


def strict_json(data: bytes) -> Any:
    """JSON as sweep writes it: UTF-8, finite numbers only (no NaN, Infinity, or 1e999,
    which Python reads as infinity and cannot write back). ValueError otherwise."""
    return json.loads(data.decode("utf-8"), parse_constant=_not_finite, parse_float=_finite_float)


def write_json_atomic(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, default=str, allow_nan=False)  # strict JSON: no NaN or Infinity
    atomic_write(path, lambda tmp: tmp.write_text(text))
