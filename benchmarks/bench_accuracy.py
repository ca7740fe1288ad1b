"""Hypergradient accuracy vs number of Hessian-vector products (exact references).

Group ``accuracy-<problem>``; unit: one IFT hypergradient with ``CG(maxiter=10)`` on the same
problem. Each benchmark times one hypergradient of a method at k = 10 and stores its relative error
against the dense float64 reference in ``extra_info``; the full curves (k = 1…50, every method) come
from ``python benchmarks/make_results.py --only accuracy`` (table and plot in RESULTS.md).
"""

from __future__ import annotations

from typing import Any

import pytest

import bilevel as bl
import baselines
from conftest import Measure

PROBLEMS = {"ridge": baselines.PerFeatureRidge, "logistic": baselines.PerFeatureLogistic,
            "kernel_ridge": baselines.KernelRidge}
SOLVERS = {"CG": lambda: bl.CG(maxiter=10, tol=0.0), "Neumann": lambda: bl.Neumann(steps=10),
           "Nystrom": lambda: bl.Nystrom(rank=10), "Identity": lambda: bl.Identity()}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_accuracy_k10(name: str, solver: str, measure: Measure) -> None:
    prob = PROBLEMS[name]()
    w = prob.solve_inner()
    exact = bl.implicit_hypergrad(prob.inner, prob.outer, w, prob.hparams, solver=bl.Exact())
    unit_solver = bl.CG(maxiter=10, tol=0.0)
    unit = lambda: bl.implicit_hypergrad(prob.inner, prob.outer, w, prob.hparams, solver=unit_solver)  # noqa: E731
    s = SOLVERS[solver]()
    fn = lambda: bl.implicit_hypergrad(prob.inner, prob.outer, w, prob.hparams, solver=s)  # noqa: E731
    hg: Any = fn()
    err = baselines.rel_err(hg, exact)
    measure(fn, group=f"accuracy-{name}", name=f"{solver}, k=10", unit=(solver == "CG"), paired_with=unit,
            rel_err=err, hvps=hg.info.solver.matvecs)
    if solver == "CG" and name != "kernel_ridge":
        assert err < 0.1
