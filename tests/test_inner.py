"""Functional inner optimizers: same trajectory as their torch.optim twins; TorchOpt adapter."""

import copy

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
    (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True),
     bl.inner.SGD(lr=0.05, momentum=0.8, nesterov=True, maximize=True)),
    (torch.optim.AdamW, dict(lr=0.01, maximize=True), bl.inner.AdamW(lr=0.01, maximize=True)),
    (torch.optim.RMSprop, dict(), bl.inner.RMSprop()),
    (torch.optim.RMSprop, dict(lr=0.005, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.8, centered=True),
     bl.inner.RMSprop(lr=0.005, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.8, centered=True)),
    (torch.optim.RMSprop, dict(lr=0.005, momentum=0.5, maximize=True), bl.inner.RMSprop(lr=0.005, momentum=0.5, maximize=True)),
    (torch.optim.Adagrad, dict(), bl.inner.Adagrad()),
    (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.3, eps=1e-6),
     bl.inner.Adagrad(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.3, eps=1e-6)),
    (torch.optim.Adagrad, dict(lr=0.1, maximize=True), bl.inner.Adagrad(lr=0.1, maximize=True)),
    (torch.optim.Adamax, dict(), bl.inner.Adamax()),
    (torch.optim.Adamax, dict(lr=0.01, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1, maximize=True),
     bl.inner.Adamax(lr=0.01, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1, maximize=True)),
    (torch.optim.NAdam, dict(), bl.inner.NAdam()),
    (torch.optim.NAdam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, momentum_decay=0.01),
     bl.inner.NAdam(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, momentum_decay=0.01)),
    (torch.optim.NAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
     bl.inner.NAdam(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    (torch.optim.RAdam, dict(), bl.inner.RAdam()),
    (torch.optim.RAdam, dict(lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1),
     bl.inner.RAdam(lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)),
    (torch.optim.RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
     bl.inner.RAdam(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
]


@pytest.mark.parametrize("torch_cls,kw,ours", CASES, ids=[repr(c[2]) for c in CASES])
def test_same_trajectory_as_torch_optim(torch_cls, kw, ours):
    params, loss = _problem()
    if kw.get("maximize"):                            # ascend −loss (bounded above): the iterates stay finite
        loss = (lambda f: lambda p: -f(p))(loss)
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
        bl.inner.from_torch(torch.optim.Rprop([p]), {"p": p})
    with pytest.raises(ValueError, match="differentiable=True"):
        bl.inner.from_torch(torch.optim.RMSprop([p], differentiable=True), {"p": p})
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
    (lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9, centered=True, weight_decay=0.1, maximize=True),
     bl.inner.RMSprop(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1, maximize=True)),
    (lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.5),
     bl.inner.Adagrad(lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.5)),
    (lambda ps: torch.optim.Adamax(ps, lr=0.01, weight_decay=0.1), bl.inner.Adamax(lr=0.01, weight_decay=0.1)),
    (lambda ps: torch.optim.NAdam(ps, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
     bl.inner.NAdam(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    (lambda ps: torch.optim.RAdam(ps, lr=0.01, betas=(0.9, 0.9), weight_decay=0.1),
     bl.inner.RAdam(lr=0.01, betas=(0.9, 0.9), weight_decay=0.1)),
]


@pytest.mark.parametrize("make,ours", NO_GRAD_CASES, ids=["sgd-damp", "sgd-nesterov", "adam-l2", "adamw-ams", "adamw",
                                                          "rmsprop", "adagrad", "adamax", "nadamw", "radam"])
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
    lambda ps: torch.optim.SGD([{"params": ps[:2], "maximize": True}, {"params": ps[2:], "momentum": 0.5}], lr=0.1),
    lambda ps: torch.optim.RMSprop([{"params": ps[:2], "momentum": 0.9, "maximize": True},
                                    {"params": ps[2:], "centered": True, "alpha": 0.9}], lr=0.01, weight_decay=0.1),
    lambda ps: torch.optim.Adagrad([{"params": ps[:2], "lr_decay": 0.1}, {"params": ps[2:], "eps": 1e-3}],
                                   lr=0.1, initial_accumulator_value=0.2, weight_decay=0.1),
    lambda ps: torch.optim.Adamax([{"params": ps[:2], "betas": (0.8, 0.9)}, {"params": ps[2:], "maximize": True}],
                                  lr=0.01, weight_decay=0.1),
    lambda ps: torch.optim.NAdam([{"params": ps[:2], "momentum_decay": 0.02},
                                  {"params": ps[2:], "decoupled_weight_decay": True, "lr": 0.02}],
                                 lr=0.01, weight_decay=0.1),
    lambda ps: torch.optim.RAdam([{"params": ps[:2], "betas": (0.9, 0.9)},
                                  {"params": ps[2:], "decoupled_weight_decay": True, "maximize": True}],
                                 lr=0.01, weight_decay=0.1),
], ids=["sgd-damp", "sgd-nesterov", "adam", "adamw-amsgrad", "adam-groups", "sgd-groups-maximize", "rmsprop-groups",
        "adagrad-groups", "adamax-groups", "nadam-groups", "radam-groups"])
@pytest.mark.parametrize("convert_at", [2, 5], ids=["before-late-starts", "after-late-started"])
def test_from_torch_with_parameters_without_state(make, convert_at):
    """Convert while "unused" (never a gradient) has no state, and "late" none yet (or 2 steps of it):
    each continues as in torch.optim, with its own step count."""
    params, loss = _problem_with_late_parameter()
    named = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = make(list(named.values()))
    _torch_loop(opt, named, loss, convert_at)
    assert float(opt.state.get(named["unused"], {}).get("step", 0)) == 0   # Adagrad: state from the start
    inner, state = bl.inner.from_torch(opt, named)
    w = {k: p.detach().clone() for k, p in named.items()}
    w, state = _our_loop(inner, w, state, loss, 6, t0=convert_at)
    _torch_loop(opt, named, loss, 6, t0=convert_at)
    for k, p in named.items():
        assert torch.allclose(w[k], p.detach(), rtol=1e-12, atol=1e-14), k


# -- every option named in hparams: torch.optim's trajectory, and hypergradients by two modes and finite differences
#: (torch.optim class, our class, option values; "betas" as a pair). Values are away from the
#: bounds (so that value ± δ is valid) and not tiny (eps), so that finite differences resolve them.
TUNED = [
    (torch.optim.SGD, bl.inner.SGD, dict(lr=0.05, momentum=0.8, dampening=0.2, weight_decay=0.05)),
    (torch.optim.AdamW, bl.inner.Adam, dict(lr=0.01, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.05)),
    (torch.optim.RMSprop, bl.inner.RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.05, momentum=0.5)),
    (torch.optim.Adagrad, bl.inner.Adagrad,
     dict(lr=0.1, lr_decay=0.05, weight_decay=0.05, initial_accumulator_value=0.2, eps=1e-3)),
    (torch.optim.Adamax, bl.inner.Adamax, dict(lr=0.01, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.05)),
    (torch.optim.NAdam, bl.inner.NAdam, dict(lr=0.01, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.05, momentum_decay=0.05)),
    # β2 = 0.9: the rectified branch (ρ_t > 5) from step 6 on, the plain one before
    (torch.optim.RAdam, bl.inner.RAdam, dict(lr=0.01, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.05)),
]
TUNED_IDS = [c[1].__name__ for c in TUNED]
TUNED_STEPS = 8


