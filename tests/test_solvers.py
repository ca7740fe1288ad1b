"""Linear solvers against dense float64 solves (torch.linalg.solve) on random SPD systems."""

import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bilevel as bl

from conftest import rel_err

DT = torch.float64


def spd(n: int, cond: float, seed: int, dtype=DT) -> torch.Tensor:
    """Random SPD matrix with eigenvalues log-spaced in [1, cond]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    ev = torch.logspace(0, math.log10(cond), n, dtype=DT) if n > 1 else torch.ones(1, dtype=DT)
    return ((Q * ev) @ Q.T).to(dtype)


def mv_of(A):
    return lambda v: {"x": A @ v["x"]}


def solve(solver, A, b):
    return solver(mv_of(A), {"x": b})


systems = st.tuples(st.integers(1, 12), st.floats(1.0, 50.0), st.integers(0, 10_000))
hsettings = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@hsettings
@given(systems)
def test_cg_and_exact_solve_random_spd(system):
    n, cond, seed = system
    A = spd(n, cond, seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    ref = torch.linalg.solve(A, b)
    x = solve(bl.CG(maxiter=4 * n + 10, tol=1e-12), A, b)
    assert rel_err(x["x"], ref) < 1e-9
    assert x.info.converged and x.info.relative_residual <= 1e-12 * 1.01
    assert x.info.iterations <= x.info.matvecs <= min(x.info.iterations + 4, 4 * n + 10)
    assert rel_err(solve(bl.Exact(), A, b)["x"], ref) < 1e-11


@hsettings
@given(systems)
def test_neumann_auto_alpha_and_nystrom_full_rank(system):
    n, cond, seed = system
    A = spd(n, cond, seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    ref = torch.linalg.solve(A, b)
    # α = 1/λ_max: contraction (1 − 1/κ) per term, so 40·κ terms leave < e^-40.
    x = solve(bl.Neumann(steps=int(40 * cond) + 1), A, b)
    assert rel_err(x["x"], ref) < 1e-9
    assert 0 < x.info.extra["lambda_max"] <= torch.linalg.eigvalsh(A).max() * (1 + 1e-9)
    for sketch in ["columns", "gaussian"]:
        y = solve(bl.Nystrom(rank=n, rho=1e-10, sketch=sketch), A, b)
        assert rel_err(y["x"], ref) < 1e-8, sketch


def test_neumann_converges_monotonically_in_steps():
    A, b = spd(20, 30.0, 1), torch.randn(20, dtype=DT)
    ref = torch.linalg.solve(A, b)
    errs = [rel_err(solve(bl.Neumann(steps=k), A, b)["x"], ref) for k in (5, 20, 80, 320, 1280)]
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-10
    # the reported residual bounds the true one
    x = solve(bl.Neumann(steps=50), A, b)
    assert float((A @ x["x"] - b).norm()) <= x.info.residual_norm * (1 + 1e-9)


def test_nystrom_error_shrinks_with_rank():
    # Low-rank + small diagonal: what Nyström is built for.
    g = torch.Generator().manual_seed(3)
    U = torch.randn(40, 5, generator=g, dtype=DT)
    A = U @ U.T + 0.1 * torch.eye(40, dtype=DT)
    b = torch.randn(40, generator=g, dtype=DT)
    ref = torch.linalg.solve(A, b)
    errs = [rel_err(solve(bl.Nystrom(rank=k, rho=1e-10, sketch="gaussian", seed=1), A, b)["x"], ref)
            for k in (2, 10, 40)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-8, errs


@pytest.mark.parametrize("sketch", ["columns", "gaussian"])
def test_nystrom_auto_rho_is_exact_at_full_rank_scale_free_and_bounded(sketch):
    """rho="auto" (the default): the captured subspace is inverted exactly and the rest of the
    spectrum is taken to be Â's smallest eigenvalue. Exact at full rank, equivariant under scaling
    of H (x(cH) = x(H)/c, which no fixed ρ is), and far from the 1/ρ blow-up of a fixed ρ = 1e-3 on a
    Hessian whose small eigenvalues are ≫ 1e-3."""
    A, b = spd(30, 50.0, 4), torch.randn(30, generator=torch.Generator().manual_seed(9), dtype=DT)
    ref = torch.linalg.solve(A, b)
    assert bl.Nystrom().rho == "auto"
    assert rel_err(solve(bl.Nystrom(rank=30, sketch=sketch), A, b)["x"], ref) < 1e-10
    for k in (3, 10):
        x = solve(bl.Nystrom(rank=k, sketch=sketch), A, b)["x"]
        x_scaled = solve(bl.Nystrom(rank=k, sketch=sketch), 1e3 * A, b)["x"]
        assert rel_err(1e3 * x_scaled, x) < 1e-10
        # a rank-k answer is biased (error O(1) here), but not blown up by 1/ρ outside the sketch
        assert rel_err(x, ref) < 1.5 < rel_err(solve(bl.Nystrom(rank=k, rho=1e-3, sketch=sketch), A, b)["x"], ref)


def test_identity_is_scaled_rhs_and_reports_residual():
    A, b = spd(5, 4.0, 2), torch.randn(5, dtype=DT)
    x = solve(bl.Identity(scale=0.5, damping=1.0), A, b)
    assert torch.allclose(x["x"], b * 0.5 / 1.5)
    assert math.isclose(x.info.residual_norm, float(((A + torch.eye(5, dtype=DT)) @ x["x"] - b).norm()), rel_tol=1e-12)
    assert math.isnan(solve(bl.Identity(residual=False), A, b).info.residual_norm)


@pytest.mark.parametrize("solver", [bl.CG(), bl.Exact(), bl.Neumann(steps=2000), bl.Nystrom(rank=6, rho=1e-12)])
def test_damping_solves_shifted_system(solver):
    A, b = spd(6, 10.0, 5), torch.randn(6, dtype=DT)
    damped = type(solver)(**{**solver.__dict__, "damping": 0.7})
    x = solve(damped, A, b)
    assert rel_err(x["x"], torch.linalg.solve(A + 0.7 * torch.eye(6, dtype=DT), b)) < 1e-9


def test_tree_layout_with_several_keys():
    A = spd(7, 5.0, 9)
    b = {"a": torch.randn(2, 2, dtype=DT), "b": torch.randn(3, dtype=DT)}

    def mv(v):
        out = A @ torch.cat([v["a"].reshape(-1), v["b"]])
        return {"a": out[:4].reshape(2, 2), "b": out[4:]}

    x = bl.CG()(mv, b)
    ref = torch.linalg.solve(A, torch.cat([b["a"].reshape(-1), b["b"]]))
    assert x["a"].shape == (2, 2) and rel_err(torch.cat([x["a"].reshape(-1), x["b"]]), ref) < 1e-10
    with pytest.raises(bl.ShapeError, match="keys"):
        bl.CG()(lambda v: {"a": v["a"]}, b)


def test_neumann_too_large_step_raises_divergence():
    A, b = spd(10, 10.0, 4), torch.randn(10, dtype=DT)
    lam_max = float(torch.linalg.eigvalsh(A).max())
    with pytest.raises(bl.DivergenceError, match=r"diverges.*alpha=None"):
        solve(bl.Neumann(steps=50, alpha=2.5 / lam_max), A, b)
    # just below the limit it converges (slowly)
    x = solve(bl.Neumann(steps=50, alpha=1.9 / lam_max), A, b)
    assert torch.isfinite(x["x"]).all()


def test_neumann_negative_curvature_raises():
    A = torch.diag(torch.tensor([-5.0, 1.0, 2.0], dtype=DT))   # dominated by negative curvature
    with pytest.raises(bl.DivergenceError, match="negative curvature"):
        solve(bl.Neumann(steps=10), A, torch.ones(3, dtype=DT))
    A = torch.diag(torch.tensor([-0.5, 1.0, 4.0], dtype=DT))    # positive dominant, series grows slowly
    with pytest.raises(bl.DivergenceError, match="diverges"):
        solve(bl.Neumann(steps=200), A, torch.ones(3, dtype=DT))


def test_cg_indefinite_is_detected_stopped_or_damped():
    A = torch.diag(torch.tensor([3.0, 1.0, -1.0, 2.0], dtype=DT))
    b = torch.ones(4, dtype=DT)
    with pytest.raises(bl.DivergenceError, match="positive definite.*damping"):
        solve(bl.CG(), A, b)
    x = solve(bl.CG(on_indefinite="stop"), A, b)
    assert torch.isfinite(x["x"]).all() and not x.info.converged and x.info.extra["indefinite"]
    x = solve(bl.CG(damping=2.0), A, b)
    assert rel_err(x["x"], torch.linalg.solve(A + 2.0 * torch.eye(4, dtype=DT), b)) < 1e-10


CG_FORMS = [(None, None), (None, False), ("torch", None)]
CG_FORM_IDS = ["textbook-host-scalars", "textbook-device-scalars", "chronopoulos-gear"]


@pytest.mark.parametrize("path, host", CG_FORMS, ids=CG_FORM_IDS)
def test_cg_stop_before_the_first_step_returns_the_scaled_right_hand_side(path, host):
    # bᵀAb/bᵀb = (1 − 3 + 0.5)/3 = −0.5: negative curvature along b itself, so CG stops before any
    # step. Zero would make the hypergradient zero; the fallback is b / |bᵀAb/bᵀb| = 2b.
    A = torch.diag(torch.tensor([1.0, -3.0, 0.5], dtype=DT))
    b = torch.ones(3, dtype=DT)
    x, info = bl.CG(maxiter=10, on_indefinite="stop")._solve(lambda v: A @ v, b, None, path, host)
    assert torch.allclose(x, 2.0 * b, rtol=1e-14, atol=0)
    assert info.extra["indefinite"] and "fallback" in info.extra and not info.converged
    assert abs(info.residual_norm - float((A @ x - b).norm())) < 1e-12        # its own residual
    # a solve that made progress before the stop, or a warm start, is returned as before
    A2 = torch.diag(torch.tensor([3.0, 1.0, -1.0, 2.0], dtype=DT))
    x2, info2 = bl.CG(on_indefinite="stop")._solve(lambda v: A2 @ v, torch.ones(4, dtype=DT), None, path, host)
    assert "fallback" not in info2.extra and info2.extra["indefinite"]
    x0 = torch.full((3,), 0.1, dtype=DT)
    x3, info3 = bl.CG(maxiter=10, on_indefinite="stop")._solve(lambda v: A @ v, b, x0, path, host)
    assert "fallback" not in info3.extra
    # a zero-curvature direction has no scale: x stays zero; and "raise" still raises
    x4, info4 = bl.CG(maxiter=10, on_indefinite="stop")._solve(lambda v: 0 * v, b, None, path, host)
    assert not x4.any() and "fallback" not in info4.extra
    with pytest.raises(bl.DivergenceError, match="positive definite"):
        bl.CG(maxiter=10)._solve(lambda v: A @ v, b, None, path, host)


def _textbook_pair(cg, A, b, x0=None):
    """The same solve with host scalars and with device scalars (both textbook CG)."""
    return cg._solve(A, b, x0, None, True), cg._solve(A, b, x0, None, False)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("cond", [1.0, 30.0, 1e4])
def test_host_scalar_cg_takes_the_device_forms_iterates(dtype, tol, cond):
    A = spd(40, cond, seed=3, dtype=dtype)
    b = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=dtype)
    b_before = b.clone()
    for cg in (bl.CG(maxiter=7, tol=0.0), bl.CG(maxiter=300, tol=tol, check_every=5)):
        for x0 in (None, torch.full((40,), 0.1, dtype=dtype)):
            (xh, ih), (xd, idv) = _textbook_pair(cg, lambda v: A @ v, b, x0)
            assert torch.equal(b, b_before)                        # b is read, never written
            assert rel_err(xh, xd) < (1e-10 if dtype == torch.float64 else 1e-4) * cond
            assert ih.converged == idv.converged and abs(ih.iterations - idv.iterations) <= 1 + idv.iterations // 20
            assert ih.matvecs <= idv.matvecs                       # no product past convergence
            if ih.converged:
                assert ih.matvecs == ih.iterations + (x0 is not None) or ih.iterations == 0
                assert rel_err(xh, torch.linalg.solve(A, b)) < 1e-8 * cond if dtype == torch.float64 else True
            if not ih.converged:                                   # the same budget: the same residual
                assert ih.residual_norm == pytest.approx(idv.residual_norm, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("skew", [0.0, 1e-3, 0.3])
def test_host_scalar_cg_probe_from_zero_measures_the_device_forms_asymmetry(dtype, skew):
    """From zero the host form keeps only b for its symmetry probe; its gap is the device form's."""
    from bilevel import solvers as S
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    A = (spd(30, 1e3, seed=2) + skew * (G - G.T)).to(dtype)
    b = torch.randn(30, generator=gen, dtype=dtype)
    eps = S._FLAT_EPS * torch.finfo(dtype).eps
    host = S._HostScalarCG(lambda v: A @ v, b, None, 0.0, eps)
    device = S._HestenesStiefelCG(lambda v: A @ v, b, None, torch.zeros((), dtype=dtype), eps)
    for _ in range(2):
        host.step(), device.step()
    gap = float(device.probe.gap)
    if skew == 0.0:
        assert host.gap < 10 * torch.finfo(dtype).eps and gap < 10 * torch.finfo(dtype).eps
    else:
        assert host.gap == pytest.approx(gap, rel=1e-6, abs=4 * torch.finfo(dtype).eps)   # to rounding


