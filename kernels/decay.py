"""The mixed product of a per-weight decay penalty, in one pass.

For ``P = ½ Σ decay(λ) ⊙ w²`` the mixed product of the implicit hypergradient is
``∇_λ <∇_w P, u> = decay'(λ) ⊙ w ⊙ u`` (``e^λ ⊙ w ⊙ u`` for ``decay = e^λ``); the
hypergradient gets its negative. One read of λ, w, u and one write.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import resolve_backend

__all__ = ["decay_mixed", "decay_mixed_reference"]

_FN = "bilevel.kernels.decay_mixed"
KINDS = ("exp", "softplus")


def decay_mixed_reference(lam: Tensor, w: Tensor, u: Tensor, kind: str = "exp") -> Tensor:
    """Pure-torch ``decay'(λ) ⊙ w ⊙ u``; ``lam`` broadcasts against ``w`` (shape of ``w`` returned).

    Shapes: ``w (...)``, ``u`` like ``w``, ``lam`` broadcastable to ``w``; returns ``w``'s shape.

    Example:
        >>> w, u = torch.tensor([1., 2., 3.]), torch.ones(3)
        >>> bl.kernels.decay_mixed_reference(torch.tensor(0.0), w, u, "softplus")   # shared λ: σ(0) ⊙ w ⊙ u
        tensor([0.5000, 1.0000, 1.5000])
    """
    d = lam.exp() if kind == "exp" else torch.sigmoid(lam)    # softplus' = σ; a fresh tensor
    # in place where the shapes allow: one w-sized tensor instead of three alive at once
    return (d.mul_(w) if d.shape == w.shape else d * w).mul_(u)


def decay_mixed(lam: Tensor, w: Tensor, u: Tensor, kind: str = "exp", *, backend: str = "auto") -> Tensor:
    """``decay'(λ) ⊙ w ⊙ u`` for ``decay = exp`` or ``softplus`` of the raw hyperparameter ``λ``.

    Args:
        lam: raw decay hyperparameters, same shape as ``w`` (Triton) or broadcastable (torch).
        w: weights. u: the adjoint direction, same shape as ``w``.
        kind: ``"exp"`` or ``"softplus"``.
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` (see :mod:`bilevel.kernels`).

    Returns:
        Tensor of ``w``'s shape (sum it over broadcast dimensions for a shared ``λ``).

    Example:
        >>> lam, w, u = torch.zeros(3), torch.tensor([1., 2., 3.]), torch.ones(3)
        >>> bl.kernels.decay_mixed(lam, w, u)            # e^0 ⊙ w ⊙ u
        tensor([1., 2., 3.])
    """
    if kind not in KINDS:
        raise ValueError(f"{_FN}: expected kind in {KINDS}, got {kind!r}.")
    if w.shape != u.shape:
        raise ValueError(f"{_FN}: expected w and u of one shape, got {tuple(w.shape)} and {tuple(u.shape)}.")
    be = resolve_backend(backend, lam, w, u, name=_FN)
    if be == "triton" and lam.shape != w.shape:
        if backend == "triton":
            raise RuntimeError(f"{_FN}: backend='triton' needs lam of w's shape {tuple(w.shape)}, got "
                               f"{tuple(lam.shape)}. Fix: backend='auto', or expand lam.")
        be = "torch"
    if be == "torch":
        return decay_mixed_reference(lam, w, u, kind)
    import triton

    from . import _tl

    lam_c, w_c, u_c = lam.contiguous(), w.contiguous(), u.contiguous()
    out = torch.empty_like(w_c)
    n = w_c.numel()
    block = 1024
    acc = _tl.tl.float64 if w.dtype == torch.float64 else _tl.tl.float32
    _tl.decay_mixed_kernel[(triton.cdiv(n, block),)](lam_c, w_c, u_c, out, n, SOFTPLUS=kind == "softplus",
                                                     BLOCK=block, ACC=acc)
    return out
