"""Second derivatives through fused kernels: weight norm (wrong in torch) and fused attention (missing).

The oracle is central differences of the gradient in float64, and the same network written with
ordinary ops.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl

DT = torch.float64


def _weight_normed(api="parametrizations"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DT)
    if api == "parametrizations":
        torch.nn.utils.parametrizations.weight_norm(model[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(model[0])
    return model


def _data(n=32, seed=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)


def _central_difference_hvp(loss, params, v, eps=1e-5):
    def grad_at(shift):
        p = {k: (params[k] + shift * v[k]).requires_grad_(True) for k in params}
        return torch.autograd.grad(loss(p), list(p.values()))
    plus, minus = grad_at(eps), grad_at(-eps)
    dense = lambda t: t.to_dense() if t.is_sparse else t         # a sparse embedding's gradient
    return {k: (dense(a) - dense(b)) / (2 * eps) for k, a, b in zip(params, plus, minus)}


@pytest.mark.parametrize("api", ["parametrizations", "hook"])
def test_core_hvp_through_weight_norm_matches_central_differences(api):
    """``bl.hvp`` through a weight-normalized layer equals central differences of the gradient
    (torch's fused op alone is off by up to ~70 % in the direction block, checked as the premise)."""
    model = _weight_normed(api)
    X, y = _data()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = lambda p: F.cross_entropy(functional_call(model, p, (X,)), y)
    gen = torch.Generator().manual_seed(5)
    v = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in params.items()}
    oracle = _central_difference_hvp(loss, params, v)
    ours = bl.hvp(lambda p: loss(p), params, v)
    for k in params:
        torch.testing.assert_close(ours[k], oracle[k], rtol=1e-6, atol=1e-8, msg=k)
    # the premise: without the replacement torch's own double backward is wrong
    p = {k: t.clone().requires_grad_(True) for k, t in params.items()}
    g = torch.autograd.grad(loss(p), list(p.values()), create_graph=True)
    raw = dict(zip(p, torch.autograd.grad(g, list(p.values()), list(v.values()))))
    assert max(float((raw[k] - oracle[k]).abs().max()) for k in params) > 1e-3


class _HandWeightNorm(torch.nn.Module):
    def __init__(self, ref):
        super().__init__()
        names = dict(ref.named_parameters())
        first = sorted((k for k in names if k.startswith("0.") and k != "0.bias"), key=lambda k: names[k].shape[1])
        self.g, self.v = (torch.nn.Parameter(names[k].detach().clone()) for k in first)
        self.b0 = torch.nn.Parameter(names["0.bias"].detach().clone())
        self.w2 = torch.nn.Parameter(names["2.weight"].detach().clone())
        self.b2 = torch.nn.Parameter(names["2.bias"].detach().clone())

    def forward(self, x):
        w = self.g * self.v / self.v.norm(dim=1, keepdim=True)
        return torch.tanh(x @ w.T + self.b0) @ self.w2.T + self.b2


@pytest.mark.parametrize("how", ["implicit-exact", "unrolled"])
def test_core_hypergradients_through_weight_norm_equal_the_hand_written_network(how):
    """``implicit_hypergrad`` (exact solve) and ``unrolled_hypergrad`` through torch's weight norm give
    the hypergradient of the same network written with ordinary ops (one global log-decay)."""
    ref = _weight_normed()
    batch = _data()
    hgs = []
    for model in (ref, _HandWeightNorm(ref)):
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        inner = lambda p, h, X, y, m=model: (F.cross_entropy(functional_call(m, p, (X,)), y)
                                             + 0.5 * h["log_decay"].exp() * sum((t ** 2).sum() for t in p.values()))
        outer = lambda p, h, X, y, m=model: F.cross_entropy(functional_call(m, p, (X,)), y)
        h = {"log_decay": torch.tensor(-3.0, dtype=DT)}
        if how == "implicit-exact":
            hg = bl.implicit_hypergrad(inner, outer, params, h, solver=bl.Exact(damping=0.1),
                                       inner_args=batch, outer_args=batch)
        else:
            hg, _ = bl.unrolled_hypergrad(inner, outer, params, h, optimizer=bl.inner.SGD(lr=0.1), steps=3,
                                          inner_args=batch, outer_args=batch)
        hgs.append(hg["log_decay"])
    assert hgs[1].abs() > 1e-6
    torch.testing.assert_close(hgs[0], hgs[1], rtol=1e-9, atol=1e-12)


