"""Energy of each request from a GPU's energy counter, whatever the request's length.

NVML's energy counter moves about every 100 ms and trails the work it counts, so one
counter window around a request of 50 ms reads anything from 0 to several times its
energy. Over many requests the counter is exact; what it cannot say is how its increments
split between requests. The worker knows when each request's prefill and decode ran
(host monotonic clock, after device syncs), so the increments are fitted as the
counter's response to that timeline:

- each phase has a power: prefill, decode, and the time between requests (`KINDS`); a
  backend whose decode runs different kernels by request (the compiled backend's attention
  lengths) names each request's `variant`, and each variant with enough decode time in the
  fit's span gets its own decode power;
- the counter, when it moves at time u, reports the energy spent up to `lag` before u,
  averaged over the `width` before that (`Response`; both found by the fit, from a grid of
  candidates, with the phase powers fitted by least squares at each);
- a request's energy is its phase times at the fitted powers, times the ratio of what the
  counter counted to what the model predicts over the few seconds around it (`SMOOTH_S`),
  so that the requests and the time between them add up to what the counter counted.

The fit's covariance gives each request's uncertainty. Everything here is a pure
function of (counter updates, phase timeline): the worker, the tests (with a simulated
counter) and the benchmarks share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PREFILL, DECODE, BETWEEN = 0, 1, 2
KINDS = ("prefill", "decode", "between")
# Decode seconds of a variant inside a fit's span for it to get a power of its own (below
# it the power is too loosely determined: such variants share one).
MIN_VARIANT_DECODE_S = 0.5
# How long a stretch of counter increments a request's share of the counter's deviation
# from the model is taken over.
SMOOTH_S = 2.0
# Candidate responses of the counter: how long it trails the work, and over how long it
# averages it (0: it counts every joule when spent, only later).
LAGS_S = tuple(np.round(np.arange(0.0, 0.4001, 0.01), 3))
WIDTHS_S = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass(frozen=True)
class Phases:
    """One request's timeline on the host's monotonic clock (seconds)."""

    start_s: float
    first_token_s: float
    end_s: float
    variant: int = 0  # which decode kernels ran (e.g. an attention length); one power per variant

    @property
    def prefill_s(self) -> float:
        return max(self.first_token_s - self.start_s, 0.0)

    @property
    def decode_s(self) -> float:
        return max(self.end_s - self.first_token_s, 0.0)


@dataclass(frozen=True)
class Response:
    lag_s: float
    width_s: float

    @property
    def delay_s(self) -> float:
        """How long after a joule is spent the counter has fully counted it."""
        return self.lag_s + self.width_s


class _Cumulative:
    """Time spent inside a set of disjoint intervals up to t (T), and its integral (Q):
    piecewise linear and piecewise quadratic, evaluated exactly."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray) -> None:
        order = np.argsort(starts, kind="stable")
        s, e = starts[order], np.maximum(ends[order], starts[order])
        self.x = np.empty(2 * len(s))
        self.x[0::2], self.x[1::2] = s, e
        d = e - s
        self.v = np.empty(2 * len(s))
        self.v[1::2] = np.cumsum(d)
        self.v[0::2] = self.v[1::2] - d
        self.slope = np.zeros(len(self.x))
        self.slope[0::2] = 1.0  # inside an interval time accrues at 1 s/s, between them at 0
        dx = np.diff(self.x, append=self.x[-1] if len(self.x) else 0.0)
        self.q = np.concatenate([[0.0], np.cumsum(self.v[:-1] * dx[:-1] + 0.5 * self.slope[:-1] * dx[:-1] ** 2)]) \
            if len(self.x) else np.zeros(0)

    def T(self, t: np.ndarray) -> np.ndarray:
        if not len(self.x):
            return np.zeros_like(t, dtype=float)
        return np.interp(t, self.x, self.v, left=0.0, right=self.v[-1])

    def Q(self, t: np.ndarray) -> np.ndarray:
        if not len(self.x):
            return np.zeros_like(t, dtype=float)
        j = np.clip(np.searchsorted(self.x, t, side="right") - 1, 0, len(self.x) - 1)
        dt = np.maximum(t - self.x[j], 0.0)
        inside = j < len(self.x) - 1
        quad = self.q[j] + self.v[j] * dt + 0.5 * self.slope[j] * np.where(inside, dt, 0.0) ** 2
        return np.where(t < self.x[0], 0.0, quad)


