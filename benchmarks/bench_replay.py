"""Metagradients through whole training runs: replay vs checkpoint vs full reverse mode.

Problem: the model of ``examples/data_selection.py``, an MLP 40-128-128-10 (tanh, 22,026 float32
parameters) trained by SGD (lr 0.1, momentum 0.9) on minibatches of 128 out of 4,000 examples of
MNIST-1D's shape (random inputs and labels here: the cost does not depend on the values), with one
weight per training example as the hyperparameters (4,000 logits, ``bl.hparams.weighted_mean``);
the outer loss is the cross-entropy on 1,000 held-out examples. T = 256, 1024, 4096 steps.

Group ``replay-T{T}``; unit: one plain training run of T steps (no graph), so that a time ratio is
"training runs per metagradient". Peak memory is measured in a fresh process per configuration
(``_measure.run_in_fresh_process``, VmHWM above the RSS before the call), together with the
counters of :class:`bilevel.UnrollInfo` (states stored at once, steps evaluated) and the time of
a training run in that same process (paired, back to back).

Time is also split into forward work (the training run, the recomputations) and the reverse
sweep (each step's rebuilt graph and its vector-Jacobian product, timed by wrapping
``bilevel.unroll._step_vjp``), in wall seconds and in this process's CPU seconds: on a shared
machine the CPU-time ratios are the steadier ones (the unit is the median of four training runs,
two right before the call and two right after).

Target at T = 4096: replay ≤ 1/50 of reverse's memory and ≤ 1/4 of checkpoint's, at
≤ 1 + ⌈log₂ T⌉ = 13 training runs of time. Run directly for the table of RESULTS.md::

    python benchmarks/bench_replay.py [--steps 256 1024 4096] [--configs replay checkpoint reverse]
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from typing import Any, Callable, Dict

import pytest

from _measure import run_in_fresh_process

STEPS = (256, 1024, 4096)
CONFIGS = ("train", "replay", "checkpoint", "reverse")

_SCRIPT = textwrap.dedent('''
    import json, sys, time, torch
    import torch.nn.functional as F
    from torch.func import functional_call
    import bilevel as bl

    N, B = 4000, 128

    def make_runner(config, T, k=2):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(40, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128),
                                  torch.nn.Tanh(), torch.nn.Linear(128, 10))
        X, y = torch.randn(N, 40), torch.randint(0, 10, (N,))
        Xv, yv = torch.randn(1000, 40), torch.randint(0, 10, (1000,))
        params = {k_: v.detach().clone() for k_, v in net.named_parameters()}
        hp = bl.hparams.example_weights(N, requires_grad=False)
        order = torch.cat([torch.randperm(N, generator=torch.Generator().manual_seed(e)) for e in range(T * B // N + 1)])
        batch = lambda t: (order[t * B:(t + 1) * B],)
        def inner(p, h, idx):
            ce = F.cross_entropy(functional_call(net, p, (X[idx],)), y[idx], reduction="none")
            return bl.hparams.weighted_mean(ce, h["example_logits"][idx])
        outer = lambda p, h: F.cross_entropy(functional_call(net, p, (Xv,)), yv)
        opt = bl.inner.SGD(lr=0.1, momentum=0.9)
        if config == "train":                                    # the unit: a plain run, no graph
            def run():
                w, s = params, opt.init(params)
                for t in range(T):
                    with torch.enable_grad():
                        wl = {k_: v.detach().requires_grad_() for k_, v in w.items()}
                        g = torch.autograd.grad(inner(wl, hp, *batch(t)), list(wl.values()))
                    with torch.no_grad():
                        w, s = opt.step(w, dict(zip(w, g)), s, hp)
                return w
            return run
        return lambda: bl.unrolled_hypergrad(inner, outer, params, hp, optimizer=opt, steps=T, mode=config,
                                             replay_k=k, inner_args=batch)[0]

    def time_the_reverse_sweep():
        """Wrap the reverse sweep's pieces (each step's rebuilt graph and vector-Jacobian product, the
        outer loss's adjoint; in reverse mode the one backward pass) with wall and CPU clocks: the rest
        of a metagradient is forward work (the training run and the recomputations)."""
        import bilevel.unroll as U
        acc = {"wall": 0.0, "cpu": 0.0, "depth": 0}
        def wrap(f):
            def timed(*a, **kw):
                acc["depth"] += 1
                w0, c0 = time.perf_counter(), time.process_time()
                try:
                    return f(*a, **kw)
                finally:
                    acc["depth"] -= 1
                    if acc["depth"] == 0:
                        acc["wall"] += time.perf_counter() - w0
                        acc["cpu"] += time.process_time() - c0
            return timed
        U._step_vjp, U._outer_adjoint, U.grads_or_zeros = wrap(U._step_vjp), wrap(U._outer_adjoint), \
            wrap(U.grads_or_zeros)
        return acc

    def clocked(fn):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w0, time.process_time() - c0

    if __name__ == "__main__":
        config, T = sys.argv[1], int(sys.argv[2])
        torch.set_num_threads(1)
        run, train = make_runner(config, T), make_runner("train", T)
        make_runner(config, 4)()                                   # warm-up (allocator, lazy init)
        from _measure import peak_rss_growth
        rev = time_the_reverse_sweep()
        units = [clocked(train) for _ in range(2)]
        c0 = time.process_time()
        out, peak_mb, seconds = peak_rss_growth(run)
        cpu = time.process_time() - c0
        units += [clocked(train) for _ in range(2)]
        # the unit: the median of four training runs, two right before the call and two right after
        train_s, train_cpu = [sorted(u)[1:3] for u in zip(*units)]
        train_s, train_cpu = sum(train_s) / 2, sum(train_cpu) / 2
        info = getattr(out, "info", None)
        print(json.dumps({"config": config, "T": T, "peak_mb": peak_mb, "seconds": seconds, "train_s": train_s,
                          "cpu_s": cpu, "train_cpu_s": train_cpu, "reverse_s": rev["wall"],
                          "reverse_cpu_s": rev["cpu"],
                          "stored_states_max": getattr(info, "stored_states_max", None),
                          "forward_steps": getattr(info, "forward_steps", None)}))
''')


def fresh(config: str, T: int) -> Dict[str, Any]:
    """Run one configuration in a fresh process: peak MB above baseline, seconds, a training run's seconds."""
    return run_in_fresh_process(["-c", _SCRIPT, config, str(T)], env={"OMP_NUM_THREADS": "1"})


