"""Differentiable copies of ``torch.optim`` optimizers (same rule, current numbers, current state).

Used by :class:`bilevel.HyperOptimizer` for ``bl.Unrolled`` look-ahead steps: the
unrolled steps must be the steps the user's optimizer would take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ._base import InnerOptimizer
from .adam import Adam, AdamState
from .sgd import SGD, SGDState

__all__ = ["Partitioned", "from_torch", "check_convertible", "SUPPORTED"]

SUPPORTED = ("torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW")


@dataclass(frozen=True)
class Partitioned(InnerOptimizer):
    """Different optimizers (or settings) for disjoint groups of keys, like torch's param groups.

    Args:
        parts: ``((keys, optimizer), ...)``; every key of the params tree must be in one part.

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state whose trees have them too.

    Example:
        >>> opt = bl.inner.Partitioned(((["w"], bl.inner.SGD(lr=0.1)), (["b"], bl.inner.SGD(lr=0.01))))
        >>> params = {"w": torch.ones(2), "b": torch.ones(1)}
        >>> new, state = opt.step(params, {"w": torch.ones(2), "b": torch.ones(1)}, opt.init(params))
        >>> new["w"], new["b"]
        (tensor([0.9000, 0.9000]), tensor([0.9900]))
    """

    parts: tuple

    def hparam_names(self) -> list[str]:
        return [n for _, o in self.parts for n in o.hparam_names()]

    def init(self, params: Mapping[str, Tensor]) -> tuple:
        return tuple(o.init({k: params[k] for k in keys}) for keys, o in self.parts)

    def step(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: tuple,
             hparams: Optional[Mapping[str, Tensor]] = None) -> tuple[dict[str, Tensor], tuple]:
        new_p: dict[str, Tensor] = {}
        new_s = []
        for (keys, o), s in zip(self.parts, state):
            p, s2 = o.step({k: params[k] for k in keys}, {k: grads[k] for k in keys}, s, hparams)
            new_p.update(p)
            new_s.append(s2)
        return {k: new_p[k] for k in params}, tuple(new_s)


def _num(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _convert_group(optimizer: torch.optim.Optimizer, group: dict, keys: list[str], params: list[Tensor]) -> tuple:
    fn = "bilevel.inner.from_torch"
    for flag in ("maximize", "capturable", "differentiable"):
        if group.get(flag, False):
            raise ValueError(f"{fn}: the option {flag}=True of {type(optimizer).__name__} is not supported.")
    # NOTE: parameter by parameter, as torch.optim keeps it: a parameter that never had a gradient
    # has no state yet and starts fresh (its own step count 0) on its first real gradient.
    states = dict(zip(keys, (optimizer.state.get(p, {}) for p in params)))
    fresh = dict(zip(keys, params))

    def take(name: str, init: dict) -> dict:
        return {k: st[name].detach().clone() if st.get(name) is not None else init[k] for k, st in states.items()}

    if isinstance(optimizer, torch.optim.SGD):
        opt = SGD(lr=_num(group["lr"]), momentum=_num(group["momentum"]), dampening=_num(group["dampening"]),
                  weight_decay=_num(group["weight_decay"]), nesterov=bool(group["nesterov"]))
        start = opt.init(fresh)
        if not opt._uses_momentum:
            return opt, start
        # torch.optim.SGD keeps no step count: a momentum buffer means "not the first step"
        steps = {k: int(st.get("momentum_buffer") is not None) for k, st in states.items()}
        return opt, SGDState(take("momentum_buffer", start.momentum_buffer), steps)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
        opt = Adam(lr=_num(group["lr"]), betas=tuple(_num(b) for b in group["betas"]), eps=_num(group["eps"]),
                   weight_decay=_num(group["weight_decay"]), amsgrad=bool(group["amsgrad"]), decoupled=decoupled)
        start = opt.init(fresh)
        steps = {k: int(_num(st["step"])) if "step" in st else 0 for k, st in states.items()}
        return opt, AdamState(take("exp_avg", start.exp_avg), take("exp_avg_sq", start.exp_avg_sq),
                              take("max_exp_avg_sq", start.max_exp_avg_sq) if opt.amsgrad else {}, steps)
    raise TypeError(f"{fn}: expected one of {SUPPORTED} (their update rules are reproduced exactly), got "
                    f"{type(optimizer).__name__}. Fix: use one of those as inner_optimizer, or bl.Implicit / "
                    f"bl.FirstOrder, which do not replay the optimizer.")


def from_torch(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> tuple[InnerOptimizer, Any]:
    """A differentiable inner optimizer and state reproducing ``optimizer``'s next steps on ``params``.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` instance (any param groups).
        params: ``{name: parameter}`` with the very tensors the optimizer holds; parameters of the
            optimizer that are not in ``params`` are ignored.

    Returns:
        ``(inner_optimizer, state)`` for :func:`bilevel.unrolled_hypergrad` (a
        :class:`Partitioned` optimizer when there are several param groups). The state is taken
        parameter by parameter, as ``torch.optim`` keeps it: a parameter that has no state yet (no
        gradient so far) starts fresh on its first gradient, with its own step count.

    Shapes: the state's trees have the keys of ``params`` and their shapes.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> opt, state = bl.inner.from_torch(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        ...                                  dict(model.named_parameters()))
        >>> opt
        SGD(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False)
        >>> sorted(state.momentum_buffer), state.momentum_buffer["weight"].shape
        (['bias', 'weight'], torch.Size([1, 3]))
    """
    name_of = {id(p): k for k, p in params.items()}
    parts = []
    for group in optimizer.param_groups:
        ps = [p for p in group["params"] if id(p) in name_of]
        if ps:
            keys = [name_of[id(p)] for p in ps]
            parts.append((keys, *_convert_group(optimizer, group, keys, ps)))
    if not parts:
        raise ValueError("bilevel.inner.from_torch: none of `params` is held by the optimizer. "
                         "Fix: pass the parameters the optimizer was built over.")
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    return Partitioned(tuple((keys, o) for keys, o, _ in parts)), tuple(s for _, _, s in parts)


def check_convertible(optimizer: torch.optim.Optimizer, fn: str, method: str) -> None:
    """Raise ``ValueError`` unless :func:`from_torch` reproduces ``optimizer``'s steps (for ``method``,
    which differentiates copies of them).

    Example:
        >>> p = torch.zeros(2, requires_grad=True)
        >>> bl.inner.check_convertible(torch.optim.Adam([p]), "demo", "Unrolled")     # no error
    """
    if isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
        return
    name = type(optimizer).__name__
    raise ValueError(f"{fn}: method bl.{method} differentiates copies of the inner optimizer's steps, and {name} "
                     f"has no differentiable copy (expected one of {SUPPORTED}). Fix: method=bl.Implicit(...) "
                     f"(it only needs the weights near a minimum, which {name} gives), or an SGD/Adam/AdamW "
                     f"inner optimizer.")
