"""GMRES, BiCGSTAB and NormalCG against dense solves (torch.linalg.solve) on non-symmetric systems."""

import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bilevel as bl

from conftest import rel_err

DT = torch.float64
SOLVERS = (bl.GMRES, bl.BiCGSTAB, bl.NormalCG)
#: the residual test each dtype is solved to, and the error to the float64 dense solution it must reach
#: (the systems are well conditioned, κ ≲ 3, so the error is a few times the relative residual)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
ERR = {torch.float64: 1e-10, torch.float32: 1e-4}


def well_conditioned(n: int, seed: int, dtype=DT, c: float = 1.0, spread: float = 0.3) -> torch.Tensor:
    """``c·I + spread·G/√n``, G standard normal: eigenvalues in a disc of radius ≈ spread around c."""
    g = torch.Generator().manual_seed(seed)
    return (c * torch.eye(n, dtype=DT) + spread * torch.randn(n, n, generator=g, dtype=DT) / math.sqrt(n)).to(dtype)


def rhs(n: int, seed: int, dtype=DT) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=DT).to(dtype)


def make(cls, **kw):
    kw = dict(kw)
    if cls is bl.BiCGSTAB or cls is bl.NormalCG:
        kw.pop("restart", None)
    return cls(**kw)


def solve(solver, A, b, **kw):
    """``solver`` on the tree ``{"x": b}`` with ``matvec = A @`` and ``rmatvec = Aᵀ @``."""
    return solver(lambda v: {"x": A @ v["x"]}, {"x": b}, rmatvec=lambda v: {"x": A.T @ v["x"]}, **kw)


def true_residual(A, b, x, damping=0.0):
    """‖b − (A + damping I) x‖ in float64."""
    A, b, x = A.double(), b.double(), x.double()
    return float((b - A @ x - damping * x).norm())


hsettings = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@hsettings
@given(st.integers(2, 40), st.integers(0, 10_000), st.sampled_from([torch.float64, torch.float32]),
       st.sampled_from(SOLVERS), st.sampled_from([0.0, 0.5]))
def test_random_non_symmetric_systems_match_dense_solve(n, seed, dtype, cls, damping):
    A, b = well_conditioned(n, seed, dtype), rhs(n, seed, dtype)
    ref = torch.linalg.solve(A.double() + damping * torch.eye(n, dtype=DT), b.double())
    x = solve(make(cls, maxiter=200, restart=10, tol=TOL[dtype], damping=damping), A, b)
    assert x["x"].dtype == dtype and x["x"].shape == (n,)
    assert x.info.converged
    assert rel_err(x["x"], ref) < ERR[dtype]
    # the reported residual is the residual of the returned x, up to rounding of its computation
    floor = 16 * torch.finfo(dtype).eps * (float(b.double().norm()) + 3 * float(x["x"].double().norm()))
    assert abs(x.info.residual_norm - true_residual(A, b, x["x"], damping)) <= floor
    assert true_residual(A, b, x["x"], damping) <= TOL[dtype] * float(b.double().norm()) + floor
    assert 0 < x.info.iterations < x.info.matvecs


@pytest.mark.parametrize("cls", SOLVERS)
def test_trees_with_several_keys(cls):
    A = well_conditioned(7, 3)
    b = {"a": torch.randn(2, 2, dtype=DT), "b": torch.randn(3, dtype=DT)}
    cat = lambda t: torch.cat([t["a"].reshape(-1), t["b"]])
    split = lambda v: {"a": v[:4].reshape(2, 2), "b": v[4:]}
    x = make(cls, tol=1e-12)(lambda v: split(A @ cat(v)), b, rmatvec=lambda v: split(A.T @ cat(v)))
    assert isinstance(x, bl.solvers.Solution) and x["a"].shape == (2, 2) and x["b"].shape == (3,)
    assert rel_err(cat(x), torch.linalg.solve(A, cat(b))) < 1e-10
    with pytest.raises(bl.ShapeError, match="matvec.*keys"):
        make(cls)(lambda v: {"a": v["a"]}, b, rmatvec=lambda v: v)
    if cls.uses_rmatvec:
        with pytest.raises(bl.ShapeError, match="rmatvec.*keys"):
            make(cls)(lambda v: split(A @ cat(v)), b, rmatvec=lambda v: {"a": v["a"]})


