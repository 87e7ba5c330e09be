"""A job served N requests at a time: each request's energy from the counter by token share
(sweep.meters.token_share), its row finished once the counter has counted all of it, and
the job's steady window.

The worker registers each request when it is sent (`start`, which gives the list the
backend appends each streamed token's arrival time to, live: the requests still in flight
share the increments of those that end) and when its answer is in (`end`). `ready()` hands
out the requests the counter has counted whole, as `sweep.measure.EnergyFigures`, with
`energy_method = "token_share"`; `summary()` gives the job's steady window, its energy per
token, and the counter's energy over the job beside the rows' sum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sweep.meters.attribution import Phases
from sweep.meters.token_share import Streamed, counted_until, steady_window, token_share

METHOD = "token_share"
MARGIN_S = 1.0  # increments this far around the requests being finished are read with them


@dataclass
class _Request:
    key: Any
    start_s: float
    start_unix_s: float
    tokens: list[float] = field(default_factory=list)  # arrival times, appended by the backend as they stream
    end_s: float | None = None

    def streamed(self, now: float) -> Streamed:
        return Streamed(self.start_s, tuple(self.tokens), self.end_s if self.end_s is not None else now)


class TokenShareJob:
    """The requests of one job at concurrency N on one worker's meter (a CounterMeter, or a
    meter with no counter: then the rows have no energy and say why)."""

    def __init__(self, meter, concurrency: int) -> None:
        self.meter, self.concurrency = meter, concurrency
        self.counter = getattr(meter, "log", None)
        response = meter._response() if self.counter is not None else None
        self.lag_s = 0.0 if response is None else response.lag_s + response.width_s / 2
        self.idle_w = _between_power_w(meter) if self.counter is not None else 0.0
        self.requests: list[_Request] = []
        self._open: list[_Request] = []  # answered, not yet finished
        self.queue_empty_s: float | None = None
        self.steady_start_s: float | None = None
        self.finished_j = 0.0

    def start(self) -> _Request:
        """A request sent now; the backend appends its tokens' arrival times to `.tokens`."""
        r = _Request(None, time.monotonic(), time.time())
        self.requests.append(r)
        if len(self.requests) == self.concurrency:
            self.steady_start_s = r.start_s  # N in flight from here
        return r

    def end(self, r: _Request, key: Any, out) -> None:
        r.key, r.end_s = key, r.start_s + out.latency_s
        first = r.tokens[0] if r.tokens else r.end_s
        self.meter.note(Phases(r.start_s, min(first, r.end_s), r.end_s))
        self._open.append(r)

    def last_sent(self) -> None:
        """The last prompt was sent: the steady window ends at the next answer."""
        self.queue_empty_s = time.monotonic()

    def _inside(self, r: _Request) -> bool:
        """Inside the steady window: started once N were in flight, ended before it closed."""
        if self.steady_start_s is None or r.start_s < self.steady_start_s:
            return False
        if self.queue_empty_s is None:
            return True
        ends = [x.end_s for x in self.requests if x.end_s is not None and x.end_s > self.queue_empty_s]
        return not ends or r.end_s < min(ends)

    def ready(self, final: bool = False) -> list[tuple[Any, Any, bool]]:
        """(key, EnergyFigures, inside the steady window) of the requests counted whole."""
        from sweep.measure import EnergyFigures

        if not self._open:
            return []
        if self.counter is None:
            done, self._open = self._open, []
            note = (f"no energy counter on this worker: rows of concurrency {self.concurrency} take their energy "
                    f"from the counter's increments (token share)")
            return [(r.key, EnergyFigures(None, note, None, None, None, r.end_s - r.start_s,
                                          start_unix_s=r.start_unix_s), self._inside(r)) for r in done]
        if final:
            self.counter.wait_until(max(r.end_s for r in self._open) + self.lag_s + 0.3, timeout_s=10.0)
        else:
            self.counter.drain()
        u, _ = self.counter.counters[0].arrays()
        done = [r for r in self._open if counted_until(u, self.lag_s, r.end_s) or final]
        if not done:
            return []
        self._open = [r for r in self._open if r not in done]
        energies = self._energies(done)
        out = []
        for r, energy in zip(done, energies):
            counted = counted_until(u, self.lag_s, r.end_s)
            fig = EnergyFigures(energy if counted else None,
                                None if counted else "the energy counter's log stopped before it had counted this "
                                                     "request",
                                METHOD if counted else None, None, None, r.end_s - r.start_s,
                                start_unix_s=r.start_unix_s)
            if counted:
                self.finished_j += energy
            out.append((r.key, fig, self._inside(r)))
        return out

    def _energies(self, done: list[_Request]) -> list[float]:
        """Token-share energy of `done`, summed over the GPUs, from the increments around them
        and every request that shares those increments."""
        now = time.monotonic()
        lo, hi = min(r.start_s for r in done) - MARGIN_S, max(r.end_s for r in done) + MARGIN_S
        near = [r for r in self.requests if r.start_s <= hi and (r.end_s is None or r.end_s >= lo)]
        index = [near.index(r) for r in done]
        total = np.zeros(len(done))
        for c in self.counter.counters:
            u, e = c.arrays()
            keep = np.flatnonzero((u - self.lag_s >= lo - MARGIN_S) & (u - self.lag_s <= hi + MARGIN_S))
            if len(keep) < 2:
                continue
            got = token_share(u[keep], e[keep], [r.streamed(now) for r in near], self.lag_s, self.idle_w / len(
                self.counter.counters))
            total += got[index]
        return [float(x) for x in total]

    def summary(self) -> dict:
        """The job's steady window and its energy per token, and the counter over the job."""
        finished = [r for r in self.requests if r.end_s is not None]
        out: dict = {"concurrency": self.concurrency, "requests": len(finished),
                     "rows_energy_j": round(self.finished_j, 3), "lag_s": round(self.lag_s, 3),
                     "between_power_w": round(self.idle_w, 1)}
        if not finished:
            return out | {"note": "no request finished"}
        streamed = [r.streamed(time.monotonic()) for r in finished]
        u = e = None
        if self.counter is not None:
            u, e = self.counter.counters[0].arrays()
            if len(self.counter.counters) > 1:  # several GPUs: the sum of their counters, on the first one's clock
                e = sum(np.interp(u, *c.arrays()) for c in self.counter.counters)
        w = steady_window(streamed, self.concurrency, self.queue_empty_s, u, e, self.lag_s)
        if u is not None and len(u) >= 2:
            a, b = min(r.start_s for r in finished) + self.lag_s, max(r.end_s for r in finished) + self.lag_s
            out["counter_energy_j"] = round(float(np.interp(b, u, e) - np.interp(a, u, e)), 3)
        if w is None:
            return out | {"note": f"fewer requests ({len(finished)}) than the concurrency: no steady window"}
        return out | {"steady_start_unix_s": time.time() - (time.monotonic() - w.start_s),
                      "steady_window_s": round(w.seconds, 3), "steady_tokens": w.tokens,
                      "steady_energy_j": None if w.energy_j is None else round(w.energy_j, 3),
                      "steady_energy_per_token_j": w.energy_per_token_j}


def _between_power_w(meter) -> float:
    """The GPUs' power between requests (W, summed): the fit's where there is one (a warm
    GPU between requests), else the idle power measured at load, else 0."""
    fits = [f for f in meter._fits.per_gpu if f is not None]
    if fits and len(fits) == len(meter._fits.per_gpu):
        return float(sum(f.scale * f.between_w for f in fits))
    return float(meter.idle_w or 0.0)
