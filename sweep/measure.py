"""The energy of each request a worker serves, and the job's reference checks.

Two meters share one interface:

- `CounterMeter` (GPUs with an energy counter): a `CounterLog` records every move of the
  counters, and each request's phases (prefill, decode) are noted on the same clock. A
  request's `energy_j` is its own window's counter reading where that window is long
  enough to stand alone (`STANDALONE_WINDOW_S`, `energy_method = "window"`), and otherwise
  attributed from the counter's increments over the job (`sweep.meters.attribution`,
  `energy_method = "attributed"`). Either way the one-window reading is kept
  (`window_energy_j`). A request is finished once the counter has counted all of it (a
  fraction of a second after it ends): `ready()` hands out the requests finished so far.
- `WindowMeter` (GPUs without a counter, through Zeus's windows; or a CPU run): one
  window per request, finished at once.

A reference check (`CounterMeter.reference`) runs one request again and again, the same
seed each time, for at least `reference_window_s`, between two idle pauses long enough
for the counter to count each of them whole: the counter's energy between the pauses,
less their idle energy and that of the gaps between the repeats, over the repeats, is
what one such request spends, measured as the 2023 leaderboard measured (a long window),
with nothing attributed. `sweep validate` compares it with the row's `energy_j`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from sweep.meters.attribution import Attributed, Fit, Phases, Response, Timeline, attribute, fit

# A window at least this long reads its own energy to within about half a percent (the
# counter's period at each end): it stands alone.
STANDALONE_WINDOW_S = 5.0
# Before a worker's first request is stored, the counter's response is fitted on this much
# of its warm-up requests run back to back.
CALIBRATION_S = 4.0
FIT_WINDOW_S = 60.0  # the fit covers the counter's increments of this much of the recent past
POWER_REFIT_S = 2.0  # phase powers fitted again this often (the response held)
RESPONSE_REFIT_S = 30.0  # the counter's response fitted again this often
MIN_FIT_SPAN_S = 1.5
IDLE_S = 3.0  # idle power: the GPUs at rest this long, the counter read over the last part
# Until the response is known, wait this long past a request for the counter to count it.
DEFAULT_DELAY_S = 1.5
SPLIT_METHOD = "attributed: fitted phase power x phase time, with the counter's misfit shared by phase"


@dataclass(frozen=True)
class Window:
    start_s: float  # time.monotonic(), after the device sync that opens the window
    end_s: float
    start_unix_s: float
    end_unix_s: float

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class EnergyFigures:
    """What a row stores of one request's energy, and how it was obtained."""

    energy_j: float | None
    note: str | None  # why energy_j is None
    method: str | None  # "window" or "attributed"; None without a measurement
    uncertainty_j: float | None  # 1 sigma
    window_energy_j: float | None  # the one-window reading
    window_s: float
    zero_counter: bool = False
    counter_reset: bool = False
    prefill_j: float | None = None
    decode_j: float | None = None
    split_method: str | None = None
    model: str | None = None  # the attribution's fit (JSON), where it was used
    start_unix_s: float = 0.0  # the window's start, wall clock


@dataclass(frozen=True)
class ReferenceFigures:
    """A reference check: one request repeated inside one long window."""

    key: Any
    repeats: int
    window_s: float  # the repeats' span
    energy_j: float | None  # per request
    note: str | None
    response_tokens: list[int]
    cost_s: float  # GPU time it took, pauses included
    started_unix_s: float


@dataclass
class _Pending:
    key: Any
    window: Window
    phases: Phases | None


@dataclass
class _PendingReference:
    key: Any
    pause_before: tuple[float, float]
    pause_after: tuple[float, float]
    repeats: list[Phases]
    tokens: list[int]
    cost_s: float
    started_unix_s: float


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class WindowMeter:
    """One Zeus window per request (`sweep.meters.zeus.EnergyMeter`), finished at once."""

    attributes = False

    def __init__(self, meter) -> None:
        self.meter = meter
        self.available = meter.available
        self.power_limit_w = meter.power_limit_w
        self._done: list[tuple[Any, EnergyFigures]] = []

    def begin(self) -> None:
        self.meter.begin("request")

    def end(self, key: Any, phases: Phases | None) -> Window:
        r = self.meter.end("request")
        now = time.monotonic()
        window = Window(now - r.time_s, now, r.start_unix_s, r.end_unix_s)
        self._done.append((key, EnergyFigures(r.energy_j, r.note, "window" if r.energy_j is not None else None,
                                              None if r.energy_j is None else window_uncertainty_j(r.energy_j, r.time_s),
                                              r.energy_j, r.time_s, r.zero_counter, r.counter_reset,
                                              start_unix_s=r.start_unix_s)))
        return window

    def note(self, phases: Phases | None) -> None:
        pass

    def calibrate(self, run: Callable[[], Phases | None]) -> None:
        pass

    def idle_power_w(self) -> float | None:
        return self.meter.idle_power_w()

    def reference(self, key: Any, run: Callable[[], tuple[Phases | None, int]], window_s: float) -> bool:
        return False  # without a counter there is nothing to check the windows against

    def ready(self, final: bool = False) -> list[tuple[Any, EnergyFigures | ReferenceFigures]]:
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        pass