def test_core_hvp_through_fused_attention_matches_central_differences():
    """``bl.hvp`` through ``nn.TransformerEncoderLayer`` (whose fused attention has no second
    derivative) runs and equals central differences of the gradient."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).to(DT)
    x = torch.randn(4, 3, 8, dtype=DT, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach().clone() for k, v in layer.named_parameters()}
    loss = lambda p: functional_call(layer, p, (x,)).tanh().sum()
    gen = torch.Generator().manual_seed(2)
    v = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in params.items()}
    ours = bl.hvp(loss, params, v)
    oracle = _central_difference_hvp(loss, params, v)
    for k in params:
        torch.testing.assert_close(ours[k], oracle[k], rtol=1e-6, atol=1e-8, msg=k)


def test_the_replacements_are_scoped_and_reentrant():
    """Nested blocks work, and after the block (also after an exception in it) the fused weight norm
    and the attention backends are back."""
    from bilevel import _second_order

    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
    calls = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.norm_except_dim:
                calls.append(func)
            return func(*args, **(kwargs or {}))

    v, g = torch.randn(4, 3), torch.rand(4, 1)
    with pytest.raises(RuntimeError, match="boom"), Spy():      # the spy sees what the replacement calls
        with bl.twice_differentiable_kernels():
            with bl.twice_differentiable_kernels():
                assert not torch.backends.cuda.flash_sdp_enabled()
                inside = torch._weight_norm(v, g, 0)
            raise RuntimeError("boom")
    assert calls and _second_order._DEPTH == 0 and torch._weight_norm is _second_order._FUSED_WEIGHT_NORM
    assert F.embedding_bag is _second_order._FUSED_EMBEDDING_BAG
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()) == before
    calls.clear()
    with Spy():
        outside = torch._weight_norm(v, g, 0)
    assert not calls
    torch.testing.assert_close(inside, outside)


def test_blocks_open_in_two_threads_restore_the_fused_op_when_the_last_closes():
    """Thread A opens, B opens, A closes (B still inside: the formula must stay), B closes."""
    import threading

    from bilevel import _second_order

    a_open, b_open, a_closed = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with bl.twice_differentiable_kernels():
            a_open.set()
            b_open.wait(5)
        a_closed.set()

    def b():
        a_open.wait(5)
        with bl.twice_differentiable_kernels():
            b_open.set()
            a_closed.wait(5)
            seen["inside_after_a"] = (torch._weight_norm is _second_order.weight_norm_formula
                                      and F.embedding_bag is _second_order.embedding_bag_formula)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["inside_after_a"] and torch._weight_norm is _second_order._FUSED_WEIGHT_NORM


@pytest.mark.parametrize("api", ["parametrizations", "hook"])
@pytest.mark.parametrize("method", [bl.Implicit(solver=bl.Exact(damping=0.1)), bl.Unrolled(steps=3)],
                         ids=["implicit-exact", "unrolled"])
def test_hyper_steps_through_weight_norm_equal_the_hand_written_network(api, method):
    """``HyperOptimizer`` (inner steps with the fused op, hyper steps with the formula) through a
    weight-normalized layer of either torch API gives the hypergradient of the same network written
    by hand (float64, one global decay)."""
    ref = _weight_normed(api)
    batch = _data()
    loss = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])
    hgs = []
    for model in (ref, _HandWeightNorm(ref)):
        hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="model")
        hp = {k: v.double().detach().requires_grad_(True) for k, v in hp.items()}
        hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=pen, method=method,
                                 inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1))
        for _ in range(3):
            hopt.inner_step(batch)
        hg, _ = hopt.hypergradient(batch, batch)
        hgs.append(torch.cat([v.reshape(-1) for v in hg.values()]))
    assert hgs[1].abs().max() > 1e-6
    torch.testing.assert_close(hgs[0], hgs[1], rtol=1e-9, atol=1e-12)


def test_implicit_diff_backward_through_weight_norm_equals_the_hand_written_network():
    """The derivative rule of ``@bl.implicit_diff`` runs later, in the caller's ``backward()``: it too
    takes the formula of weight norm (the solver itself runs the fused op). Exact solve, float64."""
    ref = _weight_normed()
    X, y = _data()
    grads = []
    for model in (ref, _HandWeightNorm(ref)):
        start = {k: v.detach().clone() for k, v in model.named_parameters()}

        def inner(p, h, m=model):
            return F.cross_entropy(functional_call(m, p, (X,)), y) + 0.5 * h["log_decay"].exp() * sum(
                (t ** 2).sum() for t in p.values())

        def solve(h, m=model, start=start):                    # fixed full-batch gradient steps
            p = {k: v.clone() for k, v in start.items()}
            for _ in range(5):
                q = {k: v.requires_grad_(True) for k, v in p.items()}
                g = torch.autograd.grad(inner(q, h), list(q.values()))
                p = {k: v.detach() - 0.1 * gk for (k, v), gk in zip(q.items(), g)}
            return p

        h = {"log_decay": torch.tensor(-3.0, dtype=DT, requires_grad=True)}
        w = bl.implicit_diff(inner, solver=bl.Exact(damping=0.1))(solve)(h)
        F.cross_entropy(functional_call(model, w, (X,)), y).backward()
        grads.append(h["log_decay"].grad)
    assert grads[1].abs() > 1e-6
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


class _LastStep(torch.nn.Module):
    """A recurrent layer, its last step, a linear head."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.head = rnn, torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _attention_head():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.head = torch.nn.MultiheadAttention(6, 2, batch_first=True), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.att(x, x, x)[0].mean(1))
    return Head()


