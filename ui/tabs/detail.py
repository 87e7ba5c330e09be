"""The model detail tab: one (run, model, task)'s distributions, sample responses (with how
each energy was obtained), power timeline and reference checks."""

from __future__ import annotations

import re
from dataclasses import dataclass

import gradio as gr
import pandas as pd
from gradio.components.plot import PlotData

from ui import charts, views
from ui.data import RunsFolder


def plot_data(spec: dict | None):
    """A Vega-Lite spec as gr.Plot's value (None: nothing drawn)."""
    return None if spec is None else PlotData(type="altair", plot=charts.to_json(spec))


# Figures first; the texts last, cut to a line (a click on a cell shows it whole).
SAMPLE_HEADERS = {"prompt_id": "prompt id", "energy_j": "energy (J)", "energy_method": "how",
                  "energy_uncertainty_j": "± (J, 1σ)", "window_energy_j": "one window (J)", "latency_s": "latency (s)",
                  "window_s": "window (s)", "response_tokens": "length (tok)", "prompt": "prompt",
                  "response": "response"}


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


def _coarse_warning(sub: pd.DataFrame) -> str:
    """A warning where energies are one-window readings of windows the counter does not resolve."""
    window = sub["energy_method"].fillna("window") == "window"
    short = sub["energy_j"].notna() & window & (sub["window_s"] < 1.0)
    if not short.any():
        return ""
    return (f"\n\n⚠️ {int(short.sum())} of {len(sub)} energies are one-window readings of windows under 1 s: NVML's "
            f"counter moves about every 100 ms and lags, so each is coarse (tens of percent), though their mean over "
            f"many is not biased much. Runs made now attribute such requests from the counter over the job.")


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
                                                   "latency_s": 3, "window_s": 3})
    method = samples["energy_method"].fillna("window")  # runs from before attribution: windows
    one = samples["window_energy_j"].where(samples["window_energy_j"].notna() | (method != "window"), samples["energy_j"])
    samples = samples.assign(energy_method=method, window_energy_j=one).rename(columns=SAMPLE_HEADERS)
    e = sub["energy_j"]
    note = sub["energy_note"].dropna().iloc[0] if sub["energy_note"].notna().any() else "n/a"
    summary = (f"**{model} / {task}** in {run_id} on {sub['gpu_name'].iloc[0]}: {len(sub)} responses; "
               + (f"energy {e.mean():.1f} J (median {e.median():.1f}, p90 {e.quantile(0.9):.1f}); "
                  if e.notna().any() else f"energy not measured ({note}); ")
               + f"length {sub['response_tokens'].mean():.1f} tokens; template `{sub['template'].iloc[0]}`"
               + _methods(sub))
    rows = sub.assign(model=model)
    energy = charts.distributions(rows, "energy_j", "model", "energy per response (J)")
    length = charts.distributions(rows.assign(tokens=rows["response_tokens"].astype(float)), "tokens", "model",
                                  "response length (tokens)")
    energy_note = "" if energy is not None else (
        f"_No energy histogram: {note}. Energy needs a run on an NVIDIA GPU._")
    # Rows without a start time (recovered from a log that lacked it) have no place on a timeline.
    first = sub.dropna(subset=["started_at"]).sort_values("started_at").head(views.TIMELINE_REQUESTS)
    line, sample_s = None, None
    if not first.empty:
        end = (first["started_at"] + pd.to_timedelta(first["latency_s"], unit="s")).max()
        power = folder.power(run_id, model, task, first["started_at"].min() - pd.Timedelta(seconds=0.5),
                             end + pd.Timedelta(seconds=0.5))
        line = charts.timeline(*views.timeline_frames(first, power)) if not power.empty else None
        gaps = power.groupby(["host", "gpu_index"])["timestamp"].diff().dt.total_seconds().dropna()
        sample_s = float(gaps.median()) if len(gaps) else None
    return (summary + _coarse_warning(sub), plot_data(energy), energy_note, plot_data(length), samples, plot_data(line),
            views.timeline_note(sub, len(first), line is not None, sample_s),
            reference_note(folder.references(run_id, model, task)))


