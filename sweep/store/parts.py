"""A folder of part files (results/, power/, references/): their names, which of them a
reader sees, and the one merge of a job's files into one (the compaction protocol, in the
package's docstring)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from sweep.store.files import atomic_write, fsync_dir
from sweep.store.quarantine import Quarantine

# A merged file's name ends so; its metadata lists the names of the files it replaces.
MERGED_SUFFIX = ".merged.parquet"
REPLACES_KEY = b"sweep:replaces"
# <slug>-<time>-<hex>.parquet, or .merged.parquet; a slug ends with -<8 hex> (job_slug).
_PART_NAME = re.compile(r"^(?P<slug>.+-[0-9a-f]{8})-\d{8}T\d{6}-[0-9a-f]{8}(?:\.merged)?\.parquet$")
_TMP_NAME = re.compile(r"^\.(?P<final>.+)\.[0-9a-f]{32}\.tmp$")  # atomic_write's temporary files
# A listing or read that raced a compaction is done again until it holds, for at most this long.
SCAN_DEADLINE_S = 60.0


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


def part_name(slug: str, merged: bool = False) -> str:
    """A new part file's name: unique, and sorted by when it was made."""
    return f"{slug}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}{MERGED_SUFFIX if merged else '.parquet'}"


class PartsChanged(Exception):
    """Some of the part files a reader was given are gone (a compaction replaced them, or a
    reader set them aside): list the run's part files again."""


@functools.lru_cache(maxsize=65536)
def _replaces(path: str) -> frozenset:
    # Files are written once under a unique name, so one read of a merged file's footer
    # serves every later listing (an error is not cached: the next listing reads again).
    meta = pq.read_metadata(path).metadata or {}
    return frozenset(json.loads(meta.get(REPLACES_KEY, b"[]")))


class PartFolder:
    """One folder of part files. `damaged`: the warning for a damaged file of it, with {}
    for what is wrong."""

    def __init__(self, folder: Path, quarantine: Quarantine, damaged: str) -> None:
        self.folder = folder
        self.quarantine = quarantine
        self.damaged = damaged

    def write(self, table: pa.Table, slug: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return atomic_write(self.folder / part_name(slug), lambda tmp: pq.write_table(table, tmp))

    def names(self) -> set[str]:
        """Names of the files a dataset reader (pandas, pyarrow) would read from the folder."""
        try:
            with os.scandir(self.folder) as entries:  # no stat per file: a run may hold thousands
                return {e.name for e in entries if not e.name.startswith((".", "_")) and e.is_file()}
        except FileNotFoundError:
            return set()

    def listing(self, names: set[str] | None = None) -> list[Path]:
        paths = [self.folder / n for n in sorted(self.names() if names is None else names)]
        damaged = self.quarantine.damaged
        return [p for p in paths if p not in damaged] if damaged else paths

    def replaced(self, listed: list[Path]) -> set[str]:
        """Names of the files that the merged files among `listed` replace; a merged file
        whose footer cannot be read, or that names files of another job, is set aside."""
        replaced: set[str] = set()
        for path in listed:
            if not path.name.endswith(MERGED_SUFFIX):
                continue
            try:
                names = _replaces(str(path))
            except FileNotFoundError:  # replaced in turn meanwhile: the caller lists again
                continue
            except (pa.ArrowException, ValueError, TypeError) as exc:
                self.quarantine.set_aside(path, self.damaged.format(str(exc).split(": ", 1)[-1].split(". ")[0][:120]))
                continue
            own = part_job(path.name)
            foreign = sorted(str(n) for n in names if not isinstance(n, str) or own is None or part_job(n) != own)
            if foreign:
                # Never hide or delete rows of another job on a file's word: the file is damage.
                self.quarantine.set_aside(path, self.damaged.format(
                    f"it names {len(foreign)} file(s) of another job as replaced, e.g. {foreign[0][:80]}"))
                continue
            replaced |= names
        return replaced

    def visible(self) -> list[Path]:
        """The files of the folder less those a merged file there replaces: each row in
        exactly one."""
        deadline = time.monotonic() + SCAN_DEADLINE_S
        while True:
            names = self.names()
            replaced = self.replaced(self.listing({n for n in names if n.endswith(MERGED_SUFFIX)}))
            # A listing taken while a compaction renamed its merged file into place and
            # removed the files it replaces may hold neither; the merged file is then in a
            # second listing, and the first is taken again.
            if not any(n.endswith(MERGED_SUFFIX) for n in self.names() - names) or time.monotonic() > deadline:
                return self.listing(names - replaced)

    def slugs(self) -> set[str]:
        """The jobs with files here."""
        return {s for p in self.listing() if (s := part_job(p.name))}

    def merge(self, slug: str, read: Callable[[list[Path]], pa.Table]) -> int:
        """The one merge of a job's files: `read(files)` of the files still visible, oldest
        first, into one merged file that names every file of the job it covers (leftovers
        of a merge cut short included, so that none of them reappears whichever goes
        first), durable before any of them is removed; then the temporary files a crash
        left of this job's writes. The caller holds the job's lock. Returns how many files
        were removed."""
        listed = self.listing()
        replaced = self.replaced(listed)
        damaged = self.quarantine.damaged
        mine = [p for p in listed if part_job(p.name) == slug and p not in damaged and p.exists()]
        visible = [p for p in mine if p.name not in replaced]
        gone = [p for p in mine if p.name in replaced]  # left by a compaction that stopped before removing them
        if len(visible) > 1:
            # Oldest file first, so rows keep the order in which they were written (names
            # made within one second sort by their random part).
            visible.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
            table = read(visible)
            names = sorted(p.name for p in visible + gone)
            table = table.replace_schema_metadata({REPLACES_KEY: json.dumps(names).encode()})
            atomic_write(self.folder / part_name(slug, merged=True), lambda tmp: pq.write_table(table, tmp))
            gone += visible
        for path in gone:
            path.unlink(missing_ok=True)
        if gone:
            fsync_dir(self.folder)
        # Temporary files of this job's writes that a crash cut short (no reader lists
        # them; nobody else writes this job while its lock is held).
        for path in self.folder.glob(".*.tmp"):
            m = _TMP_NAME.match(path.name)
            if m and part_job(m["final"]) == slug:
                path.unlink(missing_ok=True)
        return len(gone)
