"""Fused PyTorch kernels that have no (correct) second derivative, and their replacements.

Hypergradients differentiate twice: a Hessian or Gauss–Newton product is a derivative of a
gradient, and an unrolled step's hypergradient differentiates through the step's gradient. Some
fused kernels do not support that:

- ``scaled_dot_product_attention``'s flash and memory-efficient kernels have no second derivative
  and no forward-mode rule (``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention`` with
  ``need_weights=False``): the math kernel has both.
- ``torch._weight_norm`` (``nn.utils.parametrizations.weight_norm``, ``nn.utils.weight_norm``) has
  a *wrong* second derivative in torch 2.13 on CPU: Hessian-vector products through the direction
  ``v`` were off by up to 70 % of their size against central differences in float64, and not
  symmetric; an exact-solve hypergradient through it was off by 150 %, an unrolled one by 2 %,
  without any error. Its formula ``g · v / ‖v‖`` from ordinary ops has exact derivatives.

:func:`twice_differentiable_kernels` swaps them for the duration of a block; the hypergradient
functions of the core and ``HyperOptimizer``'s hyper-step passes run inside it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

F = TypeVar("F", bound=Callable[..., Any])

_FUSED_WEIGHT_NORM = torch._weight_norm
_LOCK = threading.Lock()
_DEPTH = 0                      # blocks open in the process (any thread); the swap lasts while > 0


def weight_norm_formula(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm(v, g, dim)`` from ordinary ops: ``v · g / ‖v‖``, the norm over every
    dimension but ``dim`` (over all of ``v`` for ``dim=-1``). Same value to rounding; exact
    derivatives of every order and a forward-mode rule.

    Shapes: ``v`` any; ``g`` broadcastable to it (size 1 except along ``dim``); returns ``v``'s shape.
    """
    return v * (g / torch.norm_except_dim(v, 2, dim))


def _use_weight_norm(fn: Callable[..., Tensor]) -> None:
    # NOTE: the two places torch calls it from at call time: the parametrization reads
    # `torch._weight_norm`, the older hook its own module's global (it did `from torch import ...`).
    # A swap of these two names costs nothing per operation, where a TorchFunctionMode that rewrote
    # the call cost 3.5 µs on every torch call in the block (+2.5 % on a GGN CG-10 hypergradient).
    torch._weight_norm = fn  # type: ignore[attr-defined]
    hook_module = sys.modules.get("torch.nn.utils.weight_norm")
    if hook_module is not None and hasattr(hook_module, "_weight_norm"):
        hook_module._weight_norm = fn  # type: ignore[attr-defined]


@contextlib.contextmanager
def twice_differentiable_kernels() -> Iterator[None]:
    """Within it, attention runs on the math kernel of ``scaled_dot_product_attention`` and weight
    normalization is computed from its formula (:func:`weight_norm_formula`), so that second
    derivatives and forward-mode tangents through them exist and are right (see the module
    notes). Values are unchanged (to rounding); the fused kernels' speed is what is given up,
    inside the block only. Blocks nest and may be open in several threads; the swap of weight norm
    is process-wide (another thread's weight norm meanwhile takes the formula too: same values) and
    the fused op is back once the last block closes (also after an exception). The core's hypergradient functions
    (``implicit_hypergrad``, ``unrolled_hypergrad``, ``hvp``, ``mixed_vjp``, ``imaml_grad``), the
    derivative rules of ``implicit_diff``/``implicit_root``/``implicit_fixed_point`` and
    ``HyperOptimizer``'s hyper steps enter it themselves; wrap other second-order code in it (your
    own double backward, a ``HessianOperator`` built and used by hand).

    Shapes: n/a (a context manager).

    Example::

        >>> layer = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(3, 2))
        >>> with bl.twice_differentiable_kernels():
        ...     y = layer(torch.randn(4, 3))           # weight norm from ordinary ops
    """
    global _DEPTH
    with _LOCK:
        _DEPTH += 1
        if _DEPTH == 1:
            _use_weight_norm(weight_norm_formula)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _use_weight_norm(_FUSED_WEIGHT_NORM)


def with_twice_differentiable_kernels(fn: F) -> F:
    """``fn`` run inside :func:`twice_differentiable_kernels` (same signature and docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with twice_differentiable_kernels():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
