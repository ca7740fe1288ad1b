"""Closed-form Hessian-vector product of (L2-regularized) logistic regression.

``f(w) = mean_i softplus-loss(x_iᵀ w, y_i) + ½ Σ l2 ⊙ w²`` has
``H v = (1/n) Xᵀ (d ⊙ X v) + l2 ⊙ v`` with ``d = σ(Xw) ⊙ (1 − σ(Xw))`` (labels drop
out). Autograd needs a double backward for this (about 2 gradients); the closed form
is two matrix-vector products over X (``benchmarks/bench_kernels.py``), and the
Triton kernel does both in one pass over each row block of X.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ._backend import resolve_backend

__all__ = ["logistic_hvp", "logistic_hvp_reference", "logistic_curvature"]

_FN = "bilevel.kernels.logistic_hvp"
_CHUNK_ROWS = 512


def _check(X: Tensor, w: Tensor, v: Tensor, l2: Optional[Union[float, Tensor]]) -> None:
    if X.dim() != 2:
        raise ValueError(f"{_FN}: expected X of shape (n, d), got {tuple(X.shape)}.")
    d = X.shape[1]
    for name, t in (("w", w), ("v", v)):
        if t.shape != (d,):
            raise ValueError(f"{_FN}: expected {name} of shape ({d},) to match X of shape {tuple(X.shape)}, "
                             f"got {tuple(t.shape)}.")
    if not (X.is_floating_point() and w.dtype == X.dtype and v.dtype == X.dtype):
        raise TypeError(f"{_FN}: expected X, w, v of one floating dtype, got {X.dtype}, {w.dtype}, {v.dtype}.")
    if isinstance(l2, Tensor) and l2.numel() not in (1, d):
        raise ValueError(f"{_FN}: expected l2 a number, a 0-dim tensor or shape ({d},), got {tuple(l2.shape)}.")


def logistic_curvature(X: Tensor, w: Tensor) -> Tensor:
    """``d = σ(Xw) ⊙ (1 − σ(Xw))``, shape ``(n,)``: the row weights of the Hessian at ``w``.

    Computed once per point, it saves one pass over ``X`` in every product of a solve
    (``logistic_hvp(..., curvature=d)``).

    Shapes: ``X (n, d)``, ``w (d,)``; returns ``(n,)``.

    Example:
        >>> X = torch.randn(6, 2)
        >>> c = bl.kernels.logistic_curvature(X, torch.zeros(2))     # σ(0)(1 − σ(0)) = 1/4
        >>> c.shape, torch.allclose(c, torch.full((6,), 0.25))
        (torch.Size([6]), True)
    """
    s = torch.sigmoid(X @ w)
    return s * (1 - s)


def logistic_hvp_reference(X: Tensor, w: Tensor, v: Tensor, *, l2: Optional[Union[float, Tensor]] = None,
                           curvature: Optional[Tensor] = None) -> Tensor:
    """Pure-torch ``H v`` (the CPU path and the oracle of the Triton kernel); differentiable.

    Shapes: ``X (n, d)``, ``w (d,)``, ``v (d,)``, ``l2`` scalar or ``(d,)``, ``curvature (n,)``;
    returns ``(d,)``.

    Example:
        >>> X, w, v = torch.randn(50, 4), torch.randn(4), torch.randn(4)
        >>> hv = bl.kernels.logistic_hvp_reference(X, w, v)
        >>> f = lambda p: F.softplus(X @ p["w"]).mean()      # the logistic loss up to a term linear in w
        >>> hv.shape, torch.allclose(hv, bl.hvp(f, {"w": w}, {"w": v})["w"], atol=1e-6)
        (torch.Size([4]), True)
    """
    dd = logistic_curvature(X, w) if curvature is None else curvature
    n = X.shape[0]
    if n > _CHUNK_ROWS and not (torch.is_grad_enabled() and any(t.requires_grad for t in (X, w, v, dd))):
        # row blocks that stay in cache: X is read once from memory for both products (about 10%
        # faster at 8192 × 1024 on this CPU); the plain formula below is the differentiable one
        out = torch.zeros_like(v)
        for i in range(0, n, _CHUNK_ROWS):
            Xc = X[i:i + _CHUNK_ROWS]
            out.addmv_(Xc.T, dd[i:i + _CHUNK_ROWS] * (Xc @ v))
        out.div_(n)
    else:
        out = X.T @ (dd * (X @ v)) / n
    return out if l2 is None else out + l2 * v


def _triton(X: Tensor, w: Tensor, v: Tensor, curvature: Optional[Tensor] = None) -> Tensor:
    import triton

    from . import _tl

    n, d = X.shape
    acc = torch.float64 if X.dtype == torch.float64 else torch.float32
    block_n = 32
    block_d = min(128, max(16, triton.next_power_of_2(d)))
    row_blocks = triton.cdiv(n, block_n)
    # a few programs per SM on a GPU (each owns strided row blocks); few in the interpreter
    cap = 4 * torch.cuda.get_device_properties(X.device).multi_processor_count if X.is_cuda else 4
    grid = max(1, min(row_blocks, cap))
    part = torch.zeros(grid, d, dtype=acc, device=X.device)
    tl_acc = _tl.tl.float64 if acc == torch.float64 else _tl.tl.float32
    curv = curvature.contiguous() if curvature is not None else part  # (unused pointer without HAS_CURV)
    _tl.logistic_hvp_kernel[(grid,)](X, w.contiguous(), v.contiguous(), curv, part, n, d, X.stride(0), X.stride(1),
                                     1.0 / n, row_blocks, BLOCK_N=block_n, BLOCK_D=block_d, ACC=tl_acc,
                                     HAS_CURV=curvature is not None)
    return part.sum(0).to(X.dtype)


class _LogisticHVP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X: Tensor, w: Tensor, v: Tensor, l2: Optional[Tensor], backend: str,  # type: ignore[override]
                curv: Optional[Tensor]):
        ctx.save_for_backward(X, w, v, l2 if l2 is not None else torch.empty(0))
        ctx.has_l2 = l2 is not None
        ctx.backend = backend
        ctx.curv = curv
        out = _triton(X, w, v, curv) if backend == "triton" else logistic_hvp_reference(X, w, v, curvature=curv)
        return out if l2 is None else out + l2 * v

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        X, w, v, l2 = ctx.saved_tensors
        gX = gw = gv = gl2 = None
        if ctx.needs_input_grad[0]:
            raise NotImplementedError(f"{_FN}: gradients with respect to X are not implemented. Fix: detach X "
                                      f"(the data), or use the autograd HVP of the loss.")
        if ctx.needs_input_grad[5]:
            raise NotImplementedError(f"{_FN}: gradients with respect to `curvature` are not implemented. "
                                      f"Fix: pass a detached curvature, or leave it None and differentiate w.")
        if ctx.curv is not None and ctx.needs_input_grad[1]:
            raise NotImplementedError(f"{_FN}: with a precomputed `curvature`, H does not depend on w here. "
                                      f"Fix: leave curvature=None to differentiate through w.")
        if ctx.needs_input_grad[2]:                     # H is symmetric: ∂(Hv)/∂v ᵀ g = H g
            gv = _triton(X, w, g, ctx.curv) if ctx.backend == "triton" else \
                logistic_hvp_reference(X, w, g, curvature=ctx.curv)
            if ctx.has_l2:
                gv = gv + l2 * g
        if ctx.needs_input_grad[1]:                     # third derivative: (1/n) Xᵀ(σ''' ⊙ Xv ⊙ Xg)
            s = torch.sigmoid(X @ w)
            gw = X.T @ (s * (1 - s) * (1 - 2 * s) * (X @ v) * (X @ g)) / X.shape[0]
        if ctx.has_l2 and ctx.needs_input_grad[3]:
            gl2 = g * v if l2.numel() > 1 else (g * v).sum().reshape(l2.shape)
        return gX, gw, gv, gl2, None, None


def logistic_hvp(X: Tensor, w: Tensor, v: Tensor, *, l2: Optional[Union[float, Tensor]] = None,
                 curvature: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """``H v`` of the mean logistic loss at ``w`` (plus ``½ Σ l2 ⊙ w²``), in closed form.

    ``H v = (1/n) Xᵀ (d ⊙ X v) + l2 ⊙ v``, ``d = σ(Xw)(1 − σ(Xw))``. Differentiable in
    ``w``, ``v`` and ``l2`` (not ``X``).

    Args:
        X: ``(n, d)`` design matrix (labels do not enter the Hessian).
        w: ``(d,)`` point. v: ``(d,)`` direction.
        l2: ``None``, a number, a 0-dim tensor or a ``(d,)`` tensor of per-feature L2 weights.
        curvature: optional ``(n,)`` row weights ``σ'(Xw)`` from :func:`logistic_curvature`,
            computed once per point: each product then reads X for ``Xv`` and ``Xᵀ(·)`` only.
        backend: ``"auto"`` (Triton on CUDA when installed, torch otherwise), ``"torch"``, or
            ``"triton"`` (raises where it cannot run; CPU tensors need ``TRITON_INTERPRET=1``).

    Returns:
        ``(d,)`` tensor, dtype of ``X``.

    Example:
        >>> X, w, v = torch.randn(100, 5), torch.zeros(5), torch.ones(5)
        >>> hv = bl.kernels.logistic_hvp(X, w, v, l2=0.1)   # at w = 0: X.T @ X v / (4n) + 0.1 v
        >>> torch.allclose(hv, X.T @ (X @ v) / 400 + 0.1 * v, atol=1e-6)
        True
    """
    _check(X, w, v, l2)
    if curvature is not None and curvature.shape != (X.shape[0],):
        raise ValueError(f"{_FN}: expected curvature of shape ({X.shape[0]},), got {tuple(curvature.shape)}.")
    be = resolve_backend(backend, X, w, v, name=_FN)
    l2t = None if l2 is None else torch.as_tensor(l2, dtype=X.dtype, device=X.device)
    return _LogisticHVP.apply(X, w, v, l2t, be, curvature)
