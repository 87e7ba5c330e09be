"""Pure functions from aggregates to what each part of the page shows (no Gradio here)."""

from __future__ import annotations

import keyword

import numpy as np
import pandas as pd

from ui.data import DISPLAY, NUMERIC, pareto_front
from ui.formula import FormulaError, evaluate

CATEGORICAL = ["gpu", "model", "backend", "task", "run_id"]


def filter_aggregates(agg: pd.DataFrame, runs: list[str], gpus: list[str], task: str | None,
                      backends: list[str] | None = None) -> pd.DataFrame:
    df = agg[agg["run_id"].isin(runs) & agg["gpu"].isin(gpus)]
    if backends is not None:  # the Backends filter lists runtimes: a backend at a concurrency (ui.data.runtime)
        df = df[df["runtime"].isin(backends)]
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


DECIMALS = {"energy": 1, "energy_per_token": 3, "energy_above_idle": 1, "throughput": 1, "response_length": 1,
            "latency": 2, "ttft": 3, "responses": 0, "arc": 1, "hellaswag": 1, "truthfulqa": 1,
            "decode_energy_per_token": 3, "prefill_energy": 2, "flagged_share": 0}
PERCENT = {"flagged_share"}  # shares, shown as percent
# What fits a ~1,200 px page; the others are a tick away (Columns).
DEFAULT_COLUMNS = ["model", "gpu", "backend", "concurrency", "run_id", "parameters", "energy", "energy_ci", "energy_per_token",
                   "response_length", "latency", "throughput", "flagged_share", "validation"]
# Shown only where it tells rows apart: more than one run in view.
ONLY_WHEN_SEVERAL = {"run_id", "concurrency"}
# Shown even when empty, so that a run without energy says so instead of losing the column.
ALWAYS = {"model", "energy"}
COLUMN_HELP = {
    "run_id": "the run (one folder under runs/) the figures come from",
    "gpu": "GPU the model ran on (CPU: no GPU, so no energy counter)",
    "model": "model name, linked to its hub page when it is a hub id",
    "backend": "generation runtime: transformers (HF generate, as in 2023), compiled (CUDA-graph decode loop), "
               "fastchat (2023 published results)",
    "task": "task (its system prompt is in the About tab)",
    "concurrency": "requests in flight at once (1: one at a time, as in 2023; more: through a serving engine, "
                   "energy by each request's share of the tokens produced)",
    "parameters": "parameters: M millions, B billions",
    "energy": "mean GPU energy per response, J: the worker's own GPUs' energy counter, each response's own "
              "window where it lasts 5 s or more, attributed from the counter over the job otherwise (About)",
    "energy_ci": "95% confidence interval of the mean energy (Student t), J",
    "energy_per_token": "total energy over total generated tokens, J/token",
    "decode_energy_per_token": "decode-phase energy (first token to end, from the counter's fitted phase powers) "
                               "over the tokens after the first, J/token: the figure to compare runtimes by",
    "prefill_energy": "mean energy from the request's start to its first token (fitted phase powers), J",
    "flagged_share": "% of measured responses whose energy carries a quality flag (a window under 1 s where the "
                     "energy is that window's reading, a counter reset or still, power outside idle..limit)",
    "validation": "`python -m sweep validate` for this model and task: ok, or the worst failure (warning, "
                  "error) and the checks that failed",
    "energy_above_idle": "mean energy per response minus the GPU's idle power x the request's time, J",
    "response_length": "mean generated tokens per response",
    "latency": "mean wall time per response, prefill included, s",
    "ttft": "mean time to first token, s",
    "throughput": "mean generated tokens per second of a response",
    "responses": "responses measured",
    "arc": "ARC score from the 2023 leaderboard (imported runs)",
    "hellaswag": "HellaSwag score from the 2023 leaderboard (imported runs)",
    "truthfulqa": "TruthfulQA score from the 2023 leaderboard (imported runs)",
    "energy_note": "why energy is empty",
}
# Sort order per figure: less is better, except these.
HIGHER_IS_BETTER = {"throughput", "responses", "arc", "hellaswag", "truthfulqa"}


def column_choices() -> list[tuple[str, str]]:
    """(header, column) of every column the table can show, for a Columns picker."""
    return [(header, col) for col, header in DISPLAY.items()]


def column_legend() -> str:
    return "\n".join(f"- **{DISPLAY[c]}**: {COLUMN_HELP[c]}" for c in DISPLAY)


