"""Adapter: use a TorchOpt functional optimizer (``torchopt.adam(...)``, ...) as an inner optimizer."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor

from ._base import InnerOptimizer

__all__ = ["TorchOpt"]


class TorchOpt(InnerOptimizer):
    """Wrap a TorchOpt ``GradientTransformation`` (``torchopt.sgd``, ``torchopt.adam``, a ``chain``...).

    Its update runs with ``inplace=False``, so it is differentiable like the built-in
    optimizers. Its numbers are fixed at construction (TorchOpt has no notion of
    named hyperparameters); use :class:`~bilevel.inner.SGD` / :class:`~bilevel.inner.Adam`
    to tune learning rates.

    Shapes: ``params`` and ``grads`` are trees with the same keys and shapes (any); ``step``
    returns new params of those shapes and a new state whose trees have them too.

    Example:
        >>> import torchopt
        >>> opt = bl.inner.TorchOpt(torchopt.sgd(0.5))
        >>> inner = lambda p, h: 0.5 * ((p["w"] - h["c"]) ** 2).sum()
        >>> hg, w = bl.unrolled_hypergrad(inner, lambda p, h: (p["w"] ** 2).sum(), {"w": torch.zeros(2)},
        ...                               {"c": torch.ones(2)}, optimizer=opt, steps=20)
        >>> hg["c"].shape, torch.allclose(w["w"], torch.ones(2), atol=1e-4)
        (torch.Size([2]), True)
    """

    def __init__(self, transformation: Any) -> None:
        if not (hasattr(transformation, "init") and hasattr(transformation, "update")):
            raise TypeError(
                f"bilevel.inner.TorchOpt: expected a TorchOpt GradientTransformation (with init/update), "
                f"got {type(transformation).__name__}. Fix: pass e.g. torchopt.adam(1e-3)."
            )
        self.transformation = transformation

    def __repr__(self) -> str:
        return f"TorchOpt({self.transformation!r})"

    def init(self, params: Mapping[str, Tensor]) -> Any:
        return self.transformation.init(dict(params))

    def step(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: Any,
             hparams: Optional[Mapping[str, Tensor]] = None) -> tuple[dict[str, Tensor], Any]:
        import torchopt

        params = dict(params)
        updates, new_state = self.transformation.update(dict(grads), state, params=params, inplace=False)
        new = dict(torchopt.apply_updates(params, updates, inplace=False))
        # A None gradient is "no gradient" (torch.optim skips the parameter): the very tensor comes back.
        new.update({k: p for k, p in params.items() if grads[k] is None})
        return new, _keep_dropped(state, new_state)


def _keep_dropped(old: Any, new: Any) -> Any:
    """``new`` with every leaf that became ``None`` where ``old`` held a tensor put back.

    NOTE: TorchOpt skips the ``None`` entries of ``grads`` but some of its transformations (the
    momentum ``trace`` of ``torchopt.sgd``, 0.7) return ``None`` in the state for them, which loses
    the buffer and silently drops that parameter's later gradients. ``torch.optim`` leaves the state
    of a parameter without gradient untouched, so the old entry is kept.
    """
    if new is None:
        return old
    if isinstance(new, dict) and isinstance(old, dict):
        return type(new)({k: _keep_dropped(old.get(k), v) for k, v in new.items()})
    if isinstance(new, (tuple, list)) and isinstance(old, (tuple, list)) and len(new) == len(old):
        items = [_keep_dropped(o, n) for o, n in zip(old, new)]
        return type(new)(*items) if hasattr(new, "_fields") else type(new)(items)
    return new
