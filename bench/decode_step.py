"""The compiled backend's decode step under several compile settings, on one GPU.

One model load; for each variant the step is compiled and captured again, then timed two
ways: replays of the CUDA graph alone (the GPU's time per token), and whole requests
through `generate` (prefill and the host loop included). Ends with the kernels of one
replay of the last variant (torch profiler): what a token's time is spent on, and how much
of the replay the GPU is busy.

    python bench/decode_step.py --preset tinyllama-1.1b
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import SYSTEM, copy_bandwidth_bytes_s, decode_weight_bytes  # noqa: E402
from sweep.backends.compiled import CompiledBackend  # noqa: E402
from sweep.config import GenerationSettings, ModelSpec  # noqa: E402
from sweep.prompts import builtin_prompts  # noqa: E402

CD = {"coordinate_descent_tuning": True}
MA = {"max_autotune": True}
# name -> Inductor settings for the step
VARIANTS = {
    "default": {},
    "cd": CD,
    "max-autotune+cd": {**MA, **CD},
}


def replay_ms(be, steps: int = 200, batches: int = 5) -> float:
    """Median over batches of the mean time of one graph replay (ms)."""
    times = []
    for _ in range(batches):
        with torch.no_grad():
            be.cache.reset()
            be._prefill(torch.zeros((1, 8), dtype=torch.long, device="cuda"))
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            be._graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return statistics.median(times)


def kernel_table(be, steps: int = 20, top: int = 14) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            be._graph.replay()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t) * 1e6 / steps
    per_name = defaultdict(lambda: [0, 0.0])
    busy_us = 0.0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name[e.name][0] += 1
            us = e.time_range.end - e.time_range.start
            per_name[e.name][1] += us
            busy_us += us
    busy_us /= steps
    count = sum(c for c, _ in per_name.values()) / steps
    print(f"# one replay: {count:.0f} kernels, {busy_us:.0f} us of kernel time, {wall_us:.0f} us wall "
          f"(GPU busy {busy_us / wall_us:.0%})")
    print(f"{'kernel':<70}{'per step':>9}{'us/step':>9}{'share':>7}")
    for name, (n, us) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{name[:69]:<70}{n / steps:>9.1f}{us / steps:>9.1f}{us / steps / busy_us:>7.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tinyllama-1.1b")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    bw = copy_bandwidth_bytes_s()
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.7, context_length=2048)
    spec = ModelSpec(name=args.preset, path=f"random:{args.preset}", conv_template="vicuna_v1.1", backend="compiled")
    first, *rest = args.variants

    class First(CompiledBackend):
        inductor_config = VARIANTS[first]

    t = time.perf_counter()
    be = First(spec, settings, "cuda")
    print(f"# {torch.cuda.get_device_name(0)}; torch {torch.__version__}; copy {bw / 1e12:.2f} TB/s; "
          f"{args.preset} loaded and captured ({first}) in {time.perf_counter() - t:.0f} s", flush=True)
    wb = decode_weight_bytes(be.model)
    prompts = [x.text for x in builtin_prompts()[: args.prompts]]
    rows = []
    for name in args.variants:
        compile_s = None
        if name != first:
            be.inductor_config = VARIANTS[name]
            be._graph = None
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            t = time.perf_counter()
            be._capture()
            compile_s = time.perf_counter() - t
        step_ms = replay_ms(be)
        for text in prompts:  # first use of each prompt length (eager prefill)
            be.generate(SYSTEM, text, seed=0)
        tokens = 0
        t = time.perf_counter()
        for i, text in enumerate(prompts):
            tokens += be.generate(SYSTEM, text, seed=i).response_tokens
        req_tok_s = tokens / (time.perf_counter() - t)
        row = (name, compile_s, step_ms, 1e3 / step_ms, wb * 1e3 / step_ms / bw,
               req_tok_s, wb * req_tok_s / bw)
        rows.append(row)
        print(f"# {name}: compile {compile_s and round(compile_s)} s, step {step_ms:.3f} ms, "
              f"requests {req_tok_s:.1f} tok/s", flush=True)
    if not args.no_profile:
        try:
            kernel_table(be)
        except Exception as exc:  # a diagnostic: the timings above stand without it
            print(f"# profiler failed: {exc!r}")
    print(f"\n{args.preset}: {wb / 1e9:.2f} GB of weights read per step; copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'variant':<26}{'compile s':>10}{'step ms':>9}{'step tok/s':>11}{'bw share':>9}"
          f"{'req tok/s':>10}{'bw share':>9}")
    for name, compile_s, step_ms, step_tok_s, step_bw, req, req_bw in rows:
        cs = "at load" if compile_s is None else f"{compile_s:.0f}"
        print(f"{name:<26}{cs:>10}{step_ms:>9.3f}{step_tok_s:>11.1f}{step_bw:>9.1%}{req:>10.1f}"
              f"{req_bw:>9.1%}")


if __name__ == "__main__":
    main()
