"""One weight decay per weight of a 1.1M-weight MLP: 1.1 million hyperparameters, tuned online.

    python examples/millions_of_hyperparameters.py            # default size (~45 s, 1 thread)
    python examples/millions_of_hyperparameters.py --smoke    # a few seconds (CI)

Inner problem:  w*(λ) = argmin_w  CE_train(w) + ½ Σ_i exp(λ_i) w_i²     (one λ_i per weight w_i)
Outer problem:  min_λ  CE_val(w*(λ))

The hypergradient comes from the implicit function theorem with a 10-term Neumann
series (Lorraine et al. 2020): ``bl.Implicit(solver=bl.Neumann(steps=10, alpha=α))``,
which costs 10 Hessian-vector products on one gradient graph plus one mixed product,
whatever the number of hyperparameters. ``bl.HyperOptimizer`` interleaves it with
ordinary SGD steps: ``inner_step`` trains, ``hyper_step`` updates the decays.

The point of the example is the cost. It measures, after warm-up:

* time:   mean seconds of ``hyper_step`` / mean seconds of ``inner_step``
          (target: ≤ 20 training steps for Neumann(10));
* memory: peak RSS growth during a ``hyper_step`` / peak RSS growth during an
          ``inner_step`` (target: ≤ 4x). Read from Linux's /proc/self/status
          (VmHWM, the high-water mark, minus VmRSS just before the call); the mark is
          reset by writing "5" to /proc/self/clear_refs before every measured call.

It prints whether each target is met; nothing is adjusted to make it so. Measured on a shared
2-core CPU box (torch 2.13, one thread): one hyper step ≈ 17.5-21 inner steps over several runs
(the target is met narrowly, not with margin: each of the 10 Hessian-vector products costs ~1.3
inner steps, because the decay penalty's double backward adds ~25% to the MLP's), and peak
memory growth ≈ 3.1x (hyper step 53 MB, inner step 16.9 MB; 3.6-3.7x before the hyper step stopped copying the outer
gradient and keeping the previous Neumann product; the inner step itself materializes ~4
weight-sized tensors for the per-weight penalty and its gradient).

What the decays learn in this short run is small (val CE 0.537 tuned vs 0.551 with the decays
frozen at 1e-4, same batches, same test accuracy): this is a cost demonstration; a real run
tunes for longer. Data: scikit-learn's bundled ``load_digits`` (no download).
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
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call

import bilevel as bl

TIME_TARGET = 20.0    # hyper step ≤ 20 inner steps (Neumann, 10 terms)
MEMORY_TARGET = 4.0   # peak memory growth of a hyper step ≤ 4x that of an inner step


# ----------------------------------------------------------------------------------------- data
def load_data(seed: int = 0):
    """Digits, standardized with the train statistics; 600 train / 600 val / 597 test."""
    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    X = torch.tensor(X, dtype=torch.float32)[perm]
    y = torch.tensor(y, dtype=torch.long)[perm]
    tr, va, te = slice(0, 600), slice(600, 1200), slice(1200, None)
    mean, std = X[tr].mean(0), X[tr].std(0).clamp_min(1e-3)
    X = (X - mean) / std
    return (X[tr], y[tr]), (X[va], y[va]), (X[te], y[te])


def batches(X, y, size, g):
    """An endless stream of shuffled minibatches."""
    while True:
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - size + 1, size):
            idx = perm[i:i + size]
            yield X[idx], y[idx]


# ------------------------------------------------------------------------------------ helpers
def extreme_eigenvalues(loss_fn, params, args, iters=20, seed=0):
    """(λ_max, λ_min) of the inner Hessian by power iterations on ``bl.HessianOperator``.

    One gradient graph serves all 2·iters products: first on H (→ λ_max), then on λ_max·I − H
    (→ λ_max − λ_min). The Neumann series needs 0 < α·eig(H + damping·I) < 2 (DESIGN.md §1).
    """
    op = bl.HessianOperator(loss_fn, params, None, args)
    g = torch.Generator().manual_seed(seed)

    def power(matvec):
        v = torch.randn(op.flat.size, generator=g)
        v /= v.norm()
        lam = 0.0
        for _ in range(iters):
            hv = matvec(v)
            lam = float(v @ hv)
            v = hv / hv.norm()
        return lam

    lam_max = power(op.matvec_flat)
    lam_min = lam_max - power(lambda v: lam_max * v - op.matvec_flat(v))
    return lam_max, lam_min


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key))


def can_measure_memory() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)


def peak_growth_mb(fn) -> float:
    """Peak RSS growth (MB) while ``fn()`` runs: VmHWM after − VmRSS before (high-water mark reset first)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")                            # reset VmHWM to the current RSS
    before = _status_kb("VmRSS:")
    fn()
    return (_status_kb("VmHWM:") - before) / 1024


