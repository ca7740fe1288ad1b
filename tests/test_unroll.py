"""Unrolled hypergradients against closed forms, `higher`, and each other."""

import os
import textwrap

import pytest
import torch
from torch.func import functional_call

import bilevel as bl

from conftest import import_benchmark, rel_err, tree_rel_err

DT = torch.float64
MODES = ["reverse", "checkpoint", "forward", "replay"]
DTYPES = [torch.float64, torch.float32]
# relative tolerances of a hypergradient and of final params against a float64 oracle or another mode
HG_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
W_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def quadratic(P=6, m=3, seed=0, dtype=DT):
    """inner ½wᵀAw − wᵀBλ (minimizer A⁻¹Bλ), outer ½‖w − t‖²; the tensors drawn in float64, then cast
    to ``dtype`` (``.double()`` of them gives the float64 oracle of the very same problem)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT))
    A = ((Q * torch.linspace(1.0, 8.0, P, dtype=DT)) @ Q.T).to(dtype)
    B = torch.randn(P, m, generator=g, dtype=DT).to(dtype)
    t = torch.randn(P, generator=g, dtype=DT).to(dtype)
    lam = torch.randn(m, generator=g, dtype=DT).to(dtype)
    w0 = torch.randn(P, generator=g, dtype=DT).to(dtype)
    inner = lambda p, h: 0.5 * p["w"] @ A @ p["w"] - p["w"] @ (B @ h["l"])
    outer = lambda p, h: 0.5 * ((p["w"] - t) ** 2).sum()
    return A, B, t, lam, w0, inner, outer


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("truncate", [None, 1, 7])
def test_quadratic_closed_form(mode, truncate, dtype):
    A, B, t, lam, w0, inner, outer = quadratic(dtype=dtype)
    hg, w = bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, optimizer=bl.inner.SGD(lr=0.05),
                                  steps=30, truncate=truncate, mode=mode, checkpoint_every=4)
    A, B, t, lam, w0 = (x.double() for x in (A, B, t, lam, w0))
    T, eta = 30, 0.05
    I = torch.eye(len(w0), dtype=DT)
    M = torch.linalg.matrix_power(I - eta * A, T)
    wT = M @ w0 + (I - M) @ torch.linalg.solve(A, B @ lam)
    K = T if truncate is None else truncate
    # d w_T / dλ over the last K steps: (I − (I − ηA)^K) A⁻¹ B
    J = (I - torch.linalg.matrix_power(I - eta * A, K)) @ torch.linalg.solve(A, B)
    assert hg["l"].dtype == w["w"].dtype == dtype
    assert rel_err(hg["l"], J.T @ (wT - t)) < HG_TOL[dtype]
    assert rel_err(w["w"], wT) < W_TOL[dtype]
    assert hg.info.mode == mode and hg.info.differentiated == K and hg.info.steps == T


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_learning_rate_closed_form(mode, dtype):
    A, B, t, lam, w0, _, outer = quadratic(dtype=dtype)
    inner = lambda p, h: 0.5 * p["w"] @ A @ p["w"] - p["w"] @ (B @ lam)
    T, eta = 25, 0.04
    hg, _ = bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"lr": torch.tensor(eta, dtype=dtype)},
                                  optimizer=bl.inner.SGD(lr="lr"), steps=T, mode=mode)
    A, B, t, lam, w0 = (x.double() for x in (A, B, t, lam, w0))
    I = torch.eye(len(w0), dtype=DT)
    w_star = torch.linalg.solve(A, B @ lam)
    wT = w_star + torch.linalg.matrix_power(I - eta * A, T) @ (w0 - w_star)
    dw = -T * A @ torch.linalg.matrix_power(I - eta * A, T - 1) @ (w0 - w_star)   # ∂w_T/∂η
    assert hg["lr"].dtype == dtype
    assert rel_err(hg["lr"], dw @ (wT - t)) < HG_TOL[dtype]


def test_unrolled_from_optimum_equals_neumann():
    # K gradient steps from w* differentiated == Neumann with K − 1 terms and α = lr (DESIGN.md §1).
    A, B, t, lam, _, inner, outer = quadratic()
    w_star = torch.linalg.solve(A, B @ lam)
    eta = 0.1
    for K in (1, 4, 15):
        hg, _ = bl.unrolled_hypergrad(inner, outer, {"w": w_star}, {"l": lam}, optimizer=bl.inner.SGD(lr=eta),
                                      steps=K)
        ift = bl.implicit_hypergrad(inner, outer, {"w": w_star}, {"l": lam}, solver=bl.Neumann(steps=K - 1, alpha=eta))
        assert rel_err(hg["l"], ift["l"]) < 1e-10


# -- a small MLP with per-parameter weight decays, minibatches, dropout -------------------------
def mlp_problem(dropout=0.0, seed=0, dtype=DT):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                              torch.nn.Linear(8, 3)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(40, 4, generator=g, dtype=DT).to(dtype)
    y = torch.randint(0, 3, (40,), generator=g)
    Xv = torch.randn(20, 4, generator=g, dtype=DT).to(dtype)
    yv = torch.randint(0, 3, (20,), generator=g)
    hparams = {k: (torch.full_like(v, -3.0) + 0.1 * torch.randn(v.shape, generator=g, dtype=DT)).to(dtype)
               for k, v in net.named_parameters()}
    net.to(dtype)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}

    def inner(p, h, X, y):
        ce = torch.nn.functional.cross_entropy(functional_call(net, p, (X,)), y)
        return ce + 0.5 * sum((h[k].exp() * p[k] ** 2).sum() for k in p)

    def outer(p, h, X, y):
        net.eval()
        out = torch.nn.functional.cross_entropy(functional_call(net, p, (X,)), y)
        net.train()
        return out

    batches = lambda t: (X[(t * 8) % 40:(t * 8) % 40 + 8], y[(t * 8) % 40:(t * 8) % 40 + 8])
    return net, params, hparams, inner, outer, batches, (Xv, yv)


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_against_higher(opt_kind):
    higher = pytest.importorskip("higher")
    net, params, hparams, inner, outer, batches, val = mlp_problem()
    T = 12
    if opt_kind == "sgd":
        ours = bl.inner.SGD(lr=0.1, momentum=0.9)
        make = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    else:
        # higher's Adam adds eps before the bias correction (torch.optim's after): with a negligible eps
        # the two rules coincide to rounding.
        ours = bl.inner.Adam(lr=0.01, eps=1e-16)
        make = lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-16)
    hg, w = bl.unrolled_hypergrad(inner, outer, params, hparams, optimizer=ours, steps=T,
                                  inner_args=batches, outer_args=val)

    model = torch.nn.Sequential(*[m for m in net]).to(DT)
    model.load_state_dict(params, strict=False)
    h = {k: v.clone().requires_grad_(True) for k, v in hparams.items()}
    with higher.innerloop_ctx(model, make(model.parameters()), copy_initial_weights=True) as (fmodel, dopt):
        for t in range(T):
            X, y = batches(t)
            p = dict(zip(params, fmodel.parameters()))
            ce = torch.nn.functional.cross_entropy(fmodel(X), y)
            dopt.step(ce + 0.5 * sum((h[k].exp() * p[k] ** 2).sum() for k in p))
        fmodel.eval()
        loss = torch.nn.functional.cross_entropy(fmodel(val[0]), val[1])
        ref = torch.autograd.grad(loss, list(h.values()))
        w_ref = dict(zip(params, [p.detach() for p in fmodel.parameters()]))
    assert tree_rel_err(w, w_ref) < 1e-12
    assert tree_rel_err(hg, dict(zip(h, ref))) < 1e-9


@pytest.mark.parametrize("opt", [bl.inner.SGD(lr=0.1, momentum=0.9, nesterov=True), bl.inner.Adam(lr=0.02, weight_decay=0.01)],
                         ids=["nesterov", "adamw"])
def test_checkpoint_equals_reverse_with_minibatches_and_dropout(opt):
    net, params, hparams, inner, outer, batches, val = mlp_problem(dropout=0.3)
    results = {}
    for mode, every in [("reverse", None), ("checkpoint", 3), ("checkpoint", 1), ("checkpoint", 25)]:
        torch.manual_seed(123)                                     # same dropout masks in each run
        hg, w = bl.unrolled_hypergrad(inner, outer, params, hparams, optimizer=opt, steps=20, mode=mode,
                                      inner_args=batches, outer_args=val, checkpoint_every=every)
        after = torch.rand(1)                                      # RNG continues as after a plain run
        results[(mode, every)] = (hg, w, after)
    ref_hg, ref_w, ref_after = results[("reverse", None)]
    for key, (hg, w, after) in results.items():
        assert tree_rel_err(hg, ref_hg) < 1e-12, key
        assert tree_rel_err(w, ref_w) == 0.0, key
        assert torch.equal(after, ref_after), key


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_mode_matches_reverse_on_mlp_and_chunks(dtype):
    # the penalty 0.5·Σ(...) multiplies a 0-dim tensor by a Python float: in float32 this once gave
    # float64 tangents under forward mode (pytorch/pytorch#90065), then a dtype error
    _, params, hparams, inner, outer, batches, val = mlp_problem(dtype=dtype)
    hp = {"b": hparams["0.bias"], "lr": torch.tensor(0.1, dtype=dtype), "mom": torch.tensor(0.5, dtype=dtype)}
    inner2 = lambda p, h, X, y: inner(p, {**hparams, "0.bias": h["b"]}, X, y)
    opt = bl.inner.SGD(lr="lr", momentum="mom")
    kw = dict(optimizer=opt, steps=10, inner_args=batches, outer_args=val)
    rev, w_rev = bl.unrolled_hypergrad(inner2, outer, params, hp, **kw)
    tol = {torch.float64: (1e-10, 1e-13, 1e-12), torch.float32: (1e-4, 1e-5, 1e-5)}[dtype]
    for chunk in (None, 3):
        fwd, w_fwd = bl.unrolled_hypergrad(inner2, outer, params, hp, mode="forward", forward_chunk=chunk, **kw)
        assert all(v.dtype == dtype for v in fwd.values())
        assert tree_rel_err(fwd, rev) < tol[0] and tree_rel_err(w_fwd, w_rev) < tol[1]
        assert abs(fwd.info.inner_loss - rev.info.inner_loss) < tol[2]
        assert abs(fwd.info.inner_grad_norm - rev.info.inner_grad_norm) < tol[2]


def test_state_continues_a_run():
    _, params, hparams, inner, outer, batches, val = mlp_problem()
    opt = bl.inner.Adam(lr=0.01)
    kw = dict(optimizer=opt, inner_args=batches, outer_args=val)
    _, w20 = bl.unrolled_hypergrad(inner, outer, params, hparams, steps=20, **kw)
    hg10, w10 = bl.unrolled_hypergrad(inner, outer, params, hparams, steps=10, **kw)
    shifted = lambda t: batches(t + 10)
    _, w_cont = bl.unrolled_hypergrad(inner, outer, w10, hparams, steps=10, state=hg10.info.state,
                                      **{**kw, "inner_args": shifted})
    assert tree_rel_err(w_cont, w20) < 1e-13


def test_torchopt_inner_optimizer():
    torchopt = pytest.importorskip("torchopt")
    _, params, hparams, inner, outer, batches, val = mlp_problem()
    kw = dict(steps=8, inner_args=batches, outer_args=val)
    a, _ = bl.unrolled_hypergrad(inner, outer, params, hparams, optimizer=bl.inner.TorchOpt(torchopt.sgd(0.1, momentum=0.9)), **kw)
    b, _ = bl.unrolled_hypergrad(inner, outer, params, hparams, optimizer=bl.inner.SGD(lr=0.1, momentum=0.9), **kw)
    c, _ = bl.unrolled_hypergrad(inner, outer, params, hparams, optimizer=bl.inner.TorchOpt(torchopt.sgd(0.1, momentum=0.9)),
                                 mode="checkpoint", **kw)
    assert tree_rel_err(a, b) < 1e-10 and tree_rel_err(c, b) < 1e-10


def test_errors():
    A, B, t, lam, w0, inner, outer = quadratic()
    kw = dict(optimizer=bl.inner.SGD(lr=0.05), steps=5)
    with pytest.raises(TypeError, match="bilevel.inner optimizer"):
        bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, optimizer=torch.optim.SGD, steps=5)
    with pytest.raises(KeyError, match=r"\['lr'\]"):
        bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, optimizer=bl.inner.SGD(lr="lr"), steps=5)
    with pytest.raises(ValueError, match="Invalid steps"):
        bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, optimizer=bl.inner.SGD(lr=0.1), steps=0)
    with pytest.raises(ValueError, match="Invalid truncate"):
        bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, truncate=6, **kw)
    with pytest.raises(ValueError, match="mode"):
        bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, mode="sideways", **kw)
    with pytest.raises(bl.ShapeError, match="inner_loss.*scalar"):
        bl.unrolled_hypergrad(lambda p, h: p["w"] * 2, outer, {"w": w0}, {"l": lam}, **kw)
    with pytest.raises(bl.NonFiniteError, match="diverged"):   # lr far beyond 2/λ_max
        bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, optimizer=bl.inner.SGD(lr=100.0), steps=400)


# -- memory: checkpoint vs reverse at T = 200 (peak RSS of a fresh process) -----------------------
_MEM_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    import bilevel as bl
    from torch.func import functional_call
    torch.manual_seed(0)
    torch.set_num_threads(1)
    mode = sys.argv[1]
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
    params = {k: v.detach() for k, v in net.named_parameters()}
    hp = {k: torch.full_like(v, -4.0) for k, v in params.items()}
    X, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    def inner(p, h):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (X,)), y) + \\
            0.5 * sum((h[k].exp() * p[k] ** 2).sum() for k in p)
    outer = lambda p, h: torch.nn.functional.cross_entropy(functional_call(net, p, (X,)), y)
    opt = bl.inner.SGD(lr=0.1, momentum=0.9)
    bl.unrolled_hypergrad(inner, outer, params, hp, optimizer=opt, steps=2, mode=mode)   # warm up
    from _measure import peak_rss_growth    # VmHWM of this process, see benchmarks/_measure.py
    (hg, _), peak_mb, _ = peak_rss_growth(
        lambda: bl.unrolled_hypergrad(inner, outer, params, hp, optimizer=opt, steps=200, mode=mode))
    print(json.dumps({"mode": mode, "peak_mb": peak_mb,
                      "norm": float(sum(v.double().pow(2).sum() for v in hg.values()) ** 0.5)}))
''')


def _mem(mode):
    return import_benchmark("_measure").run_in_fresh_process(["-c", _MEM_SCRIPT, mode], env={"OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read peak memory")
def test_checkpoint_memory_well_below_reverse_at_200_steps():
    rev, ck = _mem("reverse"), _mem("checkpoint")
    print(f"peak memory above baseline, T=200: reverse {rev['peak_mb']:.1f} MB, checkpoint {ck['peak_mb']:.1f} MB")
    assert abs(rev["norm"] - ck["norm"]) <= 1e-5 * rev["norm"]
    assert ck["peak_mb"] < rev["peak_mb"] / 5, (rev, ck)


# -- forward mode in float32 and with F.mse_loss ------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", [bl.inner.SGD(lr=0.1, momentum=0.5), bl.inner.Adam(lr=0.05), bl.inner.AdamW(lr="lr")],
                         ids=["sgd", "adam", "adamw-tuned-lr"])
def test_forward_mode_with_python_floats_times_0dim_hparams(opt, dtype):
    """``0.5 * hparams["d"]`` (a 0-dim tensor times a Python float) in the loss, and tuned 0-dim optimizer
    numbers: forward mode keeps the dtype and agrees with reverse mode and with the float64 result."""
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(12, 4, generator=g, dtype=DT), torch.randn(12, generator=g, dtype=DT)
    hp64 = {"d": torch.tensor(0.3, dtype=DT), "c": torch.randn(4, generator=g, dtype=DT),
            "lr": torch.tensor(0.05, dtype=DT)}

    def run(dt, mode):
        Xd, yd = X.to(dt), y.to(dt)
        inner = lambda p, h: ((Xd @ p["w"] - yd) ** 2).mean() + 0.5 * h["d"] * ((p["w"] - h["c"]) ** 2).sum()
        outer = lambda p, h: ((Xd @ p["w"] - yd) ** 2).mean() + 0.5 * h["d"] ** 2
        hp = {k: v.to(dt) for k, v in hp64.items() if k != "lr" or isinstance(opt.lr, str)}
        return bl.unrolled_hypergrad(inner, outer, {"w": torch.zeros(4, dtype=dt)}, hp, optimizer=opt, steps=6,
                                     mode=mode)[0]

    fwd, rev, ref = run(dtype, "forward"), run(dtype, "reverse"), run(DT, "reverse")
    assert all(v.dtype == dtype for v in fwd.values())
    assert tree_rel_err(fwd, rev) < HG_TOL[dtype] and tree_rel_err(fwd, ref) < HG_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps", [1, 3])
def test_forward_mode_with_mse_loss(steps, dtype):
    """``F.mse_loss`` (mean) hits pytorch/pytorch#123996 under forward-over-reverse AD; forward mode
    rewrites it exactly, so it agrees with reverse mode and with the loss written out."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(10, 3, generator=g, dtype=DT).to(dtype), torch.randn(10, generator=g, dtype=DT).to(dtype)
    hp = {"c": torch.randn(3, generator=g, dtype=DT).to(dtype), "lr": torch.tensor(0.1, dtype=dtype)}
    written_out = lambda p, h: ((X @ p["w"] - y) ** 2).mean() + ((p["w"] - h["c"]) ** 2).mean()
    with_mse = lambda p, h: F.mse_loss(X @ p["w"], y) + F.mse_loss(p["w"], h["c"])
    outer = lambda p, h: F.mse_loss(X @ p["w"], y, reduction="sum") + torch.nn.MSELoss()(p["w"], h["c"])
    kw = dict(optimizer=bl.inner.SGD(lr="lr"), steps=steps)
    w0 = {"w": torch.zeros(3, dtype=dtype)}
    fwd, _ = bl.unrolled_hypergrad(with_mse, outer, w0, hp, mode="forward", **kw)
    rev, _ = bl.unrolled_hypergrad(with_mse, outer, w0, hp, mode="reverse", **kw)
    ref, _ = bl.unrolled_hypergrad(written_out, outer, w0, hp, mode="forward", **kw)
    assert tree_rel_err(fwd, rev) < HG_TOL[dtype] and tree_rel_err(fwd, ref) < HG_TOL[dtype]


