"""The `server` backend against a real OpenAI-compatible server on CPU: `transformers serve`
(transformers' serving extra) on a `random:` checkpoint. Its answers against the
`transformers` backend's, stop strings and max_tokens, a server that dies mid-job, never
becomes ready, cannot bind its port or cannot start, and a sweep through the CLI with both
backends, the server killed mid-job, then a resume."""

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from sweep.backends import load_backend
from sweep.backends.base import BackendError
from sweep.config import ConfigError, GenerationSettings, ModelSpec, load_models
from tests.helpers import run_sweep_cli, tasks_yaml, write_yaml

SERVE = Path(sys.executable).parent / "transformers"
pytestmark = pytest.mark.skipif(not SERVE.exists(), reason="transformers' CLI (the serving extra) is not installed")
COMMAND = f"{SERVE} serve {{path}} --port {{port}} --device cpu --dtype float32"
GREEDY = GenerationSettings(temperature=0, max_new_tokens=24, warmup_requests=0)


def _spec(command=COMMAND, **server):
    return ModelSpec(name="s", path="random:llama-tiny", conv_template="vicuna_v1.1", backend="server",
                     server={"command": command, "ready_timeout_s": 120, **server})


@pytest.fixture(scope="module")
def served():
    be = load_backend(_spec(), GREEDY, "cpu")
    yield be
    be.close()


@pytest.mark.parametrize("entry, expected", [
    ({"backend": "server"}, "backend server needs server:"),
    ({"backend": "server", "server": {"command": "vllm serve {path}"}}, "must hold {port}"),
    ({"backend": "server", "server": {"command": "x --port {port} --gpu {gpu_id}"}}, "unknown placeholder {gpu_id}"),
    ({"backend": "server", "server": {"command": "x {port}", "url": "http://h:1"}}, "either command"),
    ({"backend": "server", "server": {"url": "localhost:8000"}}, "server.url: String should match"),
    ({"backend": "server", "server": {"command": "x 'unclosed {port}"}}, "server.command: No closing quotation"),
    ({"server": {"command": "x {port}"}}, "server: is for backend: server"),
])
def test_bad_server_entries_are_refused_at_validation(tmp_path, entry, expected):
    path = write_yaml(tmp_path / "models.yaml", {"models": [{"name": "a", "path": "random:llama-tiny", **entry}]})
    with pytest.raises(ConfigError, match="models.yaml: ") as err:
        load_models(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_context_beyond_the_models_positions_fails_before_any_server_starts():
    settings = GREEDY.model_copy(update={"context_length": 8192, "max_new_tokens": 6000})
    with pytest.raises(BackendError, match="context_length 8192 .* exceeds the 4096 positions"):
        load_backend(_spec(), settings, "cpu")


def test_the_server_answers_as_the_transformers_backend_does(served):
    """The same rendered prompt, greedy: the same response; the row's fields from the stream."""
    assert served.engine.startswith("transformers serve ") and "--port" in served.engine_command
    hf = load_backend(ModelSpec(name="h", path="random:llama-tiny", conv_template="vicuna_v1.1"), GREEDY, "cpu")
    for prompt in ("Tell me about the sea.", "What is two plus two?"):
        a, b = served.generate("Be brief.", prompt, seed=1), hf.generate("Be brief.", prompt, seed=1)
        assert a.response == b.response and a.prompt_tokens == b.prompt_tokens
        assert a.response_tokens == 24 and a.stop_reason == "length" and served.tokens_from == "server usage"
        assert 0 < a.ttft_s < a.latency_s and a.phases().end_s > a.phases().first_token_s >= a.phases().start_s


def test_stop_strings_and_max_tokens_reach_the_server(served):
    full = served.generate("Be brief.", "Tell me about the sea.", seed=1).response
    stop = full[10:14]
    template = served.template
    served.template = dataclasses.replace(template, stop_strings=(stop,))
    try:
        cut = served.generate("Be brief.", "Tell me about the sea.", seed=1)
    finally:
        served.template = template
    assert cut.stop_reason == "stop" and stop not in cut.response and full.startswith(cut.response)
    served.settings = GREEDY.model_copy(update={"max_new_tokens": 5})
    try:
        five = served.generate("Be brief.", "Tell me about the sea.", seed=1)
    finally:
        served.settings = GREEDY
    assert five.response_tokens == 5 and five.stop_reason == "length" and full.startswith(five.response)


def test_a_server_that_dies_mid_job_fails_the_request_with_its_log_and_leaves_nothing():
    be = load_backend(_spec(), GREEDY, "cpu")
    pid = be.process.proc.pid
    be.generate("Be brief.", "Hello", seed=0)
    os.kill(pid, signal.SIGKILL)
    be.process.proc.wait(timeout=10)
    with pytest.raises(BackendError, match="the server exited with status -9") as err:
        be.generate("Be brief.", "Hello", seed=0)
    assert "log ends" in str(err.value) or "exited" in str(err.value)
    be.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_server_that_never_becomes_ready_is_stopped_with_its_group():
    def sleeping():  # this test's engine: a command no other test or run uses
        return {p.pid for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[:2] == ["sleep", "317"]}

    before = sleeping()
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=r"not ready after 2 s \(server.ready_timeout_s\)"):
        load_backend(_spec("sleep 317 {port}", ready_timeout_s=2), GREEDY, "cpu")
    assert time.monotonic() - t0 < 30
    assert not sleeping() - before


