"""What the UI's views compute, against hand computations (no browser)."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from sweep.aggregate import finish, partials_of_table
from sweep.record import RESULT_SCHEMA
from tests.helpers import synthetic_rows
from ui import charts
from ui.data import verbosity
from ui.views import (
    DEFAULT_COLUMNS,
    best_under_limits,
    display_table,
    energy_notice,
    format_params,
    missing_note,
    sort_table,
)


def _agg(*jobs):
    return finish(partials_of_table(pa.Table.from_pylist([r for rows in jobs for r in rows], schema=RESULT_SCHEMA)))


def test_verbosity_compares_each_model_with_itself_per_gpu_and_run():
    agg = _agg(
        synthetic_rows("r1", "m", "chat", [300.0, 340.0], [200, 220]),           # mean 320 J, 210 tok
        synthetic_rows("r1", "m", "chat-concise", [150.0, 170.0], [90, 100]),    # 160 J, 95 tok
        synthetic_rows("r1", "m", "instruct", [100.0], [50]),
        synthetic_rows("r1", "m", "instruct-concise", [90.0], [40]),
        # the same model on another GPU and in another run: its own rows, never added in
        synthetic_rows("r1", "m", "chat", [1000.0], [300], gpu_name="NVIDIA A100"),
        synthetic_rows("r1", "m", "chat-concise", [250.0], [100], gpu_name="NVIDIA A100"),
        synthetic_rows("r2", "m", "chat", [90.0], [10]),
        synthetic_rows("r2", "m", "chat-concise", [60.0], [8]),
    )
    v = verbosity(agg).set_index(["run_id", "gpu", "pair"])
    assert len(v) == 4
    # by hand: 1 - 160/320 = 50 %, 1 - 95/210 = 54.76 %, 1 - 90/100 = 10 %, 1 - 250/1000 = 75 %, 1 - 60/90 = 33.3 %
    assert v.loc[("r1", "H200", "chat vs chat-concise"), "energy saved %"] == 50.0
    assert v.loc[("r1", "H200", "chat vs chat-concise"), "length saved %"] == 54.8
    assert v.loc[("r1", "H200", "instruct vs instruct-concise"), "energy saved %"] == 10.0
    assert v.loc[("r1", "A100", "chat vs chat-concise"), "energy saved %"] == 75.0
    assert v.loc[("r2", "H200", "chat vs chat-concise"), "energy saved %"] == 33.3
    assert v.loc[("r1", "H200", "chat vs chat-concise"), "energy (J)"] == 320.0

    # the chart: one bar per (model, pair), side by side, with the table's numbers
    one = verbosity(agg)
    one = one[(one["gpu"] == "H200") & (one["run_id"] == "r1")].assign(label="m")
    spec = charts.verbosity_bars(one, "energy saved %")
    bars = spec["layer"][0]
    assert bars["encoding"]["xOffset"]["field"] == "pair" and bars["encoding"]["y"]["stack"] is None
    values = {(d["label"], d["pair"]): d["saved"] for d in spec["data"]["values"]}
    assert values == {("m", "chat vs chat-concise"): 50.0, ("m", "instruct vs instruct-concise"): 10.0}
    json.dumps(spec, allow_nan=False)


def test_verbosity_of_a_cpu_run_has_lengths_but_no_energy():
    agg = _agg(synthetic_rows("c", "m", "chat", [None, None], [16, 16]),
               synthetic_rows("c", "m", "chat-concise", [None, None], [8, 8]))
    v = verbosity(agg)
    assert v["length saved %"].tolist() == [50.0] and v["energy saved %"].isna().all()
    assert charts.verbosity_bars(v.assign(label="m"), "energy saved %") is None


@pytest.mark.parametrize("billions, shown", [(0.000355, "0.4M"), (0.00126, "1.3M"), (0.41, "410M"), (1.1, "1.1B"),
                                             (6.74, "6.7B"), (13.0, "13B"), (175.0, "175B"), (np.nan, "")])
def test_parameters_under_a_billion_are_shown_in_millions(billions, shown):
    assert format_params(billions) == shown


def test_a_cpu_only_view_says_why_and_ranks_by_latency():
    agg = _agg(synthetic_rows("c", "slow", "chat", [None], [16], gpu_name="CPU", latency=[2.0]),
               synthetic_rows("c", "fast", "chat", [None], [16], gpu_name="CPU", latency=[1.0]))
    agg["energy_note"] = "no GPU energy counter (CPU run)"
    ranked, label = sort_table(agg, "energy")
    assert ranked["model"].tolist() == ["fast", "slow"] and label.startswith("Ranked by latency (s), lowest first")
    assert "no GPU energy counter (CPU run)" in energy_notice(agg) and "models-gpu.yaml" in energy_notice(agg)
    shown = display_table(ranked, [])
    assert "energy (J)" in shown and shown["energy (J)"].isna().all()  # the column stays, empty, with the notice
    assert "needs energy" in missing_note(agg, ["latency", "energy"], "Time vs energy")


def test_ranking_and_columns_by_default():
    agg = _agg(synthetic_rows("r", "a", "chat", [300.0], [100], params_b=0.41),
               synthetic_rows("r", "b", "chat", [200.0], [100], params_b=7))
    ranked, label = sort_table(agg, None)
    assert ranked["model"].tolist() == ["b", "a"] and label.startswith("Ranked by energy (J), lowest first")
    assert display_table(ranked, [])["#"].tolist() == [1, 2] and "# keeps the rank" in label
    ranked, label = sort_table(agg, "throughput")
    assert label.startswith("Ranked by tok/s, highest first")
    # the rank is the row's, whatever order the table is shown in
    shown = display_table(ranked, []).sort_values("model")
    assert dict(zip(shown["model"], shown["#"])) == dict(zip(ranked["model"], ranked["rank"]))
    shown = display_table(agg, [])
    assert len(shown.columns) <= len(DEFAULT_COLUMNS) and "run" not in shown
    assert shown["params"].tolist() == ["410M", "7B"]
    # quality beside the numbers: the interval and the flagged share (in %) by default
    assert {"flagged (%)", "backend"} <= set(shown) and "TTFT (s)" not in shown
    assert shown["flagged (%)"].tolist() == [0.0, 0.0]
    spread = _agg(synthetic_rows("r", "a", "chat", [300.0, 310.0], [100, 100], latency=[0.5, 0.5]))
    assert display_table(spread, [])["95% CI (J)"].tolist() == ["241.5 – 368.5"]
    assert display_table(spread, [])["flagged (%)"].tolist() == [100.0]  # both one-window readings under 1 s
    assert "TTFT (s)" in display_table(agg, [], DEFAULT_COLUMNS + ["ttft"])
    # the run column where it tells rows apart: two runs in view
    two = pd.concat([agg, agg.assign(run_id="r2")], ignore_index=True)
    assert display_table(two, [])["run"].tolist() == ["r", "r", "r2", "r2"]
    failed = agg.assign(validation=["warning", "ok"], validation_detail=["flagged_share: 100% of rows flagged", None])
    assert display_table(failed, [])["check"].tolist() == ["warning: flagged_share: 100% of rows flagged", "ok"]


def test_best_row_per_model_within_a_deadline_and_a_budget():
    agg = _agg(
        # model a: fast and hungry on H200, slow and frugal on A100
        synthetic_rows("r", "a", "chat", [500.0], [100], latency=[1.0]),
        synthetic_rows("r", "a", "chat", [200.0], [100], latency=[4.0], gpu_name="NVIDIA A100"),
        synthetic_rows("r", "b", "chat", [900.0], [100], latency=[2.0]),
    )
    best, missed = best_under_limits(agg, None, None, None)
    assert best.set_index("model")["gpu"].to_dict() == {"a": "A100", "b": "H200"}
    best, missed = best_under_limits(agg, 2.5, None, 600.0)  # a's A100 row misses the deadline; b the budget
    assert best.set_index("model")["gpu"].to_dict() == {"a": "H200"} and missed == ["b"]
    best, _ = best_under_limits(agg, None, 15.0, None)  # time per token: 10 ms (H200 a), 40 ms, 20 ms
    assert best["model"].tolist() == ["a"] and best["ms_per_token"].tolist() == [10.0]


def test_detail_timeline_and_validation_column(tmp_path):
    """The model detail's power timeline: the job's samples in its requests' span, one
    shaded window and one first-token rule per request; the leaderboard's check column."""
    from datetime import timedelta

    import pyarrow as pa

    from sweep.record import POWER_SCHEMA
    from sweep.store import job_slug
    from tests.helpers import make_run, synthetic_rows
    from ui import charts
    from ui.data import RunsFolder
    from ui.views import timeline_frames, timeline_note

    rows = synthetic_rows("r", "m", "chat", [100.0] * 4, [50] * 4, latency=[0.8] * 4)
    store = make_run(tmp_path, "r", [rows])
    t0 = rows[0]["started_at"]
    stamps = [t0 + timedelta(seconds=0.1 * k) for k in range(-20, 60)]
    samples = pa.table({"model": ["m"] * 80, "task": ["chat"] * 80, "host": ["h"] * 80, "gpu_index": [0] * 80,
                        "timestamp": stamps, "power_w": [100.0 + k for k in range(80)], "temperature_c": [None] * 80},
                       schema=POWER_SCHEMA)
    store.write_power_part(samples, job_slug("m", "chat"))
    folder = RunsFolder(tmp_path)
    assert folder.aggregates()["validation"].tolist() == ["warning"]  # every 0.8 s window is coarse
    sub = folder.rows("r", "m", "chat")
    power = folder.power("r", "m", "chat", t0, t0 + timedelta(seconds=3.8))
    assert len(power) == 39  # samples from t0 to t0 + 3.8 s, both ends included
    points, requests = timeline_frames(sub.sort_values("started_at"), power)
    assert requests["start_s"].tolist() == [0.0, 1.0, 2.0, 3.0] and requests["end_s"].tolist() == pytest.approx([0.8, 1.8, 2.8, 3.8])
    assert requests["first_token_s"].tolist() == pytest.approx([0.01, 1.01, 2.01, 3.01])
    assert points["t_s"].iloc[0] == 0.0 and set(points["gpu"]) == {"GPU 0"}
    spec = charts.timeline(points, requests)
    assert [layer["mark"]["type"] for layer in spec["layer"]] == ["rect", "rule", "line"]
    assert "decode 95.0 J per response; decode 1.939 J/token" in timeline_note(sub, 4, True)
    assert "No power timeline" in timeline_note(sub, 4, False)