def test_host_scalar_cg_makes_the_device_forms_decisions():
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(6, generator=gen, dtype=DT)
    indefinite = torch.diag(torch.tensor([3.0, 1.0, -1.0, 2.0, 1.5, 0.5], dtype=DT))
    Q = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=DT))[0]
    singular = Q @ torch.diag(torch.tensor([2.0, 1.0, 0.5, 0.25, 0.0, 0.0], dtype=DT)) @ Q.T
    consistent = singular @ b                                      # in the range: CG converges
    for A, rhs in ((indefinite, b), (singular, consistent), (torch.zeros(6, 6, dtype=DT), b)):
        (xh, ih), (xd, idv) = _textbook_pair(bl.CG(maxiter=20, tol=1e-12, on_indefinite="stop"),
                                             lambda v, A=A: A @ v, rhs)
        assert torch.allclose(xh, xd, rtol=1e-10, atol=1e-12)
        assert (ih.converged, ih.extra["indefinite"], "fallback" in ih.extra) == \
            (idv.converged, idv.extra["indefinite"], "fallback" in idv.extra)
        assert ih.extra["min_rayleigh_quotient"] == pytest.approx(idv.extra["min_rayleigh_quotient"], rel=1e-10)
    for host in (True, False):
        with pytest.raises(bl.DivergenceError, match="positive definite"):
            bl.CG(maxiter=20)._solve(lambda v: indefinite @ v, b, None, None, host)
        with pytest.raises(bl.DivergenceError, match="not symmetric"):
            bl.CG(maxiter=20)._solve(lambda v: (singular + torch.triu(Q)) @ v, b, None, None, host)
        nan_op = lambda v: torch.full_like(v, math.nan)           # noqa: E731
        with pytest.raises(bl.DivergenceError):
            bl.CG(maxiter=20)._solve(nan_op, b, None, None, host)


