"""Per (run, gpu, model, backend, task) figures of the results dataset, defined once.

Metric names follow the 2023 ML.ENERGY leaderboard (means per response): `energy` (J),
`throughput` (tokens/s), `response_length` (tokens), `latency` (s), `parameters`
(billions). Beyond it: `energy_per_token` (J/token, total energy over total tokens of the
measured responses), a 95% confidence interval of the mean energy (Student t),
`energy_above_idle` (J), `ttft` (s), and `responses` / `measured` (rows behind the figures;
a response without an energy reading is left out of the energy figures, not counted as 0).
From the power timeline: `prefill_energy` and `decode_energy` (J, means), and
`decode_energy_per_token` (J/token: total decode energy over the tokens after the first).
Checks: `mean_power` and `idle_power` (W, means), `flagged_share` (rows with an energy
quality flag), `coarse_share` (rows with a window under 1 s).

Two steps, so that report and UI share every definition and a live view adds a new part
file without re-reading the others:
- `partials(part files)`: per group (optionally per part file) counts, sums and the sum
  of squares of energy: additive, so partials of any split of the rows combine exactly;
- `finish(partials)`: adds partials up per group and derives the figures.
Only `SCAN_COLUMNS` are read: never `response`, the bulk of the data.
"""

from __future__ import annotations

import functools
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from sweep.quality import ENERGY_FLAGS, WINDOW_FLAGS
from sweep.record import RESULT_SCHEMA

KEYS = ["run_id", "gpu", "model", "backend", "task", "concurrency"]
# Partials keep the GPU's name as the device reports it; figures group by `gpu_label` of it.
PARTIAL_KEYS = ["run_id", "gpu_name", "model", "backend", "task", "concurrency"]
PART_FILE = "part_file"
# A worker: `validate` compares the same GPU model across workers.
WORKER_KEYS = ["host", "gpu_index"]
# Rows from a writer that had no `backend` column: a key cannot be empty (the UI filters on it).
BACKEND_WHEN_ABSENT = "unknown"

# figure -> (column, only rows with an energy reading); each is a mean per response
MEANS = {
    "energy": ("energy_j", True),
    "energy_above_idle": ("energy_above_idle_j", True),
    "throughput": ("throughput_tok_s", False),
    "response_length": ("response_tokens", False),
    "latency": ("latency_s", False),
    "ttft": ("ttft_s", False),
    "prefill_energy": ("prefill_energy_j", True),
    "decode_energy": ("decode_energy_j", True),
    "mean_power": ("mean_power_w", True),
    "idle_power": ("idle_power_w", False),
    "power_limit": ("power_limit_w", False),
}
FIRSTS = {"model_path": "model_path", "parameters": "params_b", "energy_note": "energy_note"}
# Rows counted per group: an energy quality flag that makes its energy_j unreliable (a flag
# about the one-window reading only where energy_j is that reading); a window under 1 s.
COUNTS = {"flagged": ENERGY_FLAGS, "coarse": ("coarse_window",)}
SCAN_COLUMNS = sorted(set(PARTIAL_KEYS) | set(WORKER_KEYS) | {c for c, _ in MEANS.values()} | set(FIRSTS.values())
                      | {"quality_flags", "energy_method"})
# Additive columns of a partial; the sums of a group's rows, whichever files they came from.
SUMS = (["responses", "energy_sq_sum", "measured_tokens_sum", "decode_tokens_sum"]
        + [f"{f}_{s}" for f in MEANS for s in ("sum", "n")] + [f"{c}_n" for c in COUNTS] + ["energy_missing_n"])
FIGURES = ["model_path", "parameters", "responses", "measured", "energy", "energy_ci_low", "energy_ci_high",
           "energy_per_token", "energy_above_idle", "throughput", "response_length", "latency", "ttft",
           "prefill_energy", "decode_energy", "decode_energy_per_token", "mean_power", "idle_power", "power_limit",
           "flagged_share", "coarse_share", "energy_missing", "energy_note"]

READ_THREADS = 4  # the reader releases the GIL; more threads than cores hides file-open waits
CHUNK_FILES = 512

_NULL = pa.scalar(None, pa.float64())
_SUM0 = pc.ScalarAggregateOptions(min_count=0)  # a group whose values are all null sums to 0, not null


def gpu_label(gpu_name: str) -> str:
    """The GPU as figures are grouped and shown: the device's full name without the
    vendor ('NVIDIA H100 PCIe' -> 'H100 PCIe', 'NVIDIA H100 80GB HBM3' -> 'H100 80GB
    HBM3'), so that different boards are never ranked as one."""
    return " ".join(re.sub(r"^NVIDIA\s+", "", str(gpu_name)).split()) or "GPU"


