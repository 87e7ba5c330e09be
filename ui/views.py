"""Pure functions from aggregates to what each part of the page shows (no Gradio here)."""

from __future__ import annotations

import keyword

import numpy as np
import pandas as pd

from ui.data import DISPLAY, NUMERIC, pareto_front
from ui.formula import FormulaError, evaluate

CATEGORICAL = ["model", "backend", "task", "gpu", "run_id"]


def filter_aggregates(agg: pd.DataFrame, runs: list[str], gpus: list[str], task: str | None,
                      backends: list[str] | None = None) -> pd.DataFrame:
    df = agg[agg["run_id"].isin(runs) & agg["gpu"].isin(gpus)]
    if backends is not None:
        df = df[df["backend"].isin(backends)]
    if task:
        df = df[df["task"] == task]
    return df.sort_values("energy", na_position="last").reset_index(drop=True)


def with_custom_columns(df: pd.DataFrame, custom: list[tuple[str, str]]) -> pd.DataFrame:
    """Adds each (name, formula) column; formulas were checked when they were added."""
    out = df.copy()
    for name, formula in custom:
        out[name] = evaluate(formula, out) if not out.empty else pd.Series(dtype=float)
    return out


def check_column_name(name: str, df: pd.DataFrame) -> None:
    """A new custom column's name must be a plain identifier (so a later formula can use
    it) and no column the table already has, under its name or its shown header: a
    custom `energy` would replace the measured one in the table, the CSV and the plots."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise FormulaError(f"{name[:60]!r} is not a plain name: use letters, digits and _, not starting with a "
                           f"digit (e.g. J_per_100_tok)")
    taken = set(df.columns) | set(DISPLAY) | set(DISPLAY.values()) | set(NUMERIC) | set(CATEGORICAL)
    if name in taken:
        raise FormulaError(f"{name!r} is already a column: pick another name")


def numeric_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c in NUMERIC or (pd.api.types.is_float_dtype(df[c]) and c not in ("url",))]


DECIMALS = {"parameters": 2, "energy": 1, "energy_per_token": 3, "throughput": 1, "response_length": 1,
            "latency": 2, "responses": 0, "arc": 1, "hellaswag": 1, "truthfulqa": 1}


def display_table(df: pd.DataFrame, custom: list[tuple[str, str]]) -> pd.DataFrame:
    """The leaderboard as shown: linked model names, rounded figures, units in headers.
    Columns with nothing to show in this view (e.g. scores of new runs) are left out."""
    show = pd.DataFrame(index=df.index)
    for col, header in DISPLAY.items():
        if col == "model":
            show[header] = [f"[{m}]({u})" if isinstance(u, str) and u else m for m, u in zip(df["model"], df["url"])]
        elif col == "energy_ci":
            if df["energy_ci_low"].notna().any():
                show[header] = [f"{lo:.1f} – {hi:.1f}" if pd.notna(lo) else ""
                                for lo, hi in zip(df["energy_ci_low"], df["energy_ci_high"])]
        elif col in DECIMALS:
            if col in df and df[col].notna().any():
                show[header] = df[col].astype(float).round(DECIMALS[col])
        else:
            show[header] = df[col]
    for name, _ in custom:
        show[name] = df[name].round(4)
    return show.reset_index(drop=True)


def datatypes(table: pd.DataFrame) -> list[str]:
    return ["markdown" if c == DISPLAY["model"] else "number" if pd.api.types.is_numeric_dtype(table[c]) else "str"
            for c in table.columns]


def scatter_frame(df: pd.DataFrame, x: str, y: str, color: str | None) -> pd.DataFrame:
    cols = list(dict.fromkeys(["model", "gpu", "task", "run_id", x, y] + ([color] if color else [])))
    return df[cols].dropna(subset=[x, y])


def time_energy_frame(df: pd.DataFrame) -> pd.DataFrame:
    out = df[["model", "gpu", "task", "run_id", "latency", "energy"]].dropna(subset=["latency", "energy"]).copy()
    # One front per GPU: latency and energy of different GPUs are not interchangeable.
    on = pd.Series(False, index=out.index)
    for _, g in out.groupby("gpu"):
        on[g.index] = pareto_front(g["latency"], g["energy"])
    out["front"] = np.where(on, "Pareto front of " + out["gpu"], "dominated")
    return out


def histogram(values: pd.Series, bins: int = 20, unit: str = "") -> pd.DataFrame:
    v = values.dropna().to_numpy(float)
    if len(v) == 0:
        return pd.DataFrame({"bin": [], "responses": []})
    counts, edges = np.histogram(v, bins=min(bins, max(1, len(np.unique(v)))))
    labels = [f"{lo:.4g}–{hi:.4g}{unit}" for lo, hi in zip(edges[:-1], edges[1:])]
    return pd.DataFrame({"bin": pd.Categorical(labels, categories=labels, ordered=True), "responses": counts})


def set_aside_note(counts: dict[str, int]) -> str:
    """Markdown: runs with damaged files set aside (their rows are not shown)."""
    return "".join(f"\n\n⚠️ **{run}**: {n} damaged file(s) set aside in `{run}/.quarantine/`; their rows are "
                   f"not shown (a resume of the run measures them again)" for run, n in sorted(counts.items()))


def live_status(agg: pd.DataFrame, manifests: dict[str, dict]) -> str:
    """Markdown: per run still being written, responses so far per (model, task)."""
    lines = []
    for run_id, manifest in manifests.items():
        sessions = manifest.get("sessions") or []
        if not sessions or "finished_at" in sessions[-1]:
            continue
        planned = (manifest.get("prompts") or {}).get("count")
        sub = agg[agg["run_id"] == run_id]
        counts = ", ".join(f"{r.model} / {r.task}: {int(r.responses)}" + (f"/{planned}" if planned else "")
                           for r in sub.itertuples())
        lines.append(f"**{run_id}** is running — {counts or 'no responses yet'}")
    return "\n\n".join(lines) if lines else "No sweep is writing right now."