@dataclass
class Detail:
    run: gr.Dropdown
    model: gr.Dropdown
    task: gr.Dropdown
    summary: gr.Markdown
    energy: gr.Plot
    energy_note: gr.Markdown
    length: gr.Plot
    samples: gr.Dataframe
    timeline: gr.Plot
    timeline_note: gr.Markdown
    checks: gr.Markdown

    @property
    def outputs(self) -> list:
        """One component per value of `model_detail`, in its order."""
        return [self.summary, self.energy, self.energy_note, self.length, self.samples, self.timeline,
                self.timeline_note, self.checks]


def build() -> Detail:
    # allow_custom_value: a run's switch sends the previous run's model and task along, and
    # the handlers replace what the new run lacks.
    with gr.Row():
        run = gr.Dropdown(label="Run", elem_id="detail-run", allow_custom_value=True)
        model = gr.Dropdown(label="Model", elem_id="detail-model", allow_custom_value=True)
        task = gr.Dropdown(label="Task", elem_id="detail-task", allow_custom_value=True)
    summary = gr.Markdown(elem_id="detail-summary")
    gr.Markdown("### Distributions")
    with gr.Row():
        with gr.Column():
            energy = gr.Plot(label="Energy per response", elem_id="detail-energy")
            energy_note = gr.Markdown(elem_id="detail-energy-note")
        length = gr.Plot(label="Response length", elem_id="detail-length")
    gr.Markdown("### Power over time")
    timeline = gr.Plot(label="Power timeline", elem_id="detail-timeline")
    timeline_note = gr.Markdown(elem_id="detail-timeline-note")
    gr.Markdown("### Samples and checks")
    samples = gr.Dataframe(interactive=False, wrap=True, max_chars=80, label="Sample prompts and responses",
                           elem_id="detail-samples")
    checks = gr.Markdown(elem_id="detail-checks")
    return Detail(run, model, task, summary, energy, energy_note, length, samples, timeline, timeline_note, checks)


def pick(folder: RunsFolder, run_id, model, task) -> tuple:
    """Dropdowns of the model detail for a run (keeping the model and task where the run
    has them), then the detail itself."""
    jobs = folder.jobs(run_id) if run_id else None
    if not jobs or not jobs[0]:
        return (gr.Dropdown(choices=[], value=None), gr.Dropdown(choices=[], value=None),
                *model_detail(folder, None, None, None))
    models, tasks = jobs
    model = model if model in models else models[0]
    task = task if task in tasks else ("chat" if "chat" in tasks else tasks[0])
    return (gr.Dropdown(choices=models, value=model), gr.Dropdown(choices=tasks, value=task),
            *model_detail(folder, run_id, model, task))


def _link_text(cell) -> str:
    m = re.match(r"^\[(.*)\]\((.*)\)$", str(cell), re.S)
    return m.group(1) if m else str(cell)


def open_from_row(folder: RunsFolder, run_choices: list[str], df: pd.DataFrame, evt: gr.SelectData) -> tuple:
    """A click on a leaderboard row: that model's detail, in a run with its rows (the tab,
    the run dropdown, then `pick`'s values)."""
    if df is None or df.empty or evt.index is None:
        return (gr.skip(),) * (4 + len(nothing("")))
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    # The model is the row's first text cell: the rank (#) before it is a number.
    text = [c for c in (evt.row_value or []) if isinstance(c, str)]
    shown = _link_text(text[0]) if text else None
    chosen = df.iloc[row] if row < len(df) and (shown is None or df.iloc[row]["model"] == shown) else None
    model = chosen["model"] if chosen is not None else shown
    agg = folder.aggregates()
    held = agg[(agg["model"] == model) & agg["run_id"].isin(run_choices)]
    if held.empty:  # e.g. a model of the imported 2023 results: published means only
        return (gr.Tabs(selected="detail"), gr.skip(), gr.skip(), gr.skip(),
                *nothing(f"**{model}**: no run in this folder holds its per-request rows (imported results "
                             f"hold means only): no distributions to show."))
    run = chosen["run_id"] if chosen is not None and chosen["run_id"] in set(held["run_id"]) else held["run_id"].iloc[0]
    task = chosen["task"] if chosen is not None else None
    return (gr.Tabs(selected="detail"), gr.Dropdown(value=run), *pick(folder, run, model, task))
