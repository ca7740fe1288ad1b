import math

import pytest
import torch

import bilevel as bl
from bilevel import hparams as H

from conftest import rel_err

DT = torch.float64


@pytest.mark.parametrize("kind", ["exp", "softplus"])
def test_positive_roundtrip(kind):
    v = torch.tensor([1e-6, 0.3, 5.0, 40.0], dtype=DT)
    assert rel_err(H.positive(H.inverse_positive(v, kind), kind), v) < 1e-12
    with pytest.raises(ValueError, match="> 0"):
        H.inverse_positive(torch.tensor([0.0]), kind)
    p = torch.tensor([0.01, 0.5, 0.99], dtype=DT)
    assert rel_err(H.probability(H.inverse_probability(p)), p) < 1e-12


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).to(DT)


@pytest.mark.parametrize("per,n", [("parameter", 3 * 4 + 4 + 4 * 2 + 2), ("tensor", 4), ("model", 1)])
def test_weight_decay_tree_and_penalty(per, n):
    m = _model()
    hp, pen = H.weight_decay(m, init=1e-2, per=per)
    assert sum(v.numel() for v in hp.values()) == n and all(v.requires_grad for v in hp.values())
    params = dict(m.named_parameters())
    ref = 0.5 * 1e-2 * sum((p ** 2).sum() for p in params.values())
    assert math.isclose(float(pen(m, hp).detach()), float(ref.detach()), rel_tol=1e-12)
    assert math.isclose(float(pen(params, hp).detach()), float(ref.detach()), rel_tol=1e-12)


@pytest.mark.parametrize("per", ["parameter", "tensor", "model"])
@pytest.mark.parametrize("kind", ["exp", "softplus"])
def test_closed_forms_match_autograd(per, kind):
    m = _model()
    hp, pen = H.weight_decay(m, init=3e-2, per=per, kind=kind, exclude=("2.bias",))
    hp = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in hp.items()}
    params = {k: v.detach() for k, v in m.named_parameters()}
    u = {k: torch.randn_like(v) for k, v in params.items()}
    ref = bl.mixed_vjp(lambda p, h: pen(p, h), params, hp, u)
    got = pen.mixed_closed_form(params, hp, u)
    for k in hp:
        assert rel_err(got[k], ref[k]) < 1e-12, k
    assert "weight_decay/2.bias" not in hp
    # the gradient decay ⊙ w, without a graph
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    ref_grad = torch.autograd.grad(pen(leaves, hp), list(leaves.values()), allow_unused=True)
    grad = pen.gradient(params, hp)
    assert set(grad) == set(params) - {"2.bias"}
    for k, r in zip(params, ref_grad):
        assert k not in grad or (rel_err(grad[k], r) < 1e-12 and not grad[k].requires_grad), k


def test_example_weights_normalized():
    hp = H.example_weights(10, dtype=DT)
    logits = hp["example_logits"].detach() + torch.randn(10, dtype=DT)
    for kind in ["softmax", "sigmoid"]:
        w = H.normalized_weights(logits[[1, 3, 5]], kind)
        assert w.shape == (3,) and math.isclose(float(w.mean()), 1.0, rel_tol=1e-12) and (w > 0).all()
    losses = torch.rand(3, dtype=DT)
    assert math.isclose(float(H.weighted_mean(losses, torch.zeros(3, dtype=DT))), float(losses.mean()), rel_tol=1e-12)
    with pytest.raises(bl.ShapeError, match="reduction='none'"):
        H.weighted_mean(losses.mean(), torch.zeros(3, dtype=DT))


def test_errors():
    with pytest.raises(ValueError, match="per"):
        H.weight_decay(_model(), per="layer")
    with pytest.raises(ValueError, match="Invalid init"):
        H.weight_decay(_model(), init=0.0)
    with pytest.raises(bl.ShapeError, match="at least one"):
        H.weight_decay(_model(), exclude=("",))


