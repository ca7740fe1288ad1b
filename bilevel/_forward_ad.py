"""Workarounds for two defects of PyTorch's forward-mode AD, applied while bilevel runs forward mode.

Both are exact rewrites (same values, same derivatives) of calls in the user's losses and in the
inner optimizers, made by a :class:`torch.overrides.TorchFunctionMode` that is active only inside
``bl.unrolled_hypergrad(mode="forward")``:

1. A 0-dim floating tensor combined with a Python float by ``+ - * /`` gets a float64 *tangent*
   (the primal keeps its dtype): the float becomes a "wrapped number" tensor of dtype float64 whose
   zero tangent forgets the wrapped-number flag, so type promotion between two 0-dim tensors picks
   float64 (pytorch/pytorch#90065, #160513; still in torch 2.13). In float32 that tangent later
   meets float32 ones and fails (``expected m1 and m2 to have the same dtype``, ``expected dtype
   float for `end```). Rewrite: the float becomes a 0-dim tensor of the other operand's dtype (the
   workaround given in #90065), which promotes to the same dtype for the primal and the tangent.
2. ``F.mse_loss(..., reduction="mean")`` under forward-over-reverse AD divides a zero tangent in
   place and raises ``ZeroTensors are immutable`` whenever one of its inputs carries no tangent
   (pytorch/pytorch#123996). Rewrite: ``mse_loss(..., reduction="sum") / numel``, whose formula
   has no in-place step (the sum reduction is unaffected, per the issue).

Example:
    >>> from bilevel._forward_ad import ForwardModeFixes
    >>> x, t = torch.tensor(0.3), torch.tensor(1.0)
    >>> torch.func.jvp(lambda h: 0.5 * h, (x,), (t,))[1].dtype           # the upstream defect
    torch.float64
    >>> with ForwardModeFixes():
    ...     torch.func.jvp(lambda h: 0.5 * h, (x,), (t,))[1].dtype
    torch.float32
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["ForwardModeFixes", "CallsMseLoss", "fixes_for"]

_T = torch.Tensor
_ARITHMETIC = frozenset({
    _T.__add__, _T.__radd__, _T.__sub__, _T.__rsub__, _T.__mul__, _T.__rmul__, _T.__truediv__,
    _T.__rtruediv__, _T.add, _T.sub, _T.subtract, _T.mul, _T.multiply, _T.div, _T.divide, _T.true_divide,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide,
})


def _scalar_as_tensor(args: tuple) -> tuple:
    if len(args) != 2:
        return args
    a, b = args
    if isinstance(a, Tensor) and type(b) is float and a.dim() == 0 and a.is_floating_point():
        return a, torch.tensor(b, dtype=a.dtype)
    if isinstance(b, Tensor) and type(a) is float and b.dim() == 0 and b.is_floating_point():
        return torch.tensor(a, dtype=b.dtype), b
    return args


def _mse_loss(input: Tensor, target: Tensor, size_average: Any = None, reduce: Any = None,
              reduction: str = "mean", weight: Any = None) -> Tensor:
    if reduction != "mean" or size_average is not None or reduce is not None or weight is not None:
        kw = {} if weight is None else {"weight": weight}
        return F.mse_loss(input, target, size_average, reduce, reduction, **kw)
    n = torch.broadcast_shapes(input.shape, target.shape).numel()
    return F.mse_loss(input, target, reduction="sum") / n


class ForwardModeFixes(TorchFunctionMode):
    """While active, rewrites the two calls that PyTorch's forward-mode AD gets wrong (module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _ARITHMETIC:
            args = _scalar_as_tensor(args)
        elif func is F.mse_loss:
            return _mse_loss(*args, **kwargs)
        return func(*args, **kwargs)


class CallsMseLoss(TorchFunctionMode):
    """Records whether ``F.mse_loss`` is called while active (``.seen``), and changes nothing.

    With :func:`fixes_for`, forward mode turns :class:`ForwardModeFixes` on only where it can
    matter: the mode's Python dispatch on every operation costs up to ~15% of a forward-mode run
    (measured on a 2-layer MLP, 20 SGD steps, CPU).
    """

    seen = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if func is F.mse_loss:
            self.seen = True
        return func(*args, **(kwargs or {}))


def fixes_for(tensors: Iterable[Any], calls_mse_loss: bool) -> ContextManager:
    """:class:`ForwardModeFixes` where it is needed: ``F.mse_loss`` is called, or some floating tensor of
    ``tensors`` is not float64 (the float64 tangents of defect 1 are harmless when all is float64);
    else a context that does nothing."""
    needed = calls_mse_loss or any(isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                                   for t in tensors)
    return ForwardModeFixes() if needed else contextlib.nullcontext()
