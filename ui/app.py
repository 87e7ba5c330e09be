"""The Gradio page: leaderboard, limits, plots, verbosity, model detail, compare, about.

A timer looks at the runs folder every few seconds (a directory listing per run) and
sends a view again only when what it shows changed: an idle tab gets an empty update.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from ui import charts, detail, views
from ui.data import DISPLAY, RunsFolder, verbosity
from ui.formula import FormulaError, evaluate
from ui.views import (
    ABOUT,
    CATEGORICAL,
    DEFAULT_COLUMNS,
    about_runs,
    best_under_limits,
    check_column_name,
    column_choices,
    column_legend,
    datatypes,
    display_table,
    energy_notice,
    filter_aggregates,
    limit_maxima,
    format_params,
    live_status,
    missing_note,
    numeric_columns,
    set_aside_note,
    sort_table,
    time_energy_frame,
    with_custom_columns,
)

NONE = "(none)"
SCORES = ["arc", "hellaswag", "truthfulqa"]
INTRO = (
    "GPU energy per LLM response, measured under identical conditions (batch size 1, the model's own chat "
    "template, one system prompt per task). One GPU at a time ranks models on equal terms; tick more GPUs to "
    "compare them. What each column means is under the table; how it is measured, in **About**."
)
SKIP = gr.skip
# For launch(css=CSS): long model names wrap inside their cell instead of widening the table past the page.
CSS = "#leaderboard td, #limits-table td, #verbosity td { overflow-wrap: anywhere; }"


_plot = detail.plot_data


def _note(spec: dict | None, note: str) -> str:
    return "" if spec is not None else note


def _default_gpus(agg: pd.DataFrame) -> list[str]:
    """One GPU: the one with the most measured (model, task) figures, so a model is listed once."""
    if agg.empty:
        return []
    counts = agg.assign(m=agg["energy"].notna()).groupby("gpu").agg(m=("m", "sum"), n=("m", "size"))
    return [counts.sort_values(["m", "n"], ascending=False).index[0]]


def _link_text(cell) -> str:
    m = re.match(r"^\[(.*)\]\((.*)\)$", str(cell), re.S)
    return m.group(1) if m else str(cell)


def build_app(runs_root: str | Path, refresh_s: float = 5.0) -> gr.Blocks:
    folder = RunsFolder(Path(runs_root))
    no_runs = (f"**No runs yet in `{runs_root}`.** Make one with `python -m sweep --config models.yaml --out {runs_root}`, "
               f"or add the 2023 leaderboard's results with `python -m sweep import-mlenergy "
               f"../shared/data/mlenergy_2023 --out {runs_root}`. They show up here by themselves.")
    csv_dir = Path(tempfile.mkdtemp(prefix="sweep-ui-"))

    def choices(agg):
        def values(col):
            return sorted(agg[col].dropna().unique().tolist()) if col in agg else []
        return values("run_id"), values("gpu"), values("task"), values("backend")

    def per_request_runs(agg, manifests) -> list[str]:
        """Runs with per-request rows, those with energy first (the model detail opens on one)."""
        runs = [r for r in sorted(manifests) if manifests[r].get("kind") != "aggregate-only"]
        measured = set(agg.loc[agg["energy"].notna(), "run_id"])
        return sorted(runs, key=lambda r: r not in measured)

    # -- views: each a function of the filters and its own controls -----------------------
    def selected(runs, gpus, task, backends):
        return filter_aggregates(folder.aggregates(), runs or [], gpus or [], task, backends or [])

    def board(runs, gpus, task, backends, custom, columns, rank_by):
        df = with_custom_columns(selected(runs, gpus, task, backends), custom)
        df, label = sort_table(df, rank_by)
        if df["gpu"].nunique() == 1 and columns is not None:  # one GPU: the filter names it, the label too
            label = f"{label} · GPU {df['gpu'].iloc[0]}"
            columns = [c for c in columns if c != "gpu"]
        shown = display_table(df, custom, columns)
        path = csv_dir / "leaderboard.csv"
        df.drop(columns=[c for c in ("url",) if c in df]).to_csv(path, index=False)
        # Shares of the page's width: the table never runs past it, a long name wraps.
        rest = f"{80 / max(len(shown.columns) - 1, 1):.2f}%"
        widths = ["20%" if c == DISPLAY["model"] else rest for c in shown.columns]
        return (energy_notice(df), gr.Dataframe(value=shown, datatype=datatypes(shown), label=label,
                                                column_widths=widths),
                gr.DownloadButton(value=str(path)), df)

    def plots(df, x, y, colour, log, score):
        agg = folder.aggregates()
        colour = None if colour in (None, NONE) else colour
        domain = sorted(agg[colour].dropna().unique().tolist()) if colour in CATEGORICAL else None
        sc = charts.scatter(df, x, y, colour, domain, log) if x in df and y in df else None
        fr = charts.pareto(time_energy_frame(df), sorted(agg["gpu"].dropna().unique()), log)
        q = None
        if score and set(SCORES) <= set(df):
            quality = df.assign(quality=df[SCORES].mean(axis=1, skipna=False)) if score == "quality" else df
            q = charts.scatter(quality, score, "energy", "gpu", sorted(agg["gpu"].dropna().unique()), log)
        return (_plot(sc), _note(sc, missing_note(df, [x, y], "This scatter")),
                _plot(fr), _note(fr, missing_note(df, ["latency", "energy"], "Time vs energy")),
                _plot(q), _note(q, missing_note(df, SCORES + ["energy"], "Energy vs quality")
                                if score else "_No 2023 quality scores in view (they come with the imported "
                                              "2023 run)._"))

    def verb(runs, gpus, backends, gpu, measure):
        agg = folder.aggregates()
        v = verbosity(filter_aggregates(agg, runs or [], agg["gpu"].dropna().unique().tolist(), None,
                                        backends or []))
        have = sorted(v["gpu"].unique()) if not v.empty else []
        if gpu not in have:
            gpu = next((g for g in (gpus or []) if g in have), have[0] if have else None)
        v = v[v["gpu"] == gpu] if gpu else v
        if not v.empty:
            # The model's name, and run or backend where one GPU holds it more than once.
            dup = v.duplicated(["pair", "model"], keep=False)
            v = v.assign(label=[f"{m} · {b} · {r}" if d else m
                                for m, b, r, d in zip(v["model"], v["backend"], v["run_id"], dup)])
        spec = charts.verbosity_bars(v, measure) if not v.empty else None
        note = "" if spec is not None else (
            "_Needs a model measured under a task and its concise twin (chat and chat-concise, or instruct and "
            "instruct-concise) in the runs ticked above._" if v.empty else
            f"_{measure} needs energy, which no row here has (a CPU run): pick length saved %._")
        single_run = v.empty or v["run_id"].nunique() <= 1
        table = v.drop(columns=["label", "gpu"] + (["run_id"] if single_run else []), errors="ignore")
        if not table.empty:
            table = table.assign(parameters=table["parameters"].map(format_params))
        return gr.Radio(choices=have, value=gpu), _plot(spec), note, table

    def limit_ranges(runs, task, kind, kept=None):
        """The limit sliders for this view and the values to apply. `kept`: (deadline,
        budget, the maxima last sent), on a refresh of the same view: a value the user
        moved below its maximum stays (within the new range); one left at its maximum
        follows the new maximum, so new rows are not cut off by a limit nobody set."""
        agg = folder.aggregates()
        df = filter_aggregates(agg, runs or [], agg["gpu"].dropna().unique().tolist(), task)
        per_token = kind != "latency (s)"
        dmax, bmax = limit_maxima(df, per_token)
        dval, bval = dmax, bmax
        if kept is not None and kept[2] is not None:
            d_old, b_old, (dmax_old, bmax_old) = kept
            if d_old is not None and d_old < dmax_old:
                dval = min(d_old, dmax)
            if bmax is not None and b_old is not None and bmax_old is not None and b_old < bmax_old:
                bval = min(b_old, bmax)
        deadline = gr.Slider(minimum=0, maximum=dmax, value=dval,
                             label="Deadline: " + ("time per output token (ms)" if per_token else "latency (s)"))
        budget = (gr.Slider(minimum=0, maximum=bmax, value=bval, interactive=True,
                            label="Energy budget per response (J)") if bmax is not None else
                  gr.Slider(minimum=0, maximum=1, value=1, interactive=False,
                            label="Energy budget: no energy measured in these runs"))
        return deadline, budget, (dval, bval), (dmax, bmax)

    def limits(runs, task, kind, deadline, budget):
        agg = folder.aggregates()
        df = filter_aggregates(agg, runs or [], agg["gpu"].dropna().unique().tolist(), task)
        if df.empty:
            return pd.DataFrame(), "_Nothing in view._"
        per_token = kind != "latency (s)"
        best, missed = best_under_limits(df, None if per_token else deadline, deadline if per_token else None,
                                         budget if df["energy"].notna().any() else None)
        table = pd.DataFrame({
            "model": best["model"], "gpu": best["gpu"], "backend": best["backend"], "run": best["run_id"],
            "params": best["parameters"].map(format_params), "energy (J)": best["energy"].round(1),
            "latency (s)": best["latency"].round(2), "ms/token": best["ms_per_token"].round(1),
            "length (tok)": best["response_length"].round(1)})
        unmeasured = sorted(set(df.loc[df["energy"].isna(), "model"]) - set(df.loc[df["energy"].notna(), "model"]))
        missed = [m for m in missed if m not in unmeasured] if df["energy"].notna().any() else missed
        note = (f"**{len(best)}** model(s) within the limits, each at its least-energy GPU and backend."
                + (f" Not within them: {', '.join(missed)}." if missed else "")
                + (f" No energy measured (no budget can apply): {', '.join(unmeasured)}."
                   if unmeasured and df["energy"].notna().any() else "")
                + ("" if df["energy"].notna().any() else " No energy in these runs: ranked by latency."))
        return table, note

    def model_detail(run_id, model, task):
        return detail.model_detail(folder, run_id, model, task)

    def detail_pick(run_id, model, task):
        """Dropdowns of the model detail for a run (keeping the model and task where the run
        has them), then the detail itself."""
        jobs = folder.jobs(run_id) if run_id else None
        if not jobs or not jobs[0]:
            return (gr.Dropdown(choices=[], value=None), gr.Dropdown(choices=[], value=None),
                    *model_detail(None, None, None))
        models, tasks = jobs
        model = model if model in models else models[0]
        task = task if task in tasks else ("chat" if "chat" in tasks else tasks[0])
        return (gr.Dropdown(choices=models, value=model), gr.Dropdown(choices=tasks, value=task),
                *model_detail(run_id, model, task))

    def compare(run_id, task, models):
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
        ).round(2).reset_index().rename(columns=lambda c: c.replace("_", " "))
        note = "" if energy is not None else "_No energy in these rows: a CPU run; lengths are compared below._"
        return _plot(energy), note, _plot(length), _plot(hist), summary

    # -- layout ---------------------------------------------------------------------------
    agg0 = folder.aggregates()
    runs0, gpus0, tasks0, backends0 = choices(agg0)
    nums0 = numeric_columns(agg0) or ["parameters", "energy"]
    with gr.Blocks(title="sweep leaderboard") as demo:
        custom = gr.State([])  # [(name, formula)]
        filtered = gr.State(pd.DataFrame())
        seen = gr.State(None)  # (what the folder looked like, status) when this tab was last sent views
        gr.Markdown("# LLM energy leaderboard\n" + INTRO)
        live = gr.Markdown(elem_id="live-status")
        with gr.Row():
            runs_in = gr.CheckboxGroup(runs0, value=runs0, label="Runs", elem_id="runs-filter")
            gpus_in = gr.CheckboxGroup(gpus0, value=_default_gpus(agg0), label="GPUs", elem_id="gpus-filter")
            backends_in = gr.CheckboxGroup(backends0, value=backends0, label="Backends", elem_id="backends-filter")
            task_in = gr.Radio(tasks0, value="chat" if "chat" in tasks0 else (tasks0[0] if tasks0 else None),
                               label="Task", elem_id="task-filter")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Leaderboard", id="board"):
                notice = gr.Markdown(elem_id="energy-notice")
                table = gr.Dataframe(interactive=False, show_search="filter", elem_id="leaderboard", max_height=600,
                                     wrap=True, label="Leaderboard")
                gr.Markdown("_Click a row to open the model's detail._")
                with gr.Row():
                    rank_in = gr.Dropdown([(DISPLAY.get(c, c), c) for c in nums0 if c in DISPLAY], value="energy",
                                          label="Rank by", elem_id="rank-by", scale=1)
                    columns_in = gr.Dropdown(column_choices(), value=DEFAULT_COLUMNS, multiselect=True,
                                             label="Columns", elem_id="columns", scale=4)
                with gr.Accordion("What the columns mean", open=False, elem_id="legend"):
                    gr.Markdown(column_legend())
                with gr.Row():
                    col_name = gr.Textbox(label="Custom column name", placeholder="J_per_100_tok", elem_id="col-name")
                    col_formula = gr.Textbox(label="Formula over numeric columns",
                                             placeholder="energy / response_length * 100", elem_id="col-formula")
                    add_col = gr.Button("Add column", elem_id="add-col")
                col_msg = gr.Markdown(elem_id="col-msg")
                download = gr.DownloadButton("Download CSV", elem_id="download")
            with gr.Tab("Under limits", id="limits"):
                gr.Markdown("Per model, the GPU and backend with the least energy per response among those that meet "
                            "a deadline and an energy budget (runs and task above; all GPUs and backends).")
                with gr.Row():
                    limit_kind = gr.Radio(["latency (s)", "time per output token (ms)"], value="latency (s)",
                                          label="Deadline on", elem_id="limit-kind")
                    deadline = gr.Slider(0, 1, value=1, label="Deadline", elem_id="deadline")
                    budget = gr.Slider(0, 1, value=1, label="Energy budget per response (J)", elem_id="budget")
                limits_note = gr.Markdown(elem_id="limits-note")
                limits_table = gr.Dataframe(interactive=False, elem_id="limits-table", wrap=True)
            with gr.Tab("Plots", id="plots"):
                with gr.Row():
                    x_in = gr.Dropdown(nums0, value="parameters", label="X", elem_id="x-axis")
                    y_in = gr.Dropdown(nums0, value="energy", label="Y", elem_id="y-axis")
                    colour_in = gr.Dropdown([NONE] + CATEGORICAL + nums0, value="gpu",
                                            label="Colour (or a third metric)", elem_id="colour")
                    log_in = gr.Checkbox(label="Log scales", value=False, elem_id="log")
                scatter = gr.Plot(label="Scatter (hover for the model)", elem_id="scatter")
                scatter_note = gr.Markdown(elem_id="scatter-note")
                front = gr.Plot(label="Time vs energy per response; line: each GPU's Pareto front", elem_id="pareto")
                front_note = gr.Markdown(elem_id="pareto-note")
                score_in = gr.Dropdown([("mean of the three", "quality")] + [(s, s) for s in SCORES], value="quality",
                                       label="2023 quality score", elem_id="score")
                quality = gr.Plot(label="Energy vs 2023 quality score", elem_id="quality")
                quality_note = gr.Markdown(elem_id="quality-note")
            with gr.Tab("Verbosity", id="verbosity"):
                gr.Markdown("Models of one size spend different energy because they answer at different lengths. "
                            "Here: each model under a task and its concise twin on one GPU, and what the concise "
                            "prompt saved (one bar per model and task pair).")
                with gr.Row():
                    verb_gpu = gr.Radio([], label="GPU", elem_id="verb-gpu")
                    verb_measure = gr.Radio(["energy saved %", "length saved %"], value="energy saved %",
                                            label="Bars", elem_id="verb-measure")
                verb_plot = gr.Plot(label="Saved by the concise prompt (%)", elem_id="verb-plot")
                verb_note = gr.Markdown(elem_id="verb-note")
                verb_table = gr.Dataframe(interactive=False, elem_id="verbosity", wrap=True)
            # allow_custom_value: a run's switch sends the previous run's model and task along, and
            # the handlers replace what the new run lacks.
            with gr.Tab("Model detail", id="detail"):
                with gr.Row():
                    d_run = gr.Dropdown(label="Run", elem_id="detail-run", allow_custom_value=True)
                    d_model = gr.Dropdown(label="Model", elem_id="detail-model", allow_custom_value=True)
                    d_task = gr.Dropdown(label="Task", elem_id="detail-task", allow_custom_value=True)
                d_summary = gr.Markdown(elem_id="detail-summary")
                with gr.Row():
                    with gr.Column():
                        d_energy = gr.Plot(label="Energy per response", elem_id="detail-energy")
                        d_energy_note = gr.Markdown(elem_id="detail-energy-note")
                    d_length = gr.Plot(label="Response length", elem_id="detail-length")
                d_timeline = gr.Plot(label="Power timeline", elem_id="detail-timeline")
                d_timeline_note = gr.Markdown(elem_id="detail-timeline-note")
                d_samples = gr.Dataframe(interactive=False, wrap=True, label="Sample prompts and responses",
                                         elem_id="detail-samples")
                d_checks = gr.Markdown(elem_id="detail-checks")
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    c_run = gr.Dropdown(label="Run", elem_id="compare-run", allow_custom_value=True)
                    c_task = gr.Dropdown(label="Task", elem_id="compare-task", allow_custom_value=True)
                    c_models = gr.Dropdown(label="Models (two or more)", multiselect=True, elem_id="compare-models")
                c_energy = gr.Plot(label="Energy per response, per model", elem_id="compare-energy")
                c_note = gr.Markdown(elem_id="compare-note")
                c_length = gr.Plot(label="Response length, per model", elem_id="compare-length")
                c_hist = gr.Plot(label="Energy per response: distributions overlaid", elem_id="compare-hist")
                c_table = gr.Dataframe(interactive=False, elem_id="compare-table")
            with gr.Tab("About", id="about"):
                gr.Markdown(ABOUT)
                about = gr.Markdown(elem_id="about-runs")

        F = [runs_in, gpus_in, task_in, backends_in]
        T = [custom, columns_in, rank_in]
        P = [x_in, y_in, colour_in, log_in, score_in]
        V = [verb_gpu, verb_measure]
        L = [limit_kind, deadline, budget]
        board_out = [notice, table, download, filtered]
        plot_out = [scatter, scatter_note, front, front_note, quality, quality_note]
        verb_out = [verb_gpu, verb_plot, verb_note, verb_table]
        limits_out = [limits_table, limits_note]
        detail_out = [d_summary, d_energy, d_energy_note, d_length, d_samples, d_timeline, d_timeline_note, d_checks]
        compare_out = [c_energy, c_note, c_length, c_hist, c_table]

        def on_filter(runs, gpus, task, backends, custom_cols, columns, rank_by, x, y, colour, log, score,
                      vgpu, vmeasure, kind, kept=None):
            b = board(runs, gpus, task, backends, custom_cols, columns, rank_by)
            dl, db, (dval, bval), maxima = limit_ranges(runs, task, kind, kept)
            return (*b, *plots(b[3], x, y, colour, log, score), *verb(runs, gpus, backends, vgpu, vmeasure),
                    dl, db, *limits(runs, task, kind, dval, bval), maxima)

        limit_max = gr.State(None)  # (deadline, budget) maxima last sent to the sliders
        view_in = F + T + P + V + [limit_kind]
        view_out = board_out + plot_out + verb_out + [deadline, budget] + limits_out + [limit_max]
        for comp in F:
            comp.input(on_filter, view_in, view_out, api_name=False)

        def refresh(*args):
            *view_args, dl_now, db_now, maxima, old_runs, old_gpus, old_backends, detail_run, c_run_now, last = args
            runs, gpus, task, backends = view_args[:4]
            agg = folder.aggregates()
            all_runs, all_gpus, all_tasks, all_backends = choices(agg)
            manifests = {r: folder.manifest(r) for r in all_runs}
            status = f"{live_status(agg, manifests) if all_runs else no_runs}{set_aside_note(folder.set_aside())}"
            state = (folder.version(), status)
            if last is not None and state == last:  # nothing new: send nothing
                return tuple(SKIP() for _ in refresh_out)
            # keep the user's choices; new runs come in ticked, new GPUs only where none is ticked
            runs = [r for r in all_runs if r in (runs or []) or r not in (old_runs or [])]
            gpus = [g for g in all_gpus if g in (gpus or [])] or _default_gpus(agg)
            backends = [b for b in all_backends if b in (backends or []) or b not in (old_backends or [])]
            task = task if task in all_tasks else ("chat" if "chat" in all_tasks else (all_tasks[0] if all_tasks
                                                                                       else None))
            same_choices = (all_runs == (old_runs or []) and all_gpus == (old_gpus or [])
                            and all_backends == (old_backends or []) and detail_run is not None)
            # The same view with new rows keeps the limits the user set.
            kept = (dl_now, db_now, maxima) if same_choices else None
            shown = on_filter(runs, gpus, task, backends, *view_args[4:], kept=kept)
            if same_choices:  # leave the filter widgets alone: a re-render would close an open menu
                widgets = (SKIP(),) * 4
                detail = (SKIP(),) * (3 + len(detail_out))
                comp = (SKIP(),) * (3 + len(compare_out))
            else:
                widgets = (gr.CheckboxGroup(choices=all_runs, value=runs), gr.CheckboxGroup(choices=all_gpus, value=gpus),
                           gr.Radio(choices=all_tasks, value=task), gr.CheckboxGroup(choices=all_backends, value=backends))
                per_request = per_request_runs(agg, manifests)
                run = detail_run if detail_run in per_request else (per_request[0] if per_request else None)
                detail = (gr.Dropdown(choices=per_request, value=run), *detail_pick(run, None, None))
                crun = c_run_now if c_run_now in per_request else run
                comp = compare_pick(crun, None)
            stamp = f"  \n_last change seen {time.strftime('%H:%M:%S')}_"
            return (*widgets, *shown, status + stamp, *detail, *comp, about_runs(manifests),
                    all_runs, all_gpus, all_backends, state)

        known_runs = gr.State(runs0)
        known_gpus = gr.State(gpus0)
        known_backends = gr.State(backends0)
        refresh_in = view_in + [deadline, budget, limit_max, known_runs, known_gpus, known_backends, d_run, c_run,
                                seen]
        refresh_out = ([runs_in, gpus_in, task_in, backends_in] + view_out + [live, d_run, d_model, d_task]
                       + detail_out + [c_run, c_task, c_models] + compare_out + [about, known_runs, known_gpus, known_backends, seen])

        # -- controls of one view redraw that view only ---------------------------------------
        for comp in (columns_in, rank_in):
            comp.input(board, F + T, board_out, api_name=False)
        for comp in P:
            comp.input(plots, [filtered] + P, plot_out, api_name=False)
        for comp in V:
            comp.input(verb, [runs_in, gpus_in, backends_in] + V, verb_out, api_name=False)

        def on_kind(runs, task, kind):
            dl, db, (dval, bval), maxima = limit_ranges(runs, task, kind)
            return dl, db, *limits(runs, task, kind, dval, bval), maxima

        limit_kind.input(on_kind, [runs_in, task_in, limit_kind], [deadline, budget] + limits_out + [limit_max],
                         api_name=False)
        for comp in (deadline, budget):
            comp.release(limits, [runs_in, task_in] + L, limits_out, api_name=False)

        def add_column(name, formula, custom_cols, runs, gpus, task, backends, columns, rank_by):
            name = (name or "").strip()
            df = with_custom_columns(selected(runs, gpus, task, backends), custom_cols)
            try:  # refuse before anything changes
                refused = "Column refused"
                if not name:
                    raise FormulaError("give the column a name")
                check_column_name(name, df)
                refused = "Formula refused"
                evaluate(formula, df)
            except FormulaError as exc:
                return (custom_cols, f"⚠️ {refused}: {exc}", gr.Dropdown(), gr.Dropdown(),
                        *board(runs, gpus, task, backends, custom_cols, columns, rank_by))
            custom_cols = custom_cols + [(name, formula)]
            b = board(runs, gpus, task, backends, custom_cols, columns, rank_by)
            nums = numeric_columns(b[3])
            return (custom_cols, f"Added column **{name}** = `{formula}`", gr.Dropdown(choices=nums),
                    gr.Dropdown(choices=nums), *b)

        add_col.click(add_column, [col_name, col_formula, custom] + F + [columns_in, rank_in],
                      [custom, col_msg, x_in, y_in] + board_out, api_name="add_column")

        # -- model detail and compare -----------------------------------------------------------
        d_run.input(detail_pick, [d_run, d_model, d_task], [d_model, d_task] + detail_out, api_name=False)
        for comp in (d_model, d_task):
            comp.input(model_detail, [d_run, d_model, d_task], detail_out, api_name=False)

        def open_detail(df: pd.DataFrame, evt: gr.SelectData):
            """A click on a leaderboard row: that model's detail, in a run with its rows."""
            nothing = (SKIP(),) * (4 + len(detail_out))
            if df is None or df.empty or evt.index is None:
                return nothing
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            shown = _link_text((evt.row_value or [None])[0]) if evt.row_value else None
            pick = df.iloc[row] if row < len(df) and (shown is None or df.iloc[row]["model"] == shown) else None
            model = pick["model"] if pick is not None else shown
            agg = folder.aggregates()
            held = agg[(agg["model"] == model) & agg["run_id"].isin(d_run_choices())]
            if held.empty:  # e.g. a model of the imported 2023 results: published means only
                return (gr.Tabs(selected="detail"), SKIP(), SKIP(), SKIP(),
                        *detail.nothing(f"**{model}**: no run in this folder holds its per-request rows (imported "
                                        f"results hold means only): no distributions to show."))
            run = pick["run_id"] if pick is not None and pick["run_id"] in set(held["run_id"]) else held["run_id"].iloc[0]
            task = pick["task"] if pick is not None else None
            return (gr.Tabs(selected="detail"), gr.Dropdown(value=run), *detail_pick(run, model, task))

        table.select(open_detail, [filtered], [tabs, d_run, d_model, d_task] + detail_out, api_name=False)

        def compare_pick(run_id, task):
            jobs = folder.jobs(run_id) if run_id else None
            if not jobs or not jobs[0]:
                return (gr.Dropdown(value=run_id), gr.Dropdown(choices=[], value=None),
                        gr.Dropdown(choices=[], value=[]), *compare(None, None, None))
            models, tasks = jobs
            task = task if task in tasks else ("chat" if "chat" in tasks else tasks[0])
            pick = models[:3]
            return (gr.Dropdown(choices=sorted(set(d_run_choices())), value=run_id),
                    gr.Dropdown(choices=tasks, value=task), gr.Dropdown(choices=models, value=pick),
                    *compare(run_id, task, pick))

        def d_run_choices():
            agg = folder.aggregates()
            return per_request_runs(agg, {r: folder.manifest(r) for r in agg["run_id"].unique()})

        c_run.input(lambda r, t: compare_pick(r, t)[1:], [c_run, c_task], [c_task, c_models] + compare_out,
                    api_name=False)
        for comp in (c_task, c_models):
            comp.input(compare, [c_run, c_task, c_models], compare_out, api_name=False)

        timer = gr.Timer(refresh_s)
        timer.tick(refresh, refresh_in, refresh_out, api_name=False, show_progress="hidden")
        demo.load(refresh, refresh_in, refresh_out, api_name="refresh")
    return demo
