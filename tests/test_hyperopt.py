"""HyperOptimizer: equals the core functions, reaches known fixed points, resumes exactly, fails safely."""

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bilevel as bl

from conftest import nested_equal, tree_rel_err

DT = torch.float64


def _data(n=60, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = (X @ torch.randn(d, generator=g, dtype=DT) + 0.3 * torch.randn(n, generator=g, dtype=DT) > 0).to(DT)
    return X, y


def _logreg(d=5, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(d, 1).to(DT)


def _losses(penalty):
    inner = lambda m, h, b: F.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1]) + penalty(m, h)
    outer = lambda m, h, b: F.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1])
    return inner, outer


def _fit(model, hp, inner, batch, steps=300):
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=steps, tolerance_grad=1e-13, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = inner(model, hp, batch)
        loss.backward()
        return loss

    opt.step(closure)


def test_implicit_equals_implicit_hypergrad():
    X, y = _data()
    Xv, yv = _data(seed=1)
    model = _logreg()
    hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="parameter")
    inner, outer = _losses(pen)
    _fit(model, hp, inner, (X, y))
    for p in hp.values():
        p.grad = None
    hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer,
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1),
                             method=bl.Implicit(solver=bl.CG(tol=1e-13)))
    hg, stats = hopt.hypergradient((X, y), (Xv, yv))
    params = {k: v.detach() for k, v in model.named_parameters()}
    fi = lambda p, h, X, y: F.binary_cross_entropy_with_logits(functional_call(model, p, (X,)).squeeze(-1), y) + pen(p, h)
    fo = lambda p, h, X, y: F.binary_cross_entropy_with_logits(functional_call(model, p, (X,)).squeeze(-1), y)
    ref = bl.implicit_hypergrad(fi, fo, params, hp, solver=bl.Exact(), inner_args=(X, y), outer_args=(Xv, yv))
    assert tree_rel_err(hg, ref) < 1e-8
    # the reported stationarity is the gradient norm at the weights (an independent autograd pass);
    # how small L-BFGS gets it depends on the machine's rounding, so only "near a minimum" is asserted
    p = {k: v.requires_grad_() for k, v in params.items()}
    gnorm = float(torch.cat([g.reshape(-1) for g in torch.autograd.grad(fi(p, hp, X, y), list(p.values()))]).norm())
    assert math.isclose(stats.inner_grad_norm, gnorm, rel_tol=1e-6, abs_tol=1e-14) and gnorm < 1e-8
    assert stats.solver_iterations is not None
    assert math.isclose(stats.hypergrad_norm, float(torch.cat([v.reshape(-1) for v in ref.values()]).norm()), rel_tol=1e-8)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                                  lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)], ids=["sgd", "adamw"])
def test_unrolled_equals_unrolled_hypergrad(make):
    X, y = _data()
    Xv, yv = _data(seed=1)
    model = _logreg()
    hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="tensor")
    inner, outer = _losses(pen)
    opt = make(model.parameters())
    hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer, inner_optimizer=opt,
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=0.1), method=bl.Unrolled(steps=4))
    for _ in range(3):
        hopt.inner_step((X, y))
    hg, _ = hopt.hypergradient((X, y), (Xv, yv))

    named = dict(model.named_parameters())
    inner_opt, state = bl.inner.from_torch(opt, named)
    fi = lambda p, h, b: F.binary_cross_entropy_with_logits(functional_call(model, p, (b[0],)).squeeze(-1), b[1]) \
        + pen(p, h)
    fo = lambda p, h, b: F.binary_cross_entropy_with_logits(functional_call(model, p, (b[0],)).squeeze(-1), b[1])
    ref, _ = bl.unrolled_hypergrad(fi, fo, {k: v.detach() for k, v in named.items()}, hp, optimizer=inner_opt,
                                   state=state, steps=4, inner_args=((X, y),), outer_args=((Xv, yv),))
    assert tree_rel_err(hg, ref) < 1e-12


# -- the DARTS paper's toy bilevel problem: L_val = wα − 2α + 1, L_train = w² − 2αw + α² ------------
class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(-1.5, dtype=DT))
        self.alpha = torch.nn.Parameter(torch.tensor(-1.0, dtype=DT))


@pytest.mark.parametrize("method,xi,alpha_star", [
    (bl.FirstOrder(), 0.3, 2.0),                       # ∂_α L_val = w − 2 = 0 at w = α
    (bl.Unrolled(steps=1), 0.3, 2.0 / (1 + 2 * 0.3)),   # w' − 2 + 2ξα = 0 at w = α
    (bl.Implicit(solver=bl.Exact()), 0.3, 1.0),         # the true optimum (w*, α*) = (1, 1)
    (bl.Implicit(solver=bl.CG()), 0.3, 1.0),
], ids=["first-order", "second-order", "implicit-exact", "implicit-cg"])
def test_darts_toy_fixed_points(method, xi, alpha_star):
    m = Toy()
    hp = {"alpha": m.alpha}                             # a model parameter that is a hyperparameter
    inner = lambda mm, h, b: mm.w ** 2 - 2 * mm.alpha * mm.w + mm.alpha ** 2
    outer = lambda mm, h, b: mm.w * mm.alpha - 2 * mm.alpha + 1
    hopt = bl.HyperOptimizer(m, hp, inner_loss=inner, outer_loss=outer,
                             inner_optimizer=torch.optim.SGD([m.w], lr=xi),
                             outer_optimizer=torch.optim.SGD([m.alpha], lr=0.1), method=method)
    for _ in range(400):
        for _ in range(5):
            hopt.inner_step(None)
        hopt.hyper_step(None, None)
    assert abs(float(m.alpha.detach()) - alpha_star) < 1e-6
    assert abs(float(m.w.detach()) - alpha_star) < 1e-6


