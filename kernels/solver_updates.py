"""Fused solver vector updates on flat buffers, with reductions kept on the device.

- :func:`neumann_step`: ``v ← v − α A v``, ``acc ← acc + v`` and ``‖v‖²`` in one launch.
- :func:`partial_dot` and :func:`cg_update`: one iteration of conjugate gradients in the
  Chronopoulos–Gear form, whose loop is ``bilevel.solvers`` (CG with ``backend="triton"``).
  Per iteration: the product ``w = A r`` (the caller's), one launch for the partials of
  ``<w, r>``, and one launch that every program finishes the reductions in (it sums the
  partials itself), then updates ``p, s, x, r`` and writes the partials of the next
  ``<r, r>``. No host sync: the scalars stay in a small state vector on the device.

Why two launches and not one: the curvature ``<p, A p>`` needs the product just taken,
and a reduction over the whole vector must finish before any update can use it. A
single-launch iteration needs pipelined CG (Ghysels–Vanroose), which costs one more
product per solve and loses accuracy (residual gap); for the 10–50 iterations of a
hypergradient that is the wrong trade.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._backend import resolve_backend

__all__ = ["neumann_step", "neumann_step_reference", "partial_dot", "partial_dot_reference", "cg_update",
           "cg_update_reference", "CG_STATE_FIELDS"]

BLOCK = 1024


def _grid(n: int, device: torch.device) -> int:
    blocks = -(-n // BLOCK)
    if device.type == "cuda":
        cap = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 4  # the interpreter runs programs one by one (~3 ms each)
    return max(1, min(blocks, cap, 1024))


def _acc(dtype: torch.dtype):
    from . import _tl

    return _tl.tl.float64 if dtype == torch.float64 else _tl.tl.float32


def neumann_step_reference(v: Tensor, av: Tensor, acc: Tensor, alpha: Tensor) -> Tensor:
    """In place: ``v ← v − α·av``; ``acc ← acc + v``. Returns ``‖v‖²`` (0-dim, on the device).

    Shapes: ``v``, ``av``, ``acc`` of shape ``(N,)``; ``alpha`` 0-dim; returns a 0-dim tensor.

    Example:
        >>> v, acc = torch.ones(2), torch.zeros(2)
        >>> sq = bl.kernels.neumann_step_reference(v, 2 * v, acc, torch.tensor(0.25))   # A = 2I
        >>> v, acc, sq
        (tensor([0.5000, 0.5000]), tensor([0.5000, 0.5000]), tensor(0.5000))
    """
    v.addcmul_(alpha, av, value=-1.0)   # fused, no temporary
    acc.add_(v)
    return torch.dot(v, v)


def neumann_step(v: Tensor, av: Tensor, acc: Tensor, alpha: Tensor, *, backend: str = "auto") -> Tensor:
    """One Neumann-series step on flat buffers, in place; returns ``‖v‖²`` without a host sync.

    Args:
        v: ``(N,)`` current term ``(I − αA)^j b``, overwritten with the next term.
        av: ``(N,)`` the product ``A v``. acc: ``(N,)`` running sum, ``acc += v``.
        alpha: 0-dim step (a tensor on the device, so no sync).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"``.

    Returns:
        ``‖v‖²`` of the new term, a 0-dim tensor on ``v``'s device.

    Example:
        >>> v, acc = torch.ones(4), torch.ones(4)
        >>> sq = bl.kernels.neumann_step(v, 2 * v, acc, torch.tensor(0.25))   # A = 2I: v → 0.5
        >>> v, acc, float(sq)
        (tensor([0.5000, 0.5000, 0.5000, 0.5000]), tensor([1.5000, 1.5000, 1.5000, 1.5000]), 1.0)
    """
    be = resolve_backend(backend, v, av, acc, name="bilevel.kernels.neumann_step")
    if be == "torch":
        return neumann_step_reference(v, av, acc, alpha)
    from . import _tl

    n = v.numel()
    g = _grid(n, v.device)
    part = torch.empty(g, dtype=torch.float64 if v.dtype == torch.float64 else torch.float32, device=v.device)
    a = alpha.to(device=v.device, dtype=part.dtype).reshape(1)
    _tl.neumann_update_kernel[(g,)](v, av, acc, part, a, n, BLOCK=BLOCK, ACC=_acc(v.dtype))
    return part.sum().to(v.dtype)


def _reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def partial_dot_reference(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` as a ``(1,)`` vector of partial sums (float64 for float64 inputs, float32 otherwise).

    Shapes: ``a``, ``b`` of shape ``(N,)``; returns ``(1,)``.

    Example:
        >>> bl.kernels.partial_dot_reference(torch.ones(3), torch.arange(3.))
        tensor([3.])
    """
    red = _reduction_dtype(a.dtype)
    return torch.dot(a.to(red), b.to(red)).reshape(1)


