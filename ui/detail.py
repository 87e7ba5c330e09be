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


SAMPLE_HEADERS = {"prompt_id": "prompt id", "prompt": "prompt", "response": "response",
                  "response_tokens": "length (tok)", "energy_j": "energy (J)", "energy_method": "how",
                  "energy_uncertainty_j": "± (J, 1σ)", "window_energy_j": "one window (J)", "latency_s": "latency (s)"}


def nothing(summary: str) -> tuple:
    """The view with only its summary line (one value per component of `detail_out`)."""
    return summary, None, "", None, None, None, "", ""


def reference_note(refs: pd.DataFrame) -> str:
    """Markdown: the job's reference checks against the rows they check."""
    if refs.empty:
        return ("_No reference checks for this job: they run on GPUs with an energy counter (tasks.yaml `energy`), "
                "and runs made before they existed have none._")
    lines = ["**Reference checks** — each: the same request, the same seed, repeated inside one long window; the "
             "stored energy against it.", "", "| prompt id | repeats | window (s) | reference (J) | stored (J) | how | "
             "deviation |", "|--|--|--|--|--|--|--|"]
    for r in refs.itertuples():
        dev = (f"{r.row_energy_j / r.energy_j - 1:+.1%}" if pd.notna(r.energy_j) and pd.notna(r.row_energy_j)
               and r.same_tokens else f"n/a ({r.why_unusable})")
        ref = f"{r.energy_j:.2f}" if pd.notna(r.energy_j) else "n/a"
        row = f"{r.row_energy_j:.2f}" if pd.notna(r.row_energy_j) else "n/a"
        lines.append(f"| {r.prompt_id} | {r.repeats} | {r.window_s:.1f} | {ref} | {row} | {r.row_method} | {dev} |")
    lines.append(f"\nThey took {refs['cost_s'].sum():.0f} s of GPU time.")
    return "\n".join(lines)


def _methods(sub: pd.DataFrame) -> str:
    """How the energies were obtained, e.g. '; energy: 118 attributed, 2 window'."""
    counts = sub.loc[sub["energy_j"].notna(), "energy_method"].fillna("window").value_counts()
    return "; energy: " + ", ".join(f"{n} {m}" for m, n in counts.items()) if len(counts) else ""


def model_detail(folder: RunsFolder, run_id: str | None, model: str | None, task: str | None) -> tuple:
    """Summary, energy and length distributions, sample responses (with how each energy
    was obtained) of one (run, model, task), the power timeline of its first requests, and
    its reference checks: one value per component of `detail_out`, in that order."""
    sub = folder.rows(run_id, model, task) if run_id and model and task else None
    if sub is None:
        return nothing("Pick a run with per-request rows, a model and a task.")
    if sub.empty:
        return nothing(f"No responses of {model} on {task} in {run_id}.")
    prompts = folder.prompts(run_id)
    samples = sub.merge(prompts, on="prompt_id", how="left").sort_values("prompt_id").head(20)
    samples = samples[list(SAMPLE_HEADERS)].round({"energy_j": 2, "energy_uncertainty_j": 2, "window_energy_j": 2,
                                                   "latency_s": 3})
    samples = samples.assign(energy_method=samples["energy_method"].fillna("window")).rename(columns=SAMPLE_HEADERS)
    e = sub["energy_j"]
    note = sub["energy_note"].dropna().iloc[0] if sub["energy_note"].notna().any() else "n/a"
    summary = (f"**{model} / {task}** in {run_id} on {sub['gpu_name'].iloc[0]}: {len(sub)} responses; "
               + (f"energy {e.mean():.1f} J (median {e.median():.1f}, p90 {e.quantile(0.9):.1f}); "
                  if e.notna().any() else f"energy not measured ({note}); ")
               + f"length {sub['response_tokens'].mean():.1f} tokens; template `{sub['template'].iloc[0]}`"
               + _methods(sub))
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
            views.timeline_note(sub, len(first), line is not None),
            reference_note(folder.references(run_id, model, task)))