def _named(values):
    """(options naming hparams, hparams): every number becomes a hyperparameter of its own name."""
    opts = {k: ("beta1", "beta2") if k == "betas" else k for k in values}
    hp = {}
    for k, v in values.items():
        for name, x in (zip(("beta1", "beta2"), v) if k == "betas" else [(k, v)]):
            hp[name] = torch.tensor(x, dtype=DT)
    return opts, hp


def _torch_kwargs(values, hp_values):
    """torch.optim keywords from hparam values (floats by name)."""
    kw = {k: hp_values[k] for k in values if k != "betas"}
    if "betas" in values:
        kw["betas"] = (hp_values["beta1"], hp_values["beta2"])
    return kw


def _tuned_problem():
    params, loss = _problem()
    del params["unused"]
    g = torch.Generator().manual_seed(1)
    Xv = torch.randn(7, 3, generator=g, dtype=DT)
    outer = lambda p, h: ((torch.tanh(Xv @ p["a"] + p["b"]) - 0.3) ** 2).mean()
    return params, loss, outer


@pytest.fixture
def float64_default():
    """torch.optim keeps its scalar state (NAdam's μ product) in float32 unless float64 is the default
    dtype; a tuned β1 makes ours float64 (the hyperparameter's dtype): compare them in float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("torch_cls,cls,values", TUNED, ids=TUNED_IDS)
def test_named_options_follow_torch_optim(torch_cls, cls, values, float64_default):
    params, loss, _ = _tuned_problem()
    opts, hp = _named(values)
    ref = _run_torch(torch_cls, params, loss, 20, **_torch_kwargs(values, {k: float(v) for k, v in hp.items()}))
    got = _run_ours(cls(**opts), params, loss, 20, hp)
    assert cls(**opts).hparam_names() == list(hp)
    for k in params:
        assert torch.allclose(got[k], ref[k], rtol=1e-12, atol=1e-14), k


@pytest.mark.parametrize("torch_cls,cls,values", TUNED, ids=TUNED_IDS)
def test_unrolled_hypergradient_of_every_option_matches_finite_differences(torch_cls, cls, values, float64_default):
    """d outer(w_T)/d option through 8 steps: reverse and forward mode against a central finite difference
    of the outer loss after 8 steps of torch.optim itself (an independent trajectory)."""
    params, loss, outer = _tuned_problem()
    opts, hp = _named(values)
    got = {m: bl.unrolled_hypergrad(lambda p, h: loss(p), outer, params, hp, optimizer=cls(**opts),
                                    steps=TUNED_STEPS, mode=m)[0] for m in ("reverse", "forward")}
    base = {k: float(v) for k, v in hp.items()}
    for name in hp:
        delta = 1e-5 * abs(base[name])
        ends = []
        for s in (1, -1):
            kw = _torch_kwargs(values, {**base, name: base[name] + s * delta})
            ends.append(float(outer(_run_torch(torch_cls, params, loss, TUNED_STEPS, **kw), None)))
        fd = (ends[0] - ends[1]) / (2 * delta)
        rev, fwd = float(got["reverse"][name]), float(got["forward"][name])
        assert rev == pytest.approx(fd, rel=1e-6, abs=1e-10), (name, rev, fd)
        assert fwd == pytest.approx(rev, rel=1e-10, abs=1e-14), (name, fwd, rev)
    assert abs(float(got["reverse"]["lr"])) > 1e-3          # the learning rate matters here: not a vacuous match


@pytest.mark.parametrize("opt", [bl.inner.RMSprop(lr="lr"), bl.inner.RMSprop(lr="lr", centered=True, momentum=0.5),
                                 bl.inner.Adagrad(lr="lr"), bl.inner.Adamax(lr="lr"), bl.inner.NAdam(lr="lr"),
                                 bl.inner.RAdam(lr="lr", betas=(0.9, 0.9))],
                         ids=["rmsprop", "rmsprop-centered", "adagrad", "adamax", "nadam", "radam"])
def test_hypergradient_is_finite_where_gradient_entries_are_zero(opt):
    """Entries of "z" below 0 get a gradient of exactly 0 (ReLU): their second moments stay 0, where √
    has an infinite derivative; both modes stay finite and agree."""
    params, loss = _problem()
    params["z"] = torch.tensor([-1.0, 0.5, -2.0], dtype=DT)
    inner = lambda p, h: loss(p) + (torch.relu(p["z"]) ** 2).sum()
    outer = lambda p, h: loss(p) + p["z"].sum()
    hp = {"lr": torch.tensor(0.01, dtype=DT)}
    out = [bl.unrolled_hypergrad(inner, outer, params, hp, optimizer=opt, steps=8, mode=m)[0]["lr"]
           for m in ("reverse", "forward")]
    assert torch.isfinite(out[0]) and float(out[0]) == pytest.approx(float(out[1]), rel=1e-10, abs=1e-14)


def test_hyperoptimizer_unrolled_with_rmsprop_matches_finite_differences_of_torch_steps():
    """bl.Unrolled(steps=3) with a torch.optim.RMSprop inner optimizer (state after a few real steps):
    the hypergradient of a weight decay equals a central finite difference of the validation loss after
    3 steps of copies of that very optimizer."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 3, generator=g, dtype=DT), torch.randn(20, 1, generator=g, dtype=DT)
    Xv, yv = torch.randn(15, 3, generator=g, dtype=DT), torch.randn(15, 1, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).to(DT)
    hp = {"log_wd": torch.tensor(-1.0, dtype=DT, requires_grad=True)}
    inner = lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean() + h["log_wd"].exp() * (m.weight ** 2).sum()
    outer = lambda m, h, b: ((m(b[0]) - b[1]) ** 2).mean()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.5, weight_decay=0.01, centered=True)
    hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer, inner_optimizer=opt,
                             outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1), method=bl.Unrolled(steps=3))
    for _ in range(4):
        hopt.inner_step((X, y))
    hg, _ = hopt.hypergradient((X, y), (Xv, yv))

    def outer_after_torch_steps(log_wd):
        m = copy.deepcopy(model)
        o = torch.optim.RMSprop(m.parameters(), lr=0.01, momentum=0.5, weight_decay=0.01, centered=True)
        o.load_state_dict(copy.deepcopy(opt.state_dict()))   # load_state_dict would share the tensors
        h = {"log_wd": torch.tensor(log_wd, dtype=DT)}
        for _ in range(3):
            o.zero_grad()
            inner(m, h, (X, y)).backward()
            o.step()
        with torch.no_grad():
            return float(outer(m, h, (Xv, yv)))

    d = 1e-5
    fd = (outer_after_torch_steps(-1.0 + d) - outer_after_torch_steps(-1.0 - d)) / (2 * d)
    assert float(hg["log_wd"]) == pytest.approx(fd, rel=1e-6) and abs(fd) > 1e-6
