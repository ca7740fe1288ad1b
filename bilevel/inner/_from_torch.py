"""Differentiable copies of ``torch.optim`` optimizers (same rule, current numbers, current state).

Used by :class:`bilevel.HyperOptimizer` for ``bl.Unrolled`` look-ahead steps: the
unrolled steps must be the steps the user's optimizer would take.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ._base import InnerOptimizer, PerParameterRule
from .adagrad import Adagrad
from .adam import Adam
from .adamax import Adamax
from .nadam import NAdam
from .radam import RAdam
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["Partitioned", "from_torch", "check_convertible", "SUPPORTED"]

#: ``torch.optim`` class -> its differentiable twin (AdamW first: it may subclass Adam)
TWINS: tuple[tuple[type, type], ...] = (
    (torch.optim.SGD, SGD), (torch.optim.AdamW, Adam), (torch.optim.Adam, Adam), (torch.optim.RMSprop, RMSprop),
    (torch.optim.Adagrad, Adagrad), (torch.optim.Adamax, Adamax), (torch.optim.NAdam, NAdam),
    (torch.optim.RAdam, RAdam),
)
#: the ``torch.optim`` optimizers :func:`from_torch` converts
SUPPORTED = tuple(f"torch.optim.{cls.__name__}" for cls, _ in TWINS)
#: options of a param group under which torch.optim runs another code path than the one reproduced
UNSUPPORTED_FLAGS = ("capturable", "differentiable")


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


def _twin(optimizer: torch.optim.Optimizer) -> Optional[type]:
    return next((ours for cls, ours in TWINS if isinstance(optimizer, cls)), None)


def _flag_set(optimizer: torch.optim.Optimizer) -> Optional[str]:
    return next((f for group in optimizer.param_groups for f in UNSUPPORTED_FLAGS if group.get(f, False)), None)


def _convert_group(optimizer: torch.optim.Optimizer, group: dict, keys: list[str], params: list[Tensor]) -> tuple:
    fn = "bilevel.inner.from_torch"
    twin = _twin(optimizer)
    if twin is None:
        raise TypeError(f"{fn}: expected one of {SUPPORTED} (their update rules are reproduced exactly), got "
                        f"{type(optimizer).__name__}. Fix: use one of those as inner_optimizer, or bl.Implicit / "
                        f"bl.FirstOrder, which do not replay the optimizer.")
    for flag in UNSUPPORTED_FLAGS:
        if group.get(flag, False):
            raise ValueError(f"{fn}: the option {flag}=True of {type(optimizer).__name__} is not supported "
                             f"(expected {flag}=False). Fix: build the optimizer without it.")
    # the twin's options are torch.optim's group keys, by the same names
    options: dict[str, Any] = {}
    for f in fields(twin):
        if f.name in group:
            v = group[f.name]
            options[f.name] = (tuple(_num(b) for b in v) if f.name == "betas"
                               else bool(v) if isinstance(f.default, bool) else _num(v))
    if twin is Adam:
        options["decoupled"] = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
    opt: PerParameterRule = twin(**options)
    # NOTE: parameter by parameter, as torch.optim keeps it: a parameter that never had a gradient
    # has no state yet and starts fresh (its own step count 0) on its first real gradient. The
    # state trees are named as torch.optim's state entries.
    states = dict(zip(keys, (optimizer.state.get(p, {}) for p in params)))
    start = opt.init(dict(zip(keys, params)))
    trees = []
    for name, init in zip(opt.state_type._fields[:-1], start[:-1]):
        trees.append({k: st[name].detach().clone() if st.get(name) is not None else init[k]
                      for k, st in states.items()} if init else {})
    if twin is SGD:                   # torch.optim.SGD keeps no step count: a buffer means "not the first step"
        steps = {k: int(st.get("momentum_buffer") is not None) for k, st in states.items()}
    else:
        steps = {k: int(_num(st["step"])) if "step" in st else 0 for k, st in states.items()}
    return opt, opt.state_type(*trees, steps)


def from_torch(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> tuple[InnerOptimizer, Any]:
    """A differentiable inner optimizer and state reproducing ``optimizer``'s next steps on ``params``.

    Args:
        optimizer: a ``torch.optim`` ``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``, ``Adamax``,
            ``NAdam`` or ``RAdam`` instance (any param groups, ``maximize`` included).
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
        SGD(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
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
    which differentiates copies of them): one of ``SUPPORTED``, without ``capturable`` or
    ``differentiable``.

    Example:
        >>> p = torch.zeros(2, requires_grad=True)
        >>> bl.inner.check_convertible(torch.optim.RMSprop([p], momentum=0.9), "demo", "Unrolled")   # no error
    """
    name = type(optimizer).__name__
    if _twin(optimizer) is None:
        raise ValueError(f"{fn}: method bl.{method} differentiates copies of the inner optimizer's steps, and {name} "
                         f"has no differentiable copy (expected one of {SUPPORTED}). Fix: method=bl.Implicit(...) "
                         f"(it only needs the weights near a minimum, which {name} gives), or one of those as the "
                         f"inner optimizer.")
    flag = _flag_set(optimizer)
    if flag is not None:
        raise ValueError(f"{fn}: method bl.{method} differentiates copies of the inner optimizer's steps, and "
                         f"{name}({flag}=True) runs a code path that is not reproduced (expected {flag}=False). "
                         f"Fix: build {name} without {flag}=True.")
