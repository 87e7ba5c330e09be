"""RunStore: one run folder, read and written through the units of this package."""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from sweep.logs import warn
from sweep.record import POWER_SCHEMA, REFERENCE_SCHEMA, RESULT_SCHEMA, job_key, split_job_key
from sweep.store.files import atomic_write, strict_json, write_json_atomic
from sweep.store.locks import driver_lock as _driver_lock
from sweep.store.locks import job_lock as _job_lock
from sweep.store.parts import SCAN_DEADLINE_S, PartFolder, PartsChanged, job_slug
from sweep.store.quarantine import Quarantine
from sweep.store.wal import JobWriter, read_wal, rows_to_table


class RunStore:
    """One run directory. `read_only` (a dry run) reads without changing anything: a
    damaged file is skipped with a warning instead of being set aside."""

    def __init__(self, run_dir: str | Path, read_only: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.read_only = read_only
        self.results_dir = self.run_dir / "results"
        self.wal_dir = self.run_dir / "wal"
        self.failures_dir = self.run_dir / "failures"
        self.power_dir = self.run_dir / "power"
        self.references_dir = self.run_dir / "references"
        self.jobs_dir = self.run_dir / "jobs"  # per job above concurrency 1: its steady windows
        self.locks_dir = self.run_dir / "locks"
        self.manifest_path = self.run_dir / "manifest.json"
        self.quarantine = Quarantine(self.run_dir, read_only)
        self.results = PartFolder(self.results_dir, self.quarantine,
                                  "damaged part file ({}), its rows count as not stored")
        self.power = PartFolder(self.power_dir, self.quarantine, "damaged power timeline file ({})")
        self.references = PartFolder(self.references_dir, self.quarantine, "damaged reference checks file ({})")

    @property
    def quarantine_dir(self) -> Path:
        return self.quarantine.folder

    def create(self) -> None:
        for d in (self.results_dir, self.wal_dir, self.failures_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- damaged files --------------------------------------------------------------
    def set_aside(self, path: Path, what: str) -> None:
        self.quarantine.set_aside(path, what)

    def set_aside_files(self) -> list[Path]:
        return self.quarantine.files()

    def set_aside_summary(self) -> list[str]:
        return self.quarantine.summary()

    # -- manifest ---------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        """The manifest, or None when there is none or it is damaged (then set aside)."""
        try:
            data = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return None
        from sweep.manifest import parse_manifest

        try:
            manifest = strict_json(data)
            parse_manifest(manifest)
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, a field of the wrong type
            self.set_aside(self.manifest_path, f"damaged manifest ({str(exc)[:160]}); the run reads as one without "
                                               f"a manifest")
            return None
        return manifest

    def write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.manifest_path, manifest)

    # -- the prompts of the run (text once, rows refer to it by prompt_id) --------------
    @property
    def prompts_path(self) -> Path:
        return self.run_dir / "prompts.parquet"

    def write_prompts(self, prompts) -> None:
        if self.prompts_path.is_file():
            return
        table = pa.table({"prompt_id": [p.prompt_id for p in prompts], "prompt": [p.text for p in prompts]})
        atomic_write(self.prompts_path, lambda tmp: pq.write_table(table, tmp))

    def read_prompts(self):
        import pandas as pd

        empty = pd.DataFrame({"prompt_id": pd.Series(dtype=str), "prompt": pd.Series(dtype=str)})
        if not self.prompts_path.is_file():
            return empty
        try:
            table = pq.read_table(self.prompts_path)
            problem = _prompts_problem(table)
        except (pa.ArrowException, OSError, ValueError) as exc:
            problem = f"not readable Parquet: {str(exc)[:120]}"
        if problem:
            self.set_aside(self.prompts_path, f"damaged prompts file ({problem})")
            return empty
        return table.select(["prompt_id", "prompt"]).to_pandas()

    # -- the dataset ------------------------------------------------------------------
    def part_files(self) -> list[Path]:
        """The files that hold the dataset's rows, each row in exactly one: the Parquet
        files of results/ less those a merged file there replaces."""
        return self.results.visible()

    def read_parts(self, columns: list[str] | None = None, filter=None, files: list[Path] | None = None) -> pa.Table:
        """Rows of the dataset (or of `files`) in RESULT_SCHEMA."""

        def scan(paths: list[Path]) -> pa.Table:
            # A fresh dataset object each call: one does not see files added later.
            dataset = ds.dataset([str(p) for p in paths], format="parquet", schema=RESULT_SCHEMA)
            return dataset.to_table(columns=columns, filter=filter)

        return self.scan_parts(scan, files)

    def scan_parts(self, read: Callable[[list[Path]], Any], files: list[Path] | None = None) -> Any:
        """`read(part files)` over the dataset (or `files`): the one way it is read. A part
        file that cannot be read is set aside, and the rest read again. A file gone before
        it was read (compacted, set aside by another reader) makes a read of the dataset
        list it again; one of `files` raises PartsChanged, for the caller to list again."""
        deadline = time.monotonic() + SCAN_DEADLINE_S
        while True:
            paths = [p for p in (self.part_files() if files is None else files) if p not in self.quarantine.damaged]
            try:
                return read(paths)
            except (pa.ArrowException, OSError):
                if all(p.exists() for p in paths) and not self._check_parts(paths):
                    raise  # not the files' content (EIO, permissions): the caller's to see
                if files is not None and not all(p.exists() for p in paths):
                    raise PartsChanged(f"{self.results_dir}: part files changed while read") from None
                if time.monotonic() > deadline:
                    raise

    def _check_parts(self, paths: list[Path]) -> int:
        """Read each file on its own and set aside those whose content is damaged; returns
        how many. A file that cannot be read from disk at all (EIO, permissions) stays:
        that is not the file's content, and the error is the caller's to see."""
        damaged = 0
        for path in paths:
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # set aside meanwhile by another reader
                continue
            try:
                pq.read_table(pa.BufferReader(data), schema=RESULT_SCHEMA)
            except Exception as exc:  # any parse failure: the bytes are not a part file
                # pyarrow: "Could not open Parquet input source '<Buffer>': Parquet magic bytes not found..."
                what = str(exc).split(": ", 1)[-1].split(". ")[0][:120] if data else "0 bytes"
                self.set_aside(path, f"damaged part file ({what}), its rows count as not stored")
                damaged += 1
        return damaged

    def _dataset_ids(self, model: str | None, key: str | None) -> dict[tuple[str, str], set[str]]:
        """{(model, job key): prompt ids in the Parquet dataset}, optionally for one job."""
        done: dict[tuple[str, str], set[str]] = {}
        flt = None if model is None else (ds.field("model") == model) & (ds.field("task") == split_job_key(key)[0])
        table = self.read_parts(columns=["model", "task", "concurrency", "prompt_id"], filter=flt)
        for m, t, n, p in zip(*(table.column(c).to_pylist() for c in ("model", "task", "concurrency", "prompt_id"))):
            k = job_key(t, n or 1)
            if key is None or k == key:
                done.setdefault((m, k), set()).add(p)
        return done

    def done_prompt_ids(self, model: str | None = None, task: str | None = None) -> dict[tuple[str, str], set[str]]:
        """{(model, job key): stored prompt ids}, optionally for one job only (`task`: its
        key, sweep.record.job_key). Rows still only in a write-ahead log count as stored:
        the job moves them into the dataset first."""
        done = self._dataset_ids(model, task)
        wals = [self.wal_dir / f"{job_slug(model, task)}.jsonl"] if model is not None else self.wal_dir.glob("*.jsonl")
        for wal in wals:
            if not wal.is_file():
                continue
            rows, skipped = read_wal(wal)
            if skipped:
                warn(f"{wal}: {skipped} line(s) that are not rows skipped (damaged); the rest is kept")
            for row in rows:
                done.setdefault((row["model"], job_key(row["task"], row.get("concurrency") or 1)), set()).add(
                    row["prompt_id"])
        return done

    def write_part(self, rows: list[dict], slug: str) -> Path:
        return self.results.write(rows_to_table(rows), slug)

    def read_results(self):
        """All stored rows as a pandas DataFrame (empty, with the schema, if none); rows from
        before the concurrency column read as concurrency 1."""
        df = self.read_parts().to_pandas()
        df["concurrency"] = df["concurrency"].fillna(1).astype("int64")
        return df

    # -- what else a job leaves ---------------------------------------------------------
    def write_power_part(self, samples: pa.Table, slug: str) -> Path:
        """Power samples (POWER_SCHEMA), as a part file of runs/<id>/power/."""
        return self.power.write(samples, slug)

    def power_files(self) -> list[Path]:
        """The power timeline's files, less those a merged file replaces (as part_files)."""
        return self.power.visible()

    def read_power(self, filter=None, files: list[Path] | None = None) -> pa.Table:
        """The power timeline (POWER_SCHEMA), of `files` or of the whole run; a damaged
        file is set aside."""
        return self._read_each(self.power_files() if files is None else files, POWER_SCHEMA,
                               "damaged power timeline file", filters=filter)

    def write_reference_part(self, checks: pa.Table, slug: str) -> Path:
        """Reference checks (REFERENCE_SCHEMA), as a part file of runs/<id>/references/."""
        return self.references.write(checks, slug)

    def reference_files(self) -> list[Path]:
        return self.references.visible()

    def read_references(self, files: list[Path] | None = None) -> pa.Table:
        """Every job's reference checks (REFERENCE_SCHEMA); a damaged file is set aside."""
        return self._read_each(self.reference_files() if files is None else files, REFERENCE_SCHEMA,
                               "damaged reference checks file")

    def _read_each(self, paths: list[Path], schema: pa.Schema, damaged: str, **read) -> pa.Table:
        tables = []
        for path in paths:
            try:
                tables.append(pq.read_table(path, schema=schema, **read))
            except FileNotFoundError:  # merged meanwhile
                continue
            except (pa.ArrowException, OSError):
                self.set_aside(path, damaged)
        return pa.concat_tables(tables).replace_schema_metadata(None) if tables else schema.empty_table()

    def append_server_log(self, slug: str, text: str) -> Path:
        """A serving engine's output, appended to runs/<id>/servers/<job>.log (a log: what a
        crash cuts short stays readable)."""
        folder = self.run_dir / "servers"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{slug}.log"
        with open(path, "a", encoding="utf-8", errors="replace") as fh:
            fh.write(text)
        return path

    def append_job_figures(self, slug: str, model: str, key: str, figures: dict) -> Path:
        """One session's figures of a job served at concurrency > 1 (its steady window, the
        counter over the job), added to runs/<id>/jobs/<slug>.json (a resumed job has one
        entry per session that ran it)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        path = self.jobs_dir / f"{slug}.json"
        record = self._job_record(path) or {"model": model, "task": key, "sessions": []}
        record["sessions"].append(figures)
        write_json_atomic(path, record)
        return path

    def _job_record(self, path: Path) -> dict | None:
        try:
            record = strict_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, RecursionError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("model"), str) and isinstance(record.get("task"), str) \
                and isinstance(record.get("sessions"), list) and all(isinstance(x, dict) for x in record["sessions"]):
            return record
        self.set_aside(path, "damaged job figures (not a JSON object with model, task, sessions)")
        return None

    def job_figures(self) -> list[dict]:
        """Every job's record of runs/<id>/jobs/ ({"model", "task": the job key, "sessions"})."""
        if not self.jobs_dir.is_dir():
            return []
        return [r for p in sorted(self.jobs_dir.glob("*.json")) if (r := self._job_record(p)) is not None]

    # -- compaction ---------------------------------------------------------------------
    def compact_power(self, slug: str) -> int:
        """A job's power files into one, as `compact` does for its rows."""
        return self.power.merge(slug, lambda files: self.read_power(files=files))

    def compact(self, slug: str) -> int:
        """Merge job `slug`'s part files into one and remove them, then its power files and
        reference checks; returns how many part files were removed. The caller holds the
        job's lock (no rows are added meanwhile). If writing the merged file fails (a full
        disk), the part files stay as they were. Files that sweep did not name are left alone."""
        removed = self.results.merge(slug, lambda files: self.scan_parts(lambda paths: pa.concat_tables(
            [pq.read_table(p, schema=RESULT_SCHEMA) for p in paths]), files=files))
        self.compact_power(slug)
        self.references.merge(slug, lambda files: self.read_references(files=files))
        return removed

    def compact_run(self, skip: set[str] = frozenset()) -> tuple[int, int, list[str]]:
        """Compact every job of the run whose slug is not in `skip` and whose lock is free
        (a job being written is compacted when it closes). Returns (jobs compacted, files
        removed, jobs left busy). A job that cannot be compacted (disk full) is skipped
        with a warning: its part files stay and are read as they are."""
        compacted = removed = 0
        busy = []
        for slug in sorted(self.results.slugs() - set(skip)):
            try:
                with self.job_lock(slug, timeout_s=0):
                    n = self.compact(slug)
            except TimeoutError:
                busy.append(slug)
                continue
            except (OSError, pa.ArrowException, PartsChanged) as exc:
                warn(f"{self.results_dir}: job {slug} not compacted ({exc}); its part files are read as they are")
                continue
            compacted += n > 0
            removed += n
        return compacted, removed, busy

    # -- jobs -------------------------------------------------------------------------
    def driver_lock(self) -> AbstractContextManager[None]:
        """Exclusive right to drive the run, for a whole session (sweep.store.locks)."""
        return _driver_lock(self.locks_dir, self.run_dir)

    def job_lock(self, slug: str, timeout_s: float = 300.0) -> AbstractContextManager[None]:
        """Exclusive right to write one job (sweep.store.locks)."""
        return _job_lock(self.locks_dir, slug, timeout_s)

    def recover_wal(self, slug: str, model: str, task: str) -> int:
        """Move rows a crashed job left in its log into the dataset; returns how many."""
        wal = self.wal_dir / f"{slug}.jsonl"
        if not wal.is_file():
            return 0
        rows, _ = read_wal(wal)  # damaged lines were reported when the run was planned
        done = self._dataset_ids(model, task).get((model, task), set())
        fresh: dict[str, dict] = {}
        for row in rows:
            if row["prompt_id"] not in done:
                fresh.setdefault(row["prompt_id"], row)
        if fresh:
            self.write_part(list(fresh.values()), slug)
        wal.unlink()
        return len(fresh)

    def writer(self, slug: str) -> JobWriter:
        return JobWriter(self, slug)

    def record_failure(self, model: str, task: str, error: str) -> None:
        self.failures_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            self.failures_dir / f"{job_slug(model, task)}.json",
            {"model": model, "task": task, "error": error, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        )

    def clear_failure(self, model: str, task: str) -> None:
        (self.failures_dir / f"{job_slug(model, task)}.json").unlink(missing_ok=True)

    def failures(self) -> list[dict]:
        if not self.failures_dir.is_dir():
            return []
        out = []
        for path in sorted(self.failures_dir.glob("*.json")):
            try:
                record = json.loads(path.read_bytes().decode("utf-8"))
            except (ValueError, RecursionError):
                record = None
            if isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("model", "task", "error")):
                out.append(record)
            else:
                self.set_aside(path, "damaged failure record (not a JSON object with model, task, error)")
        return out


def _prompts_problem(table: pa.Table) -> str | None:
    """What is wrong with a prompts.parquet table, or None: string columns prompt_id and
    prompt, ids present and unique."""
    for name in ("prompt_id", "prompt"):
        if name not in table.column_names:
            return f"no {name} column"
        if not pa.types.is_string(table.schema.field(name).type) and not pa.types.is_large_string(
                table.schema.field(name).type):
            return f"{name} is {table.schema.field(name).type}, not text"
    ids = table["prompt_id"]
    if ids.null_count:
        return f"{ids.null_count} prompt id(s) missing"
    if len(ids.unique()) != len(ids):
        return "a prompt id appears twice"
    return None
