"""Batch-1 decode on one GPU: how fast, how much energy, how close to the memory limit.

In one process, on the same prompts and seeds, for each model shape:
  - HF generate, dynamic cache (bare `model.generate`, as in 2023)
  - HF generate, static cache (bare, HF compiles its decode step)
  - the sweep's `transformers` backend, called bare and inside a worker
  - the sweep's `compiled` backend, called bare and inside a worker

Printed per way: tokens/s, ms/token, J/token (Zeus: one window over all requests of a bare
HF way; the stored rows for a backend in a worker, checked against NVML polled apart),
and the share of the bandwidth limit: bytes of weights a decode step reads (every
parameter but the input embedding table, of which it reads one row) times tokens/s,
over the device-to-device copy bandwidth measured in the same run. Harness overhead
compares the worker's per-request path (energy window, row, write-ahead log with fsync
awaited one request later as in a sweep, progress message) with the same backend called bare: each prompt is served both ways with
the same seed (the same tokens), back to back, alternating which goes first, for
`--rounds` rounds; `overhead` is the median over those pairs of the worker's time per
token over the bare one's, `direct` the worker's wall time outside `generate` over the
time inside it (timed in the same requests: no run-to-run noise). `vs NVML` compares the
stored energy, summed over the rows, with NVML's counter polled apart over the same
energy windows.

    python bench/decode.py --presets tinyllama-1.1b llama2-7b --prompts 6 --max-new-tokens 256
    python bench/decode.py --presets llama2-7b --ways hf-static compiled   # what the 7B targets need
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.nvml import NvmlEnergyLog  # noqa: E402
from sweep.backends import load_backend  # noqa: E402
from sweep.config import GenerationSettings, ModelSpec, TaskSpec, TasksFile  # noqa: E402
from sweep.measure import open_meter  # noqa: E402
from sweep.prompts import builtin_prompts  # noqa: E402
from sweep.store import RunStore  # noqa: E402
from sweep.worker import Worker, request_seed  # noqa: E402

SYSTEM = ("A chat between a human user (prompter) and an artificial intelligence (AI) assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class _OneRowInFlight:
    """The store's job writer as a sweep's worker sees its job (`RemoteJob`): a row is
    handed over at once and its write (fsync included) awaited at the next append, so it
    overlaps the next request. Every call runs on one thread, in order, as at the writer."""

    def __init__(self, writer) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.writer, self.pool, self.pending = writer, ThreadPoolExecutor(1), None

    def append(self, row) -> None:
        if self.pending is not None:
            self.pending.result()
        self.pending = self.pool.submit(self.writer.append, row)

    def append_power(self, samples) -> None:
        self.pool.submit(self.writer.append_power, samples).result()

    def close(self) -> None:
        if self.pending is not None:
            self.pending.result()
        self.pool.submit(self.writer.close).result()
        self.pool.shutdown()


class _NoHub:
    """Stands in for the progress actor. Its calls are no-ops here; in a sweep each is one
    fire-and-forget Ray message per request, which this overhead figure leaves out."""

    class _Call:
        @staticmethod
        def remote(*args):
            return None

    start = advance = finish = _Call()


def copy_bandwidth_bytes_s(size_bytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy: bytes read + written per second."""
    a = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * size_bytes * repeats / (start.elapsed_time(end) / 1e3)


def decode_weight_bytes(model) -> int:
    """Bytes of parameters one decode step reads: all but the input embedding table
    (one row of it is read), unless the output layer shares it."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    shared = emb.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    return total if shared else total - emb.numel() * emb.element_size()


class Energy:
    """One Zeus window over a whole way of generating."""

    def __init__(self) -> None:
        from zeus.monitor import ZeusMonitor

        self.monitor = ZeusMonitor(gpu_indices=[0], cpu_indices=[])
        self.n = 0

    def window(self, fn):
        self.n += 1
        key = f"bench-{self.n}"
        self.monitor.begin_window(key, sync_execution=True)
        fn()
        m = self.monitor.end_window(key, sync_execution=True)
        return float(sum(m.gpu_energy.values())), m.time


def hf_generate(backend, ids, static: bool, seed: int) -> int:
    """Bare `generate` with the settings the sweep uses; returns new tokens."""
    s = backend.settings
    torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=s.max_new_tokens, do_sample=s.temperature > 0, top_p=s.top_p,
                  repetition_penalty=s.repetition_penalty, eos_token_id=list(backend.template.stop_token_ids),
                  pad_token_id=backend._pad_id)
    if s.temperature > 0:
        kwargs.update(temperature=s.temperature, top_k=0)
    if static:  # sized once for the run, as the backend does: no recompile for a longer prompt
        kwargs.update(cache_implementation="static", max_cache_len=s.context_length)
    with torch.inference_mode():
        out = backend.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    torch.cuda.synchronize()
    return out.shape[1] - ids.shape[1]


class _TimedBackend:
    """The backend as the worker sees it, timing what `generate` takes inside the worker: the
    rest of a request's wall time there is what the harness adds."""

    def __init__(self, backend) -> None:
        self.backend, self.generate_s, self.last = backend, 0.0, None

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def generate(self, *args, **kwargs):
        t = time.perf_counter()
        self.last = self.backend.generate(*args, **kwargs)
        self.generate_s += time.perf_counter() - t
        return self.last


