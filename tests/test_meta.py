"""Meta-learning: the gradient with respect to the starting params (``init_grad``), the forward-mode
Jacobian of the trained weights, and implicit MAML, against `higher`, closed forms, dense float64
solves and finite differences."""

import pytest
import torch
from torch.func import functional_call

import bilevel as bl

from conftest import rel_err, tree_rel_err

DT = torch.float64
DTYPES = [torch.float64, torch.float32]
# relative tolerances against a float64 oracle: exact derivatives, and central differences (O(ε²) + rounding)
EXACT_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
FD_TOL = 1e-6


def quadratic(P=5, m=3, seed=0, dtype=DT):
    """inner ½wᵀAw − wᵀBλ, outer ½‖w − t‖² (tensors drawn in float64, then cast)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT))
    A = (Q * torch.linspace(1.0, 6.0, P, dtype=DT)) @ Q.T
    B, t = torch.randn(P, m, generator=g, dtype=DT), torch.randn(P, generator=g, dtype=DT)
    lam, w0 = torch.randn(m, generator=g, dtype=DT), torch.randn(P, generator=g, dtype=DT)
    A, B, t, lam, w0 = (x.to(dtype) for x in (A, B, t, lam, w0))
    inner = lambda p, h: 0.5 * p["w"] @ A @ p["w"] - p["w"] @ (B @ h["l"])
    outer = lambda p, h: 0.5 * ((p["w"] - t) ** 2).sum()
    return A, B, t, lam, w0, inner, outer


def sgd_closed_form(A, B, lam, w0, eta, T):
    """``w_T`` of T SGD steps on the quadratic and ``M = (I − ηA)^T`` (float64)."""
    I = torch.eye(len(w0), dtype=DT)
    M = torch.linalg.matrix_power(I - eta * A, T)
    return M @ w0 + (I - M) @ torch.linalg.solve(A, B @ lam), M


def mlp_problem(seed=0, dtype=DT):
    """A tanh MLP, minibatches, one decay per tensor as hyperparameters, and a parameter ("head")
    that only the outer loss reads (no inner gradient: it is never updated, as in torch.optim)."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(DT)
    params = {k: (0.5 * torch.randn(v.shape, generator=g, dtype=DT)).to(dtype) for k, v in net.named_parameters()}
    params["head"] = torch.randn(2, generator=g, dtype=DT).to(dtype)
    decayed = ("0.weight", "2.weight")
    hparams = {k: torch.full((), -2.0 + 0.3 * i, dtype=dtype) for i, k in enumerate(decayed)}
    X, Y = torch.randn(30, 3, generator=g, dtype=DT).to(dtype), torch.randn(30, 2, generator=g, dtype=DT).to(dtype)
    Xv, Yv = torch.randn(12, 3, generator=g, dtype=DT).to(dtype), torch.randn(12, 2, generator=g, dtype=DT).to(dtype)
    net.to(dtype)
    body = lambda p: {k: v for k, v in p.items() if k != "head"}

    def inner(p, h, X, Y):
        mse = ((functional_call(net, body(p), (X,)) - Y) ** 2).mean()
        return mse + 0.5 * sum(h[k].exp() * (p[k] ** 2).sum() for k in decayed)

    def outer(p, h, X, Y):
        return ((functional_call(net, body(p), (X,)) + p["head"] - Y) ** 2).mean()

    batches = lambda t: (X[(t * 10) % 30:(t * 10) % 30 + 10], Y[(t * 10) % 30:(t * 10) % 30 + 10])
    return net, params, hparams, inner, outer, batches, (Xv, Yv)


# -- init_grad: dL_V/dw_0 ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["reverse", "checkpoint"])
def test_init_grad_quadratic_closed_form(mode, dtype):
    A, B, t, lam, w0, inner, outer = quadratic(dtype=dtype)
    eta, T = 0.1, 12
    hg, w = bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, optimizer=bl.inner.SGD(lr=eta), steps=T,
                                  mode=mode, checkpoint_every=5, init_grad=True)
    A, B, t, lam, w0 = (x.double() for x in (A, B, t, lam, w0))
    wT, M = sgd_closed_form(A, B, lam, w0, eta, T)
    assert set(hg.init_grad) == {"w"} and hg.init_grad["w"].dtype == dtype
    assert rel_err(hg.init_grad["w"], M.T @ (wT - t)) < EXACT_TOL[dtype]        # dw_T/dw_0 = M
    assert rel_err(hg["l"], ((torch.eye(5, dtype=DT) - M) @ torch.linalg.solve(A, B)).T @ (wT - t)) < EXACT_TOL[dtype]


