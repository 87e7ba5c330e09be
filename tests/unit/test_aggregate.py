"""sweep.aggregate against a plain pandas definition of the same figures; older part files."""

import random

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from sweep.aggregate import BACKEND_WHEN_ABSENT, KEYS, finish, gpu_label, partials, results_dataset
from sweep.quality import ENERGY_FLAGS, WINDOW_FLAGS
from sweep.record import RESULT_SCHEMA
from sweep.report import run_aggregates
from sweep.store import RunStore, job_slug
from tests.helpers import make_run, synthetic_rows


def pandas_aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """The figures, row by row in pandas: the reference the scanner must match."""
    df = df.assign(gpu=df["gpu_name"].map(gpu_label))
    out = []
    for key, g in df.groupby(KEYS, sort=True):
        m = g[g["energy_j"].notna()]
        e = m["energy_j"].to_numpy(float)
        half = stats.t.ppf(0.975, len(e) - 1) * e.std(ddof=1) / np.sqrt(len(e)) if len(e) >= 2 else np.nan
        tokens = m["response_tokens"].sum()
        d = m[m["decode_energy_j"].notna()]
        decode_tokens = (d["response_tokens"] - 1).clip(lower=0).sum()
        flags = m["quality_flags"].map(lambda f: set(f) if f is not None else set())
        out.append(dict(
            zip(KEYS, key), model_path=g["model_path"].iloc[0], parameters=g["params_b"].iloc[0], responses=len(g),
            measured=len(m), energy=e.mean() if len(e) else np.nan,
            energy_ci_low=e.mean() - half if len(e) else np.nan, energy_ci_high=e.mean() + half if len(e) else np.nan,
            energy_per_token=e.sum() / tokens if tokens else np.nan,
            energy_above_idle=m["energy_above_idle_j"].mean() if len(m) else np.nan,
            throughput=g["throughput_tok_s"].mean(), response_length=g["response_tokens"].mean(),
            latency=g["latency_s"].mean(), ttft=g["ttft_s"].mean(),
            prefill_energy=m["prefill_energy_j"].mean(), decode_energy=d["decode_energy_j"].mean(),
            decode_energy_per_token=d["decode_energy_j"].sum() / decode_tokens if decode_tokens else np.nan,
            mean_power=m["mean_power_w"].mean(), idle_power=g["idle_power_w"].mean(),
            power_limit=g["power_limit_w"].mean(),
            # a flag about the one-window reading counts only where energy_j is that reading
            flagged_share=pd.Series([bool(f & (set(ENERGY_FLAGS) - set(WINDOW_FLAGS) if meth == "attributed"
                                               else set(ENERGY_FLAGS)))
                                     for f, meth in zip(flags, m["energy_method"])]).mean() if len(m) else np.nan,
            coarse_share=flags.map(lambda f: "coarse_window" in f).mean() if len(m) else np.nan,
            energy_missing=int((g["energy_j"].isna() & g["energy_note"].isna()).sum()),
            energy_note=None if len(m) else next(iter(g["energy_note"].dropna()), None)))
    return pd.DataFrame(out)


def _jobs(rng):
    """Several runs' worth of jobs: GPUs (two names sharing a short one), backends, tasks,
    null energies, a job never measured, energies around 1 kJ with a small spread."""
    jobs = []
    for model, params in (("a-7b", 7.0), ("b-13b", 13.0)):
        for gpu in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"):
            for backend in ("transformers", "compiled"):
                for task in ("chat", "instruct"):
                    n = rng.randint(1, 150)
                    energies = [None if rng.random() < 0.1 else rng.gauss(1000.0, 5.0) for _ in range(n)]
                    tokens = [rng.randint(1, 500) for _ in range(n)]
                    rows = synthetic_rows("r", model, task, energies, tokens, gpu_name=gpu, params_b=params)
                    # the compiled backend's rows are attributed: their coarse windows do not flag them
                    jobs.append([dict(r, backend=backend, ttft_s=None if i % 7 == 0 else r["ttft_s"],
                                      energy_method=("attributed" if backend == "compiled" else
                                                     "window" if i % 2 else None))
                                 for i, r in enumerate(rows)])
    jobs.append(synthetic_rows("r", "c-1b", "chat", [None, None], [5, 6]))  # nothing measured: the note shows
    jobs.append(synthetic_rows("r", "d-1b", "chat", [42.0], [5]))  # one measurement: no interval
    return jobs


