"""Every move of the worker's GPUs' energy counters, on the host's monotonic clock.

A child process (no interpreter lock shared with the decode loop) reads each GPU's
counter through Zeus's GPU layer as often as NVML answers, and sends a (time, value)
pair whenever a value changes, plus the time of its latest read, so that the worker
knows how far the log is complete. The time of a move is the middle between the read
that first saw the new value and the read before it. `sweep.meters.attribution` turns
the moves and the requests' phase times into each request's energy.
"""

from __future__ import annotations

import bisect
import multiprocessing as mp
import time

from sweep.meters.attribution import Counter

POLL_S = 0.001  # pause between two rounds of reads; a read itself takes about as long
SEND_S = 0.02  # moves reach the worker at least this often


def _poll(conn, num_gpus: int, poll_s: float) -> None:
    """The child: read, send changes, until the worker says stop (or goes away)."""
    from zeus.device import get_gpus

    gpus = get_gpus()
    last = [None] * num_gpus
    before = [None] * num_gpus
    moves: list[tuple[int, float, float]] = []
    sent = time.monotonic()
    conn.send(("ready", None))
    try:
        while not conn.poll():
            for i in range(num_gpus):
                t0 = time.monotonic()
                value = gpus.get_total_energy_consumption(i) / 1000.0
                mid = (t0 + time.monotonic()) / 2
                if value != last[i]:
                    moves.append((i, mid if before[i] is None else (before[i] + mid) / 2, value))
                    last[i] = value
                before[i] = mid
            now = time.monotonic()
            if now - sent >= SEND_S:
                conn.send(("moves", (moves, min(before))))
                moves, sent = [], now
            time.sleep(poll_s)
    except (BrokenPipeError, EOFError):  # the worker is gone
        return
    conn.send(("moves", (moves, min(before))))


class CounterLog:
    """The moves of GPUs 0..n-1 (positions in CUDA_VISIBLE_DEVICES), one `Counter` each.
    `source` (tests): a callable returning (moves, complete_until) in place of the child."""

    def __init__(self, num_gpus: int, source=None, poll_s: float = POLL_S) -> None:
        self.counters = [Counter() for _ in range(num_gpus)]
        self.complete_until_s = float("-inf")  # every move before this time is in the log
        self._source, self._proc, self._conn = source, None, None
        if source is None:
            ctx = mp.get_context("spawn")  # no CUDA state inherited
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_poll, args=(child, num_gpus, poll_s), daemon=True,
                                     name="sweep energy counter")
            self._proc.start()
            deadline = time.monotonic() + 60
            while not self._conn.poll(0.1):
                if not self._proc.is_alive() or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("the energy counter's poller did not start")
            if self._conn.recv()[0] != "ready":
                self.close()
                raise RuntimeError("the energy counter's poller did not start")

    def drain(self) -> None:
        """Take in what the poller has sent."""
        batches = []
        if self._source is not None:
            batches.append(self._source())
        else:
            while self._conn.poll():
                kind, payload = self._conn.recv()
                if kind == "moves":
                    batches.append(payload)
        for moves, complete in batches:
            for i, t, value in moves:
                c = self.counters[i]
                c.times_s.append(t)
                c.energy_j.append(value)
            self.complete_until_s = max(self.complete_until_s, complete)

    def wait_until(self, t: float, timeout_s: float = 5.0) -> bool:
        """Wait until the log is complete up to time t; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.drain()
            if self.complete_until_s >= t:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)

    def value_at(self, gpu: int, t: float) -> float | None:
        return self.counters[gpu].value_at(t)

    def forget_before(self, t: float) -> None:
        """Drop moves older than t (the worker keeps a sliding window), keeping the last one
        before it: a read at t still has its value."""
        for c in self.counters:
            keep = max(bisect.bisect_left(c.times_s, t) - 1, 0)
            del c.times_s[:keep], c.energy_j[:keep]

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
        if self._proc is not None:
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
        self._proc = None
