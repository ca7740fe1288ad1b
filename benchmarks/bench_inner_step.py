"""HyperOptimizer.inner_step against the plain torch training step it replaces.

Group ``inner_step``; unit: ``zero_grad(); loss.backward(); optimizer.step()`` on the same model,
batch and optimizer (SGD, momentum 0.9). The candidate is ``HyperOptimizer.inner_step`` with a
per-weight decay hyperparameter tree that the inner step does not use (``bl.FirstOrder()``), so the
ratio is the per-step cost of the wrapper: finiteness check of loss and gradients (read-only sums on
CPU), ``backward(inputs=...)`` restricted to the inner variables, checks of the loss, bookkeeping. Paired ratios (back to back) are what RESULTS.md
reports; targets 1.05 (MLP 64-512-256-10, batch 64) and 1.02 (the 1.07M MLP of conftest.py).
"""

from __future__ import annotations

import pytest

from conftest import LAYERS, Measure
from paired_breakdown import twin_steps

GROUP = "inner_step"
SHAPES = {"MLP 64-512-256-10, batch 64": ((64, 512, 256, 10), 64), "MLP 784-1024-256-10, batch 256": (LAYERS, 256)}


@pytest.fixture(scope="module", params=list(SHAPES))
def steps(request: pytest.FixtureRequest) -> dict:
    """The plain torch step and ``HyperOptimizer.inner_step`` on twin models, for one case."""
    case = request.param
    plain, ours = twin_steps(*SHAPES[case])
    return {"case": case, "plain": plain, "ours": ours}


def test_plain_step(measure: Measure, steps: dict) -> None:
    measure(steps["plain"], group=f"{GROUP}: {steps['case']}", name="plain torch step (unit)", unit=True)


def test_hyperoptimizer_inner_step(measure: Measure, steps: dict) -> None:
    measure(steps["ours"], group=f"{GROUP}: {steps['case']}", name="HyperOptimizer.inner_step",
            paired_with=steps["plain"], pairs=40)
