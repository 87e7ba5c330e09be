"""How report and UI scale with a run's size: a synthetic run, as part files and compacted.

    python bench/scale.py                                  # 40 models x 4 tasks x 3,000 prompts = 480,000 rows
    python bench/scale.py --models 4 --prompts 300         # a small one
    python bench/scale.py --root /tmp/scale --no-build     # measure again on the runs built before

The run is built once under --root/flat (rows shaped like `sweep.record.ResultRow`, written
with `RunStore.write_part` in part files of 64 rows, as `FLUSH_ROWS` makes them, responses of
~1.3 KB), copied to --root/compacted and compacted there with the real CLI (`python -m
sweep compact`, timed: the layout a sweep leaves, one file per job). Both are kept for later
runs of this script. Then, on each layout, each in a fresh process:
- report: the real CLI (`python -m sweep report RUN --csv DIR`), which validates the run too;
- validate: the real CLI (`python -m sweep validate RUN`);
- UI first load: `ui.data.RunsFolder(root).aggregates()`;
- UI refresh: after a first load, one new part file is written, then `aggregates()` again
  (the file is removed afterwards, so the run stays as built);
- compact one job and UI refresh: a job of --prompts rows is added in part files, the UI
  loads, the job is compacted (`RunStore.compact`, as the writer does when a job ends) and
  the UI refreshes: the live view while a sweep's jobs end (the job is removed afterwards);
- UI detail: the per-request rows of one (model, task), as the model-detail view reads them.
Printed per step: wall time of the whole process (interpreter start and imports included),
the time of the step itself inside it, and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUN_ID = "scale"
LAYOUTS = ("flat", "compacted")
TASKS = ["chat", "chat-concise", "instruct", "instruct-concise"]
GPUS = ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
WORDS = [f"w{i:03d}" for i in range(1000)]


def model_name(i: int) -> str:
    return f"org/model-{i:02d}-{1 + i % 13}b"


def make_rows(model_i: int, task: str, prompt_ids: range, rng: random.Random, response_bytes: int) -> list[dict]:
    """Rows shaped like ResultRow, with plausible figures and ~response_bytes of text each."""
    from sweep.record import ResultRow

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    params_b = float(1 + model_i % 13)
    rows = []
    for p in prompt_ids:
        tokens = rng.randint(20, 600)
        latency_s = tokens / rng.uniform(20, 80)
        # a few requests too short for the energy counter: null energy, as the meter leaves them
        energy_j = None if rng.random() < 0.01 else params_b * tokens * rng.uniform(0.5, 1.5)
        words = " ".join(rng.choices(WORDS, k=response_bytes // 5))
        rows.append(ResultRow(
            run_id=RUN_ID, model=model_name(model_i), model_path=model_name(model_i), task=task,
            prompt_id=f"p{p:05d}", host="bench", gpu_name=GPUS[model_i % len(GPUS)], gpu_index=model_i % 8,
            num_gpus=1, params_b=params_b, prompt_tokens=rng.randint(10, 500), prompt_truncated=False,
            response_tokens=tokens, latency_s=latency_s, ttft_s=rng.uniform(0.01, 0.2),
            throughput_tok_s=tokens / latency_s, energy_j=energy_j,
            energy_per_token_j=None if energy_j is None else energy_j / tokens, idle_power_w=90.0,
            energy_above_idle_j=None if energy_j is None else energy_j - 90.0 * latency_s,
            energy_note=None if energy_j is not None else "window shorter than the counter's update period",
            stop_reason="stop_token", response=words, started_at=t0 + timedelta(seconds=p),
            backend="transformers", dtype="float16", template="fastchat:vicuna_v1.1", temperature=0.7, top_p=1.0,
            repetition_penalty=1.0, max_new_tokens=1024, cache_implementation="dynamic", compiled=False,
            steps_past_stop=0,
            quality_flags=["coarse_window"] if latency_s < 1.0 else [], window_s=latency_s,
            mean_power_w=None if energy_j is None else energy_j / latency_s, power_limit_w=700.0,
            prefill_energy_j=None if energy_j is None else 0.03 * energy_j,
            decode_energy_j=None if energy_j is None else 0.97 * energy_j, energy_split_method="synthetic",
            energy_method=None if energy_j is None else "window" if latency_s >= 5.0 else "attributed",
            energy_uncertainty_j=None if energy_j is None else 0.01 * energy_j,
            window_energy_j=None if energy_j is None else energy_j * rng.uniform(0.8, 1.2),
            energy_model=None if energy_j is None else MODEL_JSON,
        ).to_dict())
    return rows


# What a row's attribution records of its fit (one per GPU): a realistic size for the column.
MODEL_JSON = ('[{"lag_s":0.08,"width_s":0.0,"power_w":{"prefill":612.4,"decode":401.7,"between":152.3},'
              '"scale":1.0002,"increments":598,"rms_j":0.412,"span_s":59.8}]')


def build(run_dir: Path, models: int, prompts: int, part_rows: int, response_bytes: int) -> int:
    from sweep.prompts import Prompt
    from sweep.store import RunStore, job_slug

    store = RunStore(run_dir)
    store.create()
    store.write_manifest({"run_id": RUN_ID, "kind": "per-request", "prompts": {"count": prompts},
                          "sessions": [{"started_at": "2026-01-01T00:00:00", "finished_at": "2026-01-02T00:00:00"}]})
    store.write_prompts([Prompt(f"p{p:05d}", f"prompt number {p}") for p in range(prompts)])
    rng = random.Random(0)
    n = 0
    for m in range(models):
        for task in TASKS:
            for start in range(0, prompts, part_rows):
                rows = make_rows(m, task, range(start, min(start + part_rows, prompts)), rng, response_bytes)
                store.write_part(rows, job_slug(model_name(m), task))
                n += len(rows)
        print(f"  built {n:,} rows", file=sys.stderr, flush=True)
    return n


# -- each step runs in a fresh process: `python bench/scale.py --step NAME --root R` ------
def step_ui_load(root: Path) -> None:
    from ui.data import RunsFolder

    t = time.perf_counter()
    agg = RunsFolder(root).aggregates()
    print(json.dumps({"step_s": time.perf_counter() - t, "groups": len(agg)}))


def step_ui_refresh(root: Path) -> None:
    from sweep.store import RunStore, job_slug
    from ui.data import RunsFolder

    folder = RunsFolder(root)
    folder.aggregates()
    store = RunStore(root / RUN_ID)
    rows = make_rows(0, "chat", range(90000, 90064), random.Random(1), 1300)
    path = store.write_part(rows, job_slug(model_name(0), "chat"))
    try:
        t = time.perf_counter()
        agg = folder.aggregates()
        step_s = time.perf_counter() - t
    finally:
        path.unlink()
    print(json.dumps({"step_s": step_s, "groups": len(agg)}))


def step_ui_detail(root: Path) -> None:
    import inspect

    from ui.data import RunsFolder

    folder = RunsFolder(root)
    folder.aggregates()  # the page has loaded the leaderboard before anyone opens a detail
    t = time.perf_counter()
    if len(inspect.signature(folder.rows).parameters) > 1:
        rows = folder.rows(RUN_ID, model_name(0), "chat")
    else:  # a RunsFolder that hands out the whole run
        rows = folder.rows(RUN_ID)
        rows = rows[(rows["model"] == model_name(0)) & (rows["task"] == "chat")]
    print(json.dumps({"step_s": time.perf_counter() - t, "rows": len(rows)}))


def step_ui_compact(root: Path) -> None:
    from sweep.store import RunStore, job_slug
    from ui.data import RunsFolder

    store = RunStore(root / RUN_ID)
    # One more job, as part files: the size of the run's own jobs.
    prompts = len(store.read_prompts())
    model, slug, rng = 99, job_slug(model_name(99), "chat"), random.Random(2)
    for start in range(0, prompts, 64):
        store.write_part(make_rows(model, "chat", range(start, min(start + 64, prompts)), rng, 1300), slug)
    folder = RunsFolder(root)
    try:
        folder.aggregates()
        t = time.perf_counter()
        with store.job_lock(slug, timeout_s=0):
            store.compact(slug)
        compact_s = time.perf_counter() - t
        t = time.perf_counter()
        agg = folder.aggregates()
        step_s = time.perf_counter() - t
    finally:
        for path in store.results_dir.iterdir():
            if path.name.startswith(slug):
                path.unlink()
    assert agg.loc[agg["model"] == model_name(model), "responses"].sum() == prompts
    print(json.dumps({"step_s": step_s, "compact_s": compact_s, "rows": prompts}))


STEPS = {"ui-load": step_ui_load, "ui-refresh": step_ui_refresh, "ui-compact": step_ui_compact,
         "ui-detail": step_ui_detail}


def measure(cmd: list[str], exit_codes: tuple[int, ...] = (0,)) -> dict:
    """Wall time, peak resident memory (of this one child, from wait4) and stdout of a command."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall_s = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) not in exit_codes:
            raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{err.read()[-3000:]}")
        return {"wall_s": wall_s, "peak_mb": usage.ru_maxrss / 1024, "out": out.read()}


