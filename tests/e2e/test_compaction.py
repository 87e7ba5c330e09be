"""Compaction: a job's part files merged into one, every row seen exactly once throughout,
across a kill at any step, a full disk, and a live view that watches it happen."""

import errno
import os
import shutil
import subprocess
import sys
from collections import Counter

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ui.data
from sweep.record import POWER_SCHEMA, RESULT_SCHEMA
from sweep.report import run_aggregates
from sweep.store import MERGED_SUFFIX, RunStore, job_slug, part_job
from sweep.store.parts import PartFolder
from sweep.writer import RunWriter
from tests.helpers import ROOT, make_run, synthetic_rows, tmpfs
from ui.data import RunsFolder


def _rows(model, n, start=0, task="chat"):
    rows = synthetic_rows("r", model, task, [float(1 + i % 7) for i in range(start + n)], [5 + i % 3 for i in range(start + n)])
    return rows[start:]


def _job_files(store, model, task="chat"):
    return sorted(p.name for p in store.results_dir.iterdir() if part_job(p.name) == job_slug(model, task))


def _seen(store):
    """(model, task, prompt_id) -> how many times the store's reader returns it."""
    t = store.read_parts(columns=["model", "task", "prompt_id"]).to_pydict()
    return Counter(zip(t["model"], t["task"], t["prompt_id"]))


def _seen_by_pandas(store):
    df = pd.read_parquet(store.results_dir, columns=["model", "task", "prompt_id"])
    return Counter(zip(df["model"], df["task"], df["prompt_id"]))


def _writer_with_rows(tmp_path, n):
    """A session's writer on a new run, job (m, chat) open with n rows appended."""
    store = RunStore(tmp_path / "r")
    store.create()
    (store.locks_dir / "driver.lock").write_text("pid 1 on h\n")
    w = RunWriter(str(store.run_dir), "pid 1 on h")
    token, _ = w.open_job("m", "chat")
    for row in _rows("m", n):
        w.append("m", "chat", token, row)
    return store, w, token


def test_a_job_that_closes_is_one_file(tmp_path):
    store, w, token = _writer_with_rows(tmp_path, 150)
    assert len(_job_files(store, "m")) == 2  # two part files of 64 rows, 22 rows in the log
    w.close_job("m", "chat", token)
    (merged,) = _job_files(store, "m")
    assert merged.endswith(MERGED_SUFFIX)
    assert len(pd.read_parquet(store.results_dir)) == 150
    # rows in the order they were written, every column kept
    assert store.read_parts().equals(pa.Table.from_pylist(_rows("m", 150), schema=RESULT_SCHEMA))
    # a resume adds rows to the job: at its next close, one file again
    token, done = w.open_job("m", "chat")
    assert len(done) == 150
    for row in _rows("m", 30, start=150):
        w.append("m", "chat", token, row)
    w.close_job("m", "chat", token)
    assert len(_job_files(store, "m")) == 1
    assert _seen(store) == Counter({("m", "chat", f"p{i}"): 1 for i in range(180)})


# -- a kill at every step -----------------------------------------------------------------

# The child compacts the run and SIGKILLs itself before its k-th step: a step is each
# call that changes the disk (write of the merged file, fsync, rename, unlink), and a
# write cut in half.
CHILD = r"""
import os, signal, sys
import pyarrow.parquet as pq
from sweep.store import RunStore

kill_at, steps = int(sys.argv[2]), []

def step(name):
    if len(steps) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    steps.append(name)

def wrap(mod, attr):
    real = getattr(mod, attr)
    def call(*args, **kwargs):
        step(attr)
        return real(*args, **kwargs)
    setattr(mod, attr, call)

for attr in ("fsync", "replace", "unlink"):
    wrap(os, attr)
real_write = pq.write_table

def write_table(table, where, **kwargs):
    step("write")
    real_write(table, where, **kwargs)
    if len(steps) == kill_at:  # a write cut short: half the file on disk
        os.truncate(where, os.path.getsize(where) // 2)
    step("write-done")

pq.write_table = write_table
store = RunStore(sys.argv[1])
store.compact_run() if len(sys.argv) < 4 else store.compact_power(sys.argv[3])  # argv[3]: one job's power files
print(" ".join(steps))
"""


