"""From per-request rows to the leaderboard: per (run, gpu, model, task) aggregates.

One model can run under several backends in one run: `backend` is part of the key.
Metric names follow the 2023 ML.ENERGY leaderboard (means per response):
`energy` (J), `throughput` (tokens/s), `response_length` (tokens), `latency` (s),
`parameters` (billions). Beyond it: `energy_per_token` (J/token, total energy over total
tokens), a 95% confidence interval of the mean energy (Student t), `ttft` (s) and the
number of responses behind each figure.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from sweep.store import RunStore

KEYS = ["run_id", "gpu", "model", "backend", "task"]
CSV_COLUMNS = ["model", "throughput", "response_length", "latency", "energy"]
AGGREGATES_FILE = "aggregates.parquet"  # aggregate-only runs (imported results) keep this instead of results/


def gpu_short_name(gpu_name: str) -> str:
    """'NVIDIA H200' -> 'H200', 'NVIDIA A100-SXM4-80GB' -> 'A100-SXM4-80GB'."""
    name = re.sub(r"^NVIDIA\s+", "", str(gpu_name)).split(" ")[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "GPU"


def _ci95(values: pd.Series) -> tuple[float, float]:
    v = values.dropna().to_numpy(dtype=float)
    n = len(v)
    if n < 2:
        return (np.nan, np.nan)
    half = stats.t.ppf(0.975, n - 1) * v.std(ddof=1) / np.sqrt(n)
    return (v.mean() - half, v.mean() + half)


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-request rows (the results dataset) -> one row per (run_id, gpu, model, backend, task)."""
    if rows.empty:
        return pd.DataFrame(columns=KEYS + ["parameters", "responses", "energy", "energy_per_token"])
    df = rows.copy()
    df["gpu"] = df["gpu_name"].map(gpu_short_name)
    out = []
    for key, g in df.groupby(KEYS, sort=True, observed=True):
        measured = g[g["energy_j"].notna()]
        lo, hi = _ci95(measured["energy_j"])
        tokens = measured["response_tokens"].sum()
        out.append(
            dict(
                zip(KEYS, key),
                model_path=g["model_path"].iloc[0],
                parameters=g["params_b"].iloc[0],
                responses=len(g),
                measured=len(measured),
                energy=measured["energy_j"].mean() if len(measured) else np.nan,
                energy_ci_low=lo,
                energy_ci_high=hi,
                energy_per_token=measured["energy_j"].sum() / tokens if tokens else np.nan,
                energy_above_idle=measured["energy_above_idle_j"].mean() if len(measured) else np.nan,
                throughput=g["throughput_tok_s"].mean(),
                response_length=g["response_tokens"].mean(),
                latency=g["latency_s"].mean(),
                ttft=g["ttft_s"].mean(),
                energy_note=None if len(measured) else next(iter(g["energy_note"].dropna()), None),
            )
        )
    return pd.DataFrame(out)


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
    return aggregate(store.read_results())


def print_leaderboard(store: RunStore) -> None:
    agg = run_aggregates(store)
    set_aside = store.set_aside_files()
    if set_aside:
        print(f"{len(set_aside)} damaged file(s) set aside in {store.quarantine_dir}: their rows are not "
              f"counted here (a resume of the run measures them again)")
    if agg.empty:
        print(f"{store.run_dir}: no results yet")
        return
    cols = ["model", "backend", "parameters", "throughput", "response_length", "latency", "energy", "energy_per_token", "responses"]
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