def measure_layout(root: Path) -> list[tuple[str, dict, float | None]]:
    """(label, process figures, step seconds) of every step on the run under `root`."""
    run_dir = root / RUN_ID
    results = []
    with tempfile.TemporaryDirectory() as csv_dir:
        r = measure([sys.executable, "-m", "sweep", "report", str(run_dir), "--csv", csv_dir])
        results.append(("report (CLI, --csv)", r, None))
    # validate exits 1 when an error-level check fails: a figure all the same.
    r = measure([sys.executable, "-m", "sweep", "validate", str(run_dir)], exit_codes=(0, 1))
    results.append(("validate (CLI)", r, None))
    for step, label in (("ui-load", "UI first load"), ("ui-refresh", "UI refresh after 1 new part"),
                        ("ui-compact", "UI refresh after a job compacted"),
                        ("ui-detail", "UI detail of one (model, task)")):
        r = measure([sys.executable, str(Path(__file__).resolve()), "--step", step, "--root", str(root)])
        out = json.loads(r["out"].strip().splitlines()[-1])
        if "compact_s" in out:
            results.append((f"  compact that job ({out['rows']:,} rows)", {}, out["compact_s"]))
        results.append((label, r, out["step_s"]))
    return results


def describe(run_dir: Path) -> str:
    files = [p for p in (run_dir / "results").iterdir() if not p.name.startswith((".", "_"))]
    size_mib = sum(p.stat().st_size for p in files) / 2**20
    return f"{run_dir}: {len(files):,} files, {size_mib:,.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "sweep-scale",
                    help="the runs are built here once, in flat/ and compacted/ (default: %(default)s)")
    ap.add_argument("--models", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=3000, help="per (model, task); 4 tasks")
    ap.add_argument("--part-rows", type=int, default=64, help="rows per part file (FLUSH_ROWS)")
    ap.add_argument("--response-bytes", type=int, default=1300)
    ap.add_argument("--layout", choices=LAYOUTS + ("both",), default="both", help="which layouts to measure")
    ap.add_argument("--no-build", action="store_true", help="measure the runs already under --root")
    ap.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # one step, in a child process
    args = ap.parse_args()
    root = args.root.resolve()
    if args.step:
        STEPS[args.step](root)
        return

    flat, compacted = (root / layout / RUN_ID for layout in LAYOUTS)
    compaction = None
    if not args.no_build:
        for run_dir in (flat, compacted):
            if run_dir.exists():
                raise SystemExit(f"{run_dir} exists: pass --no-build to measure it, or remove it")
        t = time.perf_counter()
        rows = build(flat, args.models, args.prompts, args.part_rows, args.response_bytes)
        print(f"built {rows:,} rows in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        shutil.copytree(flat, compacted)
        compaction = measure([sys.executable, "-m", "sweep", "compact", str(compacted)])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} cores, load average {load}")
    if compaction:
        print(f"compaction of the whole run (CLI): {compaction['wall_s']:.1f} s, peak {compaction['peak_mb']:.0f} MiB")
    layouts = LAYOUTS if args.layout == "both" else (args.layout,)
    for layout in layouts:
        results = measure_layout(root / layout)
        print(f"\n{layout}: {describe(root / layout / RUN_ID)}")
        print(f"{'step':34} {'process wall s':>14} {'step s':>8} {'peak MiB':>9}")
        for label, r, step_s in results:
            wall = f"{r['wall_s']:14.2f}" if r else f"{'':>14}"
            step = f"{step_s:8.3f}" if step_s is not None else f"{'':>8}"
            peak = f"{r['peak_mb']:9.0f}" if r else ""
            print(f"{label:34} {wall} {step} {peak}")


if __name__ == "__main__":
    main()
