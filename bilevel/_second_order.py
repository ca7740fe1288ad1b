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

- ``F.embedding_bag`` (``nn.EmbeddingBag``) has no second derivative at all
  (``_embedding_bag_backward`` is not differentiable) and no forward-mode rule; for ``mode="sum"``
  and ``"mean"`` it is a lookup and a per-bag sum, which ordinary ops differentiate to any order.

:func:`twice_differentiable_kernels` swaps them for the duration of a block; the hypergradient
functions of the core and ``HyperOptimizer``'s hyper-step passes run inside it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

F = TypeVar("F", bound=Callable[..., Any])

_FUSED_WEIGHT_NORM = torch._weight_norm
_FUSED_EMBEDDING_BAG = torch.nn.functional.embedding_bag
_LOCK = threading.Lock()
_DEPTH = 0                      # blocks open in the process (any thread); the swap lasts while > 0


def weight_norm_formula(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm(v, g, dim)`` from ordinary ops: ``v · g / ‖v‖``, the norm over every
    dimension but ``dim`` (over all of ``v`` for ``dim=-1``). Same value to rounding; exact
    derivatives of every order and a forward-mode rule.

    Shapes: ``v`` any; ``g`` broadcastable to it (size 1 except along ``dim``); returns ``v``'s shape.
    """
    return v * (g / torch.norm_except_dim(v, 2, dim))


def embedding_bag_formula(input: Tensor, weight: Tensor, offsets: Optional[Tensor] = None,
                          max_norm: Optional[float] = None, norm_type: float = 2, scale_grad_by_freq: bool = False,
                          mode: str = "mean", sparse: bool = False, per_sample_weights: Optional[Tensor] = None,
                          include_last_offset: bool = False, padding_idx: Optional[int] = None) -> Tensor:
    """``F.embedding_bag`` from ordinary ops (a lookup, then ``index_add`` per bag), for ``mode="sum"``
    and ``"mean"``: same values (to rounding), derivatives of every order, a forward-mode rule, and
    dense gradients. The cases it does not cover (``mode="max"``, ``max_norm``,
    ``scale_grad_by_freq``, which changes the gradient itself) go to the fused op.

    Shapes: ``input`` ``(B, L)`` without ``offsets``, or ``(N,)`` with ``offsets`` ``(B,)``
    (``(B + 1,)`` with ``include_last_offset``); ``weight`` ``(V, D)``; returns ``(B, D)``.
    """
    if (mode not in ("sum", "mean") or max_norm is not None or scale_grad_by_freq or input.dim() not in (1, 2)
            or (input.dim() == 1) != (offsets is not None)):           # torch's own error for a bad call
        return _FUSED_EMBEDDING_BAG(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                                    per_sample_weights, include_last_offset, padding_idx)
    if input.dim() == 2:
        n_bags, length = input.shape
        flat = input.reshape(-1)
        bag = torch.arange(n_bags, device=input.device).repeat_interleave(length)
    else:
        flat = input
        assert offsets is not None
        starts = offsets[:-1] if include_last_offset else offsets
        n_bags = starts.numel()
        position = torch.arange(flat.numel(), device=input.device)
        bag = torch.searchsorted(starts, position, right=True) - 1
        if include_last_offset:          # entries past the last offset belong to no bag
            bag = torch.where(position < offsets[-1], bag, -1)
    keep = bag >= 0
    if padding_idx is not None:
        keep = keep & (flat != (padding_idx if padding_idx >= 0 else padding_idx + weight.shape[0]))
    index, kept = bag.clamp(min=0), keep.to(weight.dtype)      # entries outside every bag add zero
    rows = torch.nn.functional.embedding(flat, weight)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.reshape(-1, 1).to(rows.dtype)
    out = torch.zeros(n_bags, weight.shape[1], dtype=rows.dtype, device=rows.device)
    out = out.index_add(0, index, rows * kept.unsqueeze(1))
    if mode == "mean":
        counts = torch.zeros(n_bags, dtype=rows.dtype, device=rows.device).index_add(0, index, kept)
        out = out / counts.clamp(min=1).unsqueeze(1)
    return out


def _use_weight_norm(fn: Callable[..., Tensor]) -> None:
    # NOTE: the two places torch calls it from at call time: the parametrization reads
    # `torch._weight_norm`, the older hook its own module's global (it did `from torch import ...`).
    # A swap of these two names costs nothing per operation, where a TorchFunctionMode that rewrote
    # the call cost 3.5 µs on every torch call in the block (+2.5 % on a GGN CG-10 hypergradient).
    torch._weight_norm = fn  # type: ignore[attr-defined]
    hook_module = sys.modules.get("torch.nn.utils.weight_norm")
    if hook_module is not None and hasattr(hook_module, "_weight_norm"):
        hook_module._weight_norm = fn  # type: ignore[attr-defined]


def _use_embedding_bag(fn: Callable[..., Tensor]) -> None:
    # NOTE: nn.EmbeddingBag calls `F.embedding_bag` through the functional module at call time.
    torch.nn.functional.embedding_bag = fn  # type: ignore[assignment]


@contextlib.contextmanager
def twice_differentiable_kernels() -> Iterator[None]:
    """Within it, attention runs on the math kernel of ``scaled_dot_product_attention``, weight
    normalization is computed from its formula (:func:`weight_norm_formula`) and embedding bags
    from a lookup and a per-bag sum (:func:`embedding_bag_formula`), so that second
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
            _use_embedding_bag(embedding_bag_formula)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _use_weight_norm(_FUSED_WEIGHT_NORM)
                _use_embedding_bag(_FUSED_EMBEDDING_BAG)


def with_twice_differentiable_kernels(fn: F) -> F:
    """``fn`` run inside :func:`twice_differentiable_kernels` (same signature and docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with twice_differentiable_kernels():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
