"""Graph helpers shared by the implicit and unrolled engines: reachability, gradients with zeros
for unused inputs, detaching nested optimizer states, and the test for a missing derivative."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor

__all__ = ["reachable_leaves", "grads_or_zeros", "detach_state", "missing_derivative"]


def reachable_leaves(roots: Sequence[Optional[Tensor]]) -> set[int]:
    """``id``s of the leaf tensors that the autograd graphs of ``roots`` reach (a walk, no compute)."""
    seen: set[int] = set()
    out: set[int] = set()
    stack = [t.grad_fn for t in roots if t is not None and t.grad_fn is not None]
    out.update(id(t) for t in roots if t is not None and t.grad_fn is None and t.requires_grad)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None:
            out.add(id(var))
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return out


def grads_or_zeros(out: Tensor, inputs: Sequence[Tensor], **kwargs: Any) -> list[Tensor]:
    """``∂out/∂inputs`` with zeros (not ``None``) for inputs ``out`` does not depend on."""
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    gs = torch.autograd.grad(out, list(inputs), allow_unused=True, **kwargs)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


def detach_state(state: Any, requires_grad: bool = False) -> Any:
    """A nested optimizer state (NamedTuples, dicts, tuples) with every tensor detached (and, on
    request, floating tensors made leaves that require grad); other values pass through."""
    def f(x: Any) -> Any:
        if isinstance(x, Tensor):
            x = x.detach()
            if requires_grad and x.is_floating_point():
                x.requires_grad_(True)
        return x
    return pytree.tree_map(f, state)


def missing_derivative(err: BaseException) -> bool:
    """Whether an autograd error says an op lacks a (double-)backward formula, so another mode of
    differentiation (forward-over-reverse) may still work."""
    msg = str(err).lower()
    return any(s in msg for s in ("derivative", "not implemented", "double backward",
                                  "differentiate twice", "once_differentiable"))
