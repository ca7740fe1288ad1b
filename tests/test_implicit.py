"""Implicit hypergradients against closed forms and dense float64 solves."""

import math

import pytest
import torch

import bilevel as bl

from conftest import rel_err, tree_rel_err

DT = torch.float64


# -- per-feature ridge regression: exact hypergradient in closed form ------------------------
def ridge_problem(n=40, d=6, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = X @ torch.randn(d, generator=g, dtype=DT) + 0.5 * torch.randn(n, generator=g, dtype=DT)
    Xv = torch.randn(30, d, generator=g, dtype=DT)
    yv = Xv @ torch.randn(d, generator=g, dtype=DT)
    lam = 0.5 * torch.randn(d, generator=g, dtype=DT)                  # log of per-feature decay
    A = X.T @ X + torch.diag(lam.exp())
    w = torch.linalg.solve(A, X.T @ y)
    # L_V = ½‖Xv w − yv‖²;  dw/dλ = −A⁻¹ diag(e^λ ⊙ w)  ⇒  dL_V/dλ = −(e^λ ⊙ w) ⊙ A⁻¹ ∇_w L_V
    ref = -(lam.exp() * w) * torch.linalg.solve(A, Xv.T @ (Xv @ w - yv))
    cast = lambda t: t.to(dtype)
    return dict(X=cast(X), y=cast(y), Xv=cast(Xv), yv=cast(yv), lam=cast(lam), w=cast(w), A=A, ref=ref)


def ridge_inner(p, h, X, y):
    return 0.5 * ((X @ p["w"] - y) ** 2).sum() + 0.5 * (h["lam"].exp() * p["w"] ** 2).sum()


def ridge_outer(p, h, X, y):
    return 0.5 * ((X @ p["w"] - y) ** 2).sum()


def ridge_hg(P, solver, **kw):
    return bl.implicit_hypergrad(ridge_inner, ridge_outer, {"w": P["w"]}, {"lam": P["lam"]}, solver=solver,
                                 inner_args=(P["X"], P["y"]), outer_args=(P["Xv"], P["yv"]), **kw)


@pytest.mark.parametrize("solver", [bl.CG(), bl.Exact()])
@pytest.mark.parametrize("hvp_mode", ["auto", "forward"])
def test_ridge_cg_and_exact_match_closed_form(solver, hvp_mode):
    P = ridge_problem()
    hg = ridge_hg(P, solver, hvp_mode=hvp_mode)
    assert rel_err(hg["lam"], P["ref"]) < 1e-8
    assert hg.info.inner_grad_norm < 1e-10 and hg.info.solver.converged
    assert hg.info.hvp_mode == ("forward" if hvp_mode == "forward" else "reverse")
    assert math.isclose(hg.info.outer_loss, float(ridge_outer({"w": P["w"]}, None, P["Xv"], P["yv"])), rel_tol=1e-12)


def test_ridge_neumann_and_nystrom_converge_to_closed_form():
    P = ridge_problem()
    neu = [rel_err(ridge_hg(P, bl.Neumann(steps=k))["lam"], P["ref"]) for k in (2, 5, 10, 30, 200)]
    assert all(b <= a for a, b in zip(neu, neu[1:])) and neu[0] > 1e-3 and neu[-1] < 1e-8, neu
    nys = [rel_err(ridge_hg(P, bl.Nystrom(rank=k, rho=1e-9, sketch="gaussian"))["lam"], P["ref"]) for k in (2, 4, 6)]
    assert nys[-1] < 1e-6 and nys[-1] < nys[0], nys
    ident = ridge_hg(P, bl.Identity())["lam"]
    assert torch.isfinite(ident).all() and ident.norm() > 0   # a finite (biased) direction


def test_ridge_float32_tolerance():
    P = ridge_problem(dtype=torch.float32)
    hg = ridge_hg(P, bl.CG(maxiter=50, tol=1e-7))
    assert hg["lam"].dtype == torch.float32 and rel_err(hg["lam"], P["ref"]) < 1e-3


def test_multi_key_hparams_and_direct_term():
    # L_V depends on hparams directly: L_V = ½‖Xv w − yv‖² + s·‖w‖², s a hparam used only by the outer loss.
    P = ridge_problem()
    s = torch.tensor(0.3, dtype=DT)
    outer = lambda p, h, X, y: ridge_outer(p, h, X, y) + h["s"] * (p["w"] ** 2).sum()
    hg = bl.implicit_hypergrad(ridge_inner, outer, {"w": P["w"]}, {"lam": P["lam"], "s": s},
                               inner_args=(P["X"], P["y"]), outer_args=(P["Xv"], P["yv"]))
    w, lam, A = P["w"], P["lam"], P["A"]
    gw = P["Xv"].T @ (P["Xv"] @ w - P["yv"]) + 2 * s * w
    assert rel_err(hg["lam"], -(lam.exp() * w) * torch.linalg.solve(A, gw)) < 1e-9
    assert rel_err(hg["s"], (w ** 2).sum()) < 1e-12          # direct term only


# -- kernel ridge regression through @implicit_diff --------------------------------------------
def test_kernel_ridge_implicit_diff_closed_form():
    g = torch.Generator().manual_seed(2)
    Xt, Xv = torch.randn(25, 3, generator=g, dtype=DT), torch.randn(15, 3, generator=g, dtype=DT)
    f = lambda X: torch.sin(X.sum(1)) + 0.1 * X[:, 0]
    yt, yv = f(Xt) + 0.1 * torch.randn(25, generator=g, dtype=DT), f(Xv)
    d2 = lambda A, B: ((A[:, None, :] - B[None, :, :]) ** 2).sum(-1)
    Dt, Dv = d2(Xt, Xt), d2(Xv, Xt)

    def inner(p, h, D, y):   # minimizer: α = (K + λI)⁻¹ y
        K = torch.exp(-h["log_gamma"].exp() * D)
        a = p["alpha"]
        return 0.5 * ((K @ a - y) ** 2).sum() + 0.5 * h["log_lam"].exp() * a @ K @ a

    @bl.implicit_diff(inner, solver=bl.CG(maxiter=200, tol=1e-13))
    def fit(h, D, y):
        K = torch.exp(-h["log_gamma"].exp() * D)
        return {"alpha": torch.linalg.solve(K + h["log_lam"].exp() * torch.eye(len(y), dtype=DT), y)}

    h = {"log_lam": torch.tensor(-1.0, dtype=DT, requires_grad=True),
         "log_gamma": torch.tensor(-0.5, dtype=DT, requires_grad=True)}
    sol = fit(h, Dt, yt)
    Kv = torch.exp(-h["log_gamma"].exp() * Dv)
    loss = 0.5 * ((Kv @ sol["alpha"] - yv) ** 2).sum()
    loss.backward()
    assert sol.info is not None and sol.info.solver.converged and sol.info.inner_grad_norm < 1e-8

    # closed form, no autograd
    lam, gam = math.exp(-1.0), math.exp(-0.5)
    K, Kv = torch.exp(-gam * Dt), torch.exp(-gam * Dv)
    M = K + lam * torch.eye(25, dtype=DT)
    a = torch.linalg.solve(M, yt)
    r = Kv @ a - yv
    dK, dKv = -gam * Dt * K, -gam * Dv * Kv               # d/dlog γ
    da_dlam = -torch.linalg.solve(M, lam * a)
    da_dgam = -torch.linalg.solve(M, dK @ a)
    ref_lam = r @ (Kv @ da_dlam)
    ref_gam = r @ (dKv @ a + Kv @ da_dgam)
    assert rel_err(h["log_lam"].grad, ref_lam) < 1e-7
    assert rel_err(h["log_gamma"].grad, ref_gam) < 1e-7


def test_implicit_diff_under_autograd_grad_and_no_grad():
    P = ridge_problem()

    @bl.implicit_diff(ridge_inner)
    def fit(h, X, y):
        return {"w": torch.linalg.solve(X.T @ X + torch.diag(h["lam"].exp()), X.T @ y)}

    lam = P["lam"].clone().requires_grad_(True)
    sol = fit({"lam": lam}, P["X"], P["y"])
    (g,) = torch.autograd.grad(ridge_outer(sol, None, P["Xv"], P["yv"]), [lam])
    assert rel_err(g, P["ref"]) < 1e-8
    with torch.no_grad():
        sol = fit({"lam": lam}, P["X"], P["y"])
    assert not sol["w"].requires_grad and rel_err(sol["w"], P["w"]) < 1e-12
    with pytest.raises(ValueError, match="requires_grad"):
        fit({"lam": P["lam"]}, P["X"], P["y"])


# -- logistic regression with per-feature L2 at a Newton optimum -----------------------------
def test_logistic_per_feature_l2_against_dense_solve():
    g = torch.Generator().manual_seed(4)
    n, d = 80, 7
    X, Xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(50, d, generator=g, dtype=DT)
    wt = torch.randn(d, generator=g, dtype=DT)
    y = (torch.rand(n, generator=g, dtype=DT) < torch.sigmoid(X @ wt)).to(DT)
    yv = (torch.rand(50, generator=g, dtype=DT) < torch.sigmoid(Xv @ wt)).to(DT)
    lam = torch.randn(d, generator=g, dtype=DT) - 2.0

    bce = torch.nn.functional.binary_cross_entropy_with_logits
    inner = lambda p, h, X, y: bce(X @ p["w"], y) + 0.5 * (h["lam"].exp() * p["w"] ** 2).sum()
    outer = lambda p, h, X, y: bce(X @ p["w"], y)

    w = torch.zeros(d, dtype=DT)
    for _ in range(50):   # Newton, closed-form gradient and Hessian
        s = torch.sigmoid(X @ w)
        grad = X.T @ (s - y) / n + lam.exp() * w
        H = X.T @ (X * (s * (1 - s))[:, None]) / n + torch.diag(lam.exp())
        w = w - torch.linalg.solve(H, grad)
    s = torch.sigmoid(X @ w)
    H = X.T @ (X * (s * (1 - s))[:, None]) / n + torch.diag(lam.exp())
    gv = Xv.T @ (torch.sigmoid(Xv @ w) - yv) / 50
    ref = -(lam.exp() * w) * torch.linalg.solve(H, gv)

    for solver, tol in [(bl.CG(), 1e-8), (bl.Exact(), 1e-10), (bl.Neumann(steps=4000), 1e-6),
                        (bl.Nystrom(rank=d, rho=1e-10), 1e-6)]:
        hg = bl.implicit_hypergrad(inner, outer, {"w": w}, {"lam": lam}, solver=solver,
                                   inner_args=(X, y), outer_args=(Xv, yv))
        assert rel_err(hg["lam"], ref) < tol, (solver, rel_err(hg["lam"], ref))
        assert hg.info.inner_grad_norm < 1e-12


# -- K Neumann terms at w* == K+1 unrolled gradient steps differentiated from w* ---------------
@pytest.mark.parametrize("K", [0, 1, 5, 20])
def test_neumann_equals_unrolled_steps_from_optimum(K):
    P = ridge_problem()
    alpha = 0.5 / float(torch.linalg.eigvalsh(P["A"]).max())
    lam = P["lam"].clone().requires_grad_(True)
    w = P["w"].clone()                                   # w* treated as a constant start
    for _ in range(K + 1):
        g = torch.autograd.grad(ridge_inner({"w": w}, {"lam": lam}, P["X"], P["y"]) if w.requires_grad
                                else ridge_inner({"w": w.requires_grad_(True)}, {"lam": lam}, P["X"], P["y"]),
                                w, create_graph=True)[0]
        w = w - alpha * g
    (unrolled,) = torch.autograd.grad(ridge_outer({"w": w}, None, P["Xv"], P["yv"]), lam)
    hg = ridge_hg(P, bl.Neumann(steps=K, alpha=alpha))
    assert rel_err(hg["lam"], unrolled) < 1e-10


# -- errors -------------------------------------------------------------------------------------
def test_input_errors_are_clear():
    P = ridge_problem()
    args = dict(inner_args=(P["X"], P["y"]), outer_args=(P["Xv"], P["yv"]))
    with pytest.raises(bl.ShapeError, match=r"outer_loss.*scalar.*got shape \(30,\)"):
        bl.implicit_hypergrad(ridge_inner, lambda p, h, X, y: (X @ p["w"] - y) ** 2, {"w": P["w"]},
                              {"lam": P["lam"]}, **args)
    with pytest.raises(bl.ShapeError, match="scalar"):
        bl.implicit_hypergrad(lambda p, h, X, y: (X @ p["w"] - y) ** 2, ridge_outer, {"w": P["w"]},
                              {"lam": P["lam"]}, **args)
    with pytest.raises(bl.NonFiniteError, match=r"params\['w'\].*1 NaN"):
        w = P["w"].clone()
        w[0] = float("nan")
        bl.implicit_hypergrad(ridge_inner, ridge_outer, {"w": w}, {"lam": P["lam"]}, **args)
    with pytest.raises(bl.NonFiniteError, match="outer_loss"):
        bl.implicit_hypergrad(ridge_inner, lambda p, h, X, y: ridge_outer(p, h, X, y) * float("inf"),
                              {"w": P["w"]}, {"lam": P["lam"]}, **args)
    with pytest.raises(TypeError, match="inner_args"):
        bl.implicit_hypergrad(ridge_inner, ridge_outer, {"w": P["w"]}, {"lam": P["lam"]}, inner_args=P["X"])
    with pytest.raises(bl.ShapeError, match="empty"):
        bl.implicit_hypergrad(ridge_inner, ridge_outer, {"w": P["w"]}, {}, **args)
    with pytest.raises(TypeError, match="floating-point"):
        bl.implicit_hypergrad(ridge_inner, ridge_outer, {"w": P["w"]}, {"lam": torch.ones(6, dtype=torch.long)}, **args)
    with pytest.raises(TypeError, match="scalar torch.Tensor"):
        bl.implicit_hypergrad(ridge_inner, lambda p, h, X, y: 1.0, {"w": P["w"]}, {"lam": P["lam"]}, **args)


def test_inputs_unchanged_and_result_detached():
    P = ridge_problem()
    w, lam = P["w"].clone().requires_grad_(True), P["lam"].clone().requires_grad_(True)
    before = (w.detach().clone(), lam.detach().clone())
    hg = bl.implicit_hypergrad(ridge_inner, ridge_outer, {"w": w}, {"lam": lam},
                               inner_args=(P["X"], P["y"]), outer_args=(P["Xv"], P["yv"]))
    assert w.grad is None and lam.grad is None
    assert torch.equal(w.detach(), before[0]) and torch.equal(lam.detach(), before[1])
    assert not hg["lam"].requires_grad


def test_unconverged_inner_point_reports_gradient_norm():
    P = ridge_problem()
    w_off = P["w"] + 0.1
    hg = bl.implicit_hypergrad(ridge_inner, ridge_outer, {"w": w_off}, {"lam": P["lam"]},
                               inner_args=(P["X"], P["y"]), outer_args=(P["Xv"], P["yv"]))
    expected = float((P["X"].T @ (P["X"] @ w_off - P["y"]) + P["lam"].exp() * w_off).norm())
    assert math.isclose(hg.info.inner_grad_norm, expected, rel_tol=1e-10)


def test_user_solver_callable_seam():
    P = ridge_problem()
    dense = lambda matvec, b: bl.Exact()(matvec, b)           # any callable solver(matvec, b) -> tree
    hg = bl.implicit_hypergrad(ridge_inner, ridge_outer, {"w": P["w"]}, {"lam": P["lam"]}, solver=dense,
                               inner_args=(P["X"], P["y"]), outer_args=(P["Xv"], P["yv"]))
    assert rel_err(hg["lam"], P["ref"]) < 1e-10 and hg.info.solver.solver == "Exact"
    with pytest.raises(TypeError, match="solver"):
        bl.implicit_hypergrad(ridge_inner, ridge_outer, {"w": P["w"]}, {"lam": P["lam"]}, solver="cg",
                              inner_args=(P["X"], P["y"]), outer_args=(P["Xv"], P["yv"]))


# -- property: random quadratic bilevel problems ------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 8), st.integers(1, 5), st.floats(1.0, 30.0), st.integers(0, 10_000))
def test_random_quadratic_bilevel(P_dim, m, cond, seed):
    # inner ½ wᵀAw − wᵀBλ  ⇒  w* = A⁻¹Bλ ;  outer ½‖w − t‖² + ½ c‖λ‖²  ⇒  dL/dλ = BᵀA⁻¹(w* − t) + cλ
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P_dim, P_dim, generator=g, dtype=DT))
    A = (Q * torch.linspace(1.0, cond, P_dim, dtype=DT)) @ Q.T
    B = torch.randn(P_dim, m, generator=g, dtype=DT)
    t = torch.randn(P_dim, generator=g, dtype=DT)
    lam = torch.randn(m, generator=g, dtype=DT)
    c = 0.3
    w = torch.linalg.solve(A, B @ lam)
    ref = B.T @ torch.linalg.solve(A, w - t) + c * lam
    inner = lambda p, h: 0.5 * p["w"] @ A @ p["w"] - p["w"] @ (B @ h["l"])
    outer = lambda p, h: 0.5 * ((p["w"] - t) ** 2).sum() + 0.5 * c * (h["l"] ** 2).sum()
    for solver, tol in [(bl.CG(maxiter=4 * P_dim + 10, tol=1e-13), 1e-9), (bl.Exact(), 1e-11),
                        (bl.Nystrom(rank=P_dim, rho=1e-11), 1e-7)]:
        hg = bl.implicit_hypergrad(inner, outer, {"w": w}, {"l": lam}, solver=solver)
        assert rel_err(hg["l"], ref) < tol, solver


