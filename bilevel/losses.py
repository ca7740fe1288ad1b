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

Output losses (:class:`OutputLoss`, :func:`cross_entropy`, :func:`mse`) are the other kind: a loss of
a network's *output*, ``ℓ(z, *args)``, with its Hessian in ``z`` (closed form or autograd). Written
as the last call of an inner loss, they tell ``hvp_mode="gauss_newton"`` where the network ends and
the loss begins (the generalized Gauss-Newton ``Jᵀ H_ℓ J``).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._errors import ShapeError
from .kernels import linear_ce_hvp, logistic_curvature, logistic_hvp

__all__ = ["Structured", "declares", "Logistic", "LinearCrossEntropy", "OutputLoss", "cross_entropy", "mse"]


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


# -- output losses: the seam of the generalized Gauss-Newton curvature --------------------------------
class _Record(NamedTuple):
    loss: "OutputLoss"
    output: Tensor
    args: tuple
    kwargs: dict
    value: Tensor


#: the output losses called while ``OutputLoss.record()`` is active (``None``: not recording)
_RECORDS: ContextVar[Optional[list[_Record]]] = ContextVar("bilevel_output_losses", default=None)


class OutputLoss:
    """A loss of a network's output, ``fn(output, *args, **kwargs) -> scalar``, that marks the output.

    Called, it returns ``fn(output, ...)`` unchanged. Written as the value an inner loss returns,
    it tells ``hvp_mode="gauss_newton"`` where the network ends: the operator evaluates the inner
    loss once, finds the output ``z`` and this loss, and multiplies by ``Jᵀ H_ℓ J`` (``J = ∂z/∂params``,
    ``H_ℓ = ∂²ℓ/∂z²``). ``fn`` should be convex in ``output`` (then ``H_ℓ`` and the curvature are
    positive semi-definite); only the first argument is the output, the others (targets, weights) are
    held constant in ``H_ℓ``.

    Args:
        fn: the loss of the output.
        output_hessian: optional closed form, ``output_hessian(output, *args, **kwargs)`` returning
            ``u -> H_ℓ u`` (``u`` shaped like ``output``) with the point's work done once, or ``None``
            where it does not apply; autograd's double backward on the small output graph otherwise.

    Shapes: ``output`` of any shape ``(B, ...)``; the value is 0-dim; ``H_ℓ u`` is shaped like ``output``.

    Example:
        >>> huber = bl.losses.OutputLoss(F.smooth_l1_loss)          # H_ℓ by autograd
        >>> z, y = torch.tensor([0.2, 3.0]), torch.zeros(2)
        >>> huber(z, y)                                            # the loss itself
        tensor(1.2600)
        >>> f = lambda p, x, y: huber(x @ p["w"], y)                # a linear model: GGN = H
        >>> x = torch.randn(5, 3)
        >>> p, v = {"w": 0.1 * torch.ones(3)}, {"w": torch.ones(3)}
        >>> torch.allclose(bl.hvp(f, p, v, x, torch.zeros(5), mode="gauss_newton")["w"],
        ...                bl.hvp(f, p, v, x, torch.zeros(5))["w"])
        True
    """

    def __init__(self, fn: Callable[..., Tensor], *,
                 output_hessian: Optional[Callable[..., Optional[Callable[[Tensor], Tensor]]]] = None) -> None:
        if not callable(fn):
            raise TypeError(f"bilevel.losses.OutputLoss: expected `fn` to be a callable fn(output, *args) -> scalar, "
                            f"got {type(fn).__name__}.")
        self.fn, self._output_hessian = fn, output_hessian

    def __call__(self, output: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``fn(output, *args, **kwargs)``; recorded when :meth:`record` is active."""
        value = self.fn(output, *args, **kwargs)
        records = _RECORDS.get()
        if records is not None:
            records.append(_Record(self, output, args, kwargs, value))
        return value

    def output_hessian(self, output: Tensor, *args: Any, **kwargs: Any) -> Optional[Callable[[Tensor], Tensor]]:
        """``u -> H_ℓ u`` at ``output`` in closed form, or ``None`` (then autograd is used)."""
        if self._output_hessian is None:
            return None
        return self._output_hessian(output.detach(), *args, **kwargs)

    @staticmethod
    @contextlib.contextmanager
    def record() -> Iterator[list]:
        """Context in which every call of an output loss is recorded, in order, into the yielded list
        (entries with ``.loss``, ``.output``, ``.args``, ``.kwargs``, ``.value``).

        Example:
            >>> with bl.losses.OutputLoss.record() as calls:
            ...     _ = bl.losses.mse(torch.ones(3), torch.zeros(3))
            >>> len(calls), calls[0].value
            (1, tensor(1.))
        """
        token = _RECORDS.set([])
        try:
            yield _RECORDS.get()  # type: ignore[misc]
        finally:
            _RECORDS.reset(token)


def _ce_output_hessian(logits: Tensor, target: Tensor, weight: Optional[Tensor] = None, *, ignore_index: int = -100,
                       reduction: str = "mean", label_smoothing: float = 0.0) -> Optional[Callable[[Tensor], Tensor]]:
    """Per row ``r_i (diag(p_i) − p_i p_iᵀ) u_i`` without forming the ``C × C`` blocks; ``r_i`` is 1/B
    (mean over the rows not ignored) or 1 (sum). Label smoothing does not change the Hessian (the loss
    is linear in the targets, whose rows sum to 1). Class weights and probability targets: autograd."""
    if weight is not None or logits.dim() != 2 or target.is_floating_point() or reduction not in ("mean", "sum"):
        return None
    p = torch.softmax(logits, dim=1)
    keep = (target != ignore_index).to(p.dtype)
    row = (keep / keep.sum() if reduction == "mean" else keep).unsqueeze(1)

    def hv(u: Tensor) -> Tensor:
        pu = p * u
        return row * (pu - p * pu.sum(1, keepdim=True))

    return hv


def _mse_output_hessian(output: Tensor, target: Tensor, *,
                        reduction: str = "mean") -> Optional[Callable[[Tensor], Tensor]]:
    """``2/N I`` (mean over the ``N`` entries) or ``2 I`` (sum); broadcasting targets: autograd."""
    if output.shape != target.shape or reduction not in ("mean", "sum"):
        return None
    scale = 2.0 / output.numel() if reduction == "mean" else 2.0
    return lambda u: scale * u


_CROSS_ENTROPY = OutputLoss(F.cross_entropy, output_hessian=_ce_output_hessian)
_MSE = OutputLoss(F.mse_loss, output_hessian=_mse_output_hessian)


def cross_entropy(logits: Tensor, target: Tensor, weight: Optional[Tensor] = None, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy`` as an :class:`OutputLoss`: the same value, and a closed-form output Hessian.

    ``H_ℓ u = (P ⊙ U − P · rowsum(P ⊙ U)) / B`` with ``P = softmax(logits)`` (``B`` the rows not
    ignored; no division for ``reduction="sum"``), so a Gauss-Newton product never forms a ``C × C``
    block. Class ``weight`` and probability targets take ``H_ℓ`` by autograd.

    Shapes: ``logits (B, C)``, ``target (B,)`` integer (or as ``F.cross_entropy`` accepts); 0-dim value.

    Example:
        >>> logits, y = torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])
        >>> bl.losses.cross_entropy(logits, y)                     # log 3
        tensor(1.0986)
        >>> model = nn.Linear(5, 3)
        >>> inner = lambda m, h, b: bl.losses.cross_entropy(m(b[0]), b[1])   # a HyperOptimizer inner loss
    """
    return _CROSS_ENTROPY(logits, target, weight, ignore_index=ignore_index, reduction=reduction,
                          label_smoothing=label_smoothing)


def mse(output: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """``F.mse_loss`` as an :class:`OutputLoss`: the same value, and the output Hessian ``2/N · I``
    (``N = output.numel()``; ``2 I`` for ``reduction="sum"``).

    Shapes: ``output`` and ``target`` of one shape; 0-dim value.

    Example:
        >>> bl.losses.mse(torch.tensor([1.0, 3.0]), torch.zeros(2))
        tensor(5.)
    """
    return _MSE(output, target, reduction=reduction)
