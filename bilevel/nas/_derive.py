"""Derivation of a discrete architecture from a searched supernet.

Two steps, as DARTS: choose an operation for every edge (a *rule*), then, in every module that
declares a node topology (``node_edges()``, as :class:`bilevel.nas.Cell`), keep only the
``edges_per_node`` strongest incoming edges of each node. Rules are small objects
``rule(model, edges, exclude) -> {edge: (operation, strength)}``; two are provided:
:class:`Argmax` (DARTS: the largest weight) and :class:`Perturbation` (DARTS-PT, Wang et al.
2021: the operation whose removal hurts the supernet's validation score the most).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ._mixed import MixedOp, check_model, mixed_ops
from ._ops import PARAMETER_FREE

__all__ = ["derive", "Argmax", "Perturbation", "parameter_free_edges"]

Choice = dict[str, tuple[str, float]]


def _candidates(m: MixedOp, exclude: Sequence[str], fn: str, edge: str) -> list[int]:
    idx = [i for i, n in enumerate(m.names) if n not in exclude]
    if not idx:
        raise ValueError(f"{fn}: every candidate of edge {edge!r} ({list(m.names)}) is excluded by "
                         f"exclude={tuple(exclude)}; nothing to choose. Fix: exclude fewer operations.")
    return idx


@dataclass(frozen=True)
class Argmax:
    """DARTS's rule: on each edge the candidate of largest weight ``w_i(α)`` (excluded names aside);
    the edge's strength is that weight.

    Example:
        >>> op = bl.nas.MixedOp({"none": bl.nas.Zero(), "skip": nn.Identity(), "lin": nn.Linear(4, 4)},
        ...                     alpha=nn.Parameter(torch.tensor([0.0, 0.0, 1.0])))
        >>> net = nn.Sequential(op, nn.Linear(4, 2))                 # a toy supernet with one mixed edge
        >>> bl.nas.Argmax()(net, bl.nas.mixed_ops(net), ("none",))   # softmax([0, 0, 1])[2]
        {'0': ('lin', 0.576...)}
    """

    def __call__(self, model: nn.Module, edges: Mapping[str, MixedOp], exclude: Sequence[str]) -> Choice:
        out: Choice = {}
        with torch.no_grad():
            for e, m in edges.items():
                idx = _candidates(m, exclude, "bilevel.nas.Argmax", e)
                w = m.expected_weights().detach()
                best = max(idx, key=lambda i: float(w[i]))
                out[e] = (m.names[best], float(w[best]))
        return out


@dataclass(frozen=True)
class Perturbation:
    """DARTS-PT's rule: remove each candidate of an edge in turn and keep the one whose removal
    lowers ``score(model)`` the most; an edge's strength is the drop when the whole edge is removed.

    One-shot variant: every edge is scored on the trained supernet as it is (DARTS-PT also
    fine-tunes the supernet between edge decisions; do that yourself between calls if wanted).
    Cost: ``1 + Σ_edges (candidates + 1)`` calls of ``score``.

    Args:
        score: ``score(model) -> float``, higher is better (e.g. validation accuracy of the
            supernet, computed under ``torch.no_grad()`` in the mode you want).

    Example:
        >>> op = bl.nas.MixedOp({"none": bl.nas.Zero(), "skip": nn.Identity(), "lin": nn.Linear(4, 4)},
        ...                     alpha=nn.Parameter(torch.tensor([0.0, 0.0, 1.0])))
        >>> net = nn.Sequential(op, nn.Linear(4, 2))                 # a toy supernet with one mixed edge
        >>> x = torch.randn(8, 4)
        >>> def score(m):                                             # how close the edge is to the identity
        ...     return -(m[0](x) - x).abs().mean().item()
        >>> bl.nas.derive(net, rule=bl.nas.Perturbation(score))       # removing "skip" hurts most
        {'0': 'skip'}
    """

    score: Callable[[nn.Module], float]

    def __call__(self, model: nn.Module, edges: Mapping[str, MixedOp], exclude: Sequence[str]) -> Choice:
        fn = "bilevel.nas.Perturbation"
        if not callable(self.score):
            raise TypeError(f"{fn}: expected `score` to be a callable score(model) -> float, "
                            f"got {type(self.score).__name__}.")
        out: Choice = {}
        with torch.no_grad():
            base = float(self.score(model))
            for e, m in edges.items():
                idx = _candidates(m, exclude, fn, e)
                drops = {}
                for i in idx:
                    with m.without([m.names[i]]):
                        drops[i] = base - float(self.score(model))
                best = max(idx, key=lambda i: drops[i])
                with m.without(m.names):
                    strength = base - float(self.score(model))
                out[e] = (m.names[best], strength)
        return out


def derive(model: nn.Module, *, rule: Callable[..., Choice] | None = None, edges_per_node: int | None = 2,
           exclude: Sequence[str] = ("none",)) -> dict[str, str]:
    """The discrete architecture of a searched supernet: one operation per mixed edge.

    Args:
        model: a supernet with :class:`MixedOp` edges (e.g. :class:`bilevel.nas.Network`).
        rule: how an edge's operation and strength are chosen: :class:`Argmax` (default, DARTS) or
            :class:`Perturbation` (DARTS-PT), or any ``rule(model, edges, exclude) ->
            {edge name: (operation, strength)}``.
        edges_per_node: in modules that declare their nodes (``node_edges()``, as
            :class:`bilevel.nas.Cell`), keep the ``edges_per_node`` strongest incoming edges of each
            node and set the others to ``"none"`` (``None``: keep all). Mixed edges outside such a
            module are always kept.
        exclude: candidate names never chosen (DARTS excludes ``"none"``).

    Returns:
        ``{mixed-op name: chosen candidate name}`` for every :class:`MixedOp` of ``model``, in module
        order; dropped edges map to ``"none"``. Pass it as ``genotype=`` of
        :class:`bilevel.nas.Network` to build the derived network.

    Raises:
        ValueError: no :class:`MixedOp` in ``model``, or an edge with every candidate excluded.

    Example:
        >>> op = bl.nas.MixedOp({"none": bl.nas.Zero(), "skip": nn.Identity(), "lin": nn.Linear(4, 4)},
        ...                     alpha=nn.Parameter(torch.tensor([0.0, 0.0, 1.0])))
        >>> net = nn.Sequential(op, nn.Linear(4, 2))                 # a toy supernet with one mixed edge
        >>> bl.nas.derive(net)                                        # argmax over "skip" and "lin"
        {'0': 'lin'}

    On a DARTS :class:`bilevel.nas.Network` the keys are edge names such as
    ``"cells.0.edges.0_1"``, and ``bl.nas.Network(..., genotype=genotype)`` builds the child.
    """
    fn = "bilevel.nas.derive"
    check_model(model, fn)
    if edges_per_node is not None and (isinstance(edges_per_node, bool) or not isinstance(edges_per_node, int)
                                       or edges_per_node < 1):
        raise ValueError(f"Invalid edges_per_node for {fn}: {edges_per_node!r} (expected None or an int >= 1).")
    edges = mixed_ops(model)
    if not edges:
        raise ValueError(f"{fn}: expected a supernet with bl.nas.MixedOp edges, found none in "
                         f"{type(model).__name__}. Fix: derive from the search network, not from a derived one.")
    rule = Argmax() if rule is None else rule
    chosen = rule(model, edges, tuple(exclude))
    missing = [e for e in edges if e not in chosen]
    if missing:
        raise ValueError(f"{fn}: the rule {type(rule).__name__} returned no choice for edges {missing[:4]}; "
                         f"expected {{edge: (operation, strength)}} for every edge.")
    result = {e: chosen[e][0] for e in edges}
    if edges_per_node is not None:
        for prefix, mod in model.named_modules():
            node_edges = getattr(mod, "node_edges", None)
            if not callable(node_edges):
                continue
            for into in node_edges():
                full = [f"{prefix}.{e}" if prefix else e for e in into]
                full = [f for f in full if f in edges]
                keep = set(sorted(full, key=lambda f: -chosen[f][1])[:edges_per_node])   # stable on ties
                for f in full:
                    if f not in keep:
                        result[f] = "none"
    return result


def parameter_free_edges(genotype: Mapping[str, str]) -> int:
    """How many kept edges of ``genotype`` have a parameter-free operation (skip or pooling).

    Example:
        >>> bl.nas.parameter_free_edges({"a": "skip_connect", "b": "none", "c": "sep_conv_3x3"})
        1
    """
    return sum(1 for op in genotype.values() if op in PARAMETER_FREE and op != "none")
