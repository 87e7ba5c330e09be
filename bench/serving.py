"""Runtimes side by side on one GPU, through the worker, at several concurrency levels.

The same random-weight model (TinyLlama-1.1B's shape, FP16) under `transformers` and
`compiled` (one request at a time) and `server` (`transformers serve` with continuous
batching, started by the worker on the GPU) at each --concurrency. Every request is
served as in a sweep (rows stored, energy per row from the counter: attributed at 1,
token share above). Printed per setting: tokens/s, J/token, latency p50 and p90, time to
first token; at concurrency > 1 the steady window's length and J/token and the rows'
sum against the counter over the job; at concurrency 1 the rows' sum against an
independent NVML poll over the same windows, and what the HTTP client adds per request:
its time serial with each request (before the request leaves, after its last token), the
whole path's cost on an engine that does no work (bench/null_engine.py), and, where the
engine reports its own request latency (/metrics), the client's latency less the engine's.

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


def _client_timing(backend) -> list[dict]:
    """Bench only: per request at concurrency 1, the time around the engine's work that is
    serial with the request: before it leaves (render, tokenize, body) and after its last
    streamed token (the engine's closing of the stream, then counting and the row's fields:
    an upper bound on the client's part of it), and the client thread's CPU time (mostly
    stream parsing, which overlaps the engine's steps)."""
    spent: list[dict] = []
    generate = backend.generate

    def timed(*args, **kwargs):
        arrivals = kwargs.setdefault("token_times", [])
        t0, c0 = time.monotonic(), time.thread_time()
        out = generate(*args, **kwargs)
        t1 = time.monotonic()
        last = arrivals[-1] if arrivals else t1
        spent.append({"before_s": out.started_s - t0, "after_s": t1 - last, "cpu_s": time.thread_time() - c0,
                      "wall_s": t1 - t0, "latency_s": out.latency_s})
        return out

    backend.generate = timed
    return spent


def _ms(values, q: float) -> float:
    return 1e3 * float(np.quantile(values, q))


def _client_figures(spent: list[dict]) -> dict:
    before, after = [r["before_s"] for r in spent], [r["after_s"] for r in spent]
    serial = [x + y for x, y in zip(before, after)]
    return {"client_serial_ms_p50": _ms(serial, 0.5), "client_serial_ms_p90": _ms(serial, 0.9),
            "client_before_ms_p50": _ms(before, 0.5), "client_after_ms_p50": _ms(after, 0.5),
            "client_cpu_ms_p50": _ms([r["cpu_s"] for r in spent], 0.5)}


def _engine_latency_s(base: str) -> tuple[float, float] | None:
    """(sum, count) of the engine's own end-to-end request latency from its Prometheus
    /metrics (vLLM's `e2e_request_latency_seconds`, SGLang's with --enable-metrics); None
    where it has none."""
    import httpx

    try:
        from prometheus_client.parser import text_string_to_metric_families  # Ray's dependency

        r = httpx.get(f"{base}/metrics", timeout=5.0)
        if r.status_code != 200:
            return None
        families = list(text_string_to_metric_families(r.text))
    except (ImportError, httpx.HTTPError, ValueError):  # no parser, no endpoint, or not Prometheus text
        return None
    total = count = None
    for family in families:
        if family.name.endswith("e2e_request_latency_seconds"):
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total = (total or 0.0) + sample.value
                elif sample.name.endswith("_count"):
                    count = (count or 0.0) + sample.value
    return (total, count) if total is not None and count is not None else None


def client_less_engine_ms(base: str, before: tuple[float, float], spent: list[dict], wait_s: float = 5.0) -> float | None:
    """The client's mean time per request (its whole call: rendering to the row's fields)
    less the engine's own mean latency over the same requests; None unless the engine has
    counted exactly those requests (it may record a request after its stream closed)."""
    deadline = time.monotonic() + wait_s
    while True:
        after = _engine_latency_s(base)
        if after is not None and after[1] - before[1] == len(spent):
            own = (after[0] - before[0]) / len(spent)
            return 1e3 * (float(np.mean([r["wall_s"] for r in spent])) - own)
        if after is None or after[1] - before[1] > len(spent) or time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def null_engine_path(prompts, max_new: int) -> dict:
    """The whole HTTP path per request on an engine that does no work (bench/null_engine.py):
    what the path costs with no engine time, its pieces arriving at once rather than one
    per decode step."""
    settings = GenerationSettings(max_new_tokens=max_new, temperature=0.7, context_length=2048, warmup_requests=0)
    command = f"{sys.executable} {Path(__file__).with_name('null_engine.py')} --port {{port}}"
    spec = ModelSpec(name="null", path="random:tinyllama-1.1b", conv_template="vicuna_v1.1", backend="server",
                     server={"command": command, "ready_timeout_s": 60})
    be = load_backend(spec, settings, "cpu")
    spent = _client_timing(be)
    try:
        for i, p in enumerate(prompts):
            be.generate(SYSTEM, p.text, seed=i)
    finally:
        be.close()
    walls = [r["wall_s"] for r in spent[2:]]  # the first requests warm the path (imports, caches)
    return {"null_engine_ms_p50": _ms(walls, 0.5), "null_engine_ms_p90": _ms(walls, 0.9)}


def run_level(worker, prompts, n: int, base: Path) -> dict:
    """One job at concurrency n; its rows and figures."""
    worker.concurrency = n
    store = RunStore(base / f"{worker.spec.backend}-c{n}")  # a folder per job: a reused one would mix its rows in
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
    spent = _client_timing(be) if backend == "server" else None
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
            if spent is not None:
                spent.clear()
            engine_before = _engine_latency_s(be.base) if spent is not None and n == 1 else None
            r = run_level(worker, prompts_for(n), n, base) | {"backend": backend}
            if spent is not None and n == 1:
                r |= _client_figures(spent)
                if engine_before is not None:
                    r["http_overhead_vs_engine_ms"] = client_less_engine_ms(be.base, engine_before, spent)
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
    null = null_engine_path(pool[:args.prompts_at_1], args.max_new_tokens) if "server" in args.backends else None
    for r in results:  # the independent poll over the rows' own windows (lag ignored: the sum is over many)
        windows = r.pop("_windows")
        energy = r.pop("_energy_j")
        if r["concurrency"] == 1:
            polled = sum(nvml.energy_j(0, a, b) for a, b in windows)
            r["rows_vs_nvml_poll"] = energy / polled - 1 if polled else None
    print("\nbackend       in flight  tok/s   J/token  latency p50/p90 (s)  TTFT p50  steady window  steady J/tok  "
          "rows vs counter  rows vs poll  client serial ms p50/p90")

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "n/a"

    for r in results:
        print(f"{r['backend']:<14}{r['concurrency']:>9}{f(r['tokens_per_s'], '8.0f')}{f(r['j_per_token'], '10.4f')}"
              f"   {f(r['latency_p50_s'], '.2f')}/{f(r['latency_p90_s'], '.2f')}          {f(r['ttft_p50_s'], '.3f')}"
              f"   {f(r.get('steady_window_s'), '10.1f')} s  {f(r.get('steady_j_per_token'), '10.4f')}"
              f"  {f(r.get('rows_vs_counter'), '+14.2%')}  {f(r.get('rows_vs_nvml_poll'), '+11.2%')}"
              f"  {f(r.get('client_serial_ms_p50'), '8.2f')}/{f(r.get('client_serial_ms_p90'), '.2f')}")
    for r in results:
        if "client_serial_ms_p50" in r:
            print(f"\nclient at concurrency 1 ({r['backend']}): serial with each request (before it leaves, after its "
                  f"last token) p50 {r['client_serial_ms_p50']:.2f} ms, p90 {r['client_serial_ms_p90']:.2f} ms (before "
                  f"{r['client_before_ms_p50']:.2f}, after {r['client_after_ms_p50']:.2f} ms p50); its "
                  f"thread's CPU {r['client_cpu_ms_p50']:.1f} ms (overlapping the engine's steps); against the engine's "
                  f"own timing: {f(r.get('http_overhead_vs_engine_ms'), '.2f')} ms"
                  + ("" if r.get("http_overhead_vs_engine_ms") is not None else " (the engine reports no per-request timing, "
                     "or counted other requests)"))
    if null is not None:
        print(f"whole HTTP path on a null engine ({args.max_new_tokens} pieces streamed at once, no engine time): p50 {null['null_engine_ms_p50']:.2f} ms, "
              f"p90 {null['null_engine_ms_p90']:.2f} ms per request")
    if args.json:
        Path(args.json).write_text(json.dumps({"levels": results, "null_engine": null}, indent=1))


if __name__ == "__main__":
    main()
