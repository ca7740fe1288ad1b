"""Unrolled hypergradients: time and peak memory vs steps, per mode, against ``higher``.

Problem: an MLP 100-256-10 (tanh, 28,426 float32 parameters), batches of 64,
inner loss CE + ½ Σ e^{λ_k}‖w_k‖² with one log-decay per parameter tensor
(4 hyperparameters, so forward mode pushes 4 directions), SGD(lr 0.05,
momentum 0.9), outer loss the validation CE.

Group ``unroll-T{T}``; unit: ``higher`` (``innerloop_ctx`` + differentiable SGD)
on the same problem and T. Peak memory is measured in a fresh process per
configuration (``/proc/self/status`` VmHWM after resetting it through
``/proc/self/clear_refs``; glibc's mmap threshold fixed so freed tensors leave
RSS), as MB above the RSS before the call, and recorded in ``extra_info``.

Target: checkpoint mode at T = 200 uses ≤ 1/5 of higher's memory at
≤ 2× its time.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any, Callable, Dict

import pytest

from _measure import run_in_fresh_process
from conftest import Measure

STEPS = (10, 50, 200)
CONFIGS = ("higher", "reverse", "truncate10", "checkpoint", "forward")

_SCRIPT = textwrap.dedent('''
    import json, sys, time, torch
    import torch.nn.functional as F
    from torch.func import functional_call
    import bilevel as bl

    def problem():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(100, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
        X, Xv = torch.randn(64, 100), torch.randn(64, 100)
        teacher = torch.randn(100, 10)
        y, yv = (X @ teacher).argmax(1), (Xv @ teacher).argmax(1)
        params = {k: v.detach().clone() for k, v in net.named_parameters()}
        hp = {k: torch.full((), -4.0) for k in params}
        return net, params, hp, X, y, Xv, yv

    def make_runner(config, T):
        net, params, hp, X, y, Xv, yv = problem()
        def inner(p, h):
            ce = F.cross_entropy(functional_call(net, p, (X,)), y)
            return ce + 0.5 * sum(h[k].exp() * p[k].square().sum() for k in p)
        outer = lambda p, h: F.cross_entropy(functional_call(net, p, (Xv,)), yv)
        opt = bl.inner.SGD(lr=0.05, momentum=0.9)
        if config == "higher":
            import higher
            model = torch.nn.Sequential(*net)
            def run():
                h = {k: v.clone().requires_grad_(True) for k, v in hp.items()}
                sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
                with higher.innerloop_ctx(model, sgd, copy_initial_weights=True) as (fm, dopt):
                    for _ in range(T):
                        p = dict(zip(params, fm.parameters()))
                        ce = F.cross_entropy(fm(X), y)
                        dopt.step(ce + 0.5 * sum(h[k].exp() * p[k].square().sum() for k in p))
                    loss = F.cross_entropy(fm(Xv), yv)
                    return torch.autograd.grad(loss, list(h.values()))
            return run
        kw = dict(optimizer=opt, steps=T)
        if config == "truncate10":
            kw.update(truncate=min(10, T))
        elif config in ("checkpoint", "forward"):
            kw.update(mode=config)
        return lambda: bl.unrolled_hypergrad(inner, outer, params, hp, **kw)[0]

    config, T = sys.argv[1], int(sys.argv[2])
    run = make_runner(config, T)
    run()                                   # warm-up (allocator, lazy init)
    from _measure import peak_rss_growth
    out, peak_mb, seconds = peak_rss_growth(run)
    vals = out.values() if isinstance(out, dict) else out
    norm = float(sum(float(v.double().square().sum()) for v in vals) ** 0.5)
    print(json.dumps({"config": config, "T": T, "peak_mb": peak_mb, "seconds": seconds,
                      "hypergrad_norm": norm}))
''')


def peak_memory(config: str, T: int) -> Dict[str, Any]:
    """Run one configuration in a fresh process; return its peak MB above baseline and wall time."""
    return run_in_fresh_process(["-c", _SCRIPT, config, str(T)])


def _runner(config: str, T: int) -> Callable[[], Any]:
    ns: Dict[str, Any] = {"__name__": "bench_unroll_problem"}
    exec(compile(_SCRIPT.split("config, T = sys.argv")[0], "bench_unroll_problem", "exec"), ns)
    return ns["make_runner"](config, T)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory needs Linux /proc")
@pytest.mark.parametrize("T", STEPS)
@pytest.mark.parametrize("config", CONFIGS)
def test_unroll(config: str, T: int, measure: Measure) -> None:
    """Time in-process (pytest-benchmark) and peak memory in a fresh process, per mode and T."""
    pytest.importorskip("higher")
    mem = peak_memory(config, T)
    measure(_runner(config, T), group=f"unroll-T{T}", name=config, unit=(config == "higher"),
            peak_mb=round(mem["peak_mb"], 2), hypergrad_norm=mem["hypergrad_norm"])
