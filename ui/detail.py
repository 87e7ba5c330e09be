"""The model detail view: one (run, model, task)'s distributions, sample responses and
power timeline, from the runs folder."""

from __future__ import annotations

import pandas as pd
from gradio.components.plot import PlotData

from ui import charts, views
from ui.data import RunsFolder


def plot_data(spec: dict | None):
    """A Vega-Lite spec as gr.Plot's value (None: nothing drawn)."""
    return None if spec is None else PlotData(type="altair", plot=charts.to_json(spec))


def model_detail(folder: RunsFolder, run_id: str | None, model: str | None, task: str | None) -> tuple:
    """Summary, energy and length distributions, and sample responses of one
    (run, model, task), and the power timeline of its first requests: one value per
    component of `detail_out`, in that order."""
    sub = folder.rows(run_id, model, task) if run_id and model and task else None
    if sub is None:
        return "Pick a run with per-request rows, a model and a task.", None, "", None, None, None, ""
    if sub.empty:
        return f"No responses of {model} on {task} in {run_id}.", None, "", None, None, None, ""
    prompts = folder.prompts(run_id)
    samples = sub.merge(prompts, on="prompt_id", how="left").sort_values("prompt_id").head(20)
    samples = samples[["prompt_id", "prompt", "response", "response_tokens", "energy_j", "latency_s"]].round(
        {"energy_j": 1, "latency_s": 3})
    e = sub["energy_j"]
    note = sub["energy_note"].dropna().iloc[0] if sub["energy_note"].notna().any() else "n/a"
    summary = (f"**{model} / {task}** in {run_id} on {sub['gpu_name'].iloc[0]}: {len(sub)} responses; "
               + (f"energy {e.mean():.1f} J (median {e.median():.1f}, p90 {e.quantile(0.9):.1f}); "
                  if e.notna().any() else f"energy not measured ({note}); ")
               + f"length {sub['response_tokens'].mean():.1f} tokens; template `{sub['template'].iloc[0]}`")
    rows = sub.assign(model=model)
    half = charts.WIDTH // 2 - 40  # two side by side
    energy = charts.distributions(rows, "energy_j", "model", "energy per response (J)", width=half)
    length = charts.distributions(rows.assign(tokens=rows["response_tokens"].astype(float)), "tokens", "model",
                                  "response length (tokens)", width=half)
    energy_note = "" if energy is not None else (
        f"_No energy histogram: {note}. Energy needs a run on an NVIDIA GPU._")
    # Rows without a start time (recovered from a log that lacked it) have no place on a timeline.
    first = sub.dropna(subset=["started_at"]).sort_values("started_at").head(views.TIMELINE_REQUESTS)
    line = None
    if not first.empty:
        end = (first["started_at"] + pd.to_timedelta(first["latency_s"], unit="s")).max()
        power = folder.power(run_id, model, task, first["started_at"].min() - pd.Timedelta(seconds=0.5),
                             end + pd.Timedelta(seconds=0.5))
        line = charts.timeline(*views.timeline_frames(first, power)) if not power.empty else None
    return (summary, plot_data(energy), energy_note, plot_data(length), samples, plot_data(line),
            views.timeline_note(sub, len(first), line is not None))
