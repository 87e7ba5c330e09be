"""The Verbosity tab: per GPU, what each model's concise prompt saved (energy or length)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ui import charts
from ui.data import RunsFolder, verbosity
from ui.tabs.detail import plot_data
from ui.views import filter_aggregates, format_params


@dataclass
class Verbosity:
    gpu: gr.Radio
    measure: gr.Radio
    plot: gr.Plot
    note: gr.Markdown
    table: gr.Dataframe

    @property
    def outputs(self) -> list:
        return [self.gpu, self.plot, self.note, self.table]


def build() -> Verbosity:
    gr.Markdown("Models of one size spend different energy because they answer at different lengths. "
                "Here: each model under a task and its concise twin on one GPU, and what the concise "
                "prompt saved (one bar per model and task pair).")
    with gr.Row():
        gpu = gr.Radio([], label="GPU", elem_id="verb-gpu")
        measure = gr.Radio(["energy saved %", "length saved %"], value="energy saved %", label="Bars",
                           elem_id="verb-measure")
    plot = gr.Plot(label="Saved by the concise prompt (%)", elem_id="verb-plot")
    note = gr.Markdown(elem_id="verb-note")
    table = gr.Dataframe(interactive=False, elem_id="verbosity", wrap=True)
    return Verbosity(gpu, measure, plot, note, table)


def view(folder: RunsFolder, runs, gpus, backends, gpu, measure) -> tuple:
    agg = folder.aggregates()
    v = verbosity(filter_aggregates(agg, runs or [], agg["gpu"].dropna().unique().tolist(), None, backends or []))
    have = sorted(v["gpu"].unique()) if not v.empty else []
    if gpu not in have:
        gpu = next((g for g in (gpus or []) if g in have), have[0] if have else None)
    v = v[v["gpu"] == gpu] if gpu else v
    if not v.empty:
        # The model's name, and run or backend where one GPU holds it more than once.
        dup = v.duplicated(["pair", "model"], keep=False)
        v = v.assign(label=[f"{m} · {b} · {r}" if d else m for m, b, r, d in zip(v["model"], v["backend"],
                                                                               v["run_id"], dup)])
    spec = charts.verbosity_bars(v, measure) if not v.empty else None
    note = "" if spec is not None else (
        "_Needs a model measured under a task and its concise twin (chat and chat-concise, or instruct and "
        "instruct-concise) in the runs ticked above._" if v.empty else
        f"_{measure} needs energy, which no row here has (a CPU run): pick length saved %._")
    single_run = v.empty or v["run_id"].nunique() <= 1
    table = v.drop(columns=["label", "gpu"] + (["run_id"] if single_run else []), errors="ignore")
    if not table.empty:
        table = table.assign(parameters=table["parameters"].map(format_params))
        # What the tab is about first: the savings, then the figures behind them.
        first = [c for c in ("model", "pair", "energy saved %", "length saved %") if c in table]
        table = table[first + [c for c in table.columns if c not in first]]
    return gr.Radio(choices=have, value=gpu), plot_data(spec), note, table