def test_cg_singular_inconsistent_system_is_not_silent():
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=DT))
    with pytest.raises(bl.DivergenceError):
        solve(bl.CG(), A, torch.ones(2, dtype=DT))


@pytest.mark.parametrize("solver", [bl.CG(), bl.Neumann(), bl.Nystrom(), bl.Identity(), bl.Exact()])
def test_nan_rhs_and_nan_matvec_raise(solver):
    A = spd(3, 2.0, 0)
    with pytest.raises(bl.NonFiniteError, match="finite right-hand side"):
        solve(solver, A, torch.tensor([1.0, float("nan"), 0.0], dtype=DT))
    bad = lambda v: {"x": v["x"] * float("nan")}
    if isinstance(solver, bl.Identity):
        # Identity never uses H: its x stays b, and the residual it reports exposes the NaN.
        x = solver(bad, {"x": torch.ones(3, dtype=DT)})
        assert torch.equal(x["x"], torch.ones(3, dtype=DT)) and math.isnan(x.info.residual_norm)
    else:
        with pytest.raises(bl.DivergenceError):
            solver(bad, {"x": torch.ones(3, dtype=DT)})


def test_exact_refuses_large_and_singular():
    with pytest.raises(bl.ShapeError, match="max_size"):
        bl.Exact(max_size=3).solve_flat(lambda v: v, torch.ones(4, dtype=DT))
    with pytest.raises(bl.DivergenceError, match="singular"):
        bl.Exact().solve_flat(lambda v: v * torch.tensor([1.0, 0.0], dtype=DT), torch.ones(2, dtype=DT))


