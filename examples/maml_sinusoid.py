"""Meta-learn the initial weights of a regressor for few-shot sinusoid regression: MAML, first-order
MAML, implicit MAML, and joint training, compared on held-out tasks.

    python examples/maml_sinusoid.py            # a few minutes on 1 CPU thread; saves a plot
    python examples/maml_sinusoid.py --smoke    # seconds (CI)

The task family of Finn et al. (2017): ``y = A sin(x − φ)``, amplitude ``A ~ U[0.1, 5]``, phase
``φ ~ U[0, π]``, inputs ``x ~ U[−5, 5]``; each task shows K = 10 labelled points (the support set)
and is scored on fresh points of the same curve (the query set). The model is an MLP 1-40-40-1 with
ReLU. What is learned is the *starting point* ``θ`` from which a few gradient steps on the support
set fit the task:

* MAML: ``min_θ E_task L_query(w_k(θ))`` with ``w_k`` = k SGD steps on ``L_support`` from ``θ``; the
  meta-gradient ``dL_query/dθ`` goes back through the k steps:
  ``bl.unrolled_hypergrad(..., hparams={}, init_grad=True).init_grad``.
* first-order MAML: the same, with ``dw_k/dθ`` replaced by the identity (the query gradient at ``w_k``).
* implicit MAML: ``w*(θ) = argmin_w L_support(w) + λ/2 ‖w − θ‖²`` (solved approximately by
  gradient steps), meta-gradient ``(I + H/λ)⁻¹ ∇L_query(w*)`` by a few CG steps:
  ``bl.imaml_grad(...)``.
* joint training: one ``θ`` fitted to all tasks at once, then fine-tuned on each support set with the
  same steps as MAML. It learns the average curve over tasks (small: ``−(2 E[A]/π) cos x``), which
  fits no task.

A batch of tasks is one tree: every weight gets a leading task axis (``θ`` repeated B times), the
inner loss is the *sum* of the task losses (so each task's weights get exactly their own gradient)
and the outer loss their mean; ``init_grad`` summed over the task axis is then the meta-gradient of
the whole batch, in one call. ``check_task_batching`` verifies that against one call per task.

Figures (MSE after adaptation on held-out tasks, 95% interval over tasks) are recorded in
benchmarks/RESULTS.md, section "Meta-learning".
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Callable

import torch

import bilevel as bl

HIDDEN = 40
ALPHA = 0.01             # inner SGD step of MAML and of fine-tuning (Finn et al.)
LAM = 1.0                # iMAML's proximal strength
PROX_STEPS, PROX_LR = 16, 0.01       # iMAML's adaptation: gradient steps on the proximal objective
PLOT = Path(__file__).resolve().parent.parent / "benchmarks" / "plots" / "maml_sinusoid.png"


# -- tasks and model ---------------------------------------------------------------------------------
def sample_tasks(n: int, g: torch.Generator, shots: int = 10, queries: int = 10):
    """``n`` sinusoid tasks: support ``(x, y)`` of shape ``(n, shots, 1)``, query ``(n, queries, 1)``, and ``(A, φ)``."""
    amp = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=g)
    phase = math.pi * torch.rand(n, 1, 1, generator=g)
    xs = -5 + 10 * torch.rand(n, shots, 1, generator=g)
    xq = -5 + 10 * torch.rand(n, queries, 1, generator=g)
    return (xs, amp * torch.sin(xs - phase)), (xq, amp * torch.sin(xq - phase)), (amp, phase)


def init_theta(g: torch.Generator) -> dict:
    """The MLP 1-40-40-1's weights, initialized as nn.Linear does (uniform ±1/√fan_in)."""
    def layer(fan_in, fan_out):
        bound = 1 / math.sqrt(fan_in)
        return ((torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound,
                (torch.rand(fan_out, generator=g) * 2 - 1) * bound)

    (w1, b1), (w2, b2), (w3, b3) = layer(1, HIDDEN), layer(HIDDEN, HIDDEN), layer(HIDDEN, 1)
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3}


def forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    """Batched over tasks: every weight has a leading task axis B, ``x`` is ``(B, N, 1)``."""
    h = torch.relu(x @ p["w1"].mT + p["b1"][:, None])
    h = torch.relu(h @ p["w2"].mT + p["b2"][:, None])
    return h @ p["w3"].mT + p["b3"][:, None]