@dataclass
class _Fits:
    """The current fit of each GPU, and when it was made."""

    per_gpu: list[Fit | None] = field(default_factory=list)
    powers_at: float = float("-inf")
    response_at: float = float("-inf")


class CounterMeter:
    """Energy per request from the counter's log (see the module's docstring)."""

    attributes = True

    def __init__(self, num_gpus: int, log=None, power_limit_w: float | None = None) -> None:
        from sweep.meters.counter import CounterLog

        self.num_gpus = num_gpus
        self.log = log if log is not None else CounterLog(num_gpus)
        self.available = True
        self.power_limit_w = power_limit_w
        self.phases: list[Phases] = []  # every request the GPUs ran, stored or not
        self._pending: list[_Pending] = []
        self._references: list[_PendingReference] = []
        self._excluded: list[tuple[float, float]] = []  # reference periods: no fit counts them
        self._fits = _Fits([None] * num_gpus)
        self.fit_start_s: float | None = None  # the fit counts nothing before (compile, load)
        self.idle_w: float | None = None
        self._opened: tuple[float, float] | None = None

    # -- one request --------------------------------------------------------------------
    def begin(self) -> None:
        _sync()
        self._opened = (time.monotonic(), time.time())

    def end(self, key: Any, phases: Phases | None) -> Window:
        _sync()
        (t0, u0), t1 = self._opened, time.monotonic()
        window = Window(t0, t1, u0, u0 + (t1 - t0))
        self.note(phases)
        self._pending.append(_Pending(key, window, phases))
        return window

    def note(self, phases: Phases | None) -> None:
        """GPU work the fit must know of (every request run, stored or not)."""
        if phases is not None:
            self.phases.append(phases)

    # -- set-up ---------------------------------------------------------------------------
    def idle_power_w(self) -> float | None:
        """Mean power of the GPUs at rest (W), from the counter's moves well inside a pause."""
        _sync()
        t0 = time.monotonic()
        time.sleep(IDLE_S)
        t1 = time.monotonic()
        self.log.wait_until(t1)
        total = 0.0
        for c in self.log.counters:
            t, e = c.arrays()
            inside = (t >= t0 + IDLE_S / 2) & (t <= t1)
            if inside.sum() < 2:
                return None
            total += (e[inside][-1] - e[inside][0]) / (t[inside][-1] - t[inside][0])
        self.idle_w = total
        return total

    def calibrate(self, run: Callable[[], Phases | None]) -> None:
        """Requests back to back for CALIBRATION_S (not stored): the first fit's data."""
        self.fit_start_s = time.monotonic()
        while time.monotonic() - self.fit_start_s < CALIBRATION_S:
            self.note(run())
        self._refit(time.monotonic(), force_response=True, wait=True)

    # -- reference checks -----------------------------------------------------------------
    def _pause_s(self) -> float:
        """An idle pause long enough that the counter counts one whole period inside it."""
        r = self._response()
        width = r.width_s if r is not None else 1.0
        return width + 0.25

    def reference_cost_s(self, window_s: float) -> float:
        """About what one reference check takes: its repeats and the two pauses."""
        return window_s + 2 * self._pause_s()

    def reference(self, key: Any, run: Callable[[], tuple[Phases | None, int]], window_s: float) -> bool:
        """Measure `run()` (one request, the same seed every time) the reference way; its
        figures come out of `ready()` later."""
        pause = self._pause_s()
        started, started_unix = time.monotonic(), time.time()
        _sync()
        a0 = time.monotonic()
        time.sleep(pause)
        a1 = time.monotonic()
        repeats, tokens = [], []
        while not repeats or repeats[-1].end_s - repeats[0].start_s < window_s:
            phases, n = run()
            if phases is None:
                return False
            repeats.append(phases)
            tokens.append(n)
            self.note(phases)
        _sync()
        b0 = time.monotonic()
        time.sleep(pause)
        b1 = time.monotonic()
        self._excluded.append((a0, b1))
        self._references.append(_PendingReference(key, (a0, a1), (b0, b1), repeats, tokens, b1 - started,
                                                  started_unix))
        return True

    def _reference_figures(self, ref: _PendingReference) -> ReferenceFigures:
        """The counter between a move that counted only the first pause and one that counted
        only the second, less the pauses' idle energy and the gaps' energy, per repeat."""
        core = (ref.repeats[0].start_s, ref.repeats[-1].end_s)
        total, note = 0.0, None
        for gpu, c in enumerate(self.log.counters):
            f = self._fits.per_gpu[gpu]
            r = f.response if f is not None else Response(0.1, 1.0)
            t, e = c.arrays()
            counted = t - r.lag_s - r.width_s / 2  # the middle of what each move counted
            inside_a = (t - r.delay_s >= ref.pause_before[0]) & (t - r.lag_s <= ref.pause_before[1])
            inside_b = (t - r.delay_s >= ref.pause_after[0]) & (t - r.lag_s <= ref.pause_after[1])
            if not inside_a.any() or not inside_b.any():
                note = "no counter move fell inside the pauses around the repeats (the counter's response is longer)"
                break
            ia, ib = np.flatnonzero(inside_a)[-1], np.flatnonzero(inside_b)[0]
            idle_a = _power_inside(t, e, inside_a)
            idle_b = _power_inside(t, e, inside_b)
            idle = np.nanmean([idle_a, idle_b]) if not (np.isnan(idle_a) and np.isnan(idle_b)) else (self.idle_w or 0.0)
            span = e[ib] - e[ia]
            margin = (core[0] - counted[ia]) + (counted[ib] - core[1])
            gaps = sum(b.start_s - a.end_s for a, b in zip(ref.repeats, ref.repeats[1:]))
            between = f.scale * f.between_w if f is not None else idle
            total += span - idle * margin - between * gaps
        energy = None if note else total / len(ref.repeats)
        return ReferenceFigures(ref.key, len(ref.repeats), core[1] - core[0], energy, note, ref.tokens, ref.cost_s,
                                ref.started_unix_s)

    # -- finishing ------------------------------------------------------------------------
    def _response(self) -> Response | None:
        fits = [f for f in self._fits.per_gpu if f is not None]
        if not fits:
            return None
        return max((f.response for f in fits), key=lambda r: r.delay_s)

    def _delay_s(self) -> float:
        r = self._response()
        return DEFAULT_DELAY_S if r is None else r.delay_s + 0.15

    def _refit(self, now: float, force_response: bool = False, wait: bool = False) -> None:
        start = max(self.fit_start_s if self.fit_start_s is not None else now - FIT_WINDOW_S, now - FIT_WINDOW_S)
        if wait:
            self.log.wait_until(now + self._delay_s())
        else:
            self.log.drain()
        timeline = Timeline([p for p in self.phases if p.end_s >= start - 2.0])
        refit_response = force_response or now - self._fits.response_at >= RESPONSE_REFIT_S
        fits = []
        for gpu, c in enumerate(self.log.counters):
            old = self._fits.per_gpu[gpu]
            response = None if refit_response or old is None else old.response
            end = min(self.log.complete_until_s, now + self._delay_s())
            if end - start < MIN_FIT_SPAN_S:
                fits.append(old)
                continue
            new = fit(timeline, c, start, end, response, self._excluded)
            fits.append(new if new is not None else old)
        self._fits.per_gpu = fits
        self._fits.powers_at = now
        if refit_response:
            self._fits.response_at = now

    def ready(self, final: bool = False) -> list[tuple[Any, EnergyFigures | ReferenceFigures]]:
        """The requests (and reference checks) the counter has counted whole, finished;
        with `final`, wait for the counter to count every one."""
        now = time.monotonic()
        if final:
            last = max([p.window.end_s for p in self._pending] + [r.pause_after[1] for r in self._references], default=now)
            self.log.wait_until(last + self._delay_s() + 0.2, timeout_s=10.0)
        else:
            self.log.drain()
        if not self._pending and not self._references:
            return []
        if now - self._fits.powers_at >= POWER_REFIT_S or any(f is None for f in self._fits.per_gpu):
            self._refit(now)
        counted = self.log.complete_until_s - self._delay_s()
        fits_ready = all(f is not None for f in self._fits.per_gpu)
        done = [p for p in self._pending if (p.window.end_s <= counted and fits_ready) or final]
        refs = [r for r in self._references if r.pause_after[1] <= counted or final]
        out: list[tuple[Any, EnergyFigures | ReferenceFigures]] = []
        if done:
            self._pending = [p for p in self._pending if p not in done]
            out += [(p.key, fig if p.window.end_s <= counted else _uncounted(fig))
                    for p, fig in zip(done, self._figures(done))]
        for r in refs:
            self._references.remove(r)
            out.append((r.key, self._reference_figures(r)))
        self._forget(now)
        return out

    def _figures(self, done: list[_Pending]) -> list[EnergyFigures]:
        timeline = Timeline(self.phases)
        per_gpu: list[list[Attributed | None]] = []
        for gpu, c in enumerate(self.log.counters):
            f = self._fits.per_gpu[gpu]
            with_phases = [p.phases for p in done if p.phases is not None]
            got = iter(attribute(f, timeline, c, with_phases, self._excluded)) if f is not None else iter(())
            per_gpu.append([next(got, None) if p.phases is not None else None for p in done])
        return [self._one(p, [g[i] for g in per_gpu]) for i, p in enumerate(done)]

    def _one(self, p: _Pending, parts: list[Attributed | None]) -> EnergyFigures:
        w = p.window
        reads = [(c.value_at(w.start_s), c.value_at(w.end_s)) for c in self.log.counters]
        diffs = [None if a is None or b is None else b - a for a, b in reads]
        reset = any(d is not None and d < 0 for d in diffs)
        zero = any(d == 0 for d in diffs)
        window_j = None if reset or any(d is None for d in diffs) or (zero and w.seconds < 0.1) else float(sum(diffs))
        base = EnergyFigures(None, None, None, None, window_j, w.seconds, zero, reset, start_unix_s=w.start_unix_s)
        if reset:
            return replace(base, note="energy counter went backwards during the window (counter reset)")
        attributed = None if any(a is None for a in parts) else parts
        if attributed is not None:
            model = json.dumps([f.describe() for f in self._fits.per_gpu if f is not None], separators=(",", ":"))
            pre, dec = sum(a.prefill_j for a in attributed), sum(a.decode_j for a in attributed)
            energy = sum(a.energy_j for a in attributed)
            base = replace(base, prefill_j=pre, decode_j=dec, split_method=SPLIT_METHOD, model=model)
        if window_j is not None and (w.seconds >= STANDALONE_WINDOW_S or attributed is None):
            # The window reads its own energy; the attribution (where there is one) splits it by phase.
            share = pre / (pre + dec) if attributed is not None and pre + dec > 0 else None
            return replace(base, energy_j=window_j, method="window",
                           uncertainty_j=window_uncertainty_j(window_j, w.seconds),
                           prefill_j=None if share is None else window_j * share,
                           decode_j=None if share is None else window_j * (1 - share))
        if attributed is None:
            return replace(base, note="no counter attribution (too few counter moves to fit) and a window too "
                                      "short to read")
        sigma = math.sqrt(sum(a.uncertainty_j ** 2 for a in attributed))
        return replace(base, energy_j=energy, method="attributed", uncertainty_j=sigma)

    def _forget(self, now: float) -> None:
        """Keep what the next fits and the requests not yet finished still need."""
        keep_from = min([now - FIT_WINDOW_S - 5.0] + [p.window.start_s - 5.0 for p in self._pending]
                        + [r.pause_before[0] - 5.0 for r in self._references])
        self.phases = [p for p in self.phases if p.end_s >= keep_from]
        self._excluded = [(a, b) for a, b in self._excluded if b >= keep_from]
        self.log.forget_before(keep_from)

    def close(self) -> None:
        self.log.close()


