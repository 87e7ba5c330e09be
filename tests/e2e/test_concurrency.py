"""Requests served several at a time through the `server` backend (`transformers serve`
with continuous batching, on CPU): every row stored once, energies by token share that add
up to the counter's (a simulated GPU counter), the steady window stored with the job; and
the concurrency axis through the CLI: a job per level, keyed apart, validated, reported."""

import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sweep.config import ConfigError, GenerationSettings, ModelSpec, TaskSpec, TasksFile, check_model_tasks, ModelsFile
from sweep.meters.token_share import Streamed, steady_window, token_share
from tests.helpers import run_sweep_cli, tasks_yaml, write_yaml

SERVE = Path(sys.executable).parent / "transformers"
needs_serve = pytest.mark.skipif(not SERVE.exists(), reason="transformers' CLI (the serving extra) is not installed")
COMMAND = f"{SERVE} serve {{path}} --port {{port}} --device cpu --dtype float32 --continuous-batching"


def test_token_share_splits_each_increment_by_the_tokens_made_in_it():
    """Two requests: in the first increment only A makes tokens, in the second both, one
    each; the third has no token but B in flight; the sum is the counter's over them."""
    u = np.array([0.0, 1.0, 2.0, 3.0])
    e = np.array([0.0, 100.0, 160.0, 190.0])
    a = Streamed(0.0, (0.2, 0.5, 1.5), 1.6)
    b = Streamed(0.9, (1.2,), 2.9)
    got = token_share(u, e, [a, b], lag_s=0.0)
    assert got == pytest.approx([100 + 30, 30 + 30])
    assert got.sum() == pytest.approx(190.0)


def test_the_steady_window_runs_from_n_in_flight_to_the_first_answer_after_the_last_send():
    reqs = [Streamed(0.0, (0.5, 1.0), 1.0), Streamed(0.1, (0.6, 2.0), 2.0), Streamed(1.0, (1.5, 3.0), 3.0),
            Streamed(2.0, (2.5, 4.0), 4.0)]
    u = np.arange(0.0, 5.01, 0.1)
    w = steady_window(reqs, 2, queue_empty_s=2.0, u=u, e=100.0 * u)
    assert (w.start_s, w.end_s) == (0.1, 3.0) and w.energy_j == pytest.approx(290.0)
    assert w.tokens == 7 and w.energy_per_token_j == pytest.approx(290.0 / 7)
    assert steady_window(reqs[:1], 2, None) is None


def test_concurrency_above_one_is_refused_for_in_process_backends(tmp_path):
    models = ModelsFile(models=(ModelSpec(name="hf", path="random:llama-tiny"),))
    tasks = TasksFile(tasks=(TaskSpec(name="chat", system_prompt="x"),), generation=GenerationSettings(concurrency=(1, 4)))
    with pytest.raises(ConfigError, match=r"^tasks.yaml: generation.concurrency: 'hf' \(backend transformers\)"):
        check_model_tasks("models.yaml", models, tasks)
    pinned = ModelsFile(models=(ModelSpec(name="hf", path="random:llama-tiny", concurrency=(1,)),))
    check_model_tasks("models.yaml", pinned, tasks)
    for bad in ([0], [2, 2], []):
        with pytest.raises(ValueError):
            GenerationSettings(concurrency=bad)


@needs_serve
def test_four_in_flight_store_every_row_once_and_add_up_to_the_counter(tmp_path):
    """Concurrency 4 on a simulated GPU counter: each request once, `token_share`, the rows
    summing to the counter's energy over the job within 1%, the ramp-up and tail flagged,
    the steady window in runs/<id>/jobs/."""
    from sweep.backends import load_backend
    from sweep.measure import CounterMeter
    from sweep.meters.attribution import Phases
    from sweep.meters.counter import CounterLog
    from sweep.prompts import builtin_prompts
    from sweep.store import RunStore, job_slug
    from sweep.worker import Worker
    from tests.helpers import SimulatedCounter

    settings = GenerationSettings(temperature=0.7, max_new_tokens=64, warmup_requests=0, concurrency=(4,))
    spec = ModelSpec(name="s", path="random:llama-tiny", conv_template="vicuna_v1.1", backend="server",
                     server={"command": COMMAND, "ready_timeout_s": 120})
    tasks = TasksFile(tasks=(TaskSpec(name="chat", system_prompt="Be brief."),), generation=settings)
    worker = Worker("r", spec.model_dump(mode="json"), tasks.model_dump(mode="json"), 1, None)
    meter = None

    def busy():  # the simulated GPU spends while a request is in flight, as a real one does
        shared, now = worker._shared, time.monotonic()
        if shared is None:
            return meter.phases
        return [Phases(r.start_s, r.start_s, r.end_s if r.end_s is not None else now) for r in shared.requests]

    sim = SimulatedCounter(busy, spread=0.0)
    meter = CounterMeter(1, log=CounterLog(1, source=sim))
    worker.backend, worker.meter, worker.concurrency = load_backend(spec, settings, "cpu"), meter, 4
    store = RunStore(tmp_path / "r")
    store.create()
    writer = store.writer(job_slug("s", "chat@c4"))
    prompts = builtin_prompts()[:64]
    try:
        meter.idle_power_w()
        warm = itertools.cycle(prompts[:4])  # the counter's first fit, one at a time, as at a model's load
        meter.calibrate(lambda: worker.backend.generate("Be brief.", next(warm).text, seed=0).phases())
        worker._serve_concurrently(writer, "chat", "Be brief.", prompts)
    finally:
        writer.close()
        worker.backend.close()
        meter.close()
    df = store.read_results()
    assert sorted(df["prompt_id"]) == sorted(p.prompt_id for p in prompts)
    assert (df["concurrency"] == 4).all() and (df["energy_method"] == "token_share").all()
    flagged = df["quality_flags"].map(lambda f: "outside_steady" in f)
    assert flagged.any() and not flagged.all()
    (record,) = store.job_figures()
    (summary,) = record["sessions"]
    assert record["task"] == "chat@c4" and summary["requests"] == 64 and summary["steady_window_s"] > 0
    assert df["energy_j"].sum() == pytest.approx(summary["counter_energy_j"], rel=0.01)
    assert summary["steady_energy_per_token_j"] > 0


