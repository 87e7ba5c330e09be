"""The leaderboard tab: the filtered figures ranked, with chosen and custom columns, a CSV."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from ui.data import DISPLAY, RunsFolder
from ui.formula import FormulaError, evaluate
from ui.views import (DEFAULT_COLUMNS, check_column_name, column_choices, column_legend, datatypes, display_table,
                      empty_note, energy_notice, filter_aggregates, numeric_columns, sort_table, with_custom_columns)


@dataclass
class Leaderboard:
    notice: gr.Markdown
    table: gr.Dataframe
    rank_in: gr.Dropdown
    columns_in: gr.Dropdown
    col_name: gr.Textbox
    col_formula: gr.Textbox
    add_col: gr.Button
    col_msg: gr.Markdown
    download: gr.DownloadButton


def build(nums: list[str]) -> Leaderboard:
    notice = gr.Markdown(elem_id="energy-notice")
    table = gr.Dataframe(interactive=False, show_search="filter", elem_id="leaderboard", max_height=600,
                         wrap=True, label="Leaderboard")
    gr.Markdown("_Click a row to open the model's detail._")
    with gr.Row():
        rank_in = gr.Dropdown([(DISPLAY.get(c, c), c) for c in nums if c in DISPLAY], value="energy",
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
    return Leaderboard(notice, table, rank_in, columns_in, col_name, col_formula, add_col, col_msg, download)


def selected(folder: RunsFolder, runs, gpus, task, backends) -> pd.DataFrame:
    return filter_aggregates(folder.aggregates(), runs or [], gpus or [], task, backends or [])


def board(folder: RunsFolder, csv_dir: Path, runs, gpus, task, backends, custom, columns, rank_by) -> tuple:
    """(notice, table, CSV, the filtered frame) of the view."""
    df = with_custom_columns(selected(folder, runs, gpus, task, backends), custom)
    df, label = sort_table(df, rank_by)
    if df["gpu"].nunique() == 1 and columns is not None:  # one GPU: the filter names it, the label too
        label = f"{label} · GPU {df['gpu'].iloc[0]}"
        columns = [c for c in columns if c != "gpu"]
    shown = display_table(df, custom, columns)
    path = csv_dir / "leaderboard.csv"
    df.drop(columns=[c for c in ("url",) if c in df]).to_csv(path, index=False)
    notice = energy_notice(df) if not df.empty else empty_note(folder.aggregates(), runs, gpus, task, backends)
    # Numbers never wrap (CSS); a table wider than the page scrolls inside itself.
    return (notice, gr.Dataframe(value=shown, datatype=datatypes(shown), label=label),
            gr.DownloadButton(value=str(path)), df)


def add_column(folder: RunsFolder, csv_dir: Path, name, formula, custom_cols, runs, gpus, task, backends, columns,
               rank_by) -> tuple:
    """A custom column from a formula, refused with a message before anything changes."""
    name = (name or "").strip()
    df = with_custom_columns(selected(folder, runs, gpus, task, backends), custom_cols)
    try:
        refused = "Column refused"
        if not name:
            raise FormulaError("give the column a name")
        check_column_name(name, df)
        refused = "Formula refused"
        evaluate(formula, df)
    except FormulaError as exc:
        return (custom_cols, f"⚠️ {refused}: {exc}", gr.Dropdown(), gr.Dropdown(),
                *board(folder, csv_dir, runs, gpus, task, backends, custom_cols, columns, rank_by))
    custom_cols = custom_cols + [(name, formula)]
    b = board(folder, csv_dir, runs, gpus, task, backends, custom_cols, columns, rank_by)
    nums = numeric_columns(b[3])
    return (custom_cols, f"Added column **{name}** = `{formula}`", gr.Dropdown(choices=nums), gr.Dropdown(choices=nums),
            *b)
