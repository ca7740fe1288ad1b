"""Models as users write them: a submodule used twice, tied weights, a parameter that never reaches
the loss, a frozen branch. HyperOptimizer must train them exactly as the plain torch loop does."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl

from conftest import tree_rel_err

DT = torch.float64


class Tied(nn.Module):
    """An encoder and a decoder sharing one weight matrix (two modules, one Parameter)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def _shared():
    proj = nn.Linear(4, 4)
    return nn.Sequential(proj, nn.Tanh(), proj)


def _functional(kind):
    """The same network as a pure function of its (deduplicated) parameters: the oracle."""
    if kind == "shared":
        return lambda p, x: F.linear(torch.tanh(F.linear(x, p["0.weight"], p["0.bias"])), p["0.weight"], p["0.bias"])
    return lambda p, x: F.linear(torch.tanh(F.linear(x, p["enc.weight"], p["enc.bias"])), p["enc.weight"],
                                 p["dec.bias"])


@pytest.mark.parametrize("kind", ["shared", "tied"])
def test_shared_and_tied_modules_train_like_the_plain_loop(kind):
    torch.manual_seed(0)
    model = (_shared() if kind == "shared" else Tied()).to(DT)
    names = [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(1)
    X, Xv = torch.randn(32, 4, generator=g, dtype=DT), torch.randn(24, 4, generator=g, dtype=DT)
    Y, Yv = torch.randn(32, 4, generator=g, dtype=DT), torch.randn(24, 4, generator=g, dtype=DT)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="parameter")
    hp_ref = {k: v.detach().clone() for k, v in hp.items()}
    loss = lambda m, h, b: F.mse_loss(m(b[0]), b[1])
    solver = bl.CG(maxiter=4, damping=0.5, on_indefinite="stop")
    hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=pen,
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                             outer_optimizer=torch.optim.SGD(hp.values(), lr=0.5),
                             method=bl.Implicit(solver=solver))
    # the plain loop: torch.optim on a pure-function copy, hypergradients from the core function
    f = _functional(kind)
    ref = {n: t.clone().requires_grad_() for n, t in params.items()}
    opt = torch.optim.SGD(ref.values(), lr=0.1, momentum=0.9)
    inner = lambda p, h, X, Y: F.mse_loss(f(p, X), Y) + pen(p, h)
    outer = lambda p, h, X, Y: F.mse_loss(f(p, X), Y)
    for _ in range(3):
        for _ in range(5):
            hopt.inner_step((X, Y))
            opt.zero_grad()
            inner(ref, hp_ref, X, Y).backward()
            opt.step()
        stats = hopt.hyper_step((X, Y), (Xv, Yv))
        assert not stats.skipped
        hg = bl.implicit_hypergrad(inner, outer, {k: v.detach() for k, v in ref.items()}, hp_ref, solver=solver,
                                   inner_args=(X, Y), outer_args=(Xv, Yv))
        with torch.no_grad():
            for k in hp_ref:
                hp_ref[k] -= 0.5 * hg[k]
    assert [n for n, _ in model.named_parameters()] == names
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    held = {id(p) for grp in hopt.inner_optimizer.param_groups for p in grp["params"]}
    assert {id(p) for p in model.parameters()} == held           # the optimizer still holds the model's weights
    assert tree_rel_err(dict(model.named_parameters()), ref) < 1e-10
    assert tree_rel_err(hp, hp_ref) < 1e-10


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
                                  lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1),
                                  lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1)],
                         ids=["adamw", "sgd", "adam"])
