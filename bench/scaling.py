"""Scaling benchmark: one fixed job list on 1, 2, 4, 8 GPUs (as many as the machine has).

    python bench/scaling.py                       # 8 x ~1B random models, 1 task, 20 prompts, 128 tokens
    python bench/scaling.py --models 4 --gpus 1,2
    python bench/scaling.py --cpu --models 2 --prompts 6 --gpus 1,2   # CPU workers, no energy

Each configuration runs the real CLI in a subprocess, restricted to the first N GPUs with
CUDA_VISIBLE_DEVICES, into a fresh run. Printed per N: wall time of the whole command
(Ray start and model loads included), the span from the first request's start to the
last one's end, speedup and efficiency (speedup / N) over N=1 on both, and the mean
energy per response with its spread (std) and its change against N=1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _write_configs(tmp: Path, args) -> tuple[Path, Path]:
    preset = "random:llama-small" if args.cpu else f"random:{args.preset}"
    models = {"models": [{"name": f"m{i}", "path": preset, "conv_template": "vicuna_v1.1"} for i in range(args.models)]}
    shipped = yaml.safe_load((ROOT / "tasks.yaml").read_text())
    tasks = {
        "tasks": [t for t in shipped["tasks"] if t["name"] == args.task],
        "generation": {**shipped["generation"], "max_new_tokens": args.max_new_tokens,
                       "cache_implementation": args.cache},
        "prompts": {"dataset": "builtin", "num_prompts": args.prompts, "seed": 0},
    }
    (tmp / "models.yaml").write_text(yaml.safe_dump(models))
    (tmp / "tasks.yaml").write_text(yaml.safe_dump(tasks))
    return tmp / "models.yaml", tmp / "tasks.yaml"


def run_once(n: int, models: Path, tasks: Path, out: Path, cpu: bool) -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "sweep", "--config", str(models), "--tasks", str(tasks), "--out", str(out),
           "--run-id", f"n{n}", "--no-dashboard", "--no-progress"]
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        cmd += ["--cpu-workers", str(n)]
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"N={n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    df = pd.read_parquet(out / f"n{n}" / "results")
    start = df["started_at"].min()
    end = (df["started_at"] + pd.to_timedelta(df["latency_s"], unit="s")).max()
    return {
        "gpus": n,
        "rows": len(df),
        "devices": df["gpu_index"].nunique(),
        "wall_s": wall_s,
        "span_s": (end - start).total_seconds(),
        "energy_j": df["energy_j"].mean(),
        "energy_std_j": df["energy_j"].std(),
        "tok_s": df["throughput_tok_s"].mean(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--task", default="chat")
    p.add_argument("--preset", default="tinyllama-1.1b")
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"])
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts to try (capped at what the machine has)")
    p.add_argument("--cpu", action="store_true", help="CPU workers instead of GPUs (no energy)")
    p.add_argument("--out", help="keep the runs here (default: a temp dir)")
    args = p.parse_args()

    available = os.cpu_count() if args.cpu else _gpu_count()
    counts = [n for n in map(int, args.gpus.split(",")) if n <= available]
    if not counts:
        sys.exit("no GPU found (use --cpu for a CPU-only check)")
    out = Path(args.out or tempfile.mkdtemp(prefix="sweep-scaling-"))
    out.mkdir(parents=True, exist_ok=True)
    models, tasks = _write_configs(out, args)

    from sweep.checkpoints import ensure_random_checkpoint  # build once, outside the timings

    ensure_random_checkpoint("random:llama-small" if args.cpu else f"random:{args.preset}")
    results = []
    for n in counts:
        r = run_once(n, models, tasks, out, args.cpu)
        results.append(r)
        print(f"  N={n}: {r['rows']} responses on {r['devices']} device(s), wall {r['wall_s']:.1f} s", flush=True)

    base = results[0]
    table = pd.DataFrame(results)
    table["speedup_wall"] = base["wall_s"] / table["wall_s"]
    table["efficiency_wall"] = table["speedup_wall"] / (table["gpus"] / base["gpus"])
    table["speedup_span"] = base["span_s"] / table["span_s"]
    table["efficiency_span"] = table["speedup_span"] / (table["gpus"] / base["gpus"])
    table["energy_vs_1"] = table["energy_j"] / base["energy_j"] - 1
    unit = "CPU workers" if args.cpu else "GPUs"
    print(f"\nJob list: {args.models} models x 1 task ({args.task}) x {args.prompts} prompts, "
          f"{args.max_new_tokens} new tokens, cache={args.cache}; column 'gpus' = {unit}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"runs kept in {out}")


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":
    main()
