"""Import the 2023 ML.ENERGY Leaderboard's published results as an aggregate-only run.

Those files hold means per (model, GPU, task), not per-request rows, so the run keeps
`aggregates.parquet` (the columns `sweep.report.aggregate` produces) instead of
`results/`, and its manifest says `"kind": "aggregate-only"`. Quality scores from
score.csv (ARC, HellaSwag, TruthfulQA) become columns.

Every input file is checked before anything is written: a problem is one `ConfigError`
naming the file and what is wrong. A folder that already holds a sweep's run is never
written into; an earlier import in it is replaced.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sweep.config import ConfigError
from sweep.manifest import KIND_IMPORTED
from sweep.report import AGGREGATES_FILE
from sweep.store import RunBusy, RunStore, atomic_write, strict_json

_CSV = re.compile(r"^(?P<gpu>[^_]+)_(?P<task>.+)_benchmark\.csv$")
_COLUMNS = ["model", "throughput", "response_length", "latency", "energy"]
SCORES = ["arc", "hellaswag", "truthfulqa"]
# The 2023 measurement decoded with FastChat's generate_stream over transformers models.
IMPORTED_BACKEND = "fastchat"


def _read_csv(path: Path, numbers: list[str]) -> pd.DataFrame:
    """A CSV with a `model` column of text and `numbers` columns of finite numbers."""
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    try:
        df = pd.read_csv(path, encoding="utf-8", dtype=str)  # numbers parsed below, so errors quote the text
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{path}: empty file") from None
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable CSV ({str(exc).splitlines()[0][:120]})") from None
    missing = [c for c in ["model", *numbers] if c not in df.columns]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise ConfigError(f"{path}: no rows")
    if df["model"].isna().any() or (df["model"].str.strip() == "").any():
        raise ConfigError(f"{path}: row {int(np.flatnonzero(df['model'].isna() | (df['model'].str.strip() == ''))[0]) + 2}: "
                          f"model: empty")
    if df["model"].duplicated().any():
        raise ConfigError(f"{path}: model {df['model'][df['model'].duplicated()].iloc[0]!r} appears twice")
    for col in numbers:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() & df[col].notna() | ~np.isfinite(values.fillna(0.0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ConfigError(f"{path}: row {row + 2}: {col}: {df[col].iloc[row]!r} is not a finite number")
        df[col] = values.astype(float)
    return df


def _read_models(path: Path) -> dict[str, dict]:
    """models.json: {model: {url, nickname, params}}."""
    try:
        models = strict_json(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({str(exc)[:120]})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise ConfigError(f"{path}: expected an object of {{model: {{url, params}}}}")
    for name, info in models.items():
        params = info.get("params")
        if params is not None and (isinstance(params, bool) or not isinstance(params, (int, float)) or params <= 0):
            raise ConfigError(f"{path}: {name}.params: {params!r} is not a positive number")
        if info.get("url") is not None and not isinstance(info["url"], str):
            raise ConfigError(f"{path}: {name}.url: not text")
    return models


def read_source(src: Path) -> pd.DataFrame:
    """The aggregates of a 2023 results folder, every file checked (ConfigError)."""
    if not src.is_dir():
        raise ConfigError(f"{src}: not a folder")
    csvs = sorted(p for p in src.glob("*_benchmark.csv") if _CSV.match(p.name))
    if not csvs:
        raise ConfigError(f"{src}: no {{GPU}}_{{task}}_benchmark.csv files")
    for required in ("models.json", "score.csv"):
        if not (src / required).is_file():
            raise ConfigError(f"{src / required}: file not found")
    models = _read_models(src / "models.json")
    score_path = src / "score.csv"
    header = _read_csv(score_path, [])
    scores = _read_csv(score_path, [c for c in SCORES if c in header.columns]).set_index("model")

    frames = []
    for path in csvs:
        m = _CSV.match(path.name)
        df = _read_csv(path, _COLUMNS[1:])
        frames.append(df[_COLUMNS].assign(gpu=m["gpu"], task=m["task"]))
    agg = pd.concat(frames, ignore_index=True)
    agg["model_path"] = agg["model"]
    agg["backend"] = IMPORTED_BACKEND
    agg["url"] = agg["model"].map(lambda name: models.get(name, {}).get("url"))
    agg["parameters"] = agg["model"].map(lambda name: models.get(name, {}).get("params", np.nan)).astype(float)
    # Mean energy over mean length of the same responses: the ratio of sums, as for a sweep.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = agg["energy"] / agg["response_length"]
    agg["energy_per_token"] = ratio.where(agg["response_length"] > 0)
    for col in ("responses", "measured", "energy_ci_low", "energy_ci_high", "energy_above_idle", "ttft"):
        agg[col] = np.nan
    for col in SCORES:
        agg[col] = agg["model"].map(scores[col]) if col in scores else np.nan
    return agg


def import_mlenergy(source: str | Path, out: str | Path, run_id: str = "mlenergy-2023") -> tuple[Path, int]:
    src = Path(source)
    agg = read_source(src).assign(run_id=run_id)
    store = RunStore(Path(out) / run_id)
    store.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with store.driver_lock():
            holds = store.read_manifest()
            if (holds is not None and holds.get("kind") != KIND_IMPORTED) or store.results_dir.exists():
                raise ConfigError(f"{store.run_dir}: already holds a sweep's run; import into another --run-id")
            atomic_write(store.run_dir / AGGREGATES_FILE, lambda tmp: agg.to_parquet(tmp, index=False))
            store.write_manifest({
                "run_id": run_id,
                "kind": KIND_IMPORTED,
                "source": "ML.ENERGY Leaderboard 2023 (published means per response)",
                "imported_from": str(src.resolve()),
                "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "gpus": sorted(agg["gpu"].unique().tolist()),
                "tasks": sorted(agg["task"].unique().tolist()),
            })
    except RunBusy as exc:
        raise ConfigError(str(exc)) from None
    return store.run_dir, len(agg)
