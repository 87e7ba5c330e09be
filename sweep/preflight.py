"""Checks of what lies outside the config files, made before a run writes anything: the
output folder can be written, and a Ray cluster answers at --address.

Both fail as `ConfigError` (one line, exit status 2), like a bad config file.
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from sweep.config import ConfigError

ADDRESS_TIMEOUT_S = 10.0


def check_output_folder(path: Path, flag: str) -> None:
    """`path` is, or can be created as, a folder that takes new files. The check creates
    (and drops) an unnamed file in the nearest existing folder: a permission test would
    pass for root on a read-only mount."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"command line: {flag}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"command line: {flag}: cannot write in {existing} ({exc.strerror})") from None


def check_address(address: str, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Something accepts connections where `ray.init(address=...)` would connect; Ray
    itself keeps retrying for minutes when nothing does. "auto" is resolved the way Ray
    resolves it (RAY_ADDRESS, then the last cluster `ray start` recorded); "local" starts
    a new cluster and needs no check."""
    from sweep.driver import auth_for_joining

    auth_for_joining(address)  # before Ray is first imported, which reads it
    from ray._common.network_utils import parse_address
    from ray._private.services import canonicalize_bootstrap_address

    if address.startswith("ray://"):  # Ray Client: host:port of its server
        target = address.removeprefix("ray://").split("/", 1)[0]
    else:
        try:
            target = canonicalize_bootstrap_address(address)
        except (ValueError, ConnectionError) as exc:
            raise ConfigError(f"command line: --address: {exc}") from None
        if target is None:
            return
    parsed = parse_address(target)
    if parsed is None or not parsed[1].isdigit():
        raise ConfigError(f"command line: --address: {address!r} is not host:port, 'auto' or 'ray://host:port'")
    host, port = parsed[0].strip("[]"), int(parsed[1])
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConfigError(f"command line: --address: no Ray cluster answers at {host}:{port} ({why}); "
                          f"start one with `ray start --head`, or leave --address out to start a local one") from None
