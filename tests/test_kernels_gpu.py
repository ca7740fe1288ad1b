"""The Triton kernels compiled for a real GPU, against their torch references.

Skipped without CUDA, and under ``TRITON_INTERPRET=1`` (the interpreter would run them on the
host). Run on a GPU machine with ``TRITON_INTERPRET=0 python -m pytest tests/test_kernels_gpu.py``.
"""

import pytest
import torch

import bilevel as bl
import bilevel.kernels as K

from conftest import rel_err

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and K.triton_available() and not K.interpreting()),
    reason="needs a CUDA GPU, triton, and TRITON_INTERPRET unset",
)
DEV = "cuda"
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_logistic(dtype):
    X = torch.randn(10_001, 513, device=DEV, dtype=dtype)
    w, v = torch.randn(513, device=DEV, dtype=dtype) / 20, torch.randn(513, device=DEV, dtype=dtype)
    ref = K.logistic_hvp_reference(X, w, v)
    assert rel_err(K.logistic_hvp(X, w, v, backend="triton"), ref) < 10 * TOL[dtype]
    assert rel_err(K.logistic_hvp(X, w, v, curvature=K.logistic_curvature(X, w), backend="triton"), ref) < 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_linear_ce(dtype):
    X, W, V = (torch.randn(s, device=DEV, dtype=dtype) for s in ((1000, 64), (5003, 64), (5003, 64)))
    ref = K.linear_ce_hvp_reference(X, W, V, chunk_rows=1000)
    assert rel_err(K.linear_ce_hvp(X, W, V, chunk_rows=300, backend="triton"), ref) < 10 * TOL[dtype]


def test_gpu_decay_and_neumann():
    lam, w, u = (torch.randn(1_000_003, device=DEV) for _ in range(3))
    assert rel_err(K.decay_mixed(lam, w, u, backend="triton"), K.decay_mixed_reference(lam, w, u)) < TOL[torch.float32]
    v, av, acc = (torch.randn(1_000_003, device=DEV) for _ in range(3))
    v2, acc2 = v.clone(), acc.clone()
    a = torch.tensor(0.3, device=DEV)
    sq = K.neumann_step(v, av, acc, a, backend="triton")
    sq2 = K.neumann_step_reference(v2, av, acc2, a)
    assert rel_err(v, v2) < 1e-6 and rel_err(acc, acc2) < 1e-6 and abs(float(sq / sq2) - 1) < 1e-5


def test_gpu_cg_auto_uses_fused_path():
    n = 200_001
    g = torch.Generator(device=DEV).manual_seed(0)
    d = torch.rand(n, device=DEV, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(n, device=DEV, generator=g, dtype=torch.float64)
    x, info = bl.CG(maxiter=100, tol=1e-12).solve_flat(lambda z: d * z, b)
    assert info.extra.get("backend") == "triton" and info.converged
    assert rel_err(x, b / d) < 1e-10
    # the fused Chronopoulos–Gear loop against textbook CG on the same system
    x_t, info_t = bl.CG(maxiter=100, tol=1e-12, backend="torch").solve_flat(lambda z: d * z, b)
    assert rel_err(x, x_t) < 1e-10 and info.iterations == info_t.iterations
    # thresholds far below float32's range (here ~1e-60) must still freeze converged solves on the device
    x_s, info_s = bl.CG(maxiter=100, tol=1e-12).solve_flat(lambda z: d * z, 1e-30 * b)
    assert info_s.iterations == info_t.iterations and rel_err(x_s, 1e-30 * x_t) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_cg_update_iterates_equal_textbook_cg(dtype):
    from bilevel import solvers as S

    n = 100_003
    g = torch.Generator(device=DEV).manual_seed(1)
    d = torch.linspace(0.5, 20.0, n, device=DEV, dtype=dtype)[torch.randperm(n, device=DEV, generator=g)]
    b = torch.randn(n, device=DEV, generator=g, dtype=dtype)
    A = lambda z: d * z
    eps = torch.finfo(dtype).eps
    t = torch.zeros((), device=DEV, dtype=dtype)
    plain = S._HestenesStiefelCG(A, b, None, t, S._FLAT_EPS * eps, keep_best=False)
    fused = S._ChronopoulosGearCG(A, b, None, t, S._FLAT_EPS * eps, "triton")
    for k in range(1, 11):
        plain.step()
        fused.step()
        assert rel_err(fused.x, plain.x) < (1e-10 if dtype == torch.float64 else 1e-4), k