def test_same_figures_as_pandas(tmp_path):
    store = make_run(tmp_path, "r", _jobs(random.Random(0)))
    got = run_aggregates(store)
    want = pandas_aggregate(store.read_results())
    assert len(got) == len(want) == 2 * 3 * 2 * 2 + 2  # models, GPUs (each board its own), backends, tasks
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=1e-9)
    one = got[got["model"] == "d-1b"].iloc[0]
    assert one["energy"] == 42.0 and np.isnan(one["energy_ci_low"])
    assert got[got["model"] == "c-1b"].iloc[0]["energy_note"] == "x"


def test_partials_per_file_combine_to_the_whole(tmp_path):
    store = make_run(tmp_path, "r", _jobs(random.Random(1)))
    per_file = partials(store.part_files(), by_file=True)
    assert set(per_file["part_file"].to_pylist()) == {p.name for p in store.results_dir.glob("*.parquet")}
    # combined in any order of arrival, the figures are those of one scan
    halves = [per_file.slice(0, 10), per_file.slice(10)]
    pd.testing.assert_frame_equal(finish(pa.concat_tables(halves[::-1]).sort_by("part_file")),
                                  finish(partials(store.part_files())), rtol=1e-12)


def test_response_is_never_read(tmp_path):
    store = make_run(tmp_path, "r", [synthetic_rows("r", "m", "chat", [10.0, 20.0], [5, 10])])
    # a part file whose `response` could not even be read as text: the figures never touch it
    table = pa.Table.from_pylist(synthetic_rows("r", "m", "chat", [30.0], [5]), schema=RESULT_SCHEMA)
    table = table.set_column(table.schema.get_field_index("response"), "response", pa.array([[1, 2]]))
    pq.write_table(table, store.results_dir / "m-odd.parquet")
    with pytest.raises(pa.ArrowException):
        results_dataset(store.part_files()).to_table()
    assert run_aggregates(store).iloc[0]["energy"] == 20.0


@pytest.mark.parametrize("dropped", [["compiled", "steps_past_stop"], ["compiled", "steps_past_stop", "backend",
                                                                       "ttft_s", "energy_above_idle_j"]])
def test_older_part_files_read_with_the_column_empty(tmp_path, dropped):
    rows = synthetic_rows("old", "m", "chat", [10.0, 20.0], [5, 10])
    store = make_run(tmp_path, "old", [synthetic_rows("old", "m", "instruct", [30.0], [3])])
    older = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA).drop_columns(dropped)
    pq.write_table(older, store.results_dir / f"{job_slug('m', 'chat')}-old.parquet")
    agg = run_aggregates(store).set_index("task")
    backend = BACKEND_WHEN_ABSENT if "backend" in dropped else "transformers"
    assert agg.loc["chat", "backend"] == backend and agg.loc["chat", "energy"] == 15.0
    assert agg.loc["instruct", "backend"] == "transformers"
    if "ttft_s" in dropped:
        assert np.isnan(agg.loc["chat", "ttft"]) and np.isnan(agg.loc["chat", "energy_above_idle"])
    rows_back = RunStore(store.run_dir).read_results()
    assert len(rows_back) == 3 and rows_back["compiled"].isna().all() and list(rows_back) == RESULT_SCHEMA.names


def test_the_report_sets_a_damaged_part_file_aside_and_counts_the_rest(tmp_path):
    from sweep.report import run_aggregates

    store = make_run(tmp_path, "r", [synthetic_rows("r", m, "chat", [1.0, 2.0], [5, 6]) for m in ("a", "b")])
    store.part_files()[0].write_bytes(b"garbage")
    agg = run_aggregates(store)
    assert list(agg["model"]) == ["b"] and list(agg["responses"]) == [2]
    assert len(store.set_aside_files()) == 1
