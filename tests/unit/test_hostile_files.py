"""Hostile and damaged files that sweep reads: nothing lost or merged that differs, and
every problem a warning (the file set aside, the rest working) or one line with exit 2."""

import errno
import json
import os
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweep.cli import main
from sweep.store import MERGED_SUFFIX, REPLACES_KEY, RESULT_SCHEMA, RunStore, job_slug
from tests.helpers import MLENERGY, make_run, synthetic_rows, tasks_yaml, write_yaml


def _rows(model, n, task="chat", start=0):
    rows = synthetic_rows("r", model, task, [1.0] * (n + start), [5] * (n + start))[start:]
    return rows


def _last_error(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


# -- 1. a merged file replaces only files of its own job ------------------------------------
def test_a_merged_file_naming_another_jobs_files_is_set_aside_and_deletes_nothing(tmp_path, capsys):
    store = make_run(tmp_path, "r", [_rows("victim", 3), _rows("victim", 3, start=3), _rows("a", 3)])
    victims = sorted(p.name for p in store.results_dir.iterdir() if "victim" in p.name)
    table = pa.Table.from_pylist(_rows("a", 2, start=10), schema=RESULT_SCHEMA)
    table = table.replace_schema_metadata({REPLACES_KEY: json.dumps(victims).encode()})
    hostile = store.results_dir / f"{job_slug('a', 'chat')}-20260101T000000-deadbeef{MERGED_SUFFIX}"
    pq.write_table(table, hostile)
    assert main(["compact", str(store.run_dir)]) == 0
    assert "another job" in capsys.readouterr().err
    # the victim's own files were compacted as usual, none of its rows lost
    assert len(store.read_results().query("model == 'victim'")) == 6
    assert main(["validate", str(store.run_dir)]) == 0
    assert not hostile.exists() and len(store.set_aside_files()) == 1


# -- 2. an import never replaces a sweep's run ------------------------------------------------
@pytest.mark.skipif(not MLENERGY.is_dir(), reason="../shared/data is absent")
def test_an_import_onto_a_sweep_run_is_refused_and_changes_nothing(tmp_path, capsys):
    store = make_run(tmp_path, "X", [_rows("a", 3)])
    before = store.manifest_path.read_bytes()
    rc = main(["import-mlenergy", str(MLENERGY), "--out", str(tmp_path), "--run-id", "X"])
    assert "already holds a sweep's run" in _last_error(capsys, rc)
    assert store.manifest_path.read_bytes() == before and not (store.run_dir / "aggregates.parquet").exists()
    # an earlier import is replaced
    assert main(["import-mlenergy", str(MLENERGY), "--out", str(tmp_path), "--run-id", "imp"]) == 0
    assert main(["import-mlenergy", str(MLENERGY), "--out", str(tmp_path), "--run-id", "imp"]) == 0


def test_an_import_waits_for_no_one_while_a_sweep_holds_the_folder(tmp_path, capsys):
    store = RunStore(tmp_path / "busy")
    src = _good_source(tmp_path)
    with store.driver_lock():
        rc = main(["import-mlenergy", str(src), "--out", str(tmp_path), "--run-id", "busy"])
    assert "being written by another sweep" in _last_error(capsys, rc)


# -- 17. damaged import inputs: one line each ----------------------------------------------
def _good_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "A40_chat_benchmark.csv").write_text("model,throughput,response_length,latency,energy\n"
                                                "org/a,10,100,5,500\norg/b,20,50,2.5,200\n")
    (src / "models.json").write_text(json.dumps({"org/a": {"url": "https://x", "params": 7}, "org/b": {"params": 13}}))
    (src / "score.csv").write_text("model,arc,hellaswag,truthfulqa\norg/a,50,70,40\norg/b,51,71,41\n")
    return src


