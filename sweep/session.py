"""One driver session on a run: its inputs validated, its plan against what is stored, and
the session itself (manifest, recovery and compaction of the jobs it will not run, the
sweep, the session's record).

The command line (sweep/cli.py) builds a `Request`, calls `load_inputs`, `plan` and
`run_session`, and turns the `SessionEnd` into messages and an exit status.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from sweep.config import ConfigError, ModelsFile, TasksFile
from sweep.plan import Job
from sweep.prompts import PromptSet


@dataclass(frozen=True)
class Request:
    """What the command line asked for."""

    config: str
    tasks: str = "tasks.yaml"
    only_tasks: tuple[str, ...] = ()
    max_prompts: int | None = None
    max_new_tokens: int | None = None
    cpu_workers: int = 1
    address: str | None = None
    dashboard: bool = True
    progress: bool = True


@dataclass(frozen=True)
class Inputs:
    models: ModelsFile
    tasks: TasksFile
    prompt_set: PromptSet


@dataclass
class Plan:
    manifest: dict | None  # the stored run's, merged for this session; None for a new run
    jobs: list[Job]
    stored: dict[tuple[str, str], int]  # rows already stored per (model, job key)
    todo: list[Job]


@dataclass
class SessionEnd:
    nothing_to_do: bool = False
    written: int = 0
    failed: list[dict] = field(default_factory=list)
    interrupted: bool = False
    disk_full: str | None = None


def load_inputs(req: Request) -> Inputs:
    """The validated config files, task selection and prompts (ConfigError, DatasetError)."""
    from sweep.config import check_model_tasks, load_models, load_tasks, with_overrides
    from sweep.prompts import load_prompt_set

    if req.cpu_workers < 1:
        raise ConfigError("command line: --cpu-workers: must be at least 1")
    models = load_models(req.config)
    tasks = with_overrides(load_tasks(req.tasks), req.max_prompts, req.max_new_tokens)
    check_model_tasks(req.config, models, tasks, req.tasks)
    known = {t.name for t in tasks.tasks}
    for name in req.only_tasks:
        if name not in known:
            raise ConfigError(f"command line: --task: unknown task {name!r} (in {req.tasks}: {', '.join(sorted(known))})")
    return Inputs(models, tasks, load_prompt_set(tasks.prompts))


def plan(req: Request, store, inputs: Inputs) -> Plan:
    """The run as it is on disk, against what this session asks for; a resume must measure
    under the stored settings and prompts (ConfigError otherwise)."""
    from sweep.manifest import adopt_folder_name, merge_for_resume, stored_manifest
    from sweep.plan import make_plan

    models, tasks, prompt_set = inputs.models, inputs.tasks, inputs.prompt_set
    manifest = stored_manifest(store)
    done = store.done_prompt_ids()
    if manifest is None and any(done.values()):
        rows = sum(len(ids) for ids in done.values())
        raise ConfigError(f"{store.manifest_path}: missing, and the run holds {rows} stored row(s) whose settings "
                          f"cannot be checked without it; put it back (a damaged one is kept in "
                          f"{store.quarantine_dir}) or use a new --run-id")
    if manifest is not None:
        manifest = merge_for_resume(manifest, models, tasks, req.tasks, req.config)
        check_same_prompts(store, manifest, prompt_set)
        old_id = adopt_folder_name(manifest, store.run_dir.name)
        if old_id is not None:
            print(f"note: {store.run_dir} was run {old_id!r} (the folder was renamed or copied); the run is the "
                  f"folder: it continues as {store.run_dir.name!r}, and its rows are read as this run's")
    jobs = [j for j in make_plan(models, tasks) if not req.only_tasks or j.task in req.only_tasks]
    wanted = {p.prompt_id for p in prompt_set.prompts}
    stored = {(j.model, j.key): len(done.get((j.model, j.key), set()) & wanted) for j in jobs}
    todo = [j for j in jobs if stored[(j.model, j.key)] < len(prompt_set.prompts)]
    print(
        f"{'Resuming' if manifest else 'New'} run {store.run_dir.name}: {len(models.models)} model(s) x "
        f"{len(tasks.tasks)} task(s), {len(prompt_set.prompts)} prompts from {prompt_set.source} "
        f"({prompt_set.available} usable, {prompt_set.skipped_empty} empty skipped); "
        f"{len(todo)} of {len(jobs)} job(s) to run"
    )
    return Plan(manifest, jobs, stored, todo)


def check_same_prompts(store, manifest: dict, prompt_set: PromptSet) -> None:
    """A resume measures the prompts the run was started on: the ids and texts sampled now
    must be those stored in prompts.parquet (and the manifest's digest of them, where it
    has one). ConfigError naming the dataset and the first prompt that differs."""
    from sweep.manifest import prompts_digest

    source = prompt_set.source
    stored = store.read_prompts()
    now = {p.prompt_id: p.text for p in prompt_set.prompts}
    if len(stored):
        before = dict(zip(stored["prompt_id"], stored["prompt"]))
        for pid in sorted(set(before) | set(now)):
            if before.get(pid) != now.get(pid):
                what = ("is new" if pid not in before else "is gone" if pid not in now else "has another text")
                raise ConfigError(f"{source}: prompt {pid[:80]!r} {what} since the run was started (its prompts are in "
                                  f"{store.prompts_path}); the dataset changed: use a new --run-id")
    digest = (manifest.get("prompts") or {}).get("sha256")
    if digest is not None and digest != prompts_digest(prompt_set.prompts):
        raise ConfigError(f"{source}: the sampled prompts differ from those the run was started on (manifest "
                          f"prompts.sha256); the dataset changed: use a new --run-id")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _prepare(store, inputs: Inputs, p: Plan, run_id: str) -> tuple[dict, dict]:
    """The manifest (new, or the stored one) with this session appended, written; the
    jobs this session will not run tidied. Returns (manifest, session record)."""
    from sweep.manifest import new_manifest, prompts_digest
    from sweep.store import job_slug

    store.create()
    store.write_prompts(inputs.prompt_set.prompts)
    manifest = p.manifest
    if manifest is None:
        ps = inputs.prompt_set
        manifest = new_manifest(run_id, inputs.models, inputs.tasks,
                                {"source": ps.source, "count": len(ps.prompts), "available": ps.available,
                                 "skipped_empty": ps.skipped_empty, "sha256": prompts_digest(ps.prompts)})
    # The tasks this session was asked for: `validate` plans a run by its sessions' tasks.
    session = {"started_at": _now(), "argv": sys.argv[1:], "tasks": sorted({j.task for j in p.jobs})}
    manifest["sessions"].append(session)
    store.write_manifest(manifest)
    for j in (j for j in p.jobs if j not in p.todo):
        # Every row stored: whatever failed before (a writer killed while it closed the
        # job), the job is not failed.
        store.clear_failure(j.model, j.key)
        # A job whose last rows a crash left only in its log counts as done (a resume reads
        # logs too) and is not run again: its rows move into the dataset here.
        slug = job_slug(j.model, j.key)
        if (store.wal_dir / f"{slug}.jsonl").is_file():
            try:
                with store.job_lock(slug, timeout_s=0):
                    store.recover_wal(slug, j.model, j.key)
            except TimeoutError:  # a leftover writer still holds it: its end writes them
                pass
    # Part files that a crash left uncompacted (or a compaction cut short left behind) are
    # merged now for the jobs this session will not touch; the others are when they end.
    compacted, _, _ = store.compact_run(skip={job_slug(j.model, j.key) for j in p.todo})
    if compacted:
        print(f"Compacted the part files of {compacted} job(s) that an earlier session left uncompacted")
    return manifest, session


def run_session(req: Request, store, inputs: Inputs, p: Plan) -> SessionEnd:
    """Write the run, sweep what is left to do, and close the session's record."""
    from sweep.driver import SweepOptions, SweepOutcome, run_sweep
    from sweep.store import is_disk_full

    run_id = store.run_dir.name
    state: dict = {}

    def close(outcome: SweepOutcome | None) -> None:
        """Mark the session finished in the manifest (the UI shows a run without that as
        running); None: stopped at once, counts unknown."""
        if "session" not in state:
            return
        manifest, session = state["manifest"], state["session"]
        if outcome is None:
            session.update(finished_at=_now(), interrupted=True)
        else:
            for dev in outcome.devices:
                if dev not in manifest["gpus"]:
                    manifest["gpus"].append(dev)
            session.update(finished_at=_now(), written=outcome.written, failed=len(outcome.failed),
                           interrupted=outcome.interrupted)
            if outcome.disk_full:
                session["disk_full"] = outcome.disk_full
        store.write_manifest(manifest)

    outcome = SweepOutcome()
    with _interrupts(lambda: close(None)):
        try:
            state["manifest"], state["session"] = _prepare(store, inputs, p, run_id)
            if p.todo:
                opts = SweepOptions(run_id=run_id, run_dir=str(store.run_dir), address=req.address,
                                    cpu_workers=req.cpu_workers, dashboard=req.dashboard, progress=req.progress)
                outcome = run_sweep(opts, inputs.models, inputs.tasks, inputs.prompt_set, p.todo, p.stored)
        except KeyboardInterrupt:
            outcome.interrupted = True
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            outcome.disk_full = str(exc)
        try:
            close(outcome)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            outcome.disk_full = outcome.disk_full or str(exc)
    return SessionEnd(nothing_to_do=not p.todo and not (outcome.interrupted or outcome.disk_full),
                      written=outcome.written, failed=outcome.failed, interrupted=outcome.interrupted,
                      disk_full=outcome.disk_full)


EXIT_INTERRUPTED = 130  # the exit status of an interrupted session (sweep/cli.py maps the others)


@contextmanager
def _interrupts(on_quit: Callable[[], None]) -> Iterator[None]:
    """Ctrl-C and SIGTERM (what a batch scheduler sends) stop a sweep alike: the first
    raises KeyboardInterrupt and the driver stops cleanly, stored rows kept. A second
    one while that is under way ends the process at once, quietly: `on_quit` (close
    the session), then this process and the Ray processes it started."""

    def first(signum, frame):
        for sig in saved:
            signal.signal(sig, again)
        raise KeyboardInterrupt

    def again(signum, frame):
        os.write(2, b"\nInterrupted again: stopping now. Rerun with the same --run-id to finish.\n")
        try:
            on_quit()
        except Exception:
            pass
        _end_children()
        os._exit(EXIT_INTERRUPTED)

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, first)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _end_children() -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