def _uncounted(fig: EnergyFigures) -> EnergyFigures:
    """A request the counter's log never covered (its poller stopped): no energy, and why."""
    return replace(fig, energy_j=None, method=None, uncertainty_j=None, window_energy_j=None, prefill_j=None,
                   decode_j=None, split_method=None, model=None,
                   note="the energy counter's log stopped before it had counted this request")


def _power_inside(t: np.ndarray, e: np.ndarray, inside: np.ndarray) -> float:
    """Mean power over the moves flagged `inside` (NaN with fewer than two)."""
    idx = np.flatnonzero(inside)
    if len(idx) < 2 or t[idx[-1]] <= t[idx[0]]:
        return float("nan")
    return float((e[idx[-1]] - e[idx[0]]) / (t[idx[-1]] - t[idx[0]]))


def window_uncertainty_j(energy_j: float, seconds: float, period_s: float = 0.1) -> float:
    """1 sigma of one window's reading: each end is off by up to one counter period of
    energy (the difference of two uniform errors: period / sqrt(6))."""
    return energy_j / seconds * period_s / math.sqrt(6) if seconds > 0 else float("nan")


def open_meter(num_gpus: int):
    """The worker's meter: counter attribution where every GPU has an energy counter, Zeus
    windows otherwise (and no energy at all on a CPU run)."""
    import torch

    from sweep.meters.zeus import EnergyMeter, power_limit_w

    if num_gpus and torch.cuda.is_available():
        try:
            from zeus.device import get_gpus

            gpus = get_gpus()
            if all(gpus.supports_get_total_energy_consumption(i) for i in range(num_gpus)):
                return CounterMeter(num_gpus, power_limit_w=power_limit_w(list(range(num_gpus))))
        except Exception:  # no NVML, no counter: Zeus's windows say why
            pass
    return WindowMeter(EnergyMeter(num_gpus if torch.cuda.is_available() else 0))
