"""Solver vector work on one flat buffer vs a per-tensor loop over a tree.

Group ``tree``; unit: one solver-style update on one contiguous buffer of
~1M float32: ``y = x + alpha * p`` then ``<y, y>`` (``alpha`` a 0-dim tensor,
as in ``bl.CG``). The same update over a tree of 200 tensors of mixed sizes
(same total) as a Python loop over the tensors (:func:`tree_axpy`,
:func:`tree_vdot` below) is the comparison; DESIGN.md §3 says the flat buffer is 1.7-3x
faster. Two references: ``torch._foreach_*`` (the multi-tensor path of
``torch.optim``; private API) and the per-product layout cost of the flat
path (``Flat.unflatten`` + ``Flat.flatten_list``, what
``HessianOperator.matvec_flat`` pays around each product).
"""

from __future__ import annotations

import math
from typing import List, Tuple

import pytest
import torch
from torch import Tensor

from bilevel._tree import Flat
from conftest import Measure, Tree

GROUP = "tree"
N_TENSORS = 200
TOTAL = 1_000_000


def mixed_shapes(n: int = N_TENSORS, total: int = TOTAL, seed: int = 0) -> List[Tuple[int, ...]]:
    """``n`` shapes with log-uniform sizes (about 30 to 30,000 before scaling) summing to about ``total``.

    Tensors above 1,000 entries are 2-D (like weights), the others 1-D (like biases).
    """
    gen = torch.Generator().manual_seed(seed)
    logs = torch.empty(n).uniform_(math.log(30.0), math.log(30_000.0), generator=gen)
    sizes = logs.exp()
    sizes = (sizes * (total / float(sizes.sum()))).round().clamp_min(1).to(torch.int64).tolist()
    shapes: List[Tuple[int, ...]] = []
    for s in sizes:
        if s > 1000:
            rows = 16
            shapes.append((rows, max(1, s // rows)))
        else:
            shapes.append((s,))
    return shapes


@pytest.fixture(scope="module")
def trees() -> Tuple[Tree, Tree]:
    """Two trees ``x``, ``p`` of 200 float32 tensors with the shapes of :func:`mixed_shapes`."""
    gen = torch.Generator().manual_seed(0)
    shapes = mixed_shapes()
    x = {f"t{i:03d}": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    p = {f"t{i:03d}": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    return x, p


ALPHA = torch.tensor(0.37)


def tree_axpy(alpha: Tensor, x: Tree, y: Tree) -> Tree:
    """``alpha * x + y``, one tensor at a time."""
    return {k: y[k] + alpha * x[k] for k in y}


def tree_vdot(a: Tree, b: Tree) -> Tensor:
    """``sum_k <a[k], b[k]>``, one ``vdot`` per tensor, as a 0-dim tensor (no host sync)."""
    return torch.stack([torch.vdot(a[k].reshape(-1), b[k].reshape(-1)) for k in a]).sum()


def test_flat_update(trees: Tuple[Tree, Tree], measure: Measure) -> None:
    """The unit: ``x + alpha * p`` and ``dot`` on one contiguous buffer (as ``bl.CG`` does)."""
    x, p = trees
    fl = Flat(x)
    xf, pf = fl.flatten(x), fl.flatten(p)

    def run() -> Tensor:
        y = xf + ALPHA * pf
        return torch.dot(y, y)

    n = measure(run, group=GROUP, name="flat buffer: axpy + dot (unit)", unit=True,
                tensors=N_TENSORS, numel=fl.size)
    assert fl.size > 0.9 * TOTAL and len(x) == N_TENSORS
    torch.testing.assert_close(n, tree_vdot(tree_axpy(ALPHA, p, x), tree_axpy(ALPHA, p, x)), rtol=1e-4, atol=0)


def test_tree_loop_update(trees: Tuple[Tree, Tree], measure: Measure) -> None:
    """The same update as a Python loop over 200 tensors (``tree_axpy`` + ``tree_vdot``)."""
    x, p = trees

    def run() -> Tensor:
        y = tree_axpy(ALPHA, p, x)
        return tree_vdot(y, y)

    measure(run, group=GROUP, name="per-tensor loop: tree_axpy + tree_vdot", tensors=N_TENSORS)


def test_foreach_update(trees: Tuple[Tree, Tree], measure: Measure) -> None:
    """Reference: the update with ``torch._foreach_*`` multi-tensor kernels (norms² summed for the dot)."""
    xs, ps = list(trees[0].values()), list(trees[1].values())

    def run() -> Tensor:
        ys = torch._foreach_add(xs, torch._foreach_mul(ps, ALPHA))
        return torch.stack(torch._foreach_norm(ys)).square().sum()

    measure(run, group=GROUP, name="reference: torch._foreach_* update", tensors=N_TENSORS)


def test_flat_layout_roundtrip(trees: Tuple[Tree, Tree], measure: Measure) -> None:
    """Reference: ``Flat.unflatten`` (200 views) + ``Flat.flatten_list`` (one cat), paid per product."""
    x, _ = trees
    fl = Flat(x)
    xf = fl.flatten(x)

    def run() -> Tensor:
        return fl.flatten_list(fl.unflatten(xf).values())

    measure(run, group=GROUP, name="reference: unflatten + flatten_list (per product)", tensors=N_TENSORS)
