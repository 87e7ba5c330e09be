"""A job's write-ahead log: every finished request is appended and fsync'ed at once, and
reaches Parquet in batches (the JobWriter); what a crash leaves in it is read back here."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from sweep.record import REFERENCE_SCHEMA, RESULT_SCHEMA
from sweep.store.files import fsync

if TYPE_CHECKING:
    from sweep.store.run import RunStore

# Rows reach Parquet when this many are waiting, or this long after the last part file.
FLUSH_ROWS = 64
FLUSH_SECONDS = 30.0


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def read_wal(path: Path) -> tuple[list[dict], int]:
    """(rows, damaged lines) of a write-ahead log. A last line without its newline was
    cut short by a crash and is dropped quietly; any other line that is not a row (not
    UTF-8, not JSON, not an object with model, task and prompt_id, values that do not
    fit the schema) is dropped and counted."""
    lines = path.read_bytes().split(b"\n")
    lines.pop()  # b"" after the last newline, or a line cut short
    rows: list[dict] = []
    damaged = 0
    for line in lines:
        row = _wal_row(line)
        if row is None:
            damaged += 1
        else:
            rows.append(row)
    return rows, damaged


def _wal_row(line: bytes) -> dict | None:
    try:
        row = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("model", "task", "prompt_id")):
        return None
    if isinstance(row.get("started_at"), str):  # undo the JSON encoding of the timestamp
        try:
            row["started_at"] = datetime.fromisoformat(row["started_at"])
        except ValueError:
            return None
    try:
        rows_to_table([row])
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None
    return row


class JobWriter:
    """Appends one job's rows: to the log at once, to Parquet in batches."""

    def __init__(self, store: RunStore, slug: str) -> None:
        self.store = store
        self.slug = slug
        store.wal_dir.mkdir(parents=True, exist_ok=True)
        self._wal_path = store.wal_dir / f"{slug}.jsonl"
        self._wal = open(self._wal_path, "a")
        fsync(store.wal_dir)  # the log's own name must survive a power loss too
        self._pending: list[dict] = []
        self._last_flush = time.monotonic()

    def append(self, row: dict) -> None:
        self._wal.write(json.dumps(row, default=str) + "\n")
        self._wal.flush()
        os.fsync(self._wal.fileno())
        self._pending.append(row)
        if len(self._pending) >= FLUSH_ROWS or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def append_power(self, samples: pa.Table) -> None:
        """Power samples are written at once: a worker sends them every ~30 s."""
        self.store.write_power_part(samples, self.slug)

    def append_job(self, figures: dict) -> None:
        """A job's own figures (sweep.worker: `model` and `task`, its key, among them)."""
        self.store.append_job_figures(self.slug, figures["model"], figures["task"], figures)

    def append_reference(self, check: dict) -> None:
        """A reference check is written at once (a few per job)."""
        self.store.write_reference_part(pa.Table.from_pylist([check], schema=REFERENCE_SCHEMA), self.slug)

    def flush(self) -> None:
        if self._pending:
            self.store.write_part(self._pending, self.slug)
            self._pending = []
            # The rows are in the dataset now; a crash before this truncation leaves
            # them in the log too, and recovery skips what the dataset already has.
            self._wal.seek(0)
            self._wal.truncate()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        self._wal.close()
        self._wal_path.unlink(missing_ok=True)
