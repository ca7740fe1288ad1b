"""Pieces shared by the demo tasks (:mod:`bilevel._demo_mlp`, :mod:`bilevel._demo_logreg`).

A progress bar without dependencies, the error type reported without a
traceback, the optional-dependency checks, and the thread-count guard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Any, Iterator, Optional, TextIO

import torch

__all__ = ["DemoError", "Progress", "require_sklearn", "torch_threads", "with_overrides", "MPL_MISSING",
           "finish_result"]

#: what ``plot_skipped`` says when matplotlib cannot be imported
MPL_MISSING = ("matplotlib is not installed; "
               "install it with `pip install matplotlib` (or `pip install 'bilevel[examples]'`)")


class DemoError(RuntimeError):
    """A problem with the demo's set-up (a missing optional dependency, bad settings), reported without a traceback."""


def require_sklearn() -> Any:
    """Import scikit-learn (whose bundled datasets are the demo's data) or raise :class:`DemoError`."""
    try:
        import sklearn.datasets  # noqa: F401
        import sklearn.model_selection  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise DemoError(
            "bilevel demo: expected scikit-learn (its bundled datasets are the demo's data), but it is not "
            "installed. Fix: pip install scikit-learn   (or pip install 'bilevel[examples]')."
        ) from err
    import sklearn

    return sklearn


def with_overrides(config: Any, overrides: dict, fn: str) -> Any:
    """A copy of the dataclass ``config`` with the fields in ``overrides`` replaced.

    Raises ``TypeError`` naming the unknown settings, like a function called with a wrong keyword.
    """
    if not overrides:
        return config
    names = {f.name for f in dataclasses.fields(config)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"{fn}: unknown settings {sorted(unknown)}; expected some of {sorted(names)}.")
    return dataclasses.replace(config, **overrides)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous number.

    NOTE: the demo's problems are small (300 x 64 inputs, matrices of at most
    512 x 256): threads add little. Worse, measured here (torch 2.13 CPU, 2
    cores) once scipy's OpenBLAS is loaded (scikit-learn loads it), its idle
    thread pool and torch's OpenMP threads contend, and
    ``binary_cross_entropy_with_logits`` / ``logsigmoid`` on 100 large logits
    take ~8 ms instead of ~10 us; with 1 thread (or OPENBLAS_NUM_THREADS=1) the
    slowdown disappears. For the MLP demo, 2 threads gain ~25% per Adam step on
    an idle 2-core machine (1.6 vs 2.1 ms), but while another process held a
    core a step took ~300 ms with 2 threads against ~3 ms with 1 (each parallel
    region waits for the descheduled thread). 1 is the default; ``--threads``
    changes it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Progress:
    """A tiny progress bar on a text stream (no dependency).

    On a terminal it redraws one line; otherwise (a pipe, a CI log) it prints a
    line every ``every`` steps and at the end, so logs stay readable.

    Args:
        total: number of steps.
        stream: where to write (``sys.stderr`` by default).
        enabled: ``False`` writes nothing.
        every: in line mode, print every this many steps (default: a tenth of ``total``).
        width: characters of the bar on a terminal.
        label: names the steps in line mode (``"  {label} 10/100 ..."``).
    """

    def __init__(self, total: int, *, stream: Optional[TextIO] = None, enabled: bool = True,
                 every: Optional[int] = None, width: int = 24, label: str = "outer step") -> None:
        self.total = max(int(total), 1)
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.every = every or max(1, self.total // 10)
        self.width = width
        self.label = label
        self.t0 = time.perf_counter()
        self._len = 0
        self._last_line = 0

    def update(self, step: int, text: str = "") -> None:
        """Report that ``step`` of ``total`` steps are done, with a short status ``text``."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            done = int(self.width * step / self.total)
            line = f"\r[{'#' * done}{'.' * (self.width - done)}] {step}/{self.total} {elapsed:5.1f}s {text}"
            pad = max(0, self._len - len(line))
            self.stream.write(line + " " * pad)
            self._len = len(line)
            self.stream.flush()
        elif step // self.every > self._last_line // self.every or step == self.total:
            # (callers may skip steps: print whenever a multiple of `every` was crossed)
            self._last_line = step
            self.stream.write(f"  {self.label} {step:>4}/{self.total}  {elapsed:6.1f}s  {text}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def finish_result(result: dict, out_dir: Any, save: Any, key: str, t_start: float) -> dict:
    """Write the plots (``result[key] = save(result, out_dir)``) unless matplotlib is missing, then
    record the total wall time since ``t_start``."""
    if out_dir is not None:
        try:
            result[key] = save(result, out_dir)
        except ImportError:
            result["plot_skipped"] = MPL_MISSING
    result["total_wall_s"] = time.perf_counter() - t_start
    return result
