"""The Compare tab: two or more models of a run, side by side (energy, length, their spread)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ui import charts
from ui.data import RunsFolder
from ui.tabs.detail import plot_data


UNITS = {"energy_mean": "energy mean (J)", "energy_median": "energy median (J)", "length_mean": "length mean (tok)",
         "length_median": "length median (tok)", "latency_mean": "latency mean (s)"}


@dataclass
class Compare:
    run: gr.Dropdown
    task: gr.Dropdown
    models: gr.Dropdown
    energy: gr.Plot
    note: gr.Markdown
    length: gr.Plot
    hist: gr.Plot
    table: gr.Dataframe

    @property
    def outputs(self) -> list:
        return [self.energy, self.note, self.length, self.hist, self.table]


def build() -> Compare:
    with gr.Row():
        run = gr.Dropdown(label="Run", elem_id="compare-run", allow_custom_value=True)
        task = gr.Dropdown(label="Task", elem_id="compare-task", allow_custom_value=True)
        models = gr.Dropdown(label="Models (two or more)", multiselect=True, elem_id="compare-models")
    energy = gr.Plot(label="Energy per response, per model", elem_id="compare-energy")
    note = gr.Markdown(elem_id="compare-note")
    length = gr.Plot(label="Response length, per model", elem_id="compare-length")
    hist = gr.Plot(label="Energy per response: distributions overlaid", elem_id="compare-hist")
    table = gr.Dataframe(interactive=False, elem_id="compare-table")
    return Compare(run, task, models, energy, note, length, hist, table)


def view(folder: RunsFolder, run_id, task, models) -> tuple:
    jobs = folder.jobs(run_id) if run_id else None
    models = [m for m in (models or []) if jobs and m in jobs[0]]
    if not models or not task:
        return None, "_Pick a run, a task and two or more models._", None, None, pd.DataFrame()
    rows = pd.concat([folder.rows(run_id, m, task).assign(model=m) for m in models], ignore_index=True)
    rows["tokens"] = rows["response_tokens"].astype(float)
    energy = charts.boxes(rows, "energy_j", "model", "energy per response (J)", models)
    length = charts.boxes(rows, "tokens", "model", "response length (tokens)", models)
    hist = charts.distributions(rows, "energy_j", "model", "energy per response (J)", models)
    summary = rows.groupby("model", sort=False).agg(
        responses=("tokens", "size"), energy_mean=("energy_j", "mean"), energy_median=("energy_j", "median"),
        length_mean=("tokens", "mean"), length_median=("tokens", "median"), latency_mean=("latency_s", "mean"),
    ).round(2).reset_index().rename(columns=UNITS)
    note = "" if energy is not None else "_No energy in these rows: a CPU run; lengths are compared below._"
    return plot_data(energy), note, plot_data(length), plot_data(hist), summary


def pick(folder: RunsFolder, run_choices: list[str], run_id, task) -> tuple:
    """The tab for a run: its tasks and first models, and the comparison."""
    jobs = folder.jobs(run_id) if run_id else None
    if not jobs or not jobs[0]:
        return (gr.Dropdown(value=run_id), gr.Dropdown(choices=[], value=None), gr.Dropdown(choices=[], value=[]),
                *view(folder, None, None, None))
    models, tasks = jobs
    task = task if task in tasks else ("chat" if "chat" in tasks else tasks[0])
    chosen = models[:3]
    return (gr.Dropdown(choices=sorted(set(run_choices)), value=run_id), gr.Dropdown(choices=tasks, value=task),
            gr.Dropdown(choices=models, value=chosen), *view(folder, run_id, task, chosen))