def test_a_port_in_use_and_a_missing_program_fail_with_what_the_server_said(monkeypatch):
    import socket

    import sweep.backends.server as server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        monkeypatch.setattr(server, "free_port", lambda: taken)
        with pytest.raises(BackendError, match="exited with status") as err:
            load_backend(_spec(ready_timeout_s=120), GREEDY, "cpu")
    assert "log ends" in str(err.value)
    with pytest.raises(BackendError, match="did not start"):
        load_backend(_spec("/nonexistent/engine --port {port}"), GREEDY, "cpu")


def _serve_processes(path_fragment: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if "serve" in (p.info["cmdline"] or []) and any(path_fragment in a for a in p.info["cmdline"] or [])]


def test_a_sweep_with_both_backends_the_server_killed_then_resumed(tmp_path):
    """Both backends in one run (the same responses, greedy); the server killed mid-job: its
    job fails with the server's words, a resume completes it, no row twice; the engine's log
    is in the run folder; no server is left running."""
    models = write_yaml(tmp_path / "models.yaml", {"models": [
        {"name": "hf", "path": "random:llama-tiny", "conv_template": "vicuna_v1.1"},
        {"name": "srv", "path": "random:llama-tiny", "conv_template": "vicuna_v1.1", "backend": "server",
         "server": {"command": COMMAND, "ready_timeout_s": 120}}]})
    tasks = tasks_yaml(tmp_path, tasks=("chat",), temperature=0, max_new_tokens=64)
    args = ["--config", models, "--tasks", tasks, "--out", tmp_path / "runs", "--run-id", "r", "--max-prompts", "40",
            "--cpu-workers", "2", "--no-dashboard", "--no-progress"]
    import subprocess

    from tests.helpers import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "sweep", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    results = tmp_path / "runs" / "r"
    deadline = time.monotonic() + 240
    killed = False
    while not killed and time.monotonic() < deadline and proc.poll() is None:
        wal = list((results / "wal").glob("srv*.jsonl")) if (results / "wal").is_dir() else []
        if wal and wal[0].stat().st_size > 2000:  # the server has answered a few requests
            for p in _serve_processes("llama-tiny"):
                p.kill()
                killed = True
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=300)
    assert killed, out[-3000:]
    assert proc.returncode == 1 and "srv / chat" in out and "server" in out, out[-3000:]
    rerun = run_sweep_cli(*args, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    df = pd.read_parquet(results / "results")
    assert len(df) == 80 and not df.duplicated(["model", "task", "prompt_id"]).any()
    by = df.pivot(index="prompt_id", columns="model", values="response")
    # The same tokens; the one difference is where a response ends inside a character: HF
    # decodes the dangling byte as U+FFFD, the server's streaming decoder holds it back.
    assert (by["hf"].str.rstrip("\ufffd") == by["srv"].str.rstrip("\ufffd")).all()
    assert (df.pivot(index="prompt_id", columns="model", values="response_tokens").nunique(axis=1) == 1).all()
    srv = df[df["model"] == "srv"]
    assert srv["engine"].str.startswith("transformers serve").all() and (srv["tokens_from"] == "server usage").all()
    assert (df[df["model"] == "hf"]["tokens_from"] == "backend").all()
    assert list((results / "servers").glob("*.log"))
    time.sleep(2)
    assert not _serve_processes("llama-tiny")


def test_the_null_engine_measures_the_http_path_through_the_server_backend(served):
    """bench/serving.py's figures of the client's cost, on an engine that does no work and
    reports each request's latency on /metrics as vLLM does; `transformers serve` reports none."""
    from bench.serving import _client_figures, _client_timing, _engine_latency_s, client_less_engine_ms

    command = f"{sys.executable} {Path(__file__).parents[2] / 'bench' / 'null_engine.py'} --port {{port}} --metrics"
    be = load_backend(_spec(command), GREEDY, "cpu")
    try:
        spent = _client_timing(be)
        before = _engine_latency_s(be.base)
        outs = [be.generate("Be brief.", f"Question {i}?", seed=i) for i in range(4)]
        after = _engine_latency_s(be.base)
        overhead_ms = client_less_engine_ms(be.base, before, spent)
        assert client_less_engine_ms(be.base, before, spent[:3], wait_s=0.5) is None  # other requests were counted
    finally:
        be.close()
    assert before[1] == 0 and after[1] - before[1] == 4  # the probe is not streamed, so not counted
    engine_mean_s = (after[0] - before[0]) / 4
    client_mean_s = sum(r["wall_s"] for r in spent) / 4
    assert 0 < engine_mean_s < client_mean_s and overhead_ms == pytest.approx(1e3 * (client_mean_s - engine_mean_s))
    assert all(g.response_tokens == GREEDY.max_new_tokens and g.stop_reason == "length" for g in outs)
    assert be.tokens_from == "server usage" and outs[0].response == " a" * GREEDY.max_new_tokens
    figures = _client_figures(spent)
    assert figures["client_serial_ms_p50"] == pytest.approx(figures["client_before_ms_p50"] + figures["client_after_ms_p50"],
                                                            rel=0.5)
    assert _engine_latency_s(served.base) is None
