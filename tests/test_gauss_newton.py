"""hvp_mode="gauss_newton": the generalized Gauss-Newton ``Jᵀ H_ℓ J`` against dense matrices.

Oracles: ``J`` from ``torch.autograd.functional.jacobian`` of the network output, ``H_ℓ`` from
``torch.autograd.functional.hessian`` of the loss in the output, the exact Hessian from
``torch.autograd.functional.hessian`` of the whole loss, all in float64.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl
from bilevel._tree import Flat
from bilevel.operators import GaussNewton, Point, averaged

DT = torch.float64
TOL = 1e-10  # float64, relative to the largest entry of the reference


def _net(seed=0, sizes=(3, 6, 4)):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1]), torch.nn.Tanh(),
                              torch.nn.Linear(sizes[1], sizes[2])).to(DT)
    return net, {k: v.detach().clone() for k, v in net.named_parameters()}


def _data(n=9, d=3, c=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=DT, generator=gen), torch.randint(0, c, (n,), generator=gen)


def _custom(z):
    """A convex loss of the output with a dense, non-diagonal Hessian, written by hand."""
    return torch.logsumexp(z, 1).pow(2).mean() + 0.1 * z.pow(4).mean()


def _cases(X, y, c):
    target = F.one_hot(y, c).to(DT)
    custom = bl.losses.OutputLoss(_custom)
    return {
        "cross_entropy": (lambda z: bl.losses.cross_entropy(z, y), lambda z: F.cross_entropy(z, y)),
        "mse": (lambda z: bl.losses.mse(z, target), lambda z: F.mse_loss(z, target)),
        "custom": (lambda z: custom(z), _custom),
    }


def _dense(net, params, X, ell):
    """``(G, H)``: the dense GGN ``Jᵀ H_ℓ J`` and the exact Hessian of ``ℓ(net(X))`` in the flat params."""
    fl = Flat(params)
    w0 = fl.flatten(params)

    def out(w):
        return functional_call(net, fl.unflatten(w), (X,))

    z0 = out(w0).detach()
    J = torch.autograd.functional.jacobian(out, w0).reshape(z0.numel(), -1)
    Hl = torch.autograd.functional.hessian(lambda z: ell(z.reshape(z0.shape)), z0.reshape(-1))
    H = torch.autograd.functional.hessian(lambda w: ell(out(w)), w0)
    return J.T @ Hl @ J, H


def _err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "custom"])
def test_product_matches_dense_ggn(loss):
    net, params = _net()
    X, y = _data()
    marked, ell = _cases(X, y, 4)[loss]
    G, _ = _dense(net, params, X, ell)
    f = lambda p, X: marked(functional_call(net, p, (X,)))                  # noqa: E731
    fl = Flat(params)
    for seed in range(3):
        v = fl.unflatten(torch.randn(fl.size, dtype=DT, generator=torch.Generator().manual_seed(seed)))
        got = fl.flatten(bl.hvp(f, params, v, X, mode="gauss_newton"))
        assert _err(got, G @ fl.flatten(v)) < TOL
    op = bl.HessianOperator(f, params, None, (X,), mode="gauss_newton")
    assert op.mode == "gauss_newton"
    assert _err(op.flat.flatten(op.grad), fl.flatten(bl.HessianOperator(f, params, None, (X,)).grad)) < TOL


@pytest.mark.parametrize("kwargs", [{}, {"reduction": "sum"}, {"label_smoothing": 0.2}, {"ignore_index": 2},
                                    {"weight": "classes"}])
def test_cross_entropy_output_hessian_matches_autograd(kwargs):
    """The closed form (and its autograd fallback for class weights) against the dense ``H_ℓ``."""
    _, y = _data()
    gen = torch.Generator().manual_seed(3)
    z0, u = torch.randn(9, 4, dtype=DT, generator=gen), torch.randn(9, 4, dtype=DT, generator=gen)
    if kwargs.get("weight") == "classes":
        kwargs = {"weight": torch.rand(4, dtype=DT, generator=gen) + 0.5}
    Hl = torch.autograd.functional.hessian(lambda z: F.cross_entropy(z.reshape(9, 4), y, **kwargs), z0.reshape(-1))
    f = lambda p: bl.losses.cross_entropy(p["z"], y, **kwargs)                 # noqa: E731  (z itself: J = I)
    got = bl.hvp(f, {"z": z0}, {"z": u}, mode="gauss_newton")["z"]
    assert _err(got.reshape(-1), Hl @ u.reshape(-1)) < TOL


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_output_hessian_matches_autograd(reduction):
    gen = torch.Generator().manual_seed(4)
    z0, t, u = (torch.randn(5, 3, dtype=DT, generator=gen) for _ in range(3))
    Hl = torch.autograd.functional.hessian(lambda z: F.mse_loss(z.reshape(5, 3), t, reduction=reduction),
                                           z0.reshape(-1))
    f = lambda p: bl.losses.mse(p["z"], t, reduction=reduction)                  # noqa: E731
    got = bl.hvp(f, {"z": z0}, {"z": u}, mode="gauss_newton")["z"]
    assert _err(got.reshape(-1), Hl @ u.reshape(-1)) < TOL


def test_positive_semidefinite_where_the_exact_hessian_is_indefinite():
    """A random-init tanh MLP: the exact ``H`` has a clearly negative eigenvalue, ``G`` none."""
    net, params = _net(seed=5, sizes=(3, 8, 4))
    X, y = _data(n=12)
    marked, ell = _cases(X, y, 4)["cross_entropy"]
    G, H = _dense(net, params, X, ell)
    lam_h, lam_g = torch.linalg.eigvalsh(H), torch.linalg.eigvalsh(G)
    assert float(lam_h[0]) < -1e-2 * float(lam_h[-1])             # indefinite, not by rounding
    assert float(lam_g[0]) > -1e-12 * float(lam_g[-1])
    op = bl.HessianOperator(lambda p, X: marked(functional_call(net, p, (X,))), params, None, (X,),
                            mode="gauss_newton")
    gen = torch.Generator().manual_seed(0)
    scale = float(lam_g[-1])
    for _ in range(20):
        v = torch.randn(op.flat.size, dtype=DT, generator=gen)
        assert float(v @ op.matvec_flat(v)) >= -1e-12 * scale * float(v @ v)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "custom"])
def test_equals_exact_hessian_for_a_linear_model(loss):
    """``z = X W + b`` is linear in the params: the network's curvature term vanishes, ``G = H``."""
    X, y = _data()
    marked, _ = _cases(X, y, 4)[loss]
    gen = torch.Generator().manual_seed(2)
    params = {"W": torch.randn(3, 4, dtype=DT, generator=gen), "b": torch.randn(4, dtype=DT, generator=gen)}
    f = lambda p, X: marked(X @ p["W"] + p["b"])                                # noqa: E731
    v = {k: torch.randn(p.shape, dtype=DT, generator=gen) for k, p in params.items()}
    fl = Flat(params)
    got = fl.flatten(bl.hvp(f, params, v, X, mode="gauss_newton"))
    assert _err(got, fl.flatten(bl.hvp(f, params, v, X, mode="reverse"))) < TOL