# -- a held-out task: per-weight L2 logistic regression on breast cancer ------------------------------
def test_per_weight_decay_beats_best_single_decay_on_breast_cancer():
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_breast_cancer(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    X, y = torch.tensor(X, dtype=DT)[perm], torch.tensor(y, dtype=DT)[perm]
    tr, va = slice(0, 80), slice(80, 330)
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-8
    X = (X - mu) / sd
    batch, vbatch = (X[tr], y[tr]), (X[va], y[va])

    def trained_val_loss(decay):
        model = torch.nn.Linear(30, 1).to(DT)
        hp, pen = bl.hparams.weight_decay(model, init=decay, per="model", requires_grad=False)
        inner, outer = _losses(pen)
        _fit(model, hp, inner, batch)
        with torch.no_grad():
            return float(outer(model, hp, vbatch))

    grid = [10 ** e for e in torch.linspace(-4, 1, 11).tolist()]
    best = min(grid, key=trained_val_loss)
    best_val = trained_val_loss(best)

    torch.manual_seed(0)
    model = torch.nn.Linear(30, 1).to(DT)
    hp, pen = bl.hparams.weight_decay(model, init=best, per="parameter")
    inner, outer = _losses(pen)
    hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer,
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=0.05),
                             method=bl.Implicit(solver=bl.CG(maxiter=50)))
    for _ in range(25):
        _fit(model, hp, inner, batch, steps=100)        # inner problem to convergence (warm start)
        stats = hopt.hyper_step(batch, vbatch)
        assert stats.inner_grad_norm < 1e-6
    _fit(model, hp, inner, batch)
    with torch.no_grad():
        tuned = float(outer(model, hp, vbatch))
    assert tuned < best_val - 1e-3, (tuned, best_val)


# -- checkpoints -----------------------------------------------------------------------------------------
def _mlp_run(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)).to(DT)
    hp, pen = bl.hparams.weight_decay(model, init=1e-3, exclude=("1.",))
    inner, outer = _losses(pen)
    X, y = _data(n=96)
    Xv, yv = _data(n=48, seed=3)
    batches = [(X[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)]
    val = [(Xv[i:i + 16], yv[i:i + 16]) for i in range(0, 48, 16)]
    hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer,
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=0.01),
                             method=bl.Implicit(solver=bl.CG(maxiter=5, damping=0.1, on_indefinite="stop")),
                             outer_loader=val, hyper_every=2)
    return hopt, batches


def _snapshot(hopt):
    return ([p.detach().clone() for p in hopt.model.state_dict().values()],
            [v.detach().clone() for v in hopt.hparams.values()])


def test_checkpoint_round_trip_is_bit_identical():
    hopt, batches = _mlp_run()
    for b in batches[:4]:
        hopt.step(b)
    buf = io.BytesIO()
    torch.save(hopt.state_dict(), buf)
    for epoch in range(2):
        for b in batches:
            hopt.step(b)
    ref = _snapshot(hopt)

    fresh, _ = _mlp_run(seed=1)                        # different initialization, overwritten by the load
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for epoch in range(2):
        for b in batches:
            fresh.step(b)
    got = _snapshot(fresh)
    assert all(torch.equal(a, b) for a, b in zip(ref[0] + ref[1], got[0] + got[1]))
    assert fresh.hyper_steps == hopt.hyper_steps and fresh.inner_steps == hopt.inner_steps


def test_batchnorm_statistics_untouched_by_hyper_steps():
    hopt, batches = _mlp_run()
    hopt.inner_step(batches[0])
    bn = hopt.model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    for method in (bl.Implicit(solver=bl.CG(maxiter=5, damping=0.1, on_indefinite="stop")), bl.Unrolled(steps=2),
                   bl.FirstOrder()):
        hopt.method = method
        torch.manual_seed(5)
        s1 = hopt.hyper_step(batches[1], batches[2])
        assert torch.isfinite(torch.tensor(s1.hypergrad_norm)) and not s1.skipped
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]


def test_dropout_one_mask_per_hypergradient_is_deterministic():
    hopt, batches = _mlp_run()
    hopt.inner_step(batches[0])
    torch.manual_seed(11)
    a, _ = hopt.hypergradient(batches[1], batches[2])
    torch.manual_seed(11)
    b, _ = hopt.hypergradient(batches[1], batches[2])
    assert tree_rel_err(a, b) == 0.0


# -- failure policy -------------------------------------------------------------------------------------
def _toy_hopt(on_error="raise", method=None, outer=None):
    m = Toy()
    hp = {"alpha": m.alpha}
    inner = lambda mm, h, b: mm.w ** 2 - 2 * mm.alpha * mm.w + mm.alpha ** 2
    outer = outer or (lambda mm, h, b: mm.w * mm.alpha - 2 * mm.alpha + 1)
    return bl.HyperOptimizer(m, hp, inner_loss=inner, outer_loss=outer,
                             inner_optimizer=torch.optim.SGD([m.w], lr=0.1, momentum=0.9),
                             outer_optimizer=torch.optim.Adam([m.alpha], lr=0.1),
                             method=method or bl.Implicit(solver=bl.CG()), on_error=on_error)