def test_a_pareto_front_per_model_across_its_configurations():
    """Model a on two GPUs is a trade-off (fast and hungry, slow and frugal): both on its
    front. Model a's third configuration, slower and hungrier, is not. Model b's only one is."""
    from ui.views import time_energy_frame

    agg = _agg(synthetic_rows("r", "a", "chat", [500.0], [100], latency=[1.0]),
               synthetic_rows("r", "a", "chat", [200.0], [100], latency=[4.0], gpu_name="NVIDIA A100"),
               synthetic_rows("r", "a", "chat", [600.0], [100], latency=[5.0], gpu_name="NVIDIA H100 PCIe"),
               synthetic_rows("r", "b", "chat", [900.0], [100], latency=[2.0]))
    f = time_energy_frame(agg).set_index(["model", "gpu"])["front"]
    assert f.to_dict() == {("a", "H200"): True, ("a", "A100"): True, ("a", "H100 PCIe"): False, ("b", "H200"): True}


def test_compare_across_runs_with_the_2023_import(tmp_path):
    """Compare takes models of any run: per-response rows as boxes, an imported model (means
    only) as a point with its means in the table, each labelled with its run."""
    import json as _json

    from sweep.cli import main
    from tests.helpers import make_run, synthetic_rows
    from tests.unit.test_hostile_files import _good_source
    from ui.data import RunsFolder
    from ui.tabs import compare

    make_run(tmp_path / "runs", "mine", [synthetic_rows("mine", "org/a", "chat", [300.0, 340.0], [100, 120])])
    assert main(["import-mlenergy", str(_good_source(tmp_path)), "--out", str(tmp_path / "runs"), "--run-id", "y23"]) == 0
    folder = RunsFolder(tmp_path / "runs")
    values = [v for _, v in compare._choices(folder, "chat")]
    assert {tuple(_json.loads(v)) for v in values} == {("mine", "org/a"), ("y23", "org/a"), ("y23", "org/b")}
    energy, note, length, hist, table = compare.view(folder, "mine", "chat", [compare.entry("mine", "org/a"),
                                                                               compare.entry("y23", "org/a")])
    table = table.set_index("model")
    assert table.loc["org/a · mine", "energy mean (J)"] == 320.0 and table.loc["org/a · mine", "responses"] == 2
    assert table.loc["org/a · y23", "energy mean (J)"] == 500.0 and table.loc["org/a · y23", "gpu"] == "A40"
    spec = _json.loads(energy.plot)
    assert [layer["mark"]["type"] for layer in spec["layer"]] == ["boxplot", "point"]
    assert "means only" in note and hist is not None



def test_compare_with_a_stale_menu_value_says_so(tmp_path):
    from ui.data import RunsFolder
    from ui.tabs import compare

    energy, note, *_rest, table = compare.view(RunsFolder(tmp_path), None, "chat", [compare.entry("gone", "x/y")])
    assert energy is None and "None of these models" in note and table.empty
