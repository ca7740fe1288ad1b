"""Differentiable SGD with momentum, dampening, Nesterov, weight decay and maximize (torch.optim.SGD's rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Union

from torch import Tensor

from ._base import Num, OptionValues, PerParameterRule, axpy, is_number, zeros_tree

__all__ = ["SGD", "SGDState"]


class SGDState(NamedTuple):
    """``momentum_buffer``: tree (empty without momentum); ``step``: steps taken by each parameter.

    A parameter's first step with a gradient starts its buffer (``buf ← g``, as ``torch.optim.SGD``
    does when its ``momentum_buffer`` is ``None``); steps without a gradient do not count.

    Shapes: ``momentum_buffer`` has the keys and shapes of the params; ``step`` maps their keys to ints.

    Example:
        >>> state = bl.inner.SGD(lr=0.1, momentum=0.9).init({"w": torch.ones(2, 3)})
        >>> state.momentum_buffer["w"].shape, state.step
        (torch.Size([2, 3]), {'w': 0})
    """

    momentum_buffer: dict
    step: Union[dict, int]


@dataclass(frozen=True)
class SGD(PerParameterRule):
    """Functional, differentiable twin of ``torch.optim.SGD`` (same update rule)::

        g ← −g                                    (maximize)
        g ← g + weight_decay·p
        buf ← g                                   (first step)
        buf ← momentum·buf + (1 − dampening)·g    (later steps)
        g ← g + momentum·buf  if nesterov  else  buf
        p ← p − lr·g

    Every number may be the name of an entry of ``hparams`` (then it is tuned).

    Args:
        lr: learning rate (number, tensor, or hparams name).
        momentum: momentum factor.
        dampening: dampening of the momentum.
        weight_decay: L2 penalty coefficient added to the gradient.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0).
        maximize: maximize the objective (follow the gradient instead of its negative).

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state whose trees have them too.

    Example:
        >>> opt = bl.inner.SGD(lr="lr", momentum=0.9)
        >>> params, grads = {"w": torch.ones(3)}, {"w": torch.ones(3)}
        >>> lr = torch.tensor(0.1, requires_grad=True)              # a tuned learning rate
        >>> new, state = opt.step(params, grads, opt.init(params), {"lr": lr})
        >>> new["w"]                                                # w − lr·g, differentiable in lr
        tensor([0.9000, 0.9000, 0.9000], grad_fn=<AddBackward0>)
    """

    lr: Num = 1e-3
    momentum: Num = 0.0
    dampening: Num = 0.0
    weight_decay: Num = 0.0
    nesterov: bool = False
    maximize: bool = False

    _numeric = ("lr", "momentum", "dampening", "weight_decay")
    _bounds = {"dampening": dict(high=1.0)}
    state_type = SGDState

    def _check(self, fn: str) -> None:
        if self.nesterov and (self._is_zero(self.momentum) or not self._is_zero(self.dampening)):
            raise ValueError(f"{fn}: Nesterov momentum requires a momentum and zero dampening, "
                             f"got momentum={self.momentum!r}, dampening={self.dampening!r}.")

    @property
    def _uses_momentum(self) -> bool:
        return not self._is_zero(self.momentum)

    def init_trees(self, params: Mapping[str, Tensor]) -> tuple[dict]:
        return (zeros_tree(params) if self._uses_momentum else {},)

    def update(self, p: Tensor, g: Tensor, t: int, entries: tuple, h: OptionValues) -> tuple[Tensor, tuple]:
        (buf,) = entries
        if buf is not None:
            mom, damp = h.momentum, h.dampening
            if t == 1:
                buf = g
            elif is_number(damp):                                   # torch.optim's buf·μ + (1−d)·g
                buf = axpy(buf * mom, 1 - damp, g)
            else:
                buf = mom * buf + (1 - damp) * g
            g = axpy(g, mom, buf) if self.nesterov else buf
        return axpy(p, -h.lr, g), (buf,)