def format_params(b: float) -> str:
    """Parameters in billions -> '0.4M', '410M', '1.3M', '6.7B', '13B' ('' when unknown)."""
    if b is None or pd.isna(b) or b <= 0:
        return ""
    v, unit = (b, "B") if b >= 1 else (b * 1e3, "M")
    text = f"{v:.0f}" if v >= 100 else f"{v:.2g}" if v >= 1 else f"{v:.1f}"
    return text + unit


def sort_table(df: pd.DataFrame, by: str | None) -> tuple[pd.DataFrame, str]:
    """Rows in ranking order, and the table's label saying what that order is. Ranked by
    energy; by latency when nothing in view has energy (a CPU run)."""
    if df.empty:
        return df, "Leaderboard"
    if not by or by not in df or df[by].isna().all():
        by = "energy" if df["energy"].notna().any() else "latency"
    higher = by in HIGHER_IS_BETTER
    out = df.sort_values(by, ascending=not higher, na_position="last", kind="stable").reset_index(drop=True)
    # The rank is a column, so the label stays true when a header's menu re-sorts the rows.
    out.insert(0, "rank", out[by].rank(method="min", ascending=not higher).astype("Int64"))
    label = (f"Ranked by {DISPLAY.get(by, by)}, {'highest' if higher else 'lowest'} first; # keeps the rank when "
             f"a header re-sorts the rows")
    return out, label


def energy_notice(df: pd.DataFrame) -> str:
    """Markdown: why energy is empty for rows in view, and what measures it."""
    if df.empty or "energy" not in df:
        return ""
    missing = df[df["energy"].isna()]
    if missing.empty:
        return ""
    notes = missing["energy_note"].dropna().unique().tolist() if "energy_note" in missing else []
    why = "; ".join(f"`{n}`" for n in notes) or "no energy reading was stored"
    runs = ", ".join(sorted(missing["run_id"].unique()))
    scope = "No row in view has energy" if len(missing) == len(df) else f"{len(missing)} of {len(df)} rows have no energy"
    return (f"⚠️ **{scope}** (run {runs}): {why}. Energy comes from an NVIDIA GPU's energy counter: run the sweep "
            f"on a GPU node (e.g. `python -m sweep --config models-gpu.yaml`). Latency, length and throughput "
            f"are measured either way.")


def empty_note(agg: pd.DataFrame, runs, gpus, task, backends) -> str:
    """Markdown: why a view with filters holds no row (which choice leaves nothing)."""
    if agg.empty:
        return ""
    runs, gpus, backends = runs or [], gpus or [], backends or []
    if not runs:
        return "_No run is ticked: tick one above._"
    if not gpus:
        return "_No GPU is ticked: tick one above._"
    in_runs = agg[agg["run_id"].isin(runs)]
    for gpu in gpus:
        if gpu not in set(in_runs["gpu"]):
            held = sorted(agg.loc[agg["gpu"] == gpu, "run_id"].unique())
            return (f"_{gpu} is in no ticked run" + (f" (it is in {', '.join(held)})" if held else "") + "._")
    view = in_runs[in_runs["gpu"].isin(gpus)]
    if backends and not view["runtime"].isin(backends).any():
        return f"_No ticked backend ran on {', '.join(gpus)} in the ticked runs._"
    tasks = sorted(view["task"].unique())
    return f"_No {task} rows here: the ticked runs have {', '.join(tasks) or 'no task'} on {', '.join(gpus)}._"


