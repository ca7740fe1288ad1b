"""Cost of one IFT hypergradient on a ~1M-parameter MLP, in gradients.

Group ``ift``; unit: one gradient of the batch loss (re-measured here so that
this file's ratios stand alone). The hyperparameters are one log weight decay
per parameter (a tree shaped like ``params``, 1,068,810 numbers); the inner
loss is ``CE + 0.5 Σ exp(logwd) ⊙ w²``, the outer loss the validation CE.

One hypergradient = outer gradient (1) + inner gradient graph built once
(``HessianOperator``) + k Hessian-vector products on that graph + one mixed
product. With ``bl.CG(maxiter=10, tol=0.0)`` (exactly 10 products) the
target is at most 16 gradients; DESIGN.md §3 predicts about 15. The component
benchmarks at the end give that decomposition for this inner loss.

With ``hvp_mode="gauss_newton"`` (data loss as ``bl.losses.cross_entropy``, the decay as
``penalty=``) the products are ``(Jᵀ H_ℓ J + D) v``; target at most 15 gradients.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import bilevel as bl
from bilevel.implicit import solve_adjoint
from conftest import Measure, MLPProblem, Tree

GROUP = "ift"
TARGET_GRADIENTS = 16.0  # the target for CG with 10 iterations
TARGET_GAUSS_NEWTON = 15.0  # the same with Gauss-Newton products


def _hypergrad(problem: MLPProblem, solver: Any, split: bool = False) -> bl.Hypergrad:
    """``split``: the decay term passed as ``penalty=`` (elementwise Hessian) instead of inside the loss."""
    inner = problem.data_loss if split else problem.inner_loss
    return bl.implicit_hypergrad(inner, problem.outer_loss, problem.params, problem.hparams,
                                 solver=solver, inner_args=(problem.X, problem.y),
                                 outer_args=(problem.X_val, problem.y_val),
                                 penalty=problem.penalty if split else None)


def _gradient_fn(problem: MLPProblem) -> Any:
    w = problem.leaves()
    leaves = list(w.values())
    return lambda: torch.autograd.grad(problem.loss(w, problem.X, problem.y), leaves)


def test_gradient(problem: MLPProblem, measure: Measure) -> None:
    """The unit: ``torch.autograd.grad`` of the (undecayed) batch loss."""
    measure(_gradient_fn(problem), group=GROUP, name="gradient (unit)", unit=True, hvps=0)


def test_ift_cg10(problem: MLPProblem, measure: Measure) -> None:
    """``implicit_hypergrad`` with ``CG(maxiter=10, tol=0.0)``: exactly 10 products + 1 mixed."""
    solver = bl.CG(maxiter=10, tol=0.0)
    hg = measure(lambda: _hypergrad(problem, solver), group=GROUP, name="IFT, CG 10 iterations",
                 paired_with=_gradient_fn(problem), hvps=10, target_gradients=TARGET_GRADIENTS)
    info = hg.info.solver
    assert info is not None and info.matvecs == 10 and info.iterations == 10


def test_ift_cg10_penalty(problem: MLPProblem, measure: Measure) -> None:
    """As above with the decay term declared as ``penalty=`` (its Hessian and mixed term elementwise)."""
    solver = bl.CG(maxiter=10, tol=0.0)
    hg = measure(lambda: _hypergrad(problem, solver, split=True), group=GROUP,
                 name="IFT, CG 10 iterations, penalty=", paired_with=_gradient_fn(problem), hvps=10,
                 target_gradients=TARGET_GRADIENTS)
    info = hg.info.solver
    assert info is not None and info.matvecs == 10 and info.iterations == 10


def gauss_newton_hypergrad(problem: MLPProblem, solver: Any) -> bl.Hypergrad:
    """``implicit_hypergrad(hvp_mode="gauss_newton")`` on the problem, data loss as an output loss,
    the decay as ``penalty=`` (also timed by ``paired_breakdown.py ggn``)."""
    return bl.implicit_hypergrad(problem.output_loss, problem.outer_loss, problem.params, problem.hparams,
                                 solver=solver, inner_args=(problem.X, problem.y),
                                 outer_args=(problem.X_val, problem.y_val), penalty=problem.penalty,
                                 hvp_mode="gauss_newton")


def test_ift_cg10_gauss_newton(problem: MLPProblem, measure: Measure) -> None:
    """``implicit_hypergrad(hvp_mode="gauss_newton")``, ``CG(maxiter=10, tol=0.0)``, decay as ``penalty=``."""
    solver = bl.CG(maxiter=10, tol=0.0)
    hg = measure(lambda: gauss_newton_hypergrad(problem, solver), group=GROUP, name="IFT, CG 10 iterations, Gauss-Newton, penalty=",
                 paired_with=_gradient_fn(problem), hvps=10, target_gradients=TARGET_GAUSS_NEWTON)
    info = hg.info.solver
    assert hg.info.hvp_mode == "gauss_newton" and info is not None and info.matvecs == 10


def test_ift_neumann10_fixed_alpha(problem: MLPProblem, neumann_alpha: float, measure: Measure) -> None:
    """``implicit_hypergrad`` with ``Neumann(steps=10, alpha=fixed)``: 10 products + 1 mixed."""
    solver = bl.Neumann(steps=10, alpha=neumann_alpha)
    hg = measure(lambda: _hypergrad(problem, solver), group=GROUP, name="IFT, Neumann 10 steps, fixed alpha",
                 paired_with=_gradient_fn(problem), hvps=10, alpha=neumann_alpha)
    info = hg.info.solver
    assert info is not None and info.matvecs == 10


def test_ift_neumann10_power20(problem: MLPProblem, measure: Measure) -> None:
    """``implicit_hypergrad`` with ``Neumann(steps=10, alpha=None)``: 20 power iterations + 10 products + 1 mixed."""
    solver = bl.Neumann(steps=10, alpha=None, power_iters=20)
    hg = measure(lambda: _hypergrad(problem, solver), group=GROUP,
                 name="IFT, Neumann 10 steps, alpha=None (+20 power)", hvps=30)
    info = hg.info.solver
    assert info is not None and info.matvecs == 30


# -- components of one hypergradient (same inner loss, with hparams) -------------
@pytest.fixture
def operator(problem: MLPProblem) -> bl.HessianOperator:
    return bl.HessianOperator(problem.inner_loss, problem.params, problem.hparams, (problem.X, problem.y))


def test_component_operator_build(problem: MLPProblem, measure: Measure) -> None:
    """``HessianOperator`` of the inner loss with hparams: the graph of ``∇_w L_T``, built once."""
    measure(lambda: bl.HessianOperator(problem.inner_loss, problem.params, problem.hparams, (problem.X, problem.y)),
            group=GROUP, name="component: operator build (with hparams)", hvps=0)


def test_component_marginal_hvp(problem: MLPProblem, operator: bl.HessianOperator, measure: Measure) -> None:
    """One product on the built operator (what each CG / Neumann step pays)."""
    v = operator.flat.flatten(problem.random_direction())
    measure(lambda: operator.matvec_flat(v), group=GROUP, name="component: marginal HVP (with hparams)",
            paired_with=_gradient_fn(problem), hvps=1)


def test_component_marginal_hvp_penalty(problem: MLPProblem, measure: Measure) -> None:
    """One product on the operator of the data loss with the decay as ``penalty=`` (elementwise ``d ⊙ v``)."""
    op = bl.HessianOperator(problem.data_loss, problem.params, problem.hparams, (problem.X, problem.y),
                            penalty=problem.penalty)
    v = op.flat.flatten(problem.random_direction())
    measure(lambda: op.matvec_flat(v), group=GROUP, name="component: marginal HVP (penalty=)",
            paired_with=_gradient_fn(problem), hvps=1)


def test_component_mixed(problem: MLPProblem, operator: bl.HessianOperator, measure: Measure) -> None:
    """The mixed product ``∇_λ <∇_w L_T, u>`` on the built operator."""
    u: Tree = problem.random_direction()
    measure(lambda: operator.mixed_vjp(u), group=GROUP, name="component: mixed product", hvps=0)


def test_component_cg10_solve(problem: MLPProblem, operator: bl.HessianOperator, measure: Measure) -> None:
    """The CG solve alone on a built operator: 10 products plus the solver's vector work.

    ``b`` is the validation gradient, as in the hypergradient (a random ``b``
    finds negative curvature within 10 steps at this point).
    """
    w = problem.leaves()
    grads = torch.autograd.grad(problem.outer_loss(w, problem.hparams, problem.X_val, problem.y_val), list(w.values()))
    b: Tree = dict(zip(w, grads))
    solver = bl.CG(maxiter=10, tol=0.0)
    measure(lambda: solve_adjoint(operator, b, solver), group=GROUP, name="component: CG 10 solve on built operator",
            hvps=10)