# -- parameters without gradient: the unrolled trajectory is torch.optim's --------------------------------
def _tree_with_unused_and_frozen():
    """"unused" never reaches the loss; "frozen" enters only detached (a frozen branch); "late" enters
    from step 2 on (for the modes that decide per step)."""
    g = torch.Generator().manual_seed(5)
    params = {"a": torch.randn(3, 4, generator=g, dtype=DT), "b": torch.randn(4, generator=g, dtype=DT),
              "unused": torch.randn(2, generator=g, dtype=DT), "frozen": torch.randn(4, generator=g, dtype=DT),
              "late": torch.randn(4, generator=g, dtype=DT)}
    X = torch.randn(10, 3, generator=g, dtype=DT)

    def inner(p, h, t, with_late):
        z = torch.tanh(X @ p["a"] + p["b"] + p["frozen"].detach())
        late = (z * p["late"]).mean() if with_late and t >= 2 else 0.0
        return (z ** 2).mean() + late + 0.5 * h["l2"].exp() * (p["a"] ** 2).sum()

    outer = lambda p, h: (torch.tanh(X @ p["a"] + p["b"]) ** 2).sum() + p["unused"].sum() + p["late"].sum()
    return params, {"l2": torch.tensor(-2.0, dtype=DT)}, inner, outer


