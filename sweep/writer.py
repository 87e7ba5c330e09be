"""The one owner of a run directory during a session: a Ray actor on the driver's node.

Workers may run on any node of a cluster, and nodes need not share a filesystem, so no
worker opens the run directory by path. Each hands its finished rows to this actor and
awaits the acknowledgement that the row is in the job's write-ahead log, fsync'ed,
after its next request (one row in flight): a crash still loses at most the requests in
flight, which a resume runs again.

Exclusivity per job lives here too. The writer holds a job's file lock while a worker
runs it; a writer left over from a killed driver holds its locks until Ray ends it with
its driver, so a quick rerun's writer waits for them (`open_job` answers "busy" and the
worker asks again) instead of two sessions writing one job. Every opening gets a fresh
token: rows from a worker whose job was handed to another worker (it was presumed dead)
are refused, never stored twice.

When a job closes, its part files are compacted into one (RunStore.compact), under the
job's lock, before it is released: at most a few files per job once a sweep is done,
and a reader sees every row once throughout. Compaction is tidying, never a reason to
fail a job: if it cannot be done (a full disk), the part files stay, with a warning.
"""

from __future__ import annotations

import itertools
import socket
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from sweep.logs import warn
from sweep.store import JobWriter, RunStore, job_slug


class StaleJob(Exception):
    """A row from a worker that no longer holds the job (it was reopened, or closed)."""


class WrongNode(Exception):
    """The writer does not see the driver's run directory: it is not on the driver's node."""


@dataclass
class _OpenJob:
    token: int
    writer: JobWriter
    held: ExitStack = field(default_factory=ExitStack)  # the job's file lock


class RunWriter:
    """Owns one RunStore for one driver session. Ray wraps this class in the driver."""

    def __init__(self, run_dir: str, driver_lock_text: str) -> None:
        self.store = RunStore(run_dir)
        # The driver holds the run's lock and wrote its name in it: reading the same text
        # back proves this process sees the driver's files, not a same-named folder elsewhere.
        lock = self.store.locks_dir / "driver.lock"
        try:
            seen = lock.read_text().strip()
        except OSError:
            seen = None
        if seen != driver_lock_text:
            raise WrongNode(f"{socket.gethostname()}: {lock} does not hold this driver's lock "
                            f"({seen!r}, expected {driver_lock_text!r}); the writer must run on the driver's node")
        self._jobs: dict[str, _OpenJob] = {}
        self._tokens = itertools.count(1)

    def open_job(self, model: str, task: str) -> tuple[int, list[str]] | None:
        """Take the job: its lock, its log's leftover rows moved into the dataset; returns
        (token, prompt ids already stored), or None while another process holds the job
        (a writer of a killed driver, not ended yet): ask again shortly."""
        slug = job_slug(model, task)
        self._release(slug)  # a reopening means the job's last worker is gone
        held = ExitStack()
        try:
            held.enter_context(self.store.job_lock(slug, timeout_s=0))
        except TimeoutError:
            held.close()
            return None
        try:
            self.store.recover_wal(slug, model, task)
            done = self.store.done_prompt_ids(model, task).get((model, task), set())
            job = _OpenJob(next(self._tokens), self.store.writer(slug), held)
        except BaseException:
            held.close()
            raise
        self._jobs[slug] = job
        return job.token, sorted(done)

    def append(self, model: str, task: str, token: int, row: dict) -> None:
        """Store one row; returns once it is in the write-ahead log, fsync'ed."""
        self._job(model, task, token).writer.append(row)

    def append_power(self, model: str, task: str, token: int, samples) -> None:
        """Store power samples (a pyarrow Table) of the job's worker."""
        self._job(model, task, token).writer.append_power(samples)

    def append_reference(self, model: str, task: str, token: int, check: dict) -> None:
        """Store one reference check of the job (sweep.record.REFERENCE_SCHEMA)."""
        self._job(model, task, token).writer.append_reference(check)

    def append_job(self, model: str, task: str, token: int, figures: dict) -> None:
        """Store a job's own figures (at concurrency > 1: its steady window), runs/<id>/jobs/."""
        self._job(model, task, token)
        self.store.append_job_figures(job_slug(model, task), model, task, figures)

    def append_log(self, model: str, task: str, token: int, text: str) -> None:
        """Append to the job's serving-engine log (runs/<id>/servers/<job>.log)."""
        self._job(model, task, token)
        self.store.append_server_log(job_slug(model, task), text)

    def close_job(self, model: str, task: str, token: int) -> None:
        """The job's rows into Parquet, its log removed, its part files compacted, its lock
        released."""
        self._job(model, task, token)
        self._release(job_slug(model, task), compact=True)

    def close_all(self) -> int:
        """End of the session: every open job closed (rows of workers that died or were
        stopped reach Parquet now; such a job is compacted when it ends, in a later
        session, so that a stop stays quick). Returns how many were open."""
        slugs = list(self._jobs)
        for slug in slugs:
            self._release(slug)
        return len(slugs)

    def where(self) -> str:
        return socket.gethostname()

    def _job(self, model: str, task: str, token: int) -> _OpenJob:
        job = self._jobs.get(job_slug(model, task))
        if job is None or job.token != token:
            raise StaleJob(f"{model} / {task}: this worker no longer holds the job")
        return job

    def _release(self, slug: str, compact: bool = False) -> None:
        job = self._jobs.pop(slug, None)
        if job is not None:
            with job.held:  # the lock goes even when the last flush fails (disk full)
                job.writer.close()
                if compact:
                    try:
                        self.store.compact(slug)
                    except Exception as exc:  # the rows are stored either way
                        warn(f"{self.store.results_dir}: job {slug} not compacted ({type(exc).__name__}: {exc}); "
                             f"its part files are read as they are, and compacted at the next session")


def start_writer(run_dir: str | Path, run_id: str, driver_lock_text: str):
    """The session's writer actor, pinned to this driver's node (where the run directory
    is); it takes no CPU slot, so it never waits behind workers for one."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ray.remote(RunWriter).options(
        name=f"sweep writer [{run_id}]",
        num_cpus=0,
        max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    ).remote(str(run_dir), driver_lock_text)
