"""The Under-limits tab: per model, its least-energy GPU and backend within a deadline and
an energy budget."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ui.data import RunsFolder
from ui.views import best_under_limits, filter_aggregates, format_params, limit_maxima

KINDS = ["latency (s)", "time per output token (ms)"]


@dataclass
class Limits:
    kind: gr.Radio
    deadline: gr.Slider
    budget: gr.Slider
    note: gr.Markdown
    table: gr.Dataframe


def build() -> Limits:
    gr.Markdown("Per model, the GPU and backend with the least energy per response among those that meet "
                "a deadline and an energy budget (among the runs, GPUs, task and backends ticked above).")
    with gr.Row():
        kind = gr.Radio(KINDS, value=KINDS[0], label="Deadline on", elem_id="limit-kind")
        deadline = gr.Slider(0, 1, value=1, label="Deadline", elem_id="deadline")
        budget = gr.Slider(0, 1, value=1, label="Energy budget per response (J)", elem_id="budget")
    note = gr.Markdown(elem_id="limits-note")
    table = gr.Dataframe(interactive=False, elem_id="limits-table", wrap=True)
    return Limits(kind, deadline, budget, note, table)


def _in_view(folder: RunsFolder, runs, gpus, task, backends) -> pd.DataFrame:
    """The rows the filters above show: runs, GPUs, task, backends."""
    return filter_aggregates(folder.aggregates(), runs or [], gpus or [], task, backends or [])


def ranges(folder: RunsFolder, runs, gpus, task, backends, kind, kept=None) -> tuple:
    """The limit sliders for this view and the values to apply. `kept`: (deadline,
    budget, the maxima last sent), on a refresh of the same view: a value the user
    moved below its maximum stays (within the new range); one left at its maximum
    follows the new maximum, so new rows are not cut off by a limit nobody set."""
    per_token = kind != KINDS[0]
    dmax, bmax = limit_maxima(_in_view(folder, runs, gpus, task, backends), per_token)
    dval, bval = dmax, bmax
    if kept is not None and kept[2] is not None:
        d_old, b_old, (dmax_old, bmax_old) = kept
        if d_old is not None and dmax_old is not None and d_old < dmax_old:
            dval = min(d_old, dmax)
        if bmax is not None and b_old is not None and bmax_old is not None and b_old < bmax_old:
            bval = min(b_old, bmax)
    deadline = gr.Slider(minimum=0, maximum=dmax, value=dval,
                         label="Deadline: " + ("time per output token (ms)" if per_token else "latency (s)"))
    budget = (gr.Slider(minimum=0, maximum=bmax, value=bval, interactive=True, label="Energy budget per response (J)")
              if bmax is not None else
              gr.Slider(minimum=0, maximum=1, value=1, interactive=False,
                        label="Energy budget: no energy measured in these runs"))
    return deadline, budget, (dval, bval), (dmax, bmax)


def view(folder: RunsFolder, runs, gpus, task, backends, kind, deadline, budget) -> tuple:
    """(table, note) of the models within the limits."""
    df = _in_view(folder, runs, gpus, task, backends)
    if df.empty:
        return pd.DataFrame(), "_Nothing in view._"
    per_token = kind != KINDS[0]
    measured = df["energy"].notna().any()
    best, missed = best_under_limits(df, None if per_token else deadline, deadline if per_token else None,
                                     budget if measured else None)
    table = pd.DataFrame({
        "model": best["model"], "gpu": best["gpu"], "backend": best["backend"], "run": best["run_id"],
        "params": best["parameters"].map(format_params), "energy (J)": best["energy"].round(1),
        "latency (s)": best["latency"].round(2), "ms/token": best["ms_per_token"].round(1),
        "length (tok)": best["response_length"].round(1)})
    unmeasured = sorted(set(df.loc[df["energy"].isna(), "model"]) - set(df.loc[df["energy"].notna(), "model"]))
    missed = [m for m in missed if m not in unmeasured] if measured else missed
    note = (f"**{len(best)}** model(s) within the limits, each at its least-energy GPU and backend."
            + (f" Not within them: {', '.join(missed)}." if missed else "")
            + (f" No energy measured (no budget can apply): {', '.join(unmeasured)}." if unmeasured and measured else "")
            + ("" if measured else " No energy in these runs: ranked by latency."))
    return table, note
