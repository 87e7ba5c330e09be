"""Vega-Lite specs for the page's charts, handed to gr.Plot as they are.

Gradio's native plots have no log scale, no layers (a Pareto line over the points) and
no grouped bars; Vega-Lite, which gr.Plot already renders, has all three. No Gradio
here: each function takes a frame and returns a spec (a dict), or None when there is
nothing to draw.
"""

from __future__ import annotations

import json
import math

import pandas as pd

# Axis titles with units, by column.
UNITS = {
    "parameters": "parameters (billions)",
    "energy": "energy per response (J)",
    "energy_per_token": "energy per token (J)",
    "energy_above_idle": "energy above idle per response (J)",
    "throughput": "throughput (tokens/s)",
    "response_length": "response length (tokens)",
    "latency": "latency per response (s)",
    "ttft": "time to first token (s)",
    "responses": "responses",
    "arc": "ARC score (2023)",
    "hellaswag": "HellaSwag score (2023)",
    "truthfulqa": "TruthfulQA score (2023)",
    "quality": "mean of ARC, HellaSwag, TruthfulQA (2023)",
}
# Tableau 10, then 10 more: a GPU (or model) keeps its colour whatever the filters show,
# because every chart maps the same sorted list of all names onto this list.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
WIDTH = "container"  # the chart takes its place's width, down to a phone's
_PAD = {"left": 8, "top": 36, "right": 8, "bottom": 8}  # top: clear of the component's label


def axis_title(col: str) -> str:
    return UNITS.get(col, col)


def to_json(spec: dict) -> str:
    return json.dumps(spec, allow_nan=False)


def _records(df: pd.DataFrame) -> list[dict]:
    # NaN is not JSON: the charts drop rows without their figures before this.
    return json.loads(df.to_json(orient="records"))


def _scale(log: bool) -> dict:
    # Pixel padding keeps points at the edge of the domain whole.
    return {"type": "log", "padding": 10} if log else {"zero": False, "nice": True, "padding": 10}


def _colour(field: str, domain: list[str] | None, title: str | None = None) -> dict:
    enc = {"field": field, "type": "nominal", "title": title or field}
    if domain:
        enc["scale"] = {"domain": domain, "range": [PALETTE[i % len(PALETTE)] for i in range(len(domain))]}
    return enc


def _base(height: int = 340, width: int = WIDTH) -> dict:
    return {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": width, "height": height,
            "autosize": {"type": "fit", "contains": "padding"}, "padding": _PAD}


def _num(v) -> str:
    return f"{v:.4g}"


def _listed(items: list[str], most: int = 12) -> str:
    """A text alternative's list, cut short where a chart holds many marks."""
    more = len(items) - most
    return "; ".join(items[:most]) + (f"; and {more} more" if more > 0 else "")


def _described(spec: dict, text: str) -> dict:
    # Vega turns the top-level description into the chart's aria-label: the text
    # a screen reader gives for what is otherwise a canvas.
    return {**spec, "description": text}


def _spread(data: pd.DataFrame, field: str, group: str) -> list[str]:
    """Per group: how many values, their median and range."""
    return [f"{g}: {len(d)} responses, median {_num(d[field].median())}, from {_num(d[field].min())} "
            f"to {_num(d[field].max())}" for g, d in data.groupby(group, sort=True)]


def _positive(df: pd.DataFrame, cols: list[str], log: bool) -> pd.DataFrame:
    df = df.dropna(subset=cols)
    if log:  # a log axis cannot place 0 or less
        for c in cols:
            df = df[df[c] > 0]
    return df


