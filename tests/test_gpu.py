"""On NVIDIA GPUs (skipped on CPU): each row's energy comes from its own GPU.

Checked against an independent reading: this test polls every GPU's NVML energy counter
itself while the sweep runs, then integrates each GPU's counter over the windows of the
rows that GPU served. Needs 2 GPUs: a ~1B model on one and a tiny one on the other, so
the two GPUs draw clearly different power at the same moments.
"""

import threading
import time

import numpy as np
import pandas as pd
import pytest

from tests.helpers import run_sweep_cli, tasks_yaml, write_yaml

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 NVIDIA GPUs")]


class NvmlEnergyLog:
    """(time, counter in J) of every GPU, polled every 10 ms in a thread."""

    def __init__(self):
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.samples = {i: [] for i in range(len(self.handles))}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            now = time.time()
            for i, h in enumerate(self.handles):
                self.samples[i].append((now, self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3))
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def energy_j(self, gpu, start, end):
        t, e = np.array(self.samples[gpu]).T
        return float(np.interp(end, t, e) - np.interp(start, t, e))


def test_energy_is_attributed_to_the_workers_own_gpu(tmp_path):
    models = write_yaml(tmp_path / "models.yaml", {"models": [
        {"name": "big", "path": "random:tinyllama-1.1b", "conv_template": "vicuna_v1.1"},
        {"name": "tiny", "path": "random:llama-small", "conv_template": "llama-2"},
    ]})
    tasks = tasks_yaml(tmp_path, tasks=("chat",), max_new_tokens=128, warmup_requests=2)
    with NvmlEnergyLog() as log:
        proc = run_sweep_cli("--config", models, "--tasks", tasks, "--out", tmp_path / "runs", "--run-id", "g",
                             "--max-prompts", "12", "--no-dashboard", "--no-progress")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_parquet(tmp_path / "runs" / "g" / "results")
    assert df["energy_j"].notna().all() and (df["energy_j"] > 0).all()
    gpu_of = df.groupby("model")["gpu_index"].unique()
    assert all(len(v) == 1 for v in gpu_of) and gpu_of["big"][0] != gpu_of["tiny"][0]
    df["start"] = df["started_at"].map(pd.Timestamp.timestamp)
    df["end"] = df["start"] + df["latency_s"]
    report = []
    for model, rows in df.groupby("model"):
        own = int(gpu_of[model][0])
        other = 1 - own if own in (0, 1) else 0
        own_j = sum(log.energy_j(own, s, e) for s, e in zip(rows["start"], rows["end"]))
        other_j = sum(log.energy_j(other, s, e) for s, e in zip(rows["start"], rows["end"]))
        stored_j = rows["energy_j"].sum()
        report.append((model, own, stored_j, own_j, other_j))
        assert stored_j == pytest.approx(own_j, rel=0.10), report
    big = next(r for r in report if r[0] == "big")
    assert big[3] > 1.3 * big[4], f"the big model's GPU should draw more than its neighbour: {report}"
    print("model, gpu, stored J, NVML own-GPU J, NVML other-GPU J:", *report, sep="\n  ")
