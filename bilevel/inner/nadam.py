"""Differentiable NAdam (torch.optim.NAdam's rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Tuple, Union

import torch
from torch import Tensor

from ._base import Num, OptionValues, PerParameterRule, ema_sq, is_number, safe_sqrt, scalar_dtype, zeros_tree

__all__ = ["NAdam", "NAdamState"]


class NAdamState(NamedTuple):
    """First and second moments, the product of the momentum coefficients ``μ_1⋯μ_t`` (a 0-d tensor per
    parameter, in torch.optim's scalar dtype: float32 unless float64 is the default), steps taken
    by each parameter.

    Shapes: ``exp_avg`` and ``exp_avg_sq`` have the keys and shapes of the params, ``mu_product`` their
    keys and shape ``()``; ``step`` maps their keys to ints.

    Example:
        >>> state = bl.inner.NAdam().init({"w": torch.ones(2, 3)})
        >>> state.exp_avg["w"].shape, state.mu_product["w"], state.step
        (torch.Size([2, 3]), tensor(1.), {'w': 0})
    """

    exp_avg: dict
    exp_avg_sq: dict
    mu_product: dict
    step: Union[dict, int]


@dataclass(frozen=True)
class NAdam(PerParameterRule):
    """Functional, differentiable twin of ``torch.optim.NAdam`` (same keywords, defaults and rule)::

        g ← −g  (maximize)
        p ← p·(1 − lr·weight_decay)  (decoupled_weight_decay)  or  g ← g + weight_decay·p
        μ_t = β1·(1 − ½·0.96^(t·momentum_decay)) ;  Π_t = μ_1⋯μ_t
        m ← β1·m + (1 − β1)·g ;  v ← β2·v + (1 − β2)·g² ;  d = √(v/(1 − β2^t)) + eps
        p ← p − lr·(1 − μ_t)/(1 − Π_t) · g/d − lr·μ_{t+1}/(1 − Π_t·μ_{t+1}) · m/d

    Every number may be the name of an entry of ``hparams`` (then it is tuned).

    Args:
        lr: learning rate.
        betas: ``(β1, β2)``.
        eps: term added to the denominator.
        weight_decay: weight decay coefficient.
        momentum_decay: momentum decay ``ψ``.
        decoupled_weight_decay: decay the weights directly (AdamW-style, NAdamW) instead of adding L2
            to the gradient.
        maximize: maximize the objective (follow the gradient instead of its negative).

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state whose trees have them too.

    Example:
        >>> opt = bl.inner.NAdam(lr="lr")
        >>> params, grads = {"w": torch.ones(2)}, {"w": torch.tensor([2.0, -3.0])}
        >>> new, state = opt.step(params, grads, opt.init(params), {"lr": torch.tensor(0.1)})
        >>> new["w"], state.step                      # first step: ∓lr·(1 + μ_2(1 − β1)/(1 − μ_1μ_2))
        (tensor([0.8944, 1.1056]), {'w': 1})
    """

    lr: Num = 2e-3
    betas: Tuple[Num, Num] = (0.9, 0.999)
    eps: Num = 1e-8
    weight_decay: Num = 0.0
    momentum_decay: Num = 4e-3
    decoupled_weight_decay: bool = False
    maximize: bool = False

    _numeric = ("lr", "betas", "eps", "weight_decay", "momentum_decay")
    state_type = NAdamState

    @property
    def _decoupled_decay(self) -> bool:
        return self.decoupled_weight_decay

    def init_trees(self, params: Mapping[str, Tensor]) -> tuple[dict, dict, dict]:
        return zeros_tree(params), zeros_tree(params), {k: torch.ones((), dtype=scalar_dtype()) for k in params}

    def update(self, p: Tensor, g: Tensor, t: int, entries: tuple, h: OptionValues) -> tuple[Tensor, tuple]:
        m, v, mu_product = entries
        b1, b2 = h.betas

        def per_step(t: int) -> tuple:
            def mu(t: int):
                return b1 * (1.0 - 0.5 * 0.96 ** (t * h.momentum_decay))
            return mu(t), mu(t + 1), 1 - b2 ** t

        mu, mu_next, bc2 = h.per_step(t, per_step)
        # NOTE: torch.optim keeps μ_1⋯μ_t in a 0-d tensor of its scalar dtype (float32 unless float64
        # is the default) and reads it back as a Python float: the same product, rounded the same
        # way, gives its coefficients to the last bit (a float64 product would differ by ~3e-8
        # relative after 25 steps). A tuned β1 or ψ makes μ a tensor, and the product follows it
        # (0-d tensors promote to the wider dtype, the hyperparameter's) and stays differentiable:
        # then it is torch.optim's only when float64 is the default dtype.
        mu_product = mu_product * mu
        prod = float(mu_product) if is_number(mu) else mu_product.to(p.dtype)
        m = torch.lerp(m, g, 1 - b1)
        v = ema_sq(v, g, b2)
        d = safe_sqrt(v / bc2) + h.eps
        c_grad = -h.lr * (1.0 - mu) / (1.0 - prod)
        c_avg = -h.lr * mu_next / (1.0 - prod * mu_next)
        if is_number(c_grad) and is_number(c_avg):
            p = torch.addcdiv(torch.addcdiv(p, g, d, value=c_grad), m, d, value=c_avg)
        else:
            p = p + c_grad * (g / d) + c_avg * (m / d)
        return p, (m, v, mu_product)
