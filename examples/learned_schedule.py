"""Learn a learning-rate schedule for a fixed budget of T steps by metagradient descent.

    python examples/learned_schedule.py            # T = 200, 40 metagradient steps (a minute or two)
    python examples/learned_schedule.py --smoke    # seconds (CI)

A small MLP (64-32-10, tanh) is trained on scikit-learn's bundled digits (1,797 8×8 images:
1,000 train, 400 validation, 397 test) by SGD with momentum 0.9, minibatches of 64, for exactly
T steps. The learning rate has one value per block of 10 steps, ``bl.inner.Schedule("lr",
block=10)``; its metagradient (the derivative of the validation loss after the *whole run* with
respect to every block's rate) comes from ``bl.unrolled_hypergrad(mode="replay")``, which stores
O(log T) states instead of T. Adam on the schedule, clamped to [0, 1].

Baselines at the same T and batches, each tuned on the validation loss by a small grid of peak
rates (0.01, 0.03, 0.1, 0.3, 1.0): constant, step (×0.1 at 50% and 75% of the run) and cosine.
Reports the test loss of each and saves a plot of the learned schedule.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl

GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


def data(seed: int = 0):
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    return (X[:1000], y[:1000]), (X[1000:1400], y[1000:1400]), (X[1400:], y[1400:])


def baseline_lrs(kind: str, peak: float, T: int) -> torch.Tensor:
    t = torch.arange(T, dtype=torch.float32)
    if kind == "constant":
        return torch.full((T,), peak)
    if kind == "step":
        return peak * torch.where(t < T // 2, 1.0, torch.where(t < 3 * T // 4, 0.1, 0.01))
    return peak * 0.5 * (1 + torch.cos(math.pi * t / T))        # cosine


def main(smoke: bool = False, steps: int = 200, meta_steps: int = 40, seed: int = 0, plot: str = "learned_schedule.png",
         verbose: bool = True, block: int = 10) -> dict[str, Any]:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    T, meta_steps, block, grid = (20, 2, 5, (0.1,)) if smoke else (steps, meta_steps, block, GRID)
    (X, y), (Xv, yv), (Xt, yt) = data(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    order = torch.cat([torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + e))
                       for e in range(T * 64 // len(y) + 1)])
    batch = lambda t: (order[t * 64:(t + 1) * 64],)
    inner = lambda p, h, idx: F.cross_entropy(functional_call(net, p, (X[idx],)), y[idx])
    outer = lambda p, h: F.cross_entropy(functional_call(net, p, (Xv,)), yv)
    test_loss = lambda p: float(F.cross_entropy(functional_call(net, p, (Xt,)), yt))

    def run(lrs: torch.Tensor, blk: int, mode: str = "replay"):
        opt = bl.inner.SGD(lr=bl.inner.Schedule("lr", block=blk), momentum=0.9)
        return bl.unrolled_hypergrad(inner, outer, params, {"lr": lrs}, optimizer=opt, steps=T, mode=mode,
                                     inner_args=batch, check_finite=False)

    def final(lrs: torch.Tensor, blk: int) -> tuple[float, float]:
        hg, w = run(lrs, blk, mode="reverse")              # T states fit here; replay gives the same
        val = hg.info.outer_loss
        return (val, test_loss(w)) if math.isfinite(val) else (math.inf, math.inf)

    # baselines: a grid of peak rates per schedule shape, chosen on the validation loss
    results: dict[str, dict[str, float]] = {}
    for kind in ("constant", "step", "cosine"):
        best = min(((final(baseline_lrs(kind, peak, T), 1), peak) for peak in grid), key=lambda r: r[0][0])
        (val, test), peak = best
        results[kind] = {"val": val, "test": test, "peak": peak}
    # learned: start from the best constant rate, metagradient descent on one rate per block
    n = -(-T // block)
    lrs = torch.full((n,), results["constant"]["peak"]).requires_grad_()
    meta = torch.optim.Adam([lrs], lr=0.02 * results["constant"]["peak"] / 0.1)
    history = []
    for r in range(meta_steps):
        hg, _ = run(lrs.detach(), block)
        history.append(hg.info.outer_loss)
        meta.zero_grad()
        lrs.grad = hg["lr"]
        meta.step()
        with torch.no_grad():
            lrs.clamp_(0.0, 1.0)
        if verbose and (r % 10 == 0 or r == meta_steps - 1):
            print(f"meta step {r:3d}: validation loss {hg.info.outer_loss:.4f}, "
                  f"stored states {hg.info.stored_states_max}, steps evaluated {hg.info.forward_steps} (T={T})")
    val, test = final(lrs.detach(), block)
    results["learned"] = {"val": val, "test": test, "peak": float(lrs.detach().max())}
    if verbose:
        print(f"\nT = {T} steps, test cross-entropy (validation in brackets):")
        for k, v in results.items():
            print(f"  {k:9s} {v['test']:.4f}  ({v['val']:.4f})  peak lr {v['peak']:.3g}")
    if plot and not smoke:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        t = torch.arange(T)
        ax.step(t, lrs.detach().repeat_interleave(block)[:T], where="post", label="learned")
        for kind in ("constant", "step", "cosine"):
            ax.plot(t, baseline_lrs(kind, results[kind]["peak"], T), "--", label=f"{kind} (tuned)")
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        if verbose:
            print(f"saved {plot}")
    return {"results": results, "schedule": lrs.detach().tolist(), "history": history, "T": T}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--meta-steps", type=int, default=40)
    ap.add_argument("--block", type=int, default=10, help="steps per learned rate (T / block rates)")
    ap.add_argument("--seed", type=int, default=0, help="data split, initialization and minibatch order")
    ap.add_argument("--plot", default="learned_schedule.png")
    a = ap.parse_args()
    main(smoke=a.smoke, steps=a.steps, meta_steps=a.meta_steps, seed=a.seed, plot=a.plot, block=a.block)