UNROLL_NO_GRAD = [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05),
     bl.inner.SGD(lr=0.1, momentum=0.9, weight_decay=0.05)),
    (lambda ps: torch.optim.Adam(ps, lr=0.02), bl.inner.Adam(lr=0.02, decoupled=False)),
    (lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.1), bl.inner.AdamW(lr=0.02, weight_decay=0.1)),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make,opt", UNROLL_NO_GRAD, ids=["sgd-momentum-wd", "adam", "adamw"])
def test_unrolled_trajectory_skips_parameters_without_gradient_like_torch_optim(make, opt, mode):
    params, hp, inner, outer = _tree_with_unused_and_frozen()
    with_late = mode != "forward"                     # forward mode decides once (see the refusal test)
    named = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    torch_opt = make(list(named.values()))
    hpd = {k: v.detach() for k, v in hp.items()}
    hgs = []
    for T in range(1, 6):                             # step by step: the unroll of T steps vs T torch steps
        torch_opt.zero_grad(set_to_none=True)
        inner(named, hpd, T - 1, with_late).backward()
        torch_opt.step()
        hg, w = bl.unrolled_hypergrad(lambda p, h, t: inner(p, h, t, with_late), outer, params, hp, optimizer=opt,
                                      steps=T, mode=mode, inner_args=lambda t: (t,), checkpoint_every=2)
        for k in params:
            assert torch.allclose(w[k], named[k].detach(), rtol=1e-12, atol=1e-14), (T, k)
        assert torch.equal(w["unused"], params["unused"]) and torch.equal(w["frozen"], params["frozen"])
        state = hg.info.state
        assert state.step["unused"] == state.step["frozen"] == 0 and state.step["a"] == T
        for tree in state[:-1]:
            for k in ("unused", "frozen"):
                assert k not in tree or not tree[k].any(), (T, k)   # still the initial zeros
        hgs.append(hg)
    ref, _ = bl.unrolled_hypergrad(lambda p, h, t: inner(p, h, t, with_late), outer, params, hp, optimizer=opt,
                                   steps=5, mode="reverse", inner_args=lambda t: (t,))
    assert tree_rel_err(hgs[-1], ref) < 1e-10


