"""GPU energy of one worker's own GPUs, over begin/end windows (Zeus).

Create the meter inside the worker process: Zeus reads `CUDA_VISIBLE_DEVICES` once, and
Ray sets it to the GPUs of that worker, so indices 0..n-1 are exactly its own GPUs and
nobody else's. Where there is no GPU energy counter the reading is `None` with a reason:
never 0, never an estimate presented as a measurement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# NVML's energy counter moves about every 100 ms; a shorter window can read 0 J.
COUNTER_PERIOD_S = 0.1


@dataclass(frozen=True)
class EnergyReading:
    energy_j: float | None  # joules summed over the worker's GPUs; None = not measured
    time_s: float  # seconds the window lasted
    note: str | None  # why energy_j is None, else None


class EnergyMeter:
    """Energy windows over GPUs `gpu_indices` (positions in CUDA_VISIBLE_DEVICES).

    `begin(key)` / `end(key)` bracket one request; units: joules and seconds.
    """

    def __init__(self, num_gpus: int) -> None:
        self._monitor = None
        self.unavailable_reason: str | None = None
        import torch

        if num_gpus == 0 or not torch.cuda.is_available():
            self.unavailable_reason = "no GPU energy counter (CPU run)"
            return
        from zeus.monitor import ZeusMonitor

        try:
            self._monitor = ZeusMonitor(gpu_indices=list(range(num_gpus)), cpu_indices=[])
        except Exception as exc:  # e.g. a GPU without an NVML energy counter
            self.unavailable_reason = f"GPU energy unavailable: {exc}"

    @property
    def available(self) -> bool:
        return self._monitor is not None

    def begin(self, key: str) -> None:
        if self._monitor is not None:
            self._monitor.begin_window(key, sync_execution=True)
        else:
            self._t0 = time.perf_counter()

    def end(self, key: str) -> EnergyReading:
        if self._monitor is None:
            return EnergyReading(None, time.perf_counter() - self._t0, self.unavailable_reason)
        m = self._monitor.end_window(key, sync_execution=True)
        energy_j = float(sum(m.gpu_energy.values()))
        if energy_j == 0.0 and m.time < COUNTER_PERIOD_S:
            return EnergyReading(None, m.time, f"window of {m.time * 1e3:.0f} ms is shorter than the energy counter period")
        return EnergyReading(energy_j, m.time, None)

    def idle_power_w(self, seconds: float = 2.0) -> float | None:
        """Mean power of the worker's GPUs while nothing runs on them (watts)."""
        if self._monitor is None:
            return None
        self.begin("__idle__")
        time.sleep(seconds)
        reading = self.end("__idle__")
        return None if reading.energy_j is None else reading.energy_j / reading.time_s