nn = torch.nn
LAYERS = {
    "layer-norm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)), (10, 6)),
    "rms-norm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.Tanh(), nn.Linear(8, 3)), (10, 6)),
    "batch-norm (train)": (lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)),
                           (10, 6)),
    "group-norm, conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(),
                                                 nn.Linear(16, 3)), (10, 2, 6)),
    "conv2d, max-pool": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)),
                         (10, 1, 6, 6)),
    "gelu, adaptive avg-pool": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(2),
                                                      nn.Flatten(), nn.Linear(12, 3)), (10, 1, 5, 5)),
    "silu, mish, elu": (lambda: nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 8), nn.Mish(), nn.Linear(8, 8),
                                              nn.ELU(), nn.Linear(8, 3)), (10, 6)),
    "lstm": (lambda: _LastStep(nn.LSTM(6, 8, batch_first=True)), (10, 4, 6)),
    "gru": (lambda: _LastStep(nn.GRU(6, 8, batch_first=True)), (10, 4, 6)),
    "multi-head attention (weights)": (_attention_head, (10, 4, 6)),
    "orthogonal parametrization": (lambda: nn.Sequential(nn.utils.parametrizations.orthogonal(nn.Linear(6, 6)),
                                                         nn.Tanh(), nn.Linear(6, 3)), (10, 6)),
    "conv-transpose, upsample": (lambda: nn.Sequential(nn.ConvTranspose1d(2, 3, 3), nn.Upsample(scale_factor=2,
                                                       mode="linear"), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)),
                                 (10, 2, 6)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_hvp_through_common_layers_matches_central_differences(name):
    """``bl.hvp`` through common layer types equals central differences of the gradient (float64,
    error relative to the largest entry: a block whose curvature is exactly zero, such as a bias
    before batch norm, is judged on that scale). Guards against a fused kernel with a wrong second
    derivative, as weight norm's was."""
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    model = make().to(DT)
    x = torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (shape[0],), generator=torch.Generator().manual_seed(2))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = lambda p: F.cross_entropy(functional_call(model, p, (x,)), y)
    gen = torch.Generator().manual_seed(3)
    v = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in params.items()}
    ours, oracle = bl.hvp(loss, params, v), _central_difference_hvp(loss, params, v)
    scale = max(float(t.abs().max()) for t in oracle.values())
    assert scale > 1e-3
    assert max(float((ours[k] - oracle[k]).abs().max()) for k in params) <= 1e-6 * scale


