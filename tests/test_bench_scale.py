"""bench/scale.py builds a run in today's layout and measures report and UI on it."""

import subprocess
import sys

import pandas as pd

from sweep.report import run_aggregates
from sweep.store import RunStore
from tests.helpers import ROOT


def test_scale_benchmark_small(tmp_path):
    proc = subprocess.run([sys.executable, "bench/scale.py", "--root", tmp_path, "--models", "2", "--prompts", "70"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for step in ("report (CLI, --csv)", "UI first load", "UI refresh after 1 new part", "UI detail of one"):
        assert step in proc.stdout
    store = RunStore(tmp_path / "scale")
    assert len(list(store.results_dir.glob("*.parquet"))) == 2 * 4 * 2  # 70 prompts: parts of 64 and 6
    agg = run_aggregates(store)
    assert len(agg) == 2 * 4 and (agg["responses"] == 70).all()
    rows = store.read_results()
    assert rows["response"].str.len().between(1000, 1600).all() and pd.notna(rows["compiled"]).all()
