"""Base of the differentiable functional inner optimizers.

An inner optimizer is a small configured object with two pure methods
(optax-style, STYLE.md):

    state = opt.init(params)
    params, state = opt.step(params, grads, state, hparams)

Nothing is updated in place, so the whole trajectory can be differentiated
(reverse, truncated, checkpointed or forward mode, :mod:`bilevel.unroll`).
Any numeric option may instead be the *name* of a tensor in ``hparams``
(``SGD(lr="lr")``): that option is then a hyperparameter and gets a hypergradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import torch
from torch import Tensor



@dataclass(frozen=True)
class Schedule:
    """A per-step hyperparameter: the value at step ``t`` is ``hparams[name][t // block]``.

    Give it wherever an optimizer takes a number (``SGD(lr=Schedule("lr"))``): ``hparams[name]`` is
    a 1-D tensor with one entry per step (``block=1``) or per block of ``block`` steps, and each
    entry gets its own hypergradient (a learned learning-rate schedule). The step ``t`` is the
    number of steps the optimizer has taken, read from its state (the largest per-parameter step
    count), so a run continued from a saved state continues the schedule.

    Shapes: ``hparams[name]`` is ``(n_blocks,)``; covers steps ``0 .. n_blocks·block − 1``.

    Example:
        >>> opt = bl.inner.SGD(lr=bl.inner.Schedule("lr", block=2))
        >>> lrs = torch.tensor([0.5, 0.1])                    # steps 0-1 at 0.5, steps 2-3 at 0.1
        >>> w, s = {"w": torch.ones(1)}, opt.init({"w": torch.ones(1)})
        >>> for _ in range(3):
        ...     w, s = opt.step(w, {"w": torch.ones(1)}, s, {"lr": lrs})
        >>> w["w"], opt.hparam_names()                        # 1 − 0.5 − 0.5 − 0.1
        (tensor([-0.1000]), ['lr'])
    """

    name: str
    block: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"bilevel.inner.Schedule: expected the name of a hparams entry, got {self.name!r}.")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"Invalid block for bilevel.inner.Schedule: {self.block!r} (expected an int >= 1, "
                             f"the number of steps that share one value).")

    def at(self, hparams: Mapping[str, Tensor], t: int) -> Tensor:
        """The value at step ``t`` (a 0-dim slice of ``hparams[name]``, differentiable)."""
        v = hparams[self.name]
        i = t // self.block
        if v.dim() != 1 or i >= v.shape[0]:
            raise ValueError(
                f"bilevel.inner.Schedule({self.name!r}, block={self.block}): expected hparams[{self.name!r}] of "
                f"shape (n_blocks,) covering step {t} (n_blocks > {i}), got shape {tuple(v.shape)}. Fix: give one "
                f"value per block of {self.block} steps for every step run, e.g. torch.full((ceil(steps / "
                f"{self.block}),), 0.1).")
        return v[i]


Num = Union[float, int, str, Tensor, Schedule]

__all__ = ["InnerOptimizer", "Num", "Schedule", "PerParameterRule", "OptionValues", "axpy", "ema_sq", "safe_sqrt",
           "scalar_dtype", "zeros_tree", "per_key_steps"]


class InnerOptimizer:
    """Base class: ``init(params) -> state`` and ``step(params, grads, state, hparams) -> (params, state)``.

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state whose trees have them too.

    A ``grads`` entry may be ``None``: that parameter got no gradient this step (it did not reach
    the loss), and, as in ``torch.optim`` (which skips a parameter whose ``.grad`` is ``None``), it is
    returned unchanged (the very tensor), with no weight decay and its state untouched (the same
    tensors and step count). Step counts are per parameter, like ``torch.optim``'s ``state[p]["step"]``.

    Example:
        >>> opt = bl.inner.SGD(lr="lr", momentum=0.9)
        >>> isinstance(opt, bl.inner.InnerOptimizer), opt.name, opt.hparam_names()
        (True, 'SGD', ['lr'])
    """

    #: names of the options that may reference hparams
    _numeric: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The optimizer's class name (``"SGD"``, ``"Adam"``...)."""
        return type(self).__name__

    def init(self, params: Mapping[str, Tensor]) -> Any:
        """The initial optimizer state for the tree ``params`` (momentum buffers, moments: zeros)."""
        raise NotImplementedError

    def step(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: Any,
             hparams: Optional[Mapping[str, Tensor]] = None) -> tuple[dict[str, Tensor], Any]:
        """One differentiable update: ``(new_params, new_state)`` from the trees ``params`` and
        ``grads`` (same keys and shapes; a ``None`` entry means "no gradient": that parameter and its
        state pass through unchanged) and ``state``; options given by name are read from
        ``hparams``, so the result is differentiable in them."""
        raise NotImplementedError

    # -- hyperparameter references -------------------------------------------------------
    def hparam_names(self) -> list[str]:
        """Names of ``hparams`` entries this optimizer reads (its tunable options)."""
        names: list[str] = []
        for opt in self._numeric:
            v = getattr(self, opt)
            for item in (v if isinstance(v, tuple) else (v,)):
                if isinstance(item, str):
                    names.append(item)
                elif isinstance(item, Schedule):
                    names.append(item.name)
        return names

    def check_hparams(self, hparams: Optional[Mapping[str, Tensor]], fn: str) -> None:
        """Raise a clear ``KeyError`` when a named option is missing from ``hparams``."""
        missing = [n for n in self.hparam_names() if hparams is None or n not in hparams]
        if missing:
            have = sorted(hparams) if hparams else []
            raise KeyError(
                f"{fn}: {self!r} reads the hyperparameters {missing} by name; expected them in `hparams`, "
                f"got only {have}. "
                f"Fix: add them, e.g. hparams['{missing[0]}'] = torch.tensor(0.1, requires_grad=True), "
                f"or pass a number instead of a name."
            )

    @staticmethod
    def _value(v: Num, hparams: Optional[Mapping[str, Tensor]],
               steps: Optional[Mapping[str, int]] = None) -> Union[float, Tensor]:
        if isinstance(v, str):
            assert hparams is not None  # checked by check_hparams
            return hparams[v]
        if isinstance(v, Schedule):
            assert hparams is not None
            return v.at(hparams, max(steps.values(), default=0) if steps else 0)
        return v

    @staticmethod
    def _validate(fn: str, name: str, v: Any, low: float = 0.0, high: Optional[float] = None,
                  strict_low: bool = False, strict_high: bool = False) -> None:
        if isinstance(v, str):
            if not v:
                raise ValueError(f"{fn}: `{name}` names a hyperparameter, but the name is empty.")
            return
        if isinstance(v, Schedule):
            return
        if isinstance(v, Tensor):
            if v.is_floating_point():
                return
            raise TypeError(f"{fn}: expected `{name}` to be a number, a floating tensor or a hparams name, got {v.dtype}.")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{fn}: expected `{name}` to be a finite number or the name of a hparams entry, got {v!r}.")
        bad_low = v < low or (strict_low and v == low)
        bad_high = high is not None and (v > high or (strict_high and v == high))
        if bad_low or bad_high:
            rng = f"{'(' if strict_low else '['}{low}, {high if high is not None else 'inf'}{')' if strict_high or high is None else ']'}"
            raise ValueError(f"Invalid {name} for {fn}: {v} (expected a value in {rng}).")

    @staticmethod
    def _is_zero(v: Num) -> bool:
        return not isinstance(v, (str, Tensor, Schedule)) and v == 0


def zeros_tree(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.zeros_like(p) for k, p in params.items()}


def per_key_steps(step: Union[int, Mapping[str, int]], params: Mapping[str, Tensor]) -> dict[str, int]:
    """Steps taken by each parameter; a single int (a state saved before per-parameter counts) counts for all."""
    if isinstance(step, Mapping):
        return dict(step)
    return dict.fromkeys(params, int(step))


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float))


