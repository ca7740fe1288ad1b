"""Data-parallel hyper steps (gloo, 2 CPU processes) equal one process on the global batch.

Each worker runs every method twice: data-parallel on its half of each batch, and alone
on the whole batch (``process_group=None``); the parent compares the results across ranks
(bit-identical) and against the single-process run (≤ 1e-8, float64).
"""

import operator

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import bilevel as bl
from bilevel.distributed import spawn

WORLD = 2
METHODS = {
    "implicit-cg": lambda: bl.Implicit(solver=bl.CG(maxiter=15, tol=0.0, damping=1.0)),
    "implicit-neumann": lambda: bl.Implicit(solver=bl.Neumann(steps=8, alpha=None, damping=1.0)),
    "implicit-cg-warm": lambda: bl.Implicit(solver=bl.CG(maxiter=3, tol=0.0, damping=1.0), warm_start=True),
    "unrolled": lambda: bl.Unrolled(steps=3),
    "unrolled-checkpoint": lambda: bl.Unrolled(steps=4, mode="checkpoint"),
    "first-order": lambda: bl.FirstOrder(),
}


def _data(seed=0, n=48, d=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (X @ torch.randn(d, generator=g, dtype=torch.float64) > 0).to(torch.float64)
    return X.to(dtype), y.to(dtype)


def _run(method_name, rank, group, ddp, dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(dtype)
    hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="parameter")
    hp_scale = {"scale": torch.zeros((), dtype=dtype, requires_grad=True)}   # a direct term too
    hparams = {**hp, **hp_scale}
    inner = lambda m, h, b: F.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1])
    outer = lambda m, h, b: F.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1]) + 1e-2 * h["scale"] ** 2 \
        + 1e-3 * h["scale"] * m(b[0]).mean()
    wrapped = model
    if ddp:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    hopt = bl.HyperOptimizer(wrapped, hparams, inner_loss=inner, outer_loss=outer, penalty=pen,
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5),
                             outer_optimizer=torch.optim.Adam(hparams.values(), lr=0.05),
                             method=METHODS[method_name](), process_group=group)
    (X, y), (Xv, yv) = _data(1, dtype=dtype), _data(2, dtype=dtype)
    for t in range(4):
        rows = slice(None) if group is None else slice(rank * 24, (rank + 1) * 24)   # equal halves
        for _ in range(3):
            hopt.inner_step((X[rows], y[rows]))
        hopt.hyper_step((X[rows], y[rows]), (Xv[rows], yv[rows]))
    return ({k: v.detach().clone() for k, v in hparams.items()},
            {k: v.detach().clone() for k, v in model.named_parameters()})