def test_float32_tolerances():
    A = spd(30, 20.0, 7, dtype=torch.float32)
    b = torch.randn(30)
    ref = torch.linalg.solve(A.double(), b.double())
    x = solve(bl.CG(maxiter=200, tol=1e-6), A, b)
    assert x["x"].dtype == torch.float32 and rel_err(x["x"], ref) < 1e-4
    assert rel_err(solve(bl.Neumann(steps=1500), A, b)["x"], ref) < 1e-4
    assert rel_err(solve(bl.Nystrom(rank=30, rho=1e-6), A, b)["x"], ref) < 1e-3


def test_config_validation_messages():
    with pytest.raises(ValueError, match="Invalid maxiter"):
        bl.CG(maxiter=0)
    with pytest.raises(ValueError, match="Invalid damping"):
        bl.Neumann(damping=-1.0)
    with pytest.raises(ValueError, match="Invalid alpha"):
        bl.Neumann(alpha=0.0)
    with pytest.raises(TypeError, match="rank"):
        bl.Nystrom(rank=2.5)
    with pytest.raises(ValueError, match="Invalid rho"):
        bl.Nystrom(rho=0.0)
    with pytest.raises(ValueError, match="sketch"):
        bl.Nystrom(sketch="svd")
    with pytest.raises(ValueError, match="rho 'auto' or a number"):
        bl.Nystrom(rho="median")
    with pytest.raises(ValueError, match="on_indefinite"):
        bl.CG(on_indefinite="ignore")


