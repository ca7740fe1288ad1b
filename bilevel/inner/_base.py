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
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

__all__ = ["InnerOptimizer", "Num", "Schedule"]


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