def test_rmatvec_flag_signatures_and_warm_start_flags():
    for cls in SOLVERS:
        s = cls()
        params = inspect.signature(s.solve_flat).parameters
        assert s.warm_startable and "x0" in params, cls.__name__
        assert s.uses_rmatvec == ("rmatvec" in params) == (cls is bl.NormalCG), cls.__name__
    for cls in (bl.CG, bl.Neumann, bl.Nystrom, bl.Identity, bl.Exact):
        assert not cls.uses_rmatvec
    # solvers that do not use rmatvec ignore it (even a wrong one)
    A, b = torch.diag(torch.tensor([2.0, 4.0], dtype=DT)), torch.ones(2, dtype=DT)
    x = bl.CG()(lambda v: {"x": A @ v["x"]}, {"x": b}, rmatvec=lambda v: {"x": 0 * v["x"]})
    assert rel_err(x["x"], torch.tensor([0.5, 0.25], dtype=DT)) < 1e-12


@pytest.mark.parametrize("cls", SOLVERS)
def test_warm_start_from_the_solution_takes_no_iterations(cls):
    A, b = well_conditioned(30, 5), rhs(30, 5)
    ref = torch.linalg.solve(A, b)
    s = make(cls, tol=1e-10)
    kw = {"rmatvec": lambda v: A.T @ v} if cls.uses_rmatvec else {}
    x, info = s.solve_flat(lambda v: A @ v, b, x0=ref.clone(), **kw)
    assert info.converged and info.iterations == 0 and rel_err(x, ref) < 1e-14
    assert info.matvecs <= 2               # the starting residual (and NormalCG's Aᵀ r)
    # from a nearby point it needs fewer iterations than from 0
    near = ref + 1e-6 * torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=DT)
    cold = s.solve_flat(lambda v: A @ v, b, **kw)[1]
    warm = s.solve_flat(lambda v: A @ v, b, x0=near, **kw)[1]
    assert warm.converged and warm.iterations < cold.iterations


def test_gmres_short_restart_converges_more_slowly_to_the_same_solution():
    A, b = well_conditioned(40, 2, spread=0.6), rhs(40, 2)
    ref = torch.linalg.solve(A, b)
    full = solve(bl.GMRES(maxiter=200, restart=40, tol=1e-12), A, b)
    short = solve(bl.GMRES(maxiter=400, restart=4, tol=1e-12), A, b)
    assert full.info.converged and short.info.converged and full.info.extra["cycles"] == 1
    assert short.info.extra["cycles"] > 1 and short.info.iterations > full.info.iterations
    assert rel_err(full["x"], ref) < 1e-10 and rel_err(short["x"], ref) < 1e-10


def test_gmres_stagnation_is_reported_not_hidden():
    # A 90° rotation: A v ⊥ v, so GMRES(1) makes no progress at all; full GMRES solves it in 2 steps.
    A, b = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=DT), torch.tensor([1.0, 0.0], dtype=DT)
    x = solve(bl.GMRES(restart=1, maxiter=50), A, b)
    assert not x.info.converged and x.info.extra["stagnated"]
    assert x.info.matvecs <= 3                                    # stopped at once, not after 50 products
    assert math.isclose(x.info.residual_norm, true_residual(A, b, x["x"]), rel_tol=1e-12)
    x = solve(bl.GMRES(), A, b)
    assert x.info.converged and rel_err(x["x"], torch.tensor([0.0, -1.0], dtype=DT)) < 1e-14


