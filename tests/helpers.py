"""Helpers shared by the tests."""

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHAREGPT = SHARED / "data" / "sharegpt_v1_sample.json"
MLENERGY = SHARED / "data" / "mlenergy_2023"


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tasks_yaml(tmp_path: Path, tasks=("chat", "instruct"), **generation) -> Path:
    """A tasks.yaml with the shipped system prompts and small generation settings."""
    shipped = yaml.safe_load((ROOT / "tasks.yaml").read_text())
    data = {
        "tasks": [t for t in shipped["tasks"] if t["name"] in tasks],
        "generation": {**shipped["generation"], "max_new_tokens": 16, "warmup_requests": 1, **generation},
        "prompts": {"dataset": "builtin", "num_prompts": 4, "seed": 0},
    }
    return write_yaml(tmp_path / "tasks.yaml", data)


def run_sweep_cli(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sweep", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})},
    )


def kill_worker_and_finish(proc: subprocess.Popen, candidates, job: str, timeout=600) -> str:
    """SIGKILL the worker running `job` ("model / task"; worker processes are titled by
    their job, as in the Ray dashboard) among `candidates` (processes), let the sweep
    `proc` finish, check that it replaced the worker and finished; returns its output."""
    import psutil

    def title(p) -> str:
        try:
            return (p.cmdline() or [""])[0]
        except psutil.Error:  # gone meanwhile
            return ""

    workers = [p for p in candidates if title(p).startswith(f"ray::{job}")]
    try:
        assert workers, f"no worker process for {job} found"
        workers[0].kill()
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    text = stdout.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "died" in text and "resuming the job on a new worker" in text
    return text


def synthetic_rows(run_id, model, task, energies, tokens, gpu_name="NVIDIA H200", gpu_index=0, latency=None,
                   model_path=None, params_b=1.1):
    """Per-request rows in the results schema, with chosen energies (J) and lengths (tokens)."""
    from datetime import datetime, timedelta, timezone

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = []
    for i, (e, n) in enumerate(zip(energies, tokens)):
        lat = latency[i] if latency else n / 50.0
        rows.append({
            "run_id": run_id, "model": model, "model_path": model_path or f"org/{model}", "task": task,
            "prompt_id": f"p{i}", "host": "h", "gpu_name": gpu_name, "gpu_index": gpu_index, "num_gpus": 1,
            "params_b": params_b, "prompt_tokens": 10, "prompt_truncated": False, "response_tokens": n,
            "latency_s": lat, "ttft_s": 0.01, "throughput_tok_s": n / lat, "energy_j": e,
            "energy_per_token_j": None if e is None else e / n, "idle_power_w": 100.0,
            "energy_above_idle_j": None if e is None else e - 100.0 * lat, "energy_note": None if e is not None else "x",
            "stop_reason": "stop_token", "response": f"answer {i} of {model}", "started_at": t0 + timedelta(seconds=i),
            "backend": "transformers", "dtype": "float16", "template": "fastchat:vicuna_v1.1", "temperature": 0.7,
            "top_p": 1.0, "repetition_penalty": 1.0, "max_new_tokens": 512, "cache_implementation": "dynamic",
            "quality_flags": (["counter_reset"] if e is None else ["coarse_window"] if lat < 1.0 else [])
                             + (["max_new_tokens"] if n >= 512 else []),
            "window_s": lat, "mean_power_w": None if e is None else e / lat, "power_limit_w": 700.0,
            "prefill_energy_j": None if e is None else 0.05 * e, "decode_energy_j": None if e is None else 0.95 * e,
            "energy_split_method": None if e is None else "synthetic",
        })
    return rows


def make_run(root, run_id, jobs):
    """A finished per-request run under root/run_id; jobs: list of synthetic_rows(...) lists."""
    from sweep.prompts import Prompt
    from sweep.store import RunStore, job_slug

    store = RunStore(Path(root) / run_id)
    store.create()
    store.write_manifest({"run_id": run_id, "kind": "per-request", "prompts": {"count": 3},
                          "sessions": [{"started_at": "x", "finished_at": "y"}]})
    store.write_prompts([Prompt(f"p{i}", f"prompt number {i}") for i in range(10)])
    for rows in jobs:
        store.write_part(rows, job_slug(rows[0]["model"], rows[0]["task"]))
    return store


@contextmanager
def tmpfs(mnt: Path, options: str):
    """A tmpfs mounted at `mnt` (a new folder) while in use; skips the test where mounting is not allowed."""
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


class SimulatedCounter:
    """A GPU's energy counter as NVML reports it, on CPU: the GPU spends `powers` (W, for
    prefill, decode, between requests; each request's powers scaled by a factor of its own,
    `spread` wide; `decode_w_by_variant` sets the decode power of the requests of a variant)
    during the phases a meter noted, and the counter moves every `period_s`
    to the energy spent up to `lag_s` earlier, averaged over `width_s`. Called by a
    CounterLog (`source=`): returns the moves since the last call and how far they go."""

    def __init__(self, meter_phases, powers=(600.0, 400.0, 150.0), lag_s=0.08, width_s=0.0, period_s=0.1,
                 spread=0.02, seed=0, decode_w_by_variant=None):
        import random

        self.phases, self.powers = meter_phases, powers
        self.decode_w_by_variant = decode_w_by_variant or {}
        self.lag_s, self.width_s, self.period_s = lag_s, width_s, period_s
        self.spread, self.rng = spread, random.Random(seed)
        self.factors: dict[tuple, tuple[float, float]] = {}
        self.t0 = time.monotonic()
        self.next_u = self.t0 + period_s * 0.37

    def factor(self, p):
        key = (round(p.prefill_s, 9), round(p.decode_s, 9))  # the request, wherever it runs in time
        if key not in self.factors:
            self.factors[key] = (1 + self.rng.gauss(0, self.spread), 1 + self.rng.gauss(0, self.spread))
        return self.factors[key]

    def true_energy(self, p) -> float:
        """What the GPU spent during one request (its prefill and decode), J."""
        fp, fd = self.factor(p)
        return self.powers[0] * fp * p.prefill_s + self._decode_w(p) * fd * p.decode_s

    def _decode_w(self, p) -> float:
        return self.decode_w_by_variant.get(getattr(p, "variant", 0), self.powers[1])

    def spent(self, t: float) -> float:
        """Energy spent from t0 to t, J."""
        busy, energy = 0.0, 0.0
        for p in self.phases():
            if p.start_s >= t:
                continue
            fp, fd = self.factor(p)
            pre = max(min(t, p.first_token_s) - p.start_s, 0.0)
            dec = max(min(t, p.end_s) - p.first_token_s, 0.0)
            busy += pre + dec
            energy += self.powers[0] * fp * pre + self._decode_w(p) * fd * dec
        return energy + self.powers[2] * (t - self.t0 - busy)

    def __call__(self):
        now = time.monotonic()
        return self.moves_until(now), now

    def moves_until(self, now: float) -> list:
        moves = []
        while self.next_u <= now:
            u = self.next_u - self.lag_s
            if self.width_s > 0:
                value = sum(self.spent(u - self.width_s * (k + 0.5) / 8) for k in range(8)) / 8
            else:
                value = self.spent(u)
            moves.append((0, self.next_u, round(1000.0 + value, 3)))
            self.next_u += self.period_s
        return moves
