"""Fused solver vector updates on flat buffers, with reductions kept on the device.

- :func:`neumann_step`: ``v ← v − α A v``, ``acc ← acc + v`` and ``‖v‖²`` in one launch.
- :class:`FusedCG`: conjugate gradients in the Chronopoulos–Gear form. Per iteration:
  the product ``w = A r``, one launch for the partials of ``<w, r>``, and one launch
  that every program finishes the reductions in (it sums the partials itself), then
  updates ``p, s, x, r`` and writes the partials of the next ``<r, r>``. No host sync
  until the convergence check every ``check_every`` iterations.

Why two launches and not one: the curvature ``<p, A p>`` needs the product just taken,
and a reduction over the whole vector must finish before any update can use it. A
single-launch iteration needs pipelined CG (Ghysels–Vanroose), which costs one more
product per solve and loses accuracy (residual gap); for the 10–50 iterations of a
hypergradient that is the wrong trade.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ._backend import resolve_backend

__all__ = ["neumann_step", "neumann_step_reference", "FusedCG", "FusedCGResult"]

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


@dataclass
class FusedCGResult:
    """What :meth:`FusedCG.solve` found (host values, read once at the end)."""

    x: Tensor
    iterations: int
    matvecs: int
    residual_sq: float
    converged: bool
    indefinite: bool
    min_rayleigh_quotient: float


class FusedCG:
    """CG on ``A x = b`` (flat buffers) with Triton-fused updates and device-side reductions.

    Args:
        maxiter: at most this many iterations (= products). thresh: stop once ``‖r‖² ≤ thresh``.
        check_every: read the residual and the curvature flag on the host every this many
            iterations (the only host syncs).

    Shapes: :meth:`solve` takes ``b`` (and ``x0``) of shape ``(P,)`` on a CUDA device (or on the
    CPU under ``TRITON_INTERPRET=1``) and ``matvec: (P,) -> (P,)``; the result's ``x`` is ``(P,)``.

    Example:
        >>> cg = bl.kernels.FusedCG(maxiter=10, thresh=1e-20)      # building it needs no GPU
        >>> A = torch.diag(torch.arange(1., 6., device="cuda"))    # doctest: +SKIP
        >>> res = cg.solve(lambda v: A @ v, torch.ones(5, device="cuda"))  # doctest: +SKIP
        >>> torch.allclose(res.x, 1 / A.diagonal()), res.converged  # doctest: +SKIP
        (True, True)
    """

    def __init__(self, maxiter: int, thresh: float, check_every: int = 5) -> None:
        self.maxiter, self.thresh, self.check_every = maxiter, thresh, check_every

    def solve(self, matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Optional[Tensor] = None) -> FusedCGResult:
        """Solve ``A x = b`` for flat ``b`` of shape ``(P,)`` (CUDA, Triton); ``matvec(v) -> A v``,
        shape ``(P,)``; ``x0`` a warm start (zeros by default)."""
        resolve_backend("triton", b, name="bilevel.kernels.FusedCG")
        import triton

        from . import _tl

        n = b.numel()
        dev, dt = b.device, b.dtype
        red = torch.float64 if dt == torch.float64 else torch.float32
        g = _grid(n, dev)
        gblock = max(16, triton.next_power_of_2(g))
        acc = _acc(dt)
        matvecs = 0
        if x0 is None:
            x, r = torch.zeros_like(b), b.clone()
        else:
            x = x0.clone()
            r = b - matvec(x)
            matvecs += 1
        p, s = torch.zeros_like(b), torch.zeros_like(b)
        gin, gout, dpart = (torch.empty(g, dtype=red, device=dev) for _ in range(3))
        _tl.partial_dot_kernel[(g,)](r, r, gin, n, BLOCK=BLOCK, ACC=acc)
        # [γ, α, first, bad, min Rayleigh quotient, ‖p‖²]
        sin = torch.tensor([0.0, 0.0, 1.0, 0.0, math.inf, 0.0], dtype=red, device=dev)
        sout = sin.clone()
        it = 0
        converged = float(gin.sum()) <= self.thresh
        bad = False
        while not converged and it < self.maxiter:
            w = matvec(r)
            matvecs += 1
            _tl.partial_dot_kernel[(g,)](w, r, dpart, n, BLOCK=BLOCK, ACC=acc)
            _tl.cg_update_kernel[(g,)](x, r, p, s, w, gin, gout, dpart, sin, sout, n,
                                       BLOCK=BLOCK, G_BLOCK=gblock, ACC=acc)
            gin, gout = gout, gin
            sin, sout = sout, sin
            it += 1
            if it % self.check_every == 0 or it == self.maxiter:
                flags = torch.stack([gin.sum(), sin[3]]).tolist()      # one host sync
                bad = flags[1] > 0
                if bad:
                    break
                converged = flags[0] <= self.thresh
        rs = float(gin.sum())
        return FusedCGResult(x, it, matvecs, rs, converged and not bad, bad, float(sin[4]))