@needs_serve
def test_a_sweep_over_two_concurrency_levels_keys_each_job_apart(tmp_path):
    """tasks.yaml concurrency [1, 4] with one server model: two jobs, every prompt stored once
    in each, the report's rows per level; a resume finds nothing to do."""
    models = write_yaml(tmp_path / "models.yaml", {"models": [
        {"name": "srv", "path": "random:llama-tiny", "conv_template": "vicuna_v1.1", "backend": "server",
         "server": {"command": COMMAND, "ready_timeout_s": 120}}]})
    tasks = tasks_yaml(tmp_path, tasks=("chat",), max_new_tokens=16, concurrency=[1, 4])
    args = ["--config", models, "--tasks", tasks, "--out", tmp_path / "runs", "--run-id", "r", "--max-prompts", "12",
            "--cpu-workers", "1", "--no-dashboard", "--no-progress"]
    first = run_sweep_cli(*args, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "runs" / "r" / "results")
    assert len(df) == 24 and not df.duplicated(["model", "task", "concurrency", "prompt_id"]).any()
    assert sorted(df["concurrency"].unique()) == [1, 4]
    report = run_sweep_cli("report", tmp_path / "runs" / "r")
    assert report.returncode == 0 and "concurrency" in report.stdout, report.stdout + report.stderr
    validate = run_sweep_cli("validate", tmp_path / "runs" / "r")
    assert "steady_window" in validate.stdout and validate.returncode in (0, 3), validate.stdout + validate.stderr
    again = run_sweep_cli(*args, timeout=300)
    assert again.returncode == 0 and "0 of 2 job(s) to run" in again.stdout, again.stdout + again.stderr


@needs_serve
def test_at_four_in_flight_a_killed_server_then_a_killed_worker_lose_and_repeat_nothing(tmp_path):
    """Concurrency 4: the server killed mid-job fails the job (exit 1, the server named);
    the resume, its worker killed mid-job, replaces the worker and finishes: every prompt
    stored once, none of those stored before measured again, no server left running."""
    import subprocess

    import psutil

    from tests.helpers import ROOT, kill_worker_and_finish
    from tests.e2e.test_server_backend import _serve_processes
    from tests.e2e.test_sweep import _stored_ids, _wait_for_rows

    models = write_yaml(tmp_path / "models.yaml", {"models": [
        {"name": "srv", "path": "random:llama-tiny", "conv_template": "vicuna_v1.1", "backend": "server",
         "server": {"command": COMMAND, "ready_timeout_s": 120}}]})
    tasks = tasks_yaml(tmp_path, tasks=("chat",), max_new_tokens=48, concurrency=[4])
    run_dir = tmp_path / "runs" / "k"
    cmd = [sys.executable, "-m", "sweep", "--config", models, "--tasks", tasks, "--out", tmp_path / "runs",
           "--run-id", "k", "--max-prompts", "48", "--cpu-workers", "1", "--no-dashboard", "--no-progress"]

    def start():
        return subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)

    proc = start()
    _wait_for_rows(run_dir, 8, proc, timeout=300)
    for p in _serve_processes("llama-tiny"):
        p.kill()
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 1 and "srv / chat" in out and "server" in out, out[-3000:]
    before = _stored_ids(run_dir)
    assert 8 <= len(before) < 48
    proc = start()
    _wait_for_rows(run_dir, len(before) + 8, proc, timeout=300)
    text = kill_worker_and_finish(proc, psutil.Process(proc.pid).children(recursive=True), "srv / chat")
    assert "Resuming run k" in text
    df = pd.read_parquet(run_dir / "results")
    assert len(df) == 48 and not df.duplicated(["model", "task", "concurrency", "prompt_id"]).any()
    assert (df["concurrency"] == 4).all() and before <= set(zip(df["model"], df["prompt_id"]))
    time.sleep(2)
    assert not _serve_processes("llama-tiny")