def gpu_file_name(label: str) -> str:
    """A GPU label as the {GPU} of a 2023-style CSV name: no '_' (it separates the
    fields), no character a file name cannot hold."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", label).strip("-.") or "GPU"


def results_dataset(paths: list[Path]) -> ds.Dataset:
    """Part files as one dataset with today's schema: a part file written before a column
    existed reads with that column null."""
    return ds.dataset([str(p) for p in paths], format="parquet", schema=RESULT_SCHEMA)


def read_part(path: Path, columns: list[str] = SCAN_COLUMNS) -> pa.Table:
    """Some columns of one part file, in today's types; a column the file predates is null."""
    pf = pq.ParquetFile(path, pre_buffer=False)  # local files: pre-buffering only adds a copy (~20% of the CPU)
    stored = set(pf.schema_arrow.names)
    return _conform(pf.read(columns=[c for c in columns if c in stored], use_threads=False), columns)


def _conform(table: pa.Table, columns: list[str]) -> pa.Table:
    """`columns` of `table` in today's types; a column it lacks is null."""
    schema = pa.schema([RESULT_SCHEMA.field(c) for c in columns])
    if table.schema.equals(schema):
        return table
    return pa.table({f.name: table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
                     for f in schema}).cast(schema)


def _float(col: pa.ChunkedArray) -> pa.ChunkedArray:
    # NaN and null both mean "no value" (as in pandas), so the counts skip both.
    col = pc.cast(col, pa.float64())
    return pc.if_else(pc.is_nan(col), _NULL, col)


def _row_table(scan: pa.Table, run_id: str | None = None) -> pa.Table:
    """Scanned rows -> one column per quantity that partials sum or pick. `run_id`: the
    run the rows were read from (its folder), whatever run id the rows carry."""
    energy = _float(scan["energy_j"])
    measured = pc.is_valid(energy)
    cols = {k: scan[k] for k in PARTIAL_KEYS}
    if run_id is not None:
        cols["run_id"] = pa.repeat(pa.scalar(run_id, pa.string()), scan.num_rows)
    cols["backend"] = pc.fill_null(scan["backend"], BACKEND_WHEN_ABSENT)
    cols["concurrency"] = pc.fill_null(scan["concurrency"], 1)  # rows from before the column
    for figure, (column, only_measured) in MEANS.items():
        v = _float(scan[column])
        cols[figure] = pc.if_else(measured, v, _NULL) if only_measured else v
    cols["energy_sq"] = pc.multiply(energy, energy)
    tokens = _float(scan["response_tokens"])
    cols["measured_tokens"] = pc.if_else(measured, tokens, _NULL)
    # The first token comes out of the prefill; decode makes the rest.
    has_decode = pc.is_valid(cols["decode_energy"])
    cols["decode_tokens"] = pc.if_else(has_decode, pc.max_element_wise(pc.subtract(tokens, 1.0), 0.0), _NULL)
    flags = pc.fill_null(pc.binary_join(scan["quality_flags"], " "), "")
    # A flag about the one-window reading says nothing of an attributed energy.
    window_energy = pc.fill_null(pc.equal(scan["energy_method"], "window"), True)
    about_window = [f for f in ENERGY_FLAGS if f in WINDOW_FLAGS]
    about_energy = [f for f in ENERGY_FLAGS if f not in WINDOW_FLAGS]
    hits = {"flagged": pc.or_(pc.and_(window_energy, _any_flag(flags, about_window)), _any_flag(flags, about_energy)),
            "coarse": _any_flag(flags, COUNTS["coarse"])}
    for name in COUNTS:
        # Shares of the measured rows: a row without energy (a reset counter) is not among them.
        cols[name] = pc.cast(pc.and_(measured, hits[name]), pa.int64())
    for key in WORKER_KEYS:
        cols[key] = scan[key]
    # Rows with no energy that do not say why (validate's `energy_present`).
    cols["energy_missing"] = pc.cast(pc.and_(pc.invert(measured), pc.is_null(scan["energy_note"])), pa.int64())
    for name, column in FIRSTS.items():
        cols[name] = scan[column]
    if PART_FILE in scan.column_names:
        cols[PART_FILE] = scan[PART_FILE]
    return pa.table(cols)


