"""An independent reading of every GPU's energy: NVML's counter polled in a thread.

Used to check the energy the sweep stores (tests/test_gpu.py, bench/decode.py): it
shares no code with the meter, only the hardware counter.
"""

import threading
import time

import numpy as np


class NvmlEnergyLog:
    """(time, counter in J) of every GPU, polled every 10 ms in a thread."""

    def __init__(self):
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.samples = {i: [] for i in range(len(self.handles))}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            now = time.time()
            for i, h in enumerate(self.handles):
                self.samples[i].append((now, self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3))
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def counter_period_ms(self, gpu):
        """Median time between changes of the counter (ms): how often NVML updates it."""
        t, e = np.array(self.samples[gpu]).T
        changed = t[1:][np.diff(e) != 0]
        return round(float(np.median(np.diff(changed))) * 1e3, 1) if len(changed) > 2 else None

    def energy_j(self, gpu, start, end):
        t, e = np.array(self.samples[gpu]).T
        return float(np.interp(end, t, e) - np.interp(start, t, e))
