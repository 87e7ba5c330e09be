"""Import the 2023 ML.ENERGY Leaderboard's published results as an aggregate-only run.

Those files hold means per (model, GPU, task), not per-request rows, so the run keeps
`aggregates.parquet` (the columns `sweep.report.aggregate` produces) instead of
`results/`, and its manifest says `"kind": "aggregate-only"`. Quality scores from
score.csv (ARC, HellaSwag, TruthfulQA) become columns.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sweep.config import ConfigError
from sweep.report import AGGREGATES_FILE
from sweep.store import RunStore, atomic_write

_CSV = re.compile(r"^(?P<gpu>[^_]+)_(?P<task>.+)_benchmark\.csv$")
_COLUMNS = ["model", "throughput", "response_length", "latency", "energy"]
SCORES = ["arc", "hellaswag", "truthfulqa"]
# The 2023 measurement decoded with FastChat's generate_stream over transformers models.
IMPORTED_BACKEND = "fastchat"


def import_mlenergy(source: str | Path, out: str | Path, run_id: str = "mlenergy-2023") -> tuple[Path, int]:
    src = Path(source)
    csvs = sorted(p for p in src.glob("*_benchmark.csv") if _CSV.match(p.name))
    if not csvs:
        raise ConfigError(f"{src}: no {{GPU}}_{{task}}_benchmark.csv files")
    for required in ("models.json", "score.csv"):
        if not (src / required).is_file():
            raise ConfigError(f"{src / required}: file not found")
    models = json.loads((src / "models.json").read_text())
    scores = pd.read_csv(src / "score.csv").set_index("model")

    frames = []
    for path in csvs:
        m = _CSV.match(path.name)
        df = pd.read_csv(path)
        missing = set(_COLUMNS) - set(df.columns)
        if missing:
            raise ConfigError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        df = df[_COLUMNS].assign(gpu=m["gpu"], task=m["task"])
        frames.append(df)
    agg = pd.concat(frames, ignore_index=True)
    agg["run_id"] = run_id
    agg["model_path"] = agg["model"]
    agg["backend"] = IMPORTED_BACKEND
    agg["url"] = agg["model"].map(lambda name: models.get(name, {}).get("url"))
    agg["parameters"] = agg["model"].map(lambda name: models.get(name, {}).get("params", np.nan)).astype(float)
    # Mean energy over mean length of the same responses: the ratio of sums, as for a sweep.
    agg["energy_per_token"] = agg["energy"] / agg["response_length"]
    for col in ("responses", "measured", "energy_ci_low", "energy_ci_high", "energy_above_idle", "ttft"):
        agg[col] = np.nan
    for col in SCORES:
        agg[col] = agg["model"].map(scores[col]) if col in scores else np.nan

    store = RunStore(Path(out) / run_id)
    store.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(store.run_dir / AGGREGATES_FILE, lambda tmp: agg.to_parquet(tmp, index=False))
    store.write_manifest({
        "run_id": run_id,
        "kind": "aggregate-only",
        "source": "ML.ENERGY Leaderboard 2023 (published means per response)",
        "imported_from": str(src.resolve()),
        "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "gpus": sorted(agg["gpu"].unique().tolist()),
        "tasks": sorted(agg["task"].unique().tolist()),
    })
    return store.run_dir, len(agg)