def test_with_penalty_adds_the_exact_diagonal():
    net, params = _net()
    X, y = _data()
    marked, ell = _cases(X, y, 4)["cross_entropy"]
    G, _ = _dense(net, params, X, ell)
    hp, pen = bl.hparams.weight_decay(params, init=0.3, per="parameter")
    gen = torch.Generator().manual_seed(6)
    hp = {k: h + 0.5 * torch.randn(h.shape, dtype=DT, generator=gen) for k, h in hp.items()}
    f = lambda p, h, X: marked(functional_call(net, p, (X,)))                  # noqa: E731
    op = bl.HessianOperator(f, params, hp, (X,), mode="gauss_newton", penalty=pen)
    fl = op.flat
    diag = torch.autograd.functional.hessian(lambda w: pen(fl.unflatten(w), hp), fl.flatten(params))
    assert torch.count_nonzero(diag - torch.diag(torch.diagonal(diag))) == 0
    v = torch.randn(fl.size, dtype=DT, generator=gen)
    assert _err(op.matvec_flat(v), (G + diag) @ v) < TOL
    # the mixed term is the penalty's (the data loss does not read hparams), exactly as in reverse mode
    exact = bl.HessianOperator(f, params, hp, (X,), mode="reverse", penalty=pen)
    u = fl.unflatten(v)
    got, ref = op.mixed_vjp(u), exact.mixed_vjp(u)
    assert all(_err(got[k], ref[k]) < TOL for k in hp)


