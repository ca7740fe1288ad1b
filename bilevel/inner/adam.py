"""Differentiable Adam / AdamW (torch.optim.Adam and torch.optim.AdamW's rules)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from ._base import InnerOptimizer, Num, per_key_steps, zeros_tree

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


def _safe_sqrt(x: Tensor) -> Tensor:
    # NOTE: d√x/dx is infinite at 0, and 0·inf = NaN would poison the hypergradient wherever a
    # gradient entry is exactly zero (unused parameters, ReLU dead units). Same value as x.sqrt()
    # (x ≥ 0 here: a second moment), zero derivative at 0: below the smallest normal number the
    # clamp's derivative is 0, and its value sqrt(tiny) is multiplied by the mask (x > 0) — 3 ops
    # instead of the 6 of a double torch.where, on every tensor of every unrolled step.
    tiny = torch.finfo(x.dtype).tiny
    return x.clamp_min(tiny).sqrt() * (x > 0)


def _pow(b: Num, t: int) -> Tensor | float:
    return b ** t


@dataclass(frozen=True)
class Adam(InnerOptimizer):
    """Functional, differentiable Adam with decoupled (AdamW-style) weight decay by default::

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

    _numeric = ("lr", "betas", "eps", "weight_decay")

    def __post_init__(self) -> None:
        fn = f"bilevel.inner.{self.name}"
        self._validate(fn, "lr", self.lr)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise TypeError(f"{fn}: expected betas to be a pair (beta1, beta2), got {self.betas!r}.")
        object.__setattr__(self, "betas", tuple(self.betas))
        self._validate(fn, "beta1", self.betas[0], high=1.0, strict_high=True)
        self._validate(fn, "beta2", self.betas[1], high=1.0, strict_high=True)
        self._validate(fn, "eps", self.eps)
        self._validate(fn, "weight_decay", self.weight_decay)

    def init(self, params: Mapping[str, Tensor]) -> AdamState:
        return AdamState(zeros_tree(params), zeros_tree(params), zeros_tree(params) if self.amsgrad else {},
                         dict.fromkeys(params, 0))

    def step(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: AdamState,
             hparams: Optional[Mapping[str, Tensor]] = None) -> tuple[dict[str, Tensor], AdamState]:
        steps = per_key_steps(state.step, params)
        lr = self._value(self.lr, hparams, steps)
        b1 = self._value(self.betas[0], hparams, steps)
        b2 = self._value(self.betas[1], hparams, steps)
        eps = self._value(self.eps, hparams, steps)
        wd = self._value(self.weight_decay, hparams, steps)
        new_steps = dict(steps)
        corrections: dict[int, tuple] = {}           # step count -> (step size, √(1 − β2^t)), shared
        has_wd = not self._is_zero(self.weight_decay)
        new_p, m_new, v_new, vmax_new = {}, {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            if g is None:                                 # no gradient: torch.optim skips the parameter
                new_p[k], m_new[k], v_new[k] = p, state.exp_avg[k], state.exp_avg_sq[k]
                if self.amsgrad:
                    vmax_new[k] = state.max_exp_avg_sq[k]
                continue
            t = new_steps[k] = steps[k] + 1
            if t not in corrections:
                corrections[t] = (lr / (1 - _pow(b1, t)), (1 - _pow(b2, t)) ** 0.5)
            step_size, bc2_sqrt = corrections[t]
            if has_wd:
                if self.decoupled:
                    p = p * (1 - lr * wd)
                else:
                    g = g + wd * p
            # the fused ops of torch.optim's own Adam (lerp, addcmul, addcdiv) wherever the numbers
            # are plain floats: fewer autograd nodes per step; tensor hyperparameters (a tuned lr,
            # β) take the spelled-out form, differentiable in them
            m = torch.lerp(state.exp_avg[k], g, 1 - b1)
            v = (torch.addcmul(state.exp_avg_sq[k] * b2, g, g, value=1 - b2) if isinstance(b2, float)
                 else b2 * state.exp_avg_sq[k] + (1 - b2) * g * g)
            m_new[k], v_new[k] = m, v
            if self.amsgrad:
                v = torch.maximum(state.max_exp_avg_sq[k], v)
                vmax_new[k] = v
            denom = _safe_sqrt(v) / bc2_sqrt + eps
            new_p[k] = (torch.addcdiv(p, m, denom, value=-step_size) if isinstance(step_size, float)
                        else p - step_size * m / denom)
        return new_p, AdamState(m_new, v_new, vmax_new, new_steps)


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
