"""From per-request rows to the leaderboard: terminal tables and the 2023 CSV layout.

The figures (per run, gpu, model, backend, task) are defined in `sweep.aggregate`, which
reads only the columns they need.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from sweep.aggregate import KEYS, finish, gpu_file_name, job_figures, partials_of_table, worker_partials  # noqa: F401
from sweep.config import ConfigError
from sweep.record import job_key, split_job_key
from sweep.store import RunStore

CSV_COLUMNS = ["model", "throughput", "response_length", "latency", "energy"]
AGGREGATES_FILE = "aggregates.parquet"  # aggregate-only runs (imported results) keep this instead of results/


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-request rows (a frame of the results dataset) -> one row per (run_id, gpu, model, backend, task)."""
    return finish(partials_of_table(pa.Table.from_pandas(rows, preserve_index=False)))


IMPORTED_KEYS = ["model", "gpu", "task"]


def read_imported(path: Path) -> pd.DataFrame:
    """The aggregates of an imported run (aggregates.parquet), as the run of the folder
    they are in; a damaged file is set aside (the run then reads as empty)."""
    try:
        agg = pd.read_parquet(path)
        missing = [c for c in IMPORTED_KEYS if c not in agg.columns]
        problem = f"no {', '.join(missing)} column" if missing else None
    except (pa.ArrowException, OSError, ValueError) as exc:
        problem = f"not readable Parquet: {str(exc)[:120]}"
    if problem:
        RunStore(path.parent).set_aside(path, f"damaged imported aggregates ({problem})")
        return pd.DataFrame(columns=KEYS)
    agg = agg.assign(run_id=path.parent.name)
    # An import from before non-finite values were refused: such a figure is not one.
    numeric = agg.select_dtypes("number").columns
    agg[numeric] = agg[numeric].where(np.isfinite(agg[numeric]))
    if "concurrency" not in agg:  # one request at a time, as 2023 measured
        agg = agg.assign(concurrency=1)
    # Imported before the column existed: only the 2023 import writes this file.
    return agg if "backend" in agg else agg.assign(backend="fastchat")


def run_aggregates(store: RunStore) -> pd.DataFrame:
    """Aggregates of one run, whether it holds per-request rows or only aggregates."""
    imported = store.run_dir / AGGREGATES_FILE
    if imported.is_file():
        return read_imported(imported)
    return store.scan_parts(lambda paths: job_figures(worker_partials(tuple(paths), store.run_dir.name)[0]))


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
    agg = with_status(agg, status)
    for what in store.set_aside_summary():
        print(f"set aside in {store.quarantine_dir}: {what}")
    if agg.empty:
        print(f"{store.run_dir}: no results yet")
        return
    cols = ["model", "backend", "parameters", "throughput", "response_length", "latency", "energy", "energy_per_token",
            "responses", "validation"]
    if (agg["concurrency"] != 1).any():
        cols.insert(2, "concurrency")
    fmt = {"parameters": "{:.3g}".format, "throughput": "{:.1f}".format, "response_length": "{:.1f}".format,
           "latency": "{:.2f}".format, "energy": "{:.1f}".format, "energy_per_token": "{:.3f}".format}
    for (gpu, task), g in agg.groupby(["gpu", "task"], sort=True):
        table = g.sort_values("energy", na_position="last")[cols]
        print(f"\n== {gpu} / {task}  (energy: J per response, mean; throughput: tokens/s; latency: s)")
        print(table.to_string(index=False, formatters=fmt, na_rep="n/a"))
        notes = g["energy_note"].dropna().unique() if "energy_note" in g else []
        for note in notes:
            print(f"   energy n/a: {note}")
    print_reference_checks(store, agg)
    print_steady_windows(store)
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


def with_status(agg: pd.DataFrame, status: pd.DataFrame) -> pd.DataFrame:
    """Figures with their job's validation status (`status` per model and job key)."""
    keyed = agg.assign(_job=[job_key(t, int(n)) for t, n in zip(agg["task"], agg["concurrency"])])
    status = status.rename(columns={"task": "_job"})
    return keyed.merge(status, on=["model", "_job"], how="left").drop(columns="_job")


