"""Hessian-vector product of a linear softmax cross-entropy head, in row chunks.

Logits ``Z = X Wᵀ + b`` (``B × C``), loss ``mean_i CE(Z_i, y_i)``. For a direction
``V`` (shape of ``W``): ``U = X Vᵀ``, ``P = softmax(Z)``,
``S = P ⊙ U − P · rowsum(P ⊙ U)``, ``H v = (1/B) Sᵀ X``. Labels drop out.

Autograd's double backward materializes 5–8 ``B × C`` tensors; here only one row chunk
of ``Z`` and ``U`` exists at a time (the way fused linear-cross-entropy kernels chunk
rows), ``S`` is written over ``Z`` in place, and the matmuls go to BLAS / cuBLAS. The
Triton kernel fuses the softmax and ``S`` (two passes over each row, online softmax).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._backend import resolve_backend

__all__ = ["linear_ce_hvp", "linear_ce_hvp_reference", "default_chunk_rows"]

_FN = "bilevel.kernels.linear_ce_hvp"
CHUNK_ELEMENTS = 1 << 24  # rows per chunk × C: 64 MiB of float32 per chunk buffer


def default_chunk_rows(B: int, C: int) -> int:
    """Rows per chunk so that a ``chunk × C`` buffer holds at most 2^24 numbers."""
    return max(1, min(B, CHUNK_ELEMENTS // max(C, 1)))


def _check(X: Tensor, W: Tensor, V: Tensor, bias: Optional[Tensor]) -> None:
    if X.dim() != 2 or W.dim() != 2:
        raise ValueError(f"{_FN}: expected X (B, D) and W (C, D), got {tuple(X.shape)} and {tuple(W.shape)}.")
    if W.shape[1] != X.shape[1]:
        raise ValueError(f"{_FN}: expected W of shape (C, {X.shape[1]}) to match X {tuple(X.shape)}, got {tuple(W.shape)}.")
    if V.shape != W.shape:
        raise ValueError(f"{_FN}: expected V of W's shape {tuple(W.shape)}, got {tuple(V.shape)}.")
    if bias is not None and bias.shape != (W.shape[0],):
        raise ValueError(f"{_FN}: expected bias of shape ({W.shape[0]},), got {tuple(bias.shape)}.")
    if not (X.is_floating_point() and W.dtype == X.dtype and V.dtype == X.dtype):
        raise TypeError(f"{_FN}: expected X, W, V of one floating dtype, got {X.dtype}, {W.dtype}, {V.dtype}.")


def _s_torch(Z: Tensor, U: Tensor) -> Tensor:
    """``S = P ⊙ U − P · rowsum(P ⊙ U)``, ``P = softmax(Z)``; overwrites both buffers (no third)."""
    P = Z.sub_(Z.amax(1, keepdim=True)).exp_()
    P.div_(P.sum(1, keepdim=True))
    PU = U.mul_(P)
    return PU.sub_(P.mul_(PU.sum(1, keepdim=True)))


def _s_triton(Z: Tensor, U: Tensor) -> Tensor:
    import triton

    from . import _tl

    rows, C = Z.shape
    block_c = min(1024, max(16, triton.next_power_of_2(C)))
    acc = _tl.tl.float64 if Z.dtype == torch.float64 else _tl.tl.float32
    _tl.ce_hvp_rows_kernel[(rows,)](Z, U, Z.stride(0), U.stride(0), C, BLOCK_C=block_c, ACC=acc)
    return Z


def _chunked(X: Tensor, W: Tensor, V: Tensor, bias: Optional[Tensor], chunk: int, s_fn) -> Tensor:
    B = X.shape[0]
    out = torch.zeros_like(W)
    with torch.no_grad():
        for i in range(0, B, chunk):
            Xc = X[i:i + chunk]
            Z = Xc @ W.T if bias is None else torch.addmm(bias, Xc, W.T)
            U = Xc @ V.T
            S = s_fn(Z.contiguous(), U.contiguous())
            out.addmm_(S.T, Xc)
        out.div_(B)
    return out


def linear_ce_hvp_reference(X: Tensor, W: Tensor, V: Tensor, *, bias: Optional[Tensor] = None,
                            chunk_rows: Optional[int] = None) -> Tensor:
    """Pure-torch chunked ``H v`` (the CPU path and the oracle of the Triton path).

    Shapes: ``X (B, D)``, ``W (C, D)``, ``V (C, D)``, ``bias (C,)``; returns ``(C, D)``.
    With ``chunk_rows=B`` it is the unchunked formula.

    Example:
        >>> X, W, V, y = torch.randn(16, 4), torch.randn(3, 4), torch.randn(3, 4), torch.randint(0, 3, (16,))
        >>> hv = bl.kernels.linear_ce_hvp_reference(X, W, V, chunk_rows=5)
        >>> ref = bl.hvp(lambda p: F.cross_entropy(X @ p["W"].T, y), {"W": W}, {"W": V})["W"]   # autograd
        >>> hv.shape, torch.allclose(hv, ref, atol=1e-5)
        (torch.Size([3, 4]), True)
    """
    _check(X, W, V, bias)
    chunk = chunk_rows or default_chunk_rows(X.shape[0], W.shape[0])
    return _chunked(X, W, V, bias, chunk, _s_torch)


def linear_ce_hvp(X: Tensor, W: Tensor, V: Tensor, *, bias: Optional[Tensor] = None,
                  chunk_rows: Optional[int] = None, backend: str = "auto") -> Tensor:
    """``H v`` of ``mean CE(X Wᵀ + b, y)`` with respect to ``W``, for a direction ``V``.

    Peak extra memory is two ``chunk_rows × C`` buffers (``chunk_rows`` defaults to
    2^24 / C rows) instead of several ``B × C`` tensors. Not differentiable (a matvec).

    Args:
        X: ``(B, D)`` features (the head's input). W: ``(C, D)`` head weight.
        V: ``(C, D)`` direction. bias: optional ``(C,)`` head bias (a constant here).
        chunk_rows: rows per chunk. backend: ``"auto"`` | ``"torch"`` | ``"triton"``.

    Returns:
        ``(C, D)`` tensor.

    Example:
        >>> X, W, V = torch.randn(64, 8), torch.randn(5, 8), torch.randn(5, 8)
        >>> y = torch.randint(0, 5, (64,))                # labels do not enter the Hessian
        >>> hv = bl.kernels.linear_ce_hvp(X, W, V)
        >>> ref = bl.hvp(lambda p: F.cross_entropy(X @ p["W"].T, y), {"W": W}, {"W": V})["W"]
        >>> hv.shape, torch.allclose(hv, ref, atol=1e-5)
        (torch.Size([5, 8]), True)
    """
    _check(X, W, V, bias)
    be = resolve_backend(backend, X, W, V, name=_FN)
    chunk = chunk_rows or default_chunk_rows(X.shape[0], W.shape[0])
    return _chunked(X, W, V, bias, chunk, _s_triton if be == "triton" else _s_torch)
