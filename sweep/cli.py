"""Command line: `python -m sweep [run] ...`, `report`, `validate`, `compact`, `import-mlenergy`.

It parses arguments, calls the library (a run's session is sweep/session.py) and maps the
outcome to an exit status.

Exit status: 0 all jobs done, 1 some job failed or the disk is full, 2 bad input
(nothing loaded or written), 130 interrupted by Ctrl-C or SIGTERM (rerun with the same
--run-id to finish).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sweep.config import ConfigError
from sweep.session import EXIT_INTERRUPTED  # a second Ctrl-C exits with it from there

EXIT_FAILED_JOBS = 1
EXIT_BAD_INPUT = 2


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
    from sweep.session import Request, load_inputs, plan, run_session
    from sweep.store import RunBusy, RunStore

    req = Request(config=args.config, tasks=args.tasks, only_tasks=tuple(args.only_tasks or ()),
                  max_prompts=args.max_prompts, max_new_tokens=args.max_new_tokens, cpu_workers=args.cpu_workers,
                  address=args.address, dashboard=not args.no_dashboard, progress=not args.no_progress)
    try:
        inputs = load_inputs(req)
        run_id = check_run_id(args.run_id) if args.run_id is not None else time.strftime("%Y%m%d-%H%M%S")
        store = RunStore(Path(args.out) / run_id, read_only=args.dry_run)
        check_output_folder(store.run_dir, "--out")
        if args.address:
            check_address(args.address)
        if args.dry_run:
            p = plan(req, store, inputs)
            for j in p.jobs:
                print(f"  {j}: {p.stored[(j.model, j.key)]}/{len(inputs.prompt_set.prompts)} stored")
            return 0
        with store.driver_lock():  # one driver per run, held until it exits
            end = run_session(req, store, inputs, plan(req, store, inputs))
    except (ConfigError, DatasetError, RunBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _report_end(store, end)


def _report_end(store, end) -> int:
    """What a session's end means for the user, and its exit status."""
    run_id = store.run_dir.name
    if end.nothing_to_do:
        print(f"Nothing to do: every job of run {run_id} is stored.")
        return 0
    print(f"\nStored {end.written} new row(s) in {store.results_dir}")
    if end.disk_full:
        print(f"disk full: {end.disk_full}. Free some space, then rerun with --run-id {run_id} to finish; "
              f"nothing stored is lost.", file=sys.stderr)
        return EXIT_FAILED_JOBS
    if end.interrupted:
        print(f"Interrupted. Rerun with --run-id {run_id} to finish; nothing stored is lost.")
        return EXIT_INTERRUPTED
    if end.failed:
        print(f"{len(end.failed)} job(s) failed (details in {store.failures_dir}):")
        for f in end.failed:
            print(f"  {f['model']} / {f['task']}: {f['error'].splitlines()[0][:300]}")
        return EXIT_FAILED_JOBS
    from sweep.report import print_leaderboard

    print_leaderboard(store)
    print(f"\nAll jobs done. Dataset: {store.results_dir} (pandas.read_parquet)\n"
          f"Again: python -m sweep report {store.run_dir}    Browse: python -m ui --runs {store.run_dir.parent}")
    return 0


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
