"""Hyperparameter helpers: weight decay trees, constrained parameterizations, example weights.

Hyperparameters that must stay in a domain are optimized through an
unconstrained *raw* tensor (DESIGN.md §4): a decay ``e^raw`` or
``softplus(raw)`` is positive whatever the outer optimizer does, a probability
``sigmoid(raw)`` stays in (0, 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import ShapeError
from .kernels import decay_mixed

__all__ = [
    "positive",
    "inverse_positive",
    "probability",
    "inverse_probability",
    "WeightDecay",
    "weight_decay",
    "example_weights",
    "normalized_weights",
    "weighted_mean",
]

POSITIVE = ("exp", "softplus")
PER = ("parameter", "tensor", "model")


def positive(raw: Tensor, kind: str = "exp") -> Tensor:
    """Map an unconstrained tensor to positive values: ``exp(raw)`` or ``softplus(raw)``.

    Shapes: elementwise; returns ``raw``'s shape.

    Example:
        >>> bl.hparams.positive(torch.tensor([0.0]), "softplus")
        tensor([0.6931])
    """
    if kind == "exp":
        return raw.exp()
    if kind == "softplus":
        return F.softplus(raw)
    raise ValueError(f"bilevel.hparams.positive: expected kind in {POSITIVE}, got {kind!r}.")


def inverse_positive(value: Union[float, Tensor], kind: str = "exp") -> Tensor:
    """Inverse of :func:`positive`: the raw tensor that maps to ``value`` (> 0).

    Shapes: elementwise; returns ``value``'s shape (0-dim for a number).

    Example:
        >>> raw = bl.hparams.inverse_positive(torch.tensor([0.5, 2.0]), "softplus")
        >>> torch.allclose(bl.hparams.positive(raw, "softplus"), torch.tensor([0.5, 2.0]))
        True
    """
    v = torch.as_tensor(value, dtype=torch.get_default_dtype()) if not isinstance(value, Tensor) else value
    if not bool((v > 0).all()):
        raise ValueError(f"bilevel.hparams.inverse_positive: expected values > 0, got min {float(v.min())}. "
                         f"Fix: a decay or scale must be strictly positive.")
    if kind == "exp":
        return v.log()
    if kind == "softplus":
        return v + torch.log(-torch.expm1(-v))          # log(e^v − 1), stable
    raise ValueError(f"bilevel.hparams.inverse_positive: expected kind in {POSITIVE}, got {kind!r}.")


def probability(raw: Tensor) -> Tensor:
    """``sigmoid(raw)``: a hyperparameter in (0, 1) (dropout rate, mixing weight...).

    Shapes: elementwise; returns ``raw``'s shape.

    Example:
        >>> bl.hparams.probability(torch.tensor([0.0, 100.0]))
        tensor([0.5000, 1.0000])
    """
    return torch.sigmoid(raw)


def inverse_probability(p: Union[float, Tensor]) -> Tensor:
    """``logit(p)``, the raw tensor mapping to ``p`` in (0, 1).

    Shapes: elementwise; returns ``p``'s shape (0-dim for a number).

    Example:
        >>> raw = bl.hparams.inverse_probability(0.1)               # a dropout rate of 10%
        >>> raw.shape, torch.allclose(bl.hparams.probability(raw), torch.tensor(0.1))
        (torch.Size([]), True)
    """
    v = torch.as_tensor(p, dtype=torch.get_default_dtype()) if not isinstance(p, Tensor) else p
    if not bool(((v > 0) & (v < 1)).all()):
        raise ValueError("bilevel.hparams.inverse_probability: expected values in (0, 1).")
    return torch.logit(v)


@dataclass(frozen=True)
class WeightDecay:
    """An L2 penalty ``½ Σ_k decay_k ⊙ w_k²`` whose decays are hyperparameters.

    Built by :func:`weight_decay`; ``penalty(params_or_model, hparams)`` evaluates it
    (under ``torch.func.functional_call`` a module's ``named_parameters()`` are the
    swapped-in tensors, so passing the model works inside ``inner_loss``).

    Attributes:
        keys: ``{param name: hparams key}`` for every decayed parameter.
        per: ``"parameter"`` (one decay per weight), ``"tensor"`` or ``"model"``.
        kind: ``"exp"`` or ``"softplus"`` (decay = positive(raw)).

    Shapes: with ``per="parameter"`` each raw decay has its parameter's shape, with ``"tensor"``
    or ``"model"`` it is 0-dim; the penalty is 0-dim; :meth:`hessian_diag` returns a tree shaped
    like the params, :meth:`mixed_closed_form` one shaped like ``hparams``.

    Example:
        >>> hp, penalty = bl.hparams.weight_decay({"w": torch.ones(3)}, init=0.5, per="tensor")
        >>> penalty({"w": torch.ones(3)}, hp)                       # ½ · 0.5 · Σ 1²
        tensor(0.7500, grad_fn=<MulBackward0>)
        >>> penalty.hessian_diag({"w": torch.ones(3)}, hp)["w"]
        tensor([0.5000, 0.5000, 0.5000], grad_fn=<ExpandBackward0>)
    """

    keys: Mapping[str, str]
    per: str
    kind: str

    def decays(self, hparams: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The positive decay of every decayed parameter (broadcastable to its shape)."""
        return {name: positive(hparams[key], self.kind) for name, key in self.keys.items()}

    def __call__(self, params: Union[nn.Module, Mapping[str, Tensor]], hparams: Mapping[str, Tensor]) -> Tensor:
        p = dict(params.named_parameters()) if isinstance(params, nn.Module) else params
        missing = [n for n in self.keys if n not in p]
        if missing:
            raise ShapeError(f"bilevel.hparams.WeightDecay: expected parameters {missing[:3]} (of the tree "
                             f"the decays were built from), got a tree without them. Fix: pass the same model.")
        terms = [(positive(hparams[key], self.kind) * p[name].square()).sum() for name, key in self.keys.items()]
        return 0.5 * torch.stack(terms).sum()

    def hessian_diag(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``∂²penalty/∂w²``: the decay of each weight, ``{param name: Tensor like params[name]}``.

        Lets the curvature operators apply the penalty's Hessian as ``decay ⊙ v``
        (``penalty=`` of :func:`bilevel.implicit_hypergrad`).
        """
        return {name: positive(hparams[key], self.kind).expand_as(params[name]) for name, key in self.keys.items()}

    def gradient(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``∇_w penalty = decay ⊙ w`` in closed form, ``{param name: Tensor like params[name]}``: one
        weight-sized tensor per parameter and no autograd graph (the double of it, ``e^raw`` and ``w²``
        kept for a backward pass, would be alive at once otherwise).

        Example:
            >>> hp, penalty = bl.hparams.weight_decay({"w": torch.ones(2)}, init=0.5)
            >>> penalty.gradient({"w": torch.tensor([1., 2.])}, hp)["w"]
            tensor([0.5000, 1.0000])
        """
        out = {}
        with torch.no_grad():
            for name, key in self.keys.items():
                d, w = positive(hparams[key], self.kind), params[name]
                out[name] = d.mul_(w) if d.shape == w.shape else d * w       # `d` is a fresh tensor
        return out

    def hvp(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor],
            v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``∇²_w penalty · v = decay ⊙ v`` (the :class:`bilevel.losses.Structured` product)."""
        return {name: d * v[name] for name, d in self.hessian_diag(params, hparams).items()}

    def mixed_vjp(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor],
                  u: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``∇_hparams <∇_w penalty, u>`` in closed form: ``decay'(raw) ⊙ w ⊙ u`` (summed per hparam).

        For ``kind="exp"`` this is ``e^raw ⊙ w ⊙ u`` (DESIGN.md §3), one pass, no autograd.
        """
        out: dict[str, Tensor] = {}
        for name, key in self.keys.items():
            raw = hparams[key]
            g = decay_mixed(raw, params[name], u[name], self.kind)     # one fused pass on CUDA
            if g.shape != raw.shape:
                g = g.sum() if raw.numel() == 1 else g
                g = g.reshape(raw.shape)
            out[key] = out[key] + g if key in out else g
        return out

    #: the former name of :meth:`mixed_vjp`
    mixed_closed_form = mixed_vjp


def weight_decay(
    model: Union[nn.Module, Mapping[str, Tensor]],
    *,
    init: float = 1e-4,
    per: str = "parameter",
    kind: str = "exp",
    exclude: Sequence[str] = (),
    prefix: str = "weight_decay",
    requires_grad: bool = True,
) -> tuple[dict[str, Tensor], WeightDecay]:
    """Weight decays as hyperparameters: the hparams tree and the penalty using it.

    Args:
        model: an ``nn.Module`` or a params tree.
        init: initial decay (> 0); the raw hyperparameters start at ``inverse_positive(init)``.
        per: ``"parameter"``: one decay per weight (as many hyperparameters as weights, millions
            for a large model); ``"tensor"``: one per parameter tensor; ``"model"``: one in all.
        kind: ``"exp"`` (decay = e^raw) or ``"softplus"``.
        exclude: substrings of parameter names left undecayed (e.g. ``("bias", "norm")``).
        prefix: hparams keys are ``f"{prefix}/{param name}"`` (or ``prefix`` for ``per="model"``).
        requires_grad: make the raw tensors leaves that require grad.

    Returns:
        ``(hparams, penalty)``: ``hparams`` a tree of raw tensors (same device/dtype as the
        parameters), ``penalty`` a :class:`WeightDecay` to add to the inner loss.

    Shapes: ``per="parameter"``: ``hparams[f"{prefix}/{name}"]`` has the shape of parameter
    ``name``; ``"tensor"``: 0-dim per parameter; ``"model"``: one 0-dim tensor. ``penalty(...)``
    returns a 0-dim tensor.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> hp, penalty = bl.hparams.weight_decay(model, init=1e-3, per="parameter")
        >>> {k: tuple(v.shape) for k, v in hp.items()}
        {'weight_decay/weight': (2, 3), 'weight_decay/bias': (2,)}
        >>> inner_loss = lambda m, h, b: F.cross_entropy(m(b[0]), b[1]) + penalty(m, h)
        >>> inner_loss(model, hp, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))).shape
        torch.Size([])
    """
    fn = "bilevel.hparams.weight_decay"
    if per not in PER:
        raise ValueError(f"{fn}: expected per in {PER}, got {per!r}.")
    if kind not in POSITIVE:
        raise ValueError(f"{fn}: expected kind in {POSITIVE}, got {kind!r}.")
    if not (isinstance(init, (int, float)) and init > 0 and math.isfinite(init)):
        raise ValueError(f"Invalid init for {fn}: {init!r} (expected a finite decay > 0).")
    named = dict(model.named_parameters()) if isinstance(model, nn.Module) else dict(model)
    named = {k: v for k, v in named.items() if not any(s in k for s in exclude)}
    if not named:
        raise ShapeError(f"{fn}: expected at least one parameter to decay, got none (exclude={tuple(exclude)}).")
    raw0 = float(inverse_positive(torch.tensor(float(init), dtype=torch.float64), kind))
    hparams: dict[str, Tensor] = {}
    keys: dict[str, str] = {}
    first = next(iter(named.values()))
    for name, p in named.items():
        if per == "model":
            key = prefix
            if key not in hparams:
                hparams[key] = torch.full((), raw0, dtype=first.dtype, device=first.device)
        else:
            key = f"{prefix}/{name}"
            shape = p.shape if per == "parameter" else ()
            hparams[key] = torch.full(shape, raw0, dtype=p.dtype, device=p.device)
        keys[name] = key
    if requires_grad:
        for v in hparams.values():
            v.requires_grad_(True)
    return hparams, WeightDecay(keys, per, kind)


def example_weights(n: int, *, key: str = "example_logits", dtype: Optional[torch.dtype] = None,
                    device: Optional[torch.device] = None, requires_grad: bool = True) -> dict[str, Tensor]:
    """One raw weight per training example (zeros: uniform weights), for data reweighting.

    Use with :func:`weighted_mean` in the inner loss; index the logits with the batch's
    example indices.

    Shapes: ``{key: (n,)}``, zeros.

    Example:
        >>> hp = bl.hparams.example_weights(100)                    # 100 training examples
        >>> model, x, y, idx = nn.Linear(3, 2), torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), torch.arange(4)
        >>> inner = lambda m, h, b: bl.hparams.weighted_mean(F.cross_entropy(m(b[0]), b[1], reduction="none"),
        ...                                                  h["example_logits"][b[2]])
        >>> hp["example_logits"].shape, inner(model, hp, (x, y, idx)).shape
        (torch.Size([100]), torch.Size([]))
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"Invalid n for bilevel.hparams.example_weights: {n!r} (expected an int >= 1).")
    t = torch.zeros(n, dtype=dtype or torch.get_default_dtype(), device=device)
    return {key: t.requires_grad_(requires_grad)}


def normalized_weights(logits: Tensor, kind: str = "softmax") -> Tensor:
    """Per-example weights of a batch with mean 1 (so the loss scale cannot be gamed).

    ``"softmax"``: ``B·softmax(logits)``; ``"sigmoid"``: ``σ(l_i)/mean(σ(l))``.
    Without normalization the outer problem is trivially solved by scaling (DESIGN.md §4).

    Shapes: ``logits (B,)``; returns ``(B,)``.

    Example:
        >>> bl.hparams.normalized_weights(torch.zeros(4))           # uniform
        tensor([1., 1., 1., 1.])
        >>> bl.hparams.normalized_weights(torch.tensor([0.0, 100.0]), "sigmoid")
        tensor([0.6667, 1.3333])
    """
    if logits.dim() != 1:
        raise ShapeError(f"bilevel.hparams.normalized_weights: expected a 1-D batch of logits, got shape "
                         f"{tuple(logits.shape)}.")
    if kind == "softmax":
        return logits.shape[0] * torch.softmax(logits, 0)
    if kind == "sigmoid":
        s = torch.sigmoid(logits)
        return s / s.mean()
    raise ValueError(f"bilevel.hparams.normalized_weights: expected kind 'softmax' or 'sigmoid', got {kind!r}.")


def weighted_mean(losses: Tensor, logits: Tensor, kind: str = "softmax") -> Tensor:
    """``mean_i w_i ℓ_i`` with ``w = normalized_weights(logits)``; ``losses`` of shape ``(B,)``.

    Shapes: ``losses (B,)`` and ``logits (B,)``; returns a 0-dim tensor.

    Example:
        >>> losses = torch.tensor([1.0, 3.0])
        >>> bl.hparams.weighted_mean(losses, torch.zeros(2))        # uniform weights: the plain mean
        tensor(2.)
    """
    if losses.shape != logits.shape:
        raise ShapeError(f"bilevel.hparams.weighted_mean: expected per-example losses of shape "
                         f"{tuple(logits.shape)} (like the logits), got {tuple(losses.shape)}. "
                         f"Fix: use reduction='none' in the loss.")
    return (normalized_weights(logits, kind) * losses).mean()

