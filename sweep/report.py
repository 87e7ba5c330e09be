"""From per-request rows to the leaderboard: terminal tables and the 2023 CSV layout.

The figures (per run, gpu, model, backend, task) are defined in `sweep.aggregate`, which
reads only the columns they need.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa

from sweep.aggregate import KEYS, finish, gpu_short_name, job_figures, partials_of_table, worker_partials  # noqa: F401
from sweep.store import RunStore

CSV_COLUMNS = ["model", "throughput", "response_length", "latency", "energy"]
AGGREGATES_FILE = "aggregates.parquet"  # aggregate-only runs (imported results) keep this instead of results/


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-request rows (a frame of the results dataset) -> one row per (run_id, gpu, model, backend, task)."""
    return finish(partials_of_table(pa.Table.from_pandas(rows, preserve_index=False)))


def read_imported(path: Path) -> pd.DataFrame:
    """The aggregates of an imported run (aggregates.parquet)."""
    agg = pd.read_parquet(path)
    # Imported before the column existed: only the 2023 import writes this file.
    return agg if "backend" in agg else agg.assign(backend="fastchat")


def run_aggregates(store: RunStore) -> pd.DataFrame:
    """Aggregates of one run, whether it holds per-request rows or only aggregates."""
    imported = store.run_dir / AGGREGATES_FILE
    if imported.is_file():
        return read_imported(imported)
    return store.scan_parts(lambda paths: job_figures(worker_partials(tuple(paths))[0]))


def run_status(store: RunStore) -> tuple[pd.DataFrame, list]:
    """(per (model, task) validation status, every expectation) of a run of per-request rows."""
    from sweep.validate import job_status, validate

    if (store.run_dir / AGGREGATES_FILE).is_file():
        return pd.DataFrame(columns=["model", "task", "validation"]), []
    expectations = validate(store)
    return job_status(expectations), expectations


def print_leaderboard(store: RunStore) -> None:
    agg = run_aggregates(store)
    status, expectations = run_status(store)
    agg = agg.merge(status, on=["model", "task"], how="left")
    set_aside = store.set_aside_files()
    if set_aside:
        print(f"{len(set_aside)} damaged file(s) set aside in {store.quarantine_dir}: their rows are not "
              f"counted here (a resume of the run measures them again)")
    if agg.empty:
        print(f"{store.run_dir}: no results yet")
        return
    cols = ["model", "backend", "parameters", "throughput", "response_length", "latency", "energy", "energy_per_token",
            "responses", "validation"]
    fmt = {"parameters": "{:.3g}".format, "throughput": "{:.1f}".format, "response_length": "{:.1f}".format,
           "latency": "{:.2f}".format, "energy": "{:.1f}".format, "energy_per_token": "{:.3f}".format}
    for (gpu, task), g in agg.groupby(["gpu", "task"], sort=True):
        table = g.sort_values("energy", na_position="last")[cols]
        print(f"\n== {gpu} / {task}  (energy: J per response, mean; throughput: tokens/s; latency: s)")
        print(table.to_string(index=False, formatters=fmt, na_rep="n/a"))
        notes = g["energy_note"].dropna().unique() if "energy_note" in g else []
        for note in notes:
            print(f"   energy n/a: {note}")
    failures = store.failures()
    if failures:
        print(f"\n{len(failures)} failed job(s):")
        for f in failures:
            print(f"  {f['model']} / {f['task']}: {f['error'].splitlines()[0][:200]}")
    failed = [e for e in expectations if not e.passed]
    if failed:
        errors = sum(e.severity == "error" for e in failed)
        print(f"\nvalidation: {errors} error(s), {len(failed) - errors} warning(s); "
              f"details: python -m sweep validate {store.run_dir}")


def write_csvs(store: RunStore, out_dir: str | Path) -> list[Path]:
    """{GPU}_{task}_benchmark.csv with the 2023 columns, one per (gpu, task)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (gpu, task), g in run_aggregates(store).groupby(["gpu", "task"], sort=True):
        path = out / f"{gpu}_{task}_benchmark.csv"
        g.sort_values("energy", na_position="last")[CSV_COLUMNS].to_csv(path, index=False)
        written.append(path)
    return written