class _StampedMeter:
    """The worker's energy meter, noting the wall-clock bounds of each energy window, so the
    independent NVML reading can be taken over exactly the stored windows."""

    def __init__(self, meter) -> None:
        self.meter, self.windows = meter, []

    def __getattr__(self, name):
        return getattr(self.meter, name)

    def end(self, key, phases):
        window = self.meter.end(key, phases)
        self.windows.append((window.start_unix_s, window.end_unix_s))
        return window


WAYS = ("hf-dynamic", "hf-static", "transformers", "compiled")


def bench_preset(preset: str, args, bw: float, energy: Energy) -> list[dict]:
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  context_length=args.context_length, warmup_requests=2)
    tasks = TasksFile(tasks=(TaskSpec(name="chat", system_prompt=SYSTEM),), generation=settings)
    prompts = builtin_prompts()[: args.prompts]
    warm = builtin_prompts()[-2:]
    seeds = [request_seed(0, "chat", p.prompt_id) for p in prompts]
    results = []

    def record(way: str, tokens: int, seconds: float, joules: float | None, weight_bytes: int, **extra):
        tok_s = tokens / seconds
        row = dict(model=preset, way=way, tokens=tokens, seconds=round(seconds, 3), tok_s=round(tok_s, 1),
                   ms_per_token=round(1e3 / tok_s, 3), j_per_token=None if joules is None else round(joules / tokens, 4),
                   bw_share=round(weight_bytes * tok_s / bw, 3), **extra)
        results.append(row)
        print(json.dumps(row), flush=True)

    backends = [b for b in ("transformers", "compiled")
                if b in args.ways or (b == "transformers" and {"hf-dynamic", "hf-static"} & set(args.ways))]
    for backend_name in backends:
        spec = ModelSpec(name=preset, path=f"random:{preset}", conv_template="vicuna_v1.1", backend=backend_name)
        t0 = time.perf_counter()
        be = load_backend(spec, settings, "cuda")
        load_s = time.perf_counter() - t0
        wb = decode_weight_bytes(be.model)
        print(f"# {preset} / {backend_name}: loaded in {load_s:.1f} s; {wb / 1e9:.2f} GB read per decode step; "
              f"attention {be.model.config._attn_implementation}", flush=True)
        encoded = [be.encode(SYSTEM, p.text)[0] for p in prompts]

        warmed = False
        if backend_name == "transformers":
            for static in (False, True):
                if f"hf-{'static' if static else 'dynamic'}" not in args.ways:
                    continue
                for p in warm + prompts:  # compiles (static), first use of each length (both)
                    hf_generate(be, be.encode(SYSTEM, p.text)[0], static, 0)
                warmed = warmed or not static  # the backend runs HF dynamic: these lengths are warm
                counts = []
                joules, secs = energy.window(lambda: counts.extend(hf_generate(be, ids, static, s)
                                                                   for ids, s in zip(encoded, seeds)))
                record(f"HF generate, {'static' if static else 'dynamic'} (bare)", sum(counts), secs, joules, wb)
        if backend_name not in args.ways:
            be = None
            torch.cuda.empty_cache()
            continue

        # The backend bare vs inside a worker, request by request on the same prompt and
        # seed (the same tokens), alternating which goes first, over several rounds. The
        # first use of a sequence length costs eager kernels a one-off setup that would tilt
        # the comparison: a pass over the same prompts pays it up front.
        if not warmed:
            for p in warm:
                be.generate(SYSTEM, p.text, seed=0)
            # In a sweep nearly every prompt is a length not seen before: this pass shows what that costs.
            t, first_tokens = time.perf_counter(), 0
            for p, s in zip(prompts, seeds):
                first_tokens += be.generate(SYSTEM, p.text, seed=s).response_tokens
            record(f"{backend_name} backend (bare, new lengths)", first_tokens, time.perf_counter() - t, None, wb)
        with NvmlEnergyLog() as nvml:
            worker = Worker("bench", spec.model_dump(mode="json"), tasks.model_dump(mode="json"), 1, _NoHub())
            timed, meter = _TimedBackend(be), _StampedMeter(open_meter(1))
            worker.backend, worker.meter = timed, meter
            worker.idle_power_w = worker.meter.idle_power_w()
            meter.calibrate(lambda: be.generate(SYSTEM, warm[0].text, seed=0).phases())
            meter.windows.clear()
            bare_s = worker_s = 0.0
            bare_tokens = 0
            ratios, rounds = [], []
            with tempfile.TemporaryDirectory() as base:
                for r in range(args.rounds):
                    store = RunStore(Path(base) / f"round{r}")  # each round stores its own rows
                    writer = _OneRowInFlight(store.writer("bench"))
                    for i, (p, s) in enumerate(zip(prompts, seeds)):
                        took = {}
                        for path in ("bare", "worker") if (i + r) % 2 == 0 else ("worker", "bare"):
                            t = time.perf_counter()
                            if path == "bare":
                                n = be.generate(SYSTEM, p.text, seed=s).response_tokens
                            else:
                                worker.serve(writer, "chat", SYSTEM, p)
                                n = timed.last.response_tokens
                            took[path] = (time.perf_counter() - t, max(n, 1))
                        bare_s += took["bare"][0]
                        bare_tokens += took["bare"][1]
                        worker_s += took["worker"][0]
                        # seconds per token in the worker over bare, for this prompt and seed
                        ratios.append(took["worker"][0] / took["worker"][1] / (took["bare"][0] / took["bare"][1]) - 1)
                    worker._store_ready(writer, final=True)
                    writer.close()
                    rounds.append(store.read_results())
        rows = pd.concat(rounds, ignore_index=True)
        worker_tokens = int(rows["response_tokens"].sum())
        stored_j = float(rows["energy_j"].sum())
        start = rows["started_at"].map(pd.Timestamp.timestamp)
        nvml_latency_j = sum(nvml.energy_j(0, a, a + b) for a, b in zip(start, rows["latency_s"]))
        nvml_window_j = sum(nvml.energy_j(0, a, b) for a, b in meter.windows)
        record(f"{backend_name} backend (bare)", bare_tokens, bare_s, None, wb)
        record(f"{backend_name} backend (in worker)", worker_tokens, worker_s, stored_j, wb,
               harness_overhead=round(statistics.median(ratios), 4),
               overhead_spread=[round(min(ratios), 4), round(max(ratios), 4)],
               harness_overhead_direct=round(worker_s / timed.generate_s - 1, 4),
               harness_ms_per_request=round((worker_s - timed.generate_s) / len(rows) * 1e3, 2),
               stored_j=round(stored_j, 1), nvml_j=round(nvml_window_j, 1),
               stored_vs_nvml=round(stored_j / nvml_window_j - 1, 4),
               stored_vs_nvml_latency_windows=round(stored_j / nvml_latency_j - 1, 4),
               nvml_counter_period_ms=nvml.counter_period_ms(0), rows=len(rows),
               steps_past_stop=int(rows["steps_past_stop"].sum()), idle_power_w=round(worker.idle_power_w or 0, 1),
               cache=rows["cache_implementation"].iloc[0], compiled=bool(rows["compiled"].iloc[0]),
               energy_methods=rows["energy_method"].value_counts().to_dict(), load_s=round(load_s, 1))
        meter.close()
        be = worker = timed = None
        torch.cuda.empty_cache()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tinyllama-1.1b", "llama2-7b"])
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS),
                   help="HF generate bare (dynamic, static cache), and the two backends bare and in a worker")
    p.add_argument("--rounds", type=int, default=2, help="bare/worker alternations over the prompts")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode.py needs an NVIDIA GPU")
    bw = copy_bandwidth_bytes_s()
    print(f"# {torch.cuda.get_device_name(0)}; torch {torch.__version__}; device-to-device copy {bw / 1e12:.2f} TB/s",
          flush=True)
    energy = Energy()
    results = []
    for preset in args.presets:
        results += bench_preset(preset, args, bw, energy)
    print(f"\n{'model':<16}{'way':<36}{'tok/s':>8}{'ms/tok':>8}{'J/tok':>8}{'bw share':>9}{'overhead':>9}"
          f"{'direct':>8}{'vs NVML':>9}")
    for r in results:
        oh, direct, nv = r.get("harness_overhead"), r.get("harness_overhead_direct"), r.get("stored_vs_nvml")
        print(f"{r['model']:<16}{r['way']:<36}{r['tok_s']:>8.1f}{r['ms_per_token']:>8.2f}"
              f"{(r['j_per_token'] or float('nan')):>8.3f}{r['bw_share']:>9.1%}{'' if oh is None else f'{oh:>+9.2%}'}"
              f"{'' if direct is None else f'{direct:>+8.2%}'}{'' if nv is None else f'{nv:>+9.2%}'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "copy_bw_bytes_s": bw,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