def _run_batchnorm(rank, group, vanilla, broadcast_buffers=True):
    """Inner steps of a BatchNorm model under DDP: HyperOptimizer.inner_step, or DDP's own loop."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 1)).to(torch.float64)
    hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="parameter")
    wrapped = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    loss = lambda m, h, b: F.binary_cross_entropy_with_logits(m(b[0]).squeeze(-1), b[1])
    X, y = _data(3)
    shards = [slice(rank * 12 + 24 * t, rank * 12 + 24 * t + 12) for t in range(2)]   # different rows per rank
    if vanilla:
        for t in range(4):
            rows = shards[t % 2]
            opt.zero_grad()
            (loss(wrapped, hp, (X[rows], y[rows])) + pen(dict(model.named_parameters()), hp)).backward()
            opt.step()
    else:
        hopt = bl.HyperOptimizer(wrapped, hp, inner_loss=loss, outer_loss=loss, penalty=pen, inner_optimizer=opt,
                                 outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1),
                                 method=bl.Implicit(solver=bl.CG(maxiter=3)))
        for t in range(4):
            hopt.inner_step((X[shards[t % 2]], y[shards[t % 2]]))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run_unused(rank, group, mode):
    """An unrolled hypergradient where "unused" reaches no rank's loss and "half" only rank 1's: on the
    ranks "unused" gets no gradient (torch.optim skips it), "half" the mean over ranks of (0, its gradient)."""
    g = torch.Generator().manual_seed(7)
    params = {"a": torch.randn(6, generator=g, dtype=torch.float64), "unused": torch.randn(2, generator=g, dtype=torch.float64),
              "half": torch.randn(6, generator=g, dtype=torch.float64)}
    (X, y), (Xv, yv) = _data(4), _data(5)

    def part(p, h, r):
        rows = slice(r * 24, (r + 1) * 24)
        loss = F.binary_cross_entropy_with_logits(X[rows] @ p["a"], y[rows]) + 0.5 * h["l2"].exp() * (p["a"] ** 2).sum()
        return loss + ((X[rows] @ p["half"]) ** 2).mean() if r == 1 else loss

    inner = (lambda p, h: 0.5 * (part(p, h, 0) + part(p, h, 1))) if group is None else (lambda p, h: part(p, h, rank))
    outer = lambda p, h: F.binary_cross_entropy_with_logits(Xv @ (p["a"] + p["half"]), yv) + p["unused"].sum()
    hg, w = bl.unrolled_hypergrad(inner, outer, params, {"l2": torch.tensor(-2.0, dtype=torch.float64)},
                                  optimizer=bl.inner.AdamW(lr=0.05, weight_decay=0.1), steps=4, mode=mode, group=group)
    return dict(hg), w, hg.info.state.step, params["unused"]


def _worker(rank):
    torch.set_num_threads(1)
    results = {}
    for name in METHODS:
        for ddp in (False, True):
            results[(name, ddp)] = _run(name, rank, dist.group.WORLD, ddp)
        results[(name, "single")] = _run(name, rank, None, False)
    for name in ("implicit-cg", "unrolled"):                 # float32: ranks identical, close to one process
        results[(name, "f32")] = _run(name, rank, dist.group.WORLD, False, torch.float32)
        results[(name, "f32-single")] = _run(name, rank, None, False, torch.float32)
    for vanilla in (True, False):
        for bb in (True, False):
            results[("bn", vanilla, bb)] = _run_batchnorm(rank, dist.group.WORLD, vanilla, bb)
    for mode in ("reverse", "checkpoint"):
        results[("unused", mode)] = _run_unused(rank, dist.group.WORLD, mode)
    results[("unused", "single")] = _run_unused(rank, None, "reverse")
    return results


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_equal_one_process_on_the_global_batch():
    r0, r1 = spawn(_worker, WORLD)
    for name in METHODS:
        ref_h, ref_w = r0[(name, "single")]
        for ddp in (False, True):
            (h0, w0), (h1, w1) = r0[(name, ddp)], r1[(name, ddp)]
            for k in h0:                              # ranks agree bit for bit
                assert torch.equal(h0[k], h1[k]), (name, ddp, k)
            for k in w0:
                assert torch.equal(w0[k], w1[k]), (name, ddp, k)
            for k in h0:                              # and equal the global-batch run
                err = float((h0[k] - ref_h[k]).norm() / ref_h[k].norm().clamp_min(1e-300))
                assert err <= 1e-8, (name, ddp, k, err)
            for k in w0:
                err = float((w0[k] - ref_w[k]).norm() / ref_w[k].norm())
                assert err <= 1e-8, (name, ddp, k, err)
    for name in ("implicit-cg", "unrolled"):
        (h0, w0), (h1, w1) = r0[(name, "f32")], r1[(name, "f32")]
        ref_h, _ = r0[(name, "f32-single")]
        assert all(torch.equal(h0[k], h1[k]) for k in h0) and all(torch.equal(w0[k], w1[k]) for k in w0)
        assert all(h0[k].dtype == torch.float32 for k in h0)
        for k in h0:
            assert float((h0[k] - ref_h[k]).norm() / ref_h[k].norm().clamp_min(1e-30)) <= 1e-5, (name, k)
    for name in METHODS:
        ref_h, _ = r0[(name, "single")]
        # the hyperparameters moved (the test is not vacuous)
        assert any(not torch.allclose(v, torch.full_like(v, v.reshape(-1)[0])) for v in ref_h.values()) or \
            float(ref_h["scale"].abs()) > 0

    # a parameter without gradient on every rank is skipped (as torch.optim), one used on some ranks is not
    ref_h, ref_w, ref_steps, w0_unused = r0[("unused", "single")]
    assert torch.equal(ref_w["unused"], w0_unused) and ref_steps["unused"] == 0 and ref_steps["half"] == 4
    for mode in ("reverse", "checkpoint"):
        for r in (r0, r1):
            h, w, steps, _ = r[("unused", mode)]
            assert steps == ref_steps and torch.equal(w["unused"], w0_unused), mode
            assert all(float((w[k] - ref_w[k]).norm() / ref_w[k].norm()) <= 1e-10 for k in w), mode
            assert float((h["l2"] - ref_h["l2"]).abs() / ref_h["l2"].abs()) <= 1e-8, mode

    # BatchNorm under DDP: every rank's weights and running statistics are what DDP's own training
    # loop gives (buffers broadcast from rank 0 before each forward, or not with broadcast_buffers=False)
    for bb in (True, False):
        for r in (r0, r1):
            ref, ours = r[("bn", True, bb)], r[("bn", False, bb)]
            for k in ref:
                if ref[k].is_floating_point():
                    err = float((ours[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-300))
                    assert err <= 1e-12, (bb, k, err)
                else:
                    assert torch.equal(ours[k], ref[k]), (bb, k)
    # the shards differ, so without the broadcast rank 1's statistics would be its own (not vacuous)
    assert not torch.allclose(r1[("bn", True, True)]["1.running_mean"], r1[("bn", True, False)]["1.running_mean"])


def _gather_ranks_after_ddp(rank, extra_matmuls):
    """The shape of examples/ddp_weight_decay.py's end: a DDP model (it keeps the gloo threads alive
    past destroy_process_group), a last collective, then rank 0 keeps computing alone."""
    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 2)
    torch.nn.parallel.DistributedDataParallel(model)(torch.randn(3, 4)).sum().backward()
    gathered = [torch.empty(1) for _ in range(WORLD)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    if rank == 0:
        a = torch.randn(64, 64)
        for _ in range(extra_matmuls):
            a = torch.tanh(a @ a)
    return [int(t) for t in gathered]


def _fail_on_rank_one(rank):
    if rank == 1:
        raise ValueError("rank one failed on purpose")
    return rank


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_spawn_returns_every_rank_result_when_ranks_finish_unevenly():
    assert spawn(_gather_ranks_after_ddp, WORLD, 200) == [[0, 1], [0, 1]]
    assert spawn(operator.add, WORLD, 10) == [10, 11]          # fn(rank, *args), in rank order


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_spawn_reports_the_traceback_of_a_failing_rank():
    # rank 0 finishes and waits in the teardown barrier; the parent must stop it, not hang
    with pytest.raises(Exception, match="rank one failed on purpose"):
        spawn(_fail_on_rank_one, WORLD)


def test_spawn_rejects_a_bad_process_count():
    with pytest.raises(ValueError, match="positive int"):
        spawn(operator.add, 0, 1)
