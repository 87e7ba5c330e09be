"""Warnings, through `logging`: one line each, `warning: <what>`, on stderr.

The "sweep" logger writes through one handler that looks up sys.stderr when it writes
(so a redirected or captured stderr gets the line), and does not pass records on to the
root logger; an application that configures logging can add its own handlers to it.
"""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("sweep")


class _Stderr(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a closed stream: the line is lost, never the work
            self.handleError(record)


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _ensure_handler() -> None:
    if not any(isinstance(h, _Stderr) for h in LOGGER.handlers):
        handler = _Stderr()
        handler.setFormatter(_OneLine())
        LOGGER.addHandler(handler)
        LOGGER.setLevel(logging.INFO)
        LOGGER.propagate = False


def warn(message: str) -> None:
    """One warning line: what happened, and what it means for the run."""
    _ensure_handler()
    LOGGER.warning(message)
