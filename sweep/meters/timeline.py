"""A power (and temperature) timeline of the worker's own GPUs, as NVML reports them.

Zeus's `PowerMonitor` polls each GPU's instant power in a process of its own (no GIL
shared with the decode loop) and keeps a sample only when the reading changes (about
every 100 ms on the GPUs measured so far, whatever the poll period); `TemperatureMonitor`
adds temperatures every second. Samples reach `runs/<id>/power/` in part files: the UI
draws them beside each request, and `validate` checks the temperatures. A request's
energy, and its split into prefill and decode, come from the energy counter
(sweep/meters/attribution.py), which the power readings are too coarse for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from sweep.record import POWER_SCHEMA

# NVML's power reading changes about every 100 ms: polling twice as often sees every
# change (faster polls add NVML calls beside the energy counter's poller, and nothing else).
POLL_PERIOD_S = 0.05
TEMPERATURE_PERIOD_S = 1.0
# Zeus keeps at most this many samples per GPU (changed readings only). They are copied
# out every POWER_WRITE_S, walked in Python: small enough to cost little, long enough.
MAX_SAMPLES_PER_GPU = 10_000


@dataclass
class _Gpu:
    times_s: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    written: int = 0  # samples already handed to the store


class PowerTimeline:
    """Samples the worker's GPUs 0..n-1 (positions in CUDA_VISIBLE_DEVICES); `physical`
    are their physical indices, as stored. Raises when Zeus cannot monitor them."""


    def __init__(self, num_gpus: int, physical: list[int], host: str, power_monitor=None,
                 temperature_monitor=None) -> None:
        """`power_monitor` / `temperature_monitor`: Zeus's monitors (started here when not given)."""
        self._indices = list(range(num_gpus))
        self._physical, self._host = physical, host
        if power_monitor is None:
            from zeus.monitor.power import PowerMonitor

            power_monitor = PowerMonitor(gpu_indices=self._indices, update_period=POLL_PERIOD_S,
                                         max_samples_per_gpu=MAX_SAMPLES_PER_GPU, power_domains=["device_instant"])
            try:
                from zeus.monitor.temperature import TemperatureMonitor

                temperature_monitor = TemperatureMonitor(gpu_indices=self._indices, update_period=TEMPERATURE_PERIOD_S)
            except Exception:  # temperature is optional: a GPU that does not report it still has power
                temperature_monitor = None
        self._power, self._temperature = power_monitor, temperature_monitor
        self._gpus = {i: _Gpu() for i in self._indices}
        self._temps: list[tuple[float, int, float]] = []
        self._temp_seen: dict[int, float] = {}  # per GPU, the last temperature sample handed out

    def _collect(self) -> None:
        """New samples from the monitor's processes into this object's lists."""
        for i, g in self._gpus.items():
            last = g.times_s[-1] if g.times_s else None
            for t, p in self._power.get_power_timeline("device_instant", gpu_index=i, start_time=last).get(i, []):
                if last is None or t > last:
                    g.times_s.append(t)
                    g.power_w.append(p)
        if self._temperature is not None:
            for i, timeline in self._temperature.get_temperature_timeline(start_time=min(self._temp_seen.values(),
                                                                                         default=None)).items():
                seen = self._temp_seen.get(i, float("-inf"))
                self._temps += [(t, i, float(c)) for t, c in timeline if t > seen]
                if timeline:
                    self._temp_seen[i] = max(seen, max(t for t, _ in timeline))

    def take(self, model: str, task: str) -> pa.Table:
        """Samples not yet handed out, as a table of POWER_SCHEMA. The last sample of each
        GPU stays in memory: the next samples are those after it."""
        self._collect()
        rows: dict[str, list] = {name: [] for name in POWER_SCHEMA.names}

        def add(t: float, i: int, power: float | None, temp: float | None) -> None:
            for name, value in zip(POWER_SCHEMA.names, (model, task, self._host, self._physical[i], round(t * 1e6), power, temp)):
                rows[name].append(value)

        for i, g in self._gpus.items():
            for t, p in zip(g.times_s[g.written:], g.power_w[g.written:]):
                add(t, i, p, None)
            keep = max(len(g.times_s) - 1, 0)
            del g.times_s[:keep], g.power_w[:keep]
            g.written = len(g.times_s)
        for t, i, c in self._temps:
            add(t, i, None, c)
        self._temps = []
        # Microseconds since the epoch: pyarrow takes integers for a timestamp column.
        return pa.Table.from_pydict(rows, schema=POWER_SCHEMA)
