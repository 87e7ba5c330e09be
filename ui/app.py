"""The Gradio page: the filters above, one tab per view (ui/tabs/), and how they are wired.

A timer looks at the runs folder every few seconds (a directory listing per run) and
sends a view again only when what it shows changed: an idle tab gets an empty update.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from ui.data import RunsFolder, one_at_a_time
from ui.tabs import about, compare, detail, leaderboard, limits, plots, verbosity
from ui.views import about_runs, live_status, numeric_columns, set_aside_note

INTRO = (
    "GPU energy per LLM response, measured under identical conditions (batch size 1, the model's own chat "
    "template, one system prompt per task). One GPU at a time ranks models on equal terms; tick more GPUs to "
    "compare them. What each column means is under the table; how it is measured, in **About**."
)
SKIP = gr.skip
# For launch(css=CSS): a number or a word never breaks inside itself; a table wider than its
# place scrolls sideways inside it; charts take their container's width.
_TABLES = ("#leaderboard", "#limits-table", "#verbosity", "#compare-table", "#detail-samples")
CSS = (", ".join(f"{t} td, {t} th, {t} th *" for t in _TABLES)
       + " { white-space: nowrap; overflow-wrap: normal; word-break: keep-all; } "
       "#leaderboard td:nth-child(2) { white-space: normal; word-break: normal; min-width: 9em; } "
       "#leaderboard td:last-child { white-space: normal; word-break: normal; min-width: 14em; max-width: 28em; } "
       "#detail-samples td { word-break: normal; } "
       "#leaderboard .table-wrap, #limits-table .table-wrap, #verbosity .table-wrap, #compare-table .table-wrap, "
       "#detail-samples .table-wrap { overflow-x: auto; } "
       ".gradio-container .vega-embed { width: 100% !important; } "
       # A heading for screen readers only: the tab's own button already says it on screen.
       ".sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); "
       "white-space: nowrap; }")


def _choices(agg: pd.DataFrame) -> tuple[list, list, list, list]:
    def values(col):
        return sorted(agg[col].dropna().unique().tolist()) if col in agg else []

    return values("run_id"), values("gpu"), values("task"), values("runtime")


def _newest_run(agg: pd.DataFrame, manifests: dict) -> str | None:
    """The per-request run started last (what a user just made), else any run."""
    sweeps = {r: (m.get("started_at") or "") for r, m in manifests.items() if m.get("kind") != "aggregate-only"}
    sweeps = {r: t for r, t in sweeps.items() if r in set(agg["run_id"])}
    if sweeps:
        return max(sweeps, key=lambda r: (sweeps[r], r))
    return agg["run_id"].iloc[0] if len(agg) else None


def _default_gpus(agg: pd.DataFrame, run: str | None = None) -> list[str]:
    """One GPU, so a model is listed once: of the newest run where there is one, the one with
    the most measured (model, task) figures."""
    if agg.empty:
        return []
    sub = agg[agg["run_id"] == run] if run is not None and (agg["run_id"] == run).any() else agg
    counts = sub.assign(m=sub["energy"].notna()).groupby("gpu").agg(m=("m", "sum"), n=("m", "size"))
    return [counts.sort_values(["m", "n"], ascending=False).index[0]]


def _per_request_runs(agg: pd.DataFrame, manifests: dict) -> list[str]:
    """Runs with per-request rows, those with energy first (the model detail opens on one)."""
    runs = [r for r in sorted(manifests) if manifests[r].get("kind") != "aggregate-only"]
    measured = set(agg.loc[agg["energy"].notna(), "run_id"])
    return sorted(runs, key=lambda r: r not in measured)


@dataclass
class _Page:
    """The page's components and the runs folder its handlers read."""

    folder: RunsFolder
    csv_dir: Path
    no_runs: str
    filters: list  # runs, gpus, task, backends
    custom: gr.State
    filtered: gr.State
    board: leaderboard.Leaderboard
    lim: limits.Limits
    plot: plots.Plots
    verb: verbosity.Verbosity
    det: detail.Detail
    comp: compare.Compare
    about: gr.Markdown
    live: gr.Markdown
    tabs: gr.Tabs
    seen: gr.State  # (what the folder looked like, status) when this tab was last sent views
    # (deadline, budget, (their maxima)) last applied. The timer reads the limits from here,
    # not from the sliders: a slider's value on the page can be older than the range a filter
    # change just gave it, and Gradio refuses an event with a value out of range.
    limits_applied: gr.State
    known_runs: gr.State  # the choices of the filters last sent
    known_gpus: gr.State
    known_backends: gr.State

    def run_choices(self) -> list[str]:
        agg = self.folder.aggregates()
        return _per_request_runs(agg, {r: self.folder.manifest(r) for r in agg["run_id"].unique()})

    # -- every view at once, for a change of the filters ------------------------------------
    def view_inputs(self) -> list:
        return (self.filters + [self.custom, self.board.columns_in, self.board.rank_in] + self.plot.controls
                + [self.verb.gpu, self.verb.measure, self.lim.kind])

    def view_outputs(self) -> list:
        b = self.board
        return ([b.notice, b.table, b.download, self.filtered] + self.plot.outputs + self.verb.outputs
                + [self.lim.deadline, self.lim.budget, self.lim.table, self.lim.note, self.limits_applied])

    def views(self, runs, gpus, task, backends, custom_cols, columns, rank_by, x, y, colour, log, score,
              vgpu, vmeasure, kind, kept=None):
        f = self.folder
        b = leaderboard.board(f, self.csv_dir, runs, gpus, task, backends, custom_cols, columns, rank_by)
        dl, db, (dval, bval), maxima = limits.ranges(f, runs, gpus, task, backends, kind, kept)
        return (*b, *plots.view(f, b[3], x, y, colour, log, score), *verbosity.view(f, runs, gpus, backends, vgpu,
                                                                                  vmeasure),
                dl, db, *limits.view(f, runs, gpus, task, backends, kind, dval, bval), (dval, bval, maxima))

    # -- the timer: what changed in the runs folder ---------------------------------------------
    def refresh_inputs(self) -> list:
        return self.view_inputs() + [self.limits_applied, self.known_runs,
                                     self.known_gpus, self.known_backends, self.det.run, self.comp.run, self.seen]

    def refresh_outputs(self) -> list:
        return (self.filters + self.view_outputs() + [self.live, self.det.run, self.det.model, self.det.task]
                + self.det.outputs + [self.comp.run, self.comp.task, self.comp.models] + self.comp.outputs
                + [self.about, self.known_runs, self.known_gpus, self.known_backends, self.seen])

    def refresh(self, *args):
        *view_args, applied, old_runs, old_gpus, old_backends, detail_run, c_run_now, last = args
        runs, gpus, task, backends = view_args[:4]
        f = self.folder
        agg = f.aggregates()
        all_runs, all_gpus, all_tasks, all_backends = _choices(agg)
        manifests = {r: f.manifest(r) for r in all_runs}
        status = f"{live_status(agg, manifests) if all_runs else self.no_runs}{set_aside_note(f.set_aside())}"
        state = (f.version(), status)
        if last is not None and state == last:  # nothing new: send nothing
            return tuple(SKIP() for _ in self.refresh_outputs())
        # keep the user's choices; new runs come in ticked, new GPUs only where none is ticked
        runs = [r for r in all_runs if r in (runs or []) or r not in (old_runs or [])]
        gpus = [g for g in all_gpus if g in (gpus or [])] or _default_gpus(agg, _newest_run(agg, manifests))
        # A runtime seen for the first time is ticked where it serves one request at a time.
        backends = [b for b in all_backends if b in (backends or []) or (b not in (old_backends or [])
                                                                          and one_at_a_time(b))]
        task = task if task in all_tasks else ("chat" if "chat" in all_tasks else (all_tasks[0] if all_tasks else None))
        same_choices = (all_runs == (old_runs or []) and all_gpus == (old_gpus or [])
                        and all_backends == (old_backends or []) and detail_run is not None)
        # The same view with new rows keeps the limits the user set.
        kept = applied if same_choices else None
        shown = self.views(runs, gpus, task, backends, *view_args[4:], kept=kept)
        if same_choices:  # leave the filter widgets alone: a re-render would close an open menu
            widgets = (SKIP(),) * 4
            det = (SKIP(),) * (3 + len(self.det.outputs))
            comp = (SKIP(),) * (3 + len(self.comp.outputs))
        else:
            widgets = (gr.CheckboxGroup(choices=all_runs, value=runs), gr.CheckboxGroup(choices=all_gpus, value=gpus),
                       gr.Radio(choices=all_tasks, value=task), gr.CheckboxGroup(choices=all_backends, value=backends))
            per_request = _per_request_runs(agg, manifests)
            run = detail_run if detail_run in per_request else (per_request[0] if per_request else None)
            det = (gr.Dropdown(choices=per_request, value=run), *detail.pick(f, run, None, None))
            crun = c_run_now if c_run_now in per_request else run
            comp = compare.pick(f, per_request, crun, None)
        stamp = f"  \n_last change seen {time.strftime('%H:%M:%S')}_"
        return (*widgets, *shown, status + stamp, *det, *comp, about_runs(manifests),
                all_runs, all_gpus, all_backends, state)


