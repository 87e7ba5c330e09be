"""The Compare tab: two or more models, of any runs (the 2023 import included), side by
side: energy, length and their spread; a model known only by its means is a point."""

from __future__ import annotations

import json
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ui import charts
from ui.data import RunsFolder
from ui.tabs.detail import plot_data


UNITS = {"energy_mean": "energy mean (J)", "energy_median": "energy median (J)", "length_mean": "length mean (tok)",
         "length_median": "length median (tok)", "latency_mean": "latency mean (s)"}
SUMMARY = ["model", "run", "gpu", "responses", *UNITS]


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
        models = gr.Dropdown(label="Models (two or more, of any run)", multiselect=True, elem_id="compare-models")
    energy = gr.Plot(label="Energy per response, per model", elem_id="compare-energy")
    note = gr.Markdown(elem_id="compare-note")
    length = gr.Plot(label="Response length, per model", elem_id="compare-length")
    hist = gr.Plot(label="Energy per response: distributions overlaid", elem_id="compare-hist")
    table = gr.Dataframe(interactive=False, elem_id="compare-table")
    return Compare(run, task, models, energy, note, length, hist, table)


def entry(run_id: str, model: str) -> str:
    """A model of a run as the models menu's value."""
    return json.dumps([run_id, model])


def _choices(folder: RunsFolder, task: str | None) -> list[tuple[str, str]]:
    """Every (run, model) with rows or figures for the task, labelled "model · run"."""
    agg = folder.aggregates()
    if task:
        agg = agg[agg["task"] == task]
    pairs = agg[["run_id", "model"]].drop_duplicates().sort_values(["run_id", "model"])
    return [(f"{m} · {r}", entry(r, m)) for r, m in pairs.itertuples(index=False)]


def _label(run_id: str, model: str, several_runs: bool) -> str:
    return f"{model} · {run_id}" if several_runs else model


def _summary_of_means(folder: RunsFolder, run_id: str, model: str, task: str, label: str) -> pd.DataFrame:
    """A model known by its means only (an imported leaderboard): a row per GPU."""
    agg = folder.aggregates()
    got = agg[(agg["run_id"] == run_id) & (agg["model"] == model) & (agg["task"] == task)]
    return pd.DataFrame({"model": label, "run": run_id, "gpu": got["gpu"], "responses": got["responses"],
                         "energy_mean": got["energy"], "length_mean": got["response_length"],
                         "latency_mean": got["latency"]})


def view(folder: RunsFolder, run_id, task, models) -> tuple:
    pairs = []
    for value in models or []:
        try:
            r, m = json.loads(value)
        except (TypeError, ValueError):
            continue
        pairs.append((str(r), str(m)))
    if len(pairs) < 1 or not task:
        return None, "_Pick a task and two or more models._", None, None, pd.DataFrame()
    several = len({r for r, _ in pairs}) > 1
    labels = [_label(r, m, several) for r, m in pairs]
    per_row, means, summaries = [], [], []
    for (r, m), label in zip(pairs, labels):
        rows = folder.rows(r, m, task)
        if rows is None:  # figures only: the means
            s = _summary_of_means(folder, r, m, task, label)
            if s.empty:  # no such run or model (a stale menu value)
                continue
            summaries.append(s)
            means.append(s.rename(columns={"energy_mean": "energy_j", "length_mean": "tokens"}))
        elif not rows.empty:
            per_row.append(rows.assign(model=label, run=r, tokens=rows["response_tokens"].astype(float)))
    if not per_row and not summaries:
        return None, "_None of these models has rows or figures for this task._", None, None, pd.DataFrame()
    rows = pd.concat(per_row, ignore_index=True) if per_row else pd.DataFrame(
        columns=["model", "run", "energy_j", "tokens", "latency_s", "gpu_name"])
    if per_row:
        summaries.insert(0, rows.groupby(["model", "run"], sort=False).agg(
            gpu=("gpu_name", lambda g: ", ".join(sorted({str(x) for x in g.dropna()}))), responses=("tokens", "size"),
            energy_mean=("energy_j", "mean"), energy_median=("energy_j", "median"), length_mean=("tokens", "mean"),
            length_median=("tokens", "median"), latency_mean=("latency_s", "mean")).reset_index())
    mean_points = pd.concat(means, ignore_index=True) if means else None
    energy = charts.boxes(rows, "energy_j", "model", "energy per response (J)", labels, means=mean_points)
    length = charts.boxes(rows, "tokens", "model", "response length (tokens)", labels, means=mean_points)
    hist = charts.distributions(rows, "energy_j", "model", "energy per response (J)", labels) if per_row else None
    summary = pd.concat(summaries, ignore_index=True).reindex(columns=SUMMARY)
    summary = summary.dropna(axis=1, how="all").round(2).rename(columns=UNITS)
    notes = []
    if energy is None:
        notes.append("_No energy in these rows: a CPU run; lengths are compared below._")
    if means:
        notes.append("◆ A model of an imported leaderboard is known by its means only (no per-response values): a "
                     "point, not a box, and no distribution.")
    return plot_data(energy), "  \n".join(notes), plot_data(length), plot_data(hist), summary


def pick(folder: RunsFolder, run_choices: list[str], run_id, task) -> tuple:
    """The tab for a run: its tasks, its first models chosen (any run's can be added), and
    the comparison."""
    jobs = folder.jobs(run_id) if run_id else None
    if not jobs or not jobs[0]:
        return (gr.Dropdown(value=run_id), gr.Dropdown(choices=[], value=None), gr.Dropdown(choices=[], value=[]),
                *view(folder, None, None, None))
    models, tasks = jobs
    task = task if task in tasks else ("chat" if "chat" in tasks else tasks[0])
    chosen = [entry(run_id, m) for m in models[:3]]
    return (gr.Dropdown(choices=sorted(set(run_choices)), value=run_id), gr.Dropdown(choices=tasks, value=task),
            gr.Dropdown(choices=_choices(folder, task), value=chosen), *view(folder, run_id, task, chosen))
