"""The library end to end on a CUDA GPU, against the same computation on the CPU.

Skipped without CUDA. Each test builds one problem in float64 on the CPU, moves it to the GPU,
and checks that the GPU gives the CPU's answer (to float64 rounding; float32 against the float64
oracle at float32 tolerance), that state (optimizer, RNG, method state) lives on the GPU and
survives a checkpoint exactly, and that the fused Triton paths are the ones taken where they exist.
Run on a GPU machine with ``python -m pytest tests/test_gpu.py tests/test_kernels_gpu.py``.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl

from conftest import tree_rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = torch.device("cuda")
DT = torch.float64
TOL = {torch.float64: 1e-9, torch.float32: 2e-3}


def _to(tree, device, dtype=None):
    return {k: v.detach().to(device=device, dtype=dtype or v.dtype) for k, v in tree.items()}


def _mlp_problem(device, dtype=DT, dropout=0.0):
    """A small tanh MLP with one log-decay per weight, its data and losses, on ``device``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                              torch.nn.Linear(16, 3)).to(DT)
    g = torch.Generator().manual_seed(1)
    X, Xv = torch.randn(64, 6, generator=g, dtype=DT), torch.randn(32, 6, generator=g, dtype=DT)
    y, yv = torch.randint(0, 3, (64,), generator=g), torch.randint(0, 3, (32,), generator=g)
    hp = {k: torch.full_like(v, -3.0) + 0.2 * torch.randn(v.shape, generator=g, dtype=DT)
          for k, v in net.named_parameters()}
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    net = net.to(device=device, dtype=dtype)
    X, Xv = X.to(device, dtype), Xv.to(device, dtype)
    y, yv = y.to(device), yv.to(device)

    def inner(p, h, X, y):
        return F.cross_entropy(functional_call(net, p, (X,)), y) + 0.5 * sum((h[k].exp() * p[k] ** 2).sum()
                                                                             for k in p)

    def outer(p, h, X, y):
        return F.cross_entropy(functional_call(net, p, (X,)), y)

    return _to(params, device, dtype), _to(hp, device, dtype), inner, outer, (X, y), (Xv, yv)