# A control's event runs again with the latest values when it was used while its last run
# was pending: Gradio's default for input events drops that second use, so a quick second
# click on a filter would leave the view showing the first.
LATEST = {"api_name": False, "trigger_mode": "always_last"}


def _heading(text: str) -> None:
    gr.Markdown(f"## {text}", elem_classes=["sr-only"])


def _layout(folder: RunsFolder, runs_root) -> _Page:
    """The components, in the page's order (inside a gr.Blocks)."""
    agg0 = folder.aggregates()
    runs0, gpus0, tasks0, backends0 = _choices(agg0)
    newest = _newest_run(agg0, {r: folder.manifest(r) for r in runs0})
    candidates = (sorted(agg0.loc[agg0["run_id"] == newest, "task"].unique()) if newest else []) or tasks0
    task0 = "chat" if "chat" in candidates else (candidates[0] if candidates else None)
    nums0 = numeric_columns(agg0) or ["parameters", "energy"]
    custom, filtered = gr.State([]), gr.State(pd.DataFrame())  # [(name, formula)]; the view's frame
    gr.Markdown("# LLM energy leaderboard\n" + INTRO)
    live = gr.Markdown(elem_id="live-status")
    with gr.Row():
        runs_in = gr.CheckboxGroup(runs0, value=runs0, label="Runs", elem_id="runs-filter")
        gpus_in = gr.CheckboxGroup(gpus0, value=_default_gpus(agg0, newest), label="GPUs", elem_id="gpus-filter")
        backends_in = gr.CheckboxGroup(backends0, value=[b for b in backends0 if one_at_a_time(b)],
                                       label="Backends (xN: N requests in flight)", elem_id="backends-filter")
        task_in = gr.Radio(tasks0, value=task0, label="Task", elem_id="task-filter")
    filters = [runs_in, gpus_in, task_in, backends_in]  # the order every handler takes them in
    with gr.Tabs(elem_id="tabs") as tabs:
        with gr.Tab("Leaderboard", id="board"):
            _heading("Leaderboard")
            board = leaderboard.build(nums0)
        with gr.Tab("Under limits", id="limits"):
            _heading("Under limits")
            lim = limits.build()
        with gr.Tab("Plots", id="plots"):
            _heading("Plots")
            plot = plots.build(nums0)
        with gr.Tab("Verbosity", id="verbosity"):
            _heading("Verbosity")
            verb = verbosity.build()
        with gr.Tab("Model detail", id="detail"):
            _heading("Model detail")
            det = detail.build()
        with gr.Tab("Compare", id="compare"):
            _heading("Compare")
            comp = compare.build()
        with gr.Tab("About", id="about"):
            _heading("About")
            about_runs_md = about.build()
    no_runs = (f"**No runs yet in `{runs_root}`.** Make one with `python -m sweep --config models.yaml --out "
               f"{runs_root}`, or add the 2023 leaderboard's results with `python -m sweep import-mlenergy "
               f"../shared/data/mlenergy_2023 --out {runs_root}`. They show up here by themselves.")
    return _Page(folder, Path(tempfile.mkdtemp(prefix="sweep-ui-")), no_runs, filters, custom, filtered, board, lim,
                 plot, verb, det, comp, about_runs_md, live, tabs,
                 seen=gr.State(None), limits_applied=gr.State(None),
                 known_runs=gr.State(runs0), known_gpus=gr.State(gpus0), known_backends=gr.State(backends0))