def test_parameters_without_gradient_are_left_alone_as_torch_does(make):
    """A parameter that never reaches the loss and a branch used only by the outer loss: no update, no
    decay, no optimizer state, exactly like zero_grad/backward/step."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 2)
            self.unused = nn.Parameter(torch.ones(2))
            self.aux = nn.Linear(3, 2)                      # only the validation loss uses it

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model, twin = Net().to(DT), None
    twin = Net().to(DT)
    twin.load_state_dict(model.state_dict())
    hp = {"c": torch.tensor(0.1, dtype=DT, requires_grad=True)}
    inner = lambda m, h, b: F.mse_loss(m(b[0]), b[1]) + h["c"] * (m.body.weight ** 2).sum()
    outer = lambda m, h, b: F.mse_loss(m(b[0]) + m.aux(b[0]), b[1])
    hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer, inner_optimizer=make(model.parameters()),
                             outer_optimizer=torch.optim.SGD(hp.values(), lr=0.0), method=bl.FirstOrder())
    opt = make(twin.parameters())
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        b = (torch.randn(8, 3, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT))
        hopt.inner_step(b)
        opt.zero_grad()
        inner(twin, hp, b).backward()
        opt.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(model.unused, torch.ones(2, dtype=DT)) and model.unused.grad is None
    assert model.unused not in hopt.inner_optimizer.state and model.aux.weight not in hopt.inner_optimizer.state


# -- batch norm: forward mode, and the hyper step leaves the running statistics alone -----------------
def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("optim", ["sgd_momentum", "adam"])
def test_batch_norm_forward_mode_equals_reverse_mode(optim):
    """Forward mode (jvp under vmap) on a model with BatchNorm in training mode: the same hypergradient
    as reverse mode, and neither moves the live model's running statistics."""
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)
    Xv, yv = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    ce = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])
    hgs = {}
    for mode in ("forward", "reverse"):
        model = _bn_model()
        hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="tensor")
        opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optim == "sgd_momentum"
               else torch.optim.Adam(model.parameters(), lr=1e-2))
        hopt = bl.HyperOptimizer(model, hp, inner_loss=ce, outer_loss=ce, penalty=pen, inner_optimizer=opt,
                                 outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1),
                                 method=bl.Unrolled(steps=3, mode=mode))
        hopt.inner_step((X, y))
        before = {n: b.clone() for n, b in model.named_buffers()}
        hgs[mode], _ = hopt.hypergradient((X, y), (Xv, yv))
        for n, b in model.named_buffers():
            assert torch.equal(b, before[n]), n
        assert int(model[1].num_batches_tracked) == 1 and model[1].track_running_stats
    assert tree_rel_err(hgs["forward"], hgs["reverse"]) < 1e-10
    assert max(float(v.abs().max()) for v in hgs["reverse"].values()) > 0


def test_forward_mode_names_a_buffer_written_in_forward():
    """A module that writes its own buffer in forward cannot run under torch.func.jvp: a clear error."""
    class Counting(nn.Linear):
        def __init__(self):
            super().__init__(4, 1)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return super().forward(x)

    model = Counting().double()
    calls = model.calls
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    hp = {"log_decay": torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)}
    inner = lambda p, h, *a: ((torch.func.functional_call(model, p, (X,)) - y) ** 2).mean() \
        + 0.5 * h["log_decay"].exp() * sum((w ** 2).sum() for w in p.values())
    outer = lambda p, h, *a: ((torch.func.functional_call(model, p, (X,)) - y) ** 2).mean()
    with pytest.raises(RuntimeError, match="writes in place into a tensor that is not one of its inputs"):
        bl.unrolled_hypergrad(inner, outer, params, hp, optimizer=bl.inner.SGD(lr=0.1), steps=2, mode="forward")
    assert bl.unrolled_hypergrad(inner, outer, params, hp, optimizer=bl.inner.SGD(lr=0.1), steps=2, mode="reverse") is not None
    assert model.calls is calls


def test_forward_mode_names_an_operation_without_a_forward_derivative():
    """CPU LSTM has no forward-mode derivative in PyTorch: the error says which mode to use instead."""
    torch.manual_seed(0)
    lstm, head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 1)
    X, y = torch.randn(5, 2, 3), torch.randn(5, 1)
    params = {**{"l." + k: v.detach() for k, v in lstm.named_parameters()},
              **{"h." + k: v.detach() for k, v in head.named_parameters()}}

    def predict(p):
        out = torch.func.functional_call(lstm, {k[2:]: v for k, v in p.items() if k[0] == "l"}, (X,))[0]
        return torch.func.functional_call(head, {k[2:]: v for k, v in p.items() if k[0] == "h"}, (out[:, -1],))

    hp = {"log_decay": torch.tensor(-2.0, requires_grad=True)}
    inner = lambda p, h, *a: ((predict(p) - y) ** 2).mean() + 0.5 * h["log_decay"].exp() * sum((w ** 2).sum() for w in p.values())
    outer = lambda p, h, *a: ((predict(p) - y) ** 2).mean()
    with pytest.raises(NotImplementedError, match="mode='reverse' or mode='checkpoint'"):
        bl.unrolled_hypergrad(inner, outer, params, hp, optimizer=bl.inner.SGD(lr=0.1), steps=2, mode="forward")
    hg, _ = bl.unrolled_hypergrad(inner, outer, params, hp, optimizer=bl.inner.SGD(lr=0.1), steps=2, mode="reverse")
    assert torch.isfinite(hg["log_decay"])
