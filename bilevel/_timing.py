"""Paired timing, for benchmarks and examples: ratios robust to a machine whose speed drifts.

On a shared VM the speed drifts by 15-30% over seconds, so two benchmarks timed a minute apart
disagree. Timing the unit and the candidate back to back, many times, and taking the median of
the per-pair ratios cancels that drift.
"""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["paired_times"]


def paired_times(fn: Callable[[], Any], unit: Callable[[], Any], pairs: int) -> tuple[list[float], list[float]]:
    """``(sorted time(fn)/time(unit) per pair, sorted unit times in seconds)`` over ``pairs`` pairs.

    Example:
        >>> ratios, units = paired_times(lambda: sum(range(2000)), lambda: sum(range(1000)), pairs=5)
        >>> len(ratios), ratios == sorted(ratios)
        (5, True)
    """
    ratios, units = [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        unit()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
        units.append(t1 - t0)
    return sorted(ratios), sorted(units)