@pytest.mark.parametrize("damage, expected", [
    (lambda s: (s / "A40_chat_benchmark.csv").write_bytes(os.urandom(300) + b"\xff\xfe"), "A40_chat_benchmark.csv: "),
    (lambda s: (s / "A40_chat_benchmark.csv").write_bytes(b"model,energy\n\xff\xfe,1\n"), "not UTF-8 text"),
    (lambda s: (s / "models.json").write_text("{not json"), "models.json: not valid JSON"),
    (lambda s: (s / "models.json").write_text("[1, 2]"), "models.json: expected an object"),
    (lambda s: (s / "models.json").write_text('{"org/a": {"params": "seven"}}'), "org/a.params: 'seven' is not a positive"),
    (lambda s: (s / "score.csv").write_text("name,arc\nx,1\n"), "score.csv: missing column(s) model"),
    (lambda s: (s / "A40_chat_benchmark.csv").write_text(""), "A40_chat_benchmark.csv: empty file"),
    (lambda s: (s / "A40_chat_benchmark.csv").write_text("model,throughput,response_length,latency,energy\n"),
     "A40_chat_benchmark.csv: no rows"),
    (lambda s: (s / "A40_chat_benchmark.csv").write_text("model,throughput,response_length,latency,energy\n"
                                                         "org/a,10,100,5,lots\n"), "row 2: energy: 'lots' is not a finite"),
    (lambda s: (s / "A40_chat_benchmark.csv").write_text("model,throughput,response_length,latency,energy\n"
                                                         "org/a,10,100,5,inf\n"), "row 2: energy: 'inf' is not a finite"),
    (lambda s: (s / "score.csv").write_text("model,arc\norg/a,1\norg/a,2\n"), "score.csv: model 'org/a' appears twice"),
    (lambda s: (s / "V100_chat_benchmark.csv").mkdir(), "V100_chat_benchmark.csv: not a file"),
    (lambda s: (s / "models.json").write_text('{"org/a": {"params": 1e999}}'), "models.json: not valid JSON"),
])
def test_damaged_import_inputs_are_one_line_each(tmp_path, capsys, damage, expected):
    src = _good_source(tmp_path)
    damage(src)
    rc = main(["import-mlenergy", str(src), "--out", str(tmp_path / "runs")])
    assert expected in _last_error(capsys, rc)
    assert not (tmp_path / "runs").exists()


def test_a_good_import_still_reads(tmp_path):
    assert main(["import-mlenergy", str(_good_source(tmp_path)), "--out", str(tmp_path / "runs"), "--run-id", "i"]) == 0
    from sweep.report import run_aggregates

    agg = run_aggregates(RunStore(tmp_path / "runs" / "i")).set_index("model")
    assert agg.loc["org/a", "energy_per_token"] == 5.0 and agg.loc["org/b", "arc"] == 51


# -- 7. the dataset changed between sessions -----------------------------------------------
def _sharegpt(path, texts):
    path.write_text(json.dumps([{"id": f"p{i}", "conversations": [{"from": "human", "value": t}]}
                                for i, t in enumerate(texts)]))
    return path


def _started_run(tmp_path, texts):
    """A run folder as a first session leaves it (manifest, prompts), on a ShareGPT file."""
    from sweep.manifest import new_manifest, prompts_digest
    from sweep.session import Request, load_inputs

    data = _sharegpt(tmp_path / "data.json", texts)
    models = write_yaml(tmp_path / "models.yaml", {"models": [{"name": "a", "path": "random:llama-tiny"}]})
    tasks = tasks_yaml(tmp_path)
    spec = write_yaml(tasks, {**__import__("yaml").safe_load(tasks.read_text()),
                              "prompts": {"dataset": str(data), "num_prompts": 3, "seed": 0}})

    inputs = load_inputs(Request(config=str(models), tasks=str(spec)))
    m, t, prompt_set = inputs.models, inputs.tasks, inputs.prompt_set
    store = RunStore(tmp_path / "runs" / "r")
    store.create()
    store.write_prompts(prompt_set.prompts)
    store.write_manifest(new_manifest("r", m, t, {"source": prompt_set.source, "count": 3,
                                                  "sha256": prompts_digest(prompt_set.prompts)}))
    return store, data, ["--config", str(models), "--tasks", str(spec), "--out", str(tmp_path / "runs"),
                         "--run-id", "r", "--dry-run"]


def test_a_resume_after_the_dataset_changed_is_refused(tmp_path, capsys):
    store, data, args = _started_run(tmp_path, ["one", "two", "three"])
    assert main(args) == 0
    capsys.readouterr()
    _sharegpt(data, ["one", "two, edited", "three"])
    line = _last_error(capsys, main(args))
    assert "data.json: prompt 'p1' has another text since the run was started" in line and "new --run-id" in line
    # the same check holds where prompts.parquet was lost: the manifest's digest of the prompts
    store.prompts_path.unlink()
    assert "the sampled prompts differ" in _last_error(capsys, main(args))


