"""The run directory: manifest, per-request Parquet dataset, write-ahead log, failures.

    runs/<run_id>/manifest.json        config snapshot, versions, GPUs, host, times
    runs/<run_id>/prompts.parquet      prompt_id -> prompt text, for every prompt of the run
    runs/<run_id>/results/*.parquet    one row per request (the dataset)
    runs/<run_id>/wal/<job>.jsonl      rows not yet in a part file (crash safety)
    runs/<run_id>/power/*.parquet      power timeline of each worker's GPUs (sweep/meters/timeline.py)
    runs/<run_id>/references/*.parquet each job's reference checks (sweep/measure.py, REFERENCE_SCHEMA)
    runs/<run_id>/servers/<job>.log    what a serving engine the worker started wrote (backend server)
    runs/<run_id>/failures/<job>.json  jobs that failed, with their error
    runs/<run_id>/locks/<job>.lock     held by the one process writing a job (the session's writer)
    runs/<run_id>/locks/driver.lock    held by the one driver writing the run
    runs/<run_id>/.quarantine/         damaged files, set aside where no reader trips on them

Crash safety: every finished request is appended to its job's write-ahead log and
fsync'ed, at most one request later; rows reach Parquet in batches. Part files,
the manifest and the other whole files are written under a dot-name, fsync'ed, renamed
into place and the folder fsync'ed (`atomic_write`): readers never see half a file, and
a power loss leaves the old file or the new one, never an empty one. When a job starts
again, rows left in its log that are not yet in the dataset are written first. So a
crash loses at most the requests in flight (the one being served and the last row not
yet acknowledged: a resume runs both again), and no (model, task, prompt_id) is ever
stored twice.

Damage (a disk error, a file cut short by hand): every read of the dataset goes through
`RunStore.scan_parts`, which moves a part file it cannot read into `.quarantine/` with
one warning line; its rows then count as not stored, so a resume measures them again.
A manifest that is not a JSON object is set aside the same way. Log lines that are not
rows are skipped and counted.

Compaction: when a job ends, its part files (64 rows each) are merged into one
`<slug>-<time>-<hex>.merged.parquet` that names, in its Parquet key-value metadata
(`sweep:replaces`), every file it replaces. Steps: the merged file is written with
`atomic_write` (durable before anything is removed), then the replaced files are removed.
A reader (`part_files`) leaves out every file a merged file in the folder names, so at
every instant (after a crash at any step too, before anything is cleaned up) each row is
read exactly once: before the rename the merged file does not exist, after it the small
files are hidden whether or not they are gone yet. Leftovers are removed by the next
compaction of the job (at its next close, at the start of a session, `sweep compact`).
A merged file lists everything of its job it covers, earlier merged files and their
leftovers included, so files can be removed in any order.
Chosen over swapping per-job directories (RENAME_EXCHANGE): the folder layout, the names
of older runs' files and every reader stay as they were, no filesystem-specific call is
needed, and the file describes itself. The cost: a reader that does not honour the list
(pandas, pyarrow on the folder) sees a job's rows twice from the merged file's rename
until the small files are removed (milliseconds, or until the next compaction after a
crash in between).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from sweep.logs import warn
from sweep.record import POWER_SCHEMA, REFERENCE_SCHEMA, RESULT_SCHEMA  # noqa: F401  (readers import them from here too)
from sweep.record import job_key, split_job_key

# Rows reach Parquet when this many are waiting, or this long after the last part file.
FLUSH_ROWS = 64
FLUSH_SECONDS = 30.0


# A merged file's name ends so; its metadata lists the names of the files it replaces.
MERGED_SUFFIX = ".merged.parquet"
REPLACES_KEY = b"sweep:replaces"
# <slug>-<time>-<hex>.parquet, or .merged.parquet; a slug ends with -<8 hex> (job_slug).
_PART_NAME = re.compile(r"^(?P<slug>.+-[0-9a-f]{8})-\d{8}T\d{6}-[0-9a-f]{8}(?:\.merged)?\.parquet$")
_TMP_NAME = re.compile(r"^\.(?P<final>.+)\.[0-9a-f]{32}\.tmp$")  # atomic_write's temporary files
# A listing or read that raced a compaction is done again until it holds, for at most this long.
SCAN_DEADLINE_S = 60.0

QUARANTINE = ".quarantine"
DRIVER_LOCK = "driver.lock"  # job locks are <slug>.lock, and a slug always ends in -<hash>


def job_slug(model: str, task: str) -> str:
    """A file-name-safe, collision-free name for a (model, task) job. It starts with a
    letter or digit whatever the model is called: dataset readers skip files whose
    names start with "_" or "."."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}__{task}").lstrip("._-")[:80] or "job"
    digest = hashlib.sha1(f"{model}\0{task}".encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def part_job(name: str) -> str | None:
    """The job slug of a part file name that sweep wrote (None for any other name)."""
    m = _PART_NAME.match(name)
    return m["slug"] if m else None


class PartsChanged(Exception):
    """Some of the part files a reader was given are gone (a compaction replaced them, or a
    reader set them aside): list the run's part files again."""


# Merged file path -> names it replaces. Files are written once under a unique name, so
# one read of the footer serves every later listing.
_replaces_cache: dict[str, frozenset[str]] = {}


# A file set aside is named <time>-<hex>-<where it was>: its folder and name, "~"-joined.
_ORIGINS = (("part", lambda o: o.startswith("results~")), ("power", lambda o: o.startswith("power~")),
            ("reference", lambda o: o.startswith("references~")),
            ("manifest", lambda o: o == "manifest.json"), ("prompts", lambda o: o == "prompts.parquet"),
            ("failure", lambda o: o.startswith("failures~")), ("job", lambda o: o.startswith("jobs~")), ("imported", lambda o: o == "aggregates.parquet"))
_CONSEQUENCES = {
    "part": "damaged part file{s}: their rows are not counted, and a resume measures them again",
    "power": "damaged power file{s}: those power samples are not shown; energy figures are unaffected",
    "reference": "damaged reference checks file{s}: those checks are not counted",
    "manifest": "damaged manifest{s}: the run reads without one (its rows are shown, completeness is not "
                "checked), and a resume is refused until a manifest is put back",
    "prompts": "damaged prompts file{s}: prompt texts are not shown; a resume writes them again",
    "failure": "damaged failure record{s}: not listed as failed",
    "job": "damaged job figures file{s}: those jobs' steady windows are not shown or checked",
    "imported": "damaged imported aggregates: the run shows no figures until it is imported again",
    "other": "damaged file{s}",
}


def _origin(path: Path, run_dir: Path) -> str:
    try:
        return "~".join(path.relative_to(run_dir).parts)
    except ValueError:
        return path.name


class RunBusy(Exception):
    """Another driver holds the run; the message says which and what to do."""


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Create or replace `path` whole: `write(tmp)` fills a dot-named file beside it (one
    no reader lists), which is fsync'ed, renamed over `path`, and the folder fsync'ed so
    the rename itself survives a power loss. On any error the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError as exc:  # some filesystems (FUSE, SMB) cannot fsync a folder: the files themselves are safe
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


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


def _write_json_atomic(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, default=str, allow_nan=False)  # strict JSON: no NaN or Infinity
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


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
        self.quarantine_dir = self.run_dir / QUARANTINE
        self.manifest_path = self.run_dir / "manifest.json"
        self._damaged: set[Path] = set()  # found damaged but left in place (read_only)

    def create(self) -> None:
        for d in (self.results_dir, self.wal_dir, self.failures_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- damaged files --------------------------------------------------------------
    def set_aside(self, path: Path, what: str) -> None:
        """Move a damaged file into .quarantine/ (kept for inspection, out of every
        reader's way), with one warning line naming it."""
        if self.read_only:
            self._damaged.add(path)
            warn(f"{path}: {what}; left out (a run without --dry-run moves it to {self.quarantine_dir})")
            return
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        dest = self.quarantine_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}-{_origin(path, self.run_dir)}"
        try:
            os.replace(path, dest)
        except FileNotFoundError:  # another reader set it aside first
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # results/ (or power/) on another filesystem than the run folder: copy, then remove.
            try:
                shutil.copy2(path, dest)
            except FileNotFoundError:
                return
            path.unlink(missing_ok=True)
        warn(f"{path}: {what}; moved to {dest}")

    def set_aside_files(self) -> list[Path]:
        """Files set aside in .quarantine/, oldest first."""
        if not self.quarantine_dir.is_dir():
            return []
        return sorted(p for p in self.quarantine_dir.iterdir() if p.is_file())

    def set_aside_summary(self) -> list[str]:
        """What the files set aside mean for the run, one phrase per kind of file."""
        kinds: dict[str, int] = {}
        for path in self.set_aside_files():
            origin = path.name.split("-", 2)[-1]
            kind = next((k for k, test in _ORIGINS if test(origin)), "other")
            kinds[kind] = kinds.get(kind, 0) + 1
        return [f"{n} {_CONSEQUENCES[k].format(s='' if n == 1 else 's')}" for k, n in kinds.items()]

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
        _write_json_atomic(self.manifest_path, manifest)

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
    def _names(self, folder: Path | None = None) -> set[str]:
        """Names of the files a dataset reader (pandas, pyarrow) would read from results/ (or `folder`)."""
        try:
            with os.scandir(folder or self.results_dir) as entries:  # no stat per file: a run may hold thousands
                return {e.name for e in entries if not e.name.startswith((".", "_")) and e.is_file()}
        except FileNotFoundError:
            return set()

    def _listing(self, names: set[str] | None = None, folder: Path | None = None) -> list[Path]:
        folder = folder or self.results_dir
        paths = [folder / n for n in sorted(self._names(folder) if names is None else names)]
        return [p for p in paths if p not in self._damaged] if self._damaged else paths

    def _replaced(self, listed: list[Path], damaged: str = "damaged part file ({}), its rows count as not "
                                                           "stored") -> set[str]:
        """Names of the files that the merged files among `listed` replace (results/ or
        power/); a merged file whose footer cannot be read is set aside (`damaged`)."""
        replaced: set[str] = set()
        for path in listed:
            if not path.name.endswith(MERGED_SUFFIX):
                continue
            names = _replaces_cache.get(str(path))
            if names is None:
                try:
                    meta = pq.read_metadata(path).metadata or {}
                    names = frozenset(json.loads(meta.get(REPLACES_KEY, b"[]")))
                except FileNotFoundError:  # replaced in turn meanwhile: the caller lists again
                    continue
                except (pa.ArrowException, ValueError, TypeError) as exc:
                    self.set_aside(path, damaged.format(str(exc).split(": ", 1)[-1].split(". ")[0][:120]))
                    continue
                own = part_job(path.name)
                foreign = sorted(n for n in names if not isinstance(n, str) or own is None or part_job(n) != own)
                if foreign:
                    # Never hide or delete rows of another job on a file's word: the file is damage.
                    self.set_aside(path, damaged.format(f"it names {len(foreign)} file(s) of another job as replaced, "
                                                        f"e.g. {str(foreign[0])[:80]}"))
                    continue
                _replaces_cache[str(path)] = names
            replaced |= names
        return replaced

    def part_files(self) -> list[Path]:
        """The files that hold the dataset's rows, each row in exactly one: the Parquet
        files of results/ less those a merged file there replaces."""
        return self._visible(self.results_dir)

    def _visible(self, folder: Path, damaged: str = "damaged part file ({}), its rows count as not stored") -> list[Path]:
        """The files of `folder` less those a merged file there replaces."""
        deadline = time.monotonic() + SCAN_DEADLINE_S
        while True:
            names = self._names(folder)
            replaced = self._replaced(self._listing({n for n in names if n.endswith(MERGED_SUFFIX)}, folder), damaged)
            # A listing taken while a compaction renamed its merged file into place and
            # removed the files it replaces may hold neither; the merged file is then in a
            # second listing, and the first is taken again.
            if not any(n.endswith(MERGED_SUFFIX) for n in self._names(folder) - names) or time.monotonic() > deadline:
                return self._listing(names - replaced, folder)

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
            paths = self._candidates(files)
            try:
                return read(paths)
            except (pa.ArrowException, OSError):
                if all(p.exists() for p in paths) and not self._check_parts(paths):
                    raise  # not the files' content (EIO, permissions): the caller's to see
                if files is not None and not all(p.exists() for p in paths):
                    raise PartsChanged(f"{self.results_dir}: part files changed while read") from None
                if time.monotonic() > deadline:
                    raise

    def _candidates(self, files: list[Path] | None) -> list[Path]:
        paths = self.part_files() if files is None else files
        return [p for p in paths if p not in self._damaged]

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
        self.results_dir.mkdir(parents=True, exist_ok=True)
        name = f"{slug}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        table = _rows_to_table(rows)
        return atomic_write(self.results_dir / name, lambda tmp: pq.write_table(table, tmp))

    def write_power_part(self, samples: pa.Table, slug: str) -> Path:
        """Power samples (POWER_SCHEMA), as a part file of runs/<id>/power/."""
        self.power_dir.mkdir(parents=True, exist_ok=True)
        name = f"{slug}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        return atomic_write(self.power_dir / name, lambda tmp: pq.write_table(samples, tmp))

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
        _write_json_atomic(path, record)
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

    def write_reference_part(self, checks: pa.Table, slug: str) -> Path:
        """Reference checks (REFERENCE_SCHEMA), as a part file of runs/<id>/references/."""
        self.references_dir.mkdir(parents=True, exist_ok=True)
        name = f"{slug}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        return atomic_write(self.references_dir / name, lambda tmp: pq.write_table(checks, tmp))

    def reference_files(self) -> list[Path]:
        return self._visible(self.references_dir, "damaged reference checks file ({})")

    def read_references(self, files: list[Path] | None = None) -> pa.Table:
        """Every job's reference checks (REFERENCE_SCHEMA); a damaged file is set aside."""
        tables = []
        for path in self.reference_files() if files is None else files:
            try:
                tables.append(pq.read_table(path, schema=REFERENCE_SCHEMA))
            except FileNotFoundError:  # merged meanwhile
                continue
            except (pa.ArrowException, OSError):
                self.set_aside(path, "damaged reference checks file")
        return pa.concat_tables(tables).replace_schema_metadata(None) if tables else REFERENCE_SCHEMA.empty_table()

    def power_files(self) -> list[Path]:
        """The power timeline's files, less those a merged file replaces (as part_files)."""
        return self._visible(self.power_dir, "damaged power timeline file ({})")

    def read_power(self, filter=None, files: list[Path] | None = None) -> pa.Table:
        """The power timeline (POWER_SCHEMA), of `files` or of the whole run; a damaged
        file is set aside."""
        tables = []
        for path in self.power_files() if files is None else files:
            try:
                tables.append(pq.read_table(path, schema=POWER_SCHEMA, filters=filter))
            except FileNotFoundError:  # merged meanwhile
                continue
            except (pa.ArrowException, OSError):
                self.set_aside(path, "damaged power timeline file")
        return pa.concat_tables(tables).replace_schema_metadata(None) if tables else POWER_SCHEMA.empty_table()

    def compact_power(self, slug: str) -> int:
        """A job's power files into one, as `compact` does for its rows (`_merge`)."""
        return self._merge(self.power_dir, slug, lambda files: self.read_power(files=files),
                           "damaged power timeline file ({})")

    def compact(self, slug: str) -> int:
        """Merge job `slug`'s part files into one and remove them, then its power files;
        returns how many part files were removed. The caller holds the job's lock (no rows
        are added meanwhile). If writing the merged file fails (a full disk), the part
        files stay as they were. Files that sweep did not name are left alone."""
        removed = self._merge(self.results_dir, slug, lambda files: self.scan_parts(lambda paths: pa.concat_tables(
            [pq.read_table(p, schema=RESULT_SCHEMA) for p in paths]), files=files))
        self.compact_power(slug)
        self._merge(self.references_dir, slug, lambda files: self.read_references(files=files),
                    "damaged reference checks file ({})")
        return removed

    def _merge(self, folder: Path, slug: str, read: Callable[[list[Path]], pa.Table],
               damaged: str = "damaged part file ({}), its rows count as not stored") -> int:
        """The one merge of a job's files in `folder` (results/ or power/): `read(files)`
        of the files still visible, oldest first, into one merged file that names every
        file of the job it covers (leftovers of a merge cut short included, so that none
        of them reappears whichever goes first), durable before any of them is removed;
        then the temporary files a crash left of this job's writes. Returns how many files
        were removed."""
        listed = self._listing(folder=folder)
        replaced = self._replaced(listed, damaged)
        mine = [p for p in listed if part_job(p.name) == slug and p not in self._damaged and p.exists()]
        visible = [p for p in mine if p.name not in replaced]
        gone = [p for p in mine if p.name in replaced]  # left by a compaction that stopped before removing them
        if len(visible) > 1:
            # Oldest file first, so rows keep the order in which they were written (names
            # made within one second sort by their random part).
            visible.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
            table = read(visible)
            names = sorted(p.name for p in visible + gone)
            table = table.replace_schema_metadata({REPLACES_KEY: json.dumps(names).encode()})
            name = f"{slug}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}{MERGED_SUFFIX}"
            atomic_write(folder / name, lambda tmp: pq.write_table(table, tmp))
            gone += visible
        for path in gone:
            path.unlink(missing_ok=True)
        if gone:
            _fsync_dir(folder)
        # Temporary files of this job's writes that a crash cut short (no reader lists
        # them; nobody else writes this job while its lock is held).
        for path in folder.glob(".*.tmp"):
            m = _TMP_NAME.match(path.name)
            if m and part_job(m["final"]) == slug:
                path.unlink(missing_ok=True)
        return len(gone)

    def compact_run(self, skip: set[str] = frozenset()) -> tuple[int, int, list[str]]:
        """Compact every job of the run whose slug is not in `skip` and whose lock is free
        (a job being written is compacted when it closes). Returns (jobs compacted, files
        removed, jobs left busy). A job that cannot be compacted (disk full) is skipped
        with a warning: its part files stay and are read as they are."""
        slugs = sorted({s for p in self._listing() if (s := part_job(p.name)) and s not in skip})
        compacted = removed = 0
        busy = []
        for slug in slugs:
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

    def read_results(self):
        """All stored rows as a pandas DataFrame (empty, with the schema, if none); rows from
        before the concurrency column read as concurrency 1."""
        df = self.read_parts().to_pandas()
        df["concurrency"] = df["concurrency"].fillna(1).astype("int64")
        return df

    # -- jobs -------------------------------------------------------------------------
    @contextmanager
    def driver_lock(self) -> Iterator[None]:
        """Exclusive right to drive the run, for a whole session: a second driver on the
        same run id is refused (RunBusy) rather than both running and both claiming the
        rows. The kernel drops the lock when the holder dies, however it dies."""
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        with open(self.locks_dir / DRIVER_LOCK, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise RunBusy(f"{self.run_dir}: run is being written by another sweep ({holder}); "
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
    def job_lock(self, slug: str, timeout_s: float = 300.0) -> Iterator[None]:
        """Exclusive right to write one job. A writer left over from a killed driver still
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
        _rows_to_table([row])
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
        _fsync(store.wal_dir)  # the log's own name must survive a power loss too
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