@pytest.mark.parametrize("cls", SOLVERS)
def test_check_every_changes_when_the_host_looks_not_the_answer(cls):
    """Steps after the test passed but before the host saw it are no-ops on the device."""
    A, b = well_conditioned(25, 8, spread=0.5), rhs(25, 8)
    xs = [make(cls, tol=1e-9, check_every=c, restart=10)(lambda v: {"x": A @ v["x"]}, {"x": b},
                                                             rmatvec=lambda v: {"x": A.T @ v["x"]})
          for c in (1, 7)]
    assert xs[0].info.iterations == xs[1].info.iterations
    assert torch.equal(xs[0]["x"], xs[1]["x"])
    assert xs[0].info.matvecs <= xs[1].info.matvecs


# -- failures: breakdown, singular operators, NaN --------------------------------------------------------
ROTATION = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=DT)


def test_bicgstab_breakdown_raises_and_gmres_solves_it():
    # r̂ᵀ A r = 0 for every r of a rotation by 90°: BiCGSTAB's first divisor is zero
    b = torch.tensor([1.0, 0.0], dtype=DT)
    with pytest.raises(bl.DivergenceError, match="broke down.*GMRES"):
        solve(bl.BiCGSTAB(), ROTATION, b)
    assert rel_err(solve(bl.GMRES(), ROTATION, b)["x"], torch.tensor([0.0, -1.0], dtype=DT)) < 1e-14
    # damping moves the spectrum off the imaginary axis; then BiCGSTAB works
    x = solve(bl.BiCGSTAB(damping=1.0), ROTATION, b)
    assert rel_err(x["x"], torch.linalg.solve(ROTATION + torch.eye(2, dtype=DT), b)) < 1e-12


@pytest.mark.parametrize("cls", SOLVERS)
def test_singular_inconsistent_system_raises_and_damping_fixes_it(cls):
    A = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, -1.0, 0.5]], dtype=DT)    # row 2 is zero
    b = torch.ones(3, dtype=DT)                                                          # b₂ ≠ 0: no solution
    with pytest.raises(bl.DivergenceError):
        solve(make(cls, maxiter=50), A, b)
    x = solve(make(cls, maxiter=300, tol=1e-11, damping=0.5), A, b)
    assert x.info.converged and rel_err(x["x"], torch.linalg.solve(A + 0.5 * torch.eye(3, dtype=DT), b)) < 1e-9


@pytest.mark.parametrize("cls", SOLVERS)
def test_singular_consistent_system_returns_a_solution(cls):
    A = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, -1.0, 0.5]], dtype=DT)
    b = A @ torch.tensor([1.0, -1.0, 2.0], dtype=DT)                                   # in the range
    x = solve(make(cls, maxiter=50, tol=1e-12), A, b)
    assert x.info.converged and true_residual(A, b, x["x"]) <= 1e-11 * float(b.norm())


@pytest.mark.parametrize("cls", SOLVERS)
def test_nan_rhs_and_nan_matvec_raise(cls):
    with pytest.raises(bl.NonFiniteError, match="finite right-hand side"):
        solve(cls(), torch.eye(3, dtype=DT), torch.tensor([1.0, float("nan"), 0.0], dtype=DT))
    M = well_conditioned(12, 0, spread=0.6)     # needs more than 3 iterations
    for bad_at in (0, 3):      # NaN from the first product, or only after a few iterations
        calls = []

        def mv(v):
            calls.append(1)
            return {"x": M @ v["x"] * (float("nan") if len(calls) > bad_at else 1.0)}

        with pytest.raises(bl.DivergenceError, match="NaN"):
            cls(check_every=2)(mv, {"x": torch.ones(12, dtype=DT)}, rmatvec=lambda v: {"x": M.T @ v["x"]})