@pytest.mark.parametrize("case", ["2d-mean", "2d-sum-weights", "offsets-mean-empty-bag", "last-offset-sum",
                                  "padding-mean", "2d-max (fused)"])
def test_embedding_bag_formula_equals_the_fused_op(case):
    """The twice-differentiable embedding bag gives torch's values in every input form it takes."""
    from bilevel._second_order import embedding_bag_formula

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 5, generator=gen, dtype=DT)
    kw = {}
    if case.startswith("2d"):
        inp = torch.randint(0, 12, (4, 3), generator=gen)
        kw["mode"] = "sum" if "sum" in case else "max" if "max" in case else "mean"
        if "weights" in case:
            kw["per_sample_weights"] = torch.rand(4, 3, generator=gen, dtype=DT)
    else:
        inp = torch.randint(0, 12, (9,), generator=gen)
        inp[[1, 5]] = 0
        kw["offsets"] = torch.tensor([0, 2, 2, 6]) if "last" not in case else torch.tensor([0, 2, 2, 6, 9])
        kw["include_last_offset"] = "last" in case
        kw["mode"] = "sum" if "sum" in case else "mean"
        if "padding" in case:
            kw["padding_idx"] = 0
    ours = embedding_bag_formula(inp, weight, **kw)
    torch.testing.assert_close(ours, F.embedding_bag(inp, weight, **kw), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_bag_model_hypergradient_equals_the_hand_written_network(sparse):
    """``nn.EmbeddingBag`` has no second derivative in torch; a ``HyperOptimizer`` hyper step through
    it (implicit, exact solve) equals the one through ``nn.Embedding`` and a mean written by hand,
    and ``bl.hvp`` through it equals central differences."""
    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.bag = torch.nn.EmbeddingBag(20, 4, mode="mean", sparse=sparse)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.bag(x)))

    class Hand(torch.nn.Module):
        def __init__(self, ref):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 4)
            self.emb.weight = torch.nn.Parameter(ref.bag.weight.detach().clone())
            self.head = torch.nn.Linear(4, 3)
            self.head.load_state_dict(ref.head.state_dict())

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x).mean(1)))

    gen = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 20, (16, 3), generator=gen), torch.randint(0, 3, (16,), generator=gen))
    loss = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])
    hgs, ref = [], Bag().to(DT)
    for model in (ref, Hand(ref).to(DT)):
        hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="model")
        hp = {k: v.double().detach().requires_grad_(True) for k, v in hp.items()}
        hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=pen,
                                 method=bl.Implicit(solver=bl.Exact(damping=0.1)),
                                 inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1))
        hopt.inner_step(batch)
        hg, _ = hopt.hypergradient(batch, batch)
        hgs.append(torch.cat([v.reshape(-1) for v in hg.values()]))
    assert hgs[1].abs().max() > 1e-6
    torch.testing.assert_close(hgs[0], hgs[1], rtol=1e-9, atol=1e-12)
    params = {k: v.detach().clone() for k, v in ref.named_parameters()}
    f = lambda p: F.cross_entropy(functional_call(ref, p, (batch[0],)), batch[1])
    v = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in params.items()}
    ours, oracle = bl.hvp(f, params, v), _central_difference_hvp(f, params, v)
    for k in params:
        torch.testing.assert_close(ours[k], oracle[k], rtol=1e-6, atol=1e-8, msg=k)
