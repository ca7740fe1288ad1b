"""Method objects: a method written outside the library drives HyperOptimizer with no edit to it."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl

from conftest import tree_rel_err

DT = torch.float64


class DenseImplicit(bl.Method):
    """Implicit differentiation by a hand-written dense solve (no library solver, no library operator).

    Its state counts the accepted hyper steps, to check that the HyperOptimizer hands back the state
    of the last accepted step and nothing else.
    """

    def hypergrad(self, problem, inner_batch, outer_batch, state):
        keys = list(problem.params)
        flat0 = torch.cat([problem.params[k].reshape(-1) for k in keys])
        hkeys = list(problem.hparams)
        h0 = torch.cat([problem.hparams[k].detach().reshape(-1) for k in hkeys])

        def unflat(vec, like, names):
            out, o = {}, 0
            for k in names:
                n = like[k].numel()
                out[k] = vec[o:o + n].view_as(like[k])
                o += n
            return out

        def inner(w, h):
            p, hh = unflat(w, problem.params, keys), unflat(h, problem.hparams, hkeys)
            return problem.inner_objective()(p, hh, inner_batch)

        def outer(w, h):
            return problem.outer_loss(unflat(w, problem.params, keys), unflat(h, problem.hparams, hkeys), outer_batch)

        H = torch.autograd.functional.hessian(lambda w: inner(w, h0), flat0)
        b = torch.autograd.functional.jacobian(lambda w: outer(w, h0), flat0)
        direct = torch.autograd.functional.jacobian(lambda h: outer(flat0, h), h0)
        u = torch.linalg.solve(H, b)
        cross = torch.autograd.functional.jacobian(
            lambda h: torch.autograd.functional.jacobian(lambda w: inner(w, h), flat0, create_graph=True), h0)
        hg = unflat(direct - cross.T @ u, problem.hparams, hkeys)
        return bl.MethodResult(hg, float(outer(flat0, h0)), state=(0 if state is None else state) + 1)


def _setup(method, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(40, 4, generator=g, dtype=DT), torch.randn(30, 4, generator=g, dtype=DT)
    y, yv = torch.randn(40, 1, generator=g, dtype=DT), torch.randn(30, 1, generator=g, dtype=DT)
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1).to(DT)
    hp, pen = bl.hparams.weight_decay(model, init=1e-1, per="parameter")
    loss = lambda m, h, b: F.mse_loss(m(b[0]), b[1])
    hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=pen,
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             outer_optimizer=torch.optim.SGD(hp.values(), lr=0.5), method=method)
    return hopt, model, hp, (X, y), (Xv, yv)


def test_a_method_defined_outside_the_library_drives_hyper_steps():
    ours, model, hp, train, val = _setup(DenseImplicit())
    ref, model_r, hp_r, *_ = _setup(bl.Implicit(solver=bl.Exact()))
    for _ in range(3):
        for _ in range(30):
            ours.inner_step(train)
            ref.inner_step(train)
        s_ours, s_ref = ours.hyper_step(train, val), ref.hyper_step(train, val)
        assert s_ours.method == "DenseImplicit" and not s_ours.skipped
        assert math.isclose(s_ours.hypergrad_norm, s_ref.hypergrad_norm, rel_tol=1e-9)
        assert math.isclose(s_ours.outer_loss, s_ref.outer_loss, rel_tol=1e-12)
        assert tree_rel_err(hp, hp_r) < 1e-10
    assert ours.method_state == 3 and ours.state_dict()["method_state"] == 3


def test_method_state_is_kept_only_for_accepted_steps_and_restored_from_checkpoints(tmp_path):
    hopt, model, hp, train, val = _setup(DenseImplicit())
    hopt.hyper_step(train, val)
    assert hopt.method_state == 1
    hopt.save(tmp_path / "c.pt")
    hopt.outer_optimizer.param_groups[0]["lr"] = float("inf")     # the next step produces Inf: refused
    with pytest.warns(RuntimeWarning, match="restored"):
        hopt.on_error = "skip"
        stats = hopt.hyper_step(train, val)
    assert stats.skipped and hopt.method_state == 1
    fresh, *_ = _setup(DenseImplicit())
    fresh.load(tmp_path / "c.pt")
    assert fresh.method_state == 1


def test_method_validation_runs_at_construction():
    class NeedsSGD(bl.Method):
        def validate(self, inner_optimizer, fn):
            if not isinstance(inner_optimizer, torch.optim.SGD):
                raise ValueError(f"{fn}: NeedsSGD expected torch.optim.SGD, got {type(inner_optimizer).__name__}")

        def hypergrad(self, problem, inner_batch, outer_batch, state):
            raise AssertionError("not reached")

    model = torch.nn.Linear(2, 1)
    hp = {"c": torch.zeros((), requires_grad=True)}
    loss = lambda m, h, b: (m(b) ** 2).mean() + h["c"] ** 2
    with pytest.raises(ValueError, match="NeedsSGD expected torch.optim.SGD, got Adam"):
        bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, method=NeedsSGD(),
                          inner_optimizer=torch.optim.Adam(model.parameters()),
                          outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1))
    with pytest.raises(TypeError, match="hypergrad"):
        bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, method=object(),
                          inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1))


def test_finite_difference_object_equals_the_unrolled_flag():
    a, *_ , train, val = _setup(bl.FiniteDifference(radius=0.01))
    b, *_ = _setup(bl.Unrolled(second_order="finite_difference", fd_radius=0.01))
    ha, sa = a.hypergradient(train, val)
    hb, sb = b.hypergradient(train, val)
    assert tree_rel_err(ha, hb) == 0.0 and sa.method == "FiniteDifference" and sb.method == "Unrolled"
    with pytest.raises(ValueError, match="radius"):
        bl.FiniteDifference(radius=0.0)


def test_problem_sees_params_as_functions_of_the_model():
    """The Problem's losses evaluate the model at the params given, not at the model's own weights."""
    hopt, model, hp, train, val = _setup(bl.FirstOrder())
    problem = hopt.problem()
    shifted = {k: v + 1.0 for k, v in problem.params.items()}
    expect = F.mse_loss(functional_call(model, shifted, (val[0],)), val[1])
    assert torch.equal(problem.outer_loss(shifted, hp, val), expect)
    assert set(problem.params) == {"weight", "bias"} and problem.fixed == {}