class Timeline:
    """The phases of every request a worker ran, and the time between them."""

    def __init__(self, requests: list[Phases]) -> None:
        self.requests = list(requests)
        starts = np.array([r.start_s for r in self.requests], float)
        firsts = np.maximum(np.array([r.first_token_s for r in self.requests], float), starts)
        ends = np.array([r.end_s for r in self.requests], float)
        variants = np.array([r.variant for r in self.requests], int)
        self.variants = tuple(int(v) for v in np.unique(variants)) or (0,)
        self._prefill = _Cumulative(starts, firsts)
        self._decode = [_Cumulative(firsts[variants == v], ends[variants == v]) for v in self.variants]

    def seen(self, u: np.ndarray, response: Response) -> np.ndarray:
        """The seconds of each kind the counter has counted at times u (columns: prefill,
        the decode of each of `variants`, between): the response's moving average of the
        cumulative time, `lag` earlier."""
        t = np.asarray(u, float) - response.lag_s
        cols = []
        for c in (self._prefill, *self._decode):
            if response.width_s > 0:
                cols.append((c.Q(t) - c.Q(t - response.width_s)) / response.width_s)
            else:
                cols.append(c.T(t))
        elapsed = t - response.width_s / 2  # every kind together is all of the time
        cols.append(elapsed - np.sum(cols, axis=0))
        return np.stack(cols, axis=1)

    def decode_seconds(self, start_s: float, end_s: float) -> np.ndarray:
        """Decode seconds of each of `variants` inside [start_s, end_s]."""
        t = np.array([start_s, end_s])
        return np.array([float(np.diff(c.T(t))[0]) for c in self._decode])