def steady_summary(records: list[dict]) -> pd.DataFrame:
    """Per job above concurrency 1 and session: its steady window and energy per token, and
    its rows' sum against the counter over the job."""
    rows = [{"model": r["model"], "task": split_job_key(r["task"])[0], "concurrency": s.get("concurrency"),
             "requests": s.get("requests"), "steady_window_s": s.get("steady_window_s"),
             "steady_energy_per_token_j": s.get("steady_energy_per_token_j"),
             "rows_vs_counter": (s["rows_energy_j"] / s["counter_energy_j"] - 1) if s.get("counter_energy_j") else None}
            for r in records for s in r["sessions"]]
    return pd.DataFrame(rows, columns=["model", "task", "concurrency", "requests", "steady_window_s",
                                       "steady_energy_per_token_j", "rows_vs_counter"])


def print_steady_windows(store: RunStore) -> None:
    summary = steady_summary(store.job_figures())
    if summary.empty:
        return
    fmt = {"steady_window_s": "{:.1f}".format, "steady_energy_per_token_j": "{:.4f}".format,
           "rows_vs_counter": "{:+.2%}".format}
    print("\n== Jobs at concurrency > 1 (steady window: N requests in flight; its energy per token, J; the rows' "
          "token-share energies summed against the counter over the job)")
    print(summary.to_string(index=False, formatters=fmt, na_rep="n/a"))


def reference_summary(refs: pd.DataFrame, agg: pd.DataFrame) -> pd.DataFrame:
    """Per job: its reference checks, what they cost (GPU seconds, and as a share of the
    job's GPU time) and the median deviation of the stored energy from them."""
    if refs.empty:
        return pd.DataFrame(columns=["model", "task", "checks", "cost_s", "cost_share", "median_deviation"])
    agg = agg[agg["concurrency"] == 1]  # checks are of one-at-a-time jobs
    gpu_s = (agg["latency"] * agg["responses"]).groupby([agg["model"], agg["task"]]).sum()
    rows = []
    for (model, task), g in refs.groupby(["model", "task"], sort=True):
        usable = g[g["energy_j"].notna() & g["row_energy_j"].notna() & g["same_tokens"]]
        dev = (usable["row_energy_j"] / usable["energy_j"] - 1.0).abs()
        job_s = gpu_s.get((model, task), np.nan)
        rows.append({"model": model, "task": task, "checks": len(g), "cost_s": g["cost_s"].sum(),
                     "cost_share": g["cost_s"].sum() / job_s if job_s else np.nan,
                     "median_deviation": dev.median() if len(dev) else np.nan})
    return pd.DataFrame(rows)


def print_reference_checks(store: RunStore, agg: pd.DataFrame) -> None:
    from sweep.validate import reference_facts

    summary = reference_summary(reference_facts(store), agg)
    if summary.empty:
        return
    fmt = {"cost_s": "{:.0f}".format, "cost_share": "{:.1%}".format, "median_deviation": "{:.2%}".format}
    print(f"\n== Reference checks (each: one request repeated inside one long window; cost: GPU seconds, and as a "
          f"share of the job's GPU time; deviation: the stored energy against them)")
    print(summary.to_string(index=False, formatters=fmt, na_rep="n/a"))
    total = summary["cost_s"].sum()
    print(f"   {int(summary['checks'].sum())} checks took {total:.0f} s of GPU time")


def write_csvs(store: RunStore, out_dir: str | Path) -> list[Path]:
    """{GPU}_{task}_benchmark.csv with the 2023 columns, one per (gpu, task); a concurrency
    above 1 writes {GPU}_{task}-c{N}_benchmark.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (gpu, task, n), g in run_aggregates(store).groupby(["gpu", "task", "concurrency"], sort=True):
        level = "" if n == 1 else f"-c{n}"  # concurrency 1 is 2023's file; other levels beside it
        path = out / f"{gpu_file_name(gpu)}_{task}{level}_benchmark.csv"
        if path in written:  # two labels that differ only in characters a file name drops
            path = out / f"{gpu_file_name(gpu)}-{hashlib.sha1(gpu.encode()).hexdigest()[:6]}_{task}{level}_benchmark.csv"
        if path.exists() and not path.is_file():
            raise ConfigError(f"command line: --csv: {path} exists and is not a file")
        g.sort_values("energy", na_position="last")[CSV_COLUMNS].to_csv(path, index=False)
        written.append(path)
    return written
