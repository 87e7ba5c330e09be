"""The `server` backend's command template, checked and filled without importing anything
heavy: config validation (exit 2 before Ray starts) and the worker use the same functions."""

from __future__ import annotations

import shlex
import string

PLACEHOLDERS = ("path", "port", "dtype", "context_length", "max_new_tokens", "gpus", "concurrency")


def check_server(server) -> None:
    """ValueError saying what is wrong with a `server:` entry."""
    if server is None:
        raise ValueError("backend server needs server: {command: ...} (a command that starts the engine) or "
                         "server: {url: ...} (one already running)")
    if (server.command is None) == (server.url is None):
        raise ValueError("server: give either command (the worker starts the engine) or url (attach to one), "
                         "not both or neither")
    if server.command is not None:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(server.command) if f is not None}
            words = shlex.split(server.command)
        except ValueError as exc:
            raise ValueError(f"server.command: {exc}") from None
        unknown = sorted(f for f in fields if f not in PLACEHOLDERS)
        if unknown:
            raise ValueError(f"server.command: unknown placeholder {{{unknown[0]}}} (known: "
                             f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
        if "port" not in fields:
            raise ValueError("server.command: must hold {port}: the worker picks a free port for each server")
        if not words:
            raise ValueError("server.command: empty")


def fill(command: str, **values) -> list[str]:
    """The command's words with its placeholders filled (each placeholder within one word)."""
    return [w.format(**values) for w in shlex.split(command)]
