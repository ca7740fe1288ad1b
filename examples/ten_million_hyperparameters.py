"""One weight decay per weight of a 10.2M-weight MLP: ten million hyperparameters on one CPU core.

    python examples/ten_million_hyperparameters.py                  # 64-3150-3150-10 (~3.5 min, 1 thread)
    python examples/ten_million_hyperparameters.py --hidden 32 --hyper-steps 2 --warmup 5   # seconds
    python examples/ten_million_hyperparameters.py --json           # the figures as one JSON line

Inner problem:  w*(λ) = argmin_w  CE_train(w) + ½ Σ_i exp(λ_i) w_i²   (one λ_i per weight w_i,
                10,161,910 of each at the default size)
Outer problem:  min_λ  CE_val(w*(λ))

The hypergradient comes from the implicit function theorem with a 10-term Neumann series,
``bl.Implicit(solver=bl.Neumann(steps=10, alpha=α, damping=δ))``, interleaved with SGD by
``bl.HyperOptimizer``. The decay penalty goes in ``penalty=``, so its Hessian (``diag(e^λ)``) and
its mixed term (``e^λ ⊙ w ⊙ u``) are applied elementwise, not through double backward.

It measures, for a few hyper steps after warm-up, each with inner steps before it:

* time: wall and CPU seconds of each ``hyper_step`` (target: wall under 60 s);
* memory: peak RSS growth of each call (VmHWM after it − VmRSS before it, the high-water mark
  reset by writing "5" to /proc/self/clear_refs first: ``benchmarks/_measure.py``'s method), a
  ``hyper_step``'s against an ``inner_step``'s (target: under 4x).

The figures come from a process whose glibc maps every allocation above 64 KiB on its own
(``MALLOC_MMAP_THRESHOLD_=65536``; the script re-runs itself so when started without it): a freed
tensor then leaves the RSS, so a call's growth is its own and not glibc's heap reuse. The figures
measured are in benchmarks/RESULTS.md, "Ten million hyperparameters". Data: a random teacher
network's labels on Gaussian inputs, from a seeded generator (no download).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl

TIME_TARGET_S = 60.0   # one hyper step under a minute
MEMORY_TARGET = 4.0    # peak RSS growth of a hyper step under 4x that of an inner step
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


# ----------------------------------------------------------------------------------------- data
def teacher_data(n: int, d_in: int, classes: int, seed: int, teacher_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Gaussian inputs ``(n, d_in)`` labelled by a random one-hidden-layer teacher (drawn from
    ``teacher_seed``: train and validation sets share it), 10% of labels flipped at random (so that a
    decay has something to do). Same seeds, same data.

    Example:
        >>> X, y = teacher_data(8, 4, 3, seed=0)
        >>> X.shape, y.shape, int(y.max()) < 3
        (torch.Size([8, 4]), torch.Size([8]), True)
    """
    gt = torch.Generator().manual_seed(teacher_seed)
    W1, W2 = torch.randn(d_in, 32, generator=gt), torch.randn(32, classes, generator=gt)
    g = torch.Generator().manual_seed(1000 + seed)
    X = torch.randn(n, d_in, generator=g)
    y = (torch.tanh(X @ W1) @ W2).argmax(1)
    flip = torch.rand(n, generator=g) < 0.1
    return X, torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)


def batches(X: torch.Tensor, y: torch.Tensor, size: int, seed: int):
    """An endless stream of shuffled minibatches ``(x (size, d), y (size,))``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - size + 1, size):
            idx = perm[i:i + size]
            yield X[idx], y[idx]


# ------------------------------------------------------------------------------------ measuring
def _status_kb(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))


def can_measure_memory() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK)


def measured(fn) -> tuple[float, float, float]:
    """``(wall seconds, CPU seconds of this process, peak RSS growth in MiB)`` of ``fn()``; the growth
    is NaN off Linux. On a shared machine the CPU seconds move less with the other load than the wall's."""
    measure = can_measure_memory()
    if measure:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")                         # VmHWM := VmRSS
        before = _status_kb("VmRSS:")
    t, c = time.perf_counter(), time.process_time()
    fn()
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    return seconds, cpu, (_status_kb("VmHWM:") - before) / 1024 if measure else math.nan


