"""The run directory: manifest, per-request Parquet dataset, write-ahead log, failures.

    runs/<run_id>/manifest.json        config snapshot, versions, GPUs, host, times
    runs/<run_id>/prompts.parquet      prompt_id -> prompt text, for every prompt of the run
    runs/<run_id>/results/*.parquet    one row per request (the dataset)
    runs/<run_id>/wal/<job>.jsonl      rows not yet in a part file (crash safety)
    runs/<run_id>/failures/<job>.json  jobs that failed, with their error
    runs/<run_id>/locks/<job>.lock     held by the one process running a job

Crash safety: every finished request is appended to its job's write-ahead log and
fsync'ed before the next request starts; rows reach Parquet in batches, each part file
written under a dot-name and renamed into place (readers never see half a file). When a
job starts again, rows left in its log that are not yet in the dataset are written first.
So a crash loses at most the request in flight, and no (model, task, prompt_id) is
ever stored twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from sweep.record import RESULT_SCHEMA  # noqa: F401  (readers import it from here too)

# Rows reach Parquet when this many are waiting, or this long after the last part file.
FLUSH_ROWS = 64
FLUSH_SECONDS = 30.0


def job_slug(model: str, task: str) -> str:
    """A file-name-safe, collision-free name for a (model, task) job."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}__{task}")[:80]
    digest = hashlib.sha1(f"{model}\0{task}".encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


class RunStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.results_dir = self.run_dir / "results"
        self.wal_dir = self.run_dir / "wal"
        self.failures_dir = self.run_dir / "failures"
        self.locks_dir = self.run_dir / "locks"
        self.manifest_path = self.run_dir / "manifest.json"

    def create(self) -> None:
        for d in (self.results_dir, self.wal_dir, self.failures_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- manifest ---------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, manifest: dict) -> None:
        _write_json_atomic(self.manifest_path, manifest)

    # -- the prompts of the run (text once, rows refer to it by prompt_id) --------------
    @property
    def prompts_path(self) -> Path:
        return self.run_dir / "prompts.parquet"

    def write_prompts(self, prompts) -> None:
        if self.prompts_path.is_file():
            return
        table = pa.table({"prompt_id": [p.prompt_id for p in prompts], "prompt": [p.text for p in prompts]})
        tmp = self.run_dir / f".prompts.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.prompts_path)

    def read_prompts(self):
        import pandas as pd

        if not self.prompts_path.is_file():
            return pd.DataFrame({"prompt_id": pd.Series(dtype=str), "prompt": pd.Series(dtype=str)})
        return pd.read_parquet(self.prompts_path)

    # -- the dataset ------------------------------------------------------------------
    def dataset(self) -> ds.Dataset:
        # A fresh object each call: a dataset object does not see files added later.
        return ds.dataset(self.results_dir, format="parquet", schema=RESULT_SCHEMA)

    def _dataset_ids(self, model: str | None, task: str | None) -> dict[tuple[str, str], set[str]]:
        """{(model, task): prompt ids in the Parquet dataset}, optionally for one job."""
        done: dict[tuple[str, str], set[str]] = {}
        if not self.results_dir.is_dir():
            return done
        flt = None if model is None else (ds.field("model") == model) & (ds.field("task") == task)
        table = self.dataset().to_table(columns=["model", "task", "prompt_id"], filter=flt)
        for m, t, p in zip(*(table.column(c).to_pylist() for c in ("model", "task", "prompt_id"))):
            done.setdefault((m, t), set()).add(p)
        return done

    def done_prompt_ids(self, model: str | None = None, task: str | None = None) -> dict[tuple[str, str], set[str]]:
        """{(model, task): stored prompt ids}, optionally for one job only. Rows still only
        in a write-ahead log count as stored: the job moves them into the dataset first."""
        done = self._dataset_ids(model, task)
        wals = [self.wal_dir / f"{job_slug(model, task)}.jsonl"] if model is not None else self.wal_dir.glob("*.jsonl")
        for wal in wals:
            if not wal.is_file():
                continue
            for row in _read_wal(wal):
                done.setdefault((row["model"], row["task"]), set()).add(row["prompt_id"])
        return done

    def write_part(self, rows: list[dict], slug: str) -> Path:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        name = f"{slug}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.results_dir / f".{name}.tmp"  # dot-names are invisible to dataset readers
        pq.write_table(_rows_to_table(rows), tmp)
        os.replace(tmp, self.results_dir / name)
        return self.results_dir / name

    def read_results(self):
        """All stored rows as a pandas DataFrame (empty, with the schema, if none)."""
        if not self.results_dir.is_dir():
            return RESULT_SCHEMA.empty_table().to_pandas()
        return self.dataset().to_table().to_pandas()

    # -- jobs -------------------------------------------------------------------------
    @contextmanager
    def job_lock(self, slug: str, timeout_s: float = 300.0) -> Iterator[None]:
        """Exclusive right to run one job. A worker left over from a killed driver still
        holds it until it exits, so a quick rerun waits instead of writing twice."""
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        with open(self.locks_dir / f"{slug}.lock", "w") as fh:
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

    def recover_wal(self, slug: str, model: str, task: str) -> int:
        """Move rows a crashed job left in its log into the dataset; returns how many."""
        wal = self.wal_dir / f"{slug}.jsonl"
        if not wal.is_file():
            return 0
        rows = _read_wal(wal)
        done = self._dataset_ids(model, task).get((model, task), set())
        fresh: dict[str, dict] = {}
        for row in rows:
            if row["prompt_id"] not in done:
                fresh.setdefault(row["prompt_id"], row)
        if fresh:
            self.write_part([_revive(r) for r in fresh.values()], slug)
        wal.unlink()
        return len(fresh)

    def writer(self, slug: str) -> "JobWriter":
        return JobWriter(self, slug)

    def record_failure(self, model: str, task: str, error: str) -> None:
        self.failures_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(
            self.failures_dir / f"{job_slug(model, task)}.json",
            {"model": model, "task": task, "error": error, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        )

    def clear_failure(self, model: str, task: str) -> None:
        (self.failures_dir / f"{job_slug(model, task)}.json").unlink(missing_ok=True)

    def failures(self) -> list[dict]:
        if not self.failures_dir.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.failures_dir.glob("*.json"))]


def _read_wal(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return rows


def _revive(row: dict) -> dict:
    """Undo the JSON encoding of a log row (timestamps)."""
    from datetime import datetime

    out = dict(row)
    if isinstance(out.get("started_at"), str):
        out["started_at"] = datetime.fromisoformat(out["started_at"])
    return out


class JobWriter:
    """Appends one job's rows: to the log at once, to Parquet in batches."""

    def __init__(self, store: RunStore, slug: str) -> None:
        self.store = store
        self.slug = slug
        store.wal_dir.mkdir(parents=True, exist_ok=True)
        self._wal_path = store.wal_dir / f"{slug}.jsonl"
        self._wal = open(self._wal_path, "a")
        self._pending: list[dict] = []
        self._last_flush = time.monotonic()

    def append(self, row: dict) -> None:
        self._wal.write(json.dumps(row, default=str) + "\n")
        self._wal.flush()
        os.fsync(self._wal.fileno())
        self._pending.append(row)
        if len(self._pending) >= FLUSH_ROWS or time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

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
