"""How the NVML energy counter responds to a known pattern of GPU work: how often it
moves, how far it trails the work, and whether it smooths it.

A child process reads GPU 0's energy counter (and its instant power) as fast as NVML
answers, each read stamped on the host's monotonic clock, while this process runs a fixed
pattern of busy and idle segments (matrix products, copies, pauses, short pulses) whose
start and end it stamps on the same clock (after a device sync). Then, for each candidate
response of the counter (a delay, then a moving average of some width), it fits the
segments' powers to the counter's increments and prints how well each candidate explains
them. The raw samples go to --out (an .npz) for a closer look.

    python bench/counter_response.py --out counter.npz
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CHILD = r"""
import sys, threading, time
import numpy as np
import pynvml

pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
INSTANT = getattr(pynvml, "NVML_FI_DEV_POWER_INSTANT", 186)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
rows = []
print("polling", flush=True)
while not stop.is_set():
    t0 = time.monotonic()
    e = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    t1 = time.monotonic()
    try:
        p = pynvml.nvmlDeviceGetFieldValues(h, [INSTANT])[0]
        p = p.value.uiVal if p.nvmlReturn == 0 else -1
    except Exception:
        p = -1
    rows.append((t0, t1, e, p))
np.save(sys.argv[1], np.array(rows, dtype=np.float64).reshape(-1, 4))
"""


def pattern():
    """(kind, seconds) segments: 'idle', 'mm' (matrix products), 'copy' (memory bound)."""
    segs = [("idle", 2.0), ("mm", 2.0), ("idle", 2.0), ("copy", 2.0), ("idle", 2.0)]
    segs += [("mm", 0.05), ("idle", 0.05)] * 30 + [("idle", 1.5)]
    segs += [("mm", 0.02), ("idle", 0.08)] * 30 + [("idle", 1.5)]
    segs += [("mm", 0.01), ("idle", 0.5)] * 6
    segs += [("mm", 0.06), ("copy", 0.06)] * 20 + [("idle", 1.5)]
    segs += [("copy", 0.03), ("idle", 0.01)] * 50 + [("idle", 1.5)]
    return segs


def run_pattern():
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def timed(fn, n=5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    mm = lambda: a @ a  # noqa: E731
    cp = lambda: dst.copy_(src)  # noqa: E731
    timed(mm), timed(cp)
    per = {"mm": timed(mm), "copy": timed(cp)}
    out = []
    torch.cuda.synchronize()
    for kind, seconds in pattern():
        t0 = time.monotonic()
        if kind == "idle":
            time.sleep(seconds)
        else:
            fn = mm if kind == "mm" else cp
            for _ in range(max(1, round(seconds / per[kind]))):
                fn()
            torch.cuda.synchronize()
        out.append((kind, t0, time.monotonic()))
    return out, per


def predicted(edges_t, segs, powers, lag, width):
    """Counter value at times edges_t under a response (delay `lag`, moving average of
    `width` s) to segment powers `powers` (kind -> W); J, up to a constant."""
    # energy E(t) of the work, piecewise linear through the segment ends
    t = np.concatenate([[segs[0][1]], [s[2] for s in segs]])
    e = np.concatenate([[0.0], np.cumsum([powers[k] * (b - a) for k, a, b in segs])])

    def E(x):
        return np.interp(x, t, e, left=0.0, right=e[-1] + powers["idle"] * 0)  # flat outside

    x = np.asarray(edges_t) - lag
    if width <= 0:
        return E(x)
    n = 16  # moving average of E over [x - width, x], by quadrature
    return np.mean([E(x - width * (i + 0.5) / n) for i in range(n)], axis=0)


def analyse(samples, segs):
    """Per candidate (lag, width): the fitted powers and the RMS misfit of the counter's increments."""
    t_mid = (samples[:, 0] + samples[:, 1]) / 2
    energy = samples[:, 2] / 1e3
    changed = np.flatnonzero(np.diff(energy) != 0) + 1
    # the counter moved between read i-1 and read i: stamped at the earlier read's end
    upd_t = samples[changed - 1, 1]
    upd_e = energy[changed]
    period = np.median(np.diff(upd_t)) if len(upd_t) > 2 else float("nan")
    print(f"{len(samples)} reads, one every {np.median(np.diff(t_mid)) * 1e3:.2f} ms; the counter moved "
          f"{len(upd_t)} times, every {period * 1e3:.1f} ms (median)")
    kinds = ["idle", "mm", "copy"]
    inside = (upd_t > segs[0][1] + 0.5) & (upd_t < segs[-1][2] - 0.5)
    ut, ue = upd_t[inside], upd_e[inside]
    y = np.diff(ue)
    best = None
    results = []
    for lag in np.arange(0.0, 0.401, 0.01):
        for width in (0.0, 0.05, 0.1, 0.2, 0.5, 1.0):
            cols = []
            for k in kinds:
                unit = {kk: (1.0 if kk == k else 0.0) for kk in kinds}
                cols.append(np.diff(predicted(ut, segs, unit, lag, width)))
            X = np.stack(cols, axis=1)
            coef, *_ = np.linalg.lstsq(X, y, rcond=None)
            rms = float(np.sqrt(np.mean((X @ coef - y) ** 2)))
            results.append((rms, lag, width, coef))
            if best is None or rms < best[0]:
                best = (rms, lag, width, coef)
    results.sort(key=lambda r: r[0])
    print(f"counter increments: mean {np.mean(y):.2f} J; best responses (RMS misfit J, lag ms, width ms, "
          f"W idle/mm/copy):")
    for rms, lag, width, coef in results[:8]:
        print(f"  {rms:7.3f}  lag {lag * 1e3:5.0f}  width {width * 1e3:5.0f}  " + " / ".join(f"{c:.0f}" for c in coef))
    for width in (0.0, 0.1, 1.0):
        r = min((r for r in results if r[2] == width), key=lambda r: r[0])
        print(f"  best with width {width * 1e3:.0f} ms: RMS {r[0]:.3f} J at lag {r[1] * 1e3:.0f} ms")
    inst = samples[:, 3]
    if (inst >= 0).any():
        moved = np.flatnonzero(np.diff(inst) != 0)
        print(f"instant power moved {len(moved)} times, every "
              f"{np.median(np.diff(t_mid[moved + 1])) * 1e3:.1f} ms (median)")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="save the raw samples and segments here (.npz)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.npy"
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "polling"
        segs, per = run_pattern()
        time.sleep(1.0)
        child.stdin.close()
        child.wait(timeout=60)
        samples = np.load(path)
    print(f"one matrix product {per['mm'] * 1e3:.2f} ms, one 2 GiB copy {per['copy'] * 1e3:.2f} ms")
    analyse(samples, segs)
    if args.out:
        np.savez(args.out, samples=samples, kinds=np.array([s[0] for s in segs]),
                 starts=np.array([s[1] for s in segs]), ends=np.array([s[2] for s in segs]))


if __name__ == "__main__":
    main()
