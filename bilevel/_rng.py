"""Capture and replay the global RNG state (CPU and initialized CUDA devices).

Used wherever one mathematical evaluation is computed by several forward passes
(forward-mode Hessian products, checkpoint recomputation), so that dropout and
other random ops draw the same numbers in every pass.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

RngState = tuple


def _cuda_on() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def get_state() -> RngState:
    """The current CPU RNG state and, if CUDA is in use, every device's."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if _cuda_on() else None)


def set_state(state: RngState) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


@contextlib.contextmanager
def replay(state: Optional[RngState]) -> Iterator[None]:
    """Run the block from RNG ``state``, then restore the RNG as it was before the block."""
    if state is None:
        yield
        return
    outer = get_state()
    set_state(state)
    try:
        yield
    finally:
        set_state(outer)