@pytest.mark.parametrize("fault", ["nan_outer", "divergence", "nan_inner"])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_failures_change_nothing(fault, on_error):
    bad_outer = (lambda mm, h, b: mm.w * mm.alpha * float("nan")) if fault == "nan_outer" else None
    method = bl.Implicit(solver=bl.Neumann(steps=20, alpha=5.0)) if fault == "divergence" else None
    hopt = _toy_hopt(on_error, method, bad_outer)
    hopt.inner_step(None)
    sd = hopt.state_dict()
    before = (hopt.model.w.detach().clone(), hopt.model.alpha.detach().clone())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if fault == "nan_inner":
            hopt.inner_loss = lambda mm, h, b: mm.w * float("inf")
            call = lambda: hopt.inner_step(None)
        else:
            call = lambda: hopt.hyper_step(None, None)
        if on_error == "raise":
            with pytest.raises((bl.NonFiniteError, bl.DivergenceError)):
                call()
        else:
            out = call()
            assert any("skipped" in str(w.message) for w in caught)
            if fault != "nan_inner":
                assert out.skipped and out.error
    assert torch.equal(hopt.model.w.detach(), before[0]) and torch.equal(hopt.model.alpha.detach(), before[1])
    assert str(hopt.outer_optimizer.state_dict()) == str(sd["outer_optimizer"])
    assert str(hopt.inner_optimizer.state_dict()) == str(sd["inner_optimizer"])
    assert hopt.skipped == 1


# -- construction errors ---------------------------------------------------------------------------------
def test_construction_errors():
    m = Toy()
    inner = lambda mm, h, b: mm.w ** 2
    outer = lambda mm, h, b: mm.w
    kw = dict(inner_loss=inner, outer_loss=outer)
    with pytest.raises(ValueError, match="requires_grad=True"):
        bl.HyperOptimizer(m, {"a": torch.tensor(1.0)}, inner_optimizer=torch.optim.SGD([m.w], lr=0.1),
                          outer_optimizer=torch.optim.SGD([torch.tensor(1.0, requires_grad=True)], lr=0.1), **kw)
    with pytest.raises(ValueError, match="got the hyperparameter .alpha."):
        bl.HyperOptimizer(m, {"alpha": m.alpha}, inner_optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                          outer_optimizer=torch.optim.SGD([m.alpha], lr=0.1), **kw)
    with pytest.raises(ValueError, match="not a parameter of `model`"):
        bl.HyperOptimizer(m, {"alpha": m.alpha}, inner_optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1),
                          outer_optimizer=torch.optim.SGD([m.alpha], lr=0.1), **kw)
    other = torch.tensor(0.0, requires_grad=True)
    with pytest.raises(ValueError, match=r"\['b'\] outside it"):
        bl.HyperOptimizer(m, {"alpha": m.alpha, "b": other}, inner_optimizer=torch.optim.SGD([m.w], lr=0.1),
                          outer_optimizer=torch.optim.SGD([m.alpha], lr=0.1), **kw)
    with pytest.raises(ValueError, match="not in hparams"):
        bl.HyperOptimizer(m, {"alpha": m.alpha}, inner_optimizer=torch.optim.SGD([m.w], lr=0.1),
                          outer_optimizer=torch.optim.SGD([m.alpha, other], lr=0.1), **kw)
    with pytest.raises(TypeError, match="method"):
        bl.HyperOptimizer(m, {"alpha": m.alpha}, inner_optimizer=torch.optim.SGD([m.w], lr=0.1),
                          outer_optimizer=torch.optim.SGD([m.alpha], lr=0.1), method=bl.CG(), **kw)
    with pytest.raises(ValueError, match="outer_loader"):
        bl.HyperOptimizer(m, {"alpha": m.alpha}, inner_optimizer=torch.optim.SGD([m.w], lr=0.1),
                          outer_optimizer=torch.optim.SGD([m.alpha], lr=0.1), **kw).step(None)


def test_step_reports_whether_it_took_a_hyper_step():
    hopt, batches = _mlp_run()
    taken = []
    for b in batches[:4]:
        hopt.step(b)
        taken.append(hopt.step_stats is not None)
    assert taken == [False, True, False, True] and hopt.hyper_steps == 2 and hopt.outer_batches == 2


