"""Replay mode (k-ary tree of stored states) against full reverse mode, its stated budgets, and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl

from conftest import tree_rel_err
from test_methods import _setup
from test_unroll import mlp_problem, quadratic

DT = torch.float64
OPTS = {
    "sgd": bl.inner.SGD(lr=0.1),
    "momentum": bl.inner.SGD(lr=0.1, momentum=0.9, nesterov=True),
    "adam": bl.inner.Adam(lr=0.02, decoupled=False, weight_decay=0.01),
    "adamw": bl.inner.AdamW(lr=0.02),
}


def depth(T, k):
    """⌈log_k T⌉ in integers (the smallest D with k^D >= T)."""
    D = 0
    while k ** D < T:
        D += 1
    return D


@pytest.mark.parametrize("opt", list(OPTS.values()), ids=list(OPTS))
@pytest.mark.parametrize("T,k", [(9, 2), (10, 3)])
def test_replay_equals_reverse_with_minibatches_and_dropout(opt, T, k):
    net, params, hparams, inner, outer, batches, val = mlp_problem(dropout=0.3)
    results = {}
    for mode in ("reverse", "replay"):
        torch.manual_seed(123)                                     # same dropout masks in each run
        hg, w = bl.unrolled_hypergrad(inner, outer, params, hparams, optimizer=opt, steps=T, mode=mode,
                                      replay_k=k, inner_args=batches, outer_args=val)
        results[mode] = (hg, w, torch.rand(1))                     # the RNG continues as after a plain run
    (ref, w_ref, after_ref), (hg, w, after) = results["reverse"], results["replay"]
    assert tree_rel_err(hg, ref) < 1e-10
    assert tree_rel_err(w, w_ref) == 0.0 and torch.equal(after, after_ref)
    D = depth(T, k)
    assert hg.info.mode == "replay" and hg.info.replay_k == k
    assert hg.info.stored_states_max <= k * D + 1
    assert hg.info.forward_steps <= (1 + D) * T
    assert hg.info.inner_loss == ref.info.inner_loss and hg.info.inner_grad_norm == ref.info.inner_grad_norm
    assert hg.info.state.step == ref.info.state.step


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_replay_budgets_counted_by_the_loss_itself(k):
    # an independent count: how often inner_loss is called (one call per evaluated step)
    A, B, t, lam, w0, inner, outer = quadratic()
    for T in [1, 2, 3, 5, 8, 9, 16, 17, 27, 50]:
        calls = []
        counted = lambda p, h: calls.append(1) or inner(p, h)
        ref, _ = bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, optimizer=bl.inner.SGD(lr=0.05),
                                       steps=T)
        hg, _ = bl.unrolled_hypergrad(counted, outer, {"w": w0}, {"l": lam}, optimizer=bl.inner.SGD(lr=0.05),
                                      steps=T, mode="replay", replay_k=k)
        D = depth(T, k)
        assert len(calls) == hg.info.forward_steps <= (1 + D) * T, (T, k)
        assert 1 <= hg.info.stored_states_max <= k * D + 1, (T, k)
        assert tree_rel_err(hg, ref) < 1e-12, (T, k)


def test_replay_stores_far_fewer_states_than_checkpoint_on_long_runs():
    A, B, t, lam, w0, inner, outer = quadratic()
    kw = dict(optimizer=bl.inner.SGD(lr=0.05, momentum=0.5), steps=200)
    rep, _ = bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, mode="replay", **kw)
    ck, _ = bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, mode="checkpoint", **kw)
    rev, _ = bl.unrolled_hypergrad(inner, outer, {"w": w0}, {"l": lam}, **kw)
    assert rep.info.stored_states_max <= 2 * 8 + 1 < ck.info.stored_states_max   # ⌈log2 200⌉ = 8; ⌈√200⌉ = 15: 14 + 15
    assert tree_rel_err(rep, rev) < 1e-10 and tree_rel_err(ck, rev) < 1e-10


def test_replay_with_truncation_and_a_continued_state():
    _, params, hparams, inner, outer, batches, val = mlp_problem()
    kw = dict(optimizer=bl.inner.Adam(lr=0.01), steps=15, truncate=11, inner_args=batches, outer_args=val)
    ref, w_ref = bl.unrolled_hypergrad(inner, outer, params, hparams, **kw)
    hg, w = bl.unrolled_hypergrad(inner, outer, params, hparams, mode="replay", replay_k=3, **kw)
    assert tree_rel_err(hg, ref) < 1e-10 and tree_rel_err(w, w_ref) == 0.0
    assert hg.info.differentiated == 11 and hg.info.forward_steps <= 4 + (1 + depth(11, 3)) * 11


def test_hyperoptimizer_offers_replay():
    a, *_, train, val = _setup(bl.Unrolled(steps=6))
    b, *_ = _setup(bl.Unrolled(steps=6, mode="replay", replay_k=3))
    ha, _ = a.hypergradient(train, val)
    hb, sb = b.hypergradient(train, val)
    assert tree_rel_err(hb, ha) < 1e-10 and sb.method == "Unrolled"
    for bad in (1, 0, 2.0, True, "2"):
        with pytest.raises(ValueError, match=r"Invalid replay_k for bilevel.Unrolled: .*expected an int >= 2"):
            bl.Unrolled(steps=4, mode="replay", replay_k=bad)


# -- bad input: a clear error, and nothing changed ------------------------------------------------
def _problem():
    A, B, t, lam, w0, inner, outer = quadratic()
    X = torch.randn(30, 6, dtype=DT, generator=torch.Generator().manual_seed(3))
    inner_b = lambda p, h, Xb: inner(p, h) + 0.1 * (Xb @ p["w"]).pow(2).mean()
    return inner_b, outer, {"w": w0}, {"l": lam}, X


def _refuses(match, exc=RuntimeError, **kw):
    inner, outer, params, hp, X = _problem()
    before = {k: v.clone() for k, v in params.items()}
    torch.manual_seed(5)
    with pytest.raises(exc, match=match):
        bl.unrolled_hypergrad(inner, outer, params, hp, optimizer=bl.inner.SGD(lr=0.05), mode="replay",
                              **{"steps": 9, **kw, "inner_args": kw["inner_args"](X) if "inner_args" in kw else ()})
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1)), "a failed call must leave the RNG as it found it"
    assert all(torch.equal(params[k], before[k]) for k in params)


def test_replay_refuses_a_batch_that_is_not_a_function_of_t():
    # a generator never reseeded: another batch each time step t is asked for
    def unseeded(X):
        g = torch.Generator().manual_seed(0)
        return lambda t: (X[torch.randint(0, 30, (8,), generator=g)],)
    _refuses(r"mode='replay' recomputed step \d+ .*bit-exact on the CPU.*inner_args\(t\) depend only on t",
             inner_args=unseeded)


def test_replay_refuses_a_batch_callable_that_mutates_state():
    def drifting(X):
        scale = [1.0]
        def batch(t):
            scale[0] *= 1.01                                    # state outside params, changed by each call
            return (X[:8] * scale[0],)
        return batch
    _refuses(r"got the inner loss .* but .* in the training run", inner_args=drifting)


def test_replay_refuses_a_batch_that_fails_on_replay():
    def once(X):
        it = iter([(X[i:i + 8],) for i in range(9)])            # an iterator that runs out after the run
        return lambda t: next(it)
    _refuses(r"mode='replay' recomputes step \d+ .*raised StopIteration.*pure function of t", inner_args=once)


@pytest.mark.parametrize("bad", [1, 0, -2, 2.5, True, None])
def test_replay_k_and_steps_validation(bad):
    _refuses(r"Invalid replay_k for bilevel.unrolled_hypergrad: .* \(expected an int >= 2", ValueError, replay_k=bad)


def test_steps_must_be_positive_with_a_fix():
    _refuses(r"Invalid steps for bilevel.unrolled_hypergrad: 0 \(expected an int >= 1.*Fix: pass e.g. steps=100",
             ValueError, steps=0)