def axpy(y: Tensor, a: Any, x: Tensor) -> Tensor:
    """``y + a·x``: one fused op (``torch.add`` with ``alpha``) when ``a`` is a number (fewer autograd
    nodes and saved tensors per unrolled step), the spelled-out form, differentiable in ``a``, when
    it is a tensor (a tuned hyperparameter)."""
    return torch.add(y, x, alpha=a) if is_number(a) else y + a * x


def ema_sq(v: Tensor, g: Tensor, beta: Any) -> Tensor:
    """``β·v + (1 − β)·g²`` (torch.optim's ``v.mul_(β).addcmul_(g, g, value=1 − β)``)."""
    return torch.addcmul(v * beta, g, g, value=1 - beta) if is_number(beta) else beta * v + (1 - beta) * g * g


def safe_sqrt(x: Tensor) -> Tensor:
    """``√x`` for ``x ≥ 0`` with derivative 0 (not inf) at 0; 0 where ``x ≤ 0``."""
    # NOTE: d√x/dx is infinite at 0, and 0·inf = NaN would poison the hypergradient wherever a
    # gradient entry is exactly zero (unused parameters, ReLU dead units). Same value as x.sqrt()
    # (x ≥ 0 here: a second moment), zero derivative at 0: below the smallest normal number the
    # clamp's derivative is 0, and its value sqrt(tiny) is multiplied by the mask (x > 0) — 3 ops
    # instead of the 6 of a double torch.where, on every tensor of every unrolled step. A centered
    # variance (RMSprop) that rounding makes slightly negative gives 0 here where torch.optim gives NaN.
    tiny = torch.finfo(x.dtype).tiny
    return x.clamp_min(tiny).sqrt() * (x > 0)