def scatter(df: pd.DataFrame, x: str, y: str, colour: str | None, domain: list[str] | None, log: bool = False,
            tooltip: list[str] = ("model", "gpu", "backend", "task", "run_id")) -> dict | None:
    cols = list(dict.fromkeys([*tooltip, x, y] + ([colour] if colour else [])))
    data = _positive(df[[c for c in cols if c in df]], [x, y], log)
    if data.empty:
        return None
    enc = {"x": {"field": x, "type": "quantitative", "title": axis_title(x), "scale": _scale(log)},
           "y": {"field": y, "type": "quantitative", "title": axis_title(y), "scale": _scale(log)},
           "tooltip": [{"field": c, "type": "quantitative" if pd.api.types.is_numeric_dtype(data[c]) else "nominal",
                        **({"format": ".4g"} if pd.api.types.is_numeric_dtype(data[c]) else {})}
                       for c in data.columns]}
    if colour:
        if pd.api.types.is_numeric_dtype(data[colour]):
            enc["color"] = {"field": colour, "type": "quantitative", "title": axis_title(colour)}
        else:
            enc["color"] = _colour(colour, domain)
    spec = {**_base(), "data": {"values": _records(data)}, "mark": {"type": "point", "filled": True, "size": 70},
            "encoding": enc}
    name = (lambda r: f"{r['model']} on {r['gpu']}") if {"model", "gpu"} <= set(data) else (lambda r: "a point")
    low, high = data.loc[data[y].idxmin()], data.loc[data[y].idxmax()]
    return _described(spec, f"Scatter of {axis_title(y)} against {axis_title(x)}, {len(data)} points. Lowest "
                            f"{axis_title(y)}: {name(low)}, {_num(low[y])}; highest: {name(high)}, {_num(high[y])}.")


def pareto(df: pd.DataFrame, domain: list[str], log: bool = False) -> dict | None:
    """Latency vs energy, coloured by GPU, each model's Pareto front across its
    configurations drawn as a line (df has a boolean `front` column)."""
    data = _positive(df, ["latency", "energy"], log)
    if data.empty:
        return None
    x = {"field": "latency", "type": "quantitative", "title": axis_title("latency"), "scale": _scale(log)}
    y = {"field": "energy", "type": "quantitative", "title": axis_title("energy"), "scale": _scale(log)}
    colour = _colour("gpu", domain, "GPU")
    tip = [{"field": c, "type": "nominal"} for c in ("model", "gpu", "backend", "task", "run_id")] + [
        {"field": "latency", "type": "quantitative", "format": ".3g"},
        {"field": "energy", "type": "quantitative", "format": ".4g"}]
    front = data[data["front"].astype(bool)].sort_values(["model", "latency"])
    text = (f"Latency against energy per response for {len(data)} configurations of {data['model'].nunique()} "
            f"model(s). On each model's Pareto front: " + _listed(
                [f"{r.model} on {r.gpu} with {r.backend}, {_num(r.latency)} s and {_num(r.energy)} J"
                 for r in front.itertuples()]) + ".")
    return _described({**_base(), "data": {"values": _records(data)}, "layer": [
        {"transform": [{"filter": "datum.front"}], "mark": {"type": "line", "strokeWidth": 2, "color": "#888"},
         "encoding": {"x": x, "y": y, "detail": {"field": "model", "type": "nominal"},
                      "order": {"field": "latency", "type": "quantitative"}}},
        {"mark": {"type": "point", "filled": True, "size": 70},
         "encoding": {"x": x, "y": y, "color": colour, "tooltip": tip,
                      "shape": {"field": "front", "type": "nominal", "title": "on the front",
                                "scale": {"domain": [True, False], "range": ["diamond", "circle"]}}}},
    ]}, text)


