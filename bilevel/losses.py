"""Structured losses and penalties: objects that declare their second-order products in closed form.

One protocol (:class:`Structured`) with one set of method names serves losses and penalties
alike: a callable ``loss(params, hparams, *args) -> scalar`` with a method
``hvp(params, hparams, v, *args) -> tree`` (``∇²_params loss · v``), optionally
``hessian(params, hparams, *args) -> (v -> tree)`` (the same product with the work that
depends only on the point done once), optionally
``mixed_vjp(params, hparams, u, *args) -> tree`` (``∇_hparams <∇_params loss, u>``), and, for a
penalty whose Hessian is diagonal, ``hessian_diag(params, hparams) -> tree``
(:class:`bilevel.hparams.WeightDecay`).
:class:`bilevel.HessianOperator` (hence :func:`bilevel.implicit_hypergrad` and the
``HyperOptimizer``'s implicit method) uses the declared product under ``hvp_mode="auto"``
instead of double backward; ``hvp_mode="reverse"`` or ``"forward"`` still use autograd.

Combine one with a separable ``penalty=`` (``bl.hparams.weight_decay``) and the whole
implicit hypergradient runs without second-order autograd:

    >>> hp, pen = bl.hparams.weight_decay({"w": w}, per="parameter")
    >>> hg = bl.implicit_hypergrad(bl.losses.Logistic(), bl.losses.Logistic(), {"w": w}, hp,
    ...                            penalty=pen, inner_args=(X, y), outer_args=(Xv, yv))

Structured losses always take ``hparams`` (possibly unused), also through :func:`bilevel.hvp`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._errors import ShapeError
from .kernels import linear_ce_hvp, logistic_curvature, logistic_hvp

__all__ = ["Structured", "declares", "Logistic", "LinearCrossEntropy"]


@runtime_checkable
class Structured(Protocol):
    """A loss or penalty that declares its Hessian-vector product in closed form.

    Required: ``__call__(params, hparams, *args) -> scalar`` and ``hvp(params, hparams, v, *args)
    -> tree``. Optional, used when present (:func:`declares`): ``hessian(params, hparams, *args)
    -> (v -> tree)`` (the product with the point's work done once), ``mixed_vjp(params, hparams,
    u, *args) -> tree`` (``∇_hparams <∇_params f, u>``; autograd otherwise) and
    ``hessian_diag(params, hparams) -> tree`` (a diagonal Hessian: a separable penalty, applied
    as ``diag ⊙ v``).

    Shapes: ``hvp`` and ``hessian_diag`` return trees shaped like ``params``, ``mixed_vjp`` one
    shaped like ``hparams``.

    Example:
        >>> isinstance(bl.losses.Logistic(), bl.losses.Structured)
        True
        >>> _, penalty = bl.hparams.weight_decay({"w": torch.ones(2)})
        >>> isinstance(penalty, bl.losses.Structured), bl.losses.declares(penalty, "hessian_diag")
        (True, True)
    """

    def __call__(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], *args: Any) -> Tensor:
        """The loss (a 0-dim tensor)."""

    def hvp(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], v: Mapping[str, Tensor],
            *args: Any) -> dict[str, Tensor]:
        """``∇²_params f · v`` (a tree shaped like ``params``)."""


def declares(obj: Any, method: str) -> bool:
    """Whether ``obj`` declares the closed-form ``method`` of :class:`Structured` (a callable attribute).

    Example:
        >>> bl.losses.declares(bl.losses.Logistic(), "hessian"), bl.losses.declares(len, "hvp")
        (True, False)
    """
    return callable(getattr(obj, method, None))


def _param(params: Mapping[str, Tensor], key: str, fn: str) -> Tensor:
    if key not in params:
        raise ShapeError(f"{fn}: expected params to hold {key!r}, got keys {list(params)}. Fix: pass key=... "
                         f"naming the weight tensor.")
    return params[key]


class Logistic:
    """Mean logistic loss ``mean_i BCE(x_iᵀ w, y_i)`` with a closed-form Hessian product.

    ``H v = (1/n) Xᵀ(σ'(Xw) ⊙ Xv)`` through :func:`bilevel.kernels.logistic_hvp` (a fused
    Triton kernel on CUDA). Append a column of ones to ``X`` for an intercept.

    Args:
        key: name of the weight vector ``(d,)`` in ``params``.
        backend: kernel backend, ``"auto"`` | ``"torch"`` | ``"triton"``.

    Call as ``loss(params, hparams, X, y)`` with ``X (n, d)`` and ``y (n,)`` in {0, 1}.

    Shapes: ``params[key] (d,)``, ``X (n, d)``, ``y (n,)``; the loss is 0-dim and :meth:`hvp`
    returns ``{key: (d,)}``.

    Example:
        >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,)).float()
        >>> loss = bl.losses.Logistic()
        >>> p, v = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
        >>> loss(p, {}, X, y)                                   # log 2 at w = 0
        tensor(0.6931)
        >>> hv = loss.hvp(p, {}, v, X, y)["w"]                  # closed form, shape (3,)
        >>> torch.allclose(hv, X.T @ (X @ v["w"]) / 80)         # σ'(0) = 1/4, n = 20
        True
    """

    def __init__(self, key: str = "w", backend: str = "auto") -> None:
        self.key, self.backend = key, backend

    def __call__(self, params: Mapping[str, Tensor], hparams: Any, X: Tensor, y: Tensor) -> Tensor:
        w = _param(params, self.key, "bilevel.losses.Logistic")
        return F.binary_cross_entropy_with_logits(X @ w, y.to(X.dtype))

    def hvp(self, params: Mapping[str, Tensor], hparams: Any, v: Mapping[str, Tensor], X: Tensor,
            y: Optional[Tensor] = None) -> dict[str, Tensor]:
        """``{key: H v}`` (labels do not enter the Hessian)."""
        w = _param(params, self.key, "bilevel.losses.Logistic.hvp")
        return {self.key: logistic_hvp(X, w, v[self.key], backend=self.backend)}

    def hessian(self, params: Mapping[str, Tensor], hparams: Any, X: Tensor,
                y: Optional[Tensor] = None) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
        """``v -> {key: H v}`` with the row curvatures ``σ'(Xw)`` computed once: each product then
        reads ``X`` twice (``Xv`` and ``Xᵀ(·)``), the cost of one gradient."""
        w = _param(params, self.key, "bilevel.losses.Logistic.hessian")
        curv = logistic_curvature(X, w)
        return lambda v: {self.key: logistic_hvp(X, w, v[self.key], curvature=curv, backend=self.backend)}

    def mixed_vjp(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], u: Any,
                  *args: Any) -> dict[str, Tensor]:
        """Zero: the data loss does not depend on hyperparameters."""
        return {k: torch.zeros_like(h) for k, h in hparams.items()}


class LinearCrossEntropy:
    """Mean softmax cross-entropy of a linear map ``X Wᵀ (+ b)`` with a chunked closed-form product.

    ``H v = (1/B) Sᵀ X`` with ``S = P ⊙ U − P · rowsum(P ⊙ U)``, ``U = X Vᵀ`` through
    :func:`bilevel.kernels.linear_ce_hvp`: at most one row chunk of ``B × C`` numbers exists
    at a time. The inner variable is ``W`` only; a bias, if given, is a constant (or append a
    column of ones to ``X`` to learn one inside ``W``).

    Args:
        key: name of the weight ``(C, D)`` in ``params``.
        bias: optional constant ``(C,)`` bias.
        chunk_rows: rows per chunk of the product (default: 2^24 / C).
        backend: kernel backend.

    Call as ``loss(params, hparams, X, y)`` with ``X (B, D)`` and integer labels ``y (B,)``.

    Shapes: ``params[key] (C, D)``, ``X (B, D)``, ``y (B,)`` integer; the loss is 0-dim and
    :meth:`hvp` returns ``{key: (C, D)}``.

    Example:
        >>> X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> loss = bl.losses.LinearCrossEntropy()
        >>> p, v = {"W": torch.randn(3, 4)}, {"W": torch.randn(3, 4)}
        >>> hv = loss.hvp(p, {}, v, X, y)["W"]                  # closed form, chunked
        >>> ref = bl.hvp(lambda q: F.cross_entropy(X @ q["W"].T, y), p, v)["W"]   # autograd
        >>> hv.shape, torch.allclose(hv, ref, atol=1e-5)
        (torch.Size([3, 4]), True)
    """

    def __init__(self, key: str = "W", bias: Optional[Tensor] = None, chunk_rows: Optional[int] = None,
                 backend: str = "auto") -> None:
        self.key, self.bias, self.chunk_rows, self.backend = key, bias, chunk_rows, backend

    def __call__(self, params: Mapping[str, Tensor], hparams: Any, X: Tensor, y: Tensor) -> Tensor:
        W = _param(params, self.key, "bilevel.losses.LinearCrossEntropy")
        logits = X @ W.T if self.bias is None else torch.addmm(self.bias, X, W.T)
        return F.cross_entropy(logits, y)

    def hvp(self, params: Mapping[str, Tensor], hparams: Any, v: Mapping[str, Tensor], X: Tensor,
            y: Optional[Tensor] = None) -> dict[str, Tensor]:
        """``{key: H v}`` (labels do not enter the Hessian)."""
        W = _param(params, self.key, "bilevel.losses.LinearCrossEntropy.hvp")
        return {self.key: linear_ce_hvp(X, W, v[self.key], bias=self.bias, chunk_rows=self.chunk_rows,
                                        backend=self.backend)}

    def mixed_vjp(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], u: Any,
                  *args: Any) -> dict[str, Tensor]:
        """Zero: the data loss does not depend on hyperparameters."""
        return {k: torch.zeros_like(h) for k, h in hparams.items()}