def test_init_grad_is_none_unless_asked():
    A, B, t, lam, w0, inner, outer = quadratic()
    hg, _ = bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, optimizer=bl.inner.SGD(lr=0.1), steps=3)
    assert hg.init_grad is None and hg.info.weights_jacobian is None


@pytest.mark.parametrize("mode", ["reverse", "checkpoint"])
@pytest.mark.parametrize("opt", [bl.inner.SGD(lr=0.1, momentum=0.9), bl.inner.Adam(lr=0.02)], ids=["momentum", "adam"])
def test_init_grad_matches_finite_differences(opt, mode):
    _, params, hparams, inner, outer, batches, val = mlp_problem()
    kw = dict(optimizer=opt, steps=7, inner_args=batches, outer_args=val)
    hg, _ = bl.unrolled_hypergrad(inner, outer, params, hparams, mode=mode, checkpoint_every=3, init_grad=True,
                                  truncate=7, **kw)                     # truncate = steps: the whole unroll
    g = torch.Generator().manual_seed(5)
    v = {k: torch.randn(p.shape, generator=g, dtype=DT) for k, p in params.items()}
    eps = 1e-5

    def outer_at(sign):
        _, w = bl.unrolled_hypergrad(inner, outer, {k: p + sign * eps * v[k] for k, p in params.items()}, hparams, **kw)
        return outer(w, hparams, *val)

    fd = (outer_at(1.0) - outer_at(-1.0)) / (2 * eps)
    exact = sum((hg.init_grad[k] * v[k]).sum() for k in params)
    assert abs(float(exact - fd)) < FD_TOL * abs(float(fd))
    # the parameter no step updates: its gradient is ∂L_V/∂head at w_T, unchanged through the unroll
    assert float(hg.init_grad["head"].norm()) > 0


@pytest.mark.parametrize("mode", ["reverse", "checkpoint"])
def test_init_grad_matches_higher(mode):
    higher = pytest.importorskip("higher")
    net, params, hparams, inner, outer, batches, val = mlp_problem()
    params = {k: v for k, v in params.items() if k != "head"}
    outer_body = lambda p, h, X, Y: ((functional_call(net, p, (X,)) - Y) ** 2).mean()
    T = 6
    hg, w = bl.unrolled_hypergrad(inner, outer_body, params, hparams, optimizer=bl.inner.SGD(lr=0.1, momentum=0.5),
                                  steps=T, mode=mode, checkpoint_every=2, inner_args=batches, outer_args=val,
                                  init_grad=True)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(DT)
    model.load_state_dict(params)
    h = {k: v.clone().requires_grad_(True) for k, v in hparams.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    # copy_initial_weights=False: the unrolled weights start from the model's own parameters, so
    # autograd reaches them, which is the MAML meta-gradient
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, dopt):
        for t in range(T):
            X, Y = batches(t)
            p = dict(zip(params, fmodel.parameters()))
            dopt.step(((fmodel(X) - Y) ** 2).mean() + 0.5 * sum(h[k].exp() * (p[k] ** 2).sum() for k in h))
        loss = ((fmodel(val[0]) - val[1]) ** 2).mean()
        ref = torch.autograd.grad(loss, [*model.parameters(), *h.values()])
    n = len(params)
    assert tree_rel_err(hg.init_grad, dict(zip(params, ref[:n]))) < 1e-11
    assert tree_rel_err(hg, dict(zip(h, ref[n:]))) < 1e-11


def test_init_grad_without_hparams_is_maml():
    # one SGD step on a task loss from θ: the meta-gradient (I − η∇²L_T(θ)) ∇L_V(θ') by hand
    A, _, t, _, w0, _, outer = quadratic()
    eta = 0.1
    hg, w = bl.unrolled_hypergrad(lambda p, h: 0.5 * p["w"] @ A @ p["w"], outer, {"w": w0}, {},
                                  optimizer=bl.inner.SGD(lr=eta), steps=1, init_grad=True)
    w1 = w0 - eta * A @ w0
    assert dict(hg) == {} and rel_err(w["w"], w1) < 1e-15
    assert rel_err(hg.init_grad["w"], (torch.eye(5, dtype=DT) - eta * A) @ (w1 - t)) < 1e-13


