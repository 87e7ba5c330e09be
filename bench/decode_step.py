"""The compiled backend's decode step and prefill under several settings, on one GPU.

For each variant the model is loaded afresh, and the step compiled and captured; then:
  - each attention bucket's step alone: replays of its CUDA graph (the GPU's time per
    token) and, for the bucket the requests use, NVML's energy over >= 3 s of replays
    (J per step, independent of Zeus and of the harness);
  - whole requests through `generate` (prefill and the host loop included), and their
    mean time to first token.
Ends with the kernels of one replay of the first variant (torch profiler): what a token's
time is spent on, and how much of the replay the GPU is busy.

    python bench/decode_step.py --preset tinyllama-1.1b
    python bench/decode_step.py --preset llama2-7b --variants shipped no-cd
    python bench/decode_step.py --attention-only
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import SYSTEM, copy_bandwidth_bytes_s, decode_weight_bytes  # noqa: E402
from sweep.backends.compiled import CompiledBackend, CompiledOptions, bucket_for  # noqa: E402
from sweep.backends.decode_attention import AttentionOptions, decode_attention, register_attention  # noqa: E402
from sweep.config import GenerationSettings, ModelSpec  # noqa: E402
from sweep.prompts import builtin_prompts  # noqa: E402

CD = {"coordinate_descent_tuning": True}
# name -> CompiledBackend attributes
VARIANTS = {
    "shipped": {},
    # as before buckets: every step attends over the whole cache through transformers' own SDPA
    # (keys and values copied per query head)
    "whole-cache": {"kv_bucket_count": 1, "bucketed_attention": False},
    "eager-prefill": {"prefill_graphs": False},
    "flash": {"attention_kernel": "flash"},  # FlashAttention's KV-cache decode, not masked SDPA
    "cd": {"inductor_config": CD},  # pointwise work inlined into the reductions that read it
    "no-cd": {"inductor_config": {}},  # matrix-vector products through cuBLAS, not Triton reductions
    "max-autotune": {"inductor_config": {**CD, "max_autotune": True}},
    # programmatic dependent launch: a kernel starts while the one before it drains
    "pdl": {"inductor_config": {**CompiledOptions().inductor_config, "triton.enable_pdl": True}},
}


def restart(be) -> None:
    """A fresh 8-token request: each replay moves a position on, which must stay in the cache."""
    width = be._load_prompt(torch.zeros((1, 8), dtype=torch.long, device="cuda"))
    if be.options.prefill_graphs:
        be._prefill_graphs[width].replay()
    else:
        with torch.no_grad():
            be._prefill(width)


def replay_ms(be, kv_len: int, steps: int = 200, batches: int = 5) -> float:
    """Median over batches of the mean time of one graph replay (ms)."""
    graph, times = be._step_graphs[kv_len], []
    for _ in range(batches):
        restart(be)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return statistics.median(times)


def replay_energy_j(be, kv_len: int, seconds: float = 3.0) -> tuple[float, float]:
    """(J per step, mean W) from NVML's energy counter over `seconds` of back-to-back replays."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    graph, steps = be._step_graphs[kv_len], 0
    torch.cuda.synchronize()
    e0, t0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        restart(be)  # one prefill per 200 steps: a few percent of the time
        for _ in range(200):
            graph.replay()
        steps += 200
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    joules = (pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) - e0) / 1e3
    return joules / steps, joules / elapsed


def kernel_table(be, kv_len: int, steps: int = 20, top: int = 30) -> None:
    from torch.profiler import ProfilerActivity, profile

    graph = be._step_graphs[kv_len]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            graph.replay()
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
    print(f"# one replay (attention over {kv_len}): {count:.0f} kernels, {busy_us:.0f} us of kernel time, "
          f"{wall_us:.0f} us wall (GPU busy {busy_us / wall_us:.0%})")
    print(f"{'kernel':<70}{'per step':>9}{'us/step':>9}{'share':>7}")
    for name, (n, us) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{name[:69]:<70}{n / steps:>9.1f}{us / steps:>9.1f}{us / steps / busy_us:>7.1%}")


def attention_ms(options: AttentionOptions, heads: int, kv_heads: int, kv_len: int, used: int, calls: int = 22,
                 dim: int = 64) -> float:
    """ms for `calls` decode attentions (a step's worth of layers) over a bucket of `kv_len`
    with `used` keys, replayed as one CUDA graph: the attention kernel alone."""
    q = torch.randn(1, heads, 1, dim, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(1, kv_heads, kv_len, dim, device="cuda", dtype=torch.float16) for _ in range(2))
    mask = torch.full((1, 1, 1, kv_len), torch.finfo(torch.float16).min, device="cuda", dtype=torch.float16)
    mask[..., :used] = 0
    used_k = torch.tensor([used], dtype=torch.int32, device="cuda")

    def layers():
        for _ in range(calls):
            decode_attention(q, k, v, mask, dim ** -0.5, used_k, options.handle)

    layers()  # warm-up (outside the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layers()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(100):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 100