def display_table(df: pd.DataFrame, custom: list[tuple[str, str]], columns: list[str] | None = None) -> pd.DataFrame:
    """The leaderboard as shown: linked model names, rounded figures, short headers.
    Only the chosen columns (default: DEFAULT_COLUMNS); a chosen column with nothing
    to show in this view (e.g. scores of new runs) is left out, except ALWAYS."""
    chosen = set(columns if columns is not None else DEFAULT_COLUMNS) | {"model"}
    show = pd.DataFrame(index=df.index)
    if "rank" in df:  # whole numbers; a row without the ranked figure gets none
        rank = df["rank"]
        show["#"] = rank.astype("int64") if rank.notna().all() else [None if pd.isna(r) else int(r) for r in rank]
    for col, header in DISPLAY.items():
        if col not in chosen:
            continue
        if col == "model":
            urls = df["url"] if "url" in df else [None] * len(df)
            show[header] = [f"[{m}]({u})" if isinstance(u, str) and u else m for m, u in zip(df["model"], urls)]
        elif col == "energy_ci":
            if df["energy_ci_low"].notna().any():
                show[header] = [f"{lo:.1f} – {hi:.1f}" if pd.notna(lo) else ""
                                for lo, hi in zip(df["energy_ci_low"], df["energy_ci_high"])]
        elif col == "parameters":
            show[header] = [format_params(b) for b in df["parameters"]]
        elif col == "validation":
            if col in df and df[col].notna().any():
                detail = df["validation_detail"] if "validation_detail" in df else [None] * len(df)
                show[header] = [v if v in ("ok", None) or pd.isna(v) or not isinstance(d, str) else
                                f"{v}: {d if len(d) <= 90 else d[:89] + '…'}" for v, d in zip(df[col], detail)]
        elif col in ONLY_WHEN_SEVERAL:
            if col in df and df[col].nunique() > 1:
                show[header] = df[col]
        elif col in DECIMALS:
            if col in df and (df[col].notna().any() or col in ALWAYS):
                scale = 100.0 if col in PERCENT else 1.0
                show[header] = (df[col].astype(float) * scale).round(DECIMALS[col])
        elif col in df and (df[col].notna().any() or col in ALWAYS):
            show[header] = df[col]
    for name, _ in custom:
        # four significant digits, whatever the scale (a measured figure has no more)
        show[name] = [float(f"{v:.4g}") if pd.notna(v) else None for v in df[name]]
    return show.reset_index(drop=True)


def datatypes(table: pd.DataFrame) -> list[str]:
    return ["markdown" if c == DISPLAY["model"] else "number" if pd.api.types.is_numeric_dtype(table[c]) else "str"
            for c in table.columns]


def best_under_limits(df: pd.DataFrame, max_latency: float | None, max_ms_per_token: float | None,
                      max_energy: float | None) -> tuple[pd.DataFrame, list[str]]:
    """Per model, the row (GPU, backend, run) with the least energy among those within
    every limit given (None: no limit); rows without energy only when no row has any
    (then least latency). Also the models with no row within the limits."""
    df = df.assign(ms_per_token=1000 * df["latency"] / df["response_length"])
    ok = pd.Series(True, index=df.index)
    if max_latency is not None:
        ok &= df["latency"] <= max_latency
    if max_ms_per_token is not None:
        ok &= df["ms_per_token"] <= max_ms_per_token
    has_energy = df["energy"].notna().any()
    if max_energy is not None and has_energy:
        ok &= df["energy"] <= max_energy
    by = "energy" if has_energy else "latency"
    within = df[ok].sort_values([by, "latency"], na_position="last", kind="stable")
    best = within.groupby("model", sort=False).head(1).reset_index(drop=True)
    missed = sorted(set(df["model"]) - set(best["model"]))
    return best, missed
def time_energy_frame(df: pd.DataFrame) -> pd.DataFrame:
    out = df[["model", "gpu", "backend", "task", "run_id", "latency", "energy"]].dropna(
        subset=["latency", "energy"]).copy()
    # One front per model, across its configurations (GPUs, backends, runs): the trade-off a
    # user chooses from for that model; at batch 1 a front across models is mostly one point.
    on = pd.Series(False, index=out.index)
    for _, g in out.groupby("model"):
        on[g.index] = pareto_front(g["latency"], g["energy"])
    out["front"] = on
    return out


def missing_note(df: pd.DataFrame, needs: list[str], what: str) -> str:
    """Markdown for an empty chart: which of the figures it needs are missing in view."""
    if df.empty:
        return f"_{what}: nothing in view (pick runs, a GPU and a task above)._"
    lacking = [c for c in needs if c not in df or df[c].isna().all()]
    if not lacking:
        return f"_{what}: no row in view has all of {', '.join(needs)}._"
    energy = any(c.startswith("energy") for c in lacking)
    hint = " (energy is measured on an NVIDIA GPU: a GPU run, see the note above the table)" if energy else ""
    return f"_{what} needs {', '.join(lacking)}, which no row in view has{hint}._"


