"""Are long-horizon metagradients informative? Their norm and their agreement with finite differences as T grows.

Problem: the data-selection task of ``examples/data_selection.py`` (MNIST-1D generated locally,
30% of the training labels flipped, MLP 40-128-128-10 with tanh, minibatches of 128, SGD with
momentum 0.9), in float64. The metagradient ``g = dL_V/dλ`` of the validation loss after T steps
with respect to the 4,000 per-example logits ``λ`` (at ``λ = 0``, uniform weights) comes from
``bl.unrolled_hypergrad(mode="replay")``, exact reverse mode.

Agreement: ``m`` random directions ``v_i`` (entries ±1), central finite differences
``d_i = [L_V(λ + εv_i) − L_V(λ − εv_i)] / 2ε`` against the predictions ``p_i = ⟨g, v_i⟩``;
reported as the cosine between the vectors ``p`` and ``d`` and the relative error ``‖p − d‖/‖d‖``.
Two step sizes: ``ε = 1e-6`` (the local derivative: agreement here says the metagradient is the
derivative of the run) and ``ε = 1e-2`` (a finite step, 1% on each example's weight, small
next to a metagradient-descent step: agreement here says the derivative predicts what a step
does, i.e. the training run is *metasmooth* in the sense of Engstrom et al. 2025).

Settings, each one change away from ``plain`` (the data-selection example's training) or a
combination:

* ``plain``: constant lr 0.1.
* ``large-lr``: constant lr 0.4 (closer to the edge of stability).
* ``warmup``: lr 0.1 after a linear warm-up over the first 10% of the steps.
* ``norm-pre`` / ``norm-post``: LayerNorm (no affine) before / after each tanh.
* ``smooth``: lr 0.05, warm-up over 10%, LayerNorm before each tanh.

Run::

    python benchmarks/long_horizon_stability.py [--steps 10 100 1000] [--settings plain smooth ...]
    python benchmarks/long_horizon_stability.py --smoke      # seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl

SETTINGS: dict[str, dict[str, Any]] = {
    "plain": {"lr": 0.1, "warmup": 0.0, "norm": None},
    "large-lr": {"lr": 0.4, "warmup": 0.0, "norm": None},
    "warmup": {"lr": 0.1, "warmup": 0.1, "norm": None},
    "norm-pre": {"lr": 0.1, "warmup": 0.0, "norm": "pre"},
    "norm-post": {"lr": 0.1, "warmup": 0.0, "norm": "post"},
    "smooth": {"lr": 0.05, "warmup": 0.1, "norm": "pre"},
}
EPSILONS = (1e-6, 1e-2)


def problem(setting: str, T: int, seed: int = 0, smoke: bool = False) -> dict[str, Any]:
    """The pieces of one setting: losses, start, hyperparameters (logits and the fixed lr schedule)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from data_selection import mlp, noisy_task
    cfg = SETTINGS[setting]
    # smoke: random data of MNIST-1D's shapes (600 train + 100 validation rows), no generator
    data = ((torch.randn(700, 40), torch.randint(0, 10, (700,))), (torch.randn(10, 40), torch.randint(0, 10, (10,)))) \
        if smoke else None
    task = noisy_task(seed, T, smoke=smoke, make_net=lambda: mlp(cfg["norm"]), dtype=torch.float64, data=data)
    warm = max(1, round(cfg["warmup"] * T)) if cfg["warmup"] else 0
    t = torch.arange(T, dtype=torch.float64)
    lrs = cfg["lr"] * (torch.clamp((t + 1) / warm, max=1.0) if warm else torch.ones(T, dtype=torch.float64))
    opt = bl.inner.SGD(lr=bl.inner.Schedule("lr"), momentum=0.9)
    hp = {"example_logits": torch.zeros(task.n, dtype=torch.float64), "lr": lrs}
    return {"inner": task.inner, "outer": task.outer, "params": task.params, "hparams": hp, "opt": opt,
            "batch": task.batch, "n": task.n}


def final_loss(pb: dict[str, Any], logits: torch.Tensor, T: int) -> float:
    """``L_V`` after a plain training run of T steps (no graph) with the given logits."""
    h = {**pb["hparams"], "example_logits": logits}
    w, s = pb["params"], pb["opt"].init(pb["params"])
    for t in range(T):
        with torch.enable_grad():
            wl = {k: v.detach().requires_grad_() for k, v in w.items()}
            gr = torch.autograd.grad(pb["inner"](wl, h, *pb["batch"](t)), list(wl.values()))
        with torch.no_grad():
            w, s = pb["opt"].step(w, dict(zip(w, gr)), s, h)
    with torch.no_grad():
        return float(pb["outer"](w, h))


def measure(setting: str, T: int, m: int = 4, seed: int = 0, smoke: bool = False) -> dict[str, Any]:
    """Norm of the metagradient and its agreement with central differences along ``m`` directions."""
    pb = problem(setting, T, seed=seed, smoke=smoke)
    t0 = time.perf_counter()
    hg, _ = bl.unrolled_hypergrad(pb["inner"], pb["outer"], pb["params"], pb["hparams"], optimizer=pb["opt"],
                                  steps=T, mode="replay", inner_args=pb["batch"], check_finite=False)
    g = hg["example_logits"]
    row: dict[str, Any] = {"setting": setting, "T": T, "outer_loss": hg.info.outer_loss,
                           "grad_norm": float(g.norm()), "replay_s": time.perf_counter() - t0}
    gen = torch.Generator().manual_seed(1234 + seed)
    dirs = [torch.randint(0, 2, (pb["n"],), generator=gen).double() * 2 - 1 for _ in range(m)]
    pred = torch.stack([g @ v for v in dirs])
    lam = pb["hparams"]["example_logits"]
    for eps in EPSILONS:
        fd = torch.tensor([(final_loss(pb, lam + eps * v, T) - final_loss(pb, lam - eps * v, T)) / (2 * eps)
                           for v in dirs], dtype=torch.float64)
        cos = float(pred @ fd / (pred.norm() * fd.norm())) if fd.norm() > 0 and pred.norm() > 0 else math.nan
        row[f"cos@{eps:g}"] = cos
        row[f"rel_err@{eps:g}"] = float((pred - fd).norm() / fd.norm()) if fd.norm() > 0 else math.nan
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--directions", type=int, default=4)
    ap.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
    ap.add_argument("--smoke", action="store_true", help="random data, 600 examples, T = 3 and 6 (CI)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps = [3, 6] if a.smoke else a.steps
    rows = []
    for T in steps:
        for s in a.settings:
            r = measure(s, T, m=2 if a.smoke else a.directions, smoke=a.smoke)
            rows.append(r)
            print(json.dumps(r), flush=True)
            if a.json:
                with open(a.json, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(r) + "\n")
    return rows


if __name__ == "__main__":
    main()