def test_nonfinite_outer_step_restores_hparams_and_optimizer_state():
    hopt = _toy_hopt(on_error="skip")
    hopt.hyper_step(None, None)                         # Adam now has moments to corrupt
    sd = copy.deepcopy(hopt.state_dict())               # state_dict() holds live tensors, as torch's does
    alpha = hopt.model.alpha.detach().clone()
    for g in hopt.outer_optimizer.param_groups:
        g["lr"] = float("inf")                          # the step itself produces ±inf
    with pytest.warns(RuntimeWarning, match="restored"):
        stats = hopt.hyper_step(None, None)
    assert stats.skipped and torch.equal(hopt.model.alpha.detach(), alpha)
    restored = hopt.outer_optimizer.state_dict()["state"]
    for k, st in sd["outer_optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(restored[k][name], v), name


@pytest.mark.parametrize("method", [bl.Implicit(solver=bl.CG(maxiter=8, tol=0.0, damping=1.0)), bl.Unrolled(steps=3)], ids=["implicit", "unrolled"])
def test_penalty_argument_equals_penalty_in_inner_loss(method):
    """``penalty=`` gives the trajectory of ``inner_loss + penalty``; a frozen tensor stays frozen."""
    X, y = _data()
    Xv, yv = _data(seed=1)
    runs = []
    for split in (False, True):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(DT)
        hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="parameter")
        inner, outer = _losses(pen) if not split else _losses(lambda m, h: 0.0)
        inner_params = [p for n, p in model.named_parameters() if n != "0.bias"]      # 0.bias is frozen
        hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer,
                                 inner_optimizer=torch.optim.SGD(inner_params, lr=0.1),
                                 outer_optimizer=torch.optim.SGD(hp.values(), lr=10.0), method=method,
                                 penalty=pen if split else None)
        for _ in range(3):
            hopt.inner_step((X, y))
            hopt.hyper_step((X, y), (Xv, yv))
        runs.append((copy.deepcopy(dict(model.named_parameters())), {k: v.detach().clone() for k, v in hp.items()}))
    (w0, h0), (w1, h1) = runs
    assert tree_rel_err(w1, w0) < 1e-10 and tree_rel_err(h1, h0) < 1e-10
    assert not torch.equal(h1["weight_decay/2.weight"], torch.full_like(h1["weight_decay/2.weight"], math.log(1e-2)))


# -- closure inner optimizers (L-BFGS) ---------------------------------------------------------------
def _lbfgs(params, max_iter=200):
    return torch.optim.LBFGS(params, lr=1, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=0,
                             history_size=20, line_search_fn="strong_wolfe")


def test_lbfgs_inner_step_solves_and_hyper_step_equals_dense_oracle():
    """One L-BFGS inner_step reaches the minimizer; the next hyper step's hypergradient equals the dense
    float64 IFT oracle; hyper_every=1 alternates solve and update (the classic IFT loop)."""
    X, y = _data()
    Xv, yv = _data(seed=1)
    model = _logreg()
    hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="parameter", exclude=("bias",))
    inner, outer = _losses(lambda m, h: 0.0)
    hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer, penalty=pen,
                             inner_optimizer=_lbfgs(model.parameters()),
                             outer_optimizer=torch.optim.SGD(hp.values(), lr=0.5),
                             method=bl.Implicit(solver=bl.CG(tol=1e-13)), outer_loader=[(Xv, yv)])
    loss0 = hopt.inner_step((X, y))
    assert loss0.shape == () and hopt.inner_steps == 1
    fi = lambda p, h, X, y: F.binary_cross_entropy_with_logits(functional_call(model, p, (X,)).squeeze(-1), y) \
        + pen(p, h)
    fo = lambda p, h, X, y: F.binary_cross_entropy_with_logits(functional_call(model, p, (X,)).squeeze(-1), y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.func.grad(fi)(params, {k: v.detach() for k, v in hp.items()}, X, y)
    assert max(float(v.abs().max()) for v in g.values()) < 1e-9            # at the minimum
    ref = bl.implicit_hypergrad(fi, fo, params, {k: v.detach() for k, v in hp.items()}, solver=bl.Exact(),
                                inner_args=(X, y), outer_args=(Xv, yv))
    hg, stats = hopt.hypergradient((X, y), (Xv, yv))
    assert tree_rel_err(hg, ref) < 1e-8 and stats.inner_grad_norm < 1e-9
    vals = []
    for _ in range(5):
        hopt.step((X, y))
        vals.append(hopt.step_stats.outer_loss)
    assert hopt.hyper_steps == 5 and vals[-1] < vals[0]                     # the validation loss falls


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("fault", ["nan_later", "exception_later"])
def test_lbfgs_failure_mid_line_search_restores_weights_and_state(fault, on_error):
    """L-BFGS moves the weights before its later evaluations: a NaN or an exception there must still
    leave weights, gradients and the optimizer's history exactly as before the step."""
    X, y = _data()
    model = _logreg()
    hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="parameter", exclude=("bias",))
    calls = {"n": 0, "armed": False}

    def inner(m, h, b):
        calls["n"] += 1
        loss = F.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1])
        if calls["armed"] and calls["n"] >= 3:            # the third evaluation of the armed step
            if fault == "exception_later":
                raise KeyError("injected")
            return loss * float("nan")
        return loss

    hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=inner, penalty=pen,
                             inner_optimizer=_lbfgs(model.parameters(), max_iter=5),
                             outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1),
                             method=bl.Implicit(solver=bl.CG(maxiter=3)), on_error=on_error)
    hopt.inner_step((X, y))                               # L-BFGS now has history to corrupt
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = copy.deepcopy(hopt.inner_optimizer.state_dict())
    calls.update(n=0, armed=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if fault == "exception_later":
            with pytest.raises(KeyError, match="injected"):
                hopt.inner_step((X, y))
        elif on_error == "raise":
            with pytest.raises(bl.NonFiniteError, match="left as they were"):
                hopt.inner_step((X, y))
        else:
            hopt.inner_step((X, y))
            assert any("skipped" in str(w.message) for w in caught) and hopt.skipped == 1
    assert calls["n"] >= 3                                # the fault did happen after the first evaluation
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), before[k]) and v.grad is None, k
    assert nested_equal(hopt.inner_optimizer.state_dict(), state)
    assert hopt.inner_steps == 1


