"""Hostile input on the command line: exit status 2, one line, nothing written."""

import json
import os
import socket
import time

import pytest

from sweep.cli import main
from tests.helpers import make_run, synthetic_rows, tasks_yaml, tmpfs, write_yaml


def _one_line_error(capsys, rc, expected, warnings=0):
    """Exit status 2 and one error line (after `warnings` lines saying what was set aside)."""
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 + warnings and all(w.startswith("warning: ") for w in lines[:-1]), err
    assert lines[-1].startswith("error: ") and expected in lines[-1], err
    assert "Traceback" not in err
    return lines[-1]


@pytest.fixture
def lineup(tmp_path):
    models = write_yaml(tmp_path / "models.yaml", {"models": [{"name": "a", "path": "random:llama-tiny"}]})
    return models, tasks_yaml(tmp_path), tmp_path / "runs"


@pytest.mark.parametrize("run_id", ["../../x", ".", "..", "x" * 101, "a/b", "-x", "", " x", "x\n"])
def test_run_ids_outside_the_safe_set_are_refused(lineup, tmp_path, capsys, run_id):
    models, tasks, out = lineup
    rc = main(["--config", str(models), "--tasks", str(tasks), "--out", str(out), f"--run-id={run_id}"])
    _one_line_error(capsys, rc, "--run-id")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.yaml", "tasks.yaml"]


def test_import_run_id_is_checked_too(tmp_path, capsys):
    rc = main(["import-mlenergy", str(tmp_path), "--out", str(tmp_path / "runs"), "--run-id", "../x"])
    _one_line_error(capsys, rc, "--run-id")


def _deep(n):
    return "[" * n + "]" * n


