"""A power (and temperature) timeline of the worker's own GPUs, and energy from it.

Zeus's `PowerMonitor` polls each GPU's instant power in a process of its own (no GIL
shared with the decode loop) and keeps a sample only when the reading changes, so a
reading holds until the next sample: energy over [t0, t1] is the integral of that step
function (`integrate_j`). The timeline splits a request's energy into prefill
([start, first token]) and decode ([first token, end]), which the energy counter,
moving every ~100 ms, cannot. Samples reach `runs/<id>/power/` in part files.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import pyarrow as pa

# 50 Hz: a prefill of tens of milliseconds gets a sample or two; the poller runs in
# its own process and sends only changed readings.
POLL_PERIOD_S = 0.02
TEMPERATURE_PERIOD_S = 1.0
# Zeus keeps at most this many samples per GPU (200 s at 50 Hz, more as it keeps only
# changed readings). They are copied out after every request, and each copy walks all of
# them in Python between requests: small enough to cost a few ms, large enough for a request.
MAX_SAMPLES_PER_GPU = 10_000

POWER_SCHEMA = pa.schema([
    ("model", pa.string()),  # the job open when the samples were written
    ("task", pa.string()),
    ("host", pa.string()),
    ("gpu_index", pa.int32()),  # physical index, as gpu_index in the results
    ("timestamp", pa.timestamp("us", tz="UTC")),
    ("power_w", pa.float64()),  # null on a temperature sample
    ("temperature_c", pa.float64()),  # null on a power sample
])


def integrate_j(times_s: list[float], power_w: list[float], t0: float, t1: float) -> float | None:
    """Energy (J) over [t0, t1] of one GPU's samples (sorted times, each reading holding
    until the next). Before the first sample the first reading is assumed; None when
    there is no sample at all."""
    if not times_s:
        return None
    if t1 <= t0:
        return 0.0
    i = max(bisect.bisect_right(times_s, t0) - 1, 0)
    energy, t, p = 0.0, t0, power_w[i]
    for j in range(i + 1, len(times_s)):
        if times_s[j] >= t1:
            break
        if times_s[j] > t:
            energy += p * (times_s[j] - t)
            t = times_s[j]
        p = power_w[j]
    return energy + p * (t1 - t)


@dataclass
class _Gpu:
    times_s: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    written: int = 0  # samples already handed to the store


class PowerTimeline:
    """Samples the worker's GPUs 0..n-1 (positions in CUDA_VISIBLE_DEVICES); `physical`
    are their physical indices, as stored. Raises when Zeus cannot monitor them."""

    method = f"power timeline, {POLL_PERIOD_S * 1e3:g} ms NVML poll, step integral"

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

    def energy_j(self, *bounds: float) -> list[float | None]:
        """Energy (J) of all the worker's GPUs over each interval between consecutive
        `bounds` (time.time() clock): (start, first token, end) -> [prefill, decode]."""
        self._collect()
        out = []
        for t0, t1 in zip(bounds, bounds[1:]):
            parts = [integrate_j(g.times_s, g.power_w, t0, t1) for g in self._gpus.values()]
            out.append(None if any(p is None for p in parts) else float(sum(parts)))
        return out

    def take(self, model: str, task: str) -> pa.Table:
        """Samples not yet handed out, as a table of POWER_SCHEMA. The last sample of each
        GPU stays in memory: the next window's integral starts from it."""
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