def _any_flag(flags: pa.ChunkedArray, which) -> pa.ChunkedArray:
    return pc.match_substring_regex(flags, r"\b(" + "|".join(which) + r")\b")


def _group(rows: pa.Table, keys: list[str]) -> pa.Table:
    """Rows -> partials: per group, the SUMS and the first value of each FIRSTS column."""
    specs = [([], "count_all"), ("energy_sq", "sum", _SUM0), ("measured_tokens", "sum", _SUM0),
             ("decode_tokens", "sum", _SUM0)]
    for figure in MEANS:
        specs += [(figure, "sum", _SUM0), (figure, "count")]
    specs += [(name, "sum", _SUM0) for name in [*COUNTS, "energy_missing"]]
    specs += [(name, "first") for name in FIRSTS]
    # One thread keeps rows in order, so "first" is the first row of the group, as in the files.
    out = rows.group_by(keys, use_threads=False).aggregate(specs)
    names = ({"count_all": "responses"} | {f"{f}_count": f"{f}_n" for f in MEANS} | {f"{n}_first": n for n in FIRSTS}
             | {f"{c}_sum": f"{c}_n" for c in COUNTS} | {"energy_missing_sum": "energy_missing_n"})
    return out.rename_columns([names.get(c, c) for c in out.column_names]).select(keys + SUMS + list(FIRSTS))


def partials(paths: list[Path], by_file: bool = False, by_worker: bool = False, ids: list | None = None,
             run_id: str | None = None) -> pa.Table:
    """Per (run, gpu_name, model, backend, task) partial sums of the rows of some part
    files; with `by_file`, per part file too (column `part_file`, the file's name), so that
    a live view can keep them per file, and add or drop files; with `by_worker`, per
    (host, gpu_index) too. With `ids` (a list), the (model, task, prompt_id) of every row
    (and its `part_file` with `by_file`) are appended to it, a table per chunk: `validate`
    counts them, in the same pass. `run_id`: the run the files belong to (the name of its
    folder); rows keep the run id they were written under, which a renamed or copied
    folder no longer has, and figures are per run.

    Files are read a chunk at a time (memory stays that of one chunk, whatever the run's
    size), each with pyarrow's Parquet reader, in a few threads: on 7,520 files of 64 rows
    a dataset scan of the same columns peaked near 1 GB, this near 200 MB, in no more time."""
    keys = PARTIAL_KEYS + (WORKER_KEYS if by_worker else []) + ([PART_FILE] if by_file else [])
    out = []
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, max(len(paths), 1), CHUNK_FILES):
            chunk = paths[start:start + CHUNK_FILES]
            columns = SCAN_COLUMNS + ([] if ids is None else ["prompt_id"])
            tables = (list(pool.map(lambda p: read_part(p, columns), chunk))
                      or [RESULT_SCHEMA.empty_table().select(columns)])
            # The file's position in `paths`: a number to group by, its name once per group.
            tagged = pa.concat_tables(t.append_column(PART_FILE, pa.repeat(pa.scalar(start + i, pa.int32()), t.num_rows))
                                      for i, t in enumerate(tables))
            if ids is not None:  # per job: "task" is the job's key (sweep.record.job_key)
                ids.append(_job_ids(tagged))
            out.append(_group(_row_table(tagged, run_id), keys))
    table = pa.concat_tables(out)
    names = pa.array([Path(p).name for p in paths], pa.string())

    def named(t: pa.Table) -> pa.Table:  # file positions -> file names
        return t.set_column(t.schema.get_field_index(PART_FILE), PART_FILE, names.take(t[PART_FILE]))

    if ids is not None:
        ids[:] = [named(t) if by_file else t.drop_columns([PART_FILE]) for t in ids]
    return named(table) if by_file else table


def job_keys(task, concurrency):
    """The job key (sweep.record.job_key) of each row, as an Arrow array."""
    n = pc.fill_null(concurrency, 1)
    return pc.if_else(pc.equal(n, 1), task, pc.binary_join_element_wise(task, pc.cast(n, pa.string()), "@c"))


def _job_ids(tagged: pa.Table) -> pa.Table:
    """(model, job key as "task", prompt_id, part_file) of scanned rows."""
    return pa.table({"model": tagged["model"], "task": job_keys(tagged["task"], tagged["concurrency"]),
                     "prompt_id": tagged["prompt_id"], PART_FILE: tagged[PART_FILE]})


def partials_of_table(rows: pa.Table) -> pa.Table:
    """Partial sums of rows already in memory; a column they lack counts as null."""
    return _group(_row_table(_conform(rows, SCAN_COLUMNS)), PARTIAL_KEYS)