def concurrency_curves(df: pd.DataFrame, log: bool = False) -> dict | None:
    """Time per output token against energy per token, a line per model configuration (run,
    GPU, backend) through its concurrency levels, each point labelled with its level: the
    trade-off of serving more requests at once. `df` has `time_per_token`."""
    data = _positive(df, ["time_per_token", "energy_per_token"], log)
    if data.empty or data["concurrency"].nunique() < 2:
        return None
    data = data.assign(config=data["model"] + " / " + data["gpu"].astype(str) + " / " + data["backend"].astype(str)
                       + " / " + data["run_id"].astype(str))
    x = {"field": "time_per_token", "type": "quantitative", "title": "time per output token (s)", "scale": _scale(log)}
    y = {"field": "energy_per_token", "type": "quantitative", "title": axis_title("energy_per_token"),
         "scale": _scale(log)}
    colour = {"field": "model", "type": "nominal", "title": "model"}
    tip = [{"field": c, "type": "nominal"} for c in ("model", "gpu", "backend", "run_id")] + [
        {"field": "concurrency", "type": "quantitative", "title": "in flight"},
        {"field": "time_per_token", "type": "quantitative", "format": ".3g", "title": "time per token (s)"},
        {"field": "energy_per_token", "type": "quantitative", "format": ".4g", "title": "J/token"}]
    text = "Energy per token against time per output token, a line per configuration through its requests " \
           "in flight: " + _listed([
               f"{cfg}: " + ", ".join(f"{int(r.concurrency)} in flight {_num(r.time_per_token)} s and "
                                      f"{_num(r.energy_per_token)} J" for r in d.sort_values("concurrency").itertuples())
               for cfg, d in data.groupby("config", sort=True)], most=6) + "."
    return _described({**_base(), "data": {"values": _records(data)}, "layer": [
        {"mark": {"type": "line", "strokeWidth": 2},
         "encoding": {"x": x, "y": y, "color": colour, "detail": {"field": "config", "type": "nominal"},
                      "order": {"field": "concurrency", "type": "quantitative"}}},
        {"mark": {"type": "point", "filled": True, "size": 60}, "encoding": {"x": x, "y": y, "color": colour,
                                                                             "tooltip": tip}},
        {"mark": {"type": "text", "dx": 8, "dy": -8, "fontSize": 11},
         "encoding": {"x": x, "y": y, "text": {"field": "concurrency", "type": "quantitative"}}},
    ]}, text)


def verbosity_bars(v: pd.DataFrame, measure: str) -> dict | None:
    """One bar per (model, task pair), the pairs side by side (grouped, not stacked)."""
    data = v.dropna(subset=[measure])
    if data.empty:
        return None
    data = data[["label", "pair", measure]].rename(columns={measure: "saved"})
    x = {"field": "label", "type": "nominal", "title": None, "sort": None,
         "axis": {"labelAngle": -35, "labelLimit": 320, "labelOverlap": False}}
    enc = {"x": x, "xOffset": {"field": "pair", "type": "nominal"},
           "y": {"field": "saved", "type": "quantitative", "title": f"{measure} by the concise prompt", "stack": None,
                 "axis": {"grid": True}},
           "color": _colour("pair", ["chat vs chat-concise", "instruct vs instruct-concise"], "task pair")}
    # A value's label sits beyond its bar's end: above a saving, below a negative one.
    text = {"mark": {"type": "text", "fontSize": 10, "color": "#333"},
            "encoding": {**{k: v for k, v in enc.items() if k != "color"},
                         "text": {"field": "saved", "type": "quantitative", "format": ".1f"},
                         "yOffset": {"condition": {"test": "datum.saved < 0", "value": 10}, "value": -6}}}
    bars = {"mark": {"type": "bar"}, "encoding": {**enc, "tooltip": [
        {"field": "label", "title": "model"}, {"field": "pair"},
        {"field": "saved", "type": "quantitative", "format": ".1f", "title": measure}]}}
    words = f"{measure} by the concise prompt, per model and task pair: " + _listed(
        [f"{r.label}, {r.pair}: {r.saved:.1f}" for r in data.itertuples()], most=20) + "."
    return _described({**_base(380), "data": {"values": _records(data)}, "layer": [bars, text]}, words)


def distributions(rows: pd.DataFrame, field: str, group: str, title: str, domain: list[str] | None = None,
                  log: bool = False, width: int = WIDTH) -> dict | None:
    """Histogram of per-request values, one colour per group (overlaid, see-through);
    Vega-Lite bins them, so the page receives the values and nothing else."""
    data = _positive(rows[[group, field]], [field], log)
    if data.empty:
        return None
    groups = data[group].nunique()
    words = f"Histogram of {title}, per {group}: " + _listed(_spread(data, field, group)) + "."
    x = {"field": field, "bin": {"maxbins": 30}, "title": title}
    if log:  # bins of equal width on a log axis: bin the logarithm
        data = data.assign(**{field: data[field].map(math.log10)})
        x = {"field": field, "bin": {"maxbins": 30}, "title": f"log10 {title}"}
    return _described({**_base(260, width), "data": {"values": _records(data)},
                       "mark": {"type": "bar", "opacity": 0.55 if groups > 1 else 0.9, "binSpacing": 0},
                       "encoding": {"x": x, "y": {"aggregate": "count", "title": "responses", "stack": None},
                                    "color": _colour(group, domain or sorted(data[group].unique())),
                                    "tooltip": [{"field": group}, {"aggregate": "count", "title": "responses"}]}},
                      words)


