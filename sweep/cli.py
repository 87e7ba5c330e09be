"""Command line: `python -m sweep [run] ...`, `report`, `import-mlenergy`.

Exit status: 0 all jobs done, 1 some job failed, 2 bad input (nothing loaded or
written), 130 interrupted (rerun with the same --run-id to finish).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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
    from sweep.config import check_model_tasks, load_models, load_tasks, with_overrides
    from sweep.manifest import merge_for_resume, new_manifest
    from sweep.plan import make_plan
    from sweep.prompts import DatasetError, load_prompt_set
    from sweep.store import RunStore

    try:
        if args.cpu_workers < 1:
            raise ConfigError("command line: --cpu-workers: must be at least 1")
        models = load_models(args.config)
        tasks = with_overrides(load_tasks(args.tasks), args.max_prompts, args.max_new_tokens)
        check_model_tasks(args.config, models, tasks)
        known = {t.name for t in tasks.tasks}
        for name in args.only_tasks or ():
            if name not in known:
                raise ConfigError(f"command line: --task: unknown task {name!r} (in {args.tasks}: {', '.join(sorted(known))})")
        prompt_set = load_prompt_set(tasks.prompts)
        run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
        store = RunStore(Path(args.out) / run_id)
        manifest = store.read_manifest()
        if manifest is not None:
            manifest = merge_for_resume(manifest, models, tasks, args.tasks, args.config)
    except (ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    jobs = [j for j in make_plan(models, tasks) if not args.only_tasks or j.task in args.only_tasks]
    done = store.done_prompt_ids()
    wanted = {p.prompt_id for p in prompt_set.prompts}
    stored = {(j.model, j.task): len(done.get((j.model, j.task), set()) & wanted) for j in jobs}
    todo = [j for j in jobs if stored[(j.model, j.task)] < len(prompt_set.prompts)]
    print(
        f"{'Resuming' if manifest else 'New'} run {run_id}: {len(models.models)} model(s) x {len(tasks.tasks)} task(s), "
        f"{len(prompt_set.prompts)} prompts from {prompt_set.source} "
        f"({prompt_set.available} usable, {prompt_set.skipped_empty} empty skipped); "
        f"{len(todo)} of {len(jobs)} job(s) to run"
    )
    if args.dry_run:
        for j in jobs:
            print(f"  {j}: {stored[(j.model, j.task)]}/{len(prompt_set.prompts)} stored")
        return 0

    store.create()
    store.write_prompts(prompt_set.prompts)
    if manifest is None:
        prompt_info = {"source": prompt_set.source, "count": len(prompt_set.prompts),
                       "available": prompt_set.available, "skipped_empty": prompt_set.skipped_empty}
        manifest = new_manifest(run_id, models, tasks, prompt_info)
    manifest["sessions"].append({"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:]})
    store.write_manifest(manifest)
    if not todo:
        print(f"Nothing to do: every job of run {run_id} is stored.")
        return 0

    from sweep.driver import SweepOptions, run_sweep

    opts = SweepOptions(run_id=run_id, run_dir=str(store.run_dir), address=args.address, cpu_workers=args.cpu_workers,
                        dashboard=not args.no_dashboard, progress=not args.no_progress)
    outcome = run_sweep(opts, models, tasks, prompt_set, todo, stored)

    manifest = store.read_manifest()
    for dev in outcome.devices:
        if dev not in manifest["gpus"]:
            manifest["gpus"].append(dev)
    manifest["sessions"][-1].update(finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), written=outcome.written,
                                    failed=len(outcome.failed), interrupted=outcome.interrupted)
    store.write_manifest(manifest)

    print(f"\nStored {outcome.written} new row(s) in {store.results_dir}")
    if outcome.interrupted:
        print(f"Interrupted. Rerun with --run-id {run_id} to finish; nothing stored is lost.")
        return EXIT_INTERRUPTED
    if outcome.failed:
        print(f"{len(outcome.failed)} job(s) failed (details in {store.failures_dir}):")
        for f in outcome.failed:
            print(f"  {f['model']} / {f['task']}: {f['error'].splitlines()[0][:300]}")
        return EXIT_FAILED_JOBS
    print(f"All jobs done. Leaderboard: python -m sweep report {store.run_dir}")
    return 0


def cmd_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sweep report", description="Leaderboard of a run.")
    p.add_argument("run_dir")
    p.add_argument("--csv", metavar="DIR", help="write {GPU}_{task}_benchmark.csv files (2023 layout) here")
    args = p.parse_args(argv)
    from sweep.report import print_leaderboard, write_csvs
    from sweep.store import RunStore

    store = RunStore(args.run_dir)
    if not store.results_dir.is_dir() and not (store.run_dir / "aggregates.parquet").is_file():
        print(f"error: {args.run_dir}: no results/ folder: not a run directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_leaderboard(store)
    if args.csv:
        for path in write_csvs(store, args.csv):
            print(f"wrote {path}")
    return 0


def cmd_import_mlenergy(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sweep import-mlenergy",
                                description="Import the 2023 ML.ENERGY leaderboard's published results as a run.")
    p.add_argument("source", help="folder with {GPU}_{task}_benchmark.csv, models.json, score.csv")
    p.add_argument("--out", default="runs")
    p.add_argument("--run-id", default="mlenergy-2023")
    args = p.parse_args(argv)
    from sweep.mlenergy_import import import_mlenergy

    try:
        path, rows = import_mlenergy(args.source, args.out, args.run_id)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"imported {rows} (model, gpu, task) rows into {path}")
    return 0


COMMANDS = {"run": cmd_run, "report": cmd_report, "import-mlenergy": cmd_import_mlenergy}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return cmd_run(argv)
