"""The UI's reading of runs: incremental refresh, rows of one job on demand, older part files."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ui.data
from sweep.record import RESULT_SCHEMA
from sweep.report import run_aggregates
from sweep.store import job_slug
from tests.helpers import make_run, synthetic_rows
from ui.data import DETAIL_COLUMNS, RunsFolder


@pytest.fixture
def scanned(monkeypatch):
    """The part files each read of the UI opens (partial sums or rows), one list per read."""
    calls = []
    for name in ("partials", "results_dataset"):
        def spy(paths, *args, _real=getattr(ui.data, name), **kwargs):
            calls.append(sorted(p.name for p in paths))
            return _real(paths, *args, **kwargs)

        monkeypatch.setattr(ui.data, name, spy)
    return calls


def _same(agg, store):
    want = run_aggregates(store)
    pd.testing.assert_frame_equal(agg[want.columns].reset_index(drop=True), want)


def test_refresh_reads_only_new_part_files(tmp_path, scanned):
    store = make_run(tmp_path, "r", [synthetic_rows("r", "a", "chat", [1.0, 3.0], [1, 1]),
                                     synthetic_rows("r", "b", "chat", [2.0, 2.0], [1, 1])])
    folder = RunsFolder(tmp_path)
    _same(folder.aggregates(), store)
    assert len(scanned) == 1 and len(scanned[0]) == 2
    folder.aggregates()
    assert len(scanned) == 1  # nothing changed: nothing read

    new = store.write_part(synthetic_rows("r", "a", "chat", [5.0, 7.0], [1, 1]), job_slug("a", "chat"))
    agg = folder.aggregates()
    assert scanned[-1] == [new.name]  # only the new file
    _same(agg, store)
    assert agg.set_index("model").loc["a", "energy"] == 4.0 and agg.set_index("model").loc["a", "responses"] == 4

    # a part file that goes away (merged elsewhere, set aside) takes its rows with it
    new.unlink()
    agg = folder.aggregates()
    assert agg.set_index("model").loc["a", "energy"] == 2.0
    _same(agg, store)


def test_rows_of_one_job_on_demand(tmp_path, scanned):
    make_run(tmp_path, "r", [synthetic_rows("r", "a", "chat", [1.0, 3.0], [1, 1]),
                             synthetic_rows("r", "a", "instruct", [5.0], [1]),
                             synthetic_rows("r", "b", "chat", [2.0, 2.0, 2.0], [1, 1, 1])])
    folder = RunsFolder(tmp_path)
    assert folder.jobs("r") == (["a", "b"], ["chat", "instruct"])
    rows = folder.rows("r", "b", "chat")
    assert list(rows.columns) == DETAIL_COLUMNS and len(rows) == 3
    assert rows["response"].tolist() == [f"answer {i} of b" for i in range(3)]
    assert len(scanned[-1]) == 1  # the one file that holds (b, chat)
    assert folder.rows("r", "b", "instruct").empty


def test_imported_run_has_no_rows(tmp_path):
    from sweep.report import AGGREGATES_FILE

    run = make_run(tmp_path, "imp", [synthetic_rows("imp", "a", "chat", [1.0], [1])]).run_dir
    pd.DataFrame({"run_id": ["imp"], "gpu": ["A100"], "model": ["a"], "task": ["chat"], "energy": [1.0],
                  "model_path": ["org/a"]}).to_parquet(run / AGGREGATES_FILE)
    folder = RunsFolder(tmp_path)
    assert folder.aggregates().iloc[0]["backend"] == "fastchat"
    assert folder.jobs("imp") is None and folder.rows("imp", "a", "chat") is None


def test_older_part_file_opens_in_the_ui(tmp_path):
    store = make_run(tmp_path, "old", [synthetic_rows("old", "m", "instruct", [30.0], [3])])
    older = pa.Table.from_pylist(synthetic_rows("old", "m", "chat", [10.0, 20.0], [5, 10]), schema=RESULT_SCHEMA)
    pq.write_table(older.drop_columns(["backend", "compiled", "steps_past_stop", "template"]),
                   store.results_dir / f"{job_slug('m', 'chat')}-old.parquet")
    folder = RunsFolder(tmp_path)
    agg = folder.aggregates().set_index("task")
    assert agg.loc["chat", "backend"] == "unknown" and agg.loc["chat", "energy"] == 15.0
    rows = folder.rows("old", "m", "chat")
    assert len(rows) == 2 and rows["template"].isna().all()


def test_rows_cannot_steer_the_ui_outside_the_runs_folder(tmp_path):
    """A part file whose rows name run_id "../victim" changes nothing outside --runs: runs
    are keyed by their folder, and only folders under --runs are opened."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "manifest.json").write_text("not json")
    (victim / "prompts.parquet").write_text("not parquet")
    runs = tmp_path / "runs"
    make_run(runs, "r", [synthetic_rows("../victim", "a", "chat", [1.0, 3.0], [1, 1])])
    folder = RunsFolder(runs)
    agg = folder.aggregates()
    assert agg["run_id"].tolist() == ["r"]
    for run_id in ("../victim", "..", "/etc", "r/../../victim", ""):
        assert folder.manifest(run_id) == {} and folder.prompts(run_id).empty
        assert folder.rows(run_id, "a", "chat") is None and folder.jobs(run_id) is None
        assert folder.power(run_id, "a", "chat", pd.Timestamp(0, tz="UTC"), pd.Timestamp.now(tz="UTC")).empty
    assert (victim / "manifest.json").read_text() == "not json" and not (victim / ".quarantine").exists()
    assert (victim / "prompts.parquet").read_text() == "not parquet"


def test_a_copied_or_renamed_run_folder_is_one_run_per_folder(tmp_path):
    import shutil

    store = make_run(tmp_path, "r", [synthetic_rows("r", "a", "chat", [1.0, 3.0], [1, 1])])
    shutil.copytree(store.run_dir, tmp_path / "r-copy")
    # a resumed renamed folder holds rows written under both names
    store2 = make_run(tmp_path, "new", [synthetic_rows("old", "a", "chat", [1.0, 3.0], [1, 1])])
    store2.write_part([dict(r, run_id="new", prompt_id=f"q{i}") for i, r in
                       enumerate(synthetic_rows("new", "a", "chat", [5.0], [1]))], job_slug("a", "chat"))
    agg = RunsFolder(tmp_path).aggregates()
    assert sorted(agg["run_id"]) == ["new", "r", "r-copy"]
    assert agg.set_index("run_id").loc["new", "responses"] == 3
    report = run_aggregates(store2)
    assert report["run_id"].tolist() == ["new"] and report["responses"].tolist() == [3]