def test_cg_stop_returns_the_last_iterate_which_decreases_the_quadratic_model():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=DT))
    ev = torch.cat([torch.logspace(-3, 0, 48, dtype=DT), torch.tensor([-0.05, -0.2], dtype=DT)])
    A = (Q * ev) @ Q.T
    b = torch.randn(50, generator=g, dtype=DT)
    x = solve(bl.CG(maxiter=20, on_indefinite="stop"), A, b)["x"]
    info = solve(bl.CG(maxiter=20, on_indefinite="stop"), A, b).info
    assert info.extra["indefinite"] and not info.converged and info.iterations >= 1
    # Steihaug: the iterates before the negative curvature decrease m(x) = ½xᵀAx − bᵀx, from m(0) = 0
    model = float(0.5 * x @ A @ x - b @ x)
    assert model < 0
    # it is CG's k-th iterate: the model's minimum on the Krylov space K_k(A, b) (A is positive there)
    k = info.iterations
    K = torch.stack([torch.linalg.matrix_power(A, i) @ b for i in range(k)], 1)
    Kq, _ = torch.linalg.qr(K)
    xk = Kq @ torch.linalg.solve(Kq.T @ A @ Kq, Kq.T @ b)
    assert rel_err(x, xk) < 1e-8
    assert abs(float((A @ x - b).norm()) - info.residual_norm) <= 1e-8 * float(b.norm())


@pytest.mark.parametrize("alpha", [0.3, 4.0])
def test_neumann_residual_bound_holds_for_any_step(alpha):
    # A x − b = −(I − αA)^{K+1} b: the reported ‖(I − αA)^K b‖ bounds it, with no 1/α factor.
    A = torch.diag(torch.tensor([0.2, 0.1], dtype=DT))
    b = torch.ones(2, dtype=DT)
    x = solve(bl.Neumann(steps=3, alpha=alpha), A, b)
    true_res = float((A @ x["x"] - b).norm())
    expected = float((torch.linalg.matrix_power(torch.eye(2, dtype=DT) - alpha * A, 3) @ b).norm())
    assert math.isclose(x.info.residual_norm, expected, rel_tol=1e-12)
    assert true_res <= x.info.residual_norm * (1 + 1e-12)


