"""An independent reading of every GPU's energy: NVML's counter polled in a process of its own.

Used to check the energy the sweep stores (tests/e2e/test_gpu.py, bench/decode.py): it
shares no code with the meter, only the hardware counter. The counter moves about every
100 ms, in steps of that much energy; a reading at a window's edge interpolates between
the two polls around it, so a coarse poll can split a step the meter saw whole (at 10 ms,
a 0.3 s window read off by a whole step about one time in ten). Polling every 1 ms makes
that rare; the poll runs in a child process, so it takes no time from the measured
process's interpreter.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

POLL_PERIOD_S = 0.001

# The child: polls until its stdin closes, then saves (time, GPU, counter J) rows.
_CHILD = r"""
import sys, threading, time
import numpy as np
import pynvml

pynvml.nvmlInit()
handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
rows = []
print("polling", flush=True)
while not stop.is_set():
    for i, h in enumerate(handles):
        before = time.time()
        joules = pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3
        rows.append(((before + time.time()) / 2, i, joules))  # a read takes ms here: stamped at its middle
    time.sleep(float(sys.argv[2]))
np.save(sys.argv[1], np.array(rows, dtype=np.float64).reshape(-1, 3))
"""


class NvmlEnergyLog:
    """(time, counter in J) of every GPU, polled every `period_s` in a child process; the
    samples are there once the `with` block has ended."""

    def __init__(self, period_s: float = POLL_PERIOD_S):
        self.period_s = period_s
        self.samples: dict[int, np.ndarray] = {}
        self._dir = tempfile.TemporaryDirectory()
        self._path = Path(self._dir.name) / "nvml.npy"
        self._child = None

    def __enter__(self):
        self._child = subprocess.Popen([sys.executable, "-c", _CHILD, str(self._path), str(self.period_s)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self._child.stdout.readline().strip() != "polling":  # NVML is up before the caller starts
            raise RuntimeError(f"NVML poller failed to start (exit status {self._child.wait()})")
        return self

    def __exit__(self, *exc):
        self._child.stdin.close()
        if self._child.wait(timeout=60) != 0:
            raise RuntimeError(f"NVML poller exited with status {self._child.returncode}")
        rows = np.load(self._path)
        self._dir.cleanup()
        self.samples = {int(g): rows[rows[:, 1] == g][:, [0, 2]] for g in np.unique(rows[:, 1])}

    def counter_period_ms(self, gpu):
        """Median time between changes of the counter (ms): how often NVML updates it."""
        t, e = self.samples[gpu].T
        changed = t[1:][np.diff(e) != 0]
        return round(float(np.median(np.diff(changed))) * 1e3, 1) if len(changed) > 2 else None

    def energy_j(self, gpu, start, end):
        t, e = self.samples[gpu].T
        return float(np.interp(end, t, e) - np.interp(start, t, e))


def main() -> None:
    """How the counter behaves here: time per read (alone and while the poller runs), how often it moves."""
    import statistics
    import time

    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def read_us(n: int = 200) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)

    alone = read_us()
    with NvmlEnergyLog() as log:
        polled = read_us()
        time.sleep(1.0)
    t = log.samples[0][:, 0]
    print(f"energy counter read: {alone:.0f} us alone, {polled:.0f} us while polled; poll period "
          f"{np.median(np.diff(t)) * 1e3:.2f} ms; counter moves every {log.counter_period_ms(0)} ms")

    # What a worker pays per request for its energy window and its power timeline.
    from sweep.meters.timeline import PowerTimeline
    from sweep.meters.zeus import EnergyMeter

    meter = EnergyMeter(1)

    def median_ms(fn, n: int = 50) -> float:
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def window(i: int) -> None:
        meter.begin(f"w{i}")
        meter.end(f"w{i}")

    alone = median_ms(window)
    timeline = PowerTimeline(1, [0], "bench")
    time.sleep(3.0)
    with_timeline = median_ms(window)
    split = median_ms(lambda i: timeline.energy_j(time.time() - 0.3, time.time() - 0.2, time.time()))
    timeline.stop()
    print(f"energy window (begin + end): {alone:.2f} ms alone, {with_timeline:.2f} ms while the power timeline "
          f"polls; the timeline's prefill/decode split: {split:.2f} ms")


if __name__ == "__main__":
    main()
