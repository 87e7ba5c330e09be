"""bench/scale.py builds a run as part files and compacted, and measures report and UI on both."""

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
    flat, compacted = proc.stdout.split("\nflat: ")[1].split("\ncompacted: ")
    for layout in (flat, compacted):
        for step in ("report (CLI, --csv)", "UI first load", "UI refresh after 1 new part", "compact that job (70 rows)",
                     "UI refresh after a job compacted", "UI detail of one"):
            assert step in layout
    assert "compaction of the whole run (CLI): " in proc.stdout
    flat, compacted = (RunStore(tmp_path / layout / "scale") for layout in ("flat", "compacted"))
    assert len(list(flat.results_dir.glob("*.parquet"))) == 2 * 4 * 2  # 70 prompts: parts of 64 and 6
    assert len(list(compacted.results_dir.iterdir())) == 2 * 4  # one file per job
    for store in (flat, compacted):
        agg = run_aggregates(store)
        assert len(agg) == 2 * 4 and (agg["responses"] == 70).all()
        rows = store.read_results()
        assert rows["response"].str.len().between(1000, 1600).all() and pd.notna(rows["compiled"]).all()
    pd.testing.assert_frame_equal(run_aggregates(flat), run_aggregates(compacted))