def test_lbfgs_with_unrolled_is_refused_at_construction():
    model = _logreg()
    hp, pen = bl.hparams.weight_decay(model, init=1e-2)
    loss = lambda m, h, b: m(b[0]).sum()
    with pytest.raises(ValueError, match="LBFGS.*Fix: method=bl.Implicit"):
        bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=pen,
                          inner_optimizer=_lbfgs(model.parameters()),
                          outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1), method=bl.Unrolled(steps=2))


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_inner_optimizer_overflow_is_reported_not_silent(on_error, tmp_path):
    """Finite gradients, but the optimizer's update overflows: the step cannot be undone (no copy of
    the weights is kept), so the next step raises whatever on_error says, and no checkpoint is
    written over the last good one."""
    X, y = _data()
    model = _logreg()
    hp, pen = bl.hparams.weight_decay(model, init=1e-2)
    loss = lambda m, h, b: F.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=pen, inner_optimizer=opt,
                             outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1), on_error=on_error)
    hopt.inner_step((X, y))
    ckpt = tmp_path / "ckpt.pt"
    hopt.save(ckpt)
    good = ckpt.read_bytes()
    opt.param_groups[0]["lr"] = float("inf")
    hopt.inner_step((X, y))                                   # finite gradients: the update overflows
    with pytest.raises(bl.NonFiniteError, match="refused|left as it was"):
        hopt.save(ckpt)
    assert ckpt.read_bytes() == good
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # raised, not a skip warning
        with pytest.raises(bl.NonFiniteError, match=r"earlier inner_optimizer.step\(\) overflowed"):
            hopt.inner_step((X, y))
    hopt.load(ckpt)                                           # the way back the message gives
    assert torch.isfinite(hopt.inner_step((X, y)))


def test_all_finite_one_pass_check_matches_the_elementwise_test():
    from bilevel._errors import all_finite

    big = torch.finfo(torch.float32).max
    cases = [(torch.ones(3), True), (torch.tensor([1.0, float("nan")]), False),
             (torch.tensor([float("inf"), -float("inf")]), False),      # the sum is NaN: caught
             (torch.tensor([big, big]), True),                          # the sum overflows: exact fallback
             (torch.tensor([1 + 1j, complex(0, float("inf"))]), False), (torch.tensor([1, 2]), True),
             (torch.empty(0), True)]
    for t, expected in cases:
        assert all_finite(t) is expected, t
        assert all_finite(torch.zeros(2, dtype=torch.float64), t) is expected


def _lbfgs_hopt(tol=1e-7, calls=None):
    """Per-weight-decay logistic regression, HyperOptimizer with an L-BFGS inner optimizer (hyper_every=1)."""
    torch.manual_seed(0)
    X, Xv = torch.randn(200, 10, dtype=DT), torch.randn(200, 10, dtype=DT)
    w_true = torch.randn(10, dtype=DT) * (torch.arange(10) < 3)
    y, yv = ((X @ w_true + 0.5 * torch.randn(200, dtype=DT)) > 0).to(DT), (Xv @ w_true > 0).to(DT)
    model = torch.nn.Linear(10, 1).to(DT)
    hp, penalty = bl.hparams.weight_decay(model, init=1e-2, per="parameter", exclude=("bias",))

    def bce(m, h, b):
        if calls is not None:
            calls.append(1)
        return F.binary_cross_entropy_with_logits(m(b[0]).squeeze(1), b[1])
    hopt = bl.HyperOptimizer(model, hp, inner_loss=bce, outer_loss=bce, penalty=penalty,
                             inner_optimizer=torch.optim.LBFGS(model.parameters(), max_iter=100, tolerance_grad=tol,
                                                               tolerance_change=0, line_search_fn="strong_wolfe"),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=0.3),
                             method=bl.Implicit(solver=bl.CG(maxiter=20)), outer_loader=[(Xv, yv)], hyper_every=1)
    return hopt, (X, y), penalty, bce