# -- CG: rounding, singular PSD operators, symmetry ---------------------------------------------------
def softmax_regression(dtype, seed, n=60, d=4, classes=5):
    """A linear softmax model: its Hessian is PSD and singular (logits invariant to a shared shift).

    Returns ``(matvec on trees by bl.hvp, b, x_ref)`` with ``b`` a validation gradient (in the
    range of H) and ``x_ref = H⁺ b`` from the float64 Hessian (the minimum-norm solution, which CG
    started from 0 converges to).
    """
    g = torch.Generator().manual_seed(seed)
    X, Xv = (torch.randn(n, d, generator=g, dtype=DT) for _ in range(2))
    y, yv = (torch.randint(0, classes, (n,), generator=g) for _ in range(2))
    W = 0.3 * torch.randn(classes, d, generator=g, dtype=DT)
    Wr = W.clone().requires_grad_(True)
    b = torch.autograd.grad(torch.nn.functional.cross_entropy(Xv @ Wr.T, yv), Wr)[0]
    H = torch.autograd.functional.hessian(
        lambda w: torch.nn.functional.cross_entropy(X @ w.reshape(classes, d).T, y), W.reshape(-1))
    x_ref = (torch.linalg.pinv(H, hermitian=True, rtol=1e-10) @ b.reshape(-1)).reshape(classes, d)
    X, W = X.to(dtype), W.to(dtype)
    loss = lambda p: torch.nn.functional.cross_entropy(X @ p["W"].T, y)
    return (lambda v: bl.hvp(loss, {"W": W}, v)), {"W": b.to(dtype)}, x_ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(4))
def test_cg_on_singular_softmax_hessian_returns_minimum_norm_solution(dtype, seed):
    """tol=0 runs until the rounding floor; rounding-level curvature there is neither negative
    curvature (no DivergenceError) nor a step (which would throw x along the null space)."""
    mv, b, x_ref = softmax_regression(dtype, seed)
    x = bl.CG(maxiter=30, tol=0.0)(mv, b)
    assert x.info.converged and not x.info.extra["indefinite"]
    assert rel_err(x["W"], x_ref) < (1e-12 if dtype == DT else 1e-5)
    assert x.info.iterations <= x.info.matvecs <= 30


def test_cg_zero_curvature_at_the_rounding_floor_is_a_converged_breakdown():
    # x* = (1e-6, 1, 0); b has a rounding-size (1e-17) component in the null space of A.
    A = torch.diag(torch.tensor([1.0, 1e-6, 0.0], dtype=DT))
    b = torch.tensor([1e-6, 1e-6, 1e-17], dtype=DT)
    x = solve(bl.CG(maxiter=10, tol=0.0), A, b)
    assert x.info.converged and not x.info.extra["indefinite"]
    assert rel_err(x["x"], torch.tensor([1e-6, 1.0, 0.0], dtype=DT)) < 1e-9


def test_cg_zero_curvature_before_convergence_is_an_error():
    # b = (1, 1e-9) has a null-space component far above rounding: the system has no solution.
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=DT))
    b = torch.tensor([1.0, 1e-9], dtype=DT)
    with pytest.raises(bl.DivergenceError, match="positive definite"):
        solve(bl.CG(maxiter=10, tol=0.0), A, b)
    x = solve(bl.CG(maxiter=10, tol=0.0, on_indefinite="stop"), A, b)
    assert x.info.extra["indefinite"] and not x.info.converged
    assert rel_err(x["x"], torch.tensor([1.0, 0.0], dtype=DT)) < 1e-8      # stopped before the blow-up


