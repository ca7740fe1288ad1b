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