def decode_groups(variants: tuple[int, ...], seconds: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """The variants that share each decode power: one each where there is enough decode time
    to fit it, the rest together (or with the most used one when even together they have
    too little)."""
    own = [v for v, s in zip(variants, seconds) if s >= MIN_VARIANT_DECODE_S]
    rest = tuple(v for v in variants if v not in own)
    if not own:
        return (tuple(variants),)
    groups = [(v,) for v in own]
    if rest and sum(s for v, s in zip(variants, seconds) if v in rest) >= MIN_VARIANT_DECODE_S:
        groups.append(rest)
    elif rest:
        most = int(np.argmax([s for v, s in zip(variants, seconds) if v in own]))
        groups[most] = tuple(sorted(groups[most] + rest))
    return tuple(groups)


def _grouping(variants: tuple[int, ...], groups: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Timeline columns (prefill, decode per variant, between) -> fit columns (prefill,
    decode per group, between)."""
    g = np.zeros((len(variants) + 2, len(groups) + 2))
    g[0, 0] = g[-1, -1] = 1.0
    for j, members in enumerate(groups):
        for v in members:
            g[1 + variants.index(v), 1 + j] = 1.0
    return g


@dataclass(frozen=True)
class Fit:
    """Phase powers (W) and the counter's response, fitted over [start_s, end_s]. The
    powers' columns: prefill, the decode of each of `groups`, between."""

    response: Response
    power_w: np.ndarray
    cov: np.ndarray  # of power_w, W^2
    scale: float  # counter energy over the span / modelled energy over it
    increments: int
    rms_j: float  # misfit of one counter increment
    start_s: float
    end_s: float
    counter_j: float  # what the counter counted over the span
    groups: tuple[tuple[int, ...], ...] = ((0,),)  # decode variants sharing each decode power
    decode_share: tuple[float, ...] = (1.0,)  # each group's share of the span's decode time

    @property
    def prefill_w(self) -> float:
        return float(self.power_w[0])

    @property
    def between_w(self) -> float:
        return float(self.power_w[-1])

    def _weights(self, variant: int) -> np.ndarray:
        """Over the decode columns: the variant's own group, or (a variant the span never
        ran) every group by its share of the decode time."""
        w = np.zeros(len(self.groups))
        for j, members in enumerate(self.groups):
            if variant in members:
                w[j] = 1.0
                return w
        return np.asarray(self.decode_share, float)

    def decode_w(self, variant: int = 0) -> float:
        return float(self._weights(variant) @ self.power_w[1:-1])

    def powers_for(self, variants: tuple[int, ...]) -> np.ndarray:
        """The powers in a timeline's column order (prefill, decode per variant, between)."""
        return np.array([self.prefill_w, *(self.decode_w(v) for v in variants), self.between_w])

    def energy(self, p: Phases) -> tuple[float, float, float, float]:
        """(energy, its 1-sigma uncertainty, prefill part, decode part) of one request, J."""
        t = np.concatenate([[p.prefill_s], p.decode_s * self._weights(p.variant), [0.0]])
        parts = self.scale * np.array([self.prefill_w * p.prefill_s, self.decode_w(p.variant) * p.decode_s])
        sigma = self.scale * float(np.sqrt(max(t @ self.cov @ t, 0.0)))
        return float(parts.sum()), sigma, float(parts[0]), float(parts[1])

    def describe(self) -> dict:
        pooled = float(np.asarray(self.decode_share) @ self.power_w[1:-1])
        out = {"lag_s": round(self.response.lag_s, 3), "width_s": self.response.width_s,
               "power_w": {"prefill": round(self.prefill_w, 1), "decode": round(pooled, 1),
                           "between": round(self.between_w, 1)},
               "scale": round(self.scale, 4), "increments": self.increments, "rms_j": round(self.rms_j, 3),
               "span_s": round(self.end_s - self.start_s, 1)}
        if len(self.groups) > 1:
            out["decode_w_by_variant"] = {"+".join(map(str, g)): round(float(p), 1)
                                          for g, p in zip(self.groups, self.power_w[1:-1])}
        return out


@dataclass
class Counter:
    """One GPU's counter: the times it moved (host monotonic clock) and its value then (J)."""

    times_s: list[float] = field(default_factory=list)
    energy_j: list[float] = field(default_factory=list)

    def arrays(self, start_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        t, e = np.asarray(self.times_s, float), np.asarray(self.energy_j, float)
        if start_s is None:
            return t, e
        keep = t >= start_s
        return t[keep], e[keep]

    def value_at(self, t: float) -> float | None:
        """What a read of the counter at time t returned: its last value at or before t."""
        i = int(np.searchsorted(np.asarray(self.times_s), t, side="right")) - 1
        return None if i < 0 else self.energy_j[i]

    def energy_between(self, t0: float, t1: float, response: Response) -> float | None:
        """Energy spent over [t0, t1] while the GPU ran steadily around both ends: the
        counter interpolated between its moves at the times it counted t0 and t1."""
        t, e = self.arrays()
        a, b = t0 + response.lag_s + response.width_s / 2, t1 + response.lag_s + response.width_s / 2
        if len(t) < 2 or a < t[0] or b > t[-1]:
            return None
        return float(np.interp(b, t, e) - np.interp(a, t, e))


def _increments(counter: Counter, start_s: float, end_s: float) -> tuple[np.ndarray, np.ndarray]:
    t, e = counter.arrays()
    keep = (t >= start_s) & (t <= end_s)
    return t[keep], e[keep]


def _outside(u: np.ndarray, r: Response, exclude) -> np.ndarray:
    """Per increment: True where it counted none of the `exclude` periods (it counted
    [u_{k-1} - delay, u_k - lag])."""
    keep = np.ones(max(len(u) - 1, 0), bool)
    for a, b in exclude:
        keep &= ~((u[1:] - r.lag_s > a) & (u[:-1] - r.delay_s < b))
    return keep


def fit(timeline: Timeline, counter: Counter, start_s: float, end_s: float, response: Response | None = None,
        exclude: list[tuple[float, float]] = ()) -> Fit | None:
    """The phase powers (and, when `response` is None, the counter's response) that best
    explain the counter's increments over [start_s, end_s]; None with too few of them.
    Increments that counted any of the `exclude` periods (the reference checks) are left
    out of the fit, so that a check stays independent of what it checks."""
    u, e = _increments(counter, start_s, end_s)
    if len(u) < 8:
        return None
    y = np.diff(e)
    groups = decode_groups(timeline.variants, timeline.decode_seconds(float(u[0]), float(u[-1])))
    to_fit = _grouping(timeline.variants, groups)
    candidates = [response] if response is not None else [Response(float(lag), w) for w in WIDTHS_S for lag in LAGS_S]
    best = None
    for r in candidates:
        keep = _outside(u, r, exclude)
        if keep.sum() < 8:
            continue
        X = np.diff(timeline.seen(u, r), axis=0)[keep] @ to_fit
        yk = y[keep]
        power, rss = _least_squares(X, yk)
        if best is None or rss < best[0]:
            best = (rss, r, power, X, yk)
    if best is None:
        return None
    rss, r, power, X, yk = best
    n = len(yk)
    sigma2 = rss / max(n - X.shape[1], 1)
    cov = sigma2 * np.linalg.pinv(X.T @ X)
    modelled = float((X @ power).sum())
    counted = float(yk.sum())
    scale = counted / modelled if modelled > 0 else 1.0
    decode = X[:, 1:-1].sum(axis=0)
    share = tuple(float(x) for x in (decode / decode.sum() if decode.sum() > 0 else np.full(len(groups), 1 / len(groups))))
    return Fit(r, power, cov, scale, n, float(np.sqrt(sigma2)), float(u[0]), float(u[-1]), counted, groups, share)


def _least_squares(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Powers >= 0 that fit y = X p best, and the residual sum of squares."""
    p, *_ = np.linalg.lstsq(X, y, rcond=None)
    if (p < 0).any():
        from scipy.optimize import nnls

        p, _ = nnls(X, y)
    r = y - X @ p
    return p, float(r @ r)


@dataclass(frozen=True)
class Attributed:
    """One request's energy from the counter (J)."""

    energy_j: float
    uncertainty_j: float  # 1 sigma: the fitted powers' uncertainty and the increments' misfit shared with it
    prefill_j: float
    decode_j: float


def attribute(f: Fit, timeline: Timeline, counter: Counter, requests: list[Phases],
              exclude: list[tuple[float, float]] = ()) -> list[Attributed]:
    """Each request's energy: its phase times at the fitted powers, scaled by how far the
    counter's increments around it (`SMOOTH_S` of them, centred) ran above or below the
    model. Over any stretch of that length the requests and the time between them add up
    to what the counter counted; one increment alone is not trusted, since when each move
    is seen jitters by a few ms and moves its energy between neighbouring increments.
    Increments that counted an `exclude` period (a reference check and its idle pauses,
    where the GPU's power settles in ways the model does not describe) lend none of
    their deviation to the requests beside them."""
    u, e = counter.arrays()
    r = f.response
    if len(u) < 2:
        return []
    model = np.diff(timeline.seen(u, r), axis=0) @ f.powers_for(timeline.variants)  # modelled energy per increment
    keep = _outside(u, r, exclude)
    residual = np.where(keep, np.diff(e) - model, 0.0)
    period = float(np.median(np.diff(u))) if len(u) > 2 else 0.1
    k = max(1, int(round(SMOOTH_S / max(period, 1e-3))))
    window = np.ones(k)
    num, den = np.convolve(residual, window, "same"), np.convolve(np.where(keep, model, 0.0), window, "same")
    excess = np.divide(num, den, out=np.zeros_like(num), where=den > 0)  # the counter's excess over the model, locally
    # What the model leaves unexplained, as a share of an increment's energy: a request may
    # differ from the model by as much, unseen (a request shorter than the counter's period
    # shares an increment with others, and its own deviation is larger by the square root
    # of how many).
    mean_increment = float(np.mean(np.diff(e)))
    unexplained = f.rms_j / mean_increment if mean_increment > 0 else 0.0
    out = []
    for q in requests:
        base, sigma, prefill, decode = f.energy(q)
        sigma = float(np.hypot(sigma, unexplained * base * np.sqrt(max(1.0, period / max(q.end_s - q.start_s, 1e-3)))))
        lo = max(int(np.searchsorted(u, q.start_s + r.lag_s, side="right")) - 1, 0)
        hi = min(int(np.searchsorted(u, q.end_s + r.delay_s, side="right")) + 1, len(u))
        if hi - lo < 2:
            out.append(Attributed(base, sigma, prefill, decode))
            continue
        own = np.array([f.prefill_w, f.decode_w(q.variant)])
        mine = np.diff(Timeline([q]).seen(u[lo:hi], r)[:, :2], axis=0) * own  # per increment: prefill, decode
        parts = (mine * (1.0 + excess[lo:hi - 1, None])).sum(axis=0)
        out.append(Attributed(float(parts.sum()), sigma, float(parts[0]), float(parts[1])))
    return out
