"""The 2-D DARTS cell on a small synthetic image task (CIFAR-like shapes, generated in memory).

    python examples/darts_cifar_like.py           # about a minute on 2 CPU cores
    python examples/darts_cifar_like.py --smoke   # seconds (CI)

Images are 3×16×16: a randomly placed, randomly coloured oriented stripe patch (the class: one
of 4 orientations) on a noisy, colour-shifted background. The search space is the DARTS cell for
images (``bl.nas.Network(dim=2)``: normal and reduction cells over the 8 standard operations);
α is searched with first-order DARTS through ``bl.HyperOptimizer`` (``--method second`` for
``bl.Unrolled(steps=1)``), the cell is derived with ``bl.nas.derive`` and retrained from scratch.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Optional

import torch
import torch.nn.functional as F

import bilevel as bl

METHODS = {"first": lambda: bl.FirstOrder(), "second": lambda: bl.Unrolled(steps=1),
           "implicit": lambda: bl.Implicit(solver=bl.Neumann(steps=5, alpha=0.02))}


def make_images(n: int, *, size: int = 16, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: ``x`` of shape ``(n, 3, size, size)`` float32, ``y`` of shape ``(n,)`` in ``[0, classes)``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    theta = y.float() * math.pi / classes + 0.15 * torch.randn(n, generator=g)
    cy, cx = (torch.rand(n, 2, generator=g) * (size - 6) + 3).unbind(1)
    u = (xx[None] - cx[:, None, None]) * torch.cos(theta)[:, None, None] + \
        (yy[None] - cy[:, None, None]) * torch.sin(theta)[:, None, None]
    r2 = (xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2
    patch = torch.cos(2.2 * u) * torch.exp(-r2 / 12.0)                     # an oriented stripe blob
    colour = torch.rand(n, 3, generator=g) + 0.3
    x = colour[:, :, None, None] * patch[:, None] + 0.3 * torch.randn(n, 3, size, size, generator=g)
    x = x + 0.5 * torch.rand(n, 3, 1, 1, generator=g)                      # background colour shift
    return (x - x.mean()) / x.std(), y


def _ce(model, hparams, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def main(smoke: bool = False, seed: int = 0, method: str = "first", verbose: bool = True,
         threads: Optional[int] = None) -> dict:
    """Search, derive and retrain the 2-D cell; returns the figures."""
    say = print if verbose else (lambda *a, **k: None)
    torch.set_num_threads(threads or (1 if smoke else 2))
    torch.manual_seed(seed)
    n_train, n_test = (128, 64) if smoke else (2000, 1000)
    C, layers, nodes = (4, 3, 2) if smoke else (8, 3, 3)
    epochs, retrain_epochs, batch = (1, 1, 32) if smoke else (6, 15, 64)
    x, y = make_images(n_train, seed=seed)
    xt, yt = make_images(n_test, seed=seed + 100)
    half = n_train // 2
    train, val = (x[:half], y[:half]), (x[half:], y[half:])

    net = bl.nas.Network(3, 4, dim=2, C=C, layers=layers, nodes=nodes)
    hopt = bl.nas.darts(net, method=METHODS[method](), lr=0.05, arch_lr=6e-3)   # DARTS's optimizers
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm, vperm = torch.randperm(half, generator=g), torch.randperm(n_train - half, generator=g)
        for i in range(0, half - batch + 1, batch):
            b, vb = perm[i:i + batch], vperm[i:i + batch]
            hopt.inner_step((train[0][b], train[1][b]))
            if epoch >= epochs // 3:                          # weights warm up before α moves
                hopt.hyper_step((train[0][b], train[1][b]), (val[0][vb], val[1][vb]))
        say(f"  search epoch {epoch + 1}/{epochs}  {time.perf_counter() - t0:5.1f} s")
    search_s = time.perf_counter() - t0
    genotype = bl.nas.derive(net)
    say(f"derived cell: {[f'{k.split(chr(46))[1]}:{k.rsplit(chr(46), 1)[1]}={v}' for k, v in genotype.items() if v != 'none']}")

    child = bl.nas.Network(3, 4, dim=2, C=C, layers=layers, nodes=nodes, genotype=genotype)
    opt = torch.optim.AdamW(child.parameters(), lr=3e-3, weight_decay=1e-2)
    steps = retrain_epochs * (n_train // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    child.train()
    for _ in range(retrain_epochs):
        perm = torch.randperm(n_train, generator=g)
        for i in range(0, n_train - batch + 1, batch):
            b = perm[i:i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(child(x[b]), y[b]).backward()
            opt.step()
            sched.step()
    child.eval()
    with torch.no_grad():
        acc = float((child(xt).argmax(1) == yt).float().mean())
    say(f"search {search_s:.0f} s ({hopt.hyper_steps} α steps); derived network retrained from scratch: "
        f"test accuracy {acc:.1%} (chance 25%), {sum(p.numel() for p in child.parameters())} parameters")
    return {"genotype": genotype, "derived_test_acc": acc, "hyper_steps": hopt.hyper_steps,
            "skipped": hopt.skipped, "search_seconds": search_s, "n_edges": len(genotype), "nodes": nodes,
            "layers": layers, "parameter_free_edges": bl.nas.parameter_free_edges(genotype)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="first", choices=sorted(METHODS))
    a = ap.parse_args()
    t = time.perf_counter()
    main(smoke=a.smoke, seed=a.seed, method=a.method)
    print(f"total {time.perf_counter() - t:.1f} s")