@pytest.mark.parametrize("case, expected", [
    ("models-binary", "models.yaml: not UTF-8 text"),
    ("tasks-binary", "tasks.yaml: not UTF-8 text"),
    ("models-deep", "models.yaml: nested too deeply"),
    ("dataset-binary", "data.json: not UTF-8 text"),
    ("dataset-deep", "data.json: nested too deeply"),
    ("dataset-empty-prompts", "data.json: no usable prompts (2 entries, 2 with an empty prompt)"),
    ("dataset-empty-list", "data.json: no usable prompts (0 entries"),
    ("dataset-surrogate", "data.json: [0]: not valid Unicode"),
    ("inf-temperature", "generation.temperature: Input should be a finite number"),
    ("inf-penalty", "generation.repetition_penalty: Input should be a finite number"),
    ("nan-top-p", "generation.top_p: Input should be a finite number"),
    ("inf-params", "models[0].params_b: Input should be a finite number"),
    ("blank-system-prompt", "tasks[0].system_prompt: must not be empty or only whitespace"),
    ("blank-name", "models[0].name: must not be empty or only whitespace"),
    ("newline-name", "models[0].name: must not contain control characters"),
    ("out-is-a-file", "--out: "),
    ("out-under-a-file", "--out: "),
])
def test_bad_input_exit_2_one_line_nothing_written(tmp_path, capsys, case, expected):
    models = write_yaml(tmp_path / "models.yaml", {"models": [{"name": "a", "path": "random:llama-tiny"}]})
    tasks = tasks_yaml(tmp_path)
    out = tmp_path / "runs"
    data = tmp_path / "data.json"
    if case == "models-binary":
        models.write_bytes(b"models:\n  - name: \xff\xfe\x00\x01")
    elif case == "tasks-binary":
        tasks.write_bytes(os.urandom(64) + b"\xff")
    elif case == "models-deep":
        models.write_text("models: " + _deep(5000))
    elif case.startswith("dataset-"):
        content = {"dataset-binary": b'[{"conversations": [{"from": "human", "value": "\xff\xfe"}]}]',
                   "dataset-deep": _deep(100000).encode(),
                   "dataset-empty-prompts": json.dumps([{"conversations": [{"from": "human", "value": "  "}]},
                                                        {"conversations": []}]).encode(),
                   "dataset-empty-list": b"[]",
                   "dataset-surrogate": b'[{"conversations": [{"from": "human", "value": "hi \\ud800"}]}]'}[case]
        data.write_bytes(content)
        text = tasks.read_text().replace("dataset: builtin", f"dataset: {data}")
        tasks.write_text(text)
    elif case == "inf-temperature":
        tasks.write_text(tasks.read_text().replace("temperature: 0.7", "temperature: .inf"))
    elif case == "inf-penalty":
        tasks.write_text(tasks.read_text().replace("repetition_penalty: 1.0", "repetition_penalty: .inf"))
    elif case == "nan-top-p":
        tasks.write_text(tasks.read_text().replace("top_p: 1.0", "top_p: .nan"))
    elif case == "inf-params":
        models.write_text("models:\n  - {name: a, path: 'random:llama-tiny', params_b: .inf}\n")
    elif case == "blank-system-prompt":
        tasks.write_text('tasks:\n  - {name: chat, system_prompt: "  \\t "}\n')
    elif case == "blank-name":
        models.write_text("models:\n  - {name: '   ', path: 'random:llama-tiny'}\n")
    elif case == "newline-name":
        models.write_text('models:\n  - {name: "a\\nb", path: "random:llama-tiny"}\n')
    elif case == "out-is-a-file":
        out.write_text("a file")
    elif case == "out-under-a-file":
        (tmp_path / "f").write_text("a file")
        out = tmp_path / "f" / "runs"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["--config", str(models), "--tasks", str(tasks), "--out", str(out), "--run-id", "x"])
    _one_line_error(capsys, rc, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only mount: not writable even for root."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mnt:
        yield mnt


def test_an_unwritable_out_or_csv_folder_is_refused(lineup, read_only_folder, tmp_path, capsys):
    models, tasks, _ = lineup
    rc = main(["--config", str(models), "--tasks", str(tasks), "--out", str(read_only_folder / "runs")])
    _one_line_error(capsys, rc, "--out: cannot write in")
    run_dir = make_run(tmp_path, "r", [synthetic_rows("r", "m", "chat", [1.0], [3])]).run_dir
    rc = main(["report", str(run_dir), "--csv", str(read_only_folder)])
    _one_line_error(capsys, rc, "--csv: cannot write in")
    (tmp_path / "f.csv").write_text("x")
    rc = main(["report", str(run_dir), "--csv", str(tmp_path / "f.csv")])
    _one_line_error(capsys, rc, "--csv: ")


def test_an_address_nothing_answers_at_fails_fast_before_writing(lineup, capsys, monkeypatch):
    models, tasks, out = lineup
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what joining sets; undone after the test
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    t0 = time.monotonic()
    rc = main(["--config", str(models), "--tasks", str(tasks), "--out", str(out), "--address", f"127.0.0.1:{port}"])
    _one_line_error(capsys, rc, "--address: no Ray cluster answers at")
    assert time.monotonic() - t0 < 30 and not out.exists()
    rc = main(["--config", str(models), "--tasks", str(tasks), "--out", str(out), "--address", "nohost"])
    _one_line_error(capsys, rc, "--address: ")


@pytest.mark.parametrize("damage", ["deleted", "garbage", "not-a-sweep-manifest"])
def test_resume_without_a_usable_manifest_is_refused(lineup, capsys, damage):
    models, tasks, out = lineup
    store = make_run(out, "r", [synthetic_rows("r", "a", "chat", [None, None], [3, 4])])
    if damage == "deleted":
        store.manifest_path.unlink()
    elif damage == "garbage":
        store.manifest_path.write_text('{"run_id": "r", "ta')
    else:
        store.manifest_path.write_text('{"run_id": "r"}')
    rc = main(["--config", str(models), "--tasks", str(tasks), "--out", str(out), "--run-id", "r"])
    line = _one_line_error(capsys, rc, "manifest.json: missing, and the run holds 2 stored row(s)",
                           warnings=int(damage != "deleted"))
    assert "new --run-id" in line
    assert not store.manifest_path.exists() and len(store.set_aside_files()) == (damage != "deleted")
    assert len(store.read_results()) == 2
