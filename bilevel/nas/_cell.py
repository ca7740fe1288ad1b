"""The DARTS cell search space (Liu et al. 2019), for 2-D images and 1-D sequences.

A cell takes the outputs ``s0, s1`` of the two previous cells, brings both to ``C`` channels,
and computes ``nodes`` intermediate nodes, node ``j`` being ``Σ_{i < j+2} edge_{j,i}(state_i)``
over every earlier state; its output is the channel concatenation of the intermediate nodes.
In a search each edge is a :class:`~bilevel.nas.MixedOp` over the operation set; in a
derived (discrete) network each edge is the one chosen operation, or absent (``none``).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ._mixed import MixedOp
from ._ops import OPS, PRIMITIVES, FactorizedReduce, ReLUConvBN, batch_norm, check_dim, conv_class, make_op

__all__ = ["Cell", "Network", "edge_name"]


def edge_name(node: int, source: int) -> str:
    """Local name of the edge from state ``source`` (0, 1: the cell inputs; 2+: nodes) into ``node``.

    Example:
        >>> bl.nas.edge_name(0, 1)                 # from the second cell input into node 0
        '0_1'
    """
    return f"{node}_{source}"


class Cell(nn.Module):
    """One DARTS cell (search or derived).

    Args:
        C_pp, C_p: channels of the outputs of the cells two back and one back.
        C: channels of every node.
        reduction: this cell halves the spatial size (edges from the inputs have stride 2).
        reduction_prev: the previous cell halved it (``s0`` is reduced by a factorized reduce).
        dim: 1 (``(N, C, L)``) or 2 (``(N, C, H, W)``).
        nodes: number of intermediate nodes; the output has ``nodes·C`` channels.
        primitives: the operation names of the mixed edges (search).
        genotype: ``{edge name: operation}`` for a derived cell (``"none"`` drops the edge); ``None``
            for a search cell of :class:`MixedOp` edges.
        mixed_kwargs: options of every :class:`MixedOp` (``weighting``, ``tau``, ``hard``).

    Shapes:
        ``s0``: ``(N, C_pp, *S0)``, ``s1``: ``(N, C_p, *S)`` → ``(N, nodes·C, *S/stride)``.

    Example:
        >>> cell = bl.nas.Cell(4, 4, 4, reduction=True, reduction_prev=False, dim=1, nodes=2,
        ...                    primitives=("none", "skip_connect", "avg_pool_3x3"))
        >>> s0 = s1 = torch.randn(2, 4, 10)
        >>> cell(s0, s1).shape                      # nodes·C = 8 channels, length halved
        torch.Size([2, 8, 5])
        >>> len(bl.nas.arch_parameters(cell))       # 2 + 3 mixed edges into the two nodes
        5
    """

    def __init__(self, C_pp: int, C_p: int, C: int, *, reduction: bool, reduction_prev: bool, dim: int = 2,
                 nodes: int = 4, primitives: Sequence[str] = PRIMITIVES,
                 genotype: Optional[Mapping[str, str]] = None, mixed_kwargs: Optional[dict] = None) -> None:
        super().__init__()
        fn = "bilevel.nas.Cell"
        check_dim(dim, fn)
        self.reduction = reduction
        self.nodes = nodes
        search = genotype is None
        self.preprocess0 = (FactorizedReduce(C_pp, C, dim=dim, affine=not search) if reduction_prev
                            else ReLUConvBN(C_pp, C, 1, 1, 0, dim=dim, affine=not search))
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0, dim=dim, affine=not search)
        self.edges = nn.ModuleDict()
        self._inputs: list[list[tuple[str, int]]] = []
        for j in range(nodes):
            into = []
            for i in range(j + 2):
                name = edge_name(j, i)
                stride = 2 if reduction and i < 2 else 1
                if search:
                    self.edges[name] = MixedOp({p: make_op(p, C, stride, dim=dim, affine=False) for p in primitives},
                                               **(mixed_kwargs or {}))
                else:
                    if name not in genotype:
                        raise KeyError(f"{fn}: the genotype has no operation for edge {name!r}; expected one for "
                                       f"every edge (use 'none' to drop one), got keys {sorted(genotype)[:8]}.")
                    op = genotype[name]
                    if op not in OPS:
                        raise KeyError(f"{fn}: unknown operation {op!r} on edge {name!r}; expected one of "
                                       f"{sorted(OPS)}.")
                    if op == "none":
                        continue
                    self.edges[name] = make_op(op, C, stride, dim=dim, affine=True)
                into.append((name, i))
            if not search and not into:
                raise ValueError(f"{fn}: node {j} has no incoming edge in the genotype (all 'none'). "
                                 f"Fix: derive with bl.nas.derive, which keeps the top-2 edges of every node.")
            self._inputs.append(into)

    def node_edges(self) -> list[list[str]]:
        """For each intermediate node, the names of its incoming edges relative to this cell
        (``"edges.<node>_<source>"``): the topology :func:`bilevel.nas.derive` selects edges in."""
        return [[f"edges.{n}" for n, _ in into] for into in self._inputs]

    def forward(self, s0: Tensor, s1: Tensor) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for into in self._inputs:
            total: Optional[Tensor] = None
            for name, i in into:
                t = self.edges[name](states[i])
                total = t if total is None else total + t
            states.append(total)                  # type: ignore[arg-type]
        return torch.cat(states[2:], dim=1)


class Network(nn.Module):
    """A DARTS network: stem, a stack of cells, global average pooling and a linear classifier.

    Args:
        in_channels: input channels (1 for a single 1-D signal, 3 for RGB images).
        num_classes: classifier outputs.
        dim: 1 for sequences ``(N, in_channels, L)``, 2 for images ``(N, in_channels, H, W)``.
        C: channels of the first cells' nodes (doubled at each reduction cell).
        layers: number of cells.
        nodes: intermediate nodes per cell.
        stem_multiplier: the stem has ``stem_multiplier·C`` channels (a convolution + BN).
        stem_kernel: the stem convolution's kernel size, an odd int ≥ 1 (default 3, DARTS's stem);
            the padding ``stem_kernel // 2`` keeps the spatial size. ``stem_kernel=1`` is a pointwise
            stem that only mixes input channels, leaving all spatial processing to the cells: with a
            wider stem, the stem followed by global average pooling and the classifier is already a
            bag-of-local-features model, so even a cell of skip connections scores well and a
            comparison of cells partly measures the stem. With a pointwise stem it measures the cells.
        reductions: indices of the reduction cells (default DARTS's ``layers//3, 2·layers//3`` for
            ``layers ≥ 3``, none otherwise).
        primitives: operation set of the search (default :data:`bilevel.nas.PRIMITIVES`).
        genotype: ``None`` for a search network (every edge a :class:`MixedOp`), or the
            ``{edge name: operation}`` returned by :func:`bilevel.nas.derive` for a network of the
            same shape, to retrain from scratch.
        weighting, tau, hard: options of every :class:`MixedOp` (search only).

    Shapes:
        input ``(N, in_channels, *S)``, output ``(N, num_classes)`` logits.

    Example:
        >>> ops = ("none", "skip_connect", "avg_pool_3x3")                 # a tiny search space
        >>> net = bl.nas.Network(1, 10, dim=1, C=4, layers=2, nodes=2, primitives=ops)   # search
        >>> net(torch.randn(4, 1, 16)).shape                               # (N, C_in, L) -> (N, classes)
        torch.Size([4, 10])
        >>> child = bl.nas.Network(1, 10, dim=1, C=4, layers=2, nodes=2, genotype=bl.nas.derive(net))
        >>> child(torch.randn(4, 1, 16)).shape
        torch.Size([4, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, *, dim: int = 2, C: int = 16, layers: int = 5,
                 nodes: int = 4, stem_multiplier: int = 3, stem_kernel: int = 3,
                 reductions: Optional[Sequence[int]] = None, primitives: Sequence[str] = PRIMITIVES,
                 genotype: Optional[Mapping[str, str]] = None, weighting: str = "softmax", tau: float = 1.0,
                 hard: bool = False) -> None:
        super().__init__()
        fn = "bilevel.nas.Network"
        check_dim(dim, fn)
        for k, v in (("in_channels", in_channels), ("num_classes", num_classes), ("C", C), ("layers", layers),
                     ("nodes", nodes), ("stem_multiplier", stem_multiplier)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {k} for {fn}: {v!r} (expected an int >= 1).")
        if (isinstance(stem_kernel, bool) or not isinstance(stem_kernel, int) or stem_kernel < 1
                or stem_kernel % 2 == 0):
            raise ValueError(f"Invalid stem_kernel for {fn}: {stem_kernel!r} (expected an odd int >= 1, so that the "
                             f"padding stem_kernel // 2 keeps the spatial size; 1 is a pointwise stem, 3 DARTS's).")
        unknown = [p for p in primitives if p not in OPS]
        if unknown:
            raise KeyError(f"{fn}: unknown primitives {unknown}; expected names from {sorted(OPS)}.")
        if reductions is None:
            reductions = (layers // 3, 2 * layers // 3) if layers >= 3 else ()
        self.dim = dim
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(conv_class(dim)(in_channels, C_curr, stem_kernel, padding=stem_kernel // 2,
                                              bias=False), batch_norm(dim)(C_curr))
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        mk = {"weighting": weighting, "tau": tau, "hard": hard}
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                C_curr *= 2
            sub = None
            if genotype is not None:
                prefix = f"cells.{i}.edges."
                sub = {k[len(prefix):]: v for k, v in genotype.items() if k.startswith(prefix)}
            cell = Cell(C_pp, C_p, C_curr, reduction=reduction, reduction_prev=reduction_prev, dim=dim,
                        nodes=nodes, primitives=primitives, genotype=sub, mixed_kwargs=mk)
            reduction_prev = reduction
            self.cells.append(cell)
            C_pp, C_p = C_p, nodes * C_curr
        self.classifier = nn.Linear(C_p, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        out = s1.flatten(2).mean(2)               # global average pooling
        return self.classifier(out)
