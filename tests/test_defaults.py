"""The defaults on non-convex networks: the default HyperOptimizer never raises at a random tanh MLP,
reports and warns (once) about negative curvature, is accurate at a converged convex problem, and
Neumann's λ_max is warm-started across hyper steps (in the method state, resumable bit-identically).

Oracles: dense float64 Hessians (eigenvalues, ``bl.Exact`` solves) of tiny problems.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bilevel as bl
from conftest import import_benchmark

DT = torch.float64


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)


def _batches(seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * n, 5, generator=g, dtype=DT)
    y = (X[:, :3] @ torch.randn(3, 3, generator=g, dtype=DT)).argmax(1)
    return (X[:n], y[:n]), (X[n:], y[n:])


def _hopt(model, method=None, lr=1e-2, **kw):
    hp, pen = bl.hparams.weight_decay(model, init=1e-3, per="parameter")
    ce = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])
    args = {} if method is None else {"method": method}
    return bl.HyperOptimizer(model, hp, inner_loss=ce, outer_loss=ce, penalty=pen,
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=lr), **args, **kw), hp, pen, ce


def _dense_hessian(model, hp, pen, ce, batch):
    params = {k: v.detach() for k, v in model.named_parameters()}
    keys = list(params)
    flat = torch.cat([params[k].reshape(-1) for k in keys])

    def f(v):
        p, i = {}, 0
        for k in keys:
            n = params[k].numel()
            p[k] = v[i:i + n].view_as(params[k])
            i += n
        return ce(lambda x: functional_call(model, p, (x,)), hp, batch) + pen(p, hp)
    return torch.autograd.functional.hessian(f, flat)


def test_default_hyperoptimizer_takes_steps_at_a_random_tanh_mlp_reports_and_warns_once():
    """Random init: the exact Hessian is indefinite (checked densely); the default method must not
    raise (today's Neumann default did: negative dominant curvature), must report the negative
    curvature at every step, and warn once per HyperOptimizer."""
    model = _mlp()
    train, val = _batches()
    hopt, hp, pen, ce = _hopt(model)
    ev = torch.linalg.eigvalsh(_dense_hessian(model, {k: v.detach() for k, v in hp.items()}, pen, ce, train))
    assert ev[0] < -0.1 * ev[-1]                      # strongly indefinite: the case this test is about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = [hopt.hyper_step(train, val) for _ in range(3)]
    assert not any(s.skipped for s in stats) and hopt.hyper_steps == 3
    assert all(s.negative_curvature for s in stats)
    assert all(math.isfinite(s.hypergrad_norm) for s in stats)
    assert all(s.matvecs <= 10 for s in stats)
    # never a silently useless step: a solve that stops at once falls back to b / scale, not zero
    assert all(s.hypergrad_norm > 0 for s in stats)
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "negative curvature" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    # a second optimizer warns again (once per HyperOptimizer, not once per process)
    hopt2, *_ = _hopt(_mlp())
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        hopt2.hyper_step(train, val)


def _converged_softmax_regression(batch):
    model = nn.Linear(5, 3).to(DT)
    hopt, hp, pen, ce = _hopt(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    h = {k: v.detach() for k, v in hp.items()}
    inner = lambda p, h, b: ce(lambda x: functional_call(model, p, (x,)), h, b) + pen(p, h)
    for _ in range(30):                                  # Newton to rounding (strictly convex)
        w = {k: v.clone().requires_grad_() for k, v in params.items()}
        g = dict(zip(w, torch.autograd.grad(inner(w, h, batch), list(w.values()))))
        if math.sqrt(sum(float((v ** 2).sum()) for v in g.values())) < 1e-12:
            break
        op = bl.HessianOperator(inner, params, h, (batch,))
        step = bl.Exact()(op.matvec, g)
        params = {k: params[k] - step[k] for k in params}
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(params[k])
    return model, hopt, hp, inner, params, h


def _cos(a, b):
    va = torch.cat([a[k].reshape(-1) for k in sorted(a)])
    vb = torch.cat([b[k].reshape(-1) for k in sorted(a)])
    return float(va @ vb / (va.norm() * vb.norm()))


def test_default_is_accurate_at_a_converged_convex_problem():
    """Converged softmax regression with one decay per weight: the default hypergradient matches the
    dense exact IFT solve to a cosine of 0.9999 (today's Neumann-10 default: 0.95 on such problems)."""
    train, val = _batches(1)
    model, hopt, hp, inner, params, h = _converged_softmax_regression(train)
    outer = lambda p, h, b: F.cross_entropy(functional_call(model, p, (b[0],)), b[1])
    ref = bl.implicit_hypergrad(inner, outer, params, h, solver=bl.Exact(), inner_args=(train,), outer_args=(val,))
    assert ref.info.inner_grad_norm < 1e-10
    hg, stats = hopt.hypergradient(train, val)
    assert _cos(hg, ref) > 0.9999 and not stats.negative_curvature


def _neumann_run(tmp_path=None):
    model = _mlp(1)
    train, val = _batches(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ce = lambda b: F.cross_entropy(model(b[0]), b[1])
    for _ in range(300):                                 # partly trained: the top of the spectrum is positive
        opt.zero_grad()
        ce(train).backward()
        opt.step()
    hopt, hp, pen, ce = _hopt(model, bl.Implicit(solver=bl.Neumann(steps=10)), lr=1e-3, outer_loader=[val])
    return hopt, hp, pen, ce, model, train


def test_neumann_lambda_max_is_warm_started_across_hyper_steps():
    """After the first hyper step (20 power iterations) each refresh costs one product: 11 products per
    step, not 30; the kept estimate follows the dense λ_max of the moving weights."""
    hopt, hp, pen, ce, model, train = _neumann_run()
    mv = []
    for _ in range(6):
        hopt.step(train)
        mv.append(hopt.step_stats.matvecs)
    assert mv[0] == 30 and all(m <= 12 for m in mv[1:]), mv
    state = hopt.method_state
    assert set(state) == {"adjoint", "eigvec", "lambda_max"} and state["adjoint"] is None
    H = _dense_hessian(model, {k: v.detach() for k, v in hp.items()}, pen, ce, train)
    lam = float(torch.linalg.eigvalsh(H)[-1])
    assert abs(state["lambda_max"] - lam) < 0.05 * lam, (state["lambda_max"], lam)


def test_resume_with_the_lambda_max_state_is_bit_identical(tmp_path):
    hopt, hp, *_, train = _neumann_run()
    for _ in range(3):
        hopt.step(train)
    hopt.save(tmp_path / "c.pt")
    assert torch.is_tensor(torch.load(tmp_path / "c.pt", weights_only=True)["method_state"]["eigvec"])
    for _ in range(3):
        hopt.step(train)
    ref = {k: v.detach().clone() for k, v in hp.items()}
    hopt2, hp2, *_ = _neumann_run()
    hopt2.load(tmp_path / "c.pt")
    for _ in range(3):
        hopt2.step(train)
    assert all(torch.equal(hp2[k].detach(), ref[k]) for k in ref)
    assert hopt2.step_stats.matvecs <= 12


def test_an_older_checkpoint_with_the_bare_adjoint_as_method_state_still_loads(tmp_path):
    model = _mlp(1)
    train, val = _batches(2)
    hopt, hp, *_ = _hopt(model, bl.Implicit(solver=bl.CG(maxiter=3, damping=1.0), warm_start=True))
    hopt.hyper_step(train, val)
    state = hopt.state_dict()
    state["method_state"] = state["method_state"]["adjoint"]         # the format before the dict
    hopt2, *_ = _hopt(_mlp(1), bl.Implicit(solver=bl.CG(maxiter=3, damping=1.0), warm_start=True))
    hopt2.load_state_dict(state)
    hopt2.hyper_step(train, val)
    assert hopt2.method_state["adjoint"].keys() == dict(model.named_parameters()).keys()
    with pytest.raises(TypeError, match="method state"):
        bl.Implicit().hypergrad(hopt2.problem(), train, val, {"unknown": 1})


def test_neumann_reports_negative_curvature_and_refreshes_lambda_from_an_eigenvector():
    """On diag(3, 1, −0.02) the series' smallest Rayleigh quotient is negative (reported, not converged);
    from the top eigenvector of a nearby matrix one product gives its λ_max."""
    A = torch.diag(torch.tensor([3.0, 1.0, -0.02], dtype=DT))
    b = torch.ones(3, dtype=DT)
    _, info = bl.Neumann(steps=10).solve_flat(lambda v: A @ v, b)
    assert info.extra["indefinite"] and info.extra["min_rayleigh_quotient"] < 0 and not info.converged
    B = torch.diag(torch.tensor([3.1, 1.0, 0.5], dtype=DT))
    _, info = bl.Neumann(steps=10).solve_flat(lambda v: B @ v, b, eigvec0=torch.tensor([1.0, 0.01, 0.0], dtype=DT))
    assert info.matvecs == 11 and abs(info.extra["lambda_max"] - 3.1) < 1e-3
    assert not info.extra["indefinite"] and info.converged


@pytest.mark.usefixtures("one_thread")
def test_defaults_measurement_smoke(tmp_path):
    """benchmarks/defaults.py at tiny size: every candidate row is there, and CG-10 is exact to a cosine
    of 0.999 at the converged convex point (against the dense reference the script computes)."""
    mod = import_benchmark("defaults")
    res = mod.main(["--smoke", "--out", str(tmp_path / "d")])
    assert (tmp_path / "d.json").exists() and "| candidate |" in (tmp_path / "d.md").read_text()
    rows = {r["candidate"]: r for r in res["cases"]["convex"]["rows"]}
    assert min(rows["CG-10 exact H, on_indefinite='stop'"]["cosine"]["ref exact"]) > 0.999
    assert rows["Neumann-10, α=1/λ_max warm (1 product/step)"]["matvecs"][1:] == [11]
