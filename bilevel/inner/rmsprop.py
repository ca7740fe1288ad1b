"""Differentiable RMSprop (torch.optim.RMSprop's rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Union

import torch
from torch import Tensor

from ._base import Num, OptionValues, PerParameterRule, axpy, ema_sq, is_number, safe_sqrt, zeros_tree

__all__ = ["RMSprop", "RMSpropState"]


class RMSpropState(NamedTuple):
    """Running mean of the squared gradient, of the gradient (``centered``, else empty), momentum
    buffer (``momentum`` not 0, else empty), steps taken by each parameter.

    Shapes: each non-empty tree has the keys and shapes of the params; ``step`` maps their keys to ints.

    Example:
        >>> state = bl.inner.RMSprop(lr=0.01, centered=True).init({"w": torch.ones(2, 3)})
        >>> state.square_avg["w"].shape, state.grad_avg["w"].shape, state.momentum_buffer, state.step
        (torch.Size([2, 3]), torch.Size([2, 3]), {}, {'w': 0})
    """

    square_avg: dict
    grad_avg: dict
    momentum_buffer: dict
    step: Union[dict, int]


@dataclass(frozen=True)
class RMSprop(PerParameterRule):
    """Functional, differentiable twin of ``torch.optim.RMSprop`` (same keywords, defaults and rule)::

        g ← −g  (maximize) ;  g ← g + weight_decay·p
        v ← α·v + (1 − α)·g²
        ḡ ← α·ḡ + (1 − α)·g ;  d ← √(v − ḡ²) + eps       (centered)
        d ← √v + eps                                     (otherwise)
        buf ← momentum·buf + g/d ;  p ← p − lr·buf        (momentum ≠ 0)
        p ← p − lr·g/d                                   (otherwise)

    Every number may be the name of an entry of ``hparams`` (then it is tuned).

    Args:
        lr: learning rate.
        alpha: smoothing constant of the running means.
        eps: term added to the denominator.
        weight_decay: L2 penalty coefficient added to the gradient.
        momentum: momentum factor.
        centered: normalize by the estimated variance of the gradient instead of its second moment.
        maximize: maximize the objective (follow the gradient instead of its negative).

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state whose trees have them too.

    Example:
        >>> opt = bl.inner.RMSprop(lr="lr", alpha=0.9)
        >>> params, grads = {"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)}
        >>> new, _ = opt.step(params, grads, opt.init(params), {"lr": torch.tensor(0.01)})
        >>> new["w"]                                  # first step: lr·g/√(0.1·g²) = lr/√0.1
        tensor([0.9684, 0.9684])
    """

    lr: Num = 1e-2
    alpha: Num = 0.99
    eps: Num = 1e-8
    weight_decay: Num = 0.0
    momentum: Num = 0.0
    centered: bool = False
    maximize: bool = False

    _numeric = ("lr", "alpha", "eps", "weight_decay", "momentum")
    state_type = RMSpropState

    def init_trees(self, params: Mapping[str, Tensor]) -> tuple[dict, dict, dict]:
        return (zeros_tree(params), zeros_tree(params) if self.centered else {},
                {} if self._is_zero(self.momentum) else zeros_tree(params))

    def update(self, p: Tensor, g: Tensor, t: int, entries: tuple, h: OptionValues) -> tuple[Tensor, tuple]:
        v, gavg, buf = entries
        v = ema_sq(v, g, h.alpha)
        if gavg is not None:
            gavg = torch.lerp(gavg, g, 1 - h.alpha)
            var = torch.addcmul(v, gavg, gavg, value=-1)
        else:
            var = v
        d = safe_sqrt(var) + h.eps
        if buf is not None:
            buf = torch.addcdiv(buf * h.momentum, g, d)
            return axpy(p, -h.lr, buf), (v, gavg, buf)
        p = torch.addcdiv(p, g, d, value=-h.lr) if is_number(h.lr) else p - h.lr * g / d
        return p, (v, gavg, buf)
