"""How right is each stored energy per response? One GPU, through the worker, back to back.

For each backend and each max_new_tokens, the same prompts (fixed seeds: the same tokens
every time) are served through the worker's own path, as in a sweep (rows stored with the
energy the worker attributes, `energy_j`, and the one-window reading, `window_energy_j`).
Then --references of them (spread over the prompts' lengths) are measured again the
reference way: the same request repeated back to back inside one window of at least
--reference-s seconds, between two idle pauses, the
counter over that window less the pauses' energy, over the repeats (the self-check's
routine, sweep.measure). Independently, NVML's counter is polled in a process of its own
(bench/nvml.py) and read at the repeats' first start and last end, over the repeats (the
way such references were taken before): the two references should agree.

Printed per (backend, max_new_tokens): the window's median length; for `energy_j` and
for the one-window reading, the error per response against the reference (median, p90,
max) and the error of their sum against the references' sum; what the job's own
reference checks would cost at 3,000 prompts; and, since the reference is another
execution of the request, how far the served request's time was from its repeats' and the
error of `energy_j` over the request's own time (power) against the reference's.

    python bench/fidelity.py --preset tinyllama-1.1b --max-new-tokens 32 128 512 --prompts 900 320 80 --references 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.nvml import NvmlEnergyLog  # noqa: E402
from sweep.backends import load_backend  # noqa: E402
from sweep.config import EnergySettings, GenerationSettings, ModelSpec, PromptSettings, TaskSpec, TasksFile  # noqa: E402
from sweep.measure import ReferenceFigures, open_meter  # noqa: E402
from sweep.prompts import builtin_prompts, load_prompt_set  # noqa: E402
from sweep.store import RunStore  # noqa: E402
from sweep.worker import Worker, calibration_prompts, request_seed  # noqa: E402

SYSTEM = ("A chat between a human user (prompter) and an artificial intelligence (AI) assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SHAREGPT = Path(__file__).resolve().parents[2] / "shared" / "data" / "sharegpt_v1_sample.json"


class _NoHub:
    class _Call:
        @staticmethod
        def remote(*args):
            return None

    start = advance = finish = _Call()


def _prompts(n: int, dataset: Path = SHAREGPT):
    if dataset.is_file():
        return list(load_prompt_set(PromptSettings(dataset=str(dataset), num_prompts=n, seed=1)).prompts)
    return builtin_prompts()[:n]


def _errors(values: np.ndarray, reference: np.ndarray) -> dict:
    """Over the responses with both figures (a check whose repeats made other tokens has no reference)."""
    err = np.abs(values / reference - 1)
    ok = np.isfinite(err)
    if not ok.any():
        return {"median": np.nan, "p90": np.nan, "max": np.nan, "sum": np.nan, "n": 0}
    return {"median": float(np.median(err[ok])), "p90": float(np.quantile(err[ok], 0.9)), "max": float(err[ok].max()),
            "sum": float(values[ok].sum() / reference[ok].sum() - 1), "n": int(ok.sum())}


def _deviation(values: np.ndarray, reference: np.ndarray) -> dict:
    dev = values / reference - 1
    dev = dev[np.isfinite(dev)]
    if not len(dev):
        return {"median": np.nan, "min": np.nan, "max": np.nan}
    return {"median": float(np.median(np.abs(dev))), "min": float(dev.min()), "max": float(dev.max())}


def _chosen(be, prompts, n: int, fitted: set[str]) -> list:
    """n of the served prompts, evenly spread over their lengths (prefill is what the
    attribution must tell apart from decode), none of those a job's first fit ran."""
    by_length = sorted((q for q in prompts if q.prompt_id not in fitted), key=lambda q: len(be.encode(SYSTEM, q.text)[0]))
    step = max(len(by_length) / max(n, 1), 1.0)
    return [by_length[int(i * step)] for i in range(min(n, len(by_length)))]


def _spread(job: list, checked: list) -> list:
    """The job's prompts with the checked ones spread evenly through it, as a sweep's
    seed-chosen checks are, rather than all at its start where the fit has least data."""
    ids = {q.prompt_id for q in checked}
    rest = [q for q in job if q.prompt_id not in ids]
    every = len(rest) / max(len(checked), 1)
    for i, q in enumerate(checked):
        rest.insert(int((i + 0.5) * every) + i, q)
    return rest


def _recording(meter) -> dict:
    """Bench only: keep every counter move and request of the run (the meter's sliding
    window forgets), and note each served request's phases, for --dump and replays."""
    served: dict = {}
    end = meter.__dict__.setdefault("_unwrapped_end", meter.end)

    def noting_end(key, phases):
        served[key[1].prompt_id] = {"phases": [phases.start_s, phases.first_token_s, phases.end_s, phases.variant],
                                    "prompt_tokens": key[2].prompt_tokens, "response_tokens": key[2].response_tokens}
        return end(key, phases)

    meter.end = noting_end
    meter._forget = lambda now: None
    return served


