"""Differentiable Adagrad (torch.optim.Adagrad's rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Union

import torch
from torch import Tensor

from ._base import Num, OptionValues, PerParameterRule, is_number, safe_sqrt

__all__ = ["Adagrad", "AdagradState"]


class AdagradState(NamedTuple):
    """Sum of the squared gradients (from ``initial_accumulator_value``), steps taken by each parameter.

    Shapes: ``sum`` has the keys and shapes of the params; ``step`` maps their keys to ints.

    Example:
        >>> state = bl.inner.Adagrad(initial_accumulator_value=0.1).init({"w": torch.ones(2)})
        >>> state.sum["w"], state.step
        (tensor([0.1000, 0.1000]), {'w': 0})
    """

    sum: dict
    step: Union[dict, int]


@dataclass(frozen=True)
class Adagrad(PerParameterRule):
    """Functional, differentiable twin of ``torch.optim.Adagrad`` (same keywords, defaults and rule)::

        g ← −g  (maximize) ;  g ← g + weight_decay·p
        s ← s + g²                                  (s starts at initial_accumulator_value)
        p ← p − lr/(1 + (t − 1)·lr_decay) · g / (√s + eps)

    Every number may be the name of an entry of ``hparams`` (then it is tuned); a named
    ``initial_accumulator_value`` is added to each parameter's sum at its first step (``init``
    does not see ``hparams``).

    Args:
        lr: learning rate.
        lr_decay: learning-rate decay (per step of the parameter).
        weight_decay: L2 penalty coefficient added to the gradient.
        initial_accumulator_value: starting value of the sum of squared gradients.
        eps: term added to the denominator.
        maximize: maximize the objective (follow the gradient instead of its negative).

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state whose trees have them too.

    Example:
        >>> opt = bl.inner.Adagrad(lr="lr")
        >>> params, grads = {"w": torch.ones(2)}, {"w": torch.full((2,), 4.0)}
        >>> new, state = opt.step(params, grads, opt.init(params), {"lr": torch.tensor(0.1)})
        >>> new["w"], state.sum["w"]                  # first step: lr·g/√g² = lr
        (tensor([0.9000, 0.9000]), tensor([16., 16.]))
    """

    lr: Num = 1e-2
    lr_decay: Num = 0.0
    weight_decay: Num = 0.0
    initial_accumulator_value: Num = 0.0
    eps: Num = 1e-10
    maximize: bool = False

    _numeric = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    state_type = AdagradState

    def init_trees(self, params: Mapping[str, Tensor]) -> tuple[dict]:
        start = 0.0 if isinstance(self.initial_accumulator_value, str) else self.initial_accumulator_value
        return ({k: torch.full_like(p, start) if is_number(start) else torch.zeros_like(p) + start
                 for k, p in params.items()},)

    def update(self, p: Tensor, g: Tensor, t: int, entries: tuple, h: OptionValues) -> tuple[Tensor, tuple]:
        (s,) = entries
        if t == 1 and isinstance(self.initial_accumulator_value, str):
            s = s + h.initial_accumulator_value
        s = torch.addcmul(s, g, g)
        std = safe_sqrt(s) + h.eps
        clr = h.per_step(t, lambda t: h.lr / (1 + (t - 1) * h.lr_decay))
        p = torch.addcdiv(p, g, std, value=-clr) if is_number(clr) else p - clr * g / std
        return p, (s,)
