"""HyperOptimizer.inner_step against the plain torch training step it replaces.

Group ``inner_step``; unit: ``zero_grad(); loss.backward(); optimizer.step()`` on the same model,
batch and optimizer (SGD, momentum 0.9). The candidate is ``HyperOptimizer.inner_step`` with a
per-weight decay hyperparameter tree that the inner step does not use (``bl.FirstOrder()``), so the
ratio is the per-step cost of the wrapper: finiteness check of loss and gradient, the gradient
through ``torch.autograd.grad``, bookkeeping. Paired ratios (back to back) are what RESULTS.md
reports; targets 1.05 (MLP 64-512-256-10, batch 64) and 1.02 (the 1.07M MLP of conftest.py).
"""

from __future__ import annotations

from typing import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl
from conftest import LAYERS, Measure

GROUP = "inner_step"
SHAPES = {"MLP 64-512-256-10, batch 64": ((64, 512, 256, 10), 64), "MLP 784-1024-256-10, batch 256": (LAYERS, 256)}


def _mlp(sizes: Sequence[int]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


@pytest.fixture(scope="module", params=list(SHAPES))
def steps(request: pytest.FixtureRequest) -> dict:
    """The plain torch step and ``HyperOptimizer.inner_step`` on twin models, for one case."""
    case = request.param
    sizes, batch = SHAPES[case]
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(batch, sizes[0], generator=gen), torch.randint(0, sizes[-1], (batch,), generator=gen)
    plain_model, model = _mlp(sizes), _mlp(sizes)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=1e-3, momentum=0.9)
    hp, _ = bl.hparams.weight_decay(model, init=1e-4, per="tensor")
    loss = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])      # noqa: E731
    hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, method=bl.FirstOrder(),
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9),
                             outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1))

    def plain() -> None:
        plain_opt.zero_grad()
        F.cross_entropy(plain_model(X), y).backward()
        plain_opt.step()

    return {"case": case, "plain": plain, "ours": lambda: hopt.inner_step((X, y))}


def test_plain_step(measure: Measure, steps: dict) -> None:
    measure(steps["plain"], group=f"{GROUP}: {steps['case']}", name="plain torch step (unit)", unit=True)


def test_hyperoptimizer_inner_step(measure: Measure, steps: dict) -> None:
    measure(steps["ours"], group=f"{GROUP}: {steps['case']}", name="HyperOptimizer.inner_step",
            paired_with=steps["plain"], pairs=40)
