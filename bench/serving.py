"""Runtimes side by side on one GPU, through the worker, at several concurrency levels.

The same random-weight model (TinyLlama-1.1B's shape, FP16) under `transformers` and
`compiled` (one request at a time) and `server` (`transformers serve` with continuous
batching, started by the worker on the GPU) at each --concurrency. Every request is
served as in a sweep (rows stored, energy per row from the counter: attributed at 1,
token share above). Printed per setting: tokens/s, J/token, latency p50 and p90, time to
first token; at concurrency > 1 the steady window's length and J/token and the rows'
sum against the counter over the job; at concurrency 1 the rows' sum against an
independent NVML poll over the same windows, and what the HTTP client costs per request
(its thread's CPU time).

    python bench/serving.py --concurrency 1 4 16 64 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fidelity import SHAREGPT, SYSTEM, _NoHub, _prompts  # noqa: E402
from bench.nvml import NvmlEnergyLog  # noqa: E402
from sweep.backends import load_backend  # noqa: E402
from sweep.config import GenerationSettings, ModelSpec, TaskSpec, TasksFile  # noqa: E402
from sweep.measure import open_meter  # noqa: E402
from sweep.record import job_key  # noqa: E402
from sweep.store import RunStore, job_slug  # noqa: E402
from sweep.worker import Worker, calibration_prompts  # noqa: E402

SERVE = "transformers serve {path} --port {port} --device cuda --dtype float16 --continuous-batching"


def _client_cpu(backend) -> list[float]:
    """Bench only: the CPU time of the thread that runs each request (the client's own cost)."""
    spent: list[float] = []
    generate = backend.generate

    def timed(*args, **kwargs):
        t0 = time.thread_time()
        try:
            return generate(*args, **kwargs)
        finally:
            spent.append(time.thread_time() - t0)

    backend.generate = timed
    return spent


def run_level(worker, prompts, n: int, base: Path) -> dict:
    """One job at concurrency n; its rows and figures."""
    worker.concurrency = n
    store = RunStore(base / f"c{n}")
    store.create()
    writer = store.writer(job_slug(worker.spec.name, job_key("chat", n)))
    t0 = time.monotonic()
    if n == 1:
        for p in prompts:
            worker.serve(writer, "chat", SYSTEM, p)
        worker._store_ready(writer, final=True)
    else:
        worker._serve_concurrently(writer, "chat", SYSTEM, prompts)
    wall = time.monotonic() - t0
    writer.close()
    rows = store.read_results()
    jobs = store.job_figures()
    tokens = float(rows["response_tokens"].sum())
    out = {"concurrency": n, "requests": len(rows), "wall_s": wall, "tokens_per_s": tokens / wall,
           "j_per_token": float(rows["energy_j"].sum()) / tokens if rows["energy_j"].notna().all() else None,
           "latency_p50_s": float(rows["latency_s"].quantile(0.5)), "latency_p90_s": float(rows["latency_s"].quantile(0.9)),
           "ttft_p50_s": float(rows["ttft_s"].quantile(0.5)), "methods": rows["energy_method"].value_counts().to_dict(),
           "_windows": [(s.timestamp(), s.timestamp() + lat) for s, lat in zip(rows["started_at"], rows["latency_s"])],
           "_energy_j": float(rows["energy_j"].sum())}
    if jobs:
        s = jobs[0]["sessions"][-1]
        out |= {"steady_window_s": s.get("steady_window_s"), "steady_j_per_token": s.get("steady_energy_per_token_j"),
                "rows_vs_counter": (s["rows_energy_j"] / s["counter_energy_j"] - 1) if s.get("counter_energy_j") else None}
    return out


def run_backend(backend: str, levels: list[int], prompts_for, max_new: int, base: Path) -> list[dict]:
    settings = GenerationSettings(max_new_tokens=max_new, temperature=0.7, context_length=2048, warmup_requests=2,
                                  cache_implementation="static", concurrency=tuple(levels))
    tasks = TasksFile(tasks=(TaskSpec(name="chat", system_prompt=SYSTEM),), generation=settings)
    spec = ModelSpec(name=f"tinyllama-{backend}", path="random:tinyllama-1.1b", conv_template="vicuna_v1.1",
                     backend=backend, concurrency=tuple(levels),
                     server={"command": SERVE, "ready_timeout_s": 600} if backend == "server" else None)
    t0 = time.perf_counter()
    be = load_backend(spec, settings, "cuda")
    cpu = _client_cpu(be) if backend == "server" else None
    worker = Worker("bench", spec.model_dump(mode="json"), tasks.model_dump(mode="json"), 1, _NoHub())
    worker.backend, worker.meter = be, open_meter(1)
    warm_prompts = prompts_for(8)
    for q in warm_prompts[:2]:
        be.generate(SYSTEM, q.text, seed=0)
    worker.idle_power_w = worker.meter.idle_power_w()
    warm = itertools.cycle(calibration_prompts(warm_prompts))
    worker.meter.calibrate(lambda: be.generate(SYSTEM, next(warm).text, seed=0).phases())
    print(f"# {backend}: loaded and calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
    out = []
    try:
        for n in levels:
            if cpu is not None:
                cpu.clear()
            r = run_level(worker, prompts_for(n), n, base) | {"backend": backend}
            if cpu is not None and n == 1:
                r["client_cpu_ms_per_request"] = 1e3 * float(np.median(cpu))
            out.append(r)
            print(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}), flush=True)
    finally:
        worker.meter.close()
        be.close()
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["transformers", "compiled", "server"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64], help="for backend server")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts-at-1", type=int, default=24, help="prompts of a job at concurrency 1")
    p.add_argument("--prompts-per-slot", type=int, default=8, help="above 1: this many prompts per request in flight")
    p.add_argument("--dataset", type=Path, default=SHAREGPT)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/serving.py needs an NVIDIA GPU")
    print(f"# {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    pool = _prompts(max(args.prompts_at_1, args.prompts_per_slot * max(args.concurrency), 8), args.dataset)

    def prompts_for(n: int):
        return pool[:args.prompts_at_1] if n == 1 else pool[:args.prompts_per_slot * n]

    results = []
    with tempfile.TemporaryDirectory() as base, NvmlEnergyLog(period_s=0.002) as nvml:
        for backend in args.backends:
            levels = args.concurrency if backend == "server" else [1]
            results += run_backend(backend, levels, prompts_for, args.max_new_tokens, Path(base))
    for r in results:  # the independent poll over the rows' own windows (lag ignored: the sum is over many)
        windows = r.pop("_windows")
        energy = r.pop("_energy_j")
        if r["concurrency"] == 1:
            polled = sum(nvml.energy_j(0, a, b) for a, b in windows)
            r["rows_vs_nvml_poll"] = energy / polled - 1 if polled else None
    print("\nbackend       in flight  tok/s   J/token  latency p50/p90 (s)  TTFT p50  steady window  steady J/tok  "
          "rows vs counter  rows vs poll  client ms")

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "n/a"

    for r in results:
        print(f"{r['backend']:<14}{r['concurrency']:>9}{f(r['tokens_per_s'], '8.0f')}{f(r['j_per_token'], '10.4f')}"
              f"   {f(r['latency_p50_s'], '.2f')}/{f(r['latency_p90_s'], '.2f')}          {f(r['ttft_p50_s'], '.3f')}"
              f"   {f(r.get('steady_window_s'), '10.1f')} s  {f(r.get('steady_j_per_token'), '10.4f')}"
              f"  {f(r.get('rows_vs_counter'), '+14.2%')}  {f(r.get('rows_vs_nvml_poll'), '+11.2%')}"
              f"  {f(r.get('client_cpu_ms_per_request'), '8.2f')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
