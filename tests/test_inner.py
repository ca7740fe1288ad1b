"""Functional inner optimizers: same trajectory as their torch.optim twins; TorchOpt adapter."""

import pytest
import torch

import bilevel as bl

DT = torch.float64


def _problem():
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, 4, generator=g, dtype=DT), "b": torch.randn(4, generator=g, dtype=DT),
              "unused": torch.randn(2, generator=g, dtype=DT)}
    X = torch.randn(10, 3, generator=g, dtype=DT)

    def loss(p):
        return (torch.tanh(X @ p["a"] + p["b"]) ** 2).mean() + 0.1 * (p["a"] ** 4).sum()

    return params, loss


def _run_torch(opt_cls, params, loss, steps, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params.values()]
    opt = opt_cls(ps, **kw)
    for _ in range(steps):
        opt.zero_grad()
        loss(dict(zip(params, ps))).backward()
        for p in ps:  # torch.optim skips params whose grad is None; ours sees zeros: make them equal
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
    return {k: p.detach() for k, p in zip(params, ps)}


def _run_ours(opt, params, loss, steps, hparams=None):
    w, s = dict(params), opt.init(params)
    for _ in range(steps):
        wl = {k: v.detach().requires_grad_(True) for k, v in w.items()}
        gs = torch.autograd.grad(loss(wl), list(wl.values()), allow_unused=True)
        g = {k: torch.zeros_like(v) if gi is None else gi for (k, v), gi in zip(wl.items(), gs)}
        w, s = opt.step(w, g, s, hparams)
    return w


CASES = [
    (torch.optim.SGD, dict(lr=0.1), bl.inner.SGD(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9), bl.inner.SGD(lr=0.1, momentum=0.9)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
     bl.inner.SGD(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
     bl.inner.SGD(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1)),
    (torch.optim.Adam, dict(lr=0.01), bl.inner.Adam(lr=0.01)),
    (torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
     bl.inner.Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, decoupled=False)),
    (torch.optim.Adam, dict(lr=0.01, amsgrad=True), bl.inner.Adam(lr=0.01, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05), bl.inner.Adam(lr=0.01, weight_decay=0.05)),
    (torch.optim.AdamW, dict(lr=0.01), bl.inner.AdamW(lr=0.01)),
]


@pytest.mark.parametrize("torch_cls,kw,ours", CASES, ids=[repr(c[2]) for c in CASES])
def test_same_trajectory_as_torch_optim(torch_cls, kw, ours):
    params, loss = _problem()
    ref = _run_torch(torch_cls, params, loss, 25, **kw)
    got = _run_ours(ours, params, loss, 25)
    for k in params:
        assert torch.allclose(got[k], ref[k], rtol=1e-12, atol=1e-14), k


def test_named_hyperparameters_read_from_hparams():
    params, loss = _problem()
    hp = {"lr": torch.tensor(0.05, dtype=DT), "mom": torch.tensor(0.7, dtype=DT)}
    ref = _run_torch(torch.optim.SGD, params, loss, 10, lr=0.05, momentum=0.7)
    got = _run_ours(bl.inner.SGD(lr="lr", momentum="mom"), params, loss, 10, hp)
    assert all(torch.allclose(got[k], ref[k], rtol=1e-12) for k in params)
    ref = _run_torch(torch.optim.AdamW, params, loss, 10, lr=0.02, betas=(0.85, 0.995), weight_decay=0.1)
    hp = {"lr": torch.tensor(0.02, dtype=DT), "b1": torch.tensor(0.85, dtype=DT), "wd": torch.tensor(0.1, dtype=DT)}
    got = _run_ours(bl.inner.Adam(lr="lr", betas=("b1", 0.995), weight_decay="wd"), params, loss, 10, hp)
    assert all(torch.allclose(got[k], ref[k], rtol=1e-12) for k in params)
    assert bl.inner.Adam(lr="lr", betas=("b1", 0.995), weight_decay="wd").hparam_names() == ["lr", "b1", "wd"]


def test_adam_hypergradient_is_finite_with_zero_gradients():
    # "unused" has gradient exactly 0, so v = 0 there: √v must not produce NaN derivatives.
    params, loss = _problem()
    lr = torch.tensor(0.01, dtype=DT, requires_grad=True)
    opt = bl.inner.Adam(lr="lr")
    w, s = {k: v.clone().requires_grad_(True) for k, v in params.items()}, opt.init(params)
    for _ in range(3):
        gs = torch.autograd.grad(loss(w), list(w.values()), create_graph=True, allow_unused=True)
        g = {k: torch.zeros_like(v) if gi is None else gi for (k, v), gi in zip(w.items(), gs)}
        w, s = opt.step(w, g, s, {"lr": lr})
    (d,) = torch.autograd.grad(loss(w) + w["unused"].sum(), lr)
    assert torch.isfinite(d)