def test_lbfgs_keeps_its_history_but_the_pair_straddling_a_hyper_step():
    """After a hyper step the inner objective is another function. The pair L-BFGS would form from the
    last gradient of the old objective and the first of the new stalled its line search (inner gradient
    1e-2 instead of 1e-5, measured when the whole history was kept); clearing the whole history instead
    restarts every solve from steepest descent. Only the straddling pair is dropped: the other pairs
    stay, the straddling one never enters the history, and every solve still reaches the minimum of
    the new objective (against a fresh tight solve at the same hyperparameters)."""
    hopt, batch, penalty, bce = _lbfgs_hopt()
    norms, vals = [], []
    for i in range(15):
        st = hopt.inner_optimizer.state[hopt.inner_optimizer._params[0]]
        before = [y.clone() for y in st.get("old_dirs", [])]
        if i:
            assert not st["d"].any()                              # the straddling step was zeroed
        hopt.inner_step(batch)
        # every pair kept from before the hyper step is still there, in order (history_size 100 > all pairs)
        assert len(st["old_dirs"]) >= len(before) and all(torch.equal(a, b) for a, b in zip(before, st["old_dirs"]))
        straddle = st["d"].mul(st["t"]).clone()                   # the step that would straddle the change
        hopt.hyper_step(batch, hopt.next_outer_batch())
        assert len(st["old_dirs"]) == len(st["old_stps"]) and len(st["old_dirs"]) > 0
        norms.append(hopt.last_stats.inner_grad_norm)
        vals.append(hopt.last_stats.outer_loss)
        if i:
            # the first new pair came from the new solve's own first step, not from the straddling one
            assert not any(torch.equal(s, straddle) for s in st["old_stps"])
    assert max(norms) < 1e-6, norms
    assert all(b < a for a, b in zip(vals, vals[1:])), vals
    # the last solve ends where a fresh solve from zero at the final hyperparameters ends
    hopt.inner_step(batch)
    fresh = copy.deepcopy(hopt.model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    _fit(fresh, hopt.hparams, lambda m, h, b: bce(m, h, b) + penalty(dict(m.named_parameters()), h), batch)
    for (k, a), b in zip(hopt.model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_lbfgs_kept_history_takes_fewer_evaluations_than_a_cleared_one():
    """Warm-started solves with the kept history evaluate the loss fewer times than the same run with
    the history cleared after every hyper step, and reach the same hyperparameters."""
    counts, hps = [], []
    for clear in (False, True):
        calls = []
        hopt, batch, _, _ = _lbfgs_hopt(tol=1e-5, calls=calls)
        for _ in range(10):
            hopt.step(batch)
            if clear:
                hopt.inner_optimizer.state.clear()
        counts.append(len(calls))
        hps.append({k: v.detach().clone() for k, v in hopt.hparams.items()})
    assert counts[0] < 0.8 * counts[1], counts
    assert tree_rel_err(hps[0], hps[1]) < 1e-3


def _logreg_sgd():
    """``(model, hparams, penalty, loss, SGD-momentum inner optimizer)`` of a logistic regression."""
    model = _logreg()
    hp, pen = bl.hparams.weight_decay(model, init=1e-2)
    loss = lambda m, h, b: F.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1])
    return model, hp, pen, loss, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def test_clip_grad_norm_equals_the_plain_torch_loop():
    """clip_grad_norm= clips like torch.nn.utils.clip_grad_norm_ in an ordinary loop (the oracle),
    and is refused with L-BFGS or a non-positive norm."""
    X, y = _data()
    runs = []
    for use_hopt in (True, False):
        model, hp, pen, loss, opt = _logreg_sgd()
        norms = []
        if use_hopt:
            hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=pen, inner_optimizer=opt,
                                     outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1), clip_grad_norm=0.05)
        for _ in range(5):
            if use_hopt:
                hopt.inner_step((X, y))
            else:
                opt.zero_grad()
                (loss(model, hp, (X, y)) + pen(dict(model.named_parameters()), hp)).backward()
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
                opt.step()
        runs.append({k: v.detach().clone() for k, v in model.named_parameters()})
    assert min(norms) > 0.05                                 # clipping was active at every step
    for k in runs[0]:
        assert torch.allclose(runs[0][k], runs[1][k], rtol=1e-13, atol=1e-15), k
    model = _logreg()
    hp, pen = bl.hparams.weight_decay(model, init=1e-2)
    kw = dict(inner_loss=loss, outer_loss=loss, penalty=pen, outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1))
    with pytest.raises(ValueError, match="line search needs the true gradient"):
        bl.HyperOptimizer(model, hp, inner_optimizer=_lbfgs(model.parameters()), clip_grad_norm=1.0, **kw)
    with pytest.raises(ValueError, match="finite number > 0"):
        bl.HyperOptimizer(model, hp, inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1), clip_grad_norm=0.0, **kw)


