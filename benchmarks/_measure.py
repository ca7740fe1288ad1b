"""Time and peak memory of one call, for the benchmarks, one example and the memory tests.

Timing: on a shared VM the speed drifts by 15-30% over seconds, so two benchmarks timed a
minute apart disagree. Timing the unit and the candidate back to back, many times, and taking
the median of the per-pair ratios cancels that drift (:func:`paired_times`, :func:`paired_ratio`).

Memory (Linux ``/proc``): ``ru_maxrss`` survives ``execve`` (a fresh ``python -c`` would report
its parent's peak); ``/proc/self/status``'s VmHWM is this process's own, and writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS (:func:`peak_rss_growth`). The measured
process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every tensor above 64 KiB is mapped
on its own and unmapped when freed: the RSS then follows the tensors alive, not glibc's heap
policy. :func:`run_in_fresh_process` starts such a process, with this folder importable.

Import it with ``benchmarks/`` on ``sys.path`` (the benchmarks and tests put it there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

__all__ = ["paired_times", "paired_ratio", "peak_rss_growth", "run_in_fresh_process"]

HERE = Path(__file__).resolve().parent


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


def paired_ratio(fn: Callable[[], Any], unit: Callable[[], Any], pairs: int) -> float:
    """Median over ``pairs`` of ``time(fn) / time(unit)``, each pair timed back to back (upper median if even)."""
    ratios, _ = paired_times(fn, unit, pairs)
    return ratios[len(ratios) // 2]


def _status_kb(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))


def peak_rss_growth(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(fn(), peak RSS above the RSS before the call in MiB, wall seconds)``."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")
    base = _status_kb("VmRSS:")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, (_status_kb("VmHWM:") - base) / 1024, seconds


def run_in_fresh_process(args: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
                         timeout: Optional[float] = None) -> Any:
    """Run ``python *args`` set up for :func:`peak_rss_growth`; return its last stdout line parsed as JSON.

    The process gets ``MALLOC_MMAP_THRESHOLD_=65536``, this folder on ``PYTHONPATH`` (so it can
    ``from _measure import peak_rss_growth``) and ``env`` on top.
    """
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": path, **(env or {})}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"run_in_fresh_process: expected exit status 0 from `python {args[0]} ...`, got "
                           f"{out.returncode}; its stderr ends with:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