def neumann_settings(model: nn.Module, hparams, penalty, batch, iters: int) -> tuple[float, float, float, float]:
    """``(λ_max, λ_min, damping, α)`` of the inner Hessian (with the decays) on one batch.

    Two power iterations of ``iters`` products each on one ``bl.HessianOperator`` (one gradient
    graph): on ``H`` (→ λ_max), then on ``λ_max·I − H`` (→ λ_max − λ_min). The Neumann series
    converges iff every eigenvalue of ``α(H + δI)`` lies in (0, 2): ``δ = 1.5·max(0, −λ_min)`` and
    ``α = 0.5/(λ_max + δ)``, the 0.5 a margin for other batches and later weights.
    """
    x, y = batch
    params = {k: v.detach() for k, v in model.named_parameters()}
    data_loss = lambda p, h, xb, yb: F.cross_entropy(torch.func.functional_call(model, p, (xb,)), yb)
    op = bl.HessianOperator(data_loss, params, hparams, (x, y), penalty=penalty)
    like = torch.zeros(op.flat.size)
    lam_max = float(bl.solvers.power_iteration(op.matvec_flat, like, iters=iters, seed=1))
    shifted = lambda v: lam_max * v - op.matvec_flat(v)
    lam_min = lam_max - float(bl.solvers.power_iteration(shifted, like, iters=iters, seed=2))
    damping = 1.5 * max(0.0, -lam_min)
    return lam_max, lam_min, damping, 0.5 / (lam_max + damping)