# --------------------------------------------------------------------------- shared global log-decay
def _perturbed(hp, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {k: v.detach() + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in hp.items()}


@pytest.mark.parametrize("shared", [True, "module", "tensor"])
@pytest.mark.parametrize("per", ["parameter", "tensor"])
@pytest.mark.parametrize("kind", ["exp", "softplus"])
def test_shared_decay_is_the_plain_decay_of_g_plus_offset(shared, per, kind):
    """Oracle: the non-shared penalty with raw_i = g + δ_i; at the start (δ = 0) the same penalty."""
    m = _model()
    params = {k: v.detach() for k, v in m.named_parameters()}
    hp, pen = H.weight_decay(m, init=2e-2, per=per, kind=kind, exclude=("0.bias",), shared=shared)
    plain_hp, plain = H.weight_decay(m, init=2e-2, per=per, kind=kind, exclude=("0.bias",))
    assert math.isclose(float(pen(params, hp).detach()), float(plain(params, plain_hp).detach()), rel_tol=1e-12)
    offsets = {k for k in hp if "/global" not in k}
    assert offsets == set(plain_hp) and all(float(hp[k].abs().max()) == 0 for k in offsets)
    n_groups = {True: 1, "module": 2, "tensor": 3}[shared]
    assert len(hp) - len(offsets) == n_groups and pen.decay_keys == []
    hp = _perturbed(hp)
    raw = {plain.keys[n]: pen.raw(hp, n).expand_as(hp[pen.keys[n]]) for n in pen.keys}
    assert math.isclose(float(pen(params, hp).detach()), float(plain(params, raw).detach()), rel_tol=1e-12)
    for n, d in pen.hessian_diag(params, hp).items():
        assert rel_err(d, plain.hessian_diag(params, raw)[n]) < 1e-14
    # the closed-form gradient in the weights against autograd of the shared penalty
    live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = torch.autograd.grad(pen(live, hp), list(live.values()), allow_unused=True)
    got = pen.gradient(params, hp)
    for (n, _), r in zip(live.items(), ref):
        if n in pen.keys:
            assert rel_err(got[n], r) < 1e-14, n


@pytest.mark.parametrize("shared", [True, "module", "tensor"])
@pytest.mark.parametrize("per", ["parameter", "tensor"])
@pytest.mark.parametrize("kind", ["exp", "softplus"])
def test_shared_mixed_vjp_matches_autograd(shared, per, kind):
    m = _model()
    hp, pen = H.weight_decay(m, init=3e-2, per=per, kind=kind, shared=shared)
    hp = _perturbed(hp)
    params = {k: v.detach() for k, v in m.named_parameters()}
    u = {k: torch.randn_like(v) for k, v in params.items()}
    ref = bl.mixed_vjp(lambda p, h: pen(p, h), params, hp, u)
    got = pen.mixed_vjp(params, hp, u)
    assert set(got) == set(hp)
    for k in hp:
        assert got[k].shape == hp[k].shape and rel_err(got[k], ref[k]) < 1e-12, k
    # the chain rule of raw_i = g + δ_i: each global's gradient is the sum of its offsets' gradients
    if shared is True:
        assert rel_err(got["weight_decay/global"], sum(got[k].sum() for k in hp if "/global" not in k)) < 1e-12


def test_shared_implicit_hypergradient_against_dense_solve_and_finite_differences():
    """Ridge regression with log λ_i = g_layer + δ_i: w*(λ) in closed form (a dense solve in float64);
    the implicit hypergradient (bl.Exact) against central finite differences of L_V(w*(λ))."""
    gen = torch.Generator().manual_seed(0)
    n, d = 40, 6
    X, Xv = torch.randn(n, d, generator=gen, dtype=DT), torch.randn(30, d, generator=gen, dtype=DT)
    w_true = torch.randn(d, generator=gen, dtype=DT)
    y = X @ w_true + 0.5 * torch.randn(n, generator=gen, dtype=DT)
    yv = Xv @ w_true + 0.5 * torch.randn(30, generator=gen, dtype=DT)
    tree = {"a.w": torch.zeros(4, dtype=DT), "b.w": torch.zeros(2, dtype=DT)}
    hp, pen = H.weight_decay(tree, init=0.3, shared="module")
    hp = _perturbed(hp, seed=3)
    assert set(hp) == {"weight_decay/a.w", "weight_decay/b.w", "weight_decay/global/a", "weight_decay/global/b"}

    def split(w):
        return {"a.w": w[:4], "b.w": w[4:]}

    def w_star(h):
        lam = torch.cat([pen.decays(h)["a.w"].expand(4), pen.decays(h)["b.w"].expand(2)])
        return torch.linalg.solve(X.T @ X / n + torch.diag(lam), X.T @ y / n)

    def inner(p, h):
        w = torch.cat([p["a.w"], p["b.w"]])
        return 0.5 * ((X @ w - y) ** 2).mean()

    def outer(p, h):
        w = torch.cat([p["a.w"], p["b.w"]])
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    hg = bl.implicit_hypergrad(inner, outer, split(w_star(hp)), hp, solver=bl.Exact(), penalty=pen)
    eps = 1e-6
    for k, v in hp.items():
        for i in range(v.numel()):
            e = torch.zeros_like(v).reshape(-1)
            e[i] = eps
            plus = {**hp, k: v + e.reshape(v.shape)}
            minus = {**hp, k: v - e.reshape(v.shape)}
            fd = (outer(split(w_star(plus)), plus) - outer(split(w_star(minus)), minus)) / (2 * eps)
            assert abs(float(hg[k].reshape(-1)[i]) - float(fd)) < 1e-7 * max(1.0, abs(float(fd))), (k, i)


def test_shared_groups_and_errors():
    m = _model()
    assert H.shared_groups(m) == {n: "" for n, _ in m.named_parameters()}
    assert H.shared_groups(m, by="module", exclude=("bias",)) == {"0.weight": "0", "2.weight": "2"}
    assert H.shared_groups(m, by="tensor", exclude=("0.",)) == {"2.weight": "2.weight", "2.bias": "2.bias"}
    groups = {"0.weight": "in", "0.bias": "in", "2.weight": "out", "2.bias": "out"}
    hp, pen = H.weight_decay(m, shared=groups)
    assert {k for k in hp if "/global" in k} == {"weight_decay/global/in", "weight_decay/global/out"}
    assert pen.shared["2.bias"] == "weight_decay/global/out"
    with pytest.raises(ValueError, match="per='model'"):
        H.weight_decay(m, per="model", shared=True)
    with pytest.raises(ValueError, match="shared_groups"):
        H.weight_decay(m, shared={"0.weight": "a"})
    with pytest.raises(ValueError, match="expected shared"):
        H.weight_decay(m, shared="layer")
    with pytest.raises(ValueError, match="expected by"):
        H.shared_groups(m, by="layer")


def test_shared_trajectory_summary_keeps_offsets_raw():
    hp, pen = H.weight_decay({"w": torch.ones(3, dtype=DT)}, init=0.5, shared=True)
    s = bl.trajectory.hparam_summary(hp, pen)
    assert s["weight_decay/w/mean"] == 0.0 and math.isclose(s["weight_decay/global/mean"], math.log(0.5))
