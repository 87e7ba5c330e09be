"""End to end on CPU: the real Ray driver, real actors, real (random-weight) models."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from sweep.store import RunStore

from tests.helpers import ROOT, kill_worker_and_finish, run_sweep_cli, tasks_yaml, write_yaml

LINEUP = ROOT / "models.yaml"
MAX_NEW = 160
REQUIRED = ["run_id", "model", "task", "gpu_name", "gpu_index", "prompt_id", "prompt_tokens", "response_tokens",
            "latency_s", "throughput_tok_s", "energy_j", "response", "started_at", "backend", "dtype", "temperature"]


def _spans(df):
    end = df["started_at"] + pd.to_timedelta(df["latency_s"], unit="s")
    return df["started_at"].min(), end.max()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The shipped lineup, two CPU workers, 2 tasks x 6 prompts."""
    tmp = tmp_path_factory.mktemp("default")
    # long enough responses that the two workers overlap even when one starts seconds late
    tasks = tasks_yaml(tmp, max_new_tokens=MAX_NEW)
    out = tmp / "runs"
    t0 = time.time()
    proc = run_sweep_cli("--config", LINEUP, "--tasks", tasks, "--out", out, "--run-id", "r",
                         "--cpu-workers", "2", "--max-prompts", "6", "--no-dashboard")
    return proc, out / "r", time.time() - t0


def test_default_lineup_two_workers(default_run):
    proc, run_dir, _ = default_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_parquet(run_dir / "results")
    # not a terminal: one progress line per job with an ETA; the run says at once why energy
    # is empty, and ends with the leaderboard it made and where the dataset is
    assert proc.stdout.count("ETA") == 4 and "small-llama2 / instruct: 6/6 stored." in proc.stdout
    assert "No NVIDIA GPU in the cluster: energy_j will be empty" in proc.stdout
    tail = proc.stdout.split("Stored 24 new row(s)")[1]
    assert "== CPU / chat" in tail and "tiny-vicuna" in tail and f"Dataset: {run_dir / 'results'}" in tail
    assert set(REQUIRED) <= set(df.columns)
    assert len(df) == 2 * 2 * 6
    assert not df.duplicated(["model", "task", "prompt_id"]).any()
    assert set(df["model"]) == {"tiny-vicuna", "small-llama2"}
    assert set(df["template"]) == {"fastchat:vicuna_v1.1", "fastchat:llama-2"}
    # CPU: no energy counter, so no number, and the row says why
    assert df["energy_j"].isna().all() and (df["energy_note"] == "no GPU energy counter (CPU run)").all()
    assert (df["dtype"] == "float32").all() and (df["temperature"] == 0.7).all()
    assert (df["response_tokens"] <= MAX_NEW).all() and (df["response_tokens"] > 0).any()
    assert ((df["response_tokens"] == MAX_NEW) == (df["stop_reason"] == "length")).all()
    assert ((df["throughput_tok_s"] - df["response_tokens"] / df["latency_s"]).abs() < 1e-6).all()
    # the same prompts for every model and task
    ids = df.groupby(["model", "task"])["prompt_id"].apply(frozenset)
    assert ids.nunique() == 1
    # both models ran at the same time, on two workers
    a, b = (_spans(g) for _, g in df.groupby("model"))
    assert a[0] < b[1] and b[0] < a[1], "the two models did not overlap in time"
    # readable by pyarrow as a dataset too, and the manifest says what ran
    assert ds.dataset(run_dir / "results").count_rows() == len(df)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"versions", "models", "tasks", "host", "started_at", "gpus"} <= set(manifest)
    assert manifest["versions"]["ray"] == "2.60.0" and manifest["versions"]["fschat"] == "0.2.36"
    assert not any((run_dir / "wal").iterdir())


def test_rerun_of_a_finished_run_does_nothing(default_run):
    _, run_dir, _ = default_run
    before = sorted(p.name for p in (run_dir / "results").iterdir())
    proc = run_sweep_cli("--config", LINEUP, "--tasks", run_dir.parent.parent / "tasks.yaml", "--out", run_dir.parent,
                         "--run-id", "r", "--max-prompts", "6", "--no-dashboard")
    assert proc.returncode == 0 and "Nothing to do" in proc.stdout
    assert sorted(p.name for p in (run_dir / "results").iterdir()) == before