def test_inner_steps_under_no_grad_train_like_ones_outside():
    """A training loop wrapped in ``torch.no_grad()`` (common in evaluation code that also trains)
    still takes the same inner steps, penalty included: the loss is built with grad enabled."""
    X, y = _data()
    runs = []
    for no_grad in (False, True):
        model, hp, pen, loss, opt = _logreg_sgd()
        hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=pen, inner_optimizer=opt,
                                 outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1))
        with torch.set_grad_enabled(not no_grad):
            losses = [float(hopt.inner_step((X, y))) for _ in range(3)]
        assert hopt.inner_steps == 3 and losses[-1] < losses[0]
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_implicit_warm_start_refines_across_hyper_steps_and_resumes_exactly(tmp_path):
    """Implicit(warm_start=True): each solve starts from the last accepted adjoint, so a 2-iteration
    CG approaches the exact hypergradient over the run (a cold one does not), and the adjoint is
    part of the checkpoint: a resumed run continues bit-identically."""
    X, y = _data(n=120, d=8)
    Xv, yv = _data(n=120, d=8, seed=1)

    def make(warm):
        model = _logreg(d=8)
        hp, pen = bl.hparams.weight_decay(model, init=1e-1, per="parameter", exclude=("bias",))
        bce = lambda m, h, b: F.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1])
        return bl.HyperOptimizer(model, hp, inner_loss=bce, outer_loss=bce, penalty=pen,
                                 inner_optimizer=_lbfgs(model.parameters()),
                                 outer_optimizer=torch.optim.SGD(hp.values(), lr=0.02),
                                 method=bl.Implicit(solver=bl.CG(maxiter=2, tol=0.0), warm_start=warm),
                                 outer_loader=[(Xv, yv)]), model, hp, pen, bce

    def exact_err(hopt, model, hp, pen, bce):
        params = {k: v.detach() for k, v in model.named_parameters()}
        fi = lambda p, h: bce(lambda x: functional_call(model, p, (x,)), h, (X, y)) + pen(p, h)
        fo = lambda p, h: bce(lambda x: functional_call(model, p, (x,)), h, (Xv, yv))
        ref = bl.implicit_hypergrad(fi, fo, params, {k: v.detach() for k, v in hp.items()}, solver=bl.Exact())
        hg, _ = hopt.hypergradient((X, y), (Xv, yv))
        return tree_rel_err(hg, ref)

    errs = {}
    for warm in (False, True):
        hopt, *rest = make(warm)
        for _ in range(12):
            hopt.step((X, y))
        errs[warm] = exact_err(hopt, *rest)
    assert errs[True] < 0.2 * errs[False], errs
    # resume: 6 steps, checkpoint, 6 more; against a fresh optimizer loaded from the checkpoint
    hopt, model, hp, *_ = make(True)
    for _ in range(6):
        hopt.step((X, y))
    hopt.save(tmp_path / "c.pt")
    assert hopt.state_dict()["method_state"] is not None
    for _ in range(6):
        hopt.step((X, y))
    ref = {k: v.detach().clone() for k, v in hp.items()}
    hopt2, model2, hp2, *_ = make(True)
    hopt2.load(tmp_path / "c.pt")
    for _ in range(6):
        hopt2.step((X, y))
    assert all(torch.equal(hp2[k].detach(), ref[k]) for k in ref)
    with pytest.raises(ValueError, match="starting point"):
        bl.Implicit(solver=bl.Nystrom(rank=2), warm_start=True)


def test_a_run_without_any_hyper_step_warns_when_it_ends():
    """One epoch shorter than hyper_every moves no hyperparameter: say so when the run ends."""
    import gc

    model = torch.nn.Linear(3, 1)
    hp = {"c": torch.tensor(0.1, requires_grad=True)}
    loss = lambda m, h, b: ((m(b) - h["c"]) ** 2).mean()
    data = [torch.randn(4, 3) for _ in range(5)]

    def run(hyper_every):
        hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, outer_loader=data,
                                 inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1), hyper_every=hyper_every,
                                 method=bl.FirstOrder())
        for b in data:
            hopt.step(b)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del hopt
            gc.collect()
        return [str(w.message) for w in caught]

    msgs = run(hyper_every=20)
    assert len(msgs) == 1 and "called step() 5 times and took no hyper step" in msgs[0] and "hyper_every=20" in msgs[0]
    assert run(hyper_every=2) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_non_finite_gradient_under_a_finite_loss_changes_nothing(dtype):
    """√|w| at w = 0: the loss is finite, its gradient is Inf. The inner step must not move anything."""
    model = torch.nn.Linear(3, 1).to(dtype)
    with torch.no_grad():
        model.weight[0, 1] = 0.0
    hp = {"c": torch.tensor(0.1, dtype=dtype, requires_grad=True)}
    inner = lambda m, h, b: ((m(b) - h["c"]) ** 2).mean() + m.weight.abs().sqrt().sum()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=inner, inner_optimizer=opt,
                             outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1), on_error="skip",
                             method=bl.FirstOrder())
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        loss = hopt.inner_step(torch.randn(4, 3, dtype=dtype))
    assert math.isfinite(float(loss)) and hopt.skipped == 1 and hopt.inner_steps == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not opt.state
    assert all(p.grad is None for p in model.parameters())          # no Inf gradient left in .grad


class _SparseBag(torch.nn.Module):
    """Token ids -> mean of a sparse-gradient embedding -> linear: ``.grad`` of the table is sparse."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 4, sparse=True)
        self.out = torch.nn.Linear(4, 1)

    def forward(self, ids, grad_fill=None):
        e = self.emb(ids)
        if grad_fill is not None:                 # the table's gradient: this value at each row read
            e.register_hook(lambda g: torch.full_like(g, grad_fill))
        return self.out(e.mean(1)).squeeze(-1)


@pytest.mark.parametrize("grad_fill", [None, float("nan"), 1e38])
def test_sparse_embedding_gradients_train_like_plain_torch_and_are_checked(grad_fill):
    """``nn.Embedding(sparse=True)`` through the inner step: ordinary gradients train as a plain torch
    loop does; a NaN gradient under a finite loss is skipped; finite gradients whose sum overflows
    (12 rows of 1e38: the check's exact test then reads the sparse values) still give a step."""
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randperm(20, generator=gen)[:12].view(4, 3), torch.randn(4, generator=gen)   # rows read once
    runs = []
    for use_hopt in (True, False):
        model = _SparseBag()
        inner = lambda m, h, b: F.mse_loss(m(b[0], grad_fill), b[1])
        opt = torch.optim.SGD(model.parameters(), lr=1e-38 if grad_fill == 1e38 else 0.1)   # rows move by 1
        if use_hopt:
            hp = {"c": torch.tensor(0.0, requires_grad=True)}
            hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=inner, inner_optimizer=opt,
                                     outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1), on_error="skip",
                                     method=bl.FirstOrder())
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                for _ in range(3):
                    hopt.inner_step((ids, y))
            assert model.emb.weight.grad is None or model.emb.weight.grad.is_sparse
            assert (hopt.inner_steps, hopt.skipped) == ((0, 3) if grad_fill != grad_fill else (3, 0))
        else:
            for _ in range(3):
                opt.zero_grad()
                inner(model, None, (ids, y)).backward()
                opt.step()
        runs.append({k: v.detach().clone() for k, v in model.named_parameters()})
    if grad_fill != grad_fill:                      # skipped: the weights stay as they started
        runs[1] = {k: v.detach().clone() for k, v in _SparseBag().named_parameters()}
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("method", [bl.Implicit(solver=bl.CG(maxiter=20, damping=1.0)), bl.Unrolled(steps=3)],
                         ids=["implicit", "unrolled"])