def _wire(p: _Page) -> None:
    """Each control redraws what depends on it; the filters redraw every view."""
    f, b = p.folder, p.board
    F = p.filters
    for comp in F:
        comp.input(p.views, p.view_inputs(), p.view_outputs(), **LATEST)
    board_out = [b.notice, b.table, b.download, p.filtered]

    def board_view(*args):
        return leaderboard.board(f, p.csv_dir, *args)

    for comp in (b.columns_in, b.rank_in):
        comp.input(board_view, F + [p.custom, b.columns_in, b.rank_in], board_out, **LATEST)
    for comp in p.plot.controls:
        comp.input(lambda *a: plots.view(f, *a), [p.filtered] + p.plot.controls, p.plot.outputs, **LATEST)
    for comp in (p.verb.gpu, p.verb.measure):
        comp.input(lambda *a: verbosity.view(f, *a), [F[0], F[1], F[3], p.verb.gpu, p.verb.measure],
                   p.verb.outputs, **LATEST)
    lim = p.lim

    def on_kind(runs, gpus, task, backends, kind, applied):
        # The deadline changes unit; an energy budget the user set stays.
        kept = (None, applied[1], (None, applied[2][1])) if applied and applied[2] else None
        dl, db, (dval, bval), new_max = limits.ranges(f, runs, gpus, task, backends, kind, kept)
        return dl, db, *limits.view(f, runs, gpus, task, backends, kind, dval, bval), (dval, bval, new_max)

    lim.kind.input(on_kind, F + [lim.kind, p.limits_applied],
                   [lim.deadline, lim.budget, lim.table, lim.note, p.limits_applied], **LATEST)

    def on_limit(runs, gpus, task, backends, kind, deadline, budget, applied):
        maxima = applied[2] if applied else None
        return *limits.view(f, runs, gpus, task, backends, kind, deadline, budget), (deadline, budget, maxima)

    for comp in (lim.deadline, lim.budget):
        # input: each value typed, set by the keyboard or dragged through (the last one wins:
        # a key held down sends many); release: a drag's end, or leaving the number box.
        for event in (comp.input, comp.release):
            event(on_limit, F + [lim.kind, lim.deadline, lim.budget, p.limits_applied],
                  [lim.table, lim.note, p.limits_applied],
                  show_progress="hidden", **LATEST)
    b.add_col.click(lambda *a: leaderboard.add_column(f, p.csv_dir, *a),
                    [b.col_name, b.col_formula, p.custom] + F + [b.columns_in, b.rank_in],
                    [p.custom, b.col_msg, p.plot.x, p.plot.y] + board_out, api_name="add_column")
    d = p.det
    d.run.input(lambda *a: detail.pick(f, *a), [d.run, d.model, d.task], [d.model, d.task] + d.outputs,
                **LATEST)
    for comp in (d.model, d.task):
        comp.input(lambda *a: detail.model_detail(f, *a), [d.run, d.model, d.task], d.outputs, **LATEST)
    def open_detail(df: pd.DataFrame, evt: gr.SelectData):  # Gradio passes the click by this annotation
        return detail.open_from_row(f, p.run_choices(), df, evt)

    b.table.select(open_detail, [p.filtered], [p.tabs, d.run, d.model, d.task] + d.outputs, api_name=False)
    c = p.comp
    c.run.input(lambda r, t: compare.pick(f, p.run_choices(), r, t)[1:], [c.run, c.task],
                [c.task, c.models] + c.outputs, **LATEST)
    for comp in (c.task, c.models):
        comp.input(lambda *a: compare.view(f, *a), [c.run, c.task, c.models], c.outputs, **LATEST)


def build_app(runs_root: str | Path, refresh_s: float = 5.0) -> gr.Blocks:
    folder = RunsFolder(Path(runs_root))
    with gr.Blocks(title="sweep leaderboard") as demo:
        page = _layout(folder, runs_root)
        _wire(page)
        timer = gr.Timer(refresh_s)
        timer.tick(page.refresh, page.refresh_inputs(), page.refresh_outputs(), api_name=False, show_progress="hidden")
        demo.load(page.refresh, page.refresh_inputs(), page.refresh_outputs(), api_name="refresh")
    return demo