def _train(inner, params, hp, data, steps=150):
    w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.LBFGS(list(w.values()), lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = inner(w, hp, *data)
        loss.backward()
        return loss
    opt.step(closure)
    return {k: v.detach() for k, v in w.items()}


@pytest.mark.parametrize("solver", ["exact", "cg", "gauss_newton"])
def test_implicit_hypergradient_on_gpu_equals_cpu(solver):
    results = {}
    for dev in ("cpu", DEV):
        params, hp, inner, outer, data, val = _mlp_problem(dev)
        w = _train(inner, params, hp, data)
        if solver == "gauss_newton":
            hg = _gauss_newton_hypergrad(dev, w, hp, data, val)
        else:
            hg = bl.implicit_hypergrad(inner, outer, w, hp, inner_args=data, outer_args=val,
                                       solver=bl.Exact() if solver == "exact" else bl.CG(maxiter=200, tol=1e-12))
        assert all(t.device.type == torch.device(dev).type for t in hg.values())
        results[str(dev)] = _to(hg, "cpu")
    assert tree_rel_err(results["cuda"], results["cpu"]) < TOL[DT]


def _gauss_newton_hypergrad(dev, w, hp, data, val):
    """The GGN hypergradient of the same MLP, written with ``bl.losses.cross_entropy`` (the GGN seam)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.0),
                              torch.nn.Linear(16, 3)).to(device=dev, dtype=DT)

    def data_loss(p, h, X, y):
        return bl.losses.cross_entropy(functional_call(net, p, (X,)), y)

    def outer(p, h, X, y):
        return F.cross_entropy(functional_call(net, p, (X,)), y)
    penalty = lambda p, h: 0.5 * sum((h[k].exp() * p[k] ** 2).sum() for k in p)
    return bl.implicit_hypergrad(data_loss, outer, w, hp, inner_args=data, outer_args=val, penalty=penalty,
                                 solver=bl.CG(maxiter=200, tol=1e-12), hvp_mode="gauss_newton")


def test_float32_on_gpu_against_the_float64_oracle():
    params, hp, inner, outer, data, val = _mlp_problem("cpu")
    w = _train(inner, params, hp, data)
    ref = bl.implicit_hypergrad(inner, outer, w, hp, inner_args=data, outer_args=val, solver=bl.Exact())
    params32, hp32, inner32, outer32, data32, val32 = _mlp_problem(DEV, torch.float32)
    hg = bl.implicit_hypergrad(inner32, outer32, _to(w, DEV, torch.float32), hp32, inner_args=data32,
                               outer_args=val32, solver=bl.CG(maxiter=100, tol=1e-7))
    assert all(t.dtype == torch.float32 and t.is_cuda for t in hg.values())
    assert tree_rel_err(_to(hg, "cpu"), ref) < TOL[torch.float32]


@pytest.mark.parametrize("mode", ["reverse", "checkpoint", "replay", "forward"])
@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_unrolled_hypergradient_on_gpu_equals_cpu(mode, opt):
    optimizer = {"momentum": bl.inner.SGD(lr=0.1, momentum=0.9), "adam": bl.inner.Adam(lr=0.02)}[opt]
    results = {}
    for dev in ("cpu", DEV):
        params, hp, inner, outer, (X, y), val = _mlp_problem(dev)
        batches = lambda t, X=X, y=y: (X[(t * 16) % 64:(t * 16) % 64 + 16], y[(t * 16) % 64:(t * 16) % 64 + 16])
        hg, w = bl.unrolled_hypergrad(inner, outer, params, hp, optimizer=optimizer, steps=12, mode=mode,
                                      replay_k=3, inner_args=batches, outer_args=val)
        assert all(t.is_cuda == (dev != "cpu") for t in list(hg.values()) + list(w.values()))
        results[str(dev)] = (_to(hg, "cpu"), _to(w, "cpu"))
    assert tree_rel_err(results["cuda"][0], results["cpu"][0]) < TOL[DT]
    assert tree_rel_err(results["cuda"][1], results["cpu"][1]) < TOL[DT]


def _hyperoptimizer(device, dropout=0.2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                                torch.nn.Linear(32, 3)).to(device=device, dtype=DT)
    hp, penalty = bl.hparams.weight_decay(model, init=1e-3)
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(96, 6, generator=g, dtype=DT).to(device), torch.randint(0, 3, (96,), generator=g).to(device)
    batches = [(X[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    val = [(X[64:80], y[64:80]), (X[80:], y[80:])]
    loss = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])
    hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=penalty,
                             inner_optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=0.05),
                             method=bl.Implicit(solver=bl.CG(maxiter=10, damping=1.0, on_indefinite="stop")),
                             outer_loader=val, hyper_every=2)
    return hopt, batches


def _state(hopt):
    return [t.detach().cpu().clone() for t in list(hopt.model.state_dict().values()) + list(hopt.hparams.values())]


def test_hyperoptimizer_on_gpu_trains_and_resumes_bit_identically(tmp_path):
    hopt, batches = _hyperoptimizer(DEV)
    before = _state(hopt)
    for b in batches:
        hopt.step(b)
    assert hopt.hyper_steps == 2 and not any(torch.equal(a, b) for a, b in zip(before, _state(hopt)))  # hparams moved too
    assert all(v.is_cuda for v in hopt.hparams.values())
    hopt.save(tmp_path / "ckpt.pt")
    for _ in range(2):
        for b in batches:
            hopt.step(b)
    ref = _state(hopt)

    fresh, _ = _hyperoptimizer(DEV)
    fresh.load(tmp_path / "ckpt.pt")
    for _ in range(2):
        for b in batches:
            fresh.step(b)
    got = _state(fresh)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_hyperoptimizer_first_hyper_steps_on_gpu_match_cpu():
    # no dropout: the GPU's random stream differs from the CPU's, so masks would differ
    states = {}
    for dev in ("cpu", DEV):
        hopt, batches = _hyperoptimizer(dev, dropout=0.0)
        for b in batches:
            hopt.step(b)
        states[str(dev)] = _state(hopt)
    for a, b in zip(states["cpu"], states["cuda"]):
        assert (a - b).abs().max() <= 1e-9 * (1 + b.abs().max())


def test_darts_search_on_gpu_takes_finite_steps():
    torch.manual_seed(0)
    net = bl.nas.Network(1, 3, dim=1, C=4, layers=2, nodes=2, primitives=("skip_connect", "sep_conv_3x3",
                                                                           "max_pool_3x3")).to(DEV)
    data = [(torch.randn(8, 1, 12, device=DEV), torch.randint(0, 3, (8,), device=DEV)) for _ in range(3)]
    hopt = bl.nas.darts(net, method=bl.Unrolled(steps=1), outer_loader=data)
    alphas = bl.nas.arch_parameters(net)
    assert alphas and all(a.is_cuda for a in alphas)
    start = [a.detach().clone() for a in alphas]
    for b in data * 2:
        hopt.step(b)
    assert hopt.hyper_steps == 6
    assert all(torch.isfinite(a).all() for a in alphas)
    assert any(not torch.equal(a.detach(), s) for a, s in zip(alphas, start))


def test_cg_on_gpu_takes_the_fused_triton_path_inside_a_hypergradient():
    K = pytest.importorskip("bilevel.kernels")
    if not K.triton_available() or K.interpreting():
        pytest.skip("needs triton compiled for the GPU (TRITON_INTERPRET unset)")
    params, hp, inner, outer, data, val = _mlp_problem(DEV)
    w = _train(inner, params, hp, data)
    hg = bl.implicit_hypergrad(inner, outer, w, hp, inner_args=data, outer_args=val,
                               solver=bl.CG(maxiter=200, tol=1e-12))
    assert hg.info.solver.extra.get("backend") == "triton"
    ref = bl.implicit_hypergrad(inner, outer, w, hp, inner_args=data, outer_args=val,
                                solver=bl.CG(maxiter=200, tol=1e-12, backend="torch"))
    assert tree_rel_err(hg, ref) < TOL[DT]
