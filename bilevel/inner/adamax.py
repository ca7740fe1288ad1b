"""Differentiable Adamax (torch.optim.Adamax's rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Tuple, Union

import torch
from torch import Tensor

from ._base import Num, OptionValues, PerParameterRule, is_number, zeros_tree

__all__ = ["Adamax", "AdamaxState"]


class AdamaxState(NamedTuple):
    """First moment, exponentially weighted infinity norm, steps taken by each parameter.

    Shapes: ``exp_avg`` and ``exp_inf`` have the keys and shapes of the params; ``step`` maps their keys to ints.

    Example:
        >>> state = bl.inner.Adamax().init({"w": torch.ones(2, 3)})
        >>> state.exp_avg["w"].shape, state.exp_inf["w"].shape, state.step
        (torch.Size([2, 3]), torch.Size([2, 3]), {'w': 0})
    """

    exp_avg: dict
    exp_inf: dict
    step: Union[dict, int]


@dataclass(frozen=True)
class Adamax(PerParameterRule):
    """Functional, differentiable twin of ``torch.optim.Adamax`` (same keywords, defaults and rule)::

        g ← −g  (maximize) ;  g ← g + weight_decay·p
        m ← β1·m + (1 − β1)·g ;  u ← max(β2·u, |g| + eps)
        p ← p − lr/(1 − β1^t) · m / u

    Every number may be the name of an entry of ``hparams`` (then it is tuned).

    Args:
        lr: learning rate.
        betas: ``(β1, β2)``.
        eps: term added to ``|g|`` (keeps ``u`` positive).
        weight_decay: L2 penalty coefficient added to the gradient.
        maximize: maximize the objective (follow the gradient instead of its negative).

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state whose trees have them too.

    Example:
        >>> opt = bl.inner.Adamax(lr="lr")
        >>> params, grads = {"w": torch.ones(2)}, {"w": torch.tensor([2.0, -3.0])}
        >>> new, _ = opt.step(params, grads, opt.init(params), {"lr": torch.tensor(0.1)})
        >>> new["w"]                                  # first step: ∓lr (sign of the gradient)
        tensor([0.9000, 1.1000])
    """

    lr: Num = 2e-3
    betas: Tuple[Num, Num] = (0.9, 0.999)
    eps: Num = 1e-8
    weight_decay: Num = 0.0
    maximize: bool = False

    _numeric = ("lr", "betas", "eps", "weight_decay")
    state_type = AdamaxState

    def init_trees(self, params: Mapping[str, Tensor]) -> tuple[dict, dict]:
        return zeros_tree(params), zeros_tree(params)

    def update(self, p: Tensor, g: Tensor, t: int, entries: tuple, h: OptionValues) -> tuple[Tensor, tuple]:
        m, u = entries
        b1, b2 = h.betas
        m = torch.lerp(m, g, 1 - b1)
        u = torch.maximum(u * b2, g.abs() + h.eps)
        clr = h.per_step(t, lambda t: h.lr / (1 - b1 ** t))
        p = torch.addcdiv(p, m, u, value=-clr) if is_number(clr) else p - clr * m / u
        return p, (m, u)