def task_mse(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((forward(p, x) - y) ** 2).mean(dim=(1, 2))            # (B,)


def support_loss(p, h, x, y):          # a sum: task b's weights get exactly task b's gradient
    return task_mse(p, x, y).sum()


def query_loss(p, h, x, y):
    return task_mse(p, x, y).mean()


def tile(theta: dict, n: int) -> dict:
    return {k: v.detach().expand(n, *v.shape).clone() for k, v in theta.items()}


def gradient_descent(loss: Callable, w: dict, steps: int, lr: float) -> dict:
    """``steps`` plain gradient steps on ``loss(w)`` (no graph kept)."""
    w = {k: v.detach().clone().requires_grad_() for k, v in w.items()}
    for _ in range(steps):
        with torch.enable_grad():
            g = torch.autograd.grad(loss(w), list(w.values()))
        with torch.no_grad():
            for v, gk in zip(w.values(), g):
                v.sub_(lr * gk)
    return {k: v.detach() for k, v in w.items()}


def sgd_adapt(theta: dict, x, y, steps: int) -> dict:
    """``steps`` SGD steps (lr ALPHA) on each task's support loss from ``theta`` (the tasks batched)."""
    return gradient_descent(lambda p: support_loss(p, None, x, y), tile(theta, x.shape[0]), steps, ALPHA)


def prox_adapt(theta: dict, x, y) -> tuple[dict, dict]:
    """iMAML's adaptation: gradient steps on ``L_support + λ/2 ‖w − θ‖²`` per task; returns ``(w, θ tiled)``."""
    th = tile(theta, x.shape[0])
    prox = bl.meta.proximal_loss(lambda p, x, y: support_loss(p, None, x, y), LAM)
    return gradient_descent(lambda p: prox(p, th, x, y), th, PROX_STEPS, PROX_LR), th


# -- meta-gradients of one batch of tasks ---------------------------------------------------------------
def maml_grad(theta: dict, support, query, steps: int) -> tuple[dict, float]:
    hg, _ = bl.unrolled_hypergrad(support_loss, query_loss, tile(theta, support[0].shape[0]), {},
                                  optimizer=bl.inner.SGD(lr=ALPHA), steps=steps, init_grad=True,
                                  inner_args=support, outer_args=query)
    return {k: v.sum(0) for k, v in hg.init_grad.items()}, hg.info.outer_loss


def fomaml_grad(theta: dict, support, query, steps: int) -> tuple[dict, float]:
    w = {k: v.requires_grad_() for k, v in sgd_adapt(theta, *support, steps).items()}
    loss = query_loss(w, None, *query)
    g = torch.autograd.grad(loss, list(w.values()))           # at w_k, as if dw_k/dθ were the identity
    return {k: gk.sum(0) for k, gk in zip(w, g)}, float(loss.detach())


def imaml_grad(theta: dict, support, query, steps: int) -> tuple[dict, float]:
    w, th = prox_adapt(theta, *support)
    hg = bl.imaml_grad(lambda p, x, y: support_loss(p, None, x, y), lambda p, x, y: query_loss(p, None, x, y),
                       w, th, LAM, solver=bl.CG(maxiter=5, on_indefinite="stop"), inner_args=support, outer_args=query)
    return {k: v.sum(0) for k, v in hg.items()}, hg.info.outer_loss


def joint_grad(theta: dict, support, query, steps: int) -> tuple[dict, float]:
    x, y = torch.cat([support[0], query[0]], 1), torch.cat([support[1], query[1]], 1)
    theta = {k: v.detach().requires_grad_() for k, v in theta.items()}
    loss = task_mse({k: v.expand(x.shape[0], *v.shape) for k, v in theta.items()}, x, y).mean()
    return dict(zip(theta, torch.autograd.grad(loss, list(theta.values())))), float(loss.detach())


def check_task_batching(theta: dict, g: torch.Generator, tasks: int = 3, steps: int = 2) -> float:
    """Relative difference between the batched MAML meta-gradient and the sum of one call per task."""
    support, query, _ = sample_tasks(tasks, g)
    batched, _ = maml_grad(theta, support, query, steps)
    one = [maml_grad(theta, tuple(t[i:i + 1] for t in support), tuple(t[i:i + 1] for t in query), steps)[0]
           for i in range(tasks)]
    summed = {k: sum(o[k] for o in one) / tasks for k in theta}     # query_loss is the mean over tasks
    num = sum(float((batched[k] - summed[k]).pow(2).sum()) for k in theta)
    den = sum(float(summed[k].pow(2).sum()) for k in theta)
    return math.sqrt(num / den)


# -- training and evaluation ------------------------------------------------------------------------
def meta_train(grad_fn: Callable, steps: int, iters: int, batch: int, seed: int, lr: float, say) -> tuple[dict, list]:
    g = torch.Generator().manual_seed(seed)
    theta = {k: v.requires_grad_() for k, v in init_theta(torch.Generator().manual_seed(seed)).items()}
    opt = torch.optim.Adam(theta.values(), lr=lr)
    curve = []
    for it in range(iters):
        support, query, _ = sample_tasks(batch, g)
        grad, loss = grad_fn({k: v.detach() for k, v in theta.items()}, support, query, steps)
        for k, v in theta.items():
            v.grad = grad[k]
        opt.step()
        curve.append(loss)
        if (it + 1) % max(1, iters // 5) == 0:
            say(f"    iteration {it + 1:5d}  query MSE (mean of the last {iters // 5}) "
                f"{sum(curve[-(iters // 5):]) / len(curve[-(iters // 5):]):.3f}")
    return {k: v.detach() for k, v in theta.items()}, curve


def evaluate(theta: dict, adapt: str, steps: int, tasks) -> tuple[float, float, dict]:
    """Mean query MSE after adaptation over held-out tasks and its 95% half-width (normal, over tasks)."""
    support, query, _ = tasks
    w = prox_adapt(theta, *support)[0] if adapt == "prox" else sgd_adapt(theta, *support, steps)
    with torch.no_grad():
        mse = task_mse(w, *query)
    return float(mse.mean()), float(1.96 * mse.std() / math.sqrt(len(mse))), w


def plot(results: dict, tasks, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (xs, ys), _, (amp, phase) = tasks
    grid = torch.linspace(-5, 5, 200).reshape(1, -1, 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, i in zip(axes[:2], (0, 1)):
        ax.plot(grid[0, :, 0], (amp[i] * torch.sin(grid[0] - phase[i]))[:, 0], "k-", lw=2, label="true")
        ax.plot(xs[i, :, 0], ys[i, :, 0], "k^", ms=8, label="support (K=10)")
        for name, r in results.items():
            with torch.no_grad():
                pred = forward({k: v[i:i + 1] for k, v in r["adapted"].items()}, grid)[0, :, 0]
            ax.plot(grid[0, :, 0], pred, label=name)
        ax.set_title(f"held-out task {i}: A = {float(amp[i]):.2f}, φ = {float(phase[i]):.2f}")
        ax.set_xlabel("x")
    axes[0].legend(fontsize=7)
    names = list(results)
    axes[2].bar(range(len(names)), [results[n]["mse"] for n in names],
                yerr=[results[n]["ci95"] for n in names], capsize=4)
    axes[2].set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=7)
    axes[2].set_ylabel("query MSE after adaptation (95% interval)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(smoke: bool = False, seed: int = 0, verbose: bool = True, plot_path=None) -> dict:
    """Meta-train each method on the same stream of tasks; MSE after adaptation on held-out tasks."""
    say = print if verbose else (lambda *a, **k: None)
    torch.set_num_threads(1)                     # a tiny MLP: threads only add overhead
    iters = 20 if smoke else 2000
    batch = 4 if smoke else 10
    held_out = sample_tasks(40 if smoke else 1000, torch.Generator().manual_seed(10_000 + seed), queries=100)
    batching_err = check_task_batching(init_theta(torch.Generator().manual_seed(seed)),
                                       torch.Generator().manual_seed(seed + 1))
    say(f"batched meta-gradient vs one call per task: relative difference {batching_err:.1e}")
    runs = [  # (name, meta-gradient, inner steps, adaptation at test time)
        ("MAML, 1 step", maml_grad, 1, "sgd"),
        ("MAML, 5 steps", maml_grad, 5, "sgd"),
        ("first-order MAML, 5 steps", fomaml_grad, 5, "sgd"),
        (f"iMAML (CG, λ={LAM:g})", imaml_grad, 0, "prox"),
        ("joint training + 5 steps", joint_grad, 5, "sgd"),
    ]
    results = {}
    for name, grad_fn, steps, adapt in runs:
        say(f"{name}: {iters} meta-iterations of {batch} tasks")
        t0 = time.perf_counter()
        theta, curve = meta_train(grad_fn, steps, iters, batch, seed, lr=1e-3 if name.startswith("joint") else 3e-3,
                                  say=say)
        seconds = time.perf_counter() - t0
        mse, ci, adapted = evaluate(theta, adapt, steps, held_out)
        zero_shot = evaluate(theta, "sgd", 0, held_out)[0]
        results[name] = {"mse": mse, "ci95": ci, "mse_before_adaptation": zero_shot, "seconds": seconds,
                         "final_train_query_mse": sum(curve[-50:]) / len(curve[-50:]), "adapted": adapted}
        say(f"  held-out MSE after adaptation {mse:.3f} ± {ci:.3f} (before adaptation {zero_shot:.3f}), "
            f"{seconds:.0f} s")
    say("\nheld-out tasks: query MSE after adaptation (mean ± 95% interval over tasks)")
    for name, r in results.items():
        say(f"  {name:28s} {r['mse']:6.3f} ± {r['ci95']:.3f}   (before adaptation {r['mse_before_adaptation']:.3f})")
    if plot_path is not None or not smoke:
        path = Path(plot_path) if plot_path is not None else PLOT
        plot(results, held_out, path)
        say(f"plot: {path}")
    for r in results.values():
        del r["adapted"]
    return {"results": results, "batching_rel_err": batching_err, "iters": iters, "batch": batch,
            "held_out_tasks": len(held_out[2][0])}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few meta-iterations (seconds, CI)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help=f"where to save the plot (default {PLOT}; none with --smoke)")
    a = ap.parse_args()
    main(smoke=a.smoke, seed=a.seed, plot_path=a.plot)
