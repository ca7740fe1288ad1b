"""bilevel.kernels: each Triton kernel (run on CPU by the Triton interpreter) against its torch
reference and an independent autograd oracle; backend selection; solver integration.

The interpreter takes ~3 ms per program instance, so shapes are small and odd (masks and
tails exercised) and grids stay at a few programs.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before the first Triton launch (kernels import it lazily)

import math

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl
import bilevel.kernels as K

from conftest import rel_err

needs_triton = pytest.mark.skipif(not K.triton_available(), reason="triton is not installed")
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]


def _autograd_hvp(loss, w, v):
    w = w.detach().clone().requires_grad_(True)
    g = torch.autograd.grad(loss(w), w, create_graph=True)[0]
    return torch.autograd.grad(g, w, v)[0]


# -- backend selection --------------------------------------------------------------------------
def test_backend_resolution_and_errors(monkeypatch):
    x = torch.ones(3)
    assert K.resolve_backend("auto", x, name="f") == "torch"        # CPU: the torch path runs
    assert K.resolve_backend("torch", x, name="f") == "torch"
    with pytest.raises(ValueError, match="backend"):
        K.resolve_backend("cuda", x, name="f")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        K.logistic_hvp(torch.ones(4, 2), torch.ones(2), torch.ones(2), backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton'"):
        bl.CG(backend="triton").solve_flat(lambda v: v, torch.ones(3))
    with pytest.raises(ValueError, match="backend"):
        bl.CG(backend="gpu")


def test_importing_bilevel_does_not_import_triton():
    """The modules import bilevel.kernels at the top; triton itself loads at the first Triton launch."""
    import subprocess
    import sys

    code = "import bilevel, sys; print('triton' in sys.modules, 'bilevel.kernels' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr


def test_kernels_hold_no_solver_loop():
    """Solver loops live in bilevel.solvers (DESIGN.md §2): kernels export update steps only."""
    assert not any("FusedCG" in n for n in K.__all__)
    assert {"cg_update", "cg_update_reference", "partial_dot", "partial_dot_reference"} <= set(K.__all__)


def test_backend_without_triton_falls_back(monkeypatch):
    monkeypatch.setattr("bilevel.kernels._backend.triton_available", lambda: False)
    X, w, v = torch.randn(6, 3), torch.randn(3), torch.randn(3)
    assert torch.equal(K.logistic_hvp(X, w, v), K.logistic_hvp_reference(X, w, v))
    with pytest.raises(RuntimeError, match="not installed"):
        K.logistic_hvp(X, w, v, backend="triton")


@needs_triton
def test_interpreter_has_no_bfloat16():
    x = torch.ones(3, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        K.decay_mixed(x, x, x, backend="triton")


# -- logistic_hvp ---------------------------------------------------------------------------------
def _logistic_problem(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(d, generator=g, dtype=dtype)
    v = torch.randn(d, generator=g, dtype=dtype)
    y = (torch.rand(n, generator=g, dtype=dtype) < 0.5).to(dtype)
    l2 = torch.rand(d, generator=g, dtype=dtype)
    return X, w, v, y, l2


@pytest.mark.parametrize("dtype", DTYPES)
def test_logistic_reference_matches_autograd(dtype):
    X, w, v, y, l2 = _logistic_problem(57, 9, dtype)
    loss = lambda w: F.binary_cross_entropy_with_logits(X @ w, y) + 0.5 * (l2 * w ** 2).sum()
    assert rel_err(K.logistic_hvp(X, w, v, l2=l2), _autograd_hvp(loss, w, v)) < 10 * TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 1), (37, 5), (300, 150)])   # 300 rows: 10 row blocks over 4 programs
def test_logistic_triton_matches_reference(dtype, n, d):
    X, w, v, _, l2 = _logistic_problem(n, d, dtype, seed=n)
    ref = K.logistic_hvp_reference(X, w, v, l2=l2)
    out = K.logistic_hvp(X, w, v, l2=l2, backend="triton")
    assert out.dtype == dtype and out.shape == (d,)
    assert rel_err(out, ref) < TOL[dtype]
    # a non-contiguous X (a column slice) goes through its strides
    Xw = torch.cat([X, torch.randn(n, 3, dtype=dtype)], 1)[:, :d]
    assert rel_err(K.logistic_hvp(Xw, w, v, backend="triton"), K.logistic_hvp_reference(X, w, v)) < TOL[dtype]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_logistic_gradients(backend):
    X, w, v, _, l2 = _logistic_problem(11, 4, torch.float64)
    args = (w.requires_grad_(), v.requires_grad_(), l2.requires_grad_())
    assert torch.autograd.gradcheck(lambda w, v, l2: K.logistic_hvp(X, w, v, l2=l2, backend=backend), args)
    with pytest.raises(NotImplementedError, match="X"):
        K.logistic_hvp(X.requires_grad_(), w, v, backend=backend).sum().backward()


def test_logistic_input_errors():
    X = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"w of shape \(3,\)"):
        K.logistic_hvp(X, torch.zeros(4), torch.zeros(3))
    with pytest.raises(TypeError, match="dtype"):
        K.logistic_hvp(X, torch.zeros(3, dtype=torch.float64), torch.zeros(3))
    with pytest.raises(ValueError, match="l2"):
        K.logistic_hvp(X, torch.zeros(3), torch.zeros(3), l2=torch.ones(2))


# -- linear_ce_hvp --------------------------------------------------------------------------------
def _ce_problem(B, D, C, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, D, generator=g, dtype=dtype)
    W = scale * torch.randn(C, D, generator=g, dtype=dtype)
    V = torch.randn(C, D, generator=g, dtype=dtype)
    b = torch.randn(C, generator=g, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return X, W, V, b, y


def _ce_oracle(X, W, V, b, y):
    loss = lambda Wf: F.cross_entropy(X @ Wf.reshape(W.shape).T + b, y)
    return _autograd_hvp(loss, W.reshape(-1), V.reshape(-1)).reshape(W.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_linear_ce_reference_matches_autograd(dtype, chunk):
    X, W, V, b, y = _ce_problem(23, 6, 11, dtype)
    out = K.linear_ce_hvp_reference(X, W, V, bias=b, chunk_rows=chunk)
    assert rel_err(out, _ce_oracle(X, W, V, b, y)) < 10 * TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,D,C", [(5, 3, 2), (9, 7, 19), (4, 5, 1500)])   # C > 1024: two column blocks per row
def test_linear_ce_triton_matches_reference(dtype, B, D, C):
    X, W, V, b, y = _ce_problem(B, D, C, dtype, seed=C)
    ref = _ce_oracle(X, W, V, b, y)
    out = K.linear_ce_hvp(X, W, V, bias=b, chunk_rows=3, backend="triton")
    assert rel_err(out, ref) < 10 * TOL[dtype]


@needs_triton
def test_linear_ce_triton_large_logits_stay_finite():
    # logits near 500: a naive exp overflows in float32 (beyond ~88); the online softmax does not
    X, W, V, b, _ = _ce_problem(6, 4, 40, torch.float32)
    b = b + 500.0
    out = K.linear_ce_hvp(X, W, V, bias=b, backend="triton")
    ref = K.linear_ce_hvp_reference(X.double(), W.double(), V.double(), bias=b.double())
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-4


def test_linear_ce_input_errors():
    X, W, V = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="V of W's shape"):
        K.linear_ce_hvp(X, W, V[:4])
    with pytest.raises(ValueError, match="bias"):
        K.linear_ce_hvp(X, W, V, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="to match X"):
        K.linear_ce_hvp(X, torch.randn(5, 2), torch.randn(5, 2))


# -- decay_mixed ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["exp", "softplus"])
def test_decay_mixed_reference_matches_autograd(kind):
    g = torch.Generator().manual_seed(0)
    lam, w, u = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    pen = bl.hparams.WeightDecay({"w": "h"}, "parameter", kind)
    ref = bl.mixed_vjp(lambda p, h: pen(p, h), {"w": w}, {"h": lam}, {"w": u})["h"]
    assert rel_err(K.decay_mixed(lam, w, u, kind), ref) < 1e-12


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["exp", "softplus"])
def test_decay_mixed_triton(dtype, kind):
    g = torch.Generator().manual_seed(1)
    lam, w, u = (torch.randn(2053, generator=g, dtype=dtype) for _ in range(3))
    out = K.decay_mixed(lam, w, u, kind, backend="triton")
    assert rel_err(out, K.decay_mixed_reference(lam, w, u, kind)) < TOL[dtype]
    with pytest.raises(RuntimeError, match="shape"):
        K.decay_mixed(lam[:1], w, u, kind, backend="triton")
    with pytest.raises(ValueError, match="kind"):
        K.decay_mixed(lam, w, u, "relu")


# -- fused solver updates -------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_neumann_step_triton_matches_reference(dtype):
    g = torch.Generator().manual_seed(2)
    v, av, acc = (torch.randn(5000, generator=g, dtype=dtype) for _ in range(3))
    alpha = torch.tensor(0.37, dtype=dtype)
    v2, acc2 = v.clone(), acc.clone()
    sq = K.neumann_step(v, av, acc, alpha, backend="triton")
    sq2 = K.neumann_step_reference(v2, av, acc2, alpha)
    assert rel_err(v, v2) < TOL[dtype] and rel_err(acc, acc2) < TOL[dtype]
    assert abs(float(sq - sq2)) <= TOL[dtype] * float(sq2) * 10


def _spd(n, rank, dtype, shift=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, rank, generator=g, dtype=dtype) / math.sqrt(n)
    D = torch.linspace(0.1, 10.0, rank, dtype=dtype)
    return (lambda z: Q @ (D * (Q.T @ z)) + shift * z), (Q * D) @ Q.T + shift * torch.eye(n, dtype=dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_cg_matches_dense_solve_and_torch_cg(dtype):
    A, M = _spd(3001, 25, dtype)
    b = torch.randn(3001, generator=torch.Generator().manual_seed(3), dtype=dtype)
    x_ref = torch.linalg.solve(M.double(), b.double())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    xf, info_f = bl.CG(maxiter=60, tol=tol, backend="triton").solve_flat(A, b)
    xt, info_t = bl.CG(maxiter=60, tol=tol, backend="torch").solve_flat(A, b)
    assert info_f.converged and info_f.extra["backend"] == "triton"
    assert rel_err(xf, x_ref) < (1e-9 if dtype == torch.float64 else 1e-4)
    assert rel_err(xf, xt) < (1e-9 if dtype == torch.float64 else 1e-4)
    assert info_f.iterations == info_t.iterations <= info_f.matvecs <= info_f.iterations + 5
    # the minimum Rayleigh quotient lies in [λ_min, λ_max] of A
    assert 0.5 - 1e-6 <= info_f.extra["min_rayleigh_quotient"] <= 10.5
    # warm start from the solution: converged at once
    x0, info0 = bl.CG(maxiter=5, tol=1e-3, backend="triton").solve_flat(A, b, x0=xt)
    assert info0.iterations == 0 and info0.matvecs == 1


def _cg_runs(A, b, backend, thresh=0.0):
    """The textbook CG of bl.CG and its Chronopoulos–Gear form on ``backend``, side by side."""
    from bilevel import solvers as S

    eps = torch.finfo(b.dtype).eps
    t = torch.tensor(thresh, dtype=b.dtype)
    plain = S._HestenesStiefelCG(A, b, None, t, S._FLAT_EPS * eps)
    fused = S._ChronopoulosGearCG(A, b, None, t, S._FLAT_EPS * eps, backend)
    return plain, fused


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chronopoulos_gear_iterates_equal_textbook_cg(backend, dtype):
    """Every iterate of the fused form (Triton kernels, or their torch references) equals textbook
    CG's to rounding, on the same SPD system; and both equal the dense solve at the end."""
    A, M = _spd(1003, 12, dtype)
    b = torch.randn(1003, generator=torch.Generator().manual_seed(3), dtype=dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    plain, fused = _cg_runs(A, b, backend, thresh=float(rtol * b.norm()) ** 2)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for k in range(1, 17):          # 13 distinct eigenvalues: converged, then frozen, by k = 16
        plain.step()
        fused.step()
        assert rel_err(fused.x, plain.x) < tol, k
        assert abs(float(fused.residual_sq()) - float(plain.residual_sq())) <= tol * float(b @ b) + 1e-30, k
    ref = torch.linalg.solve(M.double(), b.double())
    assert rel_err(fused.x, ref) < (1e-9 if dtype == torch.float64 else 1e-4)
    out_p, out_f = plain.outcome(16), fused.outcome(16)
    # float32 reaches the threshold at the rounding level, where the two forms may cross it one step apart
    assert abs(out_f.steps - out_p.steps) <= (0 if dtype == torch.float64 else 1) and out_p.steps <= 14
    assert out_f.status == out_p.status == 0
    rq_tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert math.isclose(out_f.min_rq, out_p.min_rq, rel_tol=rq_tol)
    # scale: the largest Rayleigh quotient seen (frozen iterations at the rounding level see other
    # vectors in the two forms), within [λ_min, λ_max] of A
    lam = torch.linalg.eigvalsh(M.double())
    for out in (out_p, out_f):
        assert float(lam[0]) * (1 - 1e-6) <= out.min_rq <= out.scale <= float(lam[-1]) * (1 + 1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_chronopoulos_gear_solve_keeps_cg_behaviour(backend):
    """Through bl.CG: convergence and warm start, negative curvature (raise / stop), a non-symmetric
    operator, and a singular PSD operator solved to its rounding floor without a false alarm."""
    A, M = _spd(301, 10, torch.float64)
    b = torch.randn(301, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x, info = bl.CG(maxiter=60, tol=1e-10)._solve(A, b, None, backend)
    assert info.converged and info.extra["backend"] == backend
    x_t, info_t = bl.CG(maxiter=60, tol=1e-10)._solve(A, b, None, None, False)   # textbook CG, same cadence
    assert info.iterations == info_t.iterations and info.matvecs == info_t.matvecs <= info.iterations + 5
    assert rel_err(x, torch.linalg.solve(M, b)) < 1e-9 and rel_err(x, x_t) < 1e-9
    # a tiny right-hand side: thresholds like 1e-60 travel in the state (float64), not as float32 arguments
    x_s, info_s = bl.CG(maxiter=60, tol=1e-10)._solve(A, 1e-30 * b, None, backend)
    assert info_s.iterations == info_t.iterations and rel_err(x_s, 1e-30 * x_t) < 1e-9
    x0, info0 = bl.CG(maxiter=5, tol=1e-3)._solve(A, b, x, backend)
    assert info0.iterations == 0 and info0.matvecs == 1
    A_neg, _ = _spd(301, 10, torch.float64, shift=-1.0)
    with pytest.raises(bl.DivergenceError, match="positive definite"):
        bl.CG(maxiter=30)._solve(A_neg, b, None, backend)
    x, info = bl.CG(maxiter=30, on_indefinite="stop")._solve(A_neg, b, None, backend)
    assert info.extra["indefinite"] and not info.converged and torch.isfinite(x).all()
    G = torch.randn(301, 301, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / 301 ** 0.5
    with pytest.raises(bl.DivergenceError, match="not symmetric"):
        bl.CG(maxiter=30)._solve(lambda v: M @ v + (G - G.T) @ v, b, None, backend)
    # singular PSD (A with a zero eigenvalue, b in its range), tol=0: stops at the rounding floor
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    ev = torch.cat([torch.zeros(3, dtype=torch.float64), torch.linspace(0.1, 1.0, 37, dtype=torch.float64)])
    S = (Q * ev) @ Q.T
    bs = S @ torch.randn(40, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x, info = bl.CG(maxiter=80, tol=0.0)._solve(lambda v: S @ v, bs, None, backend)
    assert info.converged and rel_err(x, torch.linalg.pinv(S, hermitian=True, rtol=1e-10) @ bs) < 1e-10


@needs_triton
def test_fused_cg_detects_indefinite():
    A, _ = _spd(700, 10, torch.float64, shift=-1.0)     # eigenvalues −1 (many) and up to ~9
    b = torch.randn(700, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with pytest.raises(bl.DivergenceError, match="damping"):
        bl.CG(maxiter=30, backend="triton").solve_flat(A, b)
    x, info = bl.CG(maxiter=30, backend="triton", on_indefinite="stop").solve_flat(A, b)
    assert info.extra["indefinite"] and not info.converged and torch.isfinite(x).all()
    # damping above |λ_min| makes it solvable
    x, info = bl.CG(maxiter=200, tol=1e-10, damping=1.5, backend="triton").solve_flat(A, b)
    assert info.converged


@needs_triton
def test_fused_solvers_inside_implicit_hypergrad():
    """Per-feature ridge: CG and Neumann with backend='triton' give the closed-form hypergradient."""
    g = torch.Generator().manual_seed(0)
    n, d = 40, 6
    X, Xv = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(30, d, generator=g, dtype=torch.float64)
    y, yv = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(30, generator=g, dtype=torch.float64)
    lam = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    A = X.T @ X + torch.diag(lam.exp())
    w = torch.linalg.solve(A, X.T @ y)
    ref = -(lam.exp() * w) * torch.linalg.solve(A, Xv.T @ (Xv @ w - yv))
    inner = lambda p, h, X, y: 0.5 * ((X @ p["w"] - y) ** 2).sum() + 0.5 * (h["l"].exp() * p["w"] ** 2).sum()
    outer = lambda p, h, X, y: 0.5 * ((X @ p["w"] - y) ** 2).sum()
    lmax = float(torch.linalg.eigvalsh(A).max())
    for solver, tol in [(bl.CG(tol=1e-12, backend="triton"), 1e-8),
                        (bl.Neumann(steps=3000, alpha=1.0 / lmax, backend="triton"), 1e-4)]:
        hg = bl.implicit_hypergrad(inner, outer, {"w": w}, {"l": lam}, solver=solver,
                                   inner_args=(X, y), outer_args=(Xv, yv))
        assert rel_err(hg["l"], ref) < tol, (solver, rel_err(hg["l"], ref))


@needs_triton
def test_fused_neumann_divergence_raises():
    A, _ = _spd(300, 5, torch.float64)
    with pytest.raises(bl.DivergenceError, match="shrink"):
        bl.Neumann(steps=20, alpha=1.0, backend="triton").solve_flat(A, torch.ones(300, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_logistic_precomputed_curvature(backend, dtype):
    X, w, v, _, l2 = _logistic_problem(45, 7, dtype, seed=9)
    curv = K.logistic_curvature(X, w)
    out = K.logistic_hvp(X, w, v, l2=l2, curvature=curv, backend=backend)
    assert rel_err(out, K.logistic_hvp_reference(X, w, v, l2=l2)) < TOL[dtype]
    with pytest.raises(ValueError, match="curvature"):
        K.logistic_hvp(X, w, v, curvature=curv[:3], backend=backend)
