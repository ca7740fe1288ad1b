"""Structured losses (closed-form Hessian products) against autograd and dense float64 oracles."""

import pytest
import torch

import bilevel as bl

from conftest import rel_err, tree_rel_err

DT = torch.float64


def _logistic_data(n=80, d=7, seed=4):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, d, generator=g, dtype=DT), torch.randn(50, d, generator=g, dtype=DT)
    wt = torch.randn(d, generator=g, dtype=DT)
    y = (torch.rand(n, generator=g, dtype=DT) < torch.sigmoid(X @ wt)).to(DT)
    yv = (torch.rand(50, generator=g, dtype=DT) < torch.sigmoid(Xv @ wt)).to(DT)
    return X, y, Xv, yv


def test_logistic_closed_form_hvp_equals_autograd():
    X, y, _, _ = _logistic_data()
    loss = bl.losses.Logistic()
    p = {"w": torch.randn(7, dtype=DT)}
    v = {"w": torch.randn(7, dtype=DT)}
    op = bl.HessianOperator(loss, p, None, (X, y))
    assert op.mode == "closed"
    ref = bl.hvp(loss, p, v, X, y, mode="reverse")      # autograd through the same loss
    assert rel_err(op.matvec(v)["w"], ref["w"]) < 1e-12
    assert rel_err(bl.hvp(loss, p, v, X, y)["w"], ref["w"]) < 1e-12


def test_logistic_with_decay_penalty_against_dense_newton_oracle():
    """Fully closed form (no second-order autograd) vs a dense float64 solve at a Newton optimum."""
    X, y, Xv, yv = _logistic_data()
    n, d = X.shape
    lam = torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=DT) - 2.0
    w = torch.zeros(d, dtype=DT)
    for _ in range(50):
        s = torch.sigmoid(X @ w)
        H = X.T @ (X * (s * (1 - s))[:, None]) / n + torch.diag(lam.exp())
        w = w - torch.linalg.solve(H, X.T @ (s - y) / n + lam.exp() * w)
    s = torch.sigmoid(X @ w)
    H = X.T @ (X * (s * (1 - s))[:, None]) / n + torch.diag(lam.exp())
    ref = -(lam.exp() * w) * torch.linalg.solve(H, Xv.T @ (torch.sigmoid(Xv @ w) - yv) / 50)

    hp, pen = bl.hparams.weight_decay({"w": w}, per="parameter")
    key = next(iter(hp))
    loss = bl.losses.Logistic()
    for solver, tol in [(bl.CG(tol=1e-13), 1e-8), (bl.Exact(), 1e-10)]:
        hg = bl.implicit_hypergrad(loss, loss, {"w": w}, {key: lam}, solver=solver, penalty=pen,
                                   inner_args=(X, y), outer_args=(Xv, yv))
        assert hg.info.hvp_mode == "closed"
        assert rel_err(hg[key], ref) < tol
        assert hg.info.inner_grad_norm < 1e-12


def test_linear_cross_entropy_closed_form_and_implicit():
    g = torch.Generator().manual_seed(0)
    B, D, C = 40, 5, 4
    X, Xv = torch.randn(B, D, generator=g, dtype=DT), torch.randn(30, D, generator=g, dtype=DT)
    y, yv = torch.randint(0, C, (B,), generator=g), torch.randint(0, C, (30,), generator=g)
    bias = torch.randn(C, generator=g, dtype=DT)
    loss = bl.losses.LinearCrossEntropy(bias=bias, chunk_rows=7)
    W, V = torch.randn(C, D, generator=g, dtype=DT), torch.randn(C, D, generator=g, dtype=DT)
    ref = bl.hvp(loss, {"W": W}, {"W": V}, X, y, mode="reverse")
    assert rel_err(bl.hvp(loss, {"W": W}, {"W": V}, X, y)["W"], ref["W"]) < 1e-12
    # the implicit hypergradient, closed form vs autograd, at a damped point (CE alone is singular)
    hp, pen = bl.hparams.weight_decay({"W": W}, init=1e-1, per="tensor")
    kw = dict(solver=bl.Exact(), penalty=pen, inner_args=(X, y), outer_args=(Xv, yv))
    closed = bl.implicit_hypergrad(loss, loss, {"W": W}, hp, **kw)
    auto = bl.implicit_hypergrad(loss, loss, {"W": W}, hp, hvp_mode="reverse", **kw)
    assert closed.info.hvp_mode == "closed" and auto.info.hvp_mode == "reverse"
    assert tree_rel_err(closed, auto) < 1e-10


def test_structured_loss_without_mixed_term_uses_autograd_for_it():
    """A structured loss that depends on hparams and declares only hvp: mixed term via autograd."""
    class Scaled(bl.losses.Logistic):
        def __call__(self, p, h, X, y):
            return h["s"].exp() * super().__call__(p, h, X, y)

        def hvp(self, p, h, v, X, y=None):
            return {"w": h["s"].exp() * super().hvp(p, h, v, X, y)["w"]}

    Scaled.mixed_vjp = None          # not declared
    Scaled.hessian = None            # products through hvp() only
    X, y, _, _ = _logistic_data()
    p, h = {"w": torch.randn(7, dtype=DT)}, {"s": torch.tensor(0.3, dtype=DT)}
    u = {"w": torch.randn(7, dtype=DT)}
    closed = bl.HessianOperator(Scaled(), p, h, (X, y))
    auto = bl.HessianOperator(Scaled(), p, h, (X, y), mode="reverse")
    assert closed.mode == "closed"
    assert tree_rel_err(closed.mixed_vjp(u), auto.mixed_vjp(u)) < 1e-12
    assert tree_rel_err(closed.matvec(u), auto.matvec(u)) < 1e-12


def test_structured_loss_key_error():
    with pytest.raises(bl.ShapeError, match="key"):
        bl.losses.Logistic(key="beta")({"w": torch.zeros(2)}, {}, torch.zeros(3, 2), torch.zeros(3))
