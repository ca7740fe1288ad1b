"""Cost of the default hyper step against a Neumann-10 with a fixed step, on the benchmark MLP.

Group ``defaults``; unit: ``implicit_hypergrad`` with ``Neumann(steps=10, alpha=0.9/λ_max)`` (a fixed
step, chosen outside the timing). Candidates: the solver of ``bl.Implicit()`` (``CG(maxiter=10,
on_indefinite="stop")``) and ``Neumann(steps=10, alpha=None)`` with its λ_max warm-started from the
previous eigenvector (1 product), each as a paired ratio to the unit (target: at most 1.15).

    python -m pytest benchmarks/bench_defaults.py --benchmark-only --benchmark-min-rounds=10 --benchmark-max-time=2
"""

from __future__ import annotations

from typing import Any

import bilevel as bl
from conftest import Measure, MLPProblem

GROUP = "defaults"
TARGET = 1.15


def _hypergrad(problem: MLPProblem, solver: Any, solver_state: Any = None) -> bl.Hypergrad:
    return bl.implicit_hypergrad(problem.data_loss, problem.outer_loss, problem.params, problem.hparams,
                                 solver=solver, inner_args=(problem.X, problem.y),
                                 outer_args=(problem.X_val, problem.y_val), penalty=problem.penalty,
                                 solver_state=solver_state)


def _unit(problem: MLPProblem, alpha: float) -> Any:
    solver = bl.Neumann(steps=10, alpha=alpha)
    return lambda: _hypergrad(problem, solver)


def test_neumann10_fixed_alpha(problem: MLPProblem, neumann_alpha: float, measure: Measure) -> None:
    measure(_unit(problem, neumann_alpha), group=GROUP, name="Neumann-10, fixed alpha (unit)", unit=True, hvps=10)


def test_default_implicit_solver(problem: MLPProblem, neumann_alpha: float, measure: Measure) -> None:
    solver = bl.Implicit().solver
    hg = measure(lambda: _hypergrad(problem, solver), group=GROUP, name="default: CG-10, on_indefinite='stop'",
                 paired_with=_unit(problem, neumann_alpha), hvps=10, target=TARGET)
    assert hg.info.solver.matvecs <= 10


def test_neumann10_warm_lambda(problem: MLPProblem, neumann_alpha: float, measure: Measure) -> None:
    solver = bl.Neumann(steps=10)
    state = _hypergrad(problem, solver).info.solver.extra          # the first step's 20 power iterations
    hg = measure(lambda: _hypergrad(problem, solver, state), group=GROUP,
                 name="Neumann-10, alpha=None, warm lambda_max (1 product)",
                 paired_with=_unit(problem, neumann_alpha), hvps=11, target=TARGET)
    assert hg.info.solver.matvecs == 11