def accuracy(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------------------- setup
def build(hidden: int, seed: int, lr: float = 0.01, tune: bool = True):
    """The model, its 1.1M decays, the losses, both optimizers and the HyperOptimizer (α found here).

    ``tune=False`` stops after the warm-up and returns what the untuned baseline needs."""
    torch.manual_seed(seed)
    data = load_data(seed)
    (Xtr, ytr), _, _ = data
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    # One raw hyperparameter per weight (biases included): decay_i = exp(raw_i) > 0, start 1e-4.
    hparams, penalty = bl.hparams.weight_decay(model, init=1e-4, per="parameter")

    def inner_loss(m, h, batch):                    # ordinary PyTorch; the library swaps the weights in
        x, y = batch
        return F.cross_entropy(m(x), y) + penalty(m, h)

    def outer_loss(m, h, batch):
        x, y = batch
        return F.cross_entropy(m(x), y)

    inner_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    outer_opt = torch.optim.Adam(hparams.values(), lr=0.05)
    # separate generators: the baseline (no validation batches drawn) sees the same training batches
    streams = (batches(Xtr, ytr, 128, torch.Generator().manual_seed(seed)),
               batches(data[1][0], data[1][1], 256, torch.Generator().manual_seed(seed + 1)))

    # Warm up the weights first: the IFT assumes we are near a minimum of the inner loss.
    for _ in range(30):
        x, y = next(streams[0])
        loss = inner_loss(model, hparams, (x, y))
        inner_opt.zero_grad()
        loss.backward()
        inner_opt.step()
    for v in hparams.values():
        v.grad = None
    if not tune:
        return model, hparams, penalty, inner_opt, data, streams
    # Neumann step α and damping. The series Σ (I − αA)^j b, A = H + damping·I, converges iff every
    # eigenvalue of α·A lies in (0, 2). Early in training H has negative curvature (a small MLP after
    # a few steps: λ_min ≈ −0.7·λ_max; this 1M-weight one: ≈ −0.005·λ_max); the library then raises
    # DivergenceError rather than return garbage. So, once, on the full train set: damping = 1.5·|λ_min|
    # (zero if H is positive definite) and α = 0.5/(λ_max + damping), the 0.5 a margin for minibatch
    # Hessians and later weights. alpha=None would spend 20 more products in *every* hyper step.
    params = {k: v.detach() for k, v in model.named_parameters()}
    full = lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y) + penalty(p, hparams)
    lam_max, lam_min = extreme_eigenvalues(full, params, (Xtr, ytr))
    damping = 1.5 * max(0.0, -lam_min)
    alpha = 0.5 / (lam_max + damping)

    hopt = bl.HyperOptimizer(
        model, hparams, inner_loss=inner_loss, outer_loss=outer_loss,
        inner_optimizer=inner_opt, outer_optimizer=outer_opt,
        method=bl.Implicit(solver=bl.Neumann(steps=10, alpha=alpha, damping=damping)),
        on_error="skip",          # should the series diverge anyway, skip that hyper step (with a warning)
    )
    return model, hparams, hopt, data, streams, (lam_max, lam_min, damping, alpha)


def measure_memory(hidden: int, seed: int, repeats: int) -> dict:
    """Peak RSS growth of ``inner_step`` and ``hyper_step`` (MB). Run in a fresh process whose
    glibc maps every allocation above 64 KiB on its own (MALLOC_MMAP_THRESHOLD_=65536), so that a
    freed tensor leaves the RSS and the next call's growth is really its own (see ``main``)."""
    _, _, hopt, _, (train, val), _ = build(hidden, seed)
    for _ in range(2):                             # warm-up: optimizer states, lazy inits
        b = next(train)
        hopt.inner_step(b)
        hopt.hyper_step(b, next(val))
    inner = max(peak_growth_mb(lambda: hopt.inner_step(next(train))) for _ in range(repeats))
    hyper = max(peak_growth_mb(lambda: hopt.hyper_step(next(train), next(val))) for _ in range(repeats))
    return {"inner_mb": inner, "hyper_mb": hyper}