def attention_table() -> None:
    """The decode step's attention alone: flash (device fill level) against masked SDPA."""
    print(f"{'shape':<34}{'bucket':>7}{'keys':>6}{'flash ms':>9}{'sdpa ms':>9}   (one step: every layer)")
    for name, heads, kv_heads, layers in (("tinyllama-1.1b (32 q / 4 kv heads)", 32, 4, 22),
                                          ("llama2-7b (32 / 32)", 32, 32, 32)):
        for kv_len, used in ((512, 350), (1024, 700), (2048, 1500)):
            row = {}
            for kernel in ("flash", "sdpa"):
                options = AttentionOptions(kernel=kernel)
                register_attention(options)
                row[kernel] = attention_ms(options, heads, kv_heads, kv_len, used, layers)
            print(f"{name:<34}{kv_len:>7}{used:>6}{row['flash']:>9.3f}{row['sdpa']:>9.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tinyllama-1.1b")
    p.add_argument("--variants", nargs="+", default=["shipped", "whole-cache", "no-cd"], choices=list(VARIANTS))
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--profile", default=None, help="variant whose kernels are listed (default: the first)")
    p.add_argument("--attention", nargs="*", default=[], metavar="GROUPING[:BACKEND]",
                   help="after the first variant, recapture its steps with each of these ways of attending "
                        "(flash; or SDPA with fold or repeat, optionally :EFFICIENT_ATTENTION, :CUDNN_ATTENTION, "
                        ":MATH) and time them")
    p.add_argument("--attention-only", action="store_true",
                   help="time the decode attention kernels alone (flash and SDPA), no model")
    args = p.parse_args()
    if args.attention_only:
        return attention_table()
    bw = copy_bandwidth_bytes_s()
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=0.7,
                                  context_length=args.context_length)
    spec = ModelSpec(name=args.preset, path=f"random:{args.preset}", conv_template="vicuna_v1.1", backend="compiled")
    prompts = [x.text for x in builtin_prompts()[: args.prompts]]
    print(f"# {torch.cuda.get_device_name(0)}; torch {torch.__version__}; copy {bw / 1e12:.2f} TB/s", flush=True)
    rows, profiled = [], False
    for name in args.variants:
        torch._dynamo.reset()
        t = time.perf_counter()
        be = CompiledBackend(spec, settings, "cuda", CompiledOptions(**VARIANTS[name]))
        load_s = time.perf_counter() - t
        wb = decode_weight_bytes(be.model)
        lengths = [be.encode(SYSTEM, x)[0].shape[1] for x in prompts]
        used = bucket_for(max(lengths) + args.max_new_tokens, be.kv_buckets)
        steps = {kv: replay_ms(be, kv) for kv in be.kv_buckets}
        j_step, watts = replay_energy_j(be, used)
        for text in prompts:  # warm: the first request of a load pays one-off costs
            be.generate(SYSTEM, text, seed=0)
        tokens, ttfts = 0, []
        t = time.perf_counter()
        for i, text in enumerate(prompts):
            g = be.generate(SYSTEM, text, seed=i)
            tokens += g.response_tokens
            ttfts.append(g.ttft_s)
        req_tok_s = tokens / (time.perf_counter() - t)
        row = dict(name=name, load_s=load_s, steps=steps, used=used, j_step=j_step, watts=watts, req_tok_s=req_tok_s,
                   req_bw=wb * req_tok_s / bw, ttft_ms=statistics.mean(ttfts) * 1e3)
        rows.append(row)
        print(f"# {name}: loaded and captured in {load_s:.0f} s; prompts {min(lengths)}-{max(lengths)} tokens, "
              f"attention over {used}; step ms by bucket "
              + ", ".join(f"{kv}: {ms:.3f}" for kv, ms in steps.items())
              + f"; {j_step:.3f} J/step at {watts:.0f} W; requests {req_tok_s:.1f} tok/s, "
              f"TTFT {row['ttft_ms']:.1f} ms", flush=True)
        if not profiled and not args.no_profile and name == (args.profile or args.variants[0]):
            profiled = True
            try:
                kernel_table(be, used)
            except Exception as exc:  # a diagnostic: the timings above stand without it
                print(f"# profiler failed: {exc!r}")
        if name == args.variants[0]:
            for way in args.attention:
                grouping, _, forced = way.partition(":")
                be.attention.kernel = "flash" if way == "flash" else "sdpa"
                be.attention.grouping = grouping
                be.attention.sdpa_backend = getattr(torch.nn.attention.SDPBackend, forced) if forced else None
                be._step_graphs.clear()
                be._prefill_graphs.clear()
                be._capture()  # the attention op is opaque to the compiler: recaptured, not recompiled
                ms = replay_ms(be, used)
                j, w = replay_energy_j(be, used)
                print(f"# attention {way}: step {ms:.3f} ms ({wb / ms * 1e3 / bw:.1%}) over {used}; "
                      f"{j:.3f} J/step at {w:.0f} W", flush=True)
        be = None
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\n{args.preset}: {wb / 1e9:.2f} GB of weights read per step; copy bandwidth {bw / 1e12:.2f} TB/s; "
          f"{args.max_new_tokens} new tokens")
    print(f"{'variant':<16}{'load s':>7}{'attn':>6}{'step ms':>9}{'bw share':>9}{'J/step':>8}{'W':>6}"
          f"{'req tok/s':>10}{'bw share':>9}{'TTFT ms':>8}")
    for r in rows:
        ms = r["steps"][r["used"]]
        print(f"{r['name']:<16}{r['load_s']:>7.0f}{r['used']:>6}{ms:>9.3f}{wb / ms * 1e3 / bw:>9.1%}"
              f"{r['j_step']:>8.3f}{r['watts']:>6.0f}{r['req_tok_s']:>10.1f}{r['req_bw']:>9.1%}{r['ttft_ms']:>8.1f}")


if __name__ == "__main__":
    main()