def finish(parts: pa.Table, extra_keys: list[str] = []) -> pd.DataFrame:
    """Partials (any split of the rows, in file order) -> one row of figures per
    (run_id, gpu, model, backend, task) (and `extra_keys`, e.g. WORKER_KEYS of partials
    made `by_worker`), sorted by those keys."""
    keys = KEYS + extra_keys
    if parts.num_rows == 0:
        return pd.DataFrame(columns=keys + FIGURES)
    gpu_names = parts["gpu_name"].unique()  # a few: short names in Python, then a lookup
    short = pa.array([gpu_label(n) for n in gpu_names.to_pylist()], pa.string())
    parts = parts.append_column("gpu", short.take(pc.index_in(parts["gpu_name"], gpu_names)))
    specs = [(c, "sum") for c in SUMS] + [(c, "first") for c in FIRSTS]
    g = parts.group_by(keys, use_threads=False).aggregate(specs)
    renames = {f"{c}_sum": c for c in SUMS} | {f"{c}_first": c for c in FIRSTS}
    g = g.rename_columns([renames.get(c, c) for c in g.column_names]).sort_by([(k, "ascending") for k in keys])
    sums = {c: g[c].to_numpy(zero_copy_only=False).astype(float) for c in SUMS}
    return _figures(g.select(keys + list(FIRSTS)).to_pandas(), sums, keys)


def _figures(out: pd.DataFrame, s: dict[str, np.ndarray], keys: list[str] = KEYS) -> pd.DataFrame:
    """Keys and firsts of each group + its sums -> the figures, in FIGURES order."""
    from scipy.special import stdtrit

    def mean(figure: str) -> np.ndarray:
        n = s[f"{figure}_n"].astype(float)
        return np.divide(s[f"{figure}_sum"], n, out=np.full(len(n), np.nan), where=n > 0)

    n = s["energy_n"].astype(float)
    energy = mean("energy")
    # Variance from sums: sum of squares minus n * mean^2 loses log10(mean^2 / variance)
    # digits of float64's 16, a handful for energies (their spread is well above 0.1%).
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.maximum(s["energy_sq_sum"] - energy * s["energy_sum"], 0.0) / (n - 1)
        half = stdtrit(np.maximum(n - 1, 1), 0.975) * np.sqrt(var / n)
    half = np.where(n >= 2, half, np.nan)
    tokens = s["measured_tokens_sum"]
    out["responses"] = s["responses"].astype("int64")
    out["measured"] = s["energy_n"].astype("int64")
    out["energy"] = energy
    out["energy_ci_low"] = energy - half
    out["energy_ci_high"] = energy + half
    out["energy_per_token"] = np.divide(s["energy_sum"], tokens, out=np.full(len(n), np.nan), where=tokens != 0)
    for figure in MEANS:
        if figure != "energy":
            out[figure] = mean(figure)
    decode_tokens = s["decode_tokens_sum"]
    out["decode_energy_per_token"] = np.divide(s["decode_energy_sum"], decode_tokens, out=np.full(len(n), np.nan),
                                               where=decode_tokens != 0)
    # Shares of the rows with an energy reading (a CPU row has neither energy nor flags).
    out["flagged_share"] = np.divide(s["flagged_n"], n, out=np.full(len(n), np.nan), where=n > 0)
    out["coarse_share"] = np.divide(s["coarse_n"], n, out=np.full(len(n), np.nan), where=n > 0)
    out["energy_missing"] = s["energy_missing_n"].astype("int64")
    # Why a group has no energy figure: only when no response of it was measured.
    out["energy_note"] = out["energy_note"].where(out["measured"] == 0, None)
    return out[keys + FIGURES]



@functools.lru_cache(maxsize=1)
def worker_partials(paths: tuple[Path, ...], run_id: str) -> tuple[pa.Table, pa.Table]:
    """(`partials(paths, by_worker=True, run_id=run_id)`, every row's (model, task,
    prompt_id)), kept for the last set of files: a report, then its validation and CSVs,
    read the run once (a part file never changes once written; a new or removed one is a
    new key)."""
    ids: list[pa.Table] = []
    parts = partials(list(paths), by_worker=True, ids=ids, run_id=run_id)
    return parts, pa.concat_tables(ids)


def job_figures(parts: pa.Table) -> pd.DataFrame:
    """Figures per KEYS of partials made with or without `by_worker`."""
    return finish(parts.drop_columns([k for k in WORKER_KEYS if k in parts.column_names]))