def rank_deficient(n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g, dtype=DT) @ torch.randn(rank, n, generator=g, dtype=DT) / n


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(3, 20), st.integers(0, 10_000), st.sampled_from(SOLVERS), st.booleans())
def test_singular_operators_never_yield_an_unflagged_wrong_answer(n, seed, cls, consistent):
    """Either DivergenceError, or a finite x whose reported residual is its own, flagged as converged
    only when that residual passes the test."""
    A = rank_deficient(n, max(1, n // 2), seed)
    b = rhs(n, seed)
    if consistent:
        b = A @ b
    tol = 1e-10
    try:
        x = solve(make(cls, maxiter=3 * n, tol=tol, restart=5), A, b)
    except bl.DivergenceError:
        return
    res = true_residual(A, b, x["x"])
    assert torch.isfinite(x["x"]).all()
    assert abs(x.info.residual_norm - res) <= 1e-8 * float(b.norm()) * (1 + float(x["x"].norm()))
    if x.info.converged:
        assert res <= tol * float(b.norm()) + 1e-12 * (float(b.norm()) + float(x["x"].norm()))
    if not consistent:     # b outside the range: no x solves it, and none may claim to
        assert not x.info.converged or res <= 1e-8 * float(b.norm())


def test_normal_cg_transpose_products():
    A, b = well_conditioned(6, 4), rhs(6, 4)
    ref = torch.linalg.solve(A, b)
    mv = lambda v: {"x": A @ v["x"]}
    # rmatvec=None: built by autograd through matvec (one more product)
    auto = bl.NormalCG(tol=1e-12)(mv, {"x": b})
    given_ = solve(bl.NormalCG(tol=1e-12), A, b)
    assert rel_err(auto["x"], ref) < 1e-10 and auto.info.matvecs == given_.info.matvecs + 1
    # a wrong rmatvec is caught by the free adjoint test on the first iteration
    with pytest.raises(bl.DivergenceError, match="transpose"):
        bl.NormalCG()(mv, {"x": b}, rmatvec=mv)
    # a matvec without a graph (a Hessian-vector product by autograd.grad) and no rmatvec: TypeError
    w = torch.zeros(6, dtype=DT, requires_grad=True)
    g = torch.autograd.grad(0.5 * w @ (A @ A.T) @ w, w, create_graph=True)[0]
    hvp = lambda v: {"x": torch.autograd.grad(g, w, v["x"], retain_graph=True)[0]}
    with pytest.raises(TypeError, match="rmatvec.*torch.func.vjp"):
        bl.NormalCG()(hvp, {"x": b})
    x = bl.NormalCG(tol=1e-12, maxiter=200)(hvp, {"x": b}, rmatvec=hvp)     # symmetric: its own transpose
    assert rel_err(x["x"], torch.linalg.solve(A @ A.T, b)) < 1e-8


def test_config_validation_messages():
    with pytest.raises(ValueError, match="Invalid restart"):
        bl.GMRES(restart=0)
    with pytest.raises(ValueError, match="Invalid tol"):
        bl.BiCGSTAB(tol=-1.0)
    with pytest.raises(TypeError, match="maxiter"):
        bl.NormalCG(maxiter=1.5)
    with pytest.raises(ValueError, match="Invalid damping"):
        bl.GMRES(damping=-0.1)


# -- an adjoint of a fixed point: the use these solvers exist for ----------------------------------------
def tanh_fixed_point(n: int, seed: int):
    """``x = tanh(W x + c)`` with ‖W‖₂ = 0.7 (a contraction), solved to float64 precision."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=DT)
    W = 0.7 * W / torch.linalg.matrix_norm(W, ord=2)
    c = torch.randn(n, generator=g, dtype=DT)
    return W, c, fixed_point(W, c)


def fixed_point(W, c):
    x = torch.zeros_like(c)
    for _ in range(120):                                      # 0.7^120 < 1e-18
        x = torch.tanh(W @ x + c)
    return x


@pytest.mark.parametrize("cls", SOLVERS)
def test_fixed_point_adjoint_and_hypergradient(cls):
    """(I − ∂T/∂x)ᵀ u = g at the fixed point of T(x) = tanh(W x + c), with products from autograd
    only; against the dense Jacobian (I − D W)ᵀ, D = diag(1 − x²), and the hypergradient dL/dc = D u
    against central finite differences of L(x*(c)) = ½‖x* − t‖²."""
    n = 20
    W, c, xs = tanh_fixed_point(n, 0)
    assert float((torch.tanh(W @ xs + c) - xs).norm()) < 1e-14
    target = torch.linspace(-0.5, 0.5, n, dtype=DT)
    gvec = xs - target                                        # ∂L/∂x at x*
    x = xs.clone().requires_grad_(True)
    y = torch.tanh(W @ x + c)
    vjp = lambda u: torch.autograd.grad(y, x, u, retain_graph=True, create_graph=True)[0]     # Jᵀ u
    u0 = torch.zeros(n, dtype=DT, requires_grad=True)
    jvp = lambda v: torch.autograd.grad(vjp(u0), u0, v, retain_graph=True)[0]               # J v = ∂(Jᵀu)ᵀv/∂u
    matvec = lambda u: {"x": u["x"] - vjp(u["x"]).detach()}                 # (I − J)ᵀ u
    rmatvec = lambda v: {"x": v["x"] - jvp(v["x"])}                         # (I − J) v
    u = cls(tol=1e-12, maxiter=200)(matvec, {"x": gvec}, rmatvec=rmatvec)
    D = torch.diag(1 - xs ** 2)
    u_dense = torch.linalg.solve((torch.eye(n, dtype=DT) - D @ W).T, gvec)
    assert u.info.converged and rel_err(u["x"], u_dense) < 1e-10

    def loss(c_):
        return 0.5 * float((fixed_point(W, c_) - target).square().sum())

    hg = (1 - xs ** 2) * u["x"]                               # (∂T/∂c)ᵀ u
    h = 1e-6
    fd = torch.tensor([(loss(c + h * e) - loss(c - h * e)) / (2 * h) for e in torch.eye(n, dtype=DT)[:5]])
    assert rel_err(hg[:5], fd) < 1e-7


def test_cg_rejects_the_fixed_point_operator_that_gmres_solves():
    W, c, xs = tanh_fixed_point(12, 1)
    x = xs.clone().requires_grad_(True)
    y = torch.tanh(W @ x + c)
    matvec = lambda u: {"x": u["x"] - torch.autograd.grad(y, x, u["x"], retain_graph=True)[0]}
    b = {"x": torch.ones(12, dtype=DT)}
    with pytest.raises(bl.DivergenceError, match="not symmetric"):
        bl.CG()(matvec, b)
    assert bl.GMRES(tol=1e-12)(matvec, b).info.converged


def test_every_solver_gives_the_implicit_hypergradient_of_a_symmetric_problem():
    """Inside implicit_hypergrad (a Hessian: its own transpose) the non-symmetric solvers agree with Exact."""
    g = torch.Generator().manual_seed(3)
    X, Xv = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randn(20, 5, generator=g, dtype=torch.float64)
    y, yv = torch.randn(30, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    inner = lambda p, h: ((X @ p["w"] - y) ** 2).mean() + (h["l2"].exp() * p["w"] ** 2).sum()
    outer = lambda p, h: ((Xv @ p["w"] - yv) ** 2).mean()
    h = {"l2": torch.full((5,), -1.0, dtype=torch.float64)}
    w = torch.linalg.solve(X.T @ X / 30 + torch.diag(h["l2"].exp()), X.T @ y / 30)
    ref = bl.implicit_hypergrad(inner, outer, {"w": w}, h, solver=bl.Exact())
    for solver in (bl.GMRES(maxiter=50, tol=1e-12), bl.BiCGSTAB(maxiter=50, tol=1e-12), bl.NormalCG(maxiter=50, tol=1e-12)):
        hg = bl.implicit_hypergrad(inner, outer, {"w": w}, h, solver=solver)
        assert float((hg["l2"] - ref["l2"]).norm() / ref["l2"].norm()) < 1e-8, solver
