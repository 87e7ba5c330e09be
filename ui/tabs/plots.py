"""The Plots tab: a scatter of any two figures, time against energy with Pareto fronts, and
energy against the 2023 quality scores."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ui import charts
from ui.data import RunsFolder
from ui.tabs.detail import plot_data
from ui.views import CATEGORICAL, concurrency_frame, missing_note, time_energy_frame

NONE = "(none)"
SCORES = ["arc", "hellaswag", "truthfulqa"]


@dataclass
class Plots:
    x: gr.Dropdown
    y: gr.Dropdown
    colour: gr.Dropdown
    log: gr.Checkbox
    score: gr.Dropdown
    scatter: gr.Plot
    scatter_note: gr.Markdown
    front: gr.Plot
    front_note: gr.Markdown
    curves: gr.Plot
    curves_note: gr.Markdown
    quality: gr.Plot
    quality_note: gr.Markdown

    @property
    def controls(self) -> list:
        return [self.x, self.y, self.colour, self.log, self.score]

    @property
    def outputs(self) -> list:
        return [self.scatter, self.scatter_note, self.front, self.front_note, self.curves, self.curves_note,
                self.quality, self.quality_note]


def build(nums: list[str]) -> Plots:
    gr.Markdown("### Any two metrics")
    with gr.Row():
        x = gr.Dropdown(nums, value="parameters", label="X", elem_id="x-axis")
        y = gr.Dropdown(nums, value="energy", label="Y", elem_id="y-axis")
        colour = gr.Dropdown([NONE] + CATEGORICAL + nums, value="gpu", label="Colour (or a third metric)",
                             elem_id="colour")
        log = gr.Checkbox(label="Log scales", value=False, elem_id="log")
    scatter = gr.Plot(label="Scatter (hover for the model)", elem_id="scatter")
    scatter_note = gr.Markdown(elem_id="scatter-note")
    gr.Markdown("### Time against energy")
    front = gr.Plot(label="Time vs energy per response; a line: each model's Pareto front across its GPUs, backends "
                          "and runs", elem_id="pareto")
    front_note = gr.Markdown(elem_id="pareto-note")
    gr.Markdown("### Under concurrency")
    curves = gr.Plot(label="Energy per token against time per token, a line per model through its concurrency "
                           "levels (the label: requests in flight)", elem_id="concurrency-curves")
    curves_note = gr.Markdown(elem_id="concurrency-note")
    gr.Markdown("### Energy and quality")
    score = gr.Dropdown([("mean of the three", "quality")] + [(s, s) for s in SCORES], value="quality",
                        label="2023 quality score", elem_id="score")
    quality = gr.Plot(label="Energy vs 2023 quality score", elem_id="quality")
    quality_note = gr.Markdown(elem_id="quality-note")
    return Plots(x, y, colour, log, score, scatter, scatter_note, front, front_note, curves, curves_note, quality,
                 quality_note)


def view(folder: RunsFolder, df: pd.DataFrame, x, y, colour, log, score) -> tuple:
    agg = folder.aggregates()
    colour = None if colour in (None, NONE) else colour
    domain = sorted(agg[colour].dropna().unique().tolist()) if colour in CATEGORICAL else None
    sc = charts.scatter(df, x, y, colour, domain, log) if x in df and y in df else None
    fr = charts.pareto(time_energy_frame(df), sorted(agg["gpu"].dropna().unique()), log)
    cc = charts.concurrency_curves(concurrency_frame(agg, df), log)
    q = None
    if score and set(SCORES) <= set(df):
        quality = df.assign(quality=df[SCORES].mean(axis=1, skipna=False)) if score == "quality" else df
        q = charts.scatter(quality, score, "energy", "gpu", sorted(agg["gpu"].dropna().unique()), log)

    def note(spec, text):
        return "" if spec is not None else text

    return (plot_data(sc), note(sc, missing_note(df, [x, y], "This scatter")),
            plot_data(fr), note(fr, missing_note(df, ["latency", "energy"], "Time vs energy")),
            plot_data(cc), note(cc, "_One concurrency level per model in view: a `server` model with "
                                    "`concurrency: [1, 4, 16]` draws its curve here, whichever levels are ticked "
                                    "above._"),
            plot_data(q), note(q, missing_note(df, SCORES + ["energy"], "Energy vs quality") if score else
                               "_No 2023 quality scores in view (they come with the imported 2023 run)._"))