@pytest.mark.parametrize("betas", [(0.9, 0.999), "tuned"])
def test_adam_forward_and_reverse_unrolls_agree_with_zero_gradients(betas):
    """Forward mode (tangents) and reverse mode through Adam steps where an entry's gradient is exactly
    0 (v = 0 there): finite and equal, with float betas (the fused-op path) and tuned ones."""
    params, loss = _problem()
    hp = {"lr": torch.tensor(0.01, dtype=DT)}
    opt = bl.inner.Adam(lr="lr")
    if betas == "tuned":
        hp.update(b1=torch.tensor(0.8, dtype=DT), b2=torch.tensor(0.99, dtype=DT))
        opt = bl.inner.Adam(lr="lr", betas=("b1", "b2"))
    inner = lambda p, h: loss(p)
    outer = lambda p, h: loss(p) + p["unused"].sum()
    out = [bl.unrolled_hypergrad(inner, outer, params, hp, optimizer=opt, steps=4, mode=m)[0]
           for m in ("forward", "reverse")]
    for k in hp:
        assert torch.isfinite(out[0][k]) and torch.allclose(out[0][k], out[1][k], rtol=1e-10, atol=1e-14), k
    assert float(out[1]["lr"].abs()) > 0


def test_validation_messages():
    with pytest.raises(ValueError, match="Invalid lr"):
        bl.inner.SGD(lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        bl.inner.SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Invalid beta2"):
        bl.inner.Adam(betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="pair"):
        bl.inner.Adam(betas=0.9)
    with pytest.raises(TypeError, match="finite number or the name"):
        bl.inner.SGD(lr=[0.1])
    with pytest.raises(KeyError, match=r"reads the hyperparameters \['lr'\].*got only \['wd'\]"):
        bl.inner.SGD(lr="lr").check_hparams({"wd": torch.tensor(1.0)}, "test")


def test_torchopt_adapter_matches_builtin():
    torchopt = pytest.importorskip("torchopt")
    params, loss = _problem()
    got = _run_ours(bl.inner.TorchOpt(torchopt.sgd(0.1, momentum=0.9)), params, loss, 10)
    ref = _run_ours(bl.inner.SGD(lr=0.1, momentum=0.9), params, loss, 10)
    assert all(torch.allclose(got[k], ref[k], rtol=1e-12) for k in params)
    # TorchOpt's own Adam is close to, not bit-identical with, torch.optim.Adam (~1e-4 of a step here).
    got = _run_ours(bl.inner.TorchOpt(torchopt.adam(0.01)), params, loss, 10)
    ref = _run_ours(bl.inner.Adam(lr=0.01), params, loss, 10)
    assert all(torch.allclose(got[k], ref[k], rtol=0, atol=1e-5) for k in params)
    with pytest.raises(TypeError, match="GradientTransformation"):
        bl.inner.TorchOpt(torch.optim.SGD)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True),
    lambda ps: torch.optim.SGD([{"params": ps[:1], "lr": 0.05}, {"params": ps[1:], "momentum": 0.5}], lr=0.1),
], ids=["sgd", "adam", "adamw-amsgrad", "sgd-groups"])
def test_from_torch_continues_the_trajectory(make):
    params, loss = _problem()
    ps = [torch.nn.Parameter(p.clone()) for p in params.values()]
    opt = make(ps)
    named = dict(zip(params, ps))

    def torch_steps(n):
        for _ in range(n):
            opt.zero_grad()
            loss(named).backward()
            for p in ps:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            opt.step()

    torch_steps(3)                                    # state exists now
    inner, state = bl.inner.from_torch(opt, named)
    w = {k: p.detach().clone() for k, p in named.items()}
    for _ in range(4):
        wl = {k: v.requires_grad_(True) for k, v in {k: v.clone() for k, v in w.items()}.items()}
        gs = torch.autograd.grad(loss(wl), list(wl.values()), allow_unused=True)
        g = {k: torch.zeros_like(v) if gi is None else gi for (k, v), gi in zip(wl.items(), gs)}
        w, state = inner.step(w, g, state, None)
    torch_steps(4)
    for k, p in named.items():
        assert torch.allclose(w[k], p.detach(), rtol=1e-12, atol=1e-14), k


def test_from_torch_rejects_unsupported():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="torch.optim.SGD"):
        bl.inner.from_torch(torch.optim.RMSprop([p]), {"p": p})
    with pytest.raises(ValueError, match="maximize"):
        bl.inner.from_torch(torch.optim.SGD([p], lr=0.1, maximize=True), {"p": p})
    with pytest.raises(ValueError, match="none of"):
        bl.inner.from_torch(torch.optim.SGD([p], lr=0.1), {"q": torch.nn.Parameter(torch.ones(1))})


# -- parameters without gradient: torch.optim skips them (no update, no decay, state untouched) ------------
def _problem_with_late_parameter():
    """"unused" never reaches the loss; "late" reaches it from step 3 on (a branch switched on later)."""
    params, loss = _problem()
    params["late"] = torch.linspace(-1.0, 2.0, 3, dtype=DT)
    return params, lambda p, t: loss(p) + (0.5 * (p["late"] ** 2).sum() if t >= 3 else 0.0)