def test_mixed_product_stays_exact():
    """Hyperparameters inside the network and inside the loss of the output: ``∇_λ <∇_w f, u>`` equals
    reverse mode's (the GGN replaces only the solve's matrix)."""
    net, params = _net()
    X, y = _data()
    weighted = bl.losses.OutputLoss(lambda z, y, w: (w * F.cross_entropy(z, y, reduction="none")).mean())
    gen = torch.Generator().manual_seed(7)
    hp = {"scale": torch.rand(3, dtype=DT, generator=gen) + 0.5, "logit_w": torch.randn(9, dtype=DT, generator=gen)}

    def f(p, h, X, y):
        return weighted(functional_call(net, p, (X * h["scale"],)), y, torch.sigmoid(h["logit_w"]))

    u = {k: torch.randn(p.shape, dtype=DT, generator=gen) for k, p in params.items()}
    got = bl.mixed_vjp(f, params, hp, u, X, y, mode="gauss_newton")
    ref = bl.mixed_vjp(f, params, hp, u, X, y, mode="reverse")
    assert all(_err(got[k], ref[k]) < TOL for k in hp)


def test_averaged_over_one_process_is_a_no_op(tmp_path):
    net, params = _net()
    X, y = _data()
    marked, _ = _cases(X, y, 4)["cross_entropy"]
    f = lambda p, X: marked(functional_call(net, p, (X,)))                      # noqa: E731
    op = GaussNewton(Point(f, params, None, (X,), "f"))
    assert averaged(op, None) is op
    v = torch.randn(op.flat.size, dtype=DT, generator=torch.Generator().manual_seed(8))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        one = bl.HessianOperator(f, params, None, (X,), mode="gauss_newton", group=dist.group.WORLD)
        assert torch.equal(one.matvec_flat(v), op.matvec_flat(v))
    finally:
        dist.destroy_process_group()


def _random_init_problem():
    """A random-init tanh MLP (exact Hessian indefinite) with a small weight decay as penalty."""
    net, params = _net(seed=5, sizes=(3, 8, 4))
    X, y = _data(n=12)
    Xv, yv = _data(n=10, seed=9)
    hp, pen = bl.hparams.weight_decay(params, init=1e-3, per="tensor")

    def inner(p, h, X, y):
        return bl.losses.cross_entropy(functional_call(net, p, (X,)), y)

    def outer(p, h, X, y):
        return F.cross_entropy(functional_call(net, p, (X,)), y)

    return net, params, hp, pen, inner, outer, (X, y), (Xv, yv)


def test_cg_hypergradient_at_random_init_matches_the_dense_ggn_solve():
    net, params, hp, pen, inner, outer, batch, val = _random_init_problem()
    kw = dict(inner_args=batch, outer_args=val, penalty=pen)
    with pytest.raises(bl.DivergenceError):
        bl.implicit_hypergrad(inner, outer, params, hp, solver=bl.CG(maxiter=200, tol=1e-13), hvp_mode="reverse", **kw)
    hg = bl.implicit_hypergrad(inner, outer, params, hp, solver=bl.CG(maxiter=200, tol=1e-13),
                               hvp_mode="gauss_newton", **kw)
    assert hg.info.hvp_mode == "gauss_newton" and hg.info.solver.converged
    # oracle: u = (G + D)⁻¹ ∂_w L_V densely, then the exact mixed product
    G, _ = _dense(net, params, batch[0], lambda z: F.cross_entropy(z, batch[1]))
    fl = Flat(params)
    D = torch.autograd.functional.hessian(lambda w: pen(fl.unflatten(w), hp), fl.flatten(params))
    w = {k: p.clone().requires_grad_() for k, p in params.items()}
    b = fl.flatten_list(torch.autograd.grad(outer(w, hp, *val), list(w.values())))
    u = fl.unflatten(torch.linalg.solve(G + D, b))
    mixed = bl.HessianOperator(inner, params, hp, batch, mode="reverse", penalty=pen).mixed_vjp(u)
    assert all(_err(hg[k], -mixed[k]) < 1e-8 for k in hp)   # the outer loss does not read hparams