# --------------------------------------------------------------------------------------- main
def main(hidden: int = 3150, hyper_steps: int = 3, inner_per_hyper: int = 3, warmup: int = 30,
         batch_size: int = 128, power_iters: int = 20, seed: int = 0, threads: int = 1,
         verbose: bool = True) -> dict:
    """Build the 64-hidden-hidden-10 MLP with one decay per weight, warm it up, then time and measure
    ``hyper_steps`` hyper steps (``inner_per_hyper`` inner steps before each). Returns the figures."""
    say = print if verbose else (lambda *a, **k: None)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    d_in, classes = 64, 10
    Xtr, ytr = teacher_data(4096, d_in, classes, 2 * seed, teacher_seed=seed)
    Xva, yva = teacher_data(1024, d_in, classes, 2 * seed + 1, teacher_seed=seed)
    train, val = batches(Xtr, ytr, batch_size, seed), batches(Xva, yva, 2 * batch_size, seed + 1)

    model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, classes))
    hparams, penalty = bl.hparams.weight_decay(model, init=1e-4, per="parameter")   # raw λ_i, decay e^λ_i
    n_weights = sum(p.numel() for p in model.parameters())
    n_hparams = sum(v.numel() for v in hparams.values())
    say(f"MLP {d_in}-{hidden}-{hidden}-{classes}: {n_weights:,} weights, {n_hparams:,} hyperparameters "
        f"(one decay each); {threads} thread(s)")

    data_loss = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])       # the decays go in penalty=
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outer_opt = torch.optim.Adam(hparams.values(), lr=0.05)
    warm = bl.HyperOptimizer(model, hparams, inner_loss=data_loss, outer_loss=data_loss,
                             inner_optimizer=inner_opt, outer_optimizer=outer_opt, penalty=penalty,
                             method=bl.Implicit())
    t0 = time.perf_counter()
    for _ in range(warmup):                      # the IFT assumes weights near an inner minimum
        warm.inner_step(next(train))
    def val_ce() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(Xva), yva))

    val_warm = val_ce()
    say(f"warm-up: {warmup} inner steps in {time.perf_counter() - t0:.1f} s (val CE {val_warm:.4f}; "
        f"chance {math.log(classes):.4f})")

    t0 = time.perf_counter()
    lam_max, lam_min, damping, alpha = neumann_settings(model, hparams, penalty, next(train), power_iters)
    say(f"Hessian eigenvalues (power iteration, one batch, {2 * power_iters} products in "
        f"{time.perf_counter() - t0:.1f} s): λ_max ≈ {lam_max:.3g}, λ_min ≈ {lam_min:.3g}  ->  "
        f"Neumann(steps=10, alpha={alpha:.3g}, damping={damping:.3g})")
    hopt = bl.HyperOptimizer(model, hparams, inner_loss=data_loss, outer_loss=data_loss,
                             inner_optimizer=inner_opt, outer_optimizer=outer_opt, penalty=penalty,
                             method=bl.Implicit(solver=bl.Neumann(steps=10, alpha=alpha, damping=damping)),
                             on_error="skip")
    hopt.inner_step(next(train))                 # warm-up of both calls: Adam's state, lazy inits
    hopt.hyper_step(next(train), next(val))

    inner_s, inner_cpu, inner_mb, hyper_s, hyper_cpu, hyper_mb, val_ces = [], [], [], [], [], [], []
    for k in range(hyper_steps):
        for _ in range(inner_per_hyper):
            b = next(train)
            s, cpu, mb = measured(lambda: hopt.inner_step(b))
            inner_s.append(s)
            inner_cpu.append(cpu)
            inner_mb.append(mb)
        b, vb = next(train), next(val)
        s, cpu, mb = measured(lambda: hopt.hyper_step(b, vb))
        hyper_s.append(s)
        hyper_cpu.append(cpu)
        hyper_mb.append(mb)
        st = hopt.last_stats
        val_ces.append(val_ce())
        say(f"  hyper step {k + 1}: {s:6.2f} s ({cpu:5.2f} s CPU), peak RSS growth {mb:7.1f} MB  ({st.matvecs} Hessian products, "
            f"|hypergrad| {st.hypergrad_norm:.2e}, val CE {val_ces[-1]:.4f}{', SKIPPED' if st.skipped else ''})")

    mem_ratio = max(hyper_mb) / max(inner_mb) if max(inner_mb) > 0 else math.nan
    weights_mb = 4 * n_weights / 2 ** 20
    say(f"inner_step: {statistics.mean(inner_s):.2f} s mean ({statistics.mean(inner_cpu):.2f} s CPU), peak RSS growth {max(inner_mb):.1f} MB max "
        f"(one float32 copy of the weights: {weights_mb:.1f} MB)")
    say(f"hyper_step: {statistics.mean(hyper_s):.2f} s mean, {max(hyper_s):.2f} s max "
        f"({statistics.mean(hyper_cpu):.2f} s CPU mean) (target < "
        f"{TIME_TARGET_S:.0f} s: {'met' if max(hyper_s) < TIME_TARGET_S else 'NOT met'}); peak RSS growth "
        f"{max(hyper_mb):.1f} MB max = {mem_ratio:.2f}x the inner step's (target < {MEMORY_TARGET:.0f}x: "
        f"{'met' if mem_ratio < MEMORY_TARGET else 'NOT met' if math.isfinite(mem_ratio) else 'not measured'})")
    if os.environ.get(MMAP_ENV) != "65536":
        say(f"NOTE: run without {MMAP_ENV}=65536: the memory figures include glibc's heap reuse")
    return {
        "hidden": hidden, "n_weights": n_weights, "n_hparams": n_hparams, "threads": threads,
        "lambda_max": lam_max, "lambda_min": lam_min, "alpha": alpha, "damping": damping,
        "inner_step_s": inner_s, "hyper_step_s": hyper_s, "inner_step_cpu_s": inner_cpu, "hyper_step_cpu_s": hyper_cpu, "inner_mb": inner_mb, "hyper_mb": hyper_mb,
        "hyper_step_s_mean": statistics.mean(hyper_s), "hyper_step_s_max": max(hyper_s),
        "inner_step_s_mean": statistics.mean(inner_s), "mem_ratio": mem_ratio, "weights_mb": weights_mb,
        "val_ce_warm": val_warm, "val_ce": val_ces, "skipped": hopt.skipped, "hvps_per_hyper_step": hopt.last_stats.matvecs,
        "time_target_met": max(hyper_s) < TIME_TARGET_S,
        "mem_target_met": (mem_ratio < MEMORY_TARGET) if math.isfinite(mem_ratio) else None,
        "mmap_threshold": os.environ.get(MMAP_ENV),
    }


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=3150, help="width of both hidden layers (3150: 10,161,910 weights)")
    ap.add_argument("--hyper-steps", type=int, default=3, help="measured hyper steps")
    ap.add_argument("--inner-per-hyper", type=int, default=3, help="measured inner steps before each hyper step")
    ap.add_argument("--warmup", type=int, default=30, help="inner steps before the measurements")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--power-iters", type=int, default=20, help="products per power iteration (α, damping)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line, nothing else")
    return ap


if __name__ == "__main__":
    args = _parser().parse_args()
    if os.environ.get(MMAP_ENV) is None and can_measure_memory():
        # glibc reads the threshold at start-up: run again with it set (see the module docstring)
        env = {**os.environ, MMAP_ENV: "65536", "OMP_NUM_THREADS": str(args.threads)}
        sys.exit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)
    out = main(hidden=args.hidden, hyper_steps=args.hyper_steps, inner_per_hyper=args.inner_per_hyper,
               warmup=args.warmup, batch_size=args.batch_size, power_iters=args.power_iters, seed=args.seed,
               threads=args.threads, verbose=not args.json)
    if args.json:
        print(json.dumps(out))