def test_report_and_csv(default_run, tmp_path):
    _, run_dir, _ = default_run
    proc = run_sweep_cli("report", run_dir, "--csv", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "== CPU / chat" in proc.stdout and "tiny-vicuna" in proc.stdout
    csv = pd.read_csv(tmp_path / "CPU_chat_benchmark.csv")
    assert list(csv.columns) == ["model", "throughput", "response_length", "latency", "energy"]
    rows = pd.read_parquet(run_dir / "results")
    tiny = rows[(rows["model"] == "tiny-vicuna") & (rows["task"] == "chat")]
    got = csv.set_index("model").loc["tiny-vicuna"]
    assert got["response_length"] == pytest.approx(tiny["response_tokens"].mean())
    assert got["latency"] == pytest.approx(tiny["latency_s"].mean())


def _stored_ids(run_dir):
    """(model, prompt_id) of rows stored now: in Parquet, or only in the write-ahead log."""
    ids = set()
    if (run_dir / "results").is_dir():
        t = RunStore(run_dir).read_parts(columns=["model", "prompt_id"]).to_pydict()
        ids |= set(zip(t["model"], t["prompt_id"]))
    if (run_dir / "wal").is_dir():
        for p in (run_dir / "wal").glob("*.jsonl"):
            for line in p.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # being written
                    continue
                ids.add((row["model"], row["prompt_id"]))
    return ids


def _stored_rows(run_dir):
    return len(_stored_ids(run_dir))


def _start(tmp_path, out, run_id, prompts):
    tasks = tasks_yaml(tmp_path, tasks=("chat",), max_new_tokens=64)
    cmd = [sys.executable, "-m", "sweep", "--config", LINEUP, "--tasks", tasks, "--out", out, "--run-id", run_id,
           "--cpu-workers", "2", "--max-prompts", str(prompts), "--no-dashboard", "--no-progress"]
    return cmd, subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)


def _wait_for_rows(run_dir, n, proc, timeout=180):
    deadline = time.time() + timeout
    while _stored_rows(run_dir) < n:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "no progress"
        time.sleep(0.2)