def _compact_killed_before(run_dir, k, *slug):
    """CHILD's compaction of the run (or of one job's power files), killed before its k-th
    step: None, or the steps it took when it finished first."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), str(k), *slug], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        return proc.stdout.split()
    assert proc.returncode == -9, proc.stderr[-2000:]
    return None


@pytest.fixture
def half_compacted_run(tmp_path):
    """Job a: an earlier merged file, a small file it replaced that a crash left behind,
    and two newer part files; job b: three part files; job c: one file only."""
    rows_a = _rows("a", 16)
    store = make_run(tmp_path / "pristine", "r", [rows_a[:4], rows_a[4:8], rows_a[8:10]])
    leftover = store.part_files()[0]
    kept = leftover.read_bytes()
    store.compact_run()
    leftover.write_bytes(kept)
    for rows in (rows_a[10:13], rows_a[13:], _rows("b", 3), _rows("b", 4, start=3), _rows("b", 2, start=7),
                 _rows("c", 5)):
        store.write_part(rows, job_slug(rows[0]["model"], "chat"))
    assert len(store.part_files()) == 1 + 2 + 3 + 1 and len(list(store.results_dir.iterdir())) == 8
    return store


def test_a_kill_at_any_step_of_compaction_leaves_every_row_once(tmp_path, half_compacted_run):
    pristine = half_compacted_run
    want = Counter({("a", "chat", f"p{i}"): 1 for i in range(16)} | {("b", "chat", f"p{i}"): 1 for i in range(9)}
                   | {("c", "chat", f"p{i}"): 1 for i in range(5)})
    want_agg = run_aggregates(pristine)
    assert _seen(pristine) == want
    steps = None
    for k in range(100):
        root = tmp_path / f"kill{k}"
        store = RunStore(shutil.copytree(pristine.run_dir, root / "r"))
        live = RunsFolder(root)
        live.aggregates()  # a UI watching the run when the compaction starts
        steps = _compact_killed_before(store.run_dir, k)
        if steps is not None:
            break
        # what every reader sees, before anything cleaned up after the crash
        assert _seen(store) == want, f"killed before step {k}"
        assert {k: len(v) for k, v in store.done_prompt_ids().items()} == {("a", "chat"): 16, ("b", "chat"): 9,
                                                                          ("c", "chat"): 5}
        pd.testing.assert_frame_equal(run_aggregates(store), want_agg)
        for folder in (live, RunsFolder(root)):  # the live view refreshed, and a fresh one
            pd.testing.assert_frame_equal(folder.aggregates()[want_agg.columns], want_agg)
            assert sorted(folder.rows("r", "a", "chat")["prompt_id"]) == sorted(f"p{i}" for i in range(16))
        # pandas sees every row; twice only those of files a merged file replaces
        assert set(_seen_by_pandas(store)) == set(want)
        # a later compaction (the next session's start, or `sweep compact`) finishes it
        store.compact_run()
        assert [len(_job_files(store, m)) for m in "abc"] == [1, 1, 1], f"killed before step {k}"
        assert _seen_by_pandas(store) == want and _seen(store) == want
        assert not [p for p in store.results_dir.iterdir() if p.name.startswith(".")]
        shutil.rmtree(root)
    # every step was a kill point once: writes, fsyncs, renames, removals of both jobs
    assert steps is not None and k == len(steps)
    assert Counter(steps) == {"write": 2, "write-done": 2, "fsync": 6, "replace": 2, "unlink": 4 + 3}


def _power(start, n):
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    return pa.table({"model": ["a"] * n, "task": ["chat"] * n, "host": ["h"] * n, "gpu_index": [0] * n,
                     "timestamp": [t0 + pd.Timedelta(milliseconds=100 * i) for i in range(start, start + n)],
                     "power_w": [100.0 + i for i in range(start, start + n)], "temperature_c": [None] * n},
                    schema=POWER_SCHEMA)


def test_a_kill_at_any_step_of_a_power_compaction_leaves_every_sample_once(tmp_path):
    """The power timeline's files go through the same merge as the rows: an earlier merged
    file, a file it replaced that a crash left behind, and two newer files."""
    slug = job_slug("a", "chat")
    pristine = RunStore(tmp_path / "pristine" / "r")
    for start, n in ((0, 4), (4, 4), (8, 2)):
        pristine.write_power_part(_power(start, n), slug)
    leftover = pristine.power_files()[0]
    kept = leftover.read_bytes()
    pristine.compact_power(slug)
    leftover.write_bytes(kept)
    pristine.write_power_part(_power(10, 3), slug)
    pristine.write_power_part(_power(13, 3), slug)
    want = Counter(range(16))

    def samples(store):
        return Counter(int(w) - 100 for w in store.read_power().column("power_w").to_pylist())

    assert samples(pristine) == want
    steps = None
    for k in range(60):
        store = RunStore(shutil.copytree(pristine.run_dir, tmp_path / f"kill{k}" / "r"))
        steps = _compact_killed_before(store.run_dir, k, slug)
        if steps is not None:
            break
        assert samples(store) == want, f"killed before step {k}"
        store.compact_power(slug)  # the next compaction finishes it
        assert len(store.power_files()) == 1 and samples(store) == want, f"killed before step {k}"
        assert not [p for p in store.power_dir.iterdir() if p.name.startswith(".")]
    assert steps is not None and k == len(steps)
    assert Counter(steps) == {"write": 1, "write-done": 1, "fsync": 3, "replace": 1, "unlink": 1 + 3}


def test_sweep_compact_command(tmp_path, half_compacted_run):
    store = half_compacted_run
    proc = subprocess.run([sys.executable, "-m", "sweep", "compact", store.run_dir], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 job(s) compacted, 7 file(s) replaced; 7 part file(s) before, 3 now" in proc.stdout
    assert len(list(store.results_dir.iterdir())) == 3 and len(pd.read_parquet(store.results_dir)) == 16 + 9 + 5


# -- readers that race a compaction -------------------------------------------------------

def _three_jobs(tmp_path):
    return make_run(tmp_path, "r", [_rows(m, 3, start=s) for m in "ab" for s in (0, 3, 6)])


def test_a_read_that_races_a_compaction_lists_again(tmp_path):
    store = _three_jobs(tmp_path)
    want = _seen(store)
    calls = []

    def read(paths):  # the job is compacted between the listing and the read
        calls.append(paths)
        if len(calls) == 1:
            store.compact(job_slug("a", "chat"))
        return pa.concat_tables([pq.read_table(p, columns=["model", "task", "prompt_id"]) for p in paths])

    table = RunStore(store.run_dir).scan_parts(read)
    assert len(calls) == 2 and len(calls[0]) == 6 and len(calls[1]) == 4
    assert Counter(zip(table["model"].to_pylist(), table["task"].to_pylist(), table["prompt_id"].to_pylist())) == want


def test_a_read_keeps_listing_again_while_compactions_keep_racing_it(tmp_path):
    """However many compactions race a read, it lists again until one read holds (bounded
    in time, not in tries)."""
    store = _three_jobs(tmp_path)
    calls = []

    def read(paths):
        calls.append(paths)
        if len(calls) <= 12:  # each time: a new part file of the job, and the job compacted
            store.write_part(_rows("a", 1, start=100 + len(calls)), job_slug("a", "chat"))
            store.compact(job_slug("a", "chat"))
        return pa.concat_tables([pq.read_table(p, columns=["model", "task", "prompt_id"]) for p in paths])

    table = RunStore(store.run_dir).scan_parts(read)
    assert len(calls) == 13 and table.num_rows == 18 + 12


def test_a_listing_torn_by_a_compaction_is_taken_again(tmp_path, monkeypatch):
    """readdir during a rename and unlinks may return neither the merged file nor the
    files it replaced; part_files notices and lists again."""
    store = _three_jobs(tmp_path)
    small = _job_files(store, "a")
    store.compact(job_slug("a", "chat"))
    real = PartFolder.names
    torn = [True]

    def names(self):
        if torn and torn.pop():
            return {n for n in real(self) if part_job(n) != job_slug("a", "chat")}
        return real(self)

    monkeypatch.setattr(PartFolder, "names", names)
    assert [p.name for p in store.part_files() if part_job(p.name) == job_slug("a", "chat")] == _job_files(store, "a")
    assert not set(small) & set(_job_files(store, "a"))
    assert Counter(m for m, _, _ in _seen(RunStore(store.run_dir)).elements()) == {"a": 9, "b": 9}


def test_the_live_view_drops_the_replaced_files_and_reads_the_merged_one(tmp_path, monkeypatch):
    store = _three_jobs(tmp_path)
    calls = []
    real = ui.data.partials

    def spy(paths, *args, **kwargs):
        calls.append(sorted(p.name for p in paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(ui.data, "partials", spy)
    folder = RunsFolder(tmp_path)
    want = folder.aggregates()
    assert len(calls[-1]) == 6
    store.compact(job_slug("a", "chat"))
    pd.testing.assert_frame_equal(folder.aggregates(), want)
    assert calls[-1] == _job_files(store, "a") and calls[-1][0].endswith(MERGED_SUFFIX)  # only the merged file
    kept = folder._cache["r"]
    assert set(kept.partials["part_file"].to_pylist()) == {p.name for p in store.part_files()}

    # a compaction between the UI's listing and its read of the new files: it lists again
    store.write_part(_rows("b", 2, start=9), job_slug("b", "chat"))
    first = [True]

    def racing(paths, *args, **kwargs):
        if first and first.pop():
            store.compact(job_slug("b", "chat"))
        return spy(paths, *args, **kwargs)

    monkeypatch.setattr(ui.data, "partials", racing)
    agg = folder.aggregates().set_index("model")
    assert agg.loc["b", "responses"] == 11 and agg.loc["a", "responses"] == 9
    assert calls[-1] == _job_files(store, "b")
    # and the detail view of a job whose files went since the leaderboard was read
    folder.aggregates()
    store.write_part(_rows("a", 1, start=9), job_slug("a", "chat"))
    folder.aggregates()
    store.compact(job_slug("a", "chat"))
    assert sorted(folder.rows("r", "a", "chat")["prompt_id"]) == sorted(f"p{i}" for i in range(10))


# -- a full disk --------------------------------------------------------------------------

def test_a_compaction_that_fails_to_write_leaves_the_part_files(tmp_path, monkeypatch, capsys):
    store, w, token = _writer_with_rows(tmp_path, 100)
    real = pq.write_table

    def full(table, where, **kwargs):
        if str(where).endswith(".tmp") and MERGED_SUFFIX in str(where):
            real(table, where, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", full)
    w.close_job("m", "chat", token)  # the rows are stored: the job does not fail
    assert "not compacted (OSError: [Errno 28] No space left on device" in capsys.readouterr().err
    files = sorted(p.name for p in store.results_dir.iterdir())
    assert len(files) == 2 and not any(n.endswith(MERGED_SUFFIX) or n.startswith(".") for n in files)
    assert len(pd.read_parquet(store.results_dir)) == 100 and len(_seen(store)) == 100
    monkeypatch.setattr(pq, "write_table", real)
    assert store.compact_run() == (1, 2, [])


def test_a_compaction_on_a_full_disk_keeps_the_run_readable(tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "size=2m") as mnt:
        store = make_run(mnt, "r", [_rows("m", 40, start=s) for s in range(0, 200, 40)])
        before = sorted(p.name for p in store.results_dir.iterdir())
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 1024)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert store.compact_run() == (0, 0, [])
        assert "not compacted" in capsys.readouterr().err
        assert sorted(p.name for p in store.results_dir.iterdir()) == before
        assert len(pd.read_parquet(store.results_dir)) == 200 and len(_seen(store)) == 200
        filler.unlink()
        assert store.compact_run() == (1, 5, [])
        assert len(pd.read_parquet(store.results_dir)) == 200 and len(list(store.results_dir.iterdir())) == 1


def test_a_damaged_merged_file_is_set_aside_like_any_part_file(tmp_path, capsys):
    store = _three_jobs(tmp_path)
    store.compact(job_slug("a", "chat"))
    (merged,) = [p for p in store.part_files() if p.name.endswith(MERGED_SUFFIX)]
    merged.write_bytes(merged.read_bytes()[:-40])  # cut short: its footer, with the list, is gone
    assert Counter(m for m, _, _ in _seen(RunStore(store.run_dir)).elements()) == {"b": 9}
    assert "damaged part file" in capsys.readouterr().err and len(store.set_aside_files()) == 1
    assert store.done_prompt_ids() == {("b", "chat"): {f"p{i}" for i in range(9)}}  # a resume measures a again


def test_part_files_of_an_older_run_compact_with_the_missing_columns_empty(tmp_path):
    store = make_run(tmp_path, "old", [])
    slug = job_slug("m", "chat")
    for i, rows in enumerate((_rows("m", 3), _rows("m", 2, start=3))):
        older = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA).drop_columns(["backend", "compiled", "template"])
        pq.write_table(older, store.results_dir / f"{slug}-20250101T00000{i}-0000000{i}.parquet")
    before = run_aggregates(store)
    assert store.compact_run() == (1, 2, [])
    (merged,) = store.results_dir.iterdir()
    assert pq.read_schema(merged).names == RESULT_SCHEMA.names
    df = store.read_results()
    assert len(df) == 5 and df["template"].isna().all() and df["backend"].isna().all()
    pd.testing.assert_frame_equal(run_aggregates(store), before)
