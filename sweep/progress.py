"""Progress of a sweep: workers report to a small hub actor, the driver shows it.

On a terminal: tqdm bars, one for the whole sweep (requests done / planned) and one per
running job. Otherwise (a log file, a batch job, `--no-progress`): one line per finished
job with the sweep's count, elapsed time and ETA, so a log still says how far it got.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class ProgressHub:
    """Counts per job; Ray wraps it as an actor. Workers call it fire-and-forget."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], list] = {}  # (model, task) -> [done, total, running]

    def start(self, model: str, task: str, done: int, total: int) -> None:
        self.jobs[(model, task)] = [done, total, True]

    def advance(self, model: str, task: str, n: int = 1) -> None:
        self.jobs[(model, task)][0] += n

    def finish(self, model: str, task: str) -> None:
        if (model, task) in self.jobs:
            self.jobs[(model, task)][2] = False

    def snapshot(self) -> dict[tuple[str, str], list]:
        return self.jobs


class ProgressBars:
    """Terminal view of a hub snapshot."""

    def __init__(self, planned_total: int, stored: dict[tuple[str, str], int], enabled: bool = True) -> None:
        # Bars redraw in place, which only a terminal shows well.
        self.enabled = enabled and sys.stderr.isatty()
        self.stored = dict(stored)  # requests already stored per job when the run started
        self.planned_total = planned_total
        self._t0, self._done0 = time.monotonic(), sum(self.stored.values())
        self._reported: set[tuple[str, str]] = set()
        self.overall = tqdm(total=planned_total, initial=self._done0, desc="sweep", unit="req",
                            position=0, disable=not self.enabled, dynamic_ncols=True)
        self.bars: dict[tuple[str, str], tqdm] = {}

    def update(self, snapshot: dict[tuple[str, str], list]) -> None:
        for key, (done, total, running) in snapshot.items():
            self.stored[key] = done
            bar = self.bars.get(key)
            if running and bar is None:
                bar = self.bars[key] = tqdm(total=total, initial=done, desc=f"{key[0]} / {key[1]}", unit="req",
                                            position=len(self.bars) + 1, leave=False, disable=not self.enabled,
                                            dynamic_ncols=True)
            if bar is not None:
                bar.n = done
                bar.refresh()
                if not running:
                    bar.close()
                    del self.bars[key]
            if not self.enabled and not running and key not in self._reported:
                self._reported.add(key)
                self._line(key, done, total)
        self.overall.n = sum(self.stored.values())
        self.overall.refresh()

    def _line(self, key: tuple[str, str], done: int, total: int) -> None:
        now = sum(self.stored.values())
        elapsed = time.monotonic() - self._t0
        rate = (now - self._done0) / elapsed if elapsed > 0 else 0.0
        eta = tqdm.format_interval((self.planned_total - now) / rate) if rate > 0 else "?"
        print(f"{key[0]} / {key[1]}: {done}/{total} stored. Sweep: {now}/{self.planned_total} requests, "
              f"{tqdm.format_interval(elapsed)} elapsed, ETA {eta}", flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.overall.close()