def test_resume_after_sigkill_of_the_driver(tmp_path):
    out = tmp_path / "runs"
    run_dir = out / "k"
    cmd, proc = _start(tmp_path, out, "k", prompts=30)
    _wait_for_rows(run_dir, 8, proc)
    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _stored_ids(run_dir)
    assert 8 <= len(at_kill) < 60
    # Workers of the killed driver may finish their request in flight (and hold their
    # job's lock until they exit); the rerun waits for them rather than write twice.
    rerun = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "Resuming run k" in rerun.stdout
    df = pd.read_parquet(run_dir / "results")
    assert len(df) == 2 * 30
    assert not df.duplicated(["model", "task", "prompt_id"]).any()
    # what was stored before the kill was kept, not measured again
    assert at_kill <= set(zip(df["model"], df["prompt_id"]))
    new = int(rerun.stdout.split("Stored ")[1].split()[0])
    assert new <= 60 - len(at_kill)
    # each job ended in one file: its part files from both sessions compacted when it closed
    assert sorted(p.name.split("__")[0] for p in (run_dir / "results").iterdir()) == ["small-llama2", "tiny-vicuna"]
    # Ray's agents outlive a SIGKILLed driver; the next sweep on the machine ended them
    left = [p for p in ray_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:
        p.kill()
    assert not left, [p.name() for p in left]
    assert "left by the Ray instance of a sweep whose driver was killed" in rerun.stdout


def test_a_killed_worker_is_replaced_and_its_job_finished(tmp_path):
    out = tmp_path / "runs"
    run_dir = out / "w"
    _, proc = _start(tmp_path, out, "w", prompts=30)
    _wait_for_rows(run_dir, 6, proc)
    kill_worker_and_finish(proc, psutil.Process(proc.pid).children(recursive=True), "tiny-vicuna / chat")
    df = pd.read_parquet(run_dir / "results")
    assert len(df) == 60 and not df.duplicated(["model", "task", "prompt_id"]).any()


def test_a_model_that_fails_to_load_is_recorded_and_the_rest_finish(tmp_path):
    models = write_yaml(tmp_path / "models.yaml", {"models": [
        {"name": "ok", "path": "random:llama-tiny", "conv_template": "vicuna_v1.1"},
        {"name": "broken", "path": str(tmp_path / "no-such-model")},
    ]})
    out = tmp_path / "runs"
    proc = run_sweep_cli("--config", models, "--tasks", tasks_yaml(tmp_path), "--out", out, "--run-id", "f",
                         "--cpu-workers", "2", "--no-dashboard", "--no-progress")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 job(s) failed" in proc.stdout and "broken / chat" in proc.stdout
    failures = [json.loads(p.read_text()) for p in (out / "f" / "failures").glob("*.json")]
    assert {f["task"] for f in failures} == {"chat", "instruct"} and all(f["model"] == "broken" for f in failures)
    df = pd.read_parquet(out / "f" / "results")
    assert set(df["model"]) == {"ok"} and len(df) == 2 * 4


def test_joins_an_existing_cluster_with_address(tmp_path):
    import socket
    import tempfile

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    # --block keeps this cluster tied to one process group, which the test ends (no `ray stop`,
    # which would stop every Ray cluster on the machine)
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
                             "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", temp_dir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc = None
        for _ in range(3):  # the head takes a few seconds to come up
            time.sleep(5)
            proc = run_sweep_cli("--config", LINEUP, "--tasks", tasks_yaml(tmp_path, tasks=("chat",)), "--out",
                                 tmp_path / "runs", "--run-id", "c", "--address", f"127.0.0.1:{port}",
                                 "--cpu-workers", "2", "--no-progress")
            if proc.returncode == 0:
                break
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"Connecting to existing Ray cluster at address: " in proc.stderr and f":{port}" in proc.stderr
    df = pd.read_parquet(tmp_path / "runs" / "c" / "results")
    assert len(df) == 2 * 4


def test_ctrl_c_stops_cleanly_and_the_rerun_finishes(tmp_path):
    out = tmp_path / "runs"
    run_dir = out / "i"
    cmd, proc = _start(tmp_path, out, "i", prompts=30)
    _wait_for_rows(run_dir, 6, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground process group
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout.decode()[-2000:]
    assert "Rerun with --run-id i to finish" in stdout.decode()
    at_stop = _stored_ids(run_dir)
    rerun = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    df = pd.read_parquet(run_dir / "results")
    assert len(df) == 60 and not df.duplicated(["model", "task", "prompt_id"]).any()
    assert at_stop <= set(zip(df["model"], df["prompt_id"]))


def test_validate_a_complete_run_then_damaged_copies(default_run, tmp_path):
    import shutil

    _, run_dir, _ = default_run
    df = pd.read_parquet(run_dir / "results")
    # rows cut at max_new_tokens say so; CPU rows carry no energy flags
    assert (df["quality_flags"].map(list) == df["stop_reason"].map(lambda r: ["max_new_tokens"] if r == "length" else [])).all()
    proc = run_sweep_cli("validate", run_dir)
    assert proc.returncode == 0 and "PASSED: 0 error(s)" in proc.stdout, proc.stdout + proc.stderr
    assert "ok       complete           4/4 passed" in proc.stdout
    report = run_sweep_cli("report", run_dir)
    assert " validation" in report.stdout and " ok" in report.stdout

    missing = shutil.copytree(run_dir, tmp_path / "missing")
    part = sorted((missing / "results").glob("small-llama2__instruct*.parquet"))[0]
    lost = pq.read_table(part).num_rows
    part.unlink()
    proc = run_sweep_cli("validate", missing)
    assert proc.returncode == 1, proc.stdout
    assert f"ERROR    complete           small-llama2 / instruct: {6 - lost} of 6 prompts stored, {lost} missing" in proc.stdout

    twice = shutil.copytree(run_dir, tmp_path / "twice")
    part = sorted((twice / "results").glob("tiny-vicuna__chat*.parquet"))[0]
    shutil.copy(part, part.with_name("tiny-vicuna__chat-copy.parquet"))
    proc = run_sweep_cli("validate", twice, "--json")
    assert proc.returncode == 1
    failed = [e for e in json.loads(proc.stdout) if not e["passed"]]
    assert [(e["check"], e["model"], e["task"]) for e in failed] == [("stored_once", "tiny-vicuna", "chat")]
    assert f"{pq.read_table(part).num_rows} duplicated" in failed[0]["message"]


def test_rows_left_only_in_a_log_reach_the_dataset_when_the_run_is_resumed(default_run, tmp_path):
    """A crash after a job's last rows were logged but before they reached Parquet: the
    resume counts them as stored and runs nothing, and moves them into the dataset."""
    import shutil

    from sweep.store import job_slug

    _, run_dir, _ = default_run
    copy = shutil.copytree(run_dir, tmp_path / "runs" / "r")
    (part,) = (copy / "results").glob("tiny-vicuna__chat*.parquet")
    rows = pq.read_table(part).to_pylist()
    (copy / "wal" / f"{job_slug('tiny-vicuna', 'chat')}.jsonl").write_text(
        "".join(json.dumps(r, default=str) + "\n" for r in rows))
    part.unlink()
    assert run_sweep_cli("validate", copy).returncode == 1
    proc = run_sweep_cli("--config", LINEUP, "--tasks", run_dir.parent.parent / "tasks.yaml", "--out", copy.parent,
                         "--run-id", "r", "--max-prompts", "6", "--no-dashboard")
    assert proc.returncode == 0 and "Nothing to do" in proc.stdout, proc.stdout + proc.stderr
    check = run_sweep_cli("validate", copy)
    assert check.returncode == 0, check.stdout
    assert not list((copy / "wal").glob("*.jsonl"))
