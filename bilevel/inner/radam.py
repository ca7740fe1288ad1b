"""Differentiable RAdam (torch.optim.RAdam's rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Tuple

import torch
from torch import Tensor

from ._base import Num, OptionValues, PerParameterRule, ema_sq, safe_sqrt, zeros_tree
from .adam import AdamState

__all__ = ["RAdam"]


@dataclass(frozen=True)
class RAdam(PerParameterRule):
    """Functional, differentiable twin of ``torch.optim.RAdam`` (same keywords, defaults and rule)::

        g ← −g  (maximize)
        p ← p·(1 − lr·weight_decay)  (decoupled_weight_decay)  or  g ← g + weight_decay·p
        m ← β1·m + (1 − β1)·g ;  v ← β2·v + (1 − β2)·g²
        ρ∞ = 2/(1 − β2) − 1 ;  ρ_t = ρ∞ − 2t·β2^t/(1 − β2^t)
        r_t = √((ρ_t − 4)(ρ_t − 2)ρ∞ / ((ρ∞ − 4)(ρ∞ − 2)ρ_t))
        p ← p − lr · m/(1 − β1^t) · r_t·√(1 − β2^t)/(√v + eps)     (ρ_t > 5)
        p ← p − lr · m/(1 − β1^t)                                   (otherwise: SGD with momentum)

    Every number may be the name of an entry of ``hparams`` (then it is tuned); the switch at
    ``ρ_t = 5`` depends on ``β2`` and ``t`` only, so a tuned ``β2`` gets the derivative of the
    branch taken.

    Args:
        lr: learning rate.
        betas: ``(β1, β2)``.
        eps: term added to the denominator.
        weight_decay: weight decay coefficient.
        decoupled_weight_decay: decay the weights directly (AdamW-style) instead of adding L2 to the gradient.
        maximize: maximize the objective (follow the gradient instead of its negative).

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state (an :class:`AdamState`, without
    ``max_exp_avg_sq``) whose trees have them too.

    Example:
        >>> opt = bl.inner.RAdam(lr="lr")
        >>> params, grads = {"w": torch.ones(2)}, {"w": torch.tensor([2.0, -3.0])}
        >>> new, _ = opt.step(params, grads, opt.init(params), {"lr": torch.tensor(0.1)})
        >>> new["w"]                                  # first steps (ρ_t ≤ 5): p − lr·m/(1 − β1^t) = p − lr·g
        tensor([0.8000, 1.3000])
    """

    lr: Num = 1e-3
    betas: Tuple[Num, Num] = (0.9, 0.999)
    eps: Num = 1e-8
    weight_decay: Num = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False

    _numeric = ("lr", "betas", "eps", "weight_decay")
    state_type = AdamState                       # Adam's moments (no AMSGrad: max_exp_avg_sq stays empty)

    @property
    def _decoupled_decay(self) -> bool:
        return self.decoupled_weight_decay

    def init_trees(self, params: Mapping[str, Tensor]) -> tuple[dict, dict, dict]:
        return zeros_tree(params), zeros_tree(params), {}

    def update(self, p: Tensor, g: Tensor, t: int, entries: tuple, h: OptionValues) -> tuple[Tensor, tuple]:
        m, v, _ = entries
        b1, b2 = h.betas

        def per_step(t: int) -> tuple:
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            rho_inf = 2 / (1 - b2) - 1
            rho_t = rho_inf - 2 * t * (b2 ** t) / bc2
            if not rho_t > 5.0:
                return bc1, None, None
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            return bc1, bc2 ** 0.5, rect

        bc1, bc2_sqrt, rect = h.per_step(t, per_step)
        m = torch.lerp(m, g, 1 - b1)
        v = ema_sq(v, g, b2)
        step = m / bc1 * h.lr                     # torch.optim's order of the products
        if rect is not None:
            step = step * (bc2_sqrt / (safe_sqrt(v) + h.eps)) * rect
        return p - step, (m, v, None)