def memory_in_subprocess(hidden: int, seed: int, threads: int, repeats: int) -> dict:
    # NOTE: measuring in this process would be wrong. glibc's malloc keeps freed blocks and reuses
    # them, so after a few steps a call's RSS growth is ~0 however much it allocates; mallopt()
    # called now would not help either (free blocks already in the heap are still reused).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory", "--hidden", str(hidden), "--seed", str(seed),
           "--threads", str(threads), "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------- main
def main(smoke: bool = False, seed: int = 0, threads: int = 1, verbose: bool = True) -> dict:
    """Tune one decay per weight; measure the cost of a hyper step. Returns the figures as a dict."""
    say = print if verbose else (lambda *a, **k: None)
    # NOTE: one thread by default. The figures are ratios of two costs measured in one process;
    # with torch's OpenMP threads, any other process on the machine (a test run, a build) stalls the
    # threads' barriers and inflates the timings erratically (measured: a 30 ms gradient took
    # 290 ms on a loaded 2-core box). `--threads 2` uses both cores on a quiet machine.
    torch.set_num_threads(threads)
    hidden = 128 if smoke else 1024                 # 1024: 1,126,410 weights (and as many decays)
    train_steps = 20 if smoke else 200              # inner steps of the tuning run
    hyper_every = 10
    rounds = 2 if smoke else 15                     # timing rounds: 4 inner steps + 1 hyper step each

    t_start = time.perf_counter()
    model, hparams, hopt, data, (train, val), (lam_max, lam_min, damping, alpha) = build(hidden, seed)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = data
    n_weights = sum(p.numel() for p in model.parameters())
    n_hparams = sum(v.numel() for v in hparams.values())
    say(f"MLP 64-{hidden}-{hidden}-10: {n_weights:,} weights, {n_hparams:,} hyperparameters (one decay each)")
    say(f"Hessian eigenvalues (power iteration, full train set): λ_max ≈ {lam_max:.3g}, λ_min ≈ {lam_min:.3g}"
        f"  ->  Neumann(steps=10, alpha={alpha:.3g}, damping={damping:.3g})")

    def val_ce() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(Xva), yva))

    val_before = val_ce()
    # ---- the tuning run: an inner step every batch, a hyper step every `hyper_every` ------------
    for step in range(1, train_steps + 1):
        batch = next(train)
        hopt.inner_step(batch)
        if step % hyper_every == 0:
            st = hopt.hyper_step(batch, next(val))
            if step % (5 * hyper_every) == 0 or (smoke and step == train_steps):
                decays = torch.cat([v.detach().exp().reshape(-1) for v in hparams.values()])
                say(f"  step {step:4d}  val CE {val_ce():.4f}  |hypergrad| {st.hypergrad_norm:.2e}  "
                    f"inner |grad| {st.inner_grad_norm:.2e}  decays: median {decays.median():.2e}, "
                    f"range [{decays.min():.2e}, {decays.max():.2e}]")
    val_after = val_ce()
    test_acc = accuracy(model, Xte, yte)
    say(f"tuning run: {train_steps} inner + {train_steps // hyper_every} hyper steps; val CE {val_before:.4f} -> "
        f"{val_after:.4f}, test accuracy {test_acc:.1%} ({hopt.skipped} hyper steps skipped)")
    # The same training run (same init, same batches) with the decays left at 1e-4: what the decays
    # learned in these few hyper steps are worth. (The example is about cost; a real run is longer.)
    b_model, b_hp, b_penalty, b_opt, _, (b_train, _) = build(hidden, seed, tune=False)
    for _ in range(train_steps):
        x, y = next(b_train)
        loss = F.cross_entropy(b_model(x), y) + b_penalty(b_model, b_hp)
        b_opt.zero_grad()
        loss.backward()
        b_opt.step()
    with torch.no_grad():
        val_untuned = float(F.cross_entropy(b_model(Xva), yva))
    test_acc_untuned = accuracy(b_model, Xte, yte)
    say(f"untuned baseline (decays fixed at 1e-4, same batches): val CE {val_untuned:.4f}, "
        f"test accuracy {test_acc_untuned:.1%}")

    # ---- time: individually timed calls, interleaved (4 inner steps, 1 hyper step) per round so
    # that slow drifts of the machine's load hit both alike; everything above was the warm-up.
    t_inner, t_hyper = [], []
    for _ in range(rounds):
        for _ in range(4):
            b = next(train)
            t = time.perf_counter()
            hopt.inner_step(b)
            t_inner.append(time.perf_counter() - t)
        b, vb = next(train), next(val)
        t = time.perf_counter()
        hopt.hyper_step(b, vb)
        t_hyper.append(time.perf_counter() - t)
    time_ratio = statistics.mean(t_hyper) / statistics.mean(t_inner)
    median_ratio = statistics.median(t_hyper) / statistics.median(t_inner)   # less sensitive to load spikes
    stats = hopt.last_stats
    say(f"time:   inner_step {1e3 * statistics.mean(t_inner):.1f} ms, hyper_step {1e3 * statistics.mean(t_hyper):.1f} ms "
        f"({stats.matvecs} Hessian-vector products)  ->  one hyper step = {time_ratio:.1f} training steps "
        f"(target ≤ {TIME_TARGET:.0f}: {'met' if time_ratio <= TIME_TARGET else 'NOT met'}; ratio of medians "
        f"{median_ratio:.1f})")

    # ---- memory: peak RSS growth of one call (in a fresh process, see memory_in_subprocess) ------
    mem = {"inner_mb": math.nan, "hyper_mb": math.nan}
    if smoke:
        say("memory: skipped in smoke mode (a 26k-weight model is below what the RSS resolves)")
    elif not can_measure_memory():
        say("memory: not measured (needs Linux /proc/self/clear_refs)")
    else:
        mem = memory_in_subprocess(hidden, seed, threads, repeats=3)
    mem_ratio = mem["hyper_mb"] / mem["inner_mb"] if mem["inner_mb"] > 0 else math.nan
    p_mb = 4 * n_weights / 2 ** 20
    if math.isfinite(mem_ratio):
        say(f"memory: peak RSS growth inner_step {mem['inner_mb']:.1f} MB, hyper_step {mem['hyper_mb']:.1f} MB "
            f"(one float32 copy of the weights: {p_mb:.1f} MB)  ->  {mem_ratio:.1f}x "
            f"(target ≤ {MEMORY_TARGET:.0f}: {'met' if mem_ratio <= MEMORY_TARGET else 'NOT met'})")
    seconds = time.perf_counter() - t_start
    say(f"total {seconds:.1f} s")
    return {
        "n_weights": n_weights, "n_hparams": n_hparams, "alpha": alpha, "damping": damping,
        "lambda_max": lam_max, "lambda_min": lam_min,
        "val_ce_before": val_before, "val_ce_after": val_after, "test_accuracy": test_acc,
        "val_ce_untuned": val_untuned, "test_accuracy_untuned": test_acc_untuned,
        "inner_step_s": statistics.mean(t_inner), "hyper_step_s": statistics.mean(t_hyper),
        "hvps_per_hyper_step": stats.matvecs,
        "time_ratio": time_ratio, "time_ratio_medians": median_ratio, "time_target_met": time_ratio <= TIME_TARGET,
        "mem_inner_mb": mem["inner_mb"], "mem_hyper_mb": mem["hyper_mb"], "mem_ratio": mem_ratio,
        "mem_target_met": (mem_ratio <= MEMORY_TARGET) if math.isfinite(mem_ratio) else None,
        "skipped": hopt.skipped, "seconds": seconds,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="small MLP and few steps (a few seconds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see main)")
    ap.add_argument("--_memory", action="store_true", help=argparse.SUPPRESS)   # the memory subprocess
    ap.add_argument("--hidden", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._memory:
        torch.set_num_threads(a.threads)
        print(json.dumps(measure_memory(a.hidden, a.seed, a.repeats)))
    else:
        main(smoke=a.smoke, seed=a.seed, threads=a.threads)
