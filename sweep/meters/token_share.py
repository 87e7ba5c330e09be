"""Energy of requests served several at a time, from a GPU's energy counter.

With N requests in flight one counter increment counts the work of all of them, and the
work of one step is shared: there is no phase of a single request to fit. Each increment
is split between the requests by the tokens each produced in the time it counted (the
first token, which comes out of the request's prefill, included); an increment in which
no token came out (a long prefill, a stall) goes to the requests in flight then, by the
time each spent in it. The time of an increment in which no request was in flight is the
GPU's own, at its power between requests, and belongs to no row. So the
rows of a job add up to what the counter counted while any of its requests ran.

The steady window is the part of the job where N requests were in flight: from the N-th
request's start until the first answer after the last prompt was sent. Its energy per
token is the figure a serving engine is compared by; rows outside it are flagged.

Pure functions of (counter moves, request timelines): the worker, the tests and the
benchmarks share them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Streamed:
    """One request's timeline (host monotonic clock): its start, the arrival of each
    streamed token, its end."""

    start_s: float
    token_times_s: tuple[float, ...]
    end_s: float


def _bins(u: np.ndarray, lag_s: float, t: np.ndarray) -> np.ndarray:
    """Index k of the increment (u[k-1] - lag, u[k] - lag] that counted time t (-1 before
    the first move, len(u) - 1 after the last: neither is an increment)."""
    return np.searchsorted(u - lag_s, t, side="left") - 1


def _covered(starts: np.ndarray, ends: np.ndarray, requests: list[Streamed]) -> np.ndarray:
    """Seconds of each interval [starts[k], ends[k]] in which some request was in flight."""
    spans = sorted((r.start_s, r.end_s) for r in requests)
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out = np.zeros(len(starts))
    for a, b in merged:
        out += np.clip(np.minimum(ends, b) - np.maximum(starts, a), 0, None)
    return out


def token_share(u: np.ndarray, e: np.ndarray, requests: list[Streamed], lag_s: float,
                idle_w: float = 0.0) -> np.ndarray:
    """Energy (J) of each request: every increment of the counter (moves at times u, values
    e) split by the tokens each request produced in it, or by the time each was in flight
    in it where no token came out. The part of an increment in which no request was in
    flight (the job's first and last increments, a pause) is the GPU's, at `idle_w`, and
    no request's. A request with a part outside the counter's moves gets only the
    increments the counter has."""
    n_inc = len(u) - 1
    out = np.zeros(len(requests))
    if n_inc < 1 or not requests:
        return out
    delta = np.diff(e)
    tokens = np.zeros((len(requests), n_inc))
    for i, r in enumerate(requests):
        k = _bins(u, lag_s, np.asarray(r.token_times_s, float))
        k = k[(k >= 0) & (k < n_inc)]
        np.add.at(tokens[i], k, 1.0)
    total = tokens.sum(axis=0)
    starts, ends = u[:-1] - lag_s, u[1:] - lag_s
    silent = np.flatnonzero(total == 0)
    busy = np.zeros((len(requests), n_inc))
    if len(silent):
        for i, r in enumerate(requests):
            busy[i, silent] = np.clip(np.minimum(ends[silent], r.end_s) - np.maximum(starts[silent], r.start_s), 0, None)
    weight = np.where(total > 0, tokens, busy)
    norm = weight.sum(axis=0)
    share = np.divide(weight, norm, out=np.zeros_like(weight), where=norm > 0)
    spent = np.maximum(delta - idle_w * ((ends - starts) - _covered(starts, ends, requests)), 0.0)
    out[:] = share @ spent
    return out


def counted_until(u: np.ndarray, lag_s: float, t: float) -> bool:
    """Whether the counter has a move that counted time t (the increment holding t is whole)."""
    return len(u) > 0 and u[-1] - lag_s >= t


@dataclass(frozen=True)
class SteadyWindow:
    start_s: float
    end_s: float
    energy_j: float | None
    tokens: int

    @property
    def seconds(self) -> float:
        return max(self.end_s - self.start_s, 0.0)

    @property
    def energy_per_token_j(self) -> float | None:
        return self.energy_j / self.tokens if self.energy_j is not None and self.tokens else None


def steady_window(requests: list[Streamed], concurrency: int, queue_empty_s: float | None,
                  u: np.ndarray | None = None, e: np.ndarray | None = None, lag_s: float = 0.0) -> SteadyWindow | None:
    """From the `concurrency`-th request's start until the first end after the queue emptied
    (`queue_empty_s`: when the last prompt was sent; None: the job ended first), with the
    counter's energy over it (interpolated between its moves, `lag_s` later) and the tokens
    produced in it. None with fewer requests than `concurrency`."""
    if len(requests) < concurrency:
        return None
    start = sorted(r.start_s for r in requests)[concurrency - 1]
    later = [r.end_s for r in requests if queue_empty_s is not None and r.end_s > queue_empty_s]
    end = min(later) if later else max(r.end_s for r in requests)
    tokens = sum(int(np.sum((np.asarray(r.token_times_s) > start) & (np.asarray(r.token_times_s) <= end)))
                 for r in requests)
    energy = None
    if u is not None and len(u) >= 2 and u[0] - lag_s <= start and u[-1] - lag_s >= end:
        energy = float(np.interp(end + lag_s, u, e) - np.interp(start + lag_s, u, e))
    return SteadyWindow(start, end, energy, tokens)
