"""Differentiable SGD with momentum, dampening, Nesterov and weight decay (torch.optim.SGD's rule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ._base import InnerOptimizer, Num, per_key_steps, zeros_tree

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
class SGD(InnerOptimizer):
    """Functional, differentiable twin of ``torch.optim.SGD`` (same update rule)::

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

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state whose trees have them too.

    Example:
        >>> opt = bl.inner.SGD(lr="lr", momentum=0.9)
        >>> params, grads = {"w": torch.ones(3)}, {"w": torch.ones(3)}
        >>> lr = torch.tensor(0.1, requires_grad=True)              # a tuned learning rate
        >>> new, state = opt.step(params, grads, opt.init(params), {"lr": lr})
        >>> new["w"]                                                # w − lr·g, differentiable in lr
        tensor([0.9000, 0.9000, 0.9000], grad_fn=<SubBackward0>)
    """

    lr: Num = 1e-3
    momentum: Num = 0.0
    dampening: Num = 0.0
    weight_decay: Num = 0.0
    nesterov: bool = False

    _numeric = ("lr", "momentum", "dampening", "weight_decay")

    def __post_init__(self) -> None:
        fn = "bilevel.inner.SGD"
        self._validate(fn, "lr", self.lr)
        self._validate(fn, "momentum", self.momentum)
        self._validate(fn, "dampening", self.dampening, high=1.0)
        self._validate(fn, "weight_decay", self.weight_decay)
        if self.nesterov and (self._is_zero(self.momentum) or not self._is_zero(self.dampening)):
            raise ValueError(f"{fn}: Nesterov momentum requires a momentum and zero dampening, "
                             f"got momentum={self.momentum!r}, dampening={self.dampening!r}.")

    @property
    def _uses_momentum(self) -> bool:
        return not self._is_zero(self.momentum)

    def init(self, params: Mapping[str, Tensor]) -> SGDState:
        return SGDState(zeros_tree(params) if self._uses_momentum else {}, dict.fromkeys(params, 0))

    def step(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: SGDState,
             hparams: Optional[Mapping[str, Tensor]] = None) -> tuple[dict[str, Tensor], SGDState]:
        steps = per_key_steps(state.step, params)
        lr = self._value(self.lr, hparams, steps)
        mom = self._value(self.momentum, hparams, steps)
        damp = self._value(self.dampening, hparams, steps)
        wd = self._value(self.weight_decay, hparams, steps)
        new_steps = dict(steps)
        new_p: dict[str, Tensor] = {}
        new_buf: dict[str, Tensor] = {}
        # One fused op (torch.add with alpha) per update wherever the number is a float: fewer
        # autograd nodes and saved tensors per unrolled step; tensor hyperparameters (a tuned lr,
        # momentum, decay) take the spelled-out form, differentiable in them.
        def axpy(y: Tensor, a: Any, x: Tensor) -> Tensor:      # y + a·x
            return torch.add(y, x, alpha=a) if isinstance(a, (int, float)) else y + a * x

        for k, p in params.items():
            g = grads[k]
            if g is None:                                 # no gradient: torch.optim skips the parameter
                new_p[k] = p
                if self._uses_momentum:
                    new_buf[k] = state.momentum_buffer[k]
                continue
            new_steps[k] = steps[k] + 1
            if not self._is_zero(self.weight_decay):
                g = axpy(g, wd, p)
            if self._uses_momentum:
                if steps[k] == 0:
                    buf = g
                elif isinstance(damp, (int, float)):                 # torch.optim's buf·μ + (1−d)·g
                    buf = axpy(state.momentum_buffer[k] * mom, 1 - damp, g)
                else:
                    buf = mom * state.momentum_buffer[k] + (1 - damp) * g
                new_buf[k] = buf
                g = axpy(g, mom, buf) if self.nesterov else buf
            new_p[k] = axpy(p, -lr, g) if isinstance(lr, (int, float)) else p - lr * g
        return new_p, SGDState(new_buf, new_steps)
