"""Data-parallel hyper steps: time with 1 and 2 processes (gloo, CPU) and communication per step.

Problem: MLP 64-256-10 (tanh, 19,210 float32 weights), one log decay per weight as ``penalty=``,
global batches of 512 (inner) and 512 (outer) rows split evenly over the ranks, 1 torch thread
per process. Methods: ``Implicit(CG(maxiter=10))`` and ``Unrolled(steps=5)``. Each worker warms
up with 2 hyper steps, then times 10; ``torch.distributed.all_reduce`` is wrapped to count the
collectives and bytes of those 10 steps. Figures (per hyper step, rank 0) are in
``extra_info``; the pytest-benchmark time is the whole spawned run (start-up included).
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import bilevel as bl
from bilevel.distributed import spawn

STEPS, WARMUP = 10, 2
METHODS = {"implicit-cg10": lambda: bl.Implicit(solver=bl.CG(maxiter=10, tol=0.0, damping=1.0)),
           "unrolled-5": lambda: bl.Unrolled(steps=5)}


def _worker(rank: int, world: int, method: str) -> Dict[str, Any]:
    import time

    torch.set_num_threads(1)
    counts = {"calls": 0, "bytes": 0, "on": False}
    orig = dist.all_reduce

    def counting(tensor, *a, **k):
        if counts["on"]:
            counts["calls"] += 1
            counts["bytes"] += tensor.numel() * tensor.element_size()
        return orig(tensor, *a, **k)

    dist.all_reduce = counting
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
        hp, pen = bl.hparams.weight_decay(model, init=1e-3, per="parameter")
        ce = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])
        hopt = bl.HyperOptimizer(model, hp, inner_loss=ce, outer_loss=ce, penalty=pen,
                                 inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                 outer_optimizer=torch.optim.Adam(hp.values(), lr=0.01), method=METHODS[method]())
        g = torch.Generator().manual_seed(1)
        X, y = torch.randn(512, 64, generator=g), torch.randint(0, 10, (512,), generator=g)
        Xv, yv = torch.randn(512, 64, generator=g), torch.randint(0, 10, (512,), generator=g)
        rows = slice(rank * 512 // world, (rank + 1) * 512 // world)
        b, bv = (X[rows], y[rows]), (Xv[rows], yv[rows])
        for _ in range(WARMUP):
            hopt.hyper_step(b, bv)
        dist.barrier()
        counts["on"] = True
        t0 = time.perf_counter()
        for _ in range(STEPS):
            hopt.hyper_step(b, bv)
        seconds = (time.perf_counter() - t0) / STEPS
        counts["on"] = False
        return {"seconds_per_hyper_step": seconds, "allreduces_per_step": counts["calls"] / STEPS,
                "bytes_per_step": counts["bytes"] / STEPS, "hyperparameters": sum(v.numel() for v in hp.values())}
    finally:
        dist.all_reduce = orig


def run(world: int, method: str) -> Dict[str, Any]:
    return spawn(_worker, world, world, method)[0]          # rank 0's figures


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("world", [1, 2])
def test_hyper_step_processes(world: int, method: str, benchmark: Any) -> None:
    benchmark.group = f"distributed-{method}"
    res: Dict[str, Any] = {}
    benchmark.pedantic(lambda: res.update(run(world, method)), rounds=1, iterations=1)
    benchmark.extra_info.update({"world": world, "method": method, **res})
    print(f"\n[{method}] {world} process(es): {1e3 * res['seconds_per_hyper_step']:.1f} ms per hyper step, "
          f"{res['allreduces_per_step']:.0f} all-reduces, {res['bytes_per_step'] / 1e6:.3f} MB per step")