# -- penalty=: a separable penalty outside the double-backward graph, same closed form ----------
@pytest.mark.parametrize("solver", [bl.CG(), bl.Exact(), bl.Nystrom(rank=6, rho=1e-12)])
@pytest.mark.parametrize("hvp_mode", ["auto", "forward"])
def test_ridge_penalty_argument_matches_closed_form(solver, hvp_mode):
    P = ridge_problem()
    data = lambda p, h, X, y: 0.5 * ((X @ p["w"] - y) ** 2).sum()
    _, wd = bl.hparams.weight_decay({"w": P["w"]}, per="parameter")       # keys {"w": "weight_decay/w"}
    hp_key = next(iter(wd.keys.values()))
    for pen in (wd, lambda p, h: wd(p, h)):                               # closed form, then autograd
        hg = bl.implicit_hypergrad(data, ridge_outer, {"w": P["w"]}, {hp_key: P["lam"]}, solver=solver,
                                   inner_args=(P["X"], P["y"]), outer_args=(P["Xv"], P["yv"]), hvp_mode=hvp_mode,
                                   penalty=pen)
        assert rel_err(hg[hp_key], P["ref"]) < 1e-8
        assert hg.info.inner_grad_norm < 1e-10     # the penalty's gradient is counted


def test_implicit_diff_penalty_argument():
    P = ridge_problem()
    data = lambda p, h, X, y: 0.5 * ((X @ p["w"] - y) ** 2).sum()
    pen = lambda p, h: 0.5 * (h["lam"].exp() * p["w"] ** 2).sum()

    @bl.implicit_diff(data, penalty=pen)
    def ridge(h, X, y):
        A = X.T @ X + torch.diag(h["lam"].exp())
        return {"w": torch.linalg.solve(A, X.T @ y)}

    h = {"lam": P["lam"].clone().requires_grad_(True)}
    ridge_outer(ridge(h, P["X"], P["y"]), None, P["Xv"], P["yv"]).backward()
    assert rel_err(h["lam"].grad, P["ref"]) < 1e-8


