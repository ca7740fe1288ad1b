"""``torch.func.vmap`` over 16 hyperparameter settings through ``@bl.implicit_diff`` vs a loop of 16 calls.

Group ``implicit-func``; unit: the Python loop, 16 calls of ``torch.func.grad(outer ∘ fit)`` (one
hypergradient each). The benchmark: the same 16 hypergradients in one call of
``torch.func.vmap(torch.func.grad(outer ∘ fit))``. Paired ratio = time(vmap) / time(loop); the target
is at most 1/3 (vmap at least 3× faster).

Under vmap the user's solver is vmapped, and the adjoint systems of the 16 settings are solved
together (CG in lockstep on one vmapped Hessian-vector product). Three cases:

- ``gd``: L2-regularized logistic regression (per-feature log decay, 32 hyperparameters) solved by
  300 fixed steps of gradient descent: the forward solve dominates the cost;
- ``closed``: ridge regression solved by one ``torch.linalg.solve``: the forward is cheap, the
  backward (one CG solve per setting) dominates;
- ``solve``: logistic regression with 256 features (256 hyperparameters), 100 gradient-descent
  steps, and the library's default adjoint solver ``bl.CG()`` (tol 1e-10, at most 100 steps):
  the adjoint solve dominates (about 2/3 of the loop's time).

Every case's hypergradients are checked against the loop's before timing.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from torch import Tensor

import bilevel as bl
from conftest import Measure

GROUP = "implicit-func"
SETTINGS = 16
N, D, STEPS, LR = 256, 32, 300, 0.5
#: the ``solve`` case: samples, features, gradient steps
N_SOLVE, D_SOLVE, STEPS_SOLVE = 512, 256, 100


def _data(seed: int = 0, n: int = N, d: int = D) -> Tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g) / (d / D) ** 0.5
    y = (torch.rand(n, generator=g) < torch.sigmoid(X @ w)).float()
    yv = (torch.rand(n, generator=g) < torch.sigmoid(Xv @ w)).float()
    return X, y, Xv, yv


def logistic_inner(p: Dict[str, Tensor], h: Dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(X @ p["w"], y) + 0.5 * (h["l"].exp() * p["w"] ** 2).sum()


def gd_fit(h: Dict[str, Tensor], X: Tensor, y: Tensor, steps: int = STEPS) -> Dict[str, Tensor]:
    """``steps`` fixed gradient steps (closed-form gradient: no autograd graph, batchable)."""
    w = torch.zeros(X.shape[1], dtype=X.dtype)
    decay = h["l"].exp()
    for _ in range(steps):
        w = w - LR * (X.T @ (torch.sigmoid(X @ w) - y) / X.shape[0] + decay * w)
    return {"w": w}


def gd_fit_short(h: Dict[str, Tensor], X: Tensor, y: Tensor) -> Dict[str, Tensor]:
    return gd_fit(h, X, y, STEPS_SOLVE)


def ridge_inner(p: Dict[str, Tensor], h: Dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((X @ p["w"] - y) ** 2).mean() + 0.5 * (h["l"].exp() * p["w"] ** 2).sum()


def ridge_fit(h: Dict[str, Tensor], X: Tensor, y: Tensor) -> Dict[str, Tensor]:
    A = X.T @ X / X.shape[0] + torch.diag(h["l"].exp())
    return {"w": torch.linalg.solve(A, X.T @ y / X.shape[0])}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One torch thread: on a shared 2-core machine, intra-op threads of the batched ops spin against
    other processes (a first run with 2 threads under load made the vmapped solve 25× slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


#: case -> (inner loss, inner solver, adjoint solver (None: the library's default, bl.CG()), n, d, log decays)
CASES: Dict[str, Tuple[Callable[..., Tensor], Callable[..., Dict[str, Tensor]], Any, int, int, Tuple[float, float]]] = {
    "gd": (logistic_inner, gd_fit, bl.CG(maxiter=50, tol=1e-6), N, D, (-4.0, -1.0)),
    "closed": (ridge_inner, ridge_fit, bl.CG(maxiter=50, tol=1e-6), N, D, (-4.0, -1.0)),
    "solve": (logistic_inner, gd_fit_short, None, N_SOLVE, D_SOLVE, (-6.0, -3.0))}


def hypergradient_fns(case: str) -> Tuple[Callable[[], Any], Callable[[], Any], Any]:
    """``(loop, vmapped, fit)``: the first two return the (16, d) hypergradients of the validation loss."""
    inner, solve, solver, n, d, (lo, hi) = CASES[case]
    fit = bl.implicit_diff(inner, solver=solver)(solve)
    X, y, Xv, yv = _data(n=n, d=d)
    hb = {"l": torch.linspace(lo, hi, SETTINGS)[:, None] + 0.1 * torch.randn(SETTINGS, d,
                                                                               generator=torch.Generator().manual_seed(1))}
    outer = lambda h: torch.nn.functional.binary_cross_entropy_with_logits(Xv @ fit(h, X, y)["w"], yv) \
        if inner is logistic_inner else 0.5 * ((Xv @ fit(h, X, y)["w"] - yv) ** 2).mean()
    grad = torch.func.grad(outer)
    loop = lambda: torch.stack([grad({"l": hb["l"][i]})["l"] for i in range(SETTINGS)])
    vmapped = lambda: torch.func.vmap(grad)(hb)["l"]
    return loop, vmapped, fit


@pytest.mark.parametrize("case", list(CASES))
def test_loop(case: str, measure: Measure) -> None:
    """The unit: 16 separate hypergradient calls."""
    loop, _, _ = hypergradient_fns(case)
    measure(loop, group=f"{GROUP}-{case}", name=f"{case}: loop of {SETTINGS} grad calls (unit)", unit=True)


@pytest.mark.parametrize("case", list(CASES))
def test_vmap(case: str, measure: Measure) -> None:
    """The same 16 hypergradients in one vmapped call, checked against the loop first."""
    loop, vmapped, fit = hypergradient_fns(case)
    a, b = loop(), vmapped()
    assert float((a - b).norm() / b.norm()) < 1e-4          # the same hypergradients (float32, CG tol 1e-6)
    assert fit.diagnostics.info.solver.extra["vmap"] == f"batched: {SETTINGS} systems in lockstep"
    measure(vmapped, group=f"{GROUP}-{case}", name=f"{case}: vmap(grad) over {SETTINGS} settings", paired_with=loop)
