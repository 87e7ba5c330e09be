"""The Gradio page: leaderboard, custom columns, plots, verbosity, model detail, CSV.

A timer re-reads the runs folder every few seconds (only changed runs are re-read), so
a sweep in progress shows up without reloading the page.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from ui.data import RunsFolder, verbosity
from ui.formula import FormulaError, evaluate
from ui.views import (
    CATEGORICAL,
    check_column_name,
    datatypes,
    display_table,
    filter_aggregates,
    histogram,
    live_status,
    numeric_columns,
    scatter_frame,
    set_aside_note,
    time_energy_frame,
    with_custom_columns,
)

NONE = "(none)"
INTRO = (
    "GPU energy per LLM response, measured under identical conditions (batch size 1, the model's own chat "
    "template, one system prompt per task). **energy**: mean J per response; **energy/token**: total J over "
    "total generated tokens; **95% CI** of the mean energy; runs imported from the 2023 ML.ENERGY leaderboard "
    "hold published means only."
)


def _bars(hist: pd.DataFrame) -> gr.BarPlot:
    top = int(hist["responses"].max()) if len(hist) else 1
    return gr.BarPlot(value=hist, y_lim=[0, top * 1.1])  # counts start at zero


def build_app(runs_root: str | Path, refresh_s: float = 5.0) -> gr.Blocks:
    folder = RunsFolder(Path(runs_root))
    no_runs = (f"**No runs yet in `{runs_root}`.** Make one with `python -m sweep --config models.yaml --out {runs_root}`, "
               f"or add the 2023 leaderboard's results with `python -m sweep import-mlenergy "
               f"../shared/data/mlenergy_2023 --out {runs_root}`. They show up here by themselves.")
    csv_dir = Path(tempfile.mkdtemp(prefix="sweep-ui-"))

    def current():
        agg = folder.aggregates()
        runs = sorted(agg["run_id"].dropna().unique().tolist())
        gpus = sorted(agg["gpu"].dropna().unique().tolist())
        tasks = sorted(agg["task"].dropna().unique().tolist())
        backends = sorted(agg["backend"].dropna().unique().tolist()) if "backend" in agg else []
        return agg, runs, gpus, tasks, backends

    def table_outputs(runs, gpus, task, backends, custom):
        agg = folder.aggregates()
        df = with_custom_columns(filter_aggregates(agg, runs or [], gpus or [], task, backends or []), custom)
        shown = display_table(df, custom)
        path = csv_dir / "leaderboard.csv"
        df.drop(columns=[c for c in ("url",) if c in df]).to_csv(path, index=False)
        return gr.Dataframe(value=shown, datatype=datatypes(shown)), gr.DownloadButton(value=str(path)), df

    def plot_outputs(df: pd.DataFrame, x, y, color):
        color = None if color in (None, NONE) else color
        scatter = gr.ScatterPlot(value=scatter_frame(df, x, y, color) if x in df and y in df else None,
                                 x=x, y=y, color=color, tooltip=["model", "gpu", "task", "run_id", x, y])
        front = gr.ScatterPlot(value=time_energy_frame(df), x="latency", y="energy", color="front",
                               tooltip=["model", "gpu", "task", "latency", "energy"])
        return scatter, front

    with gr.Blocks(title="sweep leaderboard") as demo:
        custom = gr.State([])  # [(name, formula)]
        filtered = gr.State(pd.DataFrame())
        agg0, runs0, gpus0, tasks0, backends0 = current()
        gr.Markdown("# LLM energy leaderboard\n" + INTRO)
        live = gr.Markdown(elem_id="live-status")
        with gr.Row():
            runs_in = gr.CheckboxGroup(runs0, value=runs0, label="Runs", elem_id="runs-filter")
            gpus_in = gr.CheckboxGroup(gpus0, value=gpus0, label="GPUs", elem_id="gpus-filter")
            backends_in = gr.CheckboxGroup(backends0, value=backends0, label="Backends", elem_id="backends-filter")
            task_in = gr.Radio(tasks0, value="chat" if "chat" in tasks0 else (tasks0[0] if tasks0 else None),
                               label="Task", elem_id="task-filter")
        with gr.Tab("Leaderboard"):
            table = gr.Dataframe(interactive=False, show_search="filter", elem_id="leaderboard", max_height=600,
                                 label="Sorted by energy (click a header to sort by another column)")
            with gr.Row():
                col_name = gr.Textbox(label="Custom column name", placeholder="J_per_100_tok", elem_id="col-name")
                col_formula = gr.Textbox(label="Formula over numeric columns",
                                         placeholder="energy / response_length * 100", elem_id="col-formula")
                add_col = gr.Button("Add column", elem_id="add-col")
            col_msg = gr.Markdown(elem_id="col-msg")
            download = gr.DownloadButton("Download CSV", elem_id="download")
        with gr.Tab("Plots"):
            num0 = numeric_columns(agg0) or ["parameters", "energy"]
            with gr.Row():
                x_in = gr.Dropdown(num0, value="parameters", label="X", elem_id="x-axis")
                y_in = gr.Dropdown(num0, value="energy", label="Y", elem_id="y-axis")
                color_in = gr.Dropdown([NONE] + CATEGORICAL + num0, value="model", label="Colour (or a third metric)")
            scatter = gr.ScatterPlot(label="Scatter (hover for the model)", elem_id="scatter")
            front = gr.ScatterPlot(label="Time vs energy per response: Pareto front marked", elem_id="pareto")
        with gr.Tab("Verbosity"):
            gr.Markdown("Models of one size spend different energy because they answer at different lengths. "
                        "Here: each model under a task and its concise twin, and what the concise prompt saved.")
            verb_table = gr.Dataframe(interactive=False, elem_id="verbosity")
            verb_plot = gr.BarPlot(x="model", y="energy saved %", color="pair", label="Energy saved by the concise prompt")
        with gr.Tab("Model detail"):
            with gr.Row():
                d_run = gr.Dropdown(label="Run", elem_id="detail-run")
                d_model = gr.Dropdown(label="Model", elem_id="detail-model")
                d_task = gr.Dropdown(label="Task", elem_id="detail-task")
            d_summary = gr.Markdown()
            with gr.Row():
                d_energy = gr.BarPlot(x="bin", y="responses", label="Energy per response (J)")
                d_length = gr.BarPlot(x="bin", y="responses", label="Response length (tokens)")
            d_samples = gr.Dataframe(interactive=False, wrap=True, label="Sample prompts and responses")

        def on_filter(runs, gpus, task, backends, custom_cols, x, y, color):
            tbl, dl, df = table_outputs(runs, gpus, task, backends, custom_cols)
            sc, fr = plot_outputs(df, x, y, color)
            agg = folder.aggregates()
            verb = verbosity(filter_aggregates(agg, runs or [], gpus or [], None, backends or []))
            return tbl, dl, df, sc, fr, verb, verb

        def refresh(runs, gpus, task, backends, custom_cols, x, y, color, old_runs, old_gpus, old_backends, detail_run):
            agg, all_runs, all_gpus, all_tasks, all_backends = current()
            # keep the user's choices; new runs/GPUs (a sweep just started writing) come in ticked
            runs = [r for r in all_runs if r in (runs or []) or r not in (old_runs or [])]
            gpus = [g for g in all_gpus if g in (gpus or []) or g not in (old_gpus or [])]
            backends = [b for b in all_backends if b in (backends or []) or b not in (old_backends or [])]
            views = on_filter(runs, gpus, task, backends, custom_cols, x, y, color)
            manifests = {r: folder.manifest(r) for r in all_runs}
            status = (f"{live_status(agg, manifests) if all_runs else no_runs}{set_aside_note(folder.set_aside())}"
                      f"  \n_updated {time.strftime('%H:%M:%S')}_")
            unchanged = (all_runs == (old_runs or []) and all_gpus == (old_gpus or [])
                         and all_backends == (old_backends or []) and detail_run is not None)
            if unchanged:  # leave the filter widgets alone: a re-render would close an open menu
                widgets = (gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
            else:
                per_request = [r for r in all_runs if manifests[r].get("kind") != "aggregate-only"]
                widgets = (gr.CheckboxGroup(choices=all_runs, value=runs), gr.CheckboxGroup(choices=all_gpus, value=gpus),
                           gr.Radio(choices=all_tasks, value=task if task in all_tasks else None),
                           gr.Dropdown(choices=per_request, value=detail_run or (per_request[0] if per_request else None)),
                           gr.CheckboxGroup(choices=all_backends, value=backends))
            return (*widgets[:3], widgets[4], *views, status, widgets[3], all_runs, all_gpus, all_backends)

        known_runs = gr.State(runs0)
        known_gpus = gr.State(gpus0)
        known_backends = gr.State(backends0)
        refresh_outputs = [runs_in, gpus_in, task_in, backends_in, table, download, filtered, scatter, front,
                           verb_table, verb_plot, live, d_run, known_runs, known_gpus, known_backends]
        refresh_inputs = [runs_in, gpus_in, task_in, backends_in, custom, x_in, y_in, color_in, known_runs, known_gpus,
                          known_backends, d_run]

        filter_inputs = [runs_in, gpus_in, task_in, backends_in, custom, x_in, y_in, color_in]
        filter_outputs = [table, download, filtered, scatter, front, verb_table, verb_plot]
        for comp in (runs_in, gpus_in, task_in, backends_in):
            comp.input(on_filter, filter_inputs, filter_outputs, api_name=False)

        def add_column(name, formula, custom_cols, runs, gpus, task, backends, x, y, color):
            name = (name or "").strip()
            df = with_custom_columns(filter_aggregates(folder.aggregates(), runs or [], gpus or [], task, backends or []),
                                     custom_cols)
            try:  # refuse before anything changes
                refused = "Column refused"
                if not name:
                    raise FormulaError("give the column a name")
                check_column_name(name, df)
                refused = "Formula refused"
                evaluate(formula, df)
            except FormulaError as exc:
                return (custom_cols, f"⚠️ {refused}: {exc}", gr.Dropdown(), gr.Dropdown(),
                        *on_filter(runs, gpus, task, backends, custom_cols, x, y, color))
            custom_cols = custom_cols + [(name, formula)]
            tbl, dl, df, sc, fr, verb, verb2 = on_filter(runs, gpus, task, backends, custom_cols, x, y, color)
            nums = numeric_columns(df)
            return (custom_cols, f"Added column **{name}** = `{formula}`", gr.Dropdown(choices=nums),
                    gr.Dropdown(choices=nums), tbl, dl, df, sc, fr, verb, verb2)

        add_col.click(add_column, [col_name, col_formula, custom, runs_in, gpus_in, task_in, backends_in, x_in, y_in,
                                   color_in],
                      [custom, col_msg, x_in, y_in] + filter_outputs, api_name="add_column")

        def replot(df, x, y, color):
            return plot_outputs(df, x, y, color)

        for comp in (x_in, y_in, color_in):
            comp.input(replot, [filtered, x_in, y_in, color_in], [scatter, front], api_name=False)

        # -- model detail ---------------------------------------------------------------
        def detail_choices(run_id):
            jobs = folder.jobs(run_id) if run_id else None
            if not jobs or not jobs[0]:
                return gr.Dropdown(choices=[], value=None), gr.Dropdown(choices=[], value=None)
            models, tasks = jobs
            return (gr.Dropdown(choices=models, value=models[0]),
                    gr.Dropdown(choices=tasks, value="chat" if "chat" in tasks else tasks[0]))

        def detail(run_id, model, task):
            sub = folder.rows(run_id, model, task) if run_id and model and task else None
            if sub is None:
                return "Pick a run with per-request rows, a model and a task.", None, None, None
            if sub.empty:
                return f"No responses of {model} on {task} in {run_id}.", None, None, None
            prompts = folder.prompts(run_id)
            samples = sub.merge(prompts, on="prompt_id", how="left").sort_values("prompt_id").head(20)
            samples = samples[["prompt_id", "prompt", "response", "response_tokens", "energy_j", "latency_s"]]
            e = sub["energy_j"]
            summary = (f"**{model} / {task}** on {sub['gpu_name'].iloc[0]}: {len(sub)} responses; "
                       f"energy {e.mean():.1f} J (median {e.median():.1f}, p90 {e.quantile(0.9):.1f}); "
                       f"length {sub['response_tokens'].mean():.1f} tokens; template `{sub['template'].iloc[0]}`"
                       if e.notna().any() else
                       f"**{model} / {task}**: {len(sub)} responses; energy not measured "
                       f"({sub['energy_note'].dropna().iloc[0] if sub['energy_note'].notna().any() else 'n/a'}); "
                       f"length {sub['response_tokens'].mean():.1f} tokens")
            return summary, _bars(histogram(e, unit=" J")), _bars(histogram(sub["response_tokens"].astype(float))), samples

        detail_io = ([d_run, d_model, d_task], [d_summary, d_energy, d_length, d_samples])
        # One chain, so the detail is drawn once both model and task are set.
        d_run.change(detail_choices, [d_run], [d_model, d_task], api_name=False).then(detail, *detail_io, api_name=False)
        for comp in (d_model, d_task):
            comp.input(detail, *detail_io, api_name=False)

        timer = gr.Timer(refresh_s)
        timer.tick(refresh, refresh_inputs, refresh_outputs, api_name=False, show_progress="hidden")
        demo.load(refresh, refresh_inputs, refresh_outputs, api_name="refresh")
    return demo