def limit_maxima(df: pd.DataFrame, per_token: bool) -> tuple[float, float | None]:
    """The ranges of the Under-limits sliders: (deadline, energy budget; None without
    energy), a little above the largest value in view. Always finite: a model whose
    responses are all empty has no time per token, and a non-finite figure is none."""
    t = (1000 * df["latency"] / df["response_length"]) if per_token else df["latency"]
    t = t.astype(float)
    t = t.where(np.isfinite(t))
    energy = df["energy"].astype(float)
    energy = energy.where(np.isfinite(energy))
    dmax = round(float(t.max()) * 1.05, 3) if t.notna().any() else 1.05
    bmax = round(float(energy.max()) * 1.05, 1) if energy.notna().any() else None
    return dmax, bmax


def set_aside_note(set_aside: dict[str, list[str]]) -> str:
    """Markdown: runs with damaged files set aside, and what that means for each."""
    return "".join(f"\n\n⚠️ **{run}**: set aside in `{run}/.quarantine/`: {'; '.join(what)}"
                   for run, what in sorted(set_aside.items()))


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


ABOUT = """## What is measured, and how

Every response is one request served alone (**batch size 1**), in FP16 on a GPU, through the
model's own chat template (FastChat's; the tokenizer's `chat_template` where FastChat has none),
with one shared **system prompt per task** (below, as the run's `tasks.yaml` held it),
temperature 0.7, repetition penalty 1.0, top-p 1.0, prompts from ShareGPT (or the 72 built-in ones),
as the 2023 ML.ENERGY Leaderboard did.

- **Energy** is the GPU's own energy counter (NVML, read through Zeus `ZeusMonitor` inside the worker that
  owns the GPU), read at the start and end of each request's window: prefill and every decode step are
  inside it, turning tokens into text is not. Each worker measures only its GPU(s), so models that run at
  once on one machine do not mix.
- **Idle power**: before its job each worker measures its GPUs at rest; *above idle* is the response's
  energy minus idle power times its duration: what generating added to a GPU that would be on anyway.
- **Latency** is the request's wall time with the device synchronised; **TTFT** the time to the first
  generated token; **throughput** tokens per second of a response; **length** generated tokens up to the
  stop token.
- Figures per (run, GPU, model, backend, task) are means per response, with a Student-t 95% interval of
  the mean energy; energy per token is total energy over total tokens.

## Limitations

- The counter moves about every 100 ms: one short response is coarse, means over many are not biased. A
  window that reads 0 J is stored as empty, with the reason.
- No GPU energy counter (a CPU run, `make run` on a laptop): energy is empty, with the reason in
  `energy_note`; never 0, never an estimate.
- Batch size 1 shows a model's cost to one user, not a server's cost per request under load.
- Random-weight models (`random:` presets) answer with noise: their lengths say nothing about the real
  model's verbosity; their time and energy per token do.
- Runs imported from the 2023 leaderboard hold its published means only (no distributions, no
  confidence intervals, no idle power).

## How to cite

Cite the run (its id and `manifest.json` below pin the settings, versions and GPUs) and the measurement
method it reproduces: the ML.ENERGY Leaderboard (https://ml.energy/leaderboard) and Zeus: Jie You,
Jae-Won Chung, Mosharaf Chowdhury, *Zeus: Understanding and Optimizing GPU Energy Consumption of DNN
Training*, NSDI 2023.
"""


def about_runs(manifests: dict[str, dict]) -> str:
    """Markdown: per run, what its manifest says (tasks and their prompts, settings, GPUs,
    versions, sessions)."""
    if not manifests:
        return "## Runs\n\nNo runs yet."
    out = ["## Runs"]
    prompts_seen: dict[str, str] = {}
    for run_id, m in sorted(manifests.items()):
        lines = [f"### {run_id}"]
        if m.get("kind") == "aggregate-only":
            lines.append(f"{m.get('source', 'imported aggregates')}; imported {m.get('imported_at', '?')}; "
                         f"GPUs {', '.join(map(str, m.get('gpus', [])))}.")
            out.append("\n\n".join(lines))
            continue
        tasks = m.get("tasks") or {}
        gen = tasks.get("generation") or {}
        gpus = sorted({f"{g.get('gpu_name')} ({g.get('host')})" for g in m.get("gpus") or []})
        versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
        sessions = m.get("sessions") or []
        pr = m.get("prompts") or {}
        models = [f"{x.get('name', '?')} ({x.get('path')}, {x.get('backend', 'transformers')})"
                  for x in m.get("models") or []]
        lines.append(f"- models: {', '.join(models)}")
        lines.append(f"- generation: {', '.join(f'{k} {v}' for k, v in gen.items())}")
        lines.append(f"- prompts: {pr.get('count', '?')} from {pr.get('source', '?')}")
        lines.append(f"- GPUs: {', '.join(gpus) or '?'}; host {m.get('host', '?')}")
        lines.append(f"- versions: {versions}")
        lines.append(f"- sessions: {len(sessions)}, started {m.get('started_at', '?')}"
                     + (f", last finished {sessions[-1]['finished_at']}" if sessions and "finished_at" in sessions[-1]
                        else ", still running or stopped" if sessions else ""))
        out.append("\n".join(lines))
        for t in tasks.get("tasks") or []:
            prompts_seen.setdefault(t.get("name"), t.get("system_prompt", ""))
    if prompts_seen:
        out.insert(0, "## Task prompts\n\n" + "\n\n".join(f"**{n}**: {p}" for n, p in sorted(prompts_seen.items())))
    return "\n\n".join(out)