def run_setting(worker, be, prompts, checked, max_new: int, reference_s: float) -> dict:
    """Serve the prompts as a sweep does (a job), then reference-measure the checked ones."""
    be.settings = be.settings.model_copy(update={"max_new_tokens": max_new})  # bench only: the loop reads it per request
    worker.tasks = worker.tasks.model_copy(update={"generation": be.settings})
    meter = worker.meter
    warm = itertools.cycle(calibration_prompts(prompts))  # the job's first fit, as the worker makes it at load
    meter.calibrate(lambda: be.generate(SYSTEM, next(warm).text, seed=0).phases())
    served = _recording(meter)
    with tempfile.TemporaryDirectory() as base:
        store = RunStore(Path(base) / "r")
        writer = store.writer("bench")
        for p in prompts:
            worker.serve(writer, "chat", SYSTEM, p)
        worker._store_ready(writer, final=True)
        writer.close()
        rows = store.read_results().set_index("prompt_id").loc[[p.prompt_id for p in prompts]]
    refs, raw, costs, periods, repeat_s = [], [], [], [], []
    for p in checked:
        seed = request_seed(0, "chat", p.prompt_id)
        spans, durations = [], []

        def run():
            out = be.generate(SYSTEM, p.text, seed=seed)
            ph = out.phases()
            spans.append((time.time() - (time.monotonic() - ph.start_s), time.time() - (time.monotonic() - ph.end_s)))
            durations.append(ph.end_s - ph.start_s)
            return ph, out.response_tokens

        meter.reference(p.prompt_id, run, reference_s)
        pending = meter._references[-1]
        got = [f for _, f in meter.ready(final=True) if isinstance(f, ReferenceFigures)]
        refs.append(got[-1].energy_j if got else np.nan)
        costs.append(got[-1].cost_s if got else np.nan)
        tokens = got[-1].response_tokens if got else []
        same = bool(tokens) and all(t == rows.loc[p.prompt_id, "response_tokens"] for t in tokens)
        raw.append((spans[0][0], spans[-1][1], len(spans)) if same else None)  # read once the poll has ended
        repeat_s.append(float(np.mean(durations)) if durations else np.nan)
        if not same:
            refs[-1] = np.nan  # the repeats made other tokens: nothing to compare
        periods.append({"prompt_id": p.prompt_id, "pause_before": pending.pause_before,
                        "pause_after": pending.pause_after, "energy_j": refs[-1],
                        "repeats": [[r.start_s, r.first_token_s, r.end_s, r.variant] for r in pending.repeats]})
    ref = np.array(refs, float)
    ids = [p.prompt_id for p in checked]
    stored = rows.loc[ids, "energy_j"].to_numpy(float)
    window = rows.loc[ids, "window_energy_j"].to_numpy(float)
    # The reference is another execution of the same request: where the runtime takes
    # another time for it (a host-bound loop), energy differs with no meter error. Power
    # (energy over the request's own time) tells the two apart.
    served_s = rows.loc[ids, "latency_s"].to_numpy(float)
    repeats_s = np.array(repeat_s, float)
    req_s = float(rows["latency_s"].mean())
    e = EnergySettings()
    cost_s = float(np.nanmean(costs))
    n3000 = e.references_for(3000, req_s, cost_s)
    ref_cost = n3000 * cost_s
    for pid, r in rows.iterrows():
        served[pid] |= {"energy_j": r["energy_j"], "window_energy_j": r["window_energy_j"],
                        "energy_method": r["energy_method"], "energy_model": r["energy_model"]}
    counters = [dict(zip(("times_s", "energy_j"), map(list, c.arrays()))) for c in meter.log.counters]
    return {"max_new_tokens": max_new, "window_s": float(rows["window_s"].median()),
            "served": len(prompts), "checked": len(checked),
            "tokens": float(rows["response_tokens"].mean()),
            "methods": rows["energy_method"].value_counts().to_dict(),
            "energy_j": _errors(stored, ref), "one_window": _errors(window, ref),
            "power": _errors(stored / served_s, ref / repeats_s),
            "duration_vs_repeats": _deviation(served_s[np.isfinite(ref)], repeats_s[np.isfinite(ref)]),
            "_raw": raw, "_ref": refs,
            "_dump": {"served": served, "references": periods, "counters": counters,
                      "phases": [[q.start_s, q.first_token_s, q.end_s, q.variant] for q in meter.phases],
                      "fit_start_s": meter.fit_start_s, "idle_w": meter.idle_w},
            "checks_at_3000": {"n": n3000, "cost_share": ref_cost / (3000 * req_s), "one_check_s": cost_s},
            "fit": json.loads(rows["energy_model"].dropna().iloc[-1]) if rows["energy_model"].notna().any() else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tinyllama-1.1b")
    p.add_argument("--backends", nargs="+", default=["compiled", "transformers"])
    p.add_argument("--max-new-tokens", nargs="+", type=int, default=[32, 128, 512])
    p.add_argument("--transformers-max-new-tokens", nargs="+", type=int,
                   help="for the transformers backend (default: --max-new-tokens)")
    p.add_argument("--prompts", type=int, nargs="+", default=[120],
                   help="served per setting, back to back, as one job: one count, or one per --max-new-tokens "
                        "(a sweep's job fits over a minute of requests: short responses need more of them)")
    p.add_argument("--references", type=int, default=10, help="of them, measured again the reference way")
    p.add_argument("--dataset", type=Path, default=SHAREGPT, help="ShareGPT prompts (default: the 2023 sample "
                   "beside the checkout; the built-in prompts where it is absent)")
    p.add_argument("--reference-s", type=float, default=5.0)
    p.add_argument("--cache", default="static", choices=["static", "dynamic"], help="the transformers backend's cache")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--dump", help="a folder: every counter move, request phase and reference of each setting "
                                 "(to study the attribution offline)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/fidelity.py needs an NVIDIA GPU")
    print(f"# {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    if len(args.prompts) not in (1, len(args.max_new_tokens)):
        sys.exit("--prompts: one count, or one per --max-new-tokens")
    per_setting = dict(zip(sorted(args.max_new_tokens), itertools.cycle(args.prompts))) \
        if len(args.prompts) == 1 else dict(zip(args.max_new_tokens, args.prompts))
    prompts = _prompts(max(args.prompts), args.dataset)
    results = []
    with NvmlEnergyLog(period_s=0.002) as nvml:
        for backend in args.backends:
            lengths = (args.transformers_max_new_tokens or args.max_new_tokens) if backend == "transformers" \
                else args.max_new_tokens
            settings = GenerationSettings(max_new_tokens=max(lengths), temperature=0.7, context_length=2048,
                                          cache_implementation=args.cache, warmup_requests=2)
            tasks = TasksFile(tasks=(TaskSpec(name="chat", system_prompt=SYSTEM),), generation=settings)
            spec = ModelSpec(name=args.preset, path=f"random:{args.preset}", conv_template="vicuna_v1.1",
                             backend=backend)
            t0 = time.perf_counter()
            be = load_backend(spec, settings, "cuda")
            worker = Worker("bench", spec.model_dump(mode="json"), tasks.model_dump(mode="json"), 1, _NoHub())
            worker.backend, worker.meter = be, open_meter(1)
            # Prompts that fit the longest setting untruncated: every setting serves the same text.
            served = [q for q in prompts if not be.encode(SYSTEM, q.text)[1]]
            for q in served[:2]:
                be.generate(SYSTEM, q.text, seed=0)
            worker.idle_power_w = worker.meter.idle_power_w()
            print(f"# {backend}: loaded in {time.perf_counter() - t0:.0f} s", flush=True)
            jobs = {n: served[:per_setting.get(n, args.prompts[0])] for n in lengths}
            fitted = {q.prompt_id for job in jobs.values() for q in calibration_prompts(job)}
            checked = _chosen(be, min(jobs.values(), key=len), args.references, fitted)
            for max_new in sorted(lengths):
                job = _spread(jobs[max_new], checked)
                r = run_setting(worker, be, job, checked, max_new, args.reference_s) | {"backend": backend}
                dump = r.pop("_dump")
                if args.dump:
                    Path(args.dump).mkdir(parents=True, exist_ok=True)
                    (Path(args.dump) / f"{backend}-{max_new}.json").write_text(json.dumps(dump | {
                        "backend": backend, "max_new_tokens": max_new, "gpu": torch.cuda.get_device_name(0)}))
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}), flush=True)
            worker.meter.close()
            be = worker = None
            torch.cuda.empty_cache()
    for r in results:  # the independent poll's samples are there now
        raw = np.array([np.nan if x is None else nvml.energy_j(0, x[0], x[1]) / x[2] for x in r.pop("_raw")])
        r["reference_vs_nvml_poll"] = float(np.nanmedian(np.abs(np.array(r.pop("_ref"), float) / raw - 1)))
    print("\nper response, against the repeated-request reference: median / p90 / max error; error of the sum")
    print(f"{'backend':<14}{'new tok':>8}{'window':>8}  {'energy_j (stored)':<32}{'one window':<32}{'ref vs poll':>11}"
          f"{'checks @3000':>14}  {'energy_j / latency (power)':<32}{'served vs repeats time'}")
    for r in results:
        def cell(e):
            return f"{e['median']:.1%} / {e['p90']:.1%} / {e['max']:.1%}; {e['sum']:+.1%}"
        print(f"{r['backend']:<14}{r['max_new_tokens']:>8}{r['window_s']:>7.2f}s  {cell(r['energy_j']):<32}"
              f"{cell(r['one_window']):<32}{r['reference_vs_nvml_poll']:>11.2%}"
              f"{r['checks_at_3000']['n']:>5} {r['checks_at_3000']['cost_share']:>7.1%}  {cell(r['power']):<32}"
              f"{r['duration_vs_repeats']['median']:.1%} ({r['duration_vs_repeats']['min']:+.1%} to "
              f"{r['duration_vs_repeats']['max']:+.1%})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.dump:  # the independent poll, wall clock: (gpu, time, counter J)
        np.save(Path(args.dump) / "nvml_poll.npy", np.concatenate(
            [np.column_stack([np.full(len(v), g), v]) for g, v in nvml.samples.items()]))


if __name__ == "__main__":
    main()