# -- warm starts ----------------------------------------------------------------------------------
def _ridge_sequence(d=30, n=80, seed=0):
    """Per-feature ridge: inner(w, h) = ½‖Xw − y‖²/n + ½ Σ e^{h_j} w_j², its exact argmin, an outer loss."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    Xv, yv = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    inner = lambda p, h: 0.5 * ((X @ p["w"] - y) ** 2).mean() + 0.5 * (h["l"].exp() * p["w"] ** 2).sum()
    outer = lambda p, h: 0.5 * ((Xv @ p["w"] - yv) ** 2).mean()

    def argmin(h):
        return {"w": torch.linalg.solve(X.T @ X / n + torch.diag(h["l"].exp()), X.T @ y / n)}
    return inner, outer, argmin, d


def test_u0_at_the_solution_needs_no_iterations_and_changes_nothing():
    inner, outer, argmin, d = _ridge_sequence()
    h = {"l": torch.full((d,), -3.0, dtype=torch.float64)}
    w = argmin(h)
    exact = bl.implicit_hypergrad(inner, outer, w, h, solver=bl.Exact())
    cold = bl.implicit_hypergrad(inner, outer, w, h, solver=bl.CG(maxiter=200, tol=1e-12))
    warm = bl.implicit_hypergrad(inner, outer, w, h, solver=bl.CG(maxiter=200, tol=1e-8), u0=exact.info.adjoint)
    assert warm.info.solver.iterations == 0 and cold.info.solver.iterations > 10
    assert tree_rel_err(warm, exact) < 1e-10 and tree_rel_err(cold, exact) < 1e-8
    neu = bl.implicit_hypergrad(inner, outer, w, h, solver=bl.Neumann(steps=3), u0=exact.info.adjoint)
    assert tree_rel_err(neu, exact) < 1e-10                  # Richardson from the solution stays there
    with pytest.raises(TypeError, match="starting point"):
        bl.implicit_hypergrad(inner, outer, w, h, solver=bl.Nystrom(rank=3), u0=exact.info.adjoint)
    with pytest.raises(bl.ShapeError):
        bl.implicit_hypergrad(inner, outer, w, h, u0={"w": torch.zeros(d + 1, dtype=torch.float64)})


@pytest.mark.parametrize("solver", [bl.CG(maxiter=2, tol=0.0), bl.Neumann(steps=4)], ids=["cg", "neumann"])
def test_warm_start_accumulates_accuracy_over_a_slowly_moving_sequence(solver):
    """Hyperparameters drift a little per step (as in a hyper step); with the previous adjoint as u0 a
    2-iteration CG (or 4-term Neumann) keeps refining, while cold starts stay at their first error
    (measured after 25 steps: CG 0.003 vs 0.32, Neumann 0.015 vs 0.53)."""
    inner, outer, argmin, d = _ridge_sequence()
    u0, cold_err, warm_err = None, [], []
    for t in range(25):
        h = {"l": torch.full((d,), -1.0, dtype=torch.float64) + 0.01 * t}
        w = argmin(h)
        exact = bl.implicit_hypergrad(inner, outer, w, h, solver=bl.Exact())
        cold = bl.implicit_hypergrad(inner, outer, w, h, solver=solver)
        warm = bl.implicit_hypergrad(inner, outer, w, h, solver=solver, u0=u0)
        u0 = warm.info.adjoint
        cold_err.append(tree_rel_err(cold, exact))
        warm_err.append(tree_rel_err(warm, exact))
    assert warm_err[0] == pytest.approx(cold_err[0])          # no u0 at the first step
    assert max(warm_err[-5:]) < 0.1 * min(cold_err[-5:]), (warm_err[-5:], cold_err[-5:])