def partial_dot(a: Tensor, b: Tensor, *, backend: str = "auto") -> Tensor:
    """Partial sums of ``<a, b>`` (one per Triton program), without a host sync: ``.sum()`` is the dot.

    Args:
        a, b: ``(N,)`` flat vectors. backend: ``"auto"`` | ``"torch"`` | ``"triton"``.

    Returns:
        ``(G,)`` partial sums (``G`` programs; ``G = 1`` for the torch reference) in float64 for
        float64 inputs, float32 otherwise. :func:`cg_update` sums them inside its launch.

    Example:
        >>> float(bl.kernels.partial_dot(torch.ones(5), torch.arange(5.)).sum())
        10.0
    """
    be = resolve_backend(backend, a, b, name="bilevel.kernels.partial_dot")
    if be == "torch":
        return partial_dot_reference(a, b)
    from . import _tl

    n = a.numel()
    g = _grid(n, a.device)
    part = torch.empty(g, dtype=_reduction_dtype(a.dtype), device=a.device)
    _tl.partial_dot_kernel[(g,)](a, b, part, n, BLOCK=BLOCK, ACC=_acc(a.dtype))
    return part


#: Fields of the state vector that :func:`cg_update` carries between iterations, in order:
#: ``gamma`` (the last accepted ``<r, r>``), ``alpha`` (the last step), ``first`` (1 until the
#: first step), ``status`` (0 running, 1 negative curvature or NaN, 2 curvature zero to rounding:
#: breakdown; the iteration that sets it takes no step and all later ones are no-ops),
#: ``min_rayleigh_quotient`` (smallest ``pᵀAp/pᵀp`` seen), ``pnorm2`` (``‖p‖²``), ``scale``
#: (largest ``|pᵀAp|/pᵀp`` seen), ``steps`` (steps taken), and the constants ``thresh`` and
#: ``flat_tol`` of the first call (kept here in the vectors' precision: a float64 threshold such as
#: 1e-42 would underflow as a float32 kernel argument).
CG_STATE_FIELDS = ("gamma", "alpha", "first", "status", "min_rayleigh_quotient", "pnorm2", "scale", "steps",
                   "thresh", "flat_tol")


def _initial_state(like: Tensor, thresh: float, flat_tol: float) -> Tensor:
    return torch.tensor([0.0, 0.0, 1.0, 0.0, math.inf, 0.0, 0.0, 0.0, thresh, flat_tol],
                        dtype=_reduction_dtype(like.dtype), device=like.device)


def cg_update_reference(x: Tensor, r: Tensor, p: Tensor, s: Tensor, w: Tensor, gamma_parts: Tensor,
                        delta_parts: Tensor, state: Optional[Tensor] = None, *, thresh: float = 0.0,
                        flat_tol: float = 0.0) -> tuple[Tensor, Tensor]:
    """One Chronopoulos–Gear CG iteration with torch ops: what :func:`cg_update` does in one launch.

    ``w = A r`` was just computed; ``gamma_parts`` sum to ``γ = <r, r>`` and ``delta_parts`` to
    ``δ = <w, r>``. Forms ``β = γ/γ_prev`` and the curvature ``κ = δ − βγ/α_prev = <p, A p>``
    (first iteration: ``β = 0``, ``κ = δ``) and its Rayleigh quotient ``ρ = κ/‖p‖²``; with
    ``scale`` the largest ``|ρ|`` so far, ``ρ < −flat_tol·scale`` (or NaN) is negative curvature
    and ``|ρ| ≤ flat_tol·scale`` zero curvature (``status`` 1 and 2, see
    :data:`CG_STATE_FIELDS`). Otherwise, while ``γ > thresh`` and ``status`` is 0, it steps with
    ``α = γ/κ``: in place ``p = r + βp; s = w + βs; x += αp; r −= αs``; else ``x`` and ``r``
    stay put.

    Shapes: ``x, r, p, s, w`` of shape ``(N,)``; ``gamma_parts``, ``delta_parts`` of shape ``(G,)``;
    ``state`` of shape ``(len(CG_STATE_FIELDS),)`` or ``None`` before the first iteration.

    Returns:
        ``(gamma_parts, state)`` after the update: the partials of the new ``<r, r>`` and the new state.

    Example:
        >>> A = torch.diag(torch.tensor([2., 4.]))             # CG on a 2x2 system: 2 iterations
        >>> b = torch.ones(2); x, r, p, s = torch.zeros(2), b.clone(), torch.zeros(2), torch.zeros(2)
        >>> K, g, state = bl.kernels, bl.kernels.partial_dot_reference(b, b), None
        >>> for _ in range(2):
        ...     w = A @ r
        ...     g, state = K.cg_update_reference(x, r, p, s, w, g, K.partial_dot_reference(w, r), state)
        >>> x
        tensor([0.5000, 0.2500])
    """
    state = _initial_state(r, thresh, flat_tol) if state is None else state
    gamma, delta = gamma_parts.sum(), delta_parts.sum()
    gamma_prev, alpha_prev, first, status, min_rq, pnorm2_prev, scale_prev, steps, thresh_t, flat_tol_t = state.unbind()
    first_b = first > 0
    zero = torch.zeros_like(gamma)
    beta = torch.where(first_b, zero, gamma / torch.where(gamma_prev > 0, gamma_prev, 1.0))
    kappa = torch.where(first_b, delta, delta - beta * gamma / torch.where(alpha_prev != 0, alpha_prev, 1.0))
    pnorm2 = gamma + beta * beta * pnorm2_prev
    rq = kappa / torch.where(pnorm2 > 0, pnorm2, 1.0)
    active = (status == 0) & (gamma > thresh_t)
    scale = torch.fmax(scale_prev, rq.abs())       # any Rayleigh quotient is at most ‖A‖; NaN skipped
    negative = ~(rq >= -flat_tol_t * scale)                # NaN too
    flat = rq.abs() <= flat_tol_t * scale
    ok = active & ~negative & ~flat
    alpha = torch.where(ok, gamma / torch.where(ok, kappa, 1.0), zero)
    beta = torch.where(ok, beta, zero)
    # NOTE: same order of operations as the Triton kernel (p and s before x and r).
    p.mul_(beta.to(p.dtype)).add_(r)
    s.mul_(beta.to(s.dtype)).add_(w)
    x.addcmul_(alpha.to(x.dtype), p)
    r.addcmul_(alpha.to(r.dtype), s, value=-1.0)
    new_status = torch.where(active & negative, 1.0, torch.where(active & flat, 2.0, status))
    rq_seen = torch.where(torch.isnan(rq), -math.inf, rq)
    new_state = torch.stack([
        torch.where(ok, gamma, gamma_prev), torch.where(ok, alpha, alpha_prev), torch.where(ok, zero, first),
        new_status, torch.where(active, torch.minimum(min_rq, rq_seen), min_rq), torch.where(ok, pnorm2, pnorm2_prev),
        scale, steps + ok.to(steps.dtype), thresh_t, flat_tol_t])
    return partial_dot_reference(r, r), new_state