def test_init_grad_refusals():
    A, B, t, lam, w0, inner, outer = quadratic()
    kw = dict(optimizer=bl.inner.SGD(lr=0.1), steps=4)
    with pytest.raises(ValueError, match=r"init_grad=True needs mode='reverse' or 'checkpoint'.*Fix"):
        bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, mode="forward", init_grad=True, **kw)
    with pytest.raises(ValueError, match=r"truncate=2 < steps=4.*Fix: truncate=None"):
        bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, truncate=2, init_grad=True, **kw)
    with pytest.raises(bl.ShapeError, match="hparams"):                  # no hparams, nothing to return
        bl.unrolled_hypergrad(inner, outer, {"w": w0}, {}, **kw)
    with pytest.raises(ValueError, match=r"weights_jacobian=True needs mode='forward'"):
        bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, weights_jacobian=True, **kw)


# -- implicit MAML ----------------------------------------------------------------------------------
def _flat_hessian(f, params):
    """Dense ``∇²f`` over the flattened tree (float64 oracle)."""
    keys, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def g(x):
        return f({k: c.reshape(s) for k, c, s in zip(keys, x.split(sizes), shapes)})

    return torch.func.hessian(g)(torch.cat([p.reshape(-1) for p in params.values()]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("solver", [bl.CG(maxiter=200, tol=1e-14), bl.Exact()], ids=["cg", "exact"])
def test_imaml_grad_matches_a_dense_solve(solver, dtype):
    net, params, _, inner, _, _, val = mlp_problem()
    params = {k: v for k, v in params.items() if k != "head"}
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 2, generator=g, dtype=DT)
    task = lambda p, X, Y: ((functional_call(net, p, (X,)) - Y) ** 2).mean()
    lam = 0.7
    theta = params
    # a few proximal gradient steps from θ: the formula holds at any point, stationary or not
    w = {k: v.clone() for k, v in theta.items()}
    for _ in range(20):
        gr = torch.func.grad(lambda p: bl.meta.proximal_loss(task, lam)(p, theta, X, Y))(w)
        w = {k: w[k] - 0.3 * gr[k] for k in w}
    H = _flat_hessian(lambda p: task(p, X, Y), w)
    b = torch.cat([v.reshape(-1) for v in torch.func.grad(lambda p: task(p, *val))(w).values()])
    dense = torch.linalg.solve(torch.eye(len(b), dtype=DT) + H / lam, b)
    net.to(dtype)
    cast = lambda t: {k: v.to(dtype) for k, v in t.items()}
    hg = bl.imaml_grad(task, task, cast(w), cast(theta), lam, solver=solver, inner_args=(X.to(dtype), Y.to(dtype)),
                       outer_args=tuple(v.to(dtype) for v in val))
    net.to(DT)
    assert list(hg) == list(theta) and all(hg[k].dtype == dtype for k in hg)
    assert rel_err(torch.cat([hg[k].reshape(-1) for k in theta]), dense) < EXACT_TOL[dtype]
    assert hg.info.inner_grad_norm > 0                          # the proximal gradient norm at w, reported


def test_imaml_grad_matches_finite_differences_of_exact_ridge_adaptation():
    g = torch.Generator().manual_seed(4)
    n, d, lam = 15, 4, 0.5
    X, y = torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    Xq, yq = torch.randn(8, d, generator=g, dtype=DT), torch.randn(8, generator=g, dtype=DT)
    task = lambda p, X, y: 0.5 * ((X @ p["w"] + p["b"] - y) ** 2).mean()
    Z = torch.cat([X, torch.ones(n, 1, dtype=DT)], 1)

    def adapt(theta):                 # argmin task + λ/2 ‖(w, b) − θ‖², exactly: a ridge toward θ
        v = torch.linalg.solve(Z.T @ Z / n + lam * torch.eye(d + 1, dtype=DT),
                               Z.T @ y / n + lam * torch.cat([theta["w"], theta["b"].reshape(1)]))
        return {"w": v[:d], "b": v[d]}

    theta = {"w": torch.randn(d, generator=g, dtype=DT), "b": torch.tensor(0.3, dtype=DT)}
    hg = bl.imaml_grad(task, task, adapt(theta), theta, lam, solver=bl.CG(maxiter=50, tol=1e-14),
                       inner_args=(X, y), outer_args=(Xq, yq))
    assert hg.info.inner_grad_norm < 1e-12                    # adapt() is the exact proximal solution
    eps = 1e-6
    for k in theta:
        for i in range(theta[k].numel()):
            e = torch.zeros_like(theta[k]).reshape(-1)
            e[i] = eps
            shifted = lambda s: {**theta, k: theta[k] + s * e.reshape(theta[k].shape)}
            fd = (task(adapt(shifted(1.0)), Xq, yq) - task(adapt(shifted(-1.0)), Xq, yq)) / (2 * eps)
            assert abs(float(hg[k].reshape(-1)[i] - fd)) < FD_TOL * max(abs(float(fd)), 1e-3), (k, i)


def test_imaml_grad_errors():
    w = {"w": torch.zeros(3, dtype=DT)}
    task = lambda p: (p["w"] ** 2).sum()
    with pytest.raises(bl.ShapeError, match="theta"):
        bl.imaml_grad(task, task, w, {"v": torch.zeros(3, dtype=DT)}, 1.0)
    with pytest.raises(bl.ShapeError, match="theta"):
        bl.imaml_grad(task, task, w, {"w": torch.zeros(2, dtype=DT)}, 1.0)
    for bad in (0.0, -1.0, float("inf"), torch.ones(2)):
        with pytest.raises(ValueError, match=r"imaml_grad: expected `lam`.*Fix"):
            bl.imaml_grad(task, task, w, w, bad)


# -- forward mode: the Jacobian of the trained weights ------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("truncate", [None, 4])
def test_weights_jacobian_quadratic_closed_form(truncate, dtype):
    A, B, t, lam, w0, inner, outer = quadratic(dtype=dtype)
    eta, T = 0.1, 12
    hg, w = bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, optimizer=bl.inner.SGD(lr=eta), steps=T,
                                  truncate=truncate, mode="forward", weights_jacobian=True)
    A, B = A.double(), B.double()
    K = T if truncate is None else truncate
    J = (torch.eye(5, dtype=DT) - torch.linalg.matrix_power(torch.eye(5, dtype=DT) - eta * A, K)) @ torch.linalg.solve(A, B)
    jac = hg.info.weights_jacobian
    assert set(jac) == {"w"} and jac["w"].shape == (3, 5) and jac["w"].dtype == dtype
    assert rel_err(jac["w"], J.T) < EXACT_TOL[dtype]                   # row i: dw_T/dλ_i


