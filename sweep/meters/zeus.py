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
    start_unix_s: float = 0.0  # wall clock (time.time()) at the window's start: the power timeline's clock
    end_unix_s: float = 0.0
    zero_counter: bool = False  # some GPU's counter did not move during the window
    counter_reset: bool = False  # some GPU's counter went backwards (a driver reset): no energy figure


class EnergyMeter:
    """Energy windows over the worker's GPUs (positions 0..num_gpus-1 in CUDA_VISIBLE_DEVICES).

    `begin(key)` / `end(key)` bracket one request; units: joules and seconds.
    """

    def __init__(self, num_gpus: int) -> None:
        self._monitor = None
        self.unavailable_reason: str | None = None
        self.power_limit_w: float | None = None  # enforced power limit, summed over the GPUs
        import torch

        if num_gpus == 0 or not torch.cuda.is_available():
            self.unavailable_reason = "no GPU energy counter (CPU run)"
            return
        from zeus.monitor import ZeusMonitor

        try:
            self._monitor = ZeusMonitor(gpu_indices=list(range(num_gpus)), cpu_indices=[])
        except Exception as exc:  # e.g. a GPU without an NVML energy counter
            self.unavailable_reason = f"GPU energy unavailable: {exc}"
            return
        self.power_limit_w = power_limit_w(list(range(num_gpus)))

    @property
    def available(self) -> bool:
        return self._monitor is not None

    def begin(self, key: str) -> None:
        if self._monitor is not None:
            self._monitor.begin_window(key, sync_execution=True)
        else:
            self._t0 = time.perf_counter()
        # After the window opened (its GPU sync included): the backend's clock starts next.
        self._t0_unix = time.time()

    def end(self, key: str) -> EnergyReading:
        if self._monitor is None:
            return EnergyReading(None, time.perf_counter() - self._t0, self.unavailable_reason, self._t0_unix, time.time())
        m = self._monitor.end_window(key, sync_execution=True)
        return reading_of(m.gpu_energy, m.time, self._t0_unix, time.time())

    def idle_power_w(self, seconds: float = 2.0) -> float | None:
        """Mean power of the worker's GPUs while nothing runs on them (watts)."""
        if self._monitor is None:
            return None
        self.begin("__idle__")
        time.sleep(seconds)
        reading = self.end("__idle__")
        return None if reading.energy_j is None else reading.energy_j / reading.time_s


def reading_of(gpu_energy_j: dict[int, float], time_s: float, start_unix_s: float, end_unix_s: float) -> EnergyReading:
    """One window's per-GPU counter differences -> the reading stored with the row."""
    values = list(gpu_energy_j.values())
    if any(v < 0 for v in values):
        return EnergyReading(None, time_s, "energy counter went backwards during the window (counter reset)",
                             start_unix_s, end_unix_s, zero_counter=False, counter_reset=True)
    zero = any(v == 0.0 for v in values)
    energy_j = float(sum(values))
    if zero and time_s < COUNTER_PERIOD_S:
        return EnergyReading(None, time_s, f"window of {time_s * 1e3:.0f} ms is shorter than the energy counter period",
                             start_unix_s, end_unix_s, zero_counter=True)
    return EnergyReading(energy_j, time_s, None, start_unix_s, end_unix_s, zero_counter=zero)


def power_limit_w(gpu_indices: list[int]) -> float | None:
    """The enforced power limit of these GPUs (Zeus's view of NVML), summed, in watts."""
    try:
        from zeus.device import get_gpus

        gpus = get_gpus()
        return sum(gpus.get_power_management_limit(i) for i in gpu_indices) / 1000.0
    except Exception:  # a GPU that does not report it: the power bound check is skipped
        return None
