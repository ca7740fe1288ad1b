"""Hyperparameter helpers: weight decay trees, constrained parameterizations, example weights.

Hyperparameters that must stay in a domain are optimized through an
unconstrained *raw* tensor (DESIGN.md §4): a decay ``e^raw`` or
``softplus(raw)`` is positive whatever the outer optimizer does, a probability
``sigmoid(raw)`` stays in (0, 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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
    "shared_groups",
    "example_weights",
    "normalized_weights",
    "weighted_mean",
]

POSITIVE = ("exp", "softplus")
PER = ("parameter", "tensor", "model")
#: how :func:`shared_groups` groups parameters under one shared global log-decay
SHARED_BY = ("model", "module", "tensor")


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
        keys: ``{param name: hparams key}`` for every decayed parameter (its raw decay, or with
            ``shared`` its offset ``δ``).
        per: ``"parameter"`` (one decay per weight), ``"tensor"`` or ``"model"``.
        kind: ``"exp"`` or ``"softplus"`` (decay = positive(raw)).
        shared: ``{param name: hparams key}`` of the shared global raw decay ``g`` each decayed
            parameter adds to its offset (a hierarchical parameterization: ``raw = g + δ``, so
            for ``kind="exp"`` ``log decay_i = g + δ_i``); empty: no shared term.

    Shapes: with ``per="parameter"`` each raw decay has its parameter's shape, with ``"tensor"``
    or ``"model"`` it is 0-dim; a shared global is 0-dim; the penalty is 0-dim;
    :meth:`hessian_diag` returns a tree shaped like the params, :meth:`mixed_vjp` one shaped
    like ``hparams``.

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
    shared: Mapping[str, str] = field(default_factory=dict)

    #: the penalty is exactly ``½ Σ hessian_diag ⊙ w²``: its gradient is ``hessian_diag ⊙ w``, so the
    #: curvature operators (``penalty=``) take its value, gradient and Hessian from one evaluation of
    #: the decays, and pass those decays back to :meth:`mixed_vjp`
    quadratic = True

    def hparams_read(self) -> set[str]:
        """The hparams keys the penalty reads: its decays (or offsets) and shared globals.

        Example:
            >>> hp, penalty = bl.hparams.weight_decay({"w": torch.ones(2)}, init=0.5, per="tensor")
            >>> penalty.hparams_read() == set(hp)
            True
        """
        return set(self.keys.values()) | set(self.shared.values())

    @property
    def decay_keys(self) -> list[str]:
        """The hparams keys whose raw tensor alone stands for a decay (``positive(raw)``): every key
        of ``keys`` without a shared term. Offsets and shared globals are log-scale terms, not decays."""
        return list(dict.fromkeys(key for name, key in self.keys.items() if name not in self.shared))

    def raw(self, hparams: Mapping[str, Tensor], name: str) -> Tensor:
        """The raw decay of parameter ``name``: ``hparams[keys[name]]``, plus its shared global if any
        (broadcastable to the parameter's shape)."""
        r = hparams[self.keys[name]]
        return r + hparams[self.shared[name]] if name in self.shared else r

    def decays(self, hparams: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The positive decay of every decayed parameter (broadcastable to its shape)."""
        return {name: positive(self.raw(hparams, name), self.kind) for name in self.keys}

    def __call__(self, params: Union[nn.Module, Mapping[str, Tensor]], hparams: Mapping[str, Tensor]) -> Tensor:
        p = dict(params.named_parameters()) if isinstance(params, nn.Module) else params
        missing = [n for n in self.keys if n not in p]
        if missing:
            raise ShapeError(f"bilevel.hparams.WeightDecay: expected parameters {missing[:3]} (of the tree "
                             f"the decays were built from), got a tree without them. Fix: pass the same model.")
        terms = [(positive(self.raw(hparams, name), self.kind) * p[name].square()).sum() for name in self.keys]
        return 0.5 * torch.stack(terms).sum()

    def hessian_diag(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``∂²penalty/∂w²``: the decay of each weight, ``{param name: Tensor like params[name]}``.

        Lets the curvature operators apply the penalty's Hessian as ``decay ⊙ v``
        (``penalty=`` of :func:`bilevel.implicit_hypergrad`).
        """
        return {name: positive(self.raw(hparams, name), self.kind).expand_as(params[name]) for name in self.keys}

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
            for name in self.keys:
                d, w = positive(self.raw(hparams, name), self.kind), params[name]
                out[name] = d.mul_(w) if d.shape == w.shape else d * w       # `d` is a fresh tensor
        return out

    def hvp(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor],
            v: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``∇²_w penalty · v = decay ⊙ v`` (the :class:`bilevel.losses.Structured` product)."""
        return {name: d * v[name] for name, d in self.hessian_diag(params, hparams).items()}

    def mixed_vjp(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor],
                  u: Mapping[str, Tensor], *, decays: Optional[Mapping[str, Tensor]] = None) -> dict[str, Tensor]:
        """``∇_hparams <∇_w penalty, u>`` in closed form: ``decay'(raw) ⊙ w ⊙ u`` (summed per hparam).

        For ``kind="exp"`` this is ``e^raw ⊙ w ⊙ u`` (DESIGN.md §3), one pass, no autograd. A shared
        global ``g`` gets the sum of its parameters' terms (``∂raw_i/∂g = 1``). ``decays``: the decays
        already evaluated at these hparams (``{param name: decay}``, broadcastable to the weight, as
        :meth:`hessian_diag` returns them); for ``kind="exp"`` ``decay' = decay``, so on CPU they are
        reused instead of evaluating ``e^raw`` again (on a GPU the fused kernel recomputes it in registers).
        """
        out: dict[str, Tensor] = {}

        def add(key: str, g: Tensor) -> None:
            out[key] = out[key] + g if key in out else g

        for name, key in self.keys.items():
            own, w = hparams[key], params[name]
            d = decays.get(name) if decays is not None and self.kind == "exp" and not w.is_cuda else None
            if d is not None:
                g = (d * w).mul_(u[name])                   # decay' = decay for exp: no second e^raw
            else:
                g = decay_mixed(self.raw(hparams, name), w, u[name], self.kind)   # one fused pass on CUDA
            if name in self.shared:
                add(self.shared[name], g.sum().reshape(hparams[self.shared[name]].shape))
            if g.shape != own.shape:
                g = g.sum() if own.numel() == 1 else g
                g = g.reshape(own.shape)
            add(key, g)
        return out

    #: the former name of :meth:`mixed_vjp`
    mixed_closed_form = mixed_vjp


def shared_groups(model: Union[nn.Module, Mapping[str, Tensor]], *, by: str = "model",
                  exclude: Sequence[str] = ()) -> dict[str, str]:
    """Which shared global log-decay each parameter adds to its own (``shared=`` of :func:`weight_decay`).

    Args:
        model: an ``nn.Module`` or a params tree.
        by: ``"model"``: one group for all parameters (group name ``""``); ``"module"``: one per
            module (the name up to the last dot, e.g. ``"0"`` for ``"0.weight"``); ``"tensor"``: one
            per parameter tensor (its own name).
        exclude: substrings of parameter names left out (as in :func:`weight_decay`).

    Returns:
        ``{param name: group name}``.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> bl.hparams.shared_groups(model, by="module", exclude=("bias",))
        {'0.weight': '0', '2.weight': '2'}
        >>> hp, pen = bl.hparams.weight_decay(model, exclude=("bias",), shared=bl.hparams.shared_groups(model, by="module"))
        >>> sorted(hp)
        ['weight_decay/0.weight', 'weight_decay/2.weight', 'weight_decay/global/0', 'weight_decay/global/2']
    """
    if by not in SHARED_BY:
        raise ValueError(f"bilevel.hparams.shared_groups: expected by in {SHARED_BY}, got {by!r}.")
    named = dict(model.named_parameters()) if isinstance(model, nn.Module) else dict(model)
    out: dict[str, str] = {}
    for name in named:
        if any(s in name for s in exclude):
            continue
        if by == "tensor":
            out[name] = name
        else:
            out[name] = name.rsplit(".", 1)[0] if by == "module" and "." in name else ""
    return out


def weight_decay(
    model: Union[nn.Module, Mapping[str, Tensor]],
    *,
    init: float = 1e-4,
    per: str = "parameter",
    kind: str = "exp",
    exclude: Sequence[str] = (),
    prefix: str = "weight_decay",
    requires_grad: bool = True,
    shared: Union[bool, str, Mapping[str, str]] = False,
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
        shared: a hierarchical parameterization ``raw_i = g + δ_i``: a shared global raw decay
            ``g`` (for ``kind="exp"`` a global log-decay) learned together with the offsets ``δ_i``.
            ``g`` starts at ``inverse_positive(init)`` and every ``δ_i`` at 0, so the initial
            penalty is that of ``shared=False``. ``True`` (or ``"model"``): one ``g`` for all decayed
            parameters, key ``f"{prefix}/global"``; ``"module"`` or ``"tensor"``: one per module or
            per parameter tensor (:func:`shared_groups`); or a mapping ``{param name: group name}``
            covering every decayed parameter, one ``g`` per group, key ``f"{prefix}/global/{group}"``
            (``f"{prefix}/global"`` for the group ``""``). With Adam on the raw tensors, ``g``
            moves all decays of its group together at the outer learning rate, however small each
            weight's own gradient is. Needs ``per="parameter"`` or ``"tensor"``.

    Returns:
        ``(hparams, penalty)``: ``hparams`` a tree of raw tensors (same device/dtype as the
        parameters), ``penalty`` a :class:`WeightDecay` to add to the inner loss.

    Shapes: ``per="parameter"``: ``hparams[f"{prefix}/{name}"]`` has the shape of parameter
    ``name``; ``"tensor"``: 0-dim per parameter; ``"model"``: one 0-dim tensor; each shared
    global is 0-dim. ``penalty(...)`` returns a 0-dim tensor.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> hp, penalty = bl.hparams.weight_decay(model, init=1e-3, per="parameter")
        >>> {k: tuple(v.shape) for k, v in hp.items()}
        {'weight_decay/weight': (2, 3), 'weight_decay/bias': (2,)}
        >>> inner_loss = lambda m, h, b: F.cross_entropy(m(b[0]), b[1]) + penalty(m, h)
        >>> inner_loss(model, hp, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))).shape
        torch.Size([])
        >>> hp, penalty = bl.hparams.weight_decay(model, init=1e-3, shared=True)   # log λ_i = g + δ_i
        >>> {k: tuple(v.shape) for k, v in hp.items()}
        {'weight_decay/weight': (2, 3), 'weight_decay/bias': (2,), 'weight_decay/global': ()}
        >>> round(float(penalty.decays(hp)["weight"][0, 0]), 6)                  # e^(g + 0)
        0.001
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
    groups = _shared_map(shared, named, per, fn)
    global_keys: dict[str, str] = {}
    if groups:
        for name in named:
            hparams[keys[name]].zero_()                    # offsets δ_i = 0: raw_i = g at the start
            group = groups[name]
            gkey = f"{prefix}/global" if group == "" else f"{prefix}/global/{group}"
            if gkey in hparams and gkey not in global_keys.values():
                raise ValueError(f"{fn}: the shared global key {gkey!r} is also a parameter's key. "
                                 f"Fix: rename the group or pass another prefix.")
            if gkey not in hparams:
                p = named[name]
                hparams[gkey] = torch.full((), raw0, dtype=p.dtype, device=p.device)
            global_keys[name] = gkey
    if requires_grad:
        for v in hparams.values():
            v.requires_grad_(True)
    return hparams, WeightDecay(keys, per, kind, global_keys)


def _shared_map(shared: Union[bool, str, Mapping[str, str]], named: Mapping[str, Tensor], per: str,
                fn: str) -> dict[str, str]:
    """``{param name: group name}`` for ``shared=`` of :func:`weight_decay` (empty: no shared term)."""
    if shared is False or shared is None:
        return {}
    if per == "model":
        raise ValueError(f"{fn}: shared={shared!r} needs per='parameter' or 'tensor', got per='model' "
                         f"(one decay in all already). Fix: pass per='parameter' or shared=False.")
    if shared is True:
        shared = "model"
    if isinstance(shared, str):
        if shared not in SHARED_BY:
            raise ValueError(f"{fn}: expected shared True, False, one of {SHARED_BY} or a mapping "
                             f"{{param name: group}}, got {shared!r}.")
        return {name: g for name, g in shared_groups(named, by=shared).items() if name in named}
    if not isinstance(shared, Mapping):
        raise TypeError(f"{fn}: expected shared True, False, one of {SHARED_BY} or a mapping "
                        f"{{param name: group}}, got {type(shared).__name__}.")
    missing = [n for n in named if n not in shared]
    if missing:
        raise ValueError(f"{fn}: expected shared to give a group for every decayed parameter, got none for "
                         f"{missing[:3]}. Fix: build it with bl.hparams.shared_groups(model, exclude=...) "
                         f"with the same exclude.")
    bad = [g for g in shared.values() if not isinstance(g, str)]
    if bad:
        raise TypeError(f"{fn}: expected shared's group names to be strings, got {bad[0]!r}.")
    return {n: shared[n] for n in named}


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