def _runner(config: str, T: int) -> Callable[[], Any]:
    ns: Dict[str, Any] = {"__name__": "bench_replay_problem"}
    exec(compile(_SCRIPT, "bench_replay_problem", "exec"), ns)
    return ns["make_runner"](config, T)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory needs Linux /proc")
@pytest.mark.parametrize("T", STEPS)
@pytest.mark.parametrize("config", CONFIGS)
def test_replay(config: str, T: int, measure: Any) -> None:
    """Time in-process (pytest-benchmark, paired with a training run) and peak memory in a fresh process."""
    if config == "reverse" and T > 1024:
        # ~2 GB in ~70,000 tensors above 64 KiB, each its own mapping under MALLOC_MMAP_THRESHOLD_: more
        # than Linux's default vm.max_map_count (65,530), and the process dies (SIGSEGV, measured)
        pytest.skip("full reverse mode at T=4096 needs ~4× its T=1024 memory: extrapolated in RESULTS.md")
    mem = fresh(config, T)
    measure(_runner(config, T), group=f"replay-T{T}", name=config, unit=(config == "train"),
            paired_with=None if config == "train" else _runner("train", T), pairs=1,
            peak_mb=round(mem["peak_mb"], 2), stored_states_max=mem["stored_states_max"],
            forward_steps=mem["forward_steps"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    ap.add_argument("--configs", nargs="+", default=["replay", "checkpoint", "reverse"])
    ap.add_argument("--json", default=None, help="append one JSON line per run to this file")
    a = ap.parse_args()
    for T in a.steps:
        for c in a.configs:
            r = fresh(c, T)
            r["x_train_runs"] = r["seconds"] / r["train_s"]                 # wall clock
            r["x_train_runs_cpu"] = r["cpu_s"] / r["train_cpu_s"]           # this process's CPU time
            r["forward_runs_cpu"] = (r["cpu_s"] - r["reverse_cpu_s"]) / r["train_cpu_s"]
            r["reverse_runs_cpu"] = r["reverse_cpu_s"] / r["train_cpu_s"]
            print(json.dumps(r), flush=True)
            if a.json:
                with open(a.json, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(r) + "\n")
