"""Declared structure instead of double backward: the closed-form products and when they pay.

    python examples/closed_form_products.py           # about a minute
    python examples/closed_form_products.py --smoke   # a few seconds (CI)

Three cases, each checked against the autograd path on the same problem (same hypergradient to
rounding) and timed in the same process, median of back-to-back pairs:

1. Logistic regression with one L2 decay per feature: ``bl.losses.Logistic`` (closed-form
   ``H v``, the row curvatures cached once per point) plus the decays as ``penalty=``: the
   whole implicit hypergradient runs without second-order autograd.
2. A linear softmax head with many classes: ``bl.kernels.linear_ce_hvp`` computes ``H v`` in row
   chunks instead of materializing several batch × classes tensors.
3. An MLP with one decay per weight: the decay as ``penalty=`` (Hessian ``d ⊙ v``, mixed term
   in closed form) instead of inside the loss.

On CUDA with Triton installed, the same calls run the Triton kernels (``backend="auto"``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl

# The paired timing of the benchmark suite (one copy of it), from the repository's benchmarks/ folder.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _measure import paired_ratio  # noqa: E402


def speedup(fast: Callable[[], Any], slow: Callable[[], Any], pairs: int) -> float:
    """Median of ``time(slow) / time(fast)`` over back-to-back pairs (robust to machine drift), after a warm-up."""
    fast(), slow()
    return paired_ratio(slow, fast, pairs)


def rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).double().square().sum()) for k in a) ** 0.5
    return num / max(sum(float(b[k].double().square().sum()) for k in b) ** 0.5, 1e-300)


def logistic_case(n: int, d: int, pairs: int) -> dict:
    g = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(n, d, generator=g), torch.randn(n // 2, d, generator=g)
    wt = torch.randn(d, generator=g) / d ** 0.5
    y, yv = (torch.rand(n, generator=g) < torch.sigmoid(X @ wt)).float(), (torch.rand(n // 2, generator=g) < torch.sigmoid(Xv @ wt)).float()
    loss = bl.losses.Logistic()
    hp, pen = bl.hparams.weight_decay({"w": torch.zeros(d)}, init=1e-2, per="parameter")
    w = torch.zeros(d, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=100, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = loss({"w": w}, hp, X, y) + pen({"w": w}, hp)
        f.backward()
        return f
    opt.step(closure)
    p = {"w": w.detach()}
    kw = dict(solver=bl.CG(maxiter=10, tol=0.0), inner_args=(X, y), outer_args=(Xv, yv))
    closed = lambda: bl.implicit_hypergrad(loss, loss, p, hp, penalty=pen, **kw)
    auto = lambda: bl.implicit_hypergrad(lambda q, h, X, y: loss(q, h, X, y) + pen(q, h), loss, p, hp,
                                         hvp_mode="reverse", **kw)
    a, b = closed(), auto()
    return {"case": f"logistic regression, {n} × {d}, {d} decays", "mode": a.info.hvp_mode,
            "rel_diff": rel(a, b), "speedup": speedup(closed, auto, pairs)}


def linear_ce_case(B: int, D: int, C: int, pairs: int) -> dict:
    g = torch.Generator().manual_seed(1)
    X, W, V = torch.randn(B, D, generator=g), 0.1 * torch.randn(C, D, generator=g), torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    chunked = lambda: bl.kernels.linear_ce_hvp(X, W, V)
    auto = lambda: bl.hvp(lambda p: F.cross_entropy(X @ p["W"].T, y), {"W": W}, {"W": V}, mode="reverse")
    a, b = chunked(), auto()["W"]
    return {"case": f"linear softmax head, B={B}, D={D}, C={C}", "mode": "linear_ce_hvp",
            "rel_diff": float((a - b).norm() / b.norm()), "speedup": speedup(chunked, auto, pairs),
            "chunk_rows": bl.kernels.linear_ce.default_chunk_rows(B, C)}


def penalty_case(width: int, pairs: int) -> dict:
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.Tanh(), torch.nn.Linear(width, 10))
    hp, pen = bl.hparams.weight_decay(net, init=1e-2, per="parameter")
    p = {k: v.detach() for k, v in net.named_parameters()}
    X, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    data = lambda q, h, X, y: F.cross_entropy(functional_call(net, q, (X,)), y)
    kw = dict(solver=bl.CG(maxiter=10, tol=0.0, damping=1.0), inner_args=(X, y), outer_args=(X, y))
    split = lambda: bl.implicit_hypergrad(data, data, p, hp, penalty=pen, **kw)
    inside = lambda: bl.implicit_hypergrad(lambda q, h, X, y: data(q, h, X, y) + pen(q, h), data, p, hp, **kw)
    a, b = split(), inside()
    n = sum(v.numel() for v in hp.values())
    return {"case": f"MLP 64-{width}-10, {n:,} per-weight decays", "mode": "penalty=",
            "rel_diff": rel(a, b), "speedup": speedup(split, inside, pairs)}


def main(smoke: bool = False, verbose: bool = True) -> dict:
    torch.set_num_threads(1)
    pairs = 3 if smoke else 15
    rows = [logistic_case(*((200, 20) if smoke else (8192, 256)), pairs),
            linear_ce_case(*((64, 8, 500) if smoke else (2048, 16, 32768)), pairs),
            penalty_case(32 if smoke else 1024, pairs)]
    if verbose:
        print(f"{'case':<44} {'path':<14} {'rel. diff vs autograd':>22} {'autograd time / this':>22}")
        for r in rows:
            print(f"{r['case']:<44} {r['mode']:<14} {r['rel_diff']:>22.1e} {r['speedup']:>21.2f}x")
    return {"rows": rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    main(smoke=ap.parse_args().smoke)
