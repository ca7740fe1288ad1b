"""Cost of one Hessian-vector product on a ~1M-parameter MLP, in gradients.

Group ``hvp``; unit: one gradient (forward + backward) of the batch loss.
What DESIGN.md §3 claims and this file checks:

- a product by double backward from scratch costs about 2.3 gradients;
- forward-over-reverse (``torch.func.jvp(torch.func.grad(f))``) about 4;
- ``torch.autograd.functional.hvp`` about 4;
- with the gradient graph built once and reused (``HessianOperator``), the
  marginal product costs about 1.15-1.3 gradients.

``*_raw`` benchmarks are the same products written directly against torch,
without the library, to expose its overhead.

Gauss-Newton (``hvp_mode="gauss_newton"``, ``Jᵀ H_ℓ J``): one product on a built operator
(target: at most 1.3 gradients), and the same product with ``J v`` by ``torch.func.jvp`` of the
network output instead of the double-vjp trick on the retained gradient graph.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

import bilevel as bl
from conftest import Measure, MLPProblem, Tree

GROUP = "hvp"


def _gradient_fn(problem: MLPProblem) -> Callable[[], Tuple[Tensor, ...]]:
    w = problem.leaves()
    leaves = list(w.values())
    return lambda: torch.autograd.grad(problem.loss(w, problem.X, problem.y), leaves)


def test_gradient(problem: MLPProblem, measure: Measure) -> None:
    """The unit: ``torch.autograd.grad`` of the loss (one forward, one backward)."""
    measure(_gradient_fn(problem), group=GROUP, name="gradient (unit)", unit=True, hvps=0)


def test_hvp_reverse_from_scratch(problem: MLPProblem, measure: Measure) -> None:
    """``bl.hvp(mode="reverse")``: forward, gradient with ``create_graph=True``, one double backward."""
    v = problem.random_direction()

    def run() -> Tree:
        return bl.hvp(problem.loss, problem.params, v, problem.X, problem.y, mode="reverse")

    measure(run, group=GROUP, name="bl.hvp reverse (from scratch)", hvps=1)


def test_hvp_forward_from_scratch(problem: MLPProblem, measure: Measure) -> None:
    """``bl.hvp(mode="forward")``: ``torch.func.jvp`` of ``torch.func.grad``, through the library."""
    v = problem.random_direction()

    def run() -> Tree:
        return bl.hvp(problem.loss, problem.params, v, problem.X, problem.y, mode="forward")

    measure(run, group=GROUP, name="bl.hvp forward (from scratch)", hvps=1)


def test_autograd_functional_hvp(problem: MLPProblem, measure: Measure) -> None:
    """``torch.autograd.functional.hvp`` (reference; it uses the double-backward trick)."""
    keys = list(problem.params)
    inputs = tuple(problem.params[k] for k in keys)
    v = problem.random_direction()
    vs = tuple(v[k] for k in keys)

    def f(*leaves: Tensor) -> Tensor:
        return problem.loss(dict(zip(keys, leaves)), problem.X, problem.y)

    def run() -> Tuple[Tensor, ...]:
        return torch.autograd.functional.hvp(f, inputs, vs)[1]

    measure(run, group=GROUP, name="torch.autograd.functional.hvp", hvps=1)


def test_hvp_reverse_raw(problem: MLPProblem, measure: Measure) -> None:
    """Double backward written directly: ``grad(create_graph=True)`` then ``grad(g, w, v)``."""
    v = problem.random_direction()
    vs = list(v.values())

    def run() -> Tuple[Tensor, ...]:
        w = problem.leaves()
        leaves = list(w.values())
        g = torch.autograd.grad(problem.loss(w, problem.X, problem.y), leaves, create_graph=True)
        return torch.autograd.grad(g, leaves, vs)

    measure(run, group=GROUP, name="double backward, raw torch (from scratch)", hvps=1)


def test_hvp_forward_raw(problem: MLPProblem, measure: Measure) -> None:
    """Forward-over-reverse written directly: ``torch.func.jvp(torch.func.grad(f), (w,), (v,))``."""
    v = problem.random_direction()
    grad_f = torch.func.grad(lambda p: problem.loss(p, problem.X, problem.y))

    def run() -> Tree:
        return torch.func.jvp(grad_f, (problem.params,), (v,))[1]

    measure(run, group=GROUP, name="jvp(grad), raw torch.func (from scratch)", hvps=1)


def test_operator_build(problem: MLPProblem, measure: Measure) -> None:
    """``bl.HessianOperator(...)``: forward + gradient with ``create_graph=True`` (paid once per solve)."""

    def run() -> bl.HessianOperator:
        return bl.HessianOperator(problem.loss, problem.params, None, (problem.X, problem.y))

    measure(run, group=GROUP, name="HessianOperator build (graph, once)", hvps=0)


def test_hvp_marginal(problem: MLPProblem, measure: Measure) -> None:
    """``op.matvec_flat(v)`` on a prebuilt operator: one product with the gradient graph reused."""
    op = bl.HessianOperator(problem.loss, problem.params, None, (problem.X, problem.y))
    v = op.flat.flatten(problem.random_direction())

    measure(lambda: op.matvec_flat(v), group=GROUP, name="HessianOperator.matvec_flat (marginal)", hvps=1)
    assert op.mode == "reverse"


def _ggn_operator(problem: MLPProblem) -> bl.HessianOperator:
    return bl.HessianOperator(problem.output_loss, problem.params, problem.hparams, (problem.X, problem.y),
                            mode="gauss_newton")


def test_ggn_marginal(problem: MLPProblem, measure: Measure) -> None:
    """``op.matvec_flat(v)`` with ``mode="gauss_newton"``: ``J v`` by the double-vjp trick on the retained
    gradient graph, the closed-form softmax ``H_ℓ``, one backward ``Jᵀ(·)``."""
    op = _ggn_operator(problem)
    v = op.flat.flatten(problem.random_direction())
    measure(lambda: op.matvec_flat(v), group=GROUP, name="Gauss-Newton matvec_flat (marginal)",
            paired_with=_gradient_fn(problem), hvps=1, target_gradients=1.3)
    assert op.mode == "gauss_newton"


def test_ggn_marginal_func_jvp(problem: MLPProblem, measure: Measure) -> None:
    """The alternative: ``J v`` by ``torch.func.jvp`` of the output (a fresh forward with tangents per
    product), then the same ``H_ℓ`` and ``Jᵀ(·)`` on the retained forward graph."""
    w = problem.leaves()
    leaves = list(w.values())
    logits = torch.func.functional_call(problem.model, w, (problem.X,))
    p = torch.softmax(logits.detach(), 1)
    v = problem.random_direction()
    out = lambda q: torch.func.functional_call(problem.model, q, (problem.X,))  # noqa: E731

    def run() -> Tuple[Tensor, ...]:
        _, jv = torch.func.jvp(out, (problem.params,), (v,))
        pu = p * jv
        hjv = (pu - p * pu.sum(1, keepdim=True)) / jv.shape[0]
        return torch.autograd.grad(logits, leaves, hjv, retain_graph=True)

    measure(run, group=GROUP, name="Gauss-Newton, J v by torch.func.jvp (raw)", paired_with=_gradient_fn(problem),
            hvps=1)


def test_ggn_operator_build(problem: MLPProblem, measure: Measure) -> None:
    """``HessianOperator(mode="gauss_newton")``: forward, ``∂ℓ/∂z``, the gradient with ``create_graph=True``."""
    measure(lambda: _ggn_operator(problem), group=GROUP, name="Gauss-Newton operator build (once)",
            paired_with=_gradient_fn(problem), hvps=0)