def boxes(rows: pd.DataFrame, field: str, group: str, title: str, domain: list[str], log: bool = False,
          means: pd.DataFrame | None = None) -> dict | None:
    """Per group, a box of the per-request values (side by side); `means` (group, field):
    groups known only by their mean (an imported leaderboard), drawn as a point."""
    data = _positive(rows[[group, field]], [field], log) if not rows.empty else rows
    points = _positive(means[[group, field]], [field], log) if means is not None and not means.empty else None
    if data.empty and points is None:
        return None
    x = {"field": group, "type": "nominal", "title": None, "sort": domain, "axis": {"labelAngle": -20, "labelLimit": 200}}
    y = {"field": field, "type": "quantitative", "title": title, "scale": _scale(log), "axis": {"format": "~g"}}
    tip = {"field": field, "type": "quantitative", "format": ".4~g", "title": title}
    layers = []
    if not data.empty:
        layers.append({"data": {"values": _records(data)}, "mark": {"type": "boxplot", "extent": 1.5},
                       "encoding": {"x": x, "y": y, "color": {**_colour(group, domain), "legend": None},
                                    "tooltip": [{"field": group}, tip]}})
    if points is not None:
        layers.append({"data": {"values": _records(points)}, "mark": {"type": "point", "shape": "diamond", "size": 120,
                                                                       "filled": True},
                       "encoding": {"x": x, "y": y, "color": {**_colour(group, domain), "legend": None},
                                    "tooltip": [{"field": group}, {**tip, "title": f"mean {title} (no per-response "
                                                                                   f"values)"}]}})
    items = _spread(data, field, group) if not data.empty else []
    if points is not None:
        items += [f"{r[group]}: mean {_num(r[field])}, no per-response values" for _, r in points.iterrows()]
    return _described({**_base(300), "layer": layers}, f"{title}, per {group}: {_listed(items)}.")


def timeline(samples: pd.DataFrame, requests: pd.DataFrame, width: int = WIDTH) -> dict | None:
    """Power over time (a step line per GPU: each reading holds until the next sample),
    requests shaded from start to end, and a rule at each first token (prefill | decode).
    `samples`: t_s, gpu, power_w; `requests`: start_s, first_token_s, end_s, prompt_id."""
    if samples.empty:
        return None
    line = {"mark": {"type": "line", "interpolate": "step-after", "strokeWidth": 1.5},
            "data": {"values": _records(samples)},
            "encoding": {"x": {"field": "t_s", "type": "quantitative", "title": "time since the first request shown (s)"},
                         "y": {"field": "power_w", "type": "quantitative", "title": "GPU power (W)",
                               "scale": {"zero": True}},
                         "color": {"field": "gpu", "type": "nominal", "title": "GPU"},
                         "tooltip": [{"field": "gpu"}, {"field": "t_s", "format": ".3f", "title": "s"},
                                     {"field": "power_w", "format": ".0f", "title": "W"}]}}
    reqs = _records(requests)
    shade = {"mark": {"type": "rect", "opacity": 0.12, "color": "#4e79a7"}, "data": {"values": reqs},
             "encoding": {"x": {"field": "start_s", "type": "quantitative"}, "x2": {"field": "end_s"},
                          "tooltip": [{"field": "prompt_id", "title": "request"},
                                      {"field": "prefill_j", "format": ".2f", "title": "prefill J"},
                                      {"field": "decode_j", "format": ".1f", "title": "decode J"}]}}
    first = {"mark": {"type": "rule", "strokeDash": [3, 3], "color": "#e15759"}, "data": {"values": reqs},
             "encoding": {"x": {"field": "first_token_s", "type": "quantitative"}}}
    span = samples["t_s"].max() - samples["t_s"].min()
    words = (f"GPU power over {span:.1f} s: {len(samples)} samples, median {samples['power_w'].median():.0f} W, "
             f"highest {samples['power_w'].max():.0f} W; {len(requests)} request(s) shaded from start to end, "
             f"a dashed rule at each first token.")
    return _described({**_base(300, width), "layer": [shade, first, line]}, words)
