"""Settings shared by the demo tasks (:mod:`bilevel.demo.tasks`): errors, overrides, threads.

The error type reported without a traceback, keyword overrides of a task's
config dataclass, the config as JSON, and the thread-count guard.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator

import torch

__all__ = ["DemoError", "with_overrides", "config_dict", "torch_threads"]


class DemoError(RuntimeError):
    """A problem with the demo's set-up (a missing optional dependency, bad settings, an output
    location that cannot be written), reported without a traceback."""


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


def config_dict(config: Any) -> Dict[str, Any]:
    """The fields of a resolved config dataclass as JSON values (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()}


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
