"""bilevel.nas: DARTS relaxations searched through bl.HyperOptimizer.

Oracles: the closed-form fixed points of the DARTS paper's toy problem (every estimator), a
hand-written autograd one-step unroll (second-order DARTS, exact and finite-difference), a
planted operation that generated the data, hand-set architecture weights (derivation rules),
the Gumbel-max law ``P(argmax) = softmax(α)``, and a hand-built supernet whose perturbation
ranking differs from its weight ranking.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl

DT = torch.float64
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)                              # tiny problems: threads only add overhead
    yield
    torch.set_num_threads(n)


# -- the DARTS paper's toy problem: L_val = αw − 2α + 1, L_train = w² − 2αw + α² -------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(-1.5, dtype=DT))
        self.alpha = nn.Parameter(torch.tensor(-1.0, dtype=DT))


def _toy_fixed_point(method, xi=0.3, outer_steps=400):
    m = Toy()
    hopt = bl.HyperOptimizer(m, {"alpha": m.alpha},
                             inner_loss=lambda mm, h, b: mm.w ** 2 - 2 * mm.alpha * mm.w + mm.alpha ** 2,
                             outer_loss=lambda mm, h, b: mm.w * mm.alpha - 2 * mm.alpha + 1,
                             inner_optimizer=torch.optim.SGD([m.w], lr=xi),
                             outer_optimizer=torch.optim.SGD([m.alpha], lr=0.1), method=method)
    for _ in range(outer_steps):
        for _ in range(5):
            hopt.inner_step(None)
        hopt.hyper_step(None, None)
    return float(m.alpha.detach()), float(m.w.detach())


# At a converged inner problem w = α; H = ∂²_ww L_T = 2, ∂²_αw L_T = −2, ∂_w L_V = α, ∂_α L_V = w − 2.
#   first order:         ∂_α L_V = α − 2 = 0                                          → α = 2
#   one-step unrolled:   w' = w − 2ξ(w − α); d/dα L_V(w') = w' − 2 + 2ξα = α − 2 + 2ξα  → α = 2/(1+2ξ)
#   exact implicit:      α − 2 + 2·H⁻¹α = 2α − 2                                       → α = 1
#   Neumann (K terms after the first, step a): H⁻¹ ≈ c = a Σ_{j=0..K} (1−2a)^j = (1 − (1−2a)^{K+1})/2,
#                        α − 2 + 2cα = 0                                                → α = 2/(2 − (1−2a)^{K+1})
# The finite-difference second-order term is exact on this quadratic L_T, so it shares 2/(1+2ξ).
XI = 0.3
NEUMANN_A, NEUMANN_K = 0.1, 3


@pytest.mark.parametrize("method,alpha_star", [
    (bl.FirstOrder(), 2.0),
    (bl.Unrolled(steps=1), 2.0 / (1 + 2 * XI)),
    (bl.Unrolled(steps=1, second_order="finite_difference"), 2.0 / (1 + 2 * XI)),
    (bl.Implicit(solver=bl.Exact()), 1.0),
    (bl.Implicit(solver=bl.Neumann(steps=NEUMANN_K, alpha=NEUMANN_A)),
     2.0 / (2.0 - (1 - 2 * NEUMANN_A) ** (NEUMANN_K + 1))),
], ids=["first-order", "second-order-exact", "second-order-fd", "implicit-exact", "implicit-neumann-K3"])
def test_darts_toy_fixed_points_every_estimator(method, alpha_star):
    alpha, w = _toy_fixed_point(method, XI)
    assert abs(alpha - alpha_star) < 1e-6
    assert abs(w - alpha_star) < 1e-6                    # the inner problem followed: w* = α


def test_neumann_toy_fixed_point_moves_toward_exact_with_more_terms():
    a = NEUMANN_A
    got = [_toy_fixed_point(bl.Implicit(solver=bl.Neumann(steps=K, alpha=a)), XI, outer_steps=300)[0]
           for K in (0, 8)]
    want = [2.0 / (2.0 - (1 - 2 * a) ** (K + 1)) for K in (0, 8)]
    assert got == pytest.approx(want, abs=1e-6)
    assert abs(got[1] - 1.0) < abs(got[0] - 1.0)         # K → ∞ gives the exact α* = 1


# -- second-order DARTS on a real supernet: exact and finite difference vs a hand-written unroll ------
def _tiny_search(dim=1, seed=0):
    torch.manual_seed(seed)
    net = bl.nas.Network(1, 3, dim=dim, C=4, layers=1, nodes=2, stem_multiplier=1).to(DT)
    shape = (8, 1, 8) if dim == 1 else (6, 1, 6, 6)
    g = torch.Generator().manual_seed(seed + 1)
    xb, xv = torch.randn(shape, generator=g, dtype=DT), torch.randn(shape, generator=g, dtype=DT)
    yb, yv = torch.randint(0, 3, (shape[0],), generator=g), torch.randint(0, 3, (shape[0],), generator=g)
    return net, (xb, yb), (xv, yv)


def _ce(m, h, b):
    return F.cross_entropy(m(b[0]), b[1])


def _mse(m, h, b):
    return F.mse_loss(m(b[0]), b[1])


def _hopt(net, method, lr=0.1, momentum=0.0, loss=_ce):
    return bl.nas.darts(net, method=method, inner_loss=loss, lr=lr, momentum=momentum, weight_decay=0.0,
                        arch_lr=3e-3, arch_betas=(0.9, 0.999), arch_weight_decay=0.0)


def _one_step_oracle(net, batch, val, xi, loss=F.cross_entropy):
    """dL_V(w − ξ∇_w L_T(w, α), α)/dα by plain autograd through functional_call."""
    from torch.func import functional_call
    w = {k: v.detach().clone().requires_grad_(True) for k, v in bl.nas.named_weight_parameters(net).items()}
    a = {k: v.detach().clone().requires_grad_(True) for k, v in bl.nas.named_arch_parameters(net).items()}
    bufs = {k: b.clone() for k, b in net.named_buffers()}
    f = lambda ww, x: functional_call(net, {**ww, **a, **bufs}, (x,))      # noqa: E731
    lt = loss(f(w, batch[0]), batch[1])
    g = torch.autograd.grad(lt, list(w.values()), create_graph=True)
    w1 = {k: v - xi * gi for (k, v), gi in zip(w.items(), g)}
    lv = loss(f(w1, val[0]), val[1])
    return dict(zip(a, torch.autograd.grad(lv, list(a.values()))))


def _rel(a, b):
    num = math.sqrt(sum(float((a[k] - b[k]).square().sum()) for k in a))
    return num / math.sqrt(sum(float(b[k].square().sum()) for k in b))


def test_second_order_darts_exact_and_finite_difference_match_hand_written_unroll():
    net, batch, val = _tiny_search(dim=1)
    with torch.no_grad():                                 # a non-trivial architecture point
        for p in bl.nas.arch_parameters(net):
            p.normal_(0, 0.5)
    ref = _one_step_oracle(net, batch, val, xi=0.1)
    exact, _ = _hopt(net, bl.Unrolled(steps=1)).hypergradient(batch, val)
    assert _rel(exact, ref) < 1e-10
    # NOTE: ReLU and max pooling make L_T piecewise smooth: at radius 0.01 some of this tiny net's
    # units cross a kink (measured error ≈ 7e-2); at 1e-4 none does and the difference is exact to O(r²).
    fd, _ = _hopt(net, bl.Unrolled(steps=1, second_order="finite_difference", fd_radius=1e-4)).hypergradient(
        batch, val)
    assert _rel(fd, ref) < 1e-6
    fo, _ = _hopt(net, bl.FirstOrder()).hypergradient(batch, val)
    assert _rel(fo, ref) > 1e-2                           # the second-order term matters here


def test_finite_difference_error_is_second_order_in_the_radius_on_a_smooth_supernet():
    torch.manual_seed(0)
    model = Planted()
    model.proj = nn.Linear(6, 6).to(DT)                   # trainable weights before the mixed op:
    model.forward = lambda x: Planted.forward(model, model.proj(x).tanh())   # L_T no longer quadratic
    with torch.no_grad():
        model.mix.alpha.normal_(0, 0.5)
    train, val = _planted_data(64, 1), _planted_data(64, 2)
    ref = _one_step_oracle(model, (train[0], train[1]), (val[0], val[1]), xi=0.1, loss=F.mse_loss)
    errs = {}
    for r in (0.1, 0.01):
        method = bl.Unrolled(steps=1, second_order="finite_difference", fd_radius=r)
        fd, _ = _hopt(model, method, lr=0.1, loss=_mse).hypergradient(train, val)
        errs[r] = _rel(fd, ref)
    assert errs[0.01] < 1e-4                              # DARTS's ε = 0.01/‖v‖
    assert errs[0.01] < errs[0.1] / 30                    # central difference: error O(radius²)


def test_finite_difference_follows_momentum_sgd_like_the_exact_step():
    net, batch, val = _tiny_search(dim=1, seed=3)
    hopt = _hopt(net, bl.Unrolled(steps=1), lr=0.05, momentum=0.9)
    for _ in range(3):                                    # momentum buffers exist now
        hopt.inner_step(batch)
    exact, _ = hopt.hypergradient(batch, val)
    hopt.method = bl.Unrolled(steps=1, second_order="finite_difference", fd_radius=1e-4)   # below ReLU kinks
    fd, _ = hopt.hypergradient(batch, val)
    assert _rel(fd, exact) < 1e-6


def test_unrolled_finite_difference_validation():
    with pytest.raises(ValueError, match="steps=1"):
        bl.Unrolled(steps=3, second_order="finite_difference")
    with pytest.raises(ValueError, match="second_order"):
        bl.Unrolled(second_order="fd")
    with pytest.raises(ValueError, match="fd_radius"):
        bl.Unrolled(second_order="finite_difference", fd_radius=0.0)


# -- a planted operation generated the data: every estimator finds it -------------------------------
class Sin(nn.Module):
    def forward(self, x):
        return torch.sin(x)


class Cos(nn.Module):
    def forward(self, x):
        return torch.cos(x)


class Planted(nn.Module):
    """``head(MixedOp(x A))``: a fixed random projection A, candidate nonlinearities, a linear head."""

    def __init__(self, d=6, k=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("A", 2.0 * torch.randn(d, k, generator=g, dtype=DT) / math.sqrt(d))
        self.mix = bl.nas.MixedOp({"none": bl.nas.Zero(), "identity": nn.Identity(), "tanh": nn.Tanh(),
                                   "sin": Sin(), "cos": Cos()})
        self.head = nn.Linear(k, 1)
        self.to(DT)

    def forward(self, x):
        return self.head(self.mix(x @ self.A)).squeeze(-1)


def _planted_data(n, seed):
    """y = v·sin(x A) + 0.3 + noise: the "sin" candidate generated the data."""
    g = torch.Generator().manual_seed(seed)
    A = Planted().A
    x = torch.randn(n, A.shape[0], generator=g, dtype=DT)
    v = torch.linspace(-1.5, 1.5, A.shape[1], dtype=DT)
    y = torch.sin(x @ A) @ v + 0.3 + 0.05 * torch.randn(n, generator=g, dtype=DT)
    return x, y


@pytest.mark.parametrize("method", [
    bl.FirstOrder(),
    bl.Unrolled(steps=1),
    bl.Unrolled(steps=1, second_order="finite_difference"),
    bl.Implicit(solver=bl.Neumann(steps=10)),
    bl.Implicit(solver=bl.CG(maxiter=10)),
], ids=["first-order", "second-order", "second-order-fd", "idarts-neumann", "implicit-cg"])
def test_planted_operation_is_recovered(method):
    torch.manual_seed(0)
    model = Planted()
    train, val = _planted_data(256, 1), _planted_data(256, 2)
    alphas = bl.nas.named_arch_parameters(model)
    assert list(alphas) == ["mix.alpha"]
    hopt = bl.nas.darts(model, method=method, inner_loss=_mse, lr=0.1, momentum=0.0, weight_decay=0.0,
                        arch_lr=0.05, arch_betas=(0.9, 0.999), arch_weight_decay=0.0)
    for _ in range(120):
        for _ in range(5):
            hopt.inner_step(train)
        stats = hopt.hyper_step(train, val)
    assert not stats.skipped
    assert bl.nas.derive(model) == {"mix": "sin"}
    w = model.mix.expected_weights().detach()
    names = model.mix.names
    assert float(w[names.index("sin")]) > 0.8                # from 0.2 (uniform) in 120 outer steps


# -- MixedOp ----------------------------------------------------------------------------------------
class Count(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale, self.calls = scale, 0

    def forward(self, x):
        self.calls += 1
        return self.scale * x


def test_mixed_op_is_softmax_weighted_sum_and_skips_none():
    ops = {"none": bl.nas.Zero(), "a": Count(2.0), "b": Count(-1.0), "c": nn.Linear(3, 3)}
    m = bl.nas.MixedOp(ops)
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.3, -0.2, 1.0, 0.1]))
    x = torch.randn(5, 3)
    p = torch.softmax(m.alpha.detach(), 0)
    want = p[1] * 2 * x + p[2] * (-x) + p[3] * ops["c"](x)
    torch.testing.assert_close(m(x), want)
    out = m(x).sum()
    out.backward()
    assert m.alpha.grad is not None and torch.isfinite(m.alpha.grad).all()
    assert ops["a"].calls == 2
    with m.without(["a", "c"]):
        torch.testing.assert_close(m(x), p[2] * (-x))
    assert m.disabled == set()
    with m.without(m.names):                              # nothing left: zeros of the right shape
        assert torch.equal(m(x), torch.zeros(5, 3))


def test_mixed_op_sigmoid_weighting_and_zero_one_loss():
    m = bl.nas.MixedOp({"a": nn.Identity(), "b": Count(3.0)}, weighting="sigmoid")
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.0, 2.0]))
    x = torch.randn(4)
    s = torch.sigmoid(m.alpha.detach())
    torch.testing.assert_close(m(x), s[0] * x + s[1] * 3 * x)
    net = nn.Sequential(m)
    want = -((s - 0.5) ** 2).mean()
    torch.testing.assert_close(bl.nas.zero_one_loss(net), want)


def test_arch_and_weight_parameters_partition_the_model():
    net = bl.nas.Network(1, 4, dim=1, C=2, layers=2, nodes=2)
    arch, weights = bl.nas.named_arch_parameters(net), bl.nas.named_weight_parameters(net)
    names = set(dict(net.named_parameters()))
    assert set(arch) | set(weights) == names and not set(arch) & set(weights)
    assert len(arch) == 2 * (2 + 3)                       # 2 cells × (2 + 3 edges) for 2 nodes
    assert all(k.endswith(".alpha") and v.shape == (len(bl.nas.PRIMITIVES),) for k, v in arch.items())
    with pytest.raises(ValueError, match="architecture weights"):
        bl.nas.arch_parameters(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="named_arch_parameters: expected a model with architecture weights"):
        bl.nas.named_arch_parameters(nn.Linear(2, 2))
    # the unnamed variants list the same tensors in the same order, as model.parameters() would
    assert all(a is b for a, b in zip(bl.nas.arch_parameters(net), arch.values(), strict=True))
    assert all(a is b for a, b in zip(bl.nas.weight_parameters(net), weights.values(), strict=True))
    assert all(isinstance(p, nn.Parameter) for p in bl.nas.weight_parameters(net) + bl.nas.arch_parameters(net))


def test_weight_parameters_feed_torch_optim_like_model_parameters():
    """torch.optim.SGD(bl.nas.weight_parameters(model)) trains exactly as over the explicit list of the
    non-α parameters (it used to receive the names of a dict and fail)."""
    def train(make_params):
        torch.manual_seed(0)
        net = bl.nas.Network(1, 3, dim=1, C=2, layers=1, nodes=2, stem_multiplier=1,
                             primitives=("skip_connect", "sep_conv_3x3")).to(DT)
        x, y = torch.randn(6, 1, 10, dtype=DT), torch.randint(0, 3, (6,))
        opt = torch.optim.SGD(make_params(net), lr=0.1, momentum=0.9)
        alphas = [p.detach().clone() for p in bl.nas.arch_parameters(net)]
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        assert all(torch.equal(a, p) for a, p in zip(alphas, bl.nas.arch_parameters(net)))   # α untouched
        return [p.detach() for p in net.parameters()]

    explicit = train(lambda net: [p for n, p in net.named_parameters() if not n.endswith(".alpha")])
    ours = train(bl.nas.weight_parameters)
    assert len(explicit) == len(ours) and all(torch.equal(a, b) for a, b in zip(explicit, ours))
    ours_named = train(lambda net: bl.nas.named_weight_parameters(net).values())
    assert all(torch.equal(a, b) for a, b in zip(explicit, ours_named))


def test_mixed_op_errors_are_clear():
    with pytest.raises(ValueError, match="non-empty dict"):
        bl.nas.MixedOp({})
    with pytest.raises(TypeError, match="nn.Module"):
        bl.nas.MixedOp({"a": lambda x: x})
    with pytest.raises(ValueError, match="weighting"):
        bl.nas.MixedOp({"a": nn.Identity()}, weighting="relu")
    with pytest.raises(ValueError, match="shape"):
        bl.nas.MixedOp({"a": nn.Identity(), "b": nn.Identity()}, alpha=nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match="clashes"):
        bl.nas.MixedOp({"half": nn.Identity()})
    with pytest.raises(KeyError, match="unknown candidates"):
        with bl.nas.MixedOp({"a": nn.Identity()}).without(["b"]):
            pass


# -- Gumbel sampling (GDAS / SNAS) ------------------------------------------------------------------
def test_gumbel_hard_samples_follow_softmax_and_run_one_candidate():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    ops = {"a": Count(1.0), "b": Count(2.0), "c": Count(3.0)}
    m = bl.nas.MixedOp(ops, weighting="gumbel", hard=True, tau=0.7)
    with torch.no_grad():
        m.alpha.copy_(p.log())
    n = 4000
    counts = torch.zeros(3)
    for _ in range(n):
        w = m.weights()
        assert float(w.detach().sum()) == pytest.approx(1.0) and int((w.detach() > 0).sum()) == 1
        counts += w.detach()
    # Gumbel-max: P(sample = i) = softmax(α)_i whatever τ; 4σ of a frequency over 4000 draws < 0.032
    torch.testing.assert_close(counts / n, p, atol=0.032, rtol=0)
    y = m(torch.ones(2))                                  # one candidate runs, straight-through gradient
    assert sum(o.calls for o in ops.values()) == 1
    y.sum().backward()
    assert m.alpha.grad is not None and float(m.alpha.grad.abs().sum()) > 0
    m.eval()                                              # eval: the deterministic softmax(α)
    torch.testing.assert_close(m.weights(), p)


def test_gumbel_soft_samples_sharpen_as_temperature_anneals():
    torch.manual_seed(1)
    net = nn.Sequential(bl.nas.MixedOp({k: nn.Identity() for k in "abcd"}, weighting="gumbel"))
    m = net[0]

    def mean_max(tau, n=500):
        assert bl.nas.set_temperature(net, tau) == 1
        return sum(float(m.weights().detach().max()) for _ in range(n)) / n

    hot, cold = mean_max(100.0), mean_max(0.02)
    assert hot < 0.27                                     # near uniform (0.25)
    assert cold > 0.99                                    # near one-hot
    assert bl.nas.annealed_temperature(0, 10, start=10.0, end=0.1) == pytest.approx(10.0)
    assert bl.nas.annealed_temperature(5, 10, start=10.0, end=0.1) == pytest.approx(1.0)
    assert bl.nas.annealed_temperature(10, 10, start=10.0, end=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="tau"):
        bl.nas.set_temperature(net, 0.0)


# -- derivation ---------------------------------------------------------------------------------------
def _set_alpha(net, edge, weights):
    m = bl.nas.mixed_ops(net)[edge]
    logits = torch.full((len(m.names),), -10.0)
    for name, val in weights.items():
        logits[m.names.index(name)] = math.log(val)
    with torch.no_grad():
        m.alpha.copy_(logits)


def test_derive_excludes_none_and_keeps_top2_edges_per_node():
    net = bl.nas.Network(1, 3, dim=1, C=2, layers=1, nodes=3)
    edges = list(bl.nas.mixed_ops(net))
    assert edges == [f"cells.0.edges.{j}_{i}" for j in range(3) for i in range(j + 2)]
    e = lambda j, i: f"cells.0.edges.{j}_{i}"             # noqa: E731
    # node 0 (2 inputs): "none" has the largest weight everywhere but is never chosen
    _set_alpha(net, e(0, 0), {"none": 0.7, "sep_conv_3x3": 0.2, "skip_connect": 0.1})
    _set_alpha(net, e(0, 1), {"none": 0.9, "max_pool_3x3": 0.06, "dil_conv_5x5": 0.04})
    # node 1 (3 inputs): strengths 0.5, 0.3, 0.6 → edges from 0 and 2 kept
    _set_alpha(net, e(1, 0), {"sep_conv_5x5": 0.5, "skip_connect": 0.5 - 1e-3})
    _set_alpha(net, e(1, 1), {"dil_conv_3x3": 0.3, "none": 0.7})
    _set_alpha(net, e(1, 2), {"avg_pool_3x3": 0.6, "sep_conv_3x3": 0.4})
    # node 2 (4 inputs): strengths 0.2, 0.8, 0.7, 0.1 → edges from 1 and 2 kept
    _set_alpha(net, e(2, 0), {"sep_conv_3x3": 0.2, "none": 0.8})
    _set_alpha(net, e(2, 1), {"skip_connect": 0.8, "sep_conv_3x3": 0.2})
    _set_alpha(net, e(2, 2), {"dil_conv_3x3": 0.7, "none": 0.3})
    _set_alpha(net, e(2, 3), {"sep_conv_5x5": 0.1, "none": 0.9})
    g = bl.nas.derive(net)
    assert g == {e(0, 0): "sep_conv_3x3", e(0, 1): "max_pool_3x3",
                 e(1, 0): "sep_conv_5x5", e(1, 1): "none", e(1, 2): "avg_pool_3x3",
                 e(2, 0): "none", e(2, 1): "skip_connect", e(2, 2): "dil_conv_3x3", e(2, 3): "none"}
    assert bl.nas.parameter_free_edges(g) == 3           # max pool, avg pool, skip
    assert sum(op != "none" for op in g.values()) == 2 * 3
    # all edges kept without the topology step; a derived network builds and runs
    assert sum(op != "none" for op in bl.nas.derive(net, edges_per_node=None).values()) == 9
    child = bl.nas.Network(1, 3, dim=1, C=2, layers=1, nodes=3, genotype=g)
    assert not bl.nas.mixed_ops(child) and len(child.cells[0].edges) == 6
    assert child(torch.randn(2, 1, 8)).shape == (2, 3)
    with pytest.raises(KeyError, match="no operation for edge"):
        bl.nas.Network(1, 3, dim=1, C=2, layers=1, nodes=3, genotype={k: v for k, v in list(g.items())[1:]})
    with pytest.raises(ValueError, match="no bl.nas.MixedOp|MixedOp edges"):
        bl.nas.derive(child)


class Node(nn.Module):
    """One node fed by three mixed edges of three inputs: out = Σ_k edge_k(x_k)."""

    def __init__(self):
        super().__init__()
        self.edges = nn.ModuleDict({k: bl.nas.MixedOp({"none": bl.nas.Zero(), "skip": nn.Identity(),
                                                       "halve": Count(0.5)}) for k in "abc"})

    def node_edges(self):
        return [[f"edges.{k}" for k in "abc"]]

    def forward(self, xs):
        return sum(self.edges[k](x) for k, x in zip("abc", xs))


def test_perturbation_selection_on_hand_built_supernet():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("node", Node())
    for k in "abc":                                       # weights: none 0, skip 0.4, halve 0.6
        _set_alpha(net, f"node.edges.{k}", {"skip": 0.4, "halve": 0.6})
    x = [torch.randn(64, 5), torch.randn(64, 5), torch.zeros(64, 5)]   # edge c sees only zeros
    target = x[0] + x[1]
    score = lambda m: -float(F.mse_loss(m[0](x), target))               # noqa: E731
    # With every op, each live edge outputs 0.4x + 0.3x = 0.7x (error 0.09/elt); without skip 0.3x
    # (0.49), without halve 0.4x (0.36): removing skip hurts more although halve has more weight.
    argmax = bl.nas.derive(net)
    pert = bl.nas.derive(net, rule=bl.nas.Perturbation(score))
    assert argmax == {"node.edges.a": "halve", "node.edges.b": "halve", "node.edges.c": "none"} or \
        set(argmax.values()) == {"halve", "none"}          # argmax: ties between edges, broken by order
    assert pert == {"node.edges.a": "skip", "node.edges.b": "skip", "node.edges.c": "none"}
    assert all(not m.disabled for m in bl.nas.mixed_ops(net).values())   # nothing left disabled
    with pytest.raises(ValueError, match="every candidate"):
        bl.nas.derive(net, exclude=("none", "skip", "halve"))


# -- expected cost -----------------------------------------------------------------------------------
def test_expected_cost_is_weighted_table_and_its_gradient_favours_cheap_ops():
    net = bl.nas.Network(1, 3, dim=1, C=2, layers=1, nodes=2)
    table = {p: float(i) for i, p in enumerate(bl.nas.PRIMITIVES)}
    with torch.no_grad():
        want = sum(float((m.expected_weights() * torch.tensor([table[n] for n in m.names])).sum())
                   for m in bl.nas.mixed_ops(net).values())
    cost = bl.nas.expected_cost(net, table)
    assert float(cost) == pytest.approx(want, rel=1e-6)
    cost.backward()
    for m in bl.nas.mixed_ops(net).values():             # descending the cost moves weight to cheap ops
        assert float(m.alpha.grad[0]) < 0 < float(m.alpha.grad[-1])
    params = bl.nas.expected_cost(net, "params")
    assert float(params) > 0
    with pytest.raises(KeyError, match="no entry for candidate"):
        bl.nas.expected_cost(net, {"none": 0.0})


# -- search spaces through HyperOptimizer -------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("method", [bl.FirstOrder(), bl.Unrolled(steps=1),
                                    bl.Implicit(solver=bl.Neumann(steps=3, alpha=0.05))], ids=["fo", "so", "idarts"])
def test_search_step_on_darts_cells(dim, method):
    net, batch, val = _tiny_search(dim=dim)
    hopt = _hopt(net, method, lr=0.05)
    before = {k: v.detach().clone() for k, v in bl.nas.named_arch_parameters(net).items()}
    bufs = {k: b.clone() for k, b in net.named_buffers()}
    hopt.inner_step(batch)
    bufs_after_inner = {k: b.clone() for k, b in net.named_buffers()}
    stats = hopt.hyper_step(batch, val)
    assert not stats.skipped and math.isfinite(stats.hypergrad_norm) and stats.hypergrad_norm > 0
    assert any(not torch.equal(before[k], v) for k, v in bl.nas.named_arch_parameters(net).items())
    for k, b in net.named_buffers():                      # hyper steps leave BatchNorm statistics alone
        assert torch.equal(b, bufs_after_inner[k])
    assert any(not torch.equal(bufs[k], b) for k, b in net.named_buffers() if b.is_floating_point())
    g = bl.nas.derive(net)
    child = bl.nas.Network(1, 3, dim=dim, C=4, layers=1, nodes=2, stem_multiplier=1, genotype=g).to(DT)
    assert child(val[0]).shape == (val[0].shape[0], 3)


def test_darts_helper_builds_the_paper_search():
    """bl.nas.darts: α are the hyperparameters, every other parameter the inner variables, with the
    optimizers and numbers of Liu et al. (2019); losses, method and HyperOptimizer options pass through."""
    net, batch, val = _tiny_search(dim=1)
    hopt = bl.nas.darts(net, outer_loader=[val], hyper_every=2)
    alphas, weights = bl.nas.named_arch_parameters(net), bl.nas.named_weight_parameters(net)
    held = {id(p) for g in hopt.inner_optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in weights.values()} and not held & {id(a) for a in alphas.values()}
    assert list(hopt.hparams) == list(alphas) and isinstance(hopt.method, bl.FirstOrder)
    i, o = hopt.inner_optimizer.defaults, hopt.outer_optimizer.defaults
    assert (type(hopt.inner_optimizer), i["lr"], i["momentum"], i["weight_decay"]) == (torch.optim.SGD, 0.025, 0.9, 3e-4)
    assert (type(hopt.outer_optimizer), o["lr"], o["betas"], o["weight_decay"]) == (torch.optim.Adam, 3e-4, (0.5, 0.999), 1e-3)
    before = {k: v.detach().clone() for k, v in alphas.items()}
    hopt.step(batch)
    hopt.step(batch)
    assert hopt.hyper_steps == 1 and any(not torch.equal(before[k], v) for k, v in alphas.items())
    # the default loss is cross-entropy of model(x): the first-order hypergradient is its α-gradient
    hg, _ = hopt.hypergradient(batch, val)
    ref = torch.autograd.grad(F.cross_entropy(net(val[0]), val[1]), list(alphas.values()))
    assert all(torch.allclose(hg[k], r, rtol=1e-10, atol=1e-12) for k, r in zip(alphas, ref))
    with pytest.raises(ValueError, match="architecture weights"):
        bl.nas.darts(nn.Linear(2, 2))


def test_reduction_cells_2d_shapes():
    net = bl.nas.Network(3, 5, dim=2, C=4, layers=3)      # cells 1 and 2 reduce
    assert [c.reduction for c in net.cells] == [False, True, True]
    assert net(torch.randn(2, 3, 12, 12)).shape == (2, 5)
    child = bl.nas.Network(3, 5, dim=2, C=4, layers=3, genotype=bl.nas.derive(net))
    assert child(torch.randn(2, 3, 12, 12)).shape == (2, 5)
    with pytest.raises(ValueError, match="dim"):
        bl.nas.Network(3, 5, dim=3)
    with pytest.raises(KeyError, match="unknown primitives"):
        bl.nas.Network(3, 5, primitives=("conv_7x7",))



@pytest.mark.parametrize("dim", [1, 2])
def test_stem_kernel_keeps_the_spatial_size_and_is_validated(dim):
    shape = (2, 3, 11) if dim == 1 else (2, 3, 9, 7)
    x = torch.randn(*shape)
    for k in (1, 3, 5):
        net = bl.nas.Network(3, 5, dim=dim, C=4, layers=1, nodes=2, stem_multiplier=2, stem_kernel=k)
        conv = net.stem[0]
        assert conv.kernel_size == (k,) * dim
        assert net.stem(x).shape == (2, 8, *shape[2:])          # padding k // 2 keeps the length / size
        assert net(x).shape == (2, 5)
        child = bl.nas.Network(3, 5, dim=dim, C=4, layers=1, nodes=2, stem_multiplier=2, stem_kernel=k,
                               genotype=bl.nas.derive(net))
        assert child(x).shape == (2, 5)
    assert bl.nas.Network(3, 5, dim=dim, C=4, layers=1).stem[0].kernel_size == (3,) * dim    # default: DARTS
    for bad in (0, 2, 4, -1, 1.0, True, "3"):
        with pytest.raises(ValueError, match="stem_kernel"):
            bl.nas.Network(3, 5, dim=dim, C=4, layers=1, stem_kernel=bad)


# -- examples (smoke) -----------------------------------------------------------------------------------
def _load(name):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bilevel_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_darts_mnist1d_example_smoke():
    pytest.importorskip("mnist1d")
    out = _load("darts_mnist1d").main(smoke=True, verbose=False)
    (run,) = out["runs"]
    assert run["hyper_steps"] > 0 and run["skipped"] == 0
    assert set(run["genotype"].values()) <= set(bl.nas.PRIMITIVES)
    assert 0.0 <= run["derived_test_acc"] <= 1.0 and len(run["random_test_acc"]) >= 1
    assert math.isfinite(run["all_skip_test_acc"])


def test_darts_cifar_like_example_smoke():
    out = _load("darts_cifar_like").main(smoke=True, verbose=False)
    assert out["hyper_steps"] > 0 and out["skipped"] == 0
    assert out["derived_test_acc"] > 0.0
    assert out["n_edges"] == out["layers"] * sum(j + 2 for j in range(out["nodes"]))