# -- 6. a resume of a renamed folder takes the folder's name, and says so -----------------------
def test_a_resume_of_a_renamed_folder_adopts_the_folder_name(tmp_path, capsys):
    store, data, args = _started_run(tmp_path, ["one", "two", "three"])
    os.rename(store.run_dir, store.run_dir.with_name("renamed"))
    args[args.index("r")] = "renamed"
    assert main(args) == 0
    assert "was run 'r' (the folder was renamed or copied)" in capsys.readouterr().out


# -- 8. validate with no manifest -------------------------------------------------------------
def test_validate_says_completeness_was_not_checked_without_a_manifest(tmp_path, capsys):
    store = make_run(tmp_path, "r", [_rows("a", 3)])
    store.manifest_path.unlink()
    assert main(["validate", str(store.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "no manifest" in out and "completeness not checked" in out
    assert main(["validate", str(store.run_dir), "--strict"]) == 1


# -- 9. a failure record does not outlive its job ----------------------------------------------
def test_a_complete_jobs_failure_record_is_cleared_by_the_next_session(tmp_path, capsys):
    store, data, args = _started_run(tmp_path, ["one", "two", "three"])
    prompts = store.read_prompts()
    for task in ("chat", "instruct"):
        rows = synthetic_rows("r", "a", task, [1.0] * 3, [5] * 3)
        store.write_part([dict(r, prompt_id=p) for r, p in zip(rows, prompts["prompt_id"])], job_slug("a", task))
    store.record_failure("a", "chat", "ActorDiedError: the writer died during compaction")
    assert main(["validate", str(store.run_dir)]) == 1
    run = [a for a in args if a != "--dry-run"]
    assert main(run) == 0 and "Nothing to do" in capsys.readouterr().out
    assert store.failures() == [] and main(["validate", str(store.run_dir)]) == 0


# -- 11. results/ on another filesystem ---------------------------------------------------------
def test_a_damaged_file_on_another_filesystem_is_set_aside_by_copying(tmp_path, monkeypatch, capsys):
    store = make_run(tmp_path, "r", [_rows("a", 3), _rows("b", 3)])
    damaged = store.part_files()[0]
    damaged.write_bytes(b"garbage")
    real = os.replace

    def cross_device(src, dst):
        if ".quarantine" in str(dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", cross_device)
    assert len(store.read_results()) == 3
    assert not damaged.exists() and [p.read_bytes() for p in store.set_aside_files()] == [b"garbage"]


# -- 12, 14. manifests that parse but are not manifests -------------------------------------------
@pytest.mark.parametrize("text", ['{"run_id": "r", "kind": "per-request", "x": 1e999}',
                                  '{"run_id": "r", "gpus": ["H100"]}', '{"run_id": "r", "sessions": [1]}',
                                  '{"run_id": "r", "models": {"a": 1}}', '{"run_id": 5}', '{"run_id": "r", "y": NaN}'])
def test_a_manifest_of_the_wrong_shape_is_set_aside_and_the_other_runs_keep_working(tmp_path, capsys, text):
    from ui.data import RunsFolder

    bad = make_run(tmp_path, "bad", [_rows("a", 3)])
    make_run(tmp_path, "good", [_rows("b", 2)])
    bad.manifest_path.write_text(text)
    folder = RunsFolder(tmp_path)
    agg = folder.aggregates()
    assert sorted(agg["run_id"]) == ["bad", "good"]
    assert folder.manifest("bad") == {} and folder.manifest("good")["run_id"] == "good"
    assert "damaged manifest" in capsys.readouterr().err and not bad.manifest_path.exists()


def test_a_resume_whose_manifest_holds_an_infinite_number_is_refused_not_crashed(tmp_path, capsys):
    store, data, args = _started_run(tmp_path, ["one", "two", "three"])
    store.write_part(_rows("a", 1), job_slug("a", "chat"))
    m = json.loads(store.manifest_path.read_text())
    m["host"] = "h"
    store.manifest_path.write_text(json.dumps(m)[:-1] + ', "big": 1e999}')
    line = _last_error(capsys, main(args))
    assert "manifest.json: missing" in line


# -- 18. prompts.parquet of the wrong shape --------------------------------------------------------
@pytest.mark.parametrize("table", [pa.table({"prompt_id": [1, 2], "prompt": ["a", "b"]}),
                                   pa.table({"id": ["p0"], "prompt": ["a"]}),
                                   pa.table({"prompt_id": ["p0", None], "prompt": ["a", "b"]}),
                                   pa.table({"prompt_id": ["p0", "p0"], "prompt": ["a", "b"]})])
def test_a_prompts_file_of_the_wrong_shape_is_set_aside(tmp_path, capsys, table):
    store = make_run(tmp_path, "r", [_rows("a", 3)])
    pq.write_table(table, store.prompts_path)
    assert main(["report", str(store.run_dir)]) == 0
    assert main(["validate", str(store.run_dir)]) in (0, 1)
    err = capsys.readouterr().err
    assert "damaged prompts file" in err and "Traceback" not in err and not store.prompts_path.exists()


# -- 15, 16. rows and imports the UI must survive ------------------------------------------------
def test_the_model_detail_shows_rows_without_a_start_time(tmp_path):
    from ui.data import RunsFolder
    from ui.tabs.detail import model_detail

    rows = [dict(r, started_at=None) for r in _rows("a", 3)]
    make_run(tmp_path, "r", [rows, _rows("b", 2)])
    folder = RunsFolder(tmp_path)
    summary, *_, note, checks = model_detail(folder, "r", "a", "chat")
    assert summary.startswith("**a / chat** in r") and "3 responses" in summary and "No power timeline" in note
    assert "No reference checks" in checks
    assert model_detail(folder, "r", "b", "chat")[0].startswith("**b / chat**")


def test_an_imported_infinite_figure_reads_as_missing(tmp_path):
    from sweep.report import AGGREGATES_FILE, read_imported

    run = tmp_path / "imp"
    run.mkdir()
    pd.DataFrame({"model": ["a", "b"], "gpu": ["A40"] * 2, "task": ["chat"] * 2, "energy": [float("inf"), 1.0],
                  "response_length": [0.0, 3.0]}).to_parquet(run / AGGREGATES_FILE)
    agg = read_imported(run / AGGREGATES_FILE)
    assert agg["energy"].isna().tolist() == [True, False]


# -- messages: a damaged power file is named as one ----------------------------------------------
def test_a_damaged_power_file_is_named_when_compacting(tmp_path, capsys):
    from sweep.record import POWER_SCHEMA

    store = make_run(tmp_path, "r", [_rows("a", 3)])
    slug = job_slug("a", "chat")
    sample = pa.Table.from_pylist([{"model": "a", "task": "chat", "host": "h", "gpu_index": 0, "timestamp": 1,
                                    "power_w": 1.0, "temperature_c": None}], schema=POWER_SCHEMA)
    store.write_power_part(sample, slug)
    store.write_power_part(sample, slug).write_bytes(b"garbage")
    assert main(["compact", str(store.run_dir)]) == 0
    err = capsys.readouterr().err
    assert "damaged power timeline file" in err and "part files are read as they are" not in err
    assert store.read_power().num_rows == 1


def test_a_copied_folder_is_its_own_run(tmp_path):
    from sweep.report import run_aggregates

    store = make_run(tmp_path, "r", [_rows("a", 3)])
    shutil.copytree(store.run_dir, tmp_path / "copy")
    assert run_aggregates(RunStore(tmp_path / "copy"))["run_id"].tolist() == ["copy"]


def test_limit_sliders_stay_finite_with_empty_responses_and_odd_figures():
    from ui.views import limit_maxima

    df = pd.DataFrame({"latency": [2.0, 4.0, 1.0], "response_length": [100.0, 0.0, 50.0],
                       "energy": [10.0, float("inf"), None]})
    assert limit_maxima(df, per_token=True) == (21.0, 10.5)
    assert limit_maxima(df, per_token=False) == (4.2, 10.5)
    assert limit_maxima(df.assign(energy=None), per_token=True)[1] is None


def test_damaged_imported_aggregates_are_set_aside(tmp_path, capsys):
    from sweep.report import AGGREGATES_FILE
    from ui.data import RunsFolder

    make_run(tmp_path, "good", [_rows("b", 2)])
    (tmp_path / "imp").mkdir()
    (tmp_path / "imp" / AGGREGATES_FILE).write_bytes(b"garbage")
    agg = RunsFolder(tmp_path).aggregates()
    assert agg["run_id"].tolist() == ["good"] and "damaged imported aggregates" in capsys.readouterr().err
