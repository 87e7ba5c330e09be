"""Command line: `python -m sweep [run] ...`, `report`, `validate`, `compact`, `import-mlenergy`.

Exit status: 0 all jobs done, 1 some job failed or the disk is full, 2 bad input
(nothing loaded or written), 130 interrupted by Ctrl-C or SIGTERM (rerun with the same
--run-id to finish).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from sweep.config import ConfigError

EXIT_FAILED_JOBS = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweep", description="Measure GPU energy per LLM response.")
    p.add_argument("--config", required=True, help="models.yaml")
    p.add_argument("--tasks", default="tasks.yaml", help="tasks.yaml (default: %(default)s)")
    p.add_argument("--out", default="runs", help="folder of runs (default: %(default)s)")
    p.add_argument("--run-id", help="resume this run, or name a new one (default: a new timestamped id)")
    p.add_argument("--max-prompts", type=int, help="override prompts.num_prompts")
    p.add_argument("--max-new-tokens", type=int, help="override generation.max_new_tokens")
    p.add_argument("--cpu-workers", type=int, default=1, help="concurrent workers when there is no GPU")
    p.add_argument("--task", action="append", dest="only_tasks", metavar="NAME", help="run only this task (repeatable)")
    p.add_argument("--address", help="join this Ray cluster instead of starting one")
    p.add_argument("--dry-run", action="store_true", help="validate and print the job plan; load nothing")
    p.add_argument("--no-dashboard", action="store_true", help="start Ray without its dashboard")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def cmd_run(argv: list[str]) -> int:
    args = _run_parser().parse_args(argv)
    from sweep.config import check_run_id
    from sweep.preflight import check_address, check_output_folder
    from sweep.prompts import DatasetError
    from sweep.store import RunBusy, RunStore

    try:
        models, tasks, prompt_set = _inputs(args)
        run_id = check_run_id(args.run_id) if args.run_id is not None else time.strftime("%Y%m%d-%H%M%S")
        store = RunStore(Path(args.out) / run_id, read_only=args.dry_run)
        check_output_folder(store.run_dir, "--out")
        if args.address:
            check_address(args.address)
        if args.dry_run:
            _, jobs, stored, _ = _plan(args, store, models, tasks, prompt_set)
            for j in jobs:
                print(f"  {j}: {stored[(j.model, j.task)]}/{len(prompt_set.prompts)} stored")
            return 0
        with store.driver_lock():  # one driver per run, held until it exits
            plan = _plan(args, store, models, tasks, prompt_set)
            return _session(args, store, models, tasks, prompt_set, *plan)
    except (ConfigError, DatasetError, RunBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _inputs(args):
    """The validated config files, task selection and prompts (ConfigError, DatasetError)."""
    from sweep.config import check_model_tasks, load_models, load_tasks, with_overrides
    from sweep.prompts import load_prompt_set

    if args.cpu_workers < 1:
        raise ConfigError("command line: --cpu-workers: must be at least 1")
    models = load_models(args.config)
    tasks = with_overrides(load_tasks(args.tasks), args.max_prompts, args.max_new_tokens)
    check_model_tasks(args.config, models, tasks)
    known = {t.name for t in tasks.tasks}
    for name in args.only_tasks or ():
        if name not in known:
            raise ConfigError(f"command line: --task: unknown task {name!r} (in {args.tasks}: {', '.join(sorted(known))})")
    return models, tasks, load_prompt_set(tasks.prompts)


def _plan(args, store, models, tasks, prompt_set):
    """(manifest or None, jobs, stored rows per job, jobs to run) of the run as it is on
    disk; a resume must measure under the stored settings (ConfigError otherwise)."""
    from sweep.manifest import adopt_folder_name, merge_for_resume, stored_manifest
    from sweep.plan import make_plan

    manifest = stored_manifest(store)
    done = store.done_prompt_ids()
    if manifest is None and any(done.values()):
        rows = sum(len(ids) for ids in done.values())
        raise ConfigError(f"{store.manifest_path}: missing, and the run holds {rows} stored row(s) whose settings "
                          f"cannot be checked without it; put it back (a damaged one is kept in "
                          f"{store.quarantine_dir}) or use a new --run-id")
    if manifest is not None:
        manifest = merge_for_resume(manifest, models, tasks, args.tasks, args.config)
        check_same_prompts(store, manifest, prompt_set)
        old_id = adopt_folder_name(manifest, store.run_dir.name)
        if old_id is not None:
            print(f"note: {store.run_dir} was run {old_id!r} (the folder was renamed or copied); the run is the "
                  f"folder: it continues as {store.run_dir.name!r}, and its rows are read as this run's")
    jobs = [j for j in make_plan(models, tasks) if not args.only_tasks or j.task in args.only_tasks]
    wanted = {p.prompt_id for p in prompt_set.prompts}
    stored = {(j.model, j.task): len(done.get((j.model, j.task), set()) & wanted) for j in jobs}
    todo = [j for j in jobs if stored[(j.model, j.task)] < len(prompt_set.prompts)]
    print(
        f"{'Resuming' if manifest else 'New'} run {store.run_dir.name}: {len(models.models)} model(s) x "
        f"{len(tasks.tasks)} task(s), {len(prompt_set.prompts)} prompts from {prompt_set.source} "
        f"({prompt_set.available} usable, {prompt_set.skipped_empty} empty skipped); "
        f"{len(todo)} of {len(jobs)} job(s) to run"
    )
    return manifest, jobs, stored, todo


def check_same_prompts(store, manifest: dict, prompt_set) -> None:
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


def _session(args, store, models, tasks, prompt_set, manifest, jobs, stored, todo) -> int:
    """One driver session on a validated plan: write the run, sweep, close the session."""
    from sweep.driver import SweepOptions, SweepOutcome, run_sweep
    from sweep.manifest import new_manifest, prompts_digest
    from sweep.store import is_disk_full, job_slug

    run_id = store.run_dir.name
    session: dict | None = None

    def close(outcome: SweepOutcome | None) -> None:
        """Mark the session finished in the manifest (the UI shows a run without that as
        running); None: stopped at once, counts unknown."""
        if session is None:
            return
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
            store.create()
            store.write_prompts(prompt_set.prompts)
            if manifest is None:
                prompt_info = {"source": prompt_set.source, "count": len(prompt_set.prompts),
                               "available": prompt_set.available, "skipped_empty": prompt_set.skipped_empty,
                               "sha256": prompts_digest(prompt_set.prompts)}
                manifest = new_manifest(run_id, models, tasks, prompt_info)
            # The tasks this session was asked for: `validate` plans a run by its sessions' tasks.
            session = {"started_at": _now(), "argv": sys.argv[1:],
                       "tasks": sorted({j.task for j in jobs})}
            manifest["sessions"].append(session)
            store.write_manifest(manifest)
            # Jobs this session will not touch: part files that a crash left uncompacted
            # (or a compaction cut short left behind) are merged now; the others are when
            # they end.
            # A job whose last rows a crash left only in its log counts as done (a resume
            # reads logs too) and is not run again: its rows move into the dataset here.
            for j in (j for j in jobs if j not in todo):
                # Every row stored: whatever failed before (a writer killed while it closed the
                # job), the job is not failed.
                store.clear_failure(j.model, j.task)
                slug = job_slug(j.model, j.task)
                if (store.wal_dir / f"{slug}.jsonl").is_file():
                    try:
                        with store.job_lock(slug, timeout_s=0):
                            store.recover_wal(slug, j.model, j.task)
                    except TimeoutError:  # a leftover writer still holds it: its end writes them
                        pass
            compacted, _, _ = store.compact_run(skip={job_slug(j.model, j.task) for j in todo})
            if compacted:
                print(f"Compacted the part files of {compacted} job(s) that an earlier session left uncompacted")
            if todo:
                opts = SweepOptions(run_id=run_id, run_dir=str(store.run_dir), address=args.address,
                                    cpu_workers=args.cpu_workers, dashboard=not args.no_dashboard,
                                    progress=not args.no_progress)
                outcome = run_sweep(opts, models, tasks, prompt_set, todo, stored)
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

    if not todo and not (outcome.interrupted or outcome.disk_full):
        print(f"Nothing to do: every job of run {run_id} is stored.")
        return 0
    print(f"\nStored {outcome.written} new row(s) in {store.results_dir}")
    if outcome.disk_full:
        print(f"disk full: {outcome.disk_full}. Free some space, then rerun with --run-id {run_id} to finish; "
              f"nothing stored is lost.", file=sys.stderr)
        return EXIT_FAILED_JOBS
    if outcome.interrupted:
        print(f"Interrupted. Rerun with --run-id {run_id} to finish; nothing stored is lost.")
        return EXIT_INTERRUPTED
    if outcome.failed:
        print(f"{len(outcome.failed)} job(s) failed (details in {store.failures_dir}):")
        for f in outcome.failed:
            print(f"  {f['model']} / {f['task']}: {f['error'].splitlines()[0][:300]}")
        return EXIT_FAILED_JOBS
    from sweep.report import print_leaderboard

    print_leaderboard(store)
    print(f"\nAll jobs done. Dataset: {store.results_dir} (pandas.read_parquet)\n"
          f"Again: python -m sweep report {store.run_dir}    Browse: python -m ui --runs {store.run_dir.parent}")
    return 0


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


def cmd_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sweep report", description="Leaderboard of a run.")
    p.add_argument("run_dir")
    p.add_argument("--csv", metavar="DIR", help="write {GPU}_{task}_benchmark.csv files (2023 layout) here")
    args = p.parse_args(argv)
    from sweep.report import print_leaderboard, write_csvs
    from sweep.store import RunStore

    from sweep.preflight import check_output_folder

    store = RunStore(args.run_dir)
    if not store.results_dir.is_dir() and not (store.run_dir / "aggregates.parquet").is_file():
        print(f"error: {args.run_dir}: no results/ folder: not a run directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.csv:
        try:
            check_output_folder(Path(args.csv), "--csv")
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    print_leaderboard(store)
    if args.csv:
        try:
            for path in write_csvs(store, args.csv):
                print(f"wrote {path}")
        except (ConfigError, OSError) as exc:
            why = exc if isinstance(exc, ConfigError) else f"command line: --csv: {exc.filename}: {exc.strerror}"
            print(f"error: {why}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return 0


def cmd_validate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sweep validate",
                                description="Check a run: complete, each row stored once, energy trustworthy. "
                                            "Exit 0 when no error-level check fails (with --strict: no check), "
                                            "1 otherwise.")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--strict", action="store_true", help="a failed warning-level check fails the run too")
    args = p.parse_args(argv)
    import json

    from sweep.store import RunStore
    from sweep.validate import as_records, failed_run, print_table, validate

    store = RunStore(args.run_dir)
    if not store.results_dir.is_dir():
        print(f"error: {args.run_dir}: no results/ folder: not a run directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    expectations = validate(store)
    if args.json:
        print(json.dumps(as_records(expectations), indent=1))
    else:
        print_table(expectations, args.strict)
    return 1 if failed_run(expectations, args.strict) else 0


def cmd_compact(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sweep compact",
        description="Merge each job's part files into one file (a sweep does it when a job ends; this is for runs "
                    "written before that, or stopped). Jobs a running sweep is writing are left to it.")
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    from sweep.store import RunStore

    store = RunStore(args.run_dir)
    if not store.results_dir.is_dir():
        print(f"error: {args.run_dir}: no results/ folder: not a run directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    before = len(store.part_files())
    jobs, removed, busy = store.compact_run()
    print(f"{store.results_dir}: {jobs} job(s) compacted, {removed} file(s) replaced; "
          f"{before} part file(s) before, {len(store.part_files())} now")
    if busy:
        print(f"{len(busy)} job(s) being written by a sweep, left to it: {', '.join(busy)}")
    return 0


def cmd_import_mlenergy(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sweep import-mlenergy",
                                description="Import the 2023 ML.ENERGY leaderboard's published results as a run.")
    p.add_argument("source", help="folder with {GPU}_{task}_benchmark.csv, models.json, score.csv")
    p.add_argument("--out", default="runs")
    p.add_argument("--run-id", default="mlenergy-2023")
    args = p.parse_args(argv)
    from sweep.config import check_run_id
    from sweep.mlenergy_import import import_mlenergy

    try:
        path, rows = import_mlenergy(args.source, args.out, check_run_id(args.run_id))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"imported {rows} (model, gpu, task) rows into {path}")
    return 0


COMMANDS = {"run": cmd_run, "report": cmd_report, "validate": cmd_validate, "compact": cmd_compact,
            "import-mlenergy": cmd_import_mlenergy}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else cmd_run(argv)
    except KeyboardInterrupt:  # before a sweep started, or in a report: nothing to finish
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