def scalar_dtype() -> torch.dtype:
    """The dtype of torch.optim's scalar state (``step``, NAdam's ``mu_product``): float64 when it is
    the default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class OptionValues:
    """The values of an optimizer's options for one step: numbers as given, names read from
    ``hparams``; ``per_step(t, fn)`` computes a step-count-dependent quantity (bias corrections)
    once for all the parameters at step ``t``."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.__dict__.update(values)
        self._memo: dict[Any, Any] = {}

    def per_step(self, t: int, fn: Callable[[int], Any]) -> Any:
        if t not in self._memo:
            self._memo[t] = fn(t)
        return self._memo[t]


class PerParameterRule(InnerOptimizer):
    """Base of the ``torch.optim`` rules: each parameter moves by its own gradient, its own state
    entries and its own step count.

    Here are what all of them share, in ``torch.optim``'s order: validation of the numbers, the
    loop over parameters, "no gradient" (a ``None`` gradient leaves the parameter and its state
    alone), ``maximize`` (the gradient is negated first), then weight decay (L2 added to the
    gradient, or decoupled: ``p ← p·(1 − lr·weight_decay)``). A rule defines its options (a frozen
    dataclass with ``lr``, ``weight_decay`` and ``maximize`` fields), ``state_type`` (a NamedTuple:
    one tree per state entry, named as torch.optim names it, then ``step``), ``init_trees`` and
    ``update``.

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state whose trees have them too.

    Example:
        >>> isinstance(bl.inner.RMSprop(lr=0.01), bl.inner.InnerOptimizer)
        True
    """

    #: NamedTuple of the state: one tree per entry (an empty tree when the options do not use it), then ``step``
    state_type: ClassVar[type]
    #: ``option -> keyword arguments of _validate`` (default: a finite number ≥ 0, or a name)
    _bounds: ClassVar[dict[str, dict]] = {}

    def __post_init__(self) -> None:
        fn = f"bilevel.inner.{self.name}"
        for opt in self._numeric:
            v = getattr(self, opt)
            if opt == "betas":
                if not isinstance(v, (tuple, list)) or len(v) != 2:
                    raise TypeError(f"{fn}: expected betas to be a pair (beta1, beta2), got {v!r}. "
                                    f"Fix: betas=(0.9, 0.999).")
                object.__setattr__(self, "betas", tuple(v))
                for i, b in enumerate(v):
                    self._validate(fn, f"beta{i + 1}", b, high=1.0, strict_high=True)
            else:
                self._validate(fn, opt, v, **self._bounds.get(opt, {}))
        self._check(fn)

    def _check(self, fn: str) -> None:
        """Checks across options (Nesterov needs momentum); none by default."""

    @property
    def _decoupled_decay(self) -> bool:
        return False

    def init_trees(self, params: Mapping[str, Tensor]) -> tuple[dict, ...]:
        """The initial state trees, in ``state_type``'s order (an empty ``{}`` for an unused entry)."""
        raise NotImplementedError

    def update(self, p: Tensor, g: Tensor, t: int, entries: tuple, h: OptionValues) -> tuple[Tensor, tuple]:
        """One parameter's update at its step ``t`` (1 on its first gradient), after ``maximize`` and
        weight decay: ``(new_p, new_entries)``; ``entries`` has one tensor per state tree (``None``
        for an unused one, which must stay ``None``)."""
        raise NotImplementedError

    def init(self, params: Mapping[str, Tensor]) -> Any:
        return self.state_type(*self.init_trees(params), dict.fromkeys(params, 0))

    def values(self, hparams: Optional[Mapping[str, Tensor]],
               steps: Optional[Mapping[str, int]] = None) -> OptionValues:
        """The options' values for one step (names read from ``hparams``; schedules at ``steps``)."""
        values = {}
        for opt in self._numeric:
            v = getattr(self, opt)
            values[opt] = tuple(self._value(b, hparams, steps) for b in v) if isinstance(v, tuple) \
                else self._value(v, hparams, steps)
        return OptionValues(values)

    def step(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: Any,
             hparams: Optional[Mapping[str, Tensor]] = None) -> tuple[dict[str, Tensor], Any]:
        steps = per_key_steps(state.step, params)
        h = self.values(hparams, steps)
        trees = tuple(state)[:-1]
        new_trees: tuple[dict, ...] = tuple({} for _ in trees)
        new_steps = dict(steps)
        new_p: dict[str, Tensor] = {}
        has_wd = not self._is_zero(self.weight_decay)
        for k, p in params.items():
            entries = tuple(tree[k] if tree else None for tree in trees)
            g = grads[k]
            if g is not None:                             # None: torch.optim skips the parameter
                t = new_steps[k] = steps[k] + 1
                if self.maximize:
                    g = -g
                if has_wd:
                    if self._decoupled_decay:
                        p = p * (1 - h.lr * h.weight_decay)
                    else:
                        g = axpy(g, h.weight_decay, p)
                p, entries = self.update(p, g, t, entries, h)
            new_p[k] = p
            for tree, e in zip(new_trees, entries):
                if e is not None:
                    tree[k] = e
        return new_p, self.state_type(*new_trees, new_steps)
