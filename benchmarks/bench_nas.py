"""NAS search cost: second-order and implicit DARTS estimators vs first-order, per search epoch.

Problem: the MNIST-1D search network of ``examples/darts_mnist1d.py`` (one 1-D DARTS cell, 4
nodes, 14 mixed edges over the 8 standard operations, C = 8, stem 16 channels; 42,602 float32
weights, 112 architecture weights), batches of 128 sequences of length 40 (random data of
MNIST-1D's shape: the cost does not depend on the values). The weights are warmed up for 20
SGD steps first.

A *search epoch* here is ``STEPS`` alternations of ``hopt.inner_step`` (SGD, momentum 0.9) and
``hopt.hyper_step`` (Adam on α), as in the example; the example's epoch is 15 such steps, so
its time is ``15/STEPS`` of these figures. Group ``nas-epoch``; unit: first-order DARTS
(``bl.FirstOrder()``). The ratio ``x unit`` is the search-time overhead of each estimator.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl
from conftest import Measure

STEPS = 4
BATCH = 128
PAIRS = 3

METHODS: dict[str, Callable[[], Any]] = {
    "first-order (FirstOrder)": lambda: bl.FirstOrder(),
    "second-order exact (Unrolled(1))": lambda: bl.Unrolled(steps=1),
    "second-order finite-diff (Unrolled(1, fd))": lambda: bl.Unrolled(steps=1, second_order="finite_difference"),
    "iDARTS (Implicit(Neumann(5)))": lambda: bl.Implicit(solver=bl.Neumann(steps=5, alpha=0.02)),
    "implicit (Implicit(CG(5)))": lambda: bl.Implicit(solver=bl.CG(maxiter=5, tol=0.0), ),
}
UNIT = "first-order (FirstOrder)"


def _ce(model, hparams, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _epoch_runner(method: Any) -> Callable[[], None]:
    torch.manual_seed(0)
    net = bl.nas.Network(1, 10, dim=1, C=8, layers=1, nodes=4, stem_multiplier=2)
    hopt = bl.nas.darts(net, method=method, lr=0.05, arch_lr=6e-3, on_error="skip")
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(2 * STEPS, BATCH, 1, 40, generator=g)
    ys = torch.randint(0, 10, (2 * STEPS, BATCH), generator=g)
    for t in range(20):                                   # warm-up of the weights only
        hopt.inner_step((xs[t % STEPS], ys[t % STEPS]))

    def epoch() -> None:
        for t in range(STEPS):
            b, v = (xs[t], ys[t]), (xs[STEPS + t], ys[STEPS + t])
            hopt.inner_step(b)
            hopt.hyper_step(b, v)

    return epoch


@pytest.fixture(scope="module")
def unit_epoch() -> Callable[[], None]:
    return _epoch_runner(METHODS[UNIT]())


@pytest.mark.parametrize("name", list(METHODS))
def test_nas_search_epoch(measure: Measure, unit_epoch: Callable[[], None], name: str) -> None:
    torch.set_num_threads(1)
    run = unit_epoch if name == UNIT else _epoch_runner(METHODS[name]())
    measure(run, group="nas-epoch", name=name, unit=(name == UNIT), steps=STEPS, batch=BATCH,
            paired_with=None if name == UNIT else unit_epoch, pairs=PAIRS)