def test_forward_mode_refuses_a_parameter_that_starts_getting_gradients_later():
    params, hp, inner, outer = _tree_with_unused_and_frozen()
    kw = dict(optimizer=bl.inner.AdamW(lr=0.02), steps=4, inner_args=lambda t: (t, True))
    with pytest.raises(ValueError, match=r"mode='forward' decides once.*\['frozen', 'late', 'unused'\].*"
                                         r"Fix: mode='reverse' or mode='checkpoint'"):
        bl.unrolled_hypergrad(inner, outer, params, hp, mode="forward", **kw)
    bl.unrolled_hypergrad(inner, outer, params, hp, mode="checkpoint", **kw)      # per step: fine


def test_forward_mode_names_the_cause_and_the_fix_of_a_zero_tangent_write():
    """``F.mse_loss`` first called after the first step (float64: no rewrite is on) hits
    pytorch/pytorch#123996; forward mode says so and how to fix it."""
    F = torch.nn.functional
    X, y = torch.randn(8, 3, dtype=DT), torch.randn(8, dtype=DT)
    mse = lambda p, t: F.mse_loss(X @ p["w"], y) if t >= 1 else ((X @ p["w"] - y) ** 2).mean()
    inner = lambda p, h, t: mse(p, t) + ((p["w"] - h["c"]) ** 2).sum()
    outer = lambda p, h: (p["w"] ** 2).sum()
    kw = dict(optimizer=bl.inner.SGD(lr=0.1), steps=3, inner_args=lambda t: (t,))
    hp = {"c": torch.randn(3, dtype=DT)}
    with pytest.raises(RuntimeError, match=r"forward-mode AD limitation.*pytorch/pytorch#123996.*"
                                           r"Fix: mode='reverse' or mode='checkpoint'"):
        bl.unrolled_hypergrad(inner, outer, {"w": torch.zeros(3, dtype=DT)}, hp, mode="forward", **kw)
    bl.unrolled_hypergrad(inner, outer, {"w": torch.zeros(3, dtype=DT)}, hp, mode="checkpoint", **kw)
