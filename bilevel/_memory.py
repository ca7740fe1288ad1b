"""Peak memory of one call, for benchmarks and memory tests (Linux ``/proc``).

``ru_maxrss`` survives ``execve`` (a fresh ``python -c`` would report its parent's peak);
``/proc/self/status``'s VmHWM is this process's own, and writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS. Run the measured process with
``MALLOC_MMAP_THRESHOLD_=65536`` so that every tensor above 64 KiB is mapped on its own and
unmapped when freed: the RSS then follows the tensors alive, not glibc's heap policy.
"""

from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ["peak_rss_growth"]


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))


def peak_rss_growth(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(fn(), peak RSS above the RSS before the call in MB, wall seconds)``."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status("VmRSS:")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, (_status("VmHWM:") - base) / 1024, seconds