def non_symmetric(n: int, seed: int, dtype) -> torch.Tensor:
    """SPD part plus an antisymmetric part of comparable size: eigenvalues in the right half plane."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, n, generator=g, dtype=DT)
    return (spd(n, 10.0, seed) + (G - G.T) / math.sqrt(n)).to(dtype)


nsettings = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@nsettings
@given(st.integers(2, 12), st.integers(0, 10_000), st.sampled_from([torch.float32, torch.float64]))
def test_cg_rejects_a_non_symmetric_operator(n, seed, dtype):
    A = non_symmetric(n, seed, dtype)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    for on_indefinite in ("raise", "stop"):
        with pytest.raises(bl.DivergenceError, match="not symmetric.*non-symmetric systems.*Exact"):
            solve(bl.CG(maxiter=50, on_indefinite=on_indefinite), A, b)
    # the solver the message points to solves it
    ref = torch.linalg.solve(A.double(), b.double())
    assert rel_err(solve(bl.Exact(), A, b)["x"], ref) < (1e-10 if dtype == DT else 1e-4)


@nsettings
@given(systems, st.sampled_from([torch.float32, torch.float64]))
def test_cg_symmetry_check_never_fires_on_spd_operators(system, dtype):
    n, cond, seed = system
    A = spd(n, cond, seed, dtype=dtype)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    x = solve(bl.CG(maxiter=4 * n + 10, tol=1e-5 if dtype == torch.float32 else 1e-12), A, b)
    assert x.info.converged
    assert rel_err(x["x"], torch.linalg.solve(A.double(), b.double())) < (1e-3 if dtype == torch.float32 else 1e-9)


def test_warm_startable_is_true_exactly_on_solvers_that_take_x0():
    solvers = {cls: cls() for cls in (bl.CG, bl.Neumann, bl.Nystrom, bl.Identity, bl.Exact)}
    assert {cls for cls, s in solvers.items() if s.warm_startable} == {bl.CG, bl.Neumann}
    assert bl.Solver.warm_startable is False
    for cls, s in solvers.items():     # the attribute says what the signature says
        assert ("x0" in inspect.signature(s.solve_flat).parameters) == s.warm_startable, cls.__name__
    A, b = spd(8, 5.0, 3), torch.randn(8, dtype=DT)
    ref = torch.linalg.solve(A, b)
    for solver in (bl.CG(), bl.Neumann(steps=5)):
        # started at the solution, a solve stays there (one product for the starting residual)
        x, info = solver.solve_flat(lambda v: A @ v, b, x0=ref.clone())
        assert rel_err(x, ref) < 1e-12 and info.matvecs >= 1, type(solver).__name__


# -- batches of independent systems in lockstep ------------------------------------------------------
def batch_matvec(As):
    """Row i of the result: As[i] @ V[i] (one batched product for all systems)."""
    return lambda V: (As @ V.unsqueeze(-1)).squeeze(-1)


def test_batched_cg_solves_each_system_with_its_own_steps_and_stop():
    conds = [1.0, 10.0, 1e2, 1e3, 1e4]                 # from one step to many
    As = torch.stack([spd(30, c, seed=i) for i, c in enumerate(conds)])
    b = torch.randn(5, 30, generator=torch.Generator().manual_seed(0), dtype=DT)
    cg = bl.CG(maxiter=400, tol=1e-12, check_every=1)
    x, infos = cg.solve_flat_batched(batch_matvec(As), b)
    alone = [cg.solve_flat(lambda v, A=A: A @ v, bi) for A, bi in zip(As, b)]
    steps = [i.iterations for i in infos]
    assert steps[0] == 1 and steps == sorted(steps) and len(set(steps)) == 5
    assert infos[0].matvecs == max(steps)              # the batch runs until its slowest system stops
    for i, (xi, info) in enumerate(alone):
        assert infos[i].converged and info.converged
        assert abs(infos[i].iterations - info.iterations) <= 2 + info.iterations // 10, i   # same iterates to rounding
        assert rel_err(x[i], torch.linalg.solve(As[i], b[i])) < 1e-12 * conds[i], i
        assert rel_err(x[i], xi) < 1e-12 * conds[i], i
    xe, einfos = bl.Exact().solve_flat_batched(batch_matvec(As), b)
    assert rel_err(xe, torch.linalg.solve(As, b)) < 1e-12 and len(einfos) == 5 and einfos[3].solver == "Exact"


def test_batched_cg_stops_an_indefinite_system_alone():
    As = torch.stack([spd(4, 3.0, seed=1), torch.diag(torch.tensor([3.0, 1.0, -1.0, 2.0], dtype=DT)),
                      torch.zeros(4, 4, dtype=DT)])
    b = torch.ones(3, 4, dtype=DT)
    b[2] = 0.0                                         # converged before the first step
    x, infos = bl.CG(on_indefinite="stop", tol=1e-12).solve_flat_batched(batch_matvec(As), b)
    assert infos[0].converged and rel_err(x[0], torch.linalg.solve(As[0], b[0])) < 1e-12
    assert infos[1].extra["indefinite"] and not infos[1].converged and torch.isfinite(x[1]).all()
    single = bl.CG(on_indefinite="stop", tol=1e-12).solve_flat(lambda v: As[1] @ v, b[1])[0]
    assert rel_err(x[1], single) < 1e-12
    assert infos[2].converged and infos[2].iterations == 0 and not x[2].any()
    with pytest.raises(bl.DivergenceError, match="positive definite"):
        bl.CG().solve_flat_batched(batch_matvec(As[:2]), b[:2])
    with pytest.raises(bl.ShapeError, match=r"solve_flat_batched.*\(B, P\)"):
        bl.CG().solve_flat_batched(lambda V: V, torch.ones(4, dtype=DT))
    with pytest.raises(NotImplementedError, match="no batched solve"):
        bl.GMRES().solve_flat_batched(lambda V: V, b)
    assert {s.name for s in (bl.CG(), bl.Exact(), bl.GMRES(), bl.Neumann(), bl.BiCGSTAB()) if s.batchable} == \
        {"CG", "Exact"}


def test_cg_symmetry_tol_admits_reduced_precision_products_and_still_names_the_fix():
    """A symmetric operator whose products round like bfloat16 (asymmetry ~1e-3, above float32's √eps):
    the default check raises and names symmetry_tol; CG(symmetry_tol=0.1) solves it; a grossly
    non-symmetric operator is still refused at that tolerance."""
    A = spd(10, 10.0, 0, dtype=torch.float32)
    b = torch.randn(10, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    bf16 = lambda v: {"x": (A.bfloat16() @ v["x"].bfloat16()).float()}     # products rounded as in autocast
    with pytest.raises(bl.DivergenceError, match=r"symmetry_tol=0\.1"):
        bl.CG(maxiter=30, tol=1e-2)(bf16, {"x": b})
    x = bl.CG(maxiter=30, tol=1e-2, symmetry_tol=0.1)(bf16, {"x": b})
    assert rel_err(x["x"], torch.linalg.solve(A.double(), b.double())) < 3e-2
    N = torch.tensor([[2.0, 3.0, 0.0], [-3.0, 2.0, 1.0], [0.0, -1.0, 2.0]])          # a rotation-like Jacobian
    with pytest.raises(bl.DivergenceError, match="not symmetric"):
        bl.CG(maxiter=50, symmetry_tol=0.1)(lambda v: {"x": N @ v["x"]}, {"x": torch.tensor([1.0, 0.5, -1.0])})
    with pytest.raises(ValueError, match="symmetry_tol"):
        bl.CG(symmetry_tol=-1.0)


class _BufferedMatvec:
    """``A v`` that takes ``out=`` like ``CurvatureOperator.matvec_flat``, recording what it was given."""

    writes_out = True

    def __init__(self, A):
        self.A, self.outs, self.vs = A, [], []

    def __call__(self, v, out=None):
        self.outs.append(None if out is None else out.data_ptr())
        self.vs.append(v.data_ptr())
        return torch.mv(self.A, v) if out is None else torch.mv(self.A, v, out=out)


@pytest.mark.parametrize("solver", [bl.CG(maxiter=12, tol=0.0), bl.CG(maxiter=12, tol=0.0, damping=0.5),
                                    bl.Neumann(steps=12, alpha=0.05), bl.Neumann(steps=12, alpha=None)],
                         ids=["cg", "cg_damped", "neumann", "neumann_power"])
def test_solvers_reuse_one_product_buffer_and_get_the_same_iterates(solver):
    """A matvec that writes into ``out`` gets one buffer for all products after CG's first (which
    the symmetry probe keeps), never its own input as ``out``, and the solve is bitwise the one of a
    plain matvec."""
    torch.manual_seed(0)
    M = torch.randn(30, 30, dtype=torch.float64)
    A = M @ M.T / 30 + torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, dtype=torch.float64)
    buffered = _BufferedMatvec(A)
    x, info = solver.solve_flat(buffered, b)
    x_plain, info_plain = solver.solve_flat(lambda v: torch.mv(A, v), b)
    assert torch.equal(x, x_plain) and info.matvecs == info_plain.matvecs == len(buffered.outs)
    given = [o for o in buffered.outs if o is not None]
    assert len(set(given)) == 1 and len(given) >= len(buffered.outs) - (21 if solver.name == "Neumann" else 1)
    assert all(o != v for o, v in zip(buffered.outs, buffered.vs))