TIMELINE_REQUESTS = 20  # the model detail plots the power of a job's first requests


def timeline_frames(rows: pd.DataFrame, samples: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(power samples, requests) of the model detail's timeline, times in seconds since
    the first request shown. `rows`: the requests shown (started_at, latency_s, ttft_s,
    prefill/decode energy); `samples`: host, gpu_index, timestamp, power_w."""
    t0 = rows["started_at"].min()
    start = (rows["started_at"] - t0).dt.total_seconds()
    requests = pd.DataFrame({"prompt_id": rows["prompt_id"], "start_s": start, "end_s": start + rows["latency_s"],
                             "first_token_s": start + rows["ttft_s"].fillna(0.0),
                             "prefill_j": rows["prefill_energy_j"], "decode_j": rows["decode_energy_j"]})
    one_host = samples["host"].nunique() <= 1
    gpu = [f"GPU {i}" if one_host else f"{h} GPU {i}" for h, i in zip(samples["host"], samples["gpu_index"])]
    points = pd.DataFrame({"t_s": (samples["timestamp"] - t0).dt.total_seconds(), "gpu": gpu,
                           "power_w": samples["power_w"]})
    return points, requests


def timeline_note(rows: pd.DataFrame, shown: int, plotted: bool, sample_s: float | None = None) -> str:
    """Markdown under the power timeline. `sample_s`: the median time between the stored power
    samples, what the line resolves (stated from the data, not from the poll period)."""
    split = rows.dropna(subset=["prefill_energy_j", "decode_energy_j"])
    decode_tokens = (split["response_tokens"] - 1).clip(lower=0).sum()
    how = split["energy_split_method"].dropna().iloc[0] if "energy_split_method" in split and len(split) else ""
    figures = (f" Mean prefill {split['prefill_energy_j'].mean():.2f} J and decode {split['decode_energy_j'].mean():.1f} J "
               f"per response; decode {split['decode_energy_j'].sum() / decode_tokens:.3f} J/token (all {len(split)} "
               f"responses; {'an estimate from the power line below, finer than it resolves' if how.startswith('power') else how})."
               if len(split) and decode_tokens else "")
    if not plotted:
        return ("_No power timeline: it is recorded on NVIDIA GPUs (Zeus `PowerMonitor`); CPU runs and runs made "
                f"before it existed have none._{figures}")
    every = f"every {sample_s * 1e3:.0f} ms (median)" if sample_s else "when NVML's reading changes"
    return (f"Power of the first {shown} requests of {len(rows)}, as NVML reports it: a sample {every}, so detail "
            f"finer than that is not measured: shaded, a request's energy window; dashed, its first token (prefill "
            f"before, decode after).{figures}")


def concurrency_frame(agg: pd.DataFrame, shown: pd.DataFrame) -> pd.DataFrame:
    """Every concurrency level of the configurations (run, GPU, model, backend, task) in view,
    whichever levels the filter ticks, with their time per output token (s)."""
    keys = ["run_id", "gpu", "model", "backend", "task"]
    if shown.empty or "concurrency" not in agg:
        return pd.DataFrame(columns=keys + ["concurrency", "time_per_token", "energy_per_token"])
    out = agg.merge(shown[keys].drop_duplicates(), on=keys)
    return out.assign(time_per_token=out["latency"].astype(float) / out["response_length"].astype(float))
