"""Quality flags of one measured request: what makes its energy figure coarse or suspect.

Each row stores the flags that apply (`quality_flags`, empty when clean) and the numbers
behind them (`window_s`, `mean_power_w`, `idle_power_w`, `power_limit_w`), so a reader
can check a flag, or apply a stricter rule, without the GPU.
"""

from __future__ import annotations

# NVML's counter moves about every 100 ms: below 1 s a window's energy is off by up to ~10%.
COARSE_WINDOW_S = 1.0
# A GPU drawing less than this share of its idle power during a request is misread.
POWER_LOW_OF_IDLE = 0.8
# Boards may exceed their enforced limit briefly; a window's mean above this is misread.
POWER_HIGH_OF_LIMIT = 1.1

# flag -> what it means (README's table and `sweep validate` print these)
FLAGS = {
    "coarse_window": f"energy window shorter than {COARSE_WINDOW_S:g} s: the counter moves about every 100 ms, so "
                     f"the one-window reading is coarse (an attributed energy_j does not rest on it)",
    "zero_counter": "the energy counter did not move during the window",
    "counter_reset": "the energy counter went backwards (reset): no energy figure",
    "power_below_idle": f"mean power of the window below {POWER_LOW_OF_IDLE:g} x the GPU's idle power",
    "power_above_limit": f"mean power of the window above {POWER_HIGH_OF_LIMIT:g} x the GPU's enforced power limit",
    "max_new_tokens": "the response was cut at max_new_tokens",
    "prompt_truncated": "the prompt was cut to fit the context",
    "outside_steady": "served at concurrency N while fewer than N requests were in flight (the job's ramp-up or "
                      "tail): its energy is right, but not that of the steady state",
}
# Flags that say the row's energy figure itself is unreliable.
ENERGY_FLAGS = ("coarse_window", "zero_counter", "counter_reset", "power_below_idle", "power_above_limit")
# Of those, the ones about the one-window reading: they make energy_j unreliable only where
# energy_j is that reading (energy_method "window", or a run from before attribution).
WINDOW_FLAGS = ("coarse_window", "zero_counter")


def row_flags(*, metered: bool, window_s: float, energy_j: float | None, zero_counter: bool, counter_reset: bool,
              idle_power_w: float | None, power_limit_w: float | None, stop_reason: str,
              prompt_truncated: bool, energy_s: float | None = None, outside_steady: bool = False) -> list[str]:
    """The flags of one request. `metered`: a GPU energy counter bracketed it (a CPU row
    has no energy, and so no energy flags). `energy_s`: the seconds energy_j covers (its
    window, unless it was attributed to the request's own phases)."""
    flags = []
    if metered:
        if window_s < COARSE_WINDOW_S:
            flags.append("coarse_window")
        if zero_counter:
            flags.append("zero_counter")
        if counter_reset:
            flags.append("counter_reset")
        power_w = mean_power_w(energy_j, window_s if energy_s is None else energy_s)
        if power_w is not None and idle_power_w is not None and power_w < POWER_LOW_OF_IDLE * idle_power_w:
            flags.append("power_below_idle")
        if power_w is not None and power_limit_w is not None and power_w > POWER_HIGH_OF_LIMIT * power_limit_w:
            flags.append("power_above_limit")
    if stop_reason == "length":
        flags.append("max_new_tokens")
    if prompt_truncated:
        flags.append("prompt_truncated")
    if outside_steady:
        flags.append("outside_steady")
    return flags


def mean_power_w(energy_j: float | None, window_s: float) -> float | None:
    return energy_j / window_s if energy_j is not None and window_s > 0 else None
