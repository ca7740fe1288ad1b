"""Hard failures: fault injection into hyper steps (everything stays as before) and fuzzed bad
inputs to the public API (a clear error naming the function, what was expected and what came,
and no input modified)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bilevel as bl

from conftest import nested_equal

DT = torch.float64


# -- fault injection: exceptions at any point of a hyper step leave everything as it was -------------
class Boom(RuntimeError):
    pass


def _snapshot(hopt):
    return copy.deepcopy({
        "model": {k: v.detach().clone() for k, v in hopt.model.state_dict().items()},
        "hparams": {k: v.detach().clone() for k, v in hopt.hparams.items()},
        "hgrads": {k: (None if v.grad is None else v.grad.clone()) for k, v in hopt.hparams.items()},
        "inner": hopt.inner_optimizer.state_dict(),
        "outer": hopt.outer_optimizer.state_dict(),
        "counters": (hopt.inner_steps, hopt.hyper_steps, hopt.skipped),
    })


def _hopt(method, fail_inner_at=None, fail_outer=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="tensor")
    calls = {"inner": 0}

    def inner(m, h, b):
        calls["inner"] += 1
        if fail_inner_at is not None and calls["inner"] >= fail_inner_at:
            raise Boom(f"inner loss call {calls['inner']}")
        return F.cross_entropy(m(b[0]), b[1])

    def outer(m, h, b):
        if fail_outer:
            raise Boom("outer loss")
        return F.cross_entropy(m(b[0]), b[1])

    hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer, penalty=pen,
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=0.1), method=method)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 4, generator=g, dtype=DT), torch.randint(0, 2, (16,), generator=g))
    for _ in range(2):
        hopt.inner_step(batch)
    hopt.hyper_step(batch, batch)              # optimizer states exist
    return hopt, batch, calls


METHODS = [bl.Implicit(solver=bl.CG(maxiter=5, damping=1.0)), bl.Implicit(solver=bl.CG(maxiter=5, damping=1.0),
                                                                           hvp_mode="forward"),
           bl.Unrolled(steps=3), bl.Unrolled(steps=4, mode="checkpoint"), bl.FirstOrder()]


@pytest.mark.parametrize("method", METHODS, ids=["cg", "cg-forward", "unrolled", "checkpoint", "first-order"])
@pytest.mark.parametrize("where", ["outer", "inner-first", "inner-later", "outer-optimizer"])
def test_exception_anywhere_in_a_hyper_step_changes_nothing(method, where):
    hopt, batch, calls = _hopt(method)
    # how often a hyper step calls the inner loss: never (first order), once (a reused graph)
    n0 = calls["inner"]
    hopt.hyper_step(batch, batch)
    n_calls = calls["inner"] - n0
    if (where == "inner-first" and n_calls == 0) or (where == "inner-later" and n_calls < 3):
        pytest.skip(f"this method calls the inner loss {n_calls} time(s) per hyper step")
    if where == "outer":
        hopt.outer_loss = lambda m, h, b: (_ for _ in ()).throw(Boom("outer"))
    elif where.startswith("inner"):
        start = calls["inner"]
        k = 1 if where == "inner-first" else 3            # inside the products / later unrolled steps

        def inner(m, h, b, _orig=hopt.inner_loss):
            if calls["inner"] - start + 1 >= k:
                raise Boom("inner")
            return _orig(m, h, b)
        hopt.inner_loss = inner
    else:
        orig_step = hopt.outer_optimizer.step

        def step(*a, **kw):
            orig_step(*a, **kw)                            # hparams and state already changed...
            raise Boom("outer optimizer")                  # ...then it fails
        hopt.outer_optimizer.step = step
    before = _snapshot(hopt)
    with pytest.raises(Boom):
        hopt.hyper_step(batch, batch)
    assert nested_equal(before, _snapshot(hopt))


def test_exception_in_inner_step_changes_nothing():
    hopt, batch, _ = _hopt(bl.FirstOrder())
    hopt.penalty = lambda p, h: (_ for _ in ()).throw(Boom("penalty"))
    before = _snapshot(hopt)
    with pytest.raises(Boom):
        hopt.inner_step(batch)
    assert nested_equal(before, _snapshot(hopt))


# -- fuzzed bad inputs -------------------------------------------------------------------------------
def _quad(p, h, X):
    return ((X @ p["w"]) ** 2).mean() + (h["l"].exp() * p["w"] ** 2).sum()


def _outer(p, h, X):
    return (X @ p["w"]).mean()


BAD = ["wrong-shape-v", "int-params", "empty-params", "empty-hparams", "nonscalar-inner", "nonscalar-outer",
       "hparam-unused", "not-a-dict", "nan-params", "mixed-dtypes", "meta-device", "requires-int-hparam"]


def _case(kind, d, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(7, d, generator=g, dtype=DT)
    p = {"w": torch.randn(d, generator=g, dtype=DT)}
    h = {"l": torch.zeros(d, dtype=DT)}
    inner, outer = _quad, _outer
    call = "implicit"
    v = None
    if kind == "wrong-shape-v":
        call, v = "hvp", {"w": torch.zeros(d + 1, dtype=DT)}
    elif kind == "int-params":
        p = {"w": torch.arange(d)}
    elif kind == "empty-params":
        p = {}
    elif kind == "empty-hparams":
        h = {}
    elif kind == "nonscalar-inner":
        inner = lambda p, h, X: X @ p["w"]
    elif kind == "nonscalar-outer":
        outer = lambda p, h, X: X @ p["w"]
    elif kind == "hparam-unused":
        h = {"l": torch.zeros(d, dtype=DT), "unused": torch.ones(3, dtype=DT)}
    elif kind == "not-a-dict":
        p = [torch.zeros(d, dtype=DT)]
    elif kind == "nan-params":
        p = {"w": torch.full((d,), math.nan, dtype=DT)}
    elif kind == "mixed-dtypes":
        call, v = "hvp", {"w": torch.zeros(d, dtype=torch.float32)}
    elif kind == "meta-device":
        call, v = "hvp", {"w": torch.zeros(d, dtype=DT, device="meta")}
    elif kind == "requires-int-hparam":
        h = {"l": torch.zeros(d, dtype=torch.int64)}
    return call, inner, outer, p, h, X, v


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(BAD), d=st.integers(1, 5), seed=st.integers(0, 10_000),
       solver=st.sampled_from(["cg", "neumann", "exact"]))
def test_fuzzed_bad_inputs_give_clear_errors_and_change_nothing(kind, d, seed, solver):
    call, inner, outer, p, h, X, v = _case(kind, d, seed)
    originals = copy.deepcopy((p, h, v))
    slv = {"cg": bl.CG(maxiter=5), "neumann": bl.Neumann(steps=3, alpha=0.01), "exact": bl.Exact()}[solver]
    with pytest.raises((bl.BilevelError, ValueError, TypeError)) as info:
        if call == "hvp":
            bl.hvp(lambda pp, XX: inner(pp, h, XX), p, v, X)
        else:
            bl.implicit_hypergrad(inner, outer, p, h, solver=slv, inner_args=(X,), outer_args=(X,))
    msg = str(info.value)
    assert msg.startswith("bilevel.") or "bilevel." in msg.split(":")[0] or msg.startswith("Invalid"), msg
    assert "expected" in msg and ("got" in msg or "received" in msg), msg
    assert "Fix" in msg or "fix" in msg, msg
    if isinstance(p, dict):
        assert nested_equal(originals, (p, h, v)) if not kind == "nan-params" else True   # NaN != NaN


def test_unrolled_rejects_hparams_that_reach_nothing():
    p, h = {"w": torch.ones(3, dtype=DT)}, {"l": torch.zeros(3, dtype=DT), "ghost": torch.ones(2, dtype=DT)}
    X = torch.randn(5, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"\['ghost'\].*Fix"):
        bl.unrolled_hypergrad(_quad, _outer, p, h, optimizer=bl.inner.SGD(lr=0.1), steps=2, inner_args=(X,),
                              outer_args=(X,))
    # an hparam used only by the optimizer counts as used
    hg, _ = bl.unrolled_hypergrad(_quad, _outer, p, {"l": h["l"], "lr": torch.tensor(0.1, dtype=DT)},
                                  optimizer=bl.inner.SGD(lr="lr"), steps=2, inner_args=(X,), outer_args=(X,))
    assert float(hg["lr"].abs()) > 0


# -- fuzzed bad inputs to the other entry points: the same contract ------------------------------
def _assert_clear(err):
    msg = str(err)
    assert "bilevel." in msg or msg.startswith("Invalid"), msg
    assert "expected" in msg, msg


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["steps0", "truncate-big", "bad-mode", "optimizer-type", "nonscalar", "empty",
                             "int-hparam", "unknown-hparam-name"]),
       d=st.integers(1, 4))
def test_fuzzed_unrolled_inputs(kind, d):
    X = torch.randn(5, d, dtype=DT)
    p, h = {"w": torch.ones(d, dtype=DT)}, {"l": torch.zeros(d, dtype=DT)}
    kw = dict(optimizer=bl.inner.SGD(lr=0.1), steps=2, inner_args=(X,), outer_args=(X,))
    inner = _quad
    if kind == "steps0":
        kw["steps"] = 0
    elif kind == "truncate-big":
        kw["truncate"] = 5
    elif kind == "bad-mode":
        kw["mode"] = "sideways"
    elif kind == "optimizer-type":
        kw["optimizer"] = torch.optim.SGD
    elif kind == "nonscalar":
        inner = lambda p, h, X: X @ p["w"]
    elif kind == "empty":
        p = {}
    elif kind == "int-hparam":
        h = {"l": torch.zeros(d, dtype=torch.int64)}
    elif kind == "unknown-hparam-name":
        kw["optimizer"] = bl.inner.SGD(lr="lr")            # names an hparam that is not given
    before = copy.deepcopy((p, h))
    with pytest.raises((bl.BilevelError, ValueError, TypeError, KeyError)) as info:
        bl.unrolled_hypergrad(inner, _outer, p, h, **kw)
    _assert_clear(info.value)
    assert nested_equal(before, (p, h))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["not-module", "hparam-no-grad", "hparam-not-leaf", "inner-holds-hparam",
                             "outer-misses-hparam", "bad-on-error", "bad-hyper-every", "bad-method",
                             "bad-penalty"]))
def test_fuzzed_hyperoptimizer_construction(kind):
    model = torch.nn.Linear(3, 1).double()
    hp = {"l": torch.zeros((), dtype=DT, requires_grad=True)}
    kw = dict(inner_loss=lambda m, h, b: m(b).sum(), outer_loss=lambda m, h, b: m(b).sum(),
              inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
              outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1))
    if kind == "not-module":
        model = lambda x: x
    elif kind == "hparam-no-grad":
        hp = {"l": torch.zeros((), dtype=DT)}
        kw["outer_optimizer"] = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    elif kind == "hparam-not-leaf":
        base = torch.zeros((), dtype=DT, requires_grad=True)
        hp = {"l": base * 2}
    elif kind == "inner-holds-hparam":
        kw["inner_optimizer"] = torch.optim.SGD(list(model.parameters()) + list(hp.values()), lr=0.1)
    elif kind == "outer-misses-hparam":
        kw["outer_optimizer"] = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    elif kind == "bad-on-error":
        kw["on_error"] = "ignore"
    elif kind == "bad-hyper-every":
        kw["hyper_every"] = 0
    elif kind == "bad-method":
        kw["method"] = "implicit"
    elif kind == "bad-penalty":
        kw["penalty"] = 0.5
    params_before = copy.deepcopy(model.state_dict()) if isinstance(model, torch.nn.Module) else None
    with pytest.raises((bl.BilevelError, ValueError, TypeError)) as info:
        bl.HyperOptimizer(model, hp, **kw)
    _assert_clear(info.value)
    if params_before is not None:
        assert nested_equal(params_before, model.state_dict())


def test_same_seed_same_result_float32_and_float64():
    """Deterministic under a fixed seed (dropout included), in both dtypes."""
    for dtype in (torch.float32, torch.float64):
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2)).to(dtype)
            hp, pen = bl.hparams.weight_decay(model, init=1e-2)
            ce = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])
            hopt = bl.HyperOptimizer(model, hp, inner_loss=ce, outer_loss=ce, penalty=pen,
                                     inner_optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                                     outer_optimizer=torch.optim.Adam(hp.values(), lr=1e-2),
                                     method=bl.Implicit(solver=bl.CG(maxiter=5, damping=1.0)))
            g = torch.Generator().manual_seed(0)
            b = (torch.randn(16, 4, generator=g).to(dtype), torch.randint(0, 2, (16,), generator=g))
            for _ in range(3):
                hopt.inner_step(b)
                hopt.hyper_step(b, b)
            runs.append({k: v.detach().clone() for k, v in hp.items()})
        assert all(r.dtype == dtype for r in runs[0].values())
        assert nested_equal(runs[0], runs[1])


@pytest.mark.parametrize("form", ["host sums", "fused kernel"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_inner_step_finiteness_check_finds_each_bad_value_and_forgets_it(bad, form):
    """Both forms of the inner step's check (CPU: sums on the host; accelerators: the fused kernel,
    flags kept per device, resting at zero): a bad entry in any of several tensors of two dtypes is
    found, values are left bit for bit, and the next clean call passes (a flag left set would skip
    every later step)."""
    from bilevel._errors import _fused_check_finite, _host_sums_finite

    check = _host_sums_finite if form == "host sums" else _fused_check_finite
    gen = torch.Generator().manual_seed(0)
    clean = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen, dtype=torch.float64), torch.zeros(0)]
    assert check([t.clone() for t in clean])
    for i in (0, 1):
        ts = [t.clone() for t in clean]
        ts[i].view(-1)[2] = bad
        before = [t.clone() for t in ts]
        assert not check(ts)
        assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in zip(ts, before))
        assert check([t.clone() for t in clean])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64])
def test_host_sums_check_is_exact_where_sums_overflow_or_cancel(dtype):
    """The CPU check reads sums: finite values whose sum overflows are still finite (the exact test
    decides), +Inf and -Inf that cancel to NaN are still found, and complex parts are both read."""
    from bilevel._errors import fresh_tensors_finite

    big = torch.finfo(dtype).max
    huge = torch.full((4,), big, dtype=dtype)                      # sum overflows, values finite
    assert fresh_tensors_finite([huge, torch.ones(3, dtype=dtype)])
    both = torch.tensor([float("inf"), -float("inf")]).to(dtype)
    assert not fresh_tensors_finite([torch.ones(2, dtype=dtype), both])
    assert not fresh_tensors_finite([torch.tensor([1.0, float("nan")]).to(dtype)])
    if dtype.is_complex:
        assert not fresh_tensors_finite([torch.complex(torch.ones(2), torch.tensor([0.0, float("inf")]))])