def _torch_loop(opt, named, loss, steps, t0=0):
    for t in range(t0, t0 + steps):
        opt.zero_grad(set_to_none=True)
        loss(named, t).backward()                     # no zero-filling: .grad stays None where unused
        opt.step()


def _our_loop(opt, w, s, loss, steps, t0=0):
    for t in range(t0, t0 + steps):
        wl = {k: v.detach().requires_grad_(True) for k, v in w.items()}
        gs = torch.autograd.grad(loss(wl, t), list(wl.values()), allow_unused=True)
        w, s = opt.step(w, dict(zip(w, gs)), s)      # None where a parameter did not reach the loss
    return w, s


NO_GRAD_CASES = [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05),
     bl.inner.SGD(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05)),
    (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
     bl.inner.SGD(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1)),
    (lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
     bl.inner.Adam(lr=0.01, weight_decay=0.1, decoupled=False)),
    (lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True),
     bl.inner.AdamW(lr=0.01, weight_decay=0.1, amsgrad=True)),
    (lambda ps: torch.optim.AdamW(ps, lr=0.01), bl.inner.AdamW(lr=0.01)),
]


@pytest.mark.parametrize("make,ours", NO_GRAD_CASES, ids=["sgd-damp", "sgd-nesterov", "adam-l2", "adamw-ams", "adamw"])
def test_parameters_without_gradient_are_skipped_as_in_torch_optim(make, ours):
    params, loss = _problem_with_late_parameter()
    named = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = make(list(named.values()))
    w, s = dict(params), ours.init(params)
    s0_unused = [x for x in torch.utils._pytree.tree_leaves(s) if isinstance(x, torch.Tensor)]
    for t in range(8):                                # step by step, the "late" branch switching on at t = 3
        _torch_loop(opt, named, loss, 1, t)
        w, s = _our_loop(ours, w, s, loss, 1, t)
        for k in params:
            assert torch.allclose(w[k], named[k].detach(), rtol=1e-12, atol=1e-14), (t, k)
    assert w["unused"] is params["unused"]            # the very tensor: no update, no decay
    assert s.step["unused"] == 0 and s.step["late"] == 5 and s.step["a"] == 8
    for tree in s[:-1]:                               # its state entries are the initial ones
        if tree:
            assert any(tree["unused"] is x for x in s0_unused)


def test_none_gradient_passes_through_partitioned_and_torchopt():
    params, loss = _problem_with_late_parameter()
    part = bl.inner.Partitioned(((["a", "unused"], bl.inner.AdamW(lr=0.01)), (["b", "late"], bl.inner.SGD(lr=0.1, momentum=0.9))))
    named = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.AdamW([named["a"], named["unused"]], lr=0.01)
    opt2 = torch.optim.SGD([named["b"], named["late"]], lr=0.1, momentum=0.9)
    for t in range(6):
        for o in (opt, opt2):
            o.zero_grad(set_to_none=True)
        loss(named, t).backward()
        opt.step()
        opt2.step()
    w, s = _our_loop(part, dict(params), part.init(params), loss, 6)
    assert all(torch.allclose(w[k], named[k].detach(), rtol=1e-12, atol=1e-14) for k in params)
    assert w["unused"] is params["unused"]

    torchopt = pytest.importorskip("torchopt")
    ours = bl.inner.TorchOpt(torchopt.sgd(0.1, momentum=0.9))
    ref = bl.inner.SGD(lr=0.1, momentum=0.9)
    got, s_got = _our_loop(ours, dict(params), ours.init(params), loss, 6)
    want, _ = _our_loop(ref, dict(params), ref.init(params), loss, 6)
    assert all(torch.allclose(got[k], want[k], rtol=1e-12, atol=1e-14) for k in params)  # "late" keeps its momentum
    assert got["unused"] is params["unused"]


# -- from_torch with parameters that have no state yet ------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True),
    lambda ps: torch.optim.Adam([{"params": ps[:2], "lr": 0.02}, {"params": ps[2:], "betas": (0.8, 0.99)}], lr=0.01),
], ids=["sgd-damp", "sgd-nesterov", "adam", "adamw-amsgrad", "adam-groups"])
@pytest.mark.parametrize("convert_at", [2, 5], ids=["before-late-starts", "after-late-started"])
def test_from_torch_with_parameters_without_state(make, convert_at):
    """Convert while "unused" (never a gradient) has no state, and "late" none yet (or 2 steps of it):
    each continues as in torch.optim, with its own step count."""
    params, loss = _problem_with_late_parameter()
    named = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = make(list(named.values()))
    _torch_loop(opt, named, loss, convert_at)
    assert named["unused"] not in opt.state
    inner, state = bl.inner.from_torch(opt, named)
    w = {k: p.detach().clone() for k, p in named.items()}
    w, state = _our_loop(inner, w, state, loss, 6, t0=convert_at)
    _torch_loop(opt, named, loss, 6, t0=convert_at)
    for k, p in named.items():
        assert torch.allclose(w[k], p.detach(), rtol=1e-12, atol=1e-14), k
