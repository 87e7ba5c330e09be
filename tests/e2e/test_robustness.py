"""End to end on CPU: odd model names, damaged part files, SIGTERM and a second Ctrl-C, two
drivers on one run, a disk that fills up."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from tests.helpers import ROOT, run_sweep_cli, tasks_yaml, tmpfs, write_yaml
from tests.e2e.test_sweep import _start, _stored_ids, _wait_for_rows

HOSTILE_NAMES = ["_baseline", "Ωmega", "../../etc", "a name with spaces"]


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """Four models whose names old slugs hid from readers; one task, three prompts."""
    tmp = tmp_path_factory.mktemp("hostile")
    models = write_yaml(tmp / "models.yaml", {"models": [
        {"name": n, "path": "random:llama-tiny", "conv_template": "vicuna_v1.1"} for n in HOSTILE_NAMES]})
    args = ["--config", models, "--tasks", tasks_yaml(tmp, tasks=("chat",), max_new_tokens=4, warmup_requests=0),
            "--out", tmp / "runs", "--run-id", "h", "--max-prompts", "3", "--cpu-workers", "2", "--no-dashboard",
            "--no-progress"]
    return run_sweep_cli(*args), tmp / "runs" / "h", args


def folder_jobs(folder):
    models, tasks = folder.jobs("h")
    return [(m, t) for m in models for t in tasks]


def test_any_model_name_is_stored_once_and_seen_by_every_reader(hostile_run):
    from ui.data import RunsFolder

    proc, run_dir, args = hostile_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_parquet(run_dir / "results")
    assert len(df) == 4 * 3 and not df.duplicated(["model", "task", "prompt_id"]).any()
    assert sorted(df["model"].unique()) == sorted(HOSTILE_NAMES)
    folder = RunsFolder(run_dir.parent)
    agg = folder.aggregates()
    assert sorted(agg["model"]) == sorted(HOSTILE_NAMES) and (agg["responses"] == 3).all()
    ui_ids = sorted((m, t, p) for m, t in folder_jobs(folder) for p in folder.rows("h", m, t)["prompt_id"])
    assert ui_ids == sorted(zip(df["model"], df["task"], df["prompt_id"]))
    assert not (run_dir.parent.parent / "etc").exists()  # the name is no path
    # resume sees them as stored, and closes its session (the UI would show it running)
    rerun = run_sweep_cli(*args)
    assert rerun.returncode == 0 and "Nothing to do" in rerun.stdout, rerun.stdout + rerun.stderr
    sessions = json.loads((run_dir / "manifest.json").read_text())["sessions"]
    assert all("finished_at" in s for s in sessions) and sessions[-1]["written"] == 0


def test_damaged_part_files_are_set_aside_and_measured_again(hostile_run):
    proc, run_dir, args = hostile_run
    parts = sorted((run_dir / "results").glob("*.parquet"))
    assert len(parts) == 4
    cut, garbage = parts[0], parts[1]
    cut.write_bytes(cut.read_bytes()[:100])
    garbage.write_bytes(b"\x00garbage" * 50)
    # a dry run says what it would do and moves nothing
    dry = run_sweep_cli(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "2 of 4 job(s) to run" in dry.stdout and dry.stderr.count("damaged part file") == 2
    assert cut.exists() and garbage.exists()
    # a resume sets them aside and measures their rows again
    rerun = run_sweep_cli(*args)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert rerun.stderr.count("damaged part file") == 2 and "Stored 6 new row(s)" in rerun.stdout
    df = pd.read_parquet(run_dir / "results")
    assert len(df) == 12 and not df.duplicated(["model", "task", "prompt_id"]).any()
    assert len(list((run_dir / ".quarantine").iterdir())) == 2
    report = run_sweep_cli("report", run_dir)
    assert report.returncode == 0 and "2 damaged part files: their rows are not counted" in report.stdout


def test_sigterm_stops_like_ctrl_c_and_a_second_driver_is_refused(tmp_path):
    out = tmp_path / "runs"
    run_dir = out / "t"
    cmd, proc = _start(tmp_path, out, "t", prompts=20)
    _wait_for_rows(run_dir, 4, proc)
    second = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    assert "run is being written by another sweep (pid" in second.stderr and len(second.stderr.splitlines()) == 1
    os.kill(proc.pid, signal.SIGTERM)  # the driver only, as a batch scheduler does
    stdout, _ = proc.communicate(timeout=120)
    text = stdout.decode()
    assert proc.returncode == 130, text[-3000:]
    assert "Interrupted. Rerun with --run-id t to finish" in text and "Traceback" not in text
    sessions = json.loads((run_dir / "manifest.json").read_text())["sessions"]
    assert len(sessions) == 1 and sessions[0]["interrupted"] is True and "finished_at" in sessions[0]

    # a second Ctrl-C while the first is being handled: a quick and quiet exit
    _, proc = _start(tmp_path, out, "t", prompts=20)
    _wait_for_rows(run_dir, len(_stored_ids(run_dir)) + 2, proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.6)  # signals closer together than the driver's wait in Ray may count as one
    t0 = time.monotonic()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    text = stdout.decode()
    assert proc.returncode == 130 and time.monotonic() - t0 < 15, text[-3000:]
    assert "Interrupted" in text and "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    time.sleep(1)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    rerun = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    df = pd.read_parquet(run_dir / "results")
    assert len(df) == 40 and not df.duplicated(["model", "task", "prompt_id"]).any()


def test_a_second_interrupt_ends_the_process_at_once(monkeypatch):
    import sweep.session as session

    class Exited(BaseException):
        pass

    done = []

    def exit_now(code):
        done.append(code)
        raise Exited

    monkeypatch.setattr(session, "_end_children", lambda: done.append("children"))
    monkeypatch.setattr(session.os, "_exit", exit_now)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Exited):
        with session._interrupts(lambda: done.append("session closed")):
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)  # the first: stop cleanly
                time.sleep(5)
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
            time.sleep(5)
    assert done == ["session closed", "children", 130]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB disk that really fills up."""
    with tmpfs(tmp_path / "disk", "size=4m") as mnt:
        yield mnt


def _fill(path: Path) -> None:
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


def test_a_full_disk_is_reported_once_and_the_resume_completes(tmp_path, small_disk):
    out = small_disk / "runs"
    run_dir = out / "d"
    cmd, proc = _start(tmp_path, out, "d", prompts=20)
    _wait_for_rows(run_dir, 4, proc)
    filler = small_disk / "filler"
    _fill(filler)
    stdout, _ = proc.communicate(timeout=300)
    text = stdout.decode()
    assert proc.returncode == 1, text[-3000:]
    assert text.count("disk full: ") == 1 and "Traceback" not in text, text[-3000:]
    assert "rerun with --run-id d to finish" in text
    filler.unlink()
    rerun = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    df = pd.read_parquet(run_dir / "results")
    assert len(df) == 40 and not df.duplicated(["model", "task", "prompt_id"]).any()
    assert not list(run_dir.rglob(".*.tmp"))
