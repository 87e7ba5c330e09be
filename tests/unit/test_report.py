"""Aggregation against hand-computed figures, and the 2023 import."""

import numpy as np
import pandas as pd
import pytest

from sweep.mlenergy_import import import_mlenergy
from sweep.report import aggregate, run_aggregates, write_csvs
from sweep.store import RunStore
from tests.helpers import MLENERGY, make_run, run_sweep_cli, synthetic_rows


def test_aggregate_by_hand(tmp_path):
    rows = synthetic_rows("r", "m", "chat", energies=[10.0, 20.0, 30.0, None], tokens=[5, 10, 15, 20],
                          latency=[1.0, 2.0, 3.0, 4.0])
    agg = aggregate(pd.DataFrame(rows).astype({"started_at": "datetime64[us, UTC]"}))
    assert len(agg) == 1
    a = agg.iloc[0]
    assert (a["run_id"], a["gpu"], a["model"], a["task"]) == ("r", "H200", "m", "chat")
    assert a["responses"] == 4 and a["measured"] == 3
    assert a["energy"] == pytest.approx(20.0)  # the unmeasured row is not a zero
    # t(0.975, df=2) = 4.302653; sd = 10; n = 3
    half = 4.302653 * 10 / np.sqrt(3)
    assert a["energy_ci_low"] == pytest.approx(20 - half, rel=1e-5)
    assert a["energy_ci_high"] == pytest.approx(20 + half, rel=1e-5)
    assert a["energy_per_token"] == pytest.approx(60 / 30)  # total J over total tokens of measured rows
    assert a["response_length"] == pytest.approx(12.5)
    assert a["latency"] == pytest.approx(2.5)
    assert a["throughput"] == pytest.approx(5.0)  # mean of 5, 5, 5, 5 tok/s
    assert a["energy_above_idle"] == pytest.approx(np.mean([10 - 100, 20 - 200, 30 - 300]))


def test_aggregate_groups_by_gpu_and_model(tmp_path):
    store = make_run(tmp_path, "r", [
        synthetic_rows("r", "a", "chat", [1.0, 3.0], [1, 1]),
        synthetic_rows("r", "a", "chat", [5.0, 7.0], [1, 1], gpu_name="NVIDIA A100-SXM4-80GB"),
        synthetic_rows("r", "b", "chat", [2.0, 2.0], [1, 1]),
    ])
    agg = run_aggregates(store).set_index(["gpu", "model"])
    assert agg.loc[("H200", "a"), "energy"] == 2.0
    assert agg.loc[("A100-SXM4-80GB", "a"), "energy"] == 6.0
    assert agg.loc[("H200", "b"), "energy"] == 2.0


def test_different_boards_of_one_gpu_family_are_ranked_apart(tmp_path):
    """H100 PCIe, SXM and NVL are different devices: a 100 J row of one and a 300 J row of
    another are two figures, never one 200 J 'H100'; the CSV export names each."""
    boards = {"NVIDIA H100 PCIe": 100.0, "NVIDIA H100 80GB HBM3": 300.0, "NVIDIA H100 NVL": 200.0,
              "NVIDIA GeForce RTX 4090": 50.0, "NVIDIA GeForce RTX 3090": 60.0, "Tesla V100-SXM2-16GB": 70.0,
              "Tesla T4": 80.0}
    store = make_run(tmp_path, "r", [synthetic_rows("r", "m", "chat", [e, e], [10, 10], gpu_name=name)
                                     for name, e in boards.items()])
    agg = run_aggregates(store).set_index("gpu")["energy"]
    assert agg.to_dict() == {"H100 PCIe": 100.0, "H100 80GB HBM3": 300.0, "H100 NVL": 200.0,
                             "GeForce RTX 4090": 50.0, "GeForce RTX 3090": 60.0, "Tesla V100-SXM2-16GB": 70.0,
                             "Tesla T4": 80.0}
    names = sorted(p.name for p in write_csvs(store, tmp_path / "csv"))
    assert len(names) == len(boards) and "H100-80GB-HBM3_chat_benchmark.csv" in names
    assert all(n.count("_") == 2 for n in names)  # {GPU}_{task}_benchmark.csv, as the 2023 files


def test_csv_export_onto_a_folder_in_the_way_is_one_line(tmp_path):
    from sweep.cli import main

    store = make_run(tmp_path, "r", [synthetic_rows("r", "m", "chat", [1.0], [1])])
    (tmp_path / "csv" / "H200_chat_benchmark.csv").mkdir(parents=True)
    assert main(["report", str(store.run_dir), "--csv", str(tmp_path / "csv")]) == 2


@pytest.mark.skipif(not MLENERGY.is_dir(), reason="../shared/data is absent")
def test_import_all_twelve_csvs(tmp_path):
    run_dir, n = import_mlenergy(MLENERGY, tmp_path)
    agg = run_aggregates(RunStore(run_dir))
    csvs = sorted(MLENERGY.glob("*_benchmark.csv"))
    assert len(csvs) == 12
    assert n == len(agg) == sum(len(pd.read_csv(p)) for p in csvs)
    assert set(agg["gpu"]) == {"A100", "A40", "V100"}
    assert set(agg["task"]) == {"chat", "chat-concise", "instruct", "instruct-concise"}
    # every figure comes through unchanged
    for path in csvs:
        gpu, task = path.name.split("_")[:2]
        src = pd.read_csv(path).set_index("model")
        got = agg[(agg["gpu"] == gpu) & (agg["task"] == task)].set_index("model")
        for col in ("throughput", "response_length", "latency", "energy"):
            pd.testing.assert_series_equal(got.loc[src.index, col], src[col], check_names=False)
    koala = agg[(agg["model"] == "BAIR/koala-13b") & (agg["gpu"] == "A100") & (agg["task"] == "chat")].iloc[0]
    assert koala["parameters"] == 13 and koala["arc"] == pytest.approx(52.901023890784984)
    assert koala["energy"] == pytest.approx(2144.8338435191445)
    assert (run_dir / "manifest.json").is_file()
    # the report reads an imported run too, and the CSV export gives the 2023 layout back
    proc = run_sweep_cli("report", run_dir, "--csv", tmp_path / "csv")
    assert proc.returncode == 0 and "== A100 / chat" in proc.stdout
    back = pd.read_csv(tmp_path / "csv" / "A100_chat_benchmark.csv").set_index("model").sort_index()
    orig = pd.read_csv(MLENERGY / "A100_chat_benchmark.csv").set_index("model").sort_index()
    pd.testing.assert_frame_equal(back, orig)


def test_import_of_a_wrong_folder_exits_2(tmp_path):
    proc = run_sweep_cli("import-mlenergy", tmp_path, "--out", tmp_path / "runs")
    assert proc.returncode == 2 and "no {GPU}_{task}_benchmark.csv files" in proc.stderr
