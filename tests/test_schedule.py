"""Per-step hyperparameters (bl.inner.Schedule): a learned learning-rate schedule against finite
differences, and a constant schedule against the scalar learning rate."""

import pytest
import torch

import bilevel as bl

from conftest import tree_rel_err
from test_unroll import mlp_problem

DT = torch.float64
OPTS = {"sgd": lambda lr: bl.inner.SGD(lr=lr, momentum=0.9), "adam": lambda lr: bl.inner.Adam(lr=lr)}


@pytest.mark.parametrize("mode", ["reverse", "replay", "forward"])
@pytest.mark.parametrize("kind", list(OPTS))
def test_constant_schedule_equals_scalar_lr(kind, mode):
    # d/dη of a run at η for every step = the sum of the per-step derivatives
    _, params, hparams, inner, outer, batches, val = mlp_problem()
    T, eta = 7, 0.05
    inner_b = lambda p, h, X, y: inner(p, hparams, X, y)
    kw = dict(steps=T, mode=mode, inner_args=batches, outer_args=val)
    ref, w_ref = bl.unrolled_hypergrad(inner_b, outer, params, {"lr": torch.tensor(eta, dtype=DT)},
                                       optimizer=OPTS[kind]("lr"), **kw)
    for block, n in [(1, T), (3, 3)]:
        hg, w = bl.unrolled_hypergrad(inner_b, outer, params, {"lr": torch.full((n,), eta, dtype=DT)},
                                      optimizer=OPTS[kind](bl.inner.Schedule("lr", block=block)), **kw)
        assert hg["lr"].shape == (n,)
        assert tree_rel_err(w, w_ref) == 0.0
        assert abs(float(hg["lr"].sum() - ref["lr"])) <= 1e-10 * abs(float(ref["lr"]))


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("block", [1, 2])
def test_per_step_lr_gradient_equals_finite_differences(kind, block):
    _, params, hparams, inner, outer, batches, val = mlp_problem()
    T = 6
    n = -(-T // block)
    lrs = torch.linspace(0.08, 0.02, n, dtype=DT) * (0.2 if kind == "adam" else 1.0)
    inner_b = lambda p, h, X, y: inner(p, hparams, X, y)
    opt = OPTS[kind](bl.inner.Schedule("lr", block=block))
    kw = dict(optimizer=opt, steps=T, inner_args=batches, outer_args=val, mode="replay")
    hg, _ = bl.unrolled_hypergrad(inner_b, outer, params, {"lr": lrs}, **kw)
    eps = 1e-6
    for i in range(n):
        d = torch.zeros(n, dtype=DT)
        d[i] = eps
        up = bl.unrolled_hypergrad(inner_b, outer, params, {"lr": lrs + d}, **kw)[0].info.outer_loss
        dn = bl.unrolled_hypergrad(inner_b, outer, params, {"lr": lrs - d}, **kw)[0].info.outer_loss
        fd = (up - dn) / (2 * eps)
        assert abs(float(hg["lr"][i]) - fd) <= 1e-6 * max(1e-3, abs(fd)), (i, float(hg["lr"][i]), fd)


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"Invalid block for bilevel.inner.Schedule: 0"):
        bl.inner.Schedule("lr", block=0)
    with pytest.raises(ValueError, match=r"expected the name of a hparams entry"):
        bl.inner.Schedule("")
    inner = lambda p, h: ((p["w"] - 1) ** 2).sum()
    opt = bl.inner.SGD(lr=bl.inner.Schedule("lr", block=2))
    with pytest.raises(ValueError, match=r"covering step 4 \(n_blocks > 2\), got shape \(2,\)"):
        bl.unrolled_hypergrad(inner, inner, {"w": torch.zeros(2)}, {"lr": torch.full((2,), 0.1)},
                              optimizer=opt, steps=5)
    with pytest.raises(KeyError, match=r"\['lr'\]"):
        bl.unrolled_hypergrad(inner, inner, {"w": torch.zeros(2)}, {"c": torch.zeros(())}, optimizer=opt, steps=4)
