"""Two Ray nodes on one machine, without a shared filesystem: the second node runs in its
own mount namespace, with an empty tmpfs over the --out folder, and its own hostname."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from tests.helpers import ROOT, kill_worker_and_finish, run_sweep_cli, tasks_yaml, write_yaml
from tests.e2e.test_sweep import _stored_ids

RAY = str(Path(sys.executable).parent / "ray")
NODE_B = "sweep-node-b"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _namespaces_or_skip(out: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: a node in its own mount namespace with a tmpfs over the output folder")
    for tool in ("unshare", "nsenter", "mount", "hostname"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    probe = subprocess.run(["unshare", "-mupf", "--mount-proc", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs '{out}' && hostname {NODE_B}"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"namespaces or mounts are not allowed here: {probe.stderr.strip()[:200]}")


def _node(args: list[str], out: Path | None = None) -> subprocess.Popen:
    """A `ray start --block` node in its own PID namespace (ending it ends every process
    of the node); with `out`: also its own mount and UTS namespaces, an empty tmpfs over
    `out`, and the hostname NODE_B."""
    start = " ".join([RAY, "start", "--block", *args])
    script = f"mount -t tmpfs -o size=1m tmpfs '{out}' && hostname {NODE_B} && exec {start}" if out else f"exec {start}"
    flags = "-mupf" if out else "-pf"
    return subprocess.Popen(["unshare", flags, "--mount-proc", "--kill-child", "sh", "-c", script],
                            env={**os.environ, "RAY_AUTH_MODE": "token"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _in_node(node: subprocess.Popen, *cmd: str) -> subprocess.CompletedProcess:
    """Run `cmd` in the node's mount namespace (seen from its shell, PID 1 there)."""
    init = psutil.Process(node.pid).children()[0].pid
    return subprocess.run(["nsenter", "-t", str(init), "-m", "-u", *cmd], capture_output=True, text=True)


def _wait_for_cluster(port: int, resources: list[str], timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    status = ""
    while time.time() < deadline:
        status = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{port}"], capture_output=True, text=True,
                                env={**os.environ, "RAY_AUTH_MODE": "token"}).stdout
        if all(f" {r}" in status for r in resources):
            return
        time.sleep(2)
    pytest.fail(f"the cluster did not come up with {resources}: {status[-1500:]}")


def test_a_node_without_the_run_directory_stores_through_the_driver(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    _namespaces_or_skip(out)
    port = _free_port()
    short = [tempfile.mkdtemp(prefix="ray", dir="/tmp") for _ in range(2)]  # Ray's socket paths have a length limit
    nodes = [_node(["--head", "--port", str(port), "--num-cpus", "2", "--resources", "'{\"node_a\": 1}'",
                    "--include-dashboard", "false", "--temp-dir", short[0], "--node-ip-address", "127.0.0.1"])]
    try:
        nodes.append(_node(["--address", f"127.0.0.1:{port}", "--num-cpus", "2", "--resources", "'{\"node_b\": 1}'",
                            "--temp-dir", short[1], "--node-ip-address", "127.0.0.2"], out=out))
        _wait_for_cluster(port, ["node_a", "node_b"])
        b = nodes[1]
        (out / "seen-by-the-driver").touch()
        assert _in_node(b, "ls", "-A", str(out)).stdout == "", "the second node sees the output folder"
        assert _in_node(b, "hostname").stdout.strip() == NODE_B

        # tiny-vicuna on the head (the driver's node), small-llama2 on node b
        models = write_yaml(tmp_path / "models.yaml", {"models": [
            {"name": "tiny-vicuna", "path": "random:llama-tiny", "conv_template": "vicuna_v1.1",
             "resources": {"node_a": 1}},
            {"name": "small-llama2", "path": "random:llama-small", "conv_template": "llama-2",
             "resources": {"node_b": 1}},
        ]})
        tasks = tasks_yaml(tmp_path, tasks=("chat",), max_new_tokens=64)
        cmd = [sys.executable, "-m", "sweep", "--config", models, "--tasks", tasks, "--out", out, "--run-id", "m",
               "--address", f"127.0.0.1:{port}", "--cpu-workers", "2", "--max-prompts", "30", "--no-progress"]
        proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        run_dir = out / "m"
        try:
            # SIGKILL the worker on node b mid-job: it is replaced there and its job resumed
            deadline = time.time() + 240
            while sum(m == "small-llama2" for m, _ in _stored_ids(run_dir)) < 5:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                assert time.time() < deadline, "no rows from node b"
                time.sleep(0.2)
            kill_worker_and_finish(proc, psutil.process_iter(), "small-llama2 / chat", timeout=400)
        finally:
            proc.kill()

        df = pd.read_parquet(run_dir / "results")
        assert len(df) == 2 * 30 and not df.duplicated(["model", "task", "prompt_id"]).any()
        assert set(df.loc[df["model"] == "small-llama2", "host"]) == {NODE_B}
        assert set(df.loc[df["model"] == "tiny-vicuna", "host"]) == {socket.gethostname()}
        assert not any((run_dir / "wal").iterdir())
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert {NODE_B, socket.gethostname()} <= {g["host"] for g in manifest["gpus"]}
        assert _in_node(b, "find", str(out), "-mindepth", "1").stdout == "", "node b wrote into its own folder"
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=60)

    report = run_sweep_cli("report", run_dir)
    assert report.returncode == 0, report.stderr
    assert "tiny-vicuna" in report.stdout and "small-llama2" in report.stdout


def test_a_model_whose_resources_no_node_offers_fails_at_once(tmp_path):
    models = write_yaml(tmp_path / "models.yaml", {"models": [
        {"name": "ok", "path": "random:llama-tiny", "conv_template": "vicuna_v1.1"},
        {"name": "nowhere", "path": "random:llama-tiny", "resources": {"node_z": 1}},
    ]})
    out = tmp_path / "runs"
    proc = run_sweep_cli("--config", models, "--tasks", tasks_yaml(tmp_path, tasks=("chat",)), "--out", out,
                         "--run-id", "z", "--cpu-workers", "2", "--no-dashboard", "--no-progress", timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "nowhere / chat: no node of the cluster has the resources the model asks for (node_z: 1)" in proc.stdout
    df = pd.read_parquet(out / "z" / "results")
    assert set(df["model"]) == {"ok"} and len(df) == 4