@pytest.mark.parametrize("chunk", [None, 2])
def test_weights_jacobian_matches_finite_differences(chunk):
    _, params, hparams, inner, outer, batches, val = mlp_problem()
    hp = {**hparams, "lr": torch.tensor(0.1, dtype=DT), "mom": torch.tensor(0.5, dtype=DT)}
    kw = dict(optimizer=bl.inner.SGD(lr="lr", momentum="mom"), steps=6, inner_args=batches, outer_args=val)
    hg, w = bl.unrolled_hypergrad(inner, outer, params, hp, mode="forward", forward_chunk=chunk,
                                  weights_jacobian=True, **kw)
    jac = hg.info.weights_jacobian
    m = sum(v.numel() for v in hp.values())
    assert set(jac) == set(params) and all(jac[k].shape == (m, *params[k].shape) for k in params)
    eps = 1e-6
    flat = torch.cat([v.reshape(-1) for v in hp.values()])
    for i in range(m):                                   # column i by central differences of w_T
        def w_at(sign):
            x = flat.clone()
            x[i] += sign * eps
            parts = dict(zip(hp, x.split([v.numel() for v in hp.values()])))
            _, wT = bl.unrolled_hypergrad(inner, outer, params, {k: parts[k].reshape(v.shape) for k, v in hp.items()},
                                          **kw)
            return wT

        plus, minus = w_at(1.0), w_at(-1.0)
        fd = {k: (plus[k] - minus[k]) / (2 * eps) for k in params}
        assert tree_rel_err({k: jac[k][i] for k in params}, fd) < FD_TOL, i
    assert float(jac["head"].abs().max()) == 0.0         # never updated: no dependence on λ
    # the hypergradient is the Jacobian's transpose applied to ∂L_V/∂w_T (no direct term here)
    gw = torch.func.grad(lambda p: outer(p, hp, *val))(w)
    chained = sum(jac[k].reshape(m, -1) @ gw[k].reshape(-1) for k in params)
    assert rel_err(torch.cat([hg[k].reshape(-1) for k in hp]), chained) < 1e-10