def cg_update(x: Tensor, r: Tensor, p: Tensor, s: Tensor, w: Tensor, gamma_parts: Tensor, delta_parts: Tensor,
              state: Optional[Tensor] = None, *, thresh: float = 0.0, flat_tol: float = 0.0,
              backend: str = "auto") -> tuple[Tensor, Tensor]:
    """One fused Chronopoulos–Gear CG iteration on flat buffers, in place, with no host sync.

    Does what :func:`cg_update_reference` does (read it for the update and the curvature tests)
    in one launch: every program sums the partials itself, so no reduction leaves the device.

    Args:
        x, r, p, s: ``(N,)`` iterate, residual, direction and ``s = A p``, updated in place.
        w: ``(N,)`` the product ``A r``. gamma_parts, delta_parts: ``(G,)`` partials of ``<r, r>``
            and ``<w, r>`` (:func:`partial_dot`). state: the previous call's state, ``None`` at first.
        thresh: no step once ``<r, r> ≤ thresh``. flat_tol: relative width of "zero curvature".
            Both are read on the first call (``state=None``) and carried in the state after it.
        backend: ``"auto"`` | ``"torch"`` | ``"triton"``.

    Returns:
        ``(gamma_parts, state)``: the partials of the new ``<r, r>`` and the new state
        (:data:`CG_STATE_FIELDS`), both on the device.

    Example:
        >>> b = torch.ones(3); x, r, p, s = torch.zeros(3), b.clone(), torch.zeros(3), torch.zeros(3)
        >>> w = 2 * r                                          # A = 2 I: one step solves it
        >>> g, state = bl.kernels.cg_update(x, r, p, s, w, bl.kernels.partial_dot(r, r), bl.kernels.partial_dot(w, r))
        >>> x, float(g.sum())
        (tensor([0.5000, 0.5000, 0.5000]), 0.0)
    """
    be = resolve_backend(backend, x, r, p, s, w, name="bilevel.kernels.cg_update")
    if be == "torch":
        return cg_update_reference(x, r, p, s, w, gamma_parts, delta_parts, state, thresh=thresh, flat_tol=flat_tol)
    import triton

    from . import _tl

    n = x.numel()
    g = _grid(n, x.device)
    if gamma_parts.numel() != g or delta_parts.numel() != g:
        raise ValueError(f"bilevel.kernels.cg_update: expected {g} partial sums in gamma_parts and delta_parts "
                         f"(one per program, as partial_dot(backend='triton') returns), got "
                         f"{gamma_parts.numel()} and {delta_parts.numel()}. Fix: compute both with partial_dot "
                         f"on the same backend.")
    state = _initial_state(r, thresh, flat_tol) if state is None else state
    gout = torch.empty_like(gamma_parts)
    sout = torch.empty_like(state)
    _tl.cg_update_kernel[(g,)](x, r, p, s, w, gamma_parts, gout, delta_parts, state, sout, n,
                               BLOCK=BLOCK, G_BLOCK=max(16, triton.next_power_of_2(g)), ACC=_acc(x.dtype))
    return gout, sout
