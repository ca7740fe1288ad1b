"""Result types of the hypergradient engines: a tree that carries its diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from torch import Tensor

from ._tree import Tree

__all__ = ["Hypergrad", "HypergradInfo"]


@dataclass
class HypergradInfo:
    """Diagnostics of one implicit hypergradient.

    Attributes:
        inner_grad_norm: ``‖∇_w L_T‖`` at params: how stationary the point was.
            The hypergradient's error grows roughly linearly with it.
        inner_loss: ``L_T`` at params.
        outer_loss: ``L_V`` at params (``nan`` for :func:`bilevel.implicit_diff`).
        solver: the linear solve's :class:`~bilevel.SolverInfo` (``None`` for
            a user solver that returns a plain tree).
        hvp_mode: how the Hessian products were taken (``"reverse"``, ``"forward"``, ``"closed"``,
            ``"gauss_newton"``).
        adjoint: the adjoint ``u = (H + damping I)⁻¹ ∂_w L_V`` (keys of params, detached): pass it
            as the next call's ``u0`` to warm-start the solve when params and hparams moved little.

    Example:
        >>> f = lambda p, h: 0.5 * ((p["w"] - h["c"]) ** 2).sum()          # argmin_w f = c
        >>> hg = bl.implicit_hypergrad(f, lambda p, h: (p["w"] ** 2).sum(), {"w": torch.ones(2)}, {"c": torch.ones(2)})
        >>> hg.info.inner_grad_norm, hg.info.solver.solver, hg.info.hvp_mode
        (0.0, 'CG', 'reverse')
    """

    inner_grad_norm: float
    inner_loss: float
    outer_loss: float
    solver: Optional[Any]
    hvp_mode: str
    adjoint: Optional[Tree] = None


class Hypergrad(dict):
    """The hypergradient tree (keys of ``hparams``) plus diagnostics in ``.info``.

    ``.info`` is a :class:`HypergradInfo` for implicit hypergradients and a
    :class:`bilevel.UnrollInfo` for unrolled ones. ``.init_grad`` is ``None`` unless
    :func:`bilevel.unrolled_hypergrad` was asked for it (``init_grad=True``): then the gradient
    of the outer loss with respect to the starting params (keys of ``params``), as MAML needs.

    Shapes: the keys and shapes of ``hparams`` (``.init_grad``: those of ``params``).

    Example:
        >>> f = lambda p, h: 0.5 * ((p["w"] - h["c"]) ** 2).sum()          # w*(c) = c
        >>> hg = bl.implicit_hypergrad(f, lambda p, h: (p["w"] ** 2).sum(), {"w": torch.ones(2)}, {"c": torch.ones(2)})
        >>> hg["c"], type(hg.info).__name__                                # d‖c‖²/dc = 2c
        (tensor([2., 2.]), 'HypergradInfo')
    """

    info: Any
    init_grad: Optional[Tree]

    def __init__(self, tree: Mapping[str, Tensor], info: Any, init_grad: Optional[Tree] = None) -> None:
        super().__init__(tree)
        self.info = info
        self.init_grad = init_grad
