"""Meta-learning of initial weights on top of the two engines.

MAML (Finn et al. 2017) needs no helper: the meta-gradient is the gradient of the query loss with
respect to the *starting* params of the adaptation, which :func:`bilevel.unrolled_hypergrad` returns
with ``init_grad=True`` (``hparams`` may be ``{}``). First-order MAML is the plain gradient of the
query loss at the adapted params.

Implicit MAML (Rajeswaran et al. 2019) adapts to a task by (approximately) solving the proximal
problem ``w*(θ) = argmin_w L_T(w) + λ/2 ‖w − θ‖²``. At its stationary point ``∇L_T(w*) + λ(w* − θ) = 0``,
so ``dw*/dθ = λ (H + λI)⁻¹ = (I + H/λ)⁻¹`` with ``H = ∇²L_T(w*)``, and the meta-gradient is

    dL_V(w*)/dθ = (I + H/λ)⁻¹ ∇L_V(w*),

whatever path led to ``w*``: no unroll is stored. :func:`imaml_grad` hands that solve to
:func:`bilevel.implicit_hypergrad` with ``θ`` as the hyperparameters and the proximal term as a
separable penalty (its Hessian ``λI`` and mixed product ``−λu`` in closed form).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ._errors import check_like, check_tree
from ._result import Hypergrad
from ._second_order import with_twice_differentiable_kernels
from ._tree import Tree
from .implicit import implicit_hypergrad

# imaml_grad is public as bl.imaml_grad (documented there once)
__all__ = ["proximal_loss", "Proximal"]


class Proximal:
    """The proximal penalty ``λ/2 Σ_k ‖w_k − θ_k‖²`` of implicit MAML, ``θ`` being the hyperparameters.

    Called as ``penalty(params, theta)``; it declares its Hessian diagonal (``λ`` everywhere) and
    mixed product (``∇_θ <∇_w penalty, u> = −λu``) in closed form, so passed as ``penalty=`` to
    :func:`bilevel.implicit_hypergrad` it costs no double backward.

    Shapes: ``params`` and ``theta`` share keys and shapes; the penalty is 0-dim.

    Example:
        >>> prox = bl.meta.Proximal(2.0)
        >>> prox({"w": torch.ones(3)}, {"w": torch.zeros(3)})             # 2/2 · 3
        tensor(3.)
        >>> prox.mixed_vjp({"w": torch.ones(3)}, {"w": torch.zeros(3)}, {"w": torch.ones(3)})["w"]
        tensor([-2., -2., -2.])
    """

    def __init__(self, lam: float) -> None:
        self.lam = _check_lam(lam, "bilevel.meta.Proximal")

    def __call__(self, params: Mapping[str, Tensor], theta: Mapping[str, Tensor]) -> Tensor:
        return 0.5 * self.lam * torch.stack([(params[k] - theta[k]).square().sum() for k in theta]).sum()

    def hessian_diag(self, params: Mapping[str, Tensor], theta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``∂²penalty/∂w² = λ`` for every weight (a tree like ``params``)."""
        return {k: torch.full_like(params[k], self.lam) for k in theta}

    def mixed_vjp(self, params: Mapping[str, Tensor], theta: Mapping[str, Tensor],
                  u: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``∇_θ <∇_w penalty, u> = −λ u`` (a tree like ``theta``)."""
        return {k: -self.lam * u[k] for k in theta}


def _check_lam(lam: Union[float, Tensor], fn: str) -> float:
    value = float(lam) if isinstance(lam, (int, float)) or (isinstance(lam, Tensor) and lam.numel() == 1) else None
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: expected `lam` (the proximal strength λ) to be a finite number > 0, got {lam!r}. "
                         f"Fix: pass e.g. lam=1.0 (larger λ keeps the adapted params closer to theta).")
    return value


def proximal_loss(inner_loss: Callable[..., Tensor], lam: float) -> Callable[..., Tensor]:
    """``(params, theta, *args) -> inner_loss(params, *args) + λ/2 ‖params − theta‖²``: the objective whose
    minimizer implicit MAML adapts to (minimize it in ``params`` from ``theta``, then :func:`imaml_grad`).

    Shapes: ``params`` and ``theta`` share keys and shapes; the loss is 0-dim.

    Example:
        >>> task = lambda p, y: 0.5 * ((p["w"] - y) ** 2).sum()
        >>> loss = bl.meta.proximal_loss(task, lam=1.0)
        >>> loss({"w": torch.zeros(2)}, {"w": torch.ones(2)}, torch.ones(2))   # ½·2 + ½·2
        tensor(2.)
    """
    prox = Proximal(lam)

    def loss(params: Mapping[str, Tensor], theta: Mapping[str, Tensor], *args: Any) -> Tensor:
        return inner_loss(params, *args) + prox(params, theta)

    return loss


@with_twice_differentiable_kernels
def imaml_grad(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[..., Tensor],
    adapted_params: Mapping[str, Tensor],
    theta: Mapping[str, Tensor],
    lam: float,
    *,
    solver: Any = None,
    inner_args: Sequence[Any] = (),
    outer_args: Sequence[Any] = (),
    hvp_mode: str = "auto",
    check_finite: bool = True,
    u0: Optional[Mapping[str, Tensor]] = None,
) -> Hypergrad:
    """Implicit-MAML meta-gradient ``(I + H/λ)⁻¹ ∇L_V(w*)`` of one task, with respect to the meta-params ``theta``.

    Args:
        inner_loss: ``inner_loss(params, *inner_args) -> scalar``, the task's support (training) loss
            ``L_T``; the proximal term is added here, not by the caller.
        outer_loss: ``outer_loss(params, *outer_args) -> scalar``, the task's query loss ``L_V``.
        adapted_params: ``w*``, (approximately) ``argmin_w L_T(w) + λ/2 ‖w − θ‖²`` (e.g. a few
            dozen gradient steps on :func:`proximal_loss` from ``theta``); ``hg.info.inner_grad_norm``
            is the proximal objective's gradient norm there, the error of the meta-gradient growing
            with it.
        theta: the meta-params (the initialization being learned), keys and shapes of ``adapted_params``.
        lam: the proximal strength ``λ > 0``.
        solver: linear solver for ``(H + λI) u = ∇L_V(w*)`` (``bl.CG()`` by default: the matrix is
            positive definite once ``λ`` exceeds ``H``'s most negative eigenvalue, and its condition
            number ``(λ_max(H) + λ)/(λ_min(H) + λ)`` is small for large ``λ``, so a few CG steps do).
        inner_args, outer_args: the task's support and query batches.
        hvp_mode: ``"auto"`` | ``"reverse"`` | ``"forward"``.
        check_finite: check inputs and the result for NaN/Inf.
        u0: a starting point for the solve (keys of ``theta``), e.g. a previous ``hg.info.adjoint``.

    Returns:
        :class:`bilevel.Hypergrad`: the meta-gradient (keys and shapes of ``theta``), ``.info`` a
        :class:`bilevel.HypergradInfo` (proximal gradient norm, losses, solver diagnostics).

    Shapes: ``adapted_params`` and ``theta`` are trees with equal keys and shapes, as is the result.

    Raises:
        ShapeError: ``theta`` and ``adapted_params`` differ in keys or shapes.
        ValueError: ``lam`` is not a finite number > 0.

    Example:
        >>> X, y, Xq, yq = torch.randn(10, 3), torch.randn(10), torch.randn(5, 3), torch.randn(5)
        >>> task = lambda p, X, y: 0.5 * ((X @ p["w"] - y) ** 2).mean()
        >>> theta, lam = {"w": torch.zeros(3)}, 2.0
        >>> A = X.T @ X / 10                                              # the exact proximal solution
        >>> w = torch.linalg.solve(A + lam * torch.eye(3), X.T @ y / 10 + lam * theta["w"])
        >>> g = bl.imaml_grad(task, task, {"w": w}, theta, lam, inner_args=(X, y), outer_args=(Xq, yq))
        >>> dense = torch.linalg.solve(torch.eye(3) + A / lam, Xq.T @ (Xq @ w - yq) / 5)
        >>> torch.allclose(g["w"], dense, atol=1e-5)
        True
    """
    fn = "bilevel.imaml_grad"
    adapted_params = check_tree(adapted_params, fn, "adapted_params")
    theta = check_tree(theta, fn, "theta")
    check_like(adapted_params, theta, fn, "adapted_params", "theta")
    prox = Proximal(_check_lam(lam, fn))

    def inner(p: Tree, h: Tree, *args: Any) -> Tensor:
        return inner_loss(p, *args)

    def outer(p: Tree, h: Tree, *args: Any) -> Tensor:
        return outer_loss(p, *args)

    return implicit_hypergrad(inner, outer, adapted_params, theta, solver=solver, inner_args=tuple(inner_args),
                              outer_args=tuple(outer_args), hvp_mode=hvp_mode, check_finite=check_finite,
                              penalty=prox, u0=u0)