def test_implicit_diff_with_gauss_newton_equals_exact_for_a_linear_model():
    X, y = _data()
    gen = torch.Generator().manual_seed(10)
    W0 = torch.randn(3, 4, dtype=DT, generator=gen)

    def inner(p, h):
        return bl.losses.mse(X @ p["W"], h["t"])

    def solve(h):                                   # least squares: argmin_W ‖X W − t‖²
        return {"W": torch.linalg.lstsq(X, h["t"]).solution}

    grads = {}
    for mode in ("gauss_newton", "reverse"):
        t = (X @ W0 + 0.1 * torch.randn(9, 4, dtype=DT, generator=torch.Generator().manual_seed(11))).requires_grad_()
        out = bl.implicit_diff(inner, solver=bl.CG(maxiter=50, tol=1e-14), hvp_mode=mode)(solve)({"t": t})
        (out["W"].sin().sum()).backward()
        grads[mode] = t.grad
        assert out.info.hvp_mode == mode
    assert _err(grads["gauss_newton"], grads["reverse"]) < TOL


def test_hyperoptimizer_with_gauss_newton_runs_where_exact_cg_raises():
    torch.manual_seed(12)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).to(DT)
    hp, pen = bl.hparams.weight_decay(dict(model.named_parameters()), init=1e-3, per="tensor")
    inner = lambda m, h, b: bl.losses.cross_entropy(m(b[0]), b[1])                # noqa: E731
    outer = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])                        # noqa: E731
    batch, val = _data(n=12), _data(n=10, seed=9)

    def make(mode):
        return bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer, penalty=pen,
                                 inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1),
                                 method=bl.Implicit(hvp_mode=mode, solver=bl.CG(maxiter=10)))

    hg, stats = make("gauss_newton").hypergradient(batch, val)
    assert stats.matvecs == 10 and all(torch.isfinite(g).all() for g in hg.values())
    ref = bl.implicit_hypergrad(lambda p, h, b: bl.losses.cross_entropy(functional_call(model, p, (b[0],)), b[1]),
                                lambda p, h, b: F.cross_entropy(functional_call(model, p, (b[0],)), b[1]),
                                {k: v.detach() for k, v in model.named_parameters()}, hp, penalty=pen,
                                solver=bl.CG(maxiter=10), hvp_mode="gauss_newton", inner_args=(batch,),
                                outer_args=(val,))
    assert all(_err(hg[k], ref[k]) < 1e-10 for k in hp)
    with pytest.raises(bl.DivergenceError):
        make("reverse").hypergradient(batch, val)
    make("gauss_newton").hyper_step(batch, val)


def test_a_loss_that_is_not_one_output_loss_is_refused():
    net, params = _net()
    X, y = _data()
    plain = lambda p, X: F.cross_entropy(functional_call(net, p, (X,)), y)                      # noqa: E731
    summed = lambda p, X: bl.losses.cross_entropy(functional_call(net, p, (X,)), y) + p["0.bias"].sum()  # noqa: E731
    v = {k: torch.ones_like(p) for k, p in params.items()}
    for f, what in ((plain, "got no output-loss call"), (summed, "does not return as is")):
        with pytest.raises(ValueError, match=what) as err:
            bl.hvp(f, params, v, X, mode="gauss_newton")
        assert "penalty=" in str(err.value) and "bl.losses.cross_entropy" in str(err.value)
    leaky = lambda p, X: bl.losses.mse(functional_call(net, p, (X,)), p["2.bias"].expand(9, 4))     # noqa: E731
    with pytest.raises(ValueError, match="depend on params"):
        bl.hvp(leaky, params, v, X, mode="gauss_newton")
    with pytest.raises(ValueError, match="gauss_newton"):
        bl.hvp(plain, params, v, X, mode="gausnewton")