def test_sparse_embedding_hypergradient_equals_the_dense_twins(method):
    """A hyper step reads a ``sparse=True`` table's gradient densely (flat vectors, products): the
    hypergradient equals that of the same model built with ``sparse=False``, and the layer's own
    setting is back afterwards (the next inner step's gradient is sparse again). The decays are the
    linear layer's: the table enters through the Hessian and the mixed term's chain."""
    gen = torch.Generator().manual_seed(2)
    ids, y = torch.randint(0, 20, (16, 3), generator=gen), torch.randn(16, generator=gen)
    inner = lambda m, h, b: F.mse_loss(m(b[0]), b[1])
    hgs = []
    for sparse in (True, False):
        model = _SparseBag()
        model.emb.sparse = sparse
        hp, pen = bl.hparams.weight_decay(model, init=1e-2, exclude=("emb.",))   # a decayed table's gradient is dense
        hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=inner, penalty=pen, method=method,
                                 inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 outer_optimizer=torch.optim.Adam(hp.values(), lr=0.01))
        hopt.inner_step((ids, y))
        hg, stats = hopt.hypergradient((ids, y), (ids, y))
        assert stats.hypergrad_norm > 0 and model.emb.sparse is sparse
        hopt.inner_step((ids, y))
        assert model.emb.weight.grad is None or model.emb.weight.grad.is_sparse is sparse
        hgs.append(hg)
    for k in hgs[0]:
        torch.testing.assert_close(hgs[0][k], hgs[1][k], rtol=1e-5, atol=1e-7, msg=k)


class _TinyTransformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(5, 8)
        self.enc = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


@pytest.mark.parametrize("method", [bl.Implicit(), bl.Implicit(hvp_mode="gauss_newton"), bl.Unrolled(steps=2)],
                         ids=["implicit", "gauss-newton", "unrolled"])
def test_transformer_layers_take_hyper_steps(method):
    """``nn.TransformerEncoderLayer`` (fused attention kernels without second derivatives or forward
    mode) takes hyper steps with every method: the hypergradient equals the one computed with the
    math attention kernel forced by the caller (the oracle: nothing of the library differs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(3)
    batch = (torch.randn(16, 4, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen))
    loss = lambda m, h, b: bl.losses.cross_entropy(m(b[0]), b[1])
    hgs = []
    for forced in (False, True):
        model = _TinyTransformer()
        hp, pen = bl.hparams.weight_decay(model, init=1e-3)
        hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=pen, method=method,
                                 inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                 outer_optimizer=torch.optim.Adam(hp.values(), lr=0.01), on_error="raise")
        hopt.inner_step(batch)
        if forced:
            with sdpa_kernel(SDPBackend.MATH):
                hg, stats = hopt.hypergradient(batch, batch)
        else:
            hg, stats = hopt.hypergradient(batch, batch)
        assert stats.hypergrad_norm > 0
        hgs.append(hg)
    for k in hgs[0]:
        torch.testing.assert_close(hgs[0][k], hgs[1][k], rtol=1e-6, atol=1e-9, msg=k)


def test_half_precision_hyperparameters_name_the_cause_and_float32_ones_train():
    """Adam's eps rounds to 0 in float16: a zero hypergradient entry gives 0/0. The error says so, and
    float32 hyperparameters over a float16 model work."""
    torch.manual_seed(0)
    X, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    ce = lambda m, h, b: F.cross_entropy(m(b[0]).float(), b[1])
    for hp_dtype in (torch.float16, torch.float32):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).half()
        hp, pen = bl.hparams.weight_decay(model, init=1e-3)
        hp = {k: v.detach().to(hp_dtype).requires_grad_() for k, v in hp.items()}
        before = {k: v.detach().clone() for k, v in hp.items()}
        hopt = bl.HyperOptimizer(model, hp, inner_loss=ce, outer_loss=ce, penalty=pen,
                                 inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 outer_optimizer=torch.optim.Adam(hp.values(), lr=0.05),
                                 method=bl.Implicit(solver=bl.CG(maxiter=3, damping=1.0)))
        hopt.inner_step((X.half(), y))
        batch = (X.half(), y)
        if hp_dtype == torch.float16:
            with pytest.raises(bl.NonFiniteError, match="keep the hyperparameters in float32"):
                hopt.hyper_step(batch, batch)
            assert all(torch.equal(hp[k], before[k]) for k in hp)
        else:
            st = hopt.hyper_step(batch, batch)
            assert not st.skipped and all(v.dtype == torch.float32 and v.isfinite().all() for v in hp.values())
            assert any(not torch.equal(hp[k], before[k]) for k in hp)
