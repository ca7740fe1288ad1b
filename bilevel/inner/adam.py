"""Differentiable Adam / AdamW (torch.optim.Adam and torch.optim.AdamW's rules)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Tuple, Union

import torch
from torch import Tensor

from ._base import Num, OptionValues, PerParameterRule, ema_sq, is_number, safe_sqrt, zeros_tree

__all__ = ["Adam", "AdamW", "AdamState"]


class AdamState(NamedTuple):
    """First and second moments (trees), the running max of the second (AMSGrad), steps taken by each
    parameter (its bias correction uses its own count, as ``torch.optim``'s ``state[p]["step"]``).

    Shapes: ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with AMSGrad, else empty) have the
    keys and shapes of the params; ``step`` maps their keys to ints.

    Example:
        >>> opt = bl.inner.Adam(lr=0.1)
        >>> params = {"w": torch.ones(2), "b": torch.ones(1)}
        >>> _, state = opt.step(params, {"w": torch.ones(2), "b": None}, opt.init(params))   # b: no gradient
        >>> state.exp_avg["w"], state.max_exp_avg_sq, state.step
        (tensor([0.1000, 0.1000]), {}, {'w': 1, 'b': 0})
    """

    exp_avg: dict
    exp_avg_sq: dict
    max_exp_avg_sq: dict
    step: Union[dict, int]


@dataclass(frozen=True)
class Adam(PerParameterRule):
    """Functional, differentiable Adam with decoupled (AdamW-style) weight decay by default::

        g ← −g                                 (maximize)
        p ← p·(1 − lr·weight_decay)            (decoupled=True, as torch.optim.AdamW)
        g ← g + weight_decay·p                 (decoupled=False, as torch.optim.Adam)
        m ← β1·m + (1 − β1)·g ;  v ← β2·v + (1 − β2)·g²
        p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + eps)

    ``amsgrad=True`` uses the running maximum of ``v``. Every number (``lr``, each beta,
    ``eps``, ``weight_decay``) may be the name of an entry of ``hparams``.

    Args:
        lr: learning rate.
        betas: ``(β1, β2)``.
        eps: term added to the denominator.
        weight_decay: weight decay coefficient.
        amsgrad: AMSGrad variant.
        decoupled: AdamW-style decay (default, API.md) or L2 added to the gradient (torch.optim.Adam).
        maximize: maximize the objective (follow the gradient instead of its negative).

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state whose trees have them too.

    Example:
        >>> opt = bl.inner.Adam(lr="lr", weight_decay=1e-2)
        >>> params, grads = {"w": torch.ones(3)}, {"w": torch.full((3,), 5.0)}
        >>> new, state = opt.step(params, grads, opt.init(params), {"lr": torch.tensor(1e-3)})
        >>> torch.allclose(new["w"], torch.full((3,), 1 - 1e-3 * 1e-2 - 1e-3), atol=1e-6)   # first step: ±lr
        True
    """

    lr: Num = 1e-3
    betas: Tuple[Num, Num] = (0.9, 0.999)
    eps: Num = 1e-8
    weight_decay: Num = 0.0
    amsgrad: bool = False
    decoupled: bool = True
    maximize: bool = False

    _numeric = ("lr", "betas", "eps", "weight_decay")
    state_type = AdamState

    @property
    def _decoupled_decay(self) -> bool:
        return self.decoupled

    def init_trees(self, params: Mapping[str, Tensor]) -> tuple[dict, dict, dict]:
        return zeros_tree(params), zeros_tree(params), zeros_tree(params) if self.amsgrad else {}

    def update(self, p: Tensor, g: Tensor, t: int, entries: tuple, h: OptionValues) -> tuple[Tensor, tuple]:
        m, v, vmax = entries
        b1, b2 = h.betas
        # (step size, √(1 − β2^t)): computed once per step count, shared by the parameters
        step_size, bc2_sqrt = h.per_step(t, lambda t: (h.lr / (1 - b1 ** t), (1 - b2 ** t) ** 0.5))
        # the fused ops of torch.optim's own Adam (lerp, addcmul, addcdiv) wherever the numbers
        # are plain floats: fewer autograd nodes per step; tensor hyperparameters (a tuned lr,
        # β) take the spelled-out form, differentiable in them
        m = torch.lerp(m, g, 1 - b1)
        v = ema_sq(v, g, b2)
        v_used = v
        if vmax is not None:
            v_used = vmax = torch.maximum(vmax, v)
        denom = safe_sqrt(v_used) / bc2_sqrt + h.eps
        p = torch.addcdiv(p, m, denom, value=-step_size) if is_number(step_size) else p - step_size * m / denom
        return p, (m, v, vmax)


@dataclass(frozen=True)
class AdamW(Adam):
    """:class:`Adam` with decoupled weight decay (``torch.optim.AdamW``), default ``weight_decay=1e-2``.

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state whose trees have them too.

    Example:
        >>> opt = bl.inner.AdamW(lr=0.1)
        >>> new, _ = opt.step({"w": torch.ones(2)}, {"w": torch.zeros(2)}, opt.init({"w": torch.ones(2)}))
        >>> opt.weight_decay, new["w"]                              # zero gradient: only the decay acts
        (0.01, tensor([0.9990, 0.9990]))
    """

    weight_decay: Num = 1e-2
    decoupled: bool = True
