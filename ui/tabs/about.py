"""The About tab: what is measured and how, and what each run's manifest says."""

from __future__ import annotations

import gradio as gr

from ui.views import ABOUT


def build() -> gr.Markdown:
    gr.Markdown(ABOUT)
    return gr.Markdown(elem_id="about-runs")
