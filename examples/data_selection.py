"""Data selection by metagradient descent through whole training runs (Engstrom et al. 2025).

    python examples/data_selection.py             # 3 seeds, 24 rounds, T = 256 (minutes)
    python examples/data_selection.py --smoke     # seconds (CI)
    python examples/data_selection.py --smooth    # LayerNorm before tanh, lr warm-up (docs/tutorials/long_horizon.md)
    python examples/data_selection.py --outer-opt adam --checkpoints 1 --max-logit inf --rounds 12  # the earlier method

Data: MNIST-1D generated locally by the ``mnist1d`` package (no download; 4,000 training sequences
of length 40, 400 clean validation, 1,100 test), with 30% of the training labels flipped to
another class. Model: MLP 40-128-128-10 (tanh), SGD (lr 0.1, momentum 0.9), minibatches of 128,
T = 256 steps (8 epochs), always the same batches.

One logit per training example (``bl.hparams.example_weights``), batch weights
``bl.hparams.weighted_mean`` (softmax within the batch, mean 1). Each round computes the exact
metagradient, with respect to all 4,000 logits, of the validation loss *averaged over K points of
the run* (after T·j/K steps, j = 1..K; ``--checkpoints K``, default 4; ``1``: after the whole run
only) by ``bl.unrolled_hypergrad(mode="replay")`` (O(log T) stored states; one replay per point,
each a prefix of the same run), and takes a plain gradient step on the logits (``--outer-opt gd``,
the default: ``logits -= 0.1 · g / rms(g₁)``, the rate in units of the first metagradient's RMS)
or an Adam step (``--outer-opt adam``, lr 0.3). Both choices raise the recall of the flipped labels:
the final validation loss alone is a noisy objective (averaging it over the run is a cheaper
variance reduction than averaging over data orders), and Adam's per-coordinate normalization
moves an example with a tiny but steady metagradient as far as one with a large one, which
blurs the ranking; gradient descent keeps each logit proportional to its summed metagradients
(benchmarks/RESULTS.md, "Data selection by metagradient descent"). The logits are kept ``≤ 2``
(``--max-logit``: no example weighs more than e² ≈ 7.4 times one at the start), which keeps the
runs from turning chaotic when a few examples would otherwise dominate their batches (unbounded,
gradient descent diverged after 26 rounds on one seed).

Compared, each trained from the same start with the same batches: everything (uniform weights),
small-loss filtering (train on everything, drop the 30% of examples with the largest final
training loss, retrain), the oracle that drops exactly the flipped labels, and the learned
weights. Reports test accuracy over seeds (mean ± 95% t-interval), precision/recall of the flipped
labels among the 30% lowest learned weights (and the recall of small-loss filtering), the rounds and their cost in training runs, and saves
a plot of the learned logits of flipped vs clean examples.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from darts_mnist1d import load_mnist1d  # noqa: E402  (the same local generator as the DARTS example)

NOISE, B = 0.3, 128
T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}   # Student t quantiles by number of seeds


def mlp(norm: Optional[str] = None) -> torch.nn.Module:
    """MLP 40-128-128-10 with tanh; ``norm="pre"`` / ``"post"``: LayerNorm (no affine) before / after each tanh."""
    def block(i: int, o: int) -> list[torch.nn.Module]:
        ln = [torch.nn.LayerNorm(o, elementwise_affine=False)]
        return [torch.nn.Linear(i, o), *(ln if norm == "pre" else []), torch.nn.Tanh(), *(ln if norm == "post" else [])]
    return torch.nn.Sequential(*block(40, 128), *block(128, 128), torch.nn.Linear(128, 10))


def noisy_task(seed: int, T: int, *, smoke: bool = False, make_net: Optional[Callable[[], torch.nn.Module]] = None,
               dtype: torch.dtype = torch.float32, data: Optional[tuple] = None) -> SimpleNamespace:
    """The task: MNIST-1D with 30% of the training labels flipped, the MLP, T steps of fixed batches.

    Returns a namespace with ``X, yn, Xv, yv, xt, yt`` (train with noisy labels, validation, test),
    ``flipped`` (bool mask), ``net`` and ``params`` (its start), ``batch(t)`` (step t's indices),
    ``inner(p, h, idx)`` (per-example weighted cross-entropy, ``h["example_logits"]``),
    ``outer(p, h)`` (validation cross-entropy) and ``n``. ``make_net``: another model (default the
    MLP 40-128-128-10, tanh); ``dtype``: of the data and the model; ``data``: ``((x, y), (xt, yt))``
    instead of the generated MNIST-1D (the first 4,000 rows, or 600 with ``smoke``, train).
    """
    torch.manual_seed(seed)
    if data is None:
        (x, y), (xt, yt) = load_mnist1d(num_samples=1000 if smoke else 5500)
        x, xt = x.flatten(1), xt.flatten(1)
    else:
        (x, y), (xt, yt) = data
    x, xt = x.to(dtype), xt.to(dtype)
    n = 600 if smoke else 4000
    X, y_clean, Xv, yv = x[:n], y[:n], x[n:], y[n:]
    g = torch.Generator().manual_seed(seed)
    flipped = torch.rand(n, generator=g) < NOISE
    yn = torch.where(flipped, (y_clean + torch.randint(1, 10, (n,), generator=g)) % 10, y_clean)
    net = (make_net() if make_net is not None else mlp()).to(dtype)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    order = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(1000 * seed + e))
                       for e in range(T * B // n + 1)])

    def inner(p, h, idx):
        ce = F.cross_entropy(functional_call(net, p, (X[idx],)), yn[idx], reduction="none")
        return bl.hparams.weighted_mean(ce, h["example_logits"][idx])

    return SimpleNamespace(X=X, yn=yn, Xv=Xv, yv=yv, xt=xt, yt=yt, flipped=flipped, net=net, params=params, n=n,
                           batch=lambda t: (order[t * B:(t + 1) * B],), inner=inner,
                           outer=lambda p, h: F.cross_entropy(functional_call(net, p, (Xv,)), yv))


def precision_recall(logits: torch.Tensor, flipped: torch.Tensor) -> tuple[float, float]:
    """Precision and recall of the flipped labels among the 30% lowest logits."""
    flagged = logits <= logits.quantile(NOISE)
    hits = float((flagged & flipped).sum())
    return hits / max(1.0, float(flagged.sum())), hits / max(1.0, float(flipped.sum()))


def outer_step(logits: torch.Tensor, g: torch.Tensor, state: dict[str, Any], outer_opt: str, meta_lr: float,
               max_logit: float = 2.0) -> None:
    """One step of the outer optimizer on ``logits`` (in place) from the metagradient ``g``, then
    ``logits ≤ max_logit``.

    ``"gd"``: plain gradient descent, ``logits -= meta_lr · g / rms(g₁)`` with ``g₁`` the first
    round's metagradient (a constant: the rate is in units of the first step's RMS, so that
    ``meta_lr`` does not depend on the scale of the loss). Keeps each example's step proportional
    to its metagradient, so the logits rank the examples by their summed metagradients.
    ``"adam"``: ``torch.optim.Adam`` (per-coordinate normalized steps of ≈ ``meta_lr`` each).
    ``max_logit = 2`` (the default): no example weighs more than e² ≈ 7.4 times one left at the start
    (logit 0); without a bound a few examples grow large logits, dominate their batches, and the run
    (and its metagradient) turns chaotic. ``math.inf``: unbounded.
    """
    if outer_opt == "gd":
        scale = state.setdefault("scale", float(g.pow(2).mean().sqrt()) or 1.0)
        with torch.no_grad():
            logits -= meta_lr * g / scale
    elif outer_opt == "adam":
        meta = state.setdefault("adam", torch.optim.Adam([logits], lr=meta_lr))
        meta.zero_grad()
        logits.grad = g
        meta.step()
    else:
        raise ValueError(f"data_selection.outer_step: expected outer_opt 'gd' or 'adam', got {outer_opt!r}. "
                         f"Fix: pass --outer-opt gd (the default) or adam.")
    with torch.no_grad():
        logits.clamp_(max=max_logit)


def one_seed(seed: int, smoke: bool, rounds: int, T: int, meta_lr: Optional[float] = None, smooth: bool = False,
             outer_opt: str = "gd", checkpoints: int = 4, max_logit: float = 2.0) -> dict[str, Any]:
    if not 1 <= checkpoints <= T:
        raise ValueError(f"data_selection.one_seed: expected 1 <= checkpoints <= T = {T}, got {checkpoints}. "
                         f"Fix: pass --checkpoints between 1 (the final validation loss only) and --steps.")
    task = noisy_task(seed, T, smoke=smoke, make_net=(lambda: mlp("pre")) if smooth else None)
    X, yn, xt, yt, flipped, net, params, n = task.X, task.yn, task.xt, task.yt, task.flipped, task.net, \
        task.params, task.n
    inner, outer, batch = task.inner, task.outer, task.batch
    if meta_lr is None:
        meta_lr = 0.1 if outer_opt == "gd" else 0.3
    schedule = None
    if smooth:                           # LayerNorm before tanh (above) and lr warm-up over 10% of the steps
        schedule = 0.1 * torch.clamp(torch.arange(1, T + 1) / max(1, T // 10), max=1.0)
    opt = bl.inner.SGD(lr=bl.inner.Schedule("lr") if smooth else 0.1, momentum=0.9)

    def train(logits: torch.Tensor, steps: int = T):
        """The first ``steps`` steps of the run (the same batches and learning rates: a prefix of it)."""
        fixed = {} if schedule is None else {"lr": schedule[:steps]}
        return bl.unrolled_hypergrad(inner, outer, params, {"example_logits": logits, **fixed}, optimizer=opt,
                                     steps=steps, mode="replay", inner_args=batch)

    def metagradient(logits: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """Gradient of the validation loss averaged over ``checkpoints`` points of the run (after T·j/K
        steps, j = 1..K), one replay metagradient per point; its value and the steps run."""
        g, loss, ran = torch.zeros_like(logits), 0.0, 0
        for j in range(1, checkpoints + 1):
            hg, _ = train(logits, T * j // checkpoints)
            g += hg["example_logits"] / checkpoints
            loss += hg.info.outer_loss / checkpoints
            ran += hg.info.forward_steps
        return g, loss, ran

    def test_acc(logits: torch.Tensor) -> float:
        _, w = train(logits)
        return float((functional_call(net, w, (xt,)).argmax(1) == yt).float().mean())

    dropped = lambda mask: torch.where(mask, -30.0, 0.0)          # weight e^-30 ≈ 0 within any batch
    out: dict[str, Any] = {"all": test_acc(torch.zeros(n)), "oracle": test_acc(dropped(flipped))}
    _, w_all = train(torch.zeros(n))
    losses = F.cross_entropy(functional_call(net, w_all, (X,)), yn, reduction="none")
    small = losses >= losses.quantile(1 - NOISE)
    out["small_loss"] = test_acc(dropped(small))
    out["small_loss_recall"] = float((small & flipped).sum()) / max(1.0, float(flipped.sum()))

    logits = torch.zeros(n, requires_grad=True)
    state: dict[str, Any] = {}
    t0, c0, evaluated, history, recall_history = time.perf_counter(), time.process_time(), 0, [], []
    for _ in range(rounds):
        g, loss, ran = metagradient(logits.detach())
        evaluated += ran
        history.append(loss)
        outer_step(logits, g, state, outer_opt, meta_lr, max_logit)
        recall_history.append(precision_recall(logits.detach(), flipped)[1])
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    out["training_runs"] = evaluated / T
    out["history"] = history
    learned = logits.detach()
    out["learned"] = test_acc(learned)
    out["precision"], out["recall"] = precision_recall(learned, flipped)
    out["recall_history"] = recall_history
    out["logits"], out["flipped"] = learned, flipped
    return out


def interval(vals: list[float]) -> tuple[float, float]:
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, math.nan
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return m, T_975.get(len(vals), 1.96) * sd / math.sqrt(len(vals))


def main(smoke: bool = False, seeds: int = 3, rounds: int = 24, T: int = 256, meta_lr: Optional[float] = None,
         smooth: bool = False, outer_opt: str = "gd", checkpoints: int = 4, max_logit: float = 2.0,
         plot: str = "data_selection.png", verbose: bool = True) -> dict[str, Any]:
    torch.set_num_threads(1)
    if smoke:
        seeds, rounds, T = 1, 2, 12
    runs = [one_seed(s, smoke, rounds, T, meta_lr, smooth, outer_opt, checkpoints, max_logit) for s in range(seeds)]
    summary = {k: interval([r[k] for r in runs]) for k in ("all", "small_loss", "oracle", "learned",
                                                         "precision", "recall", "small_loss_recall")}
    summary["rounds"], summary["T"], summary["checkpoints"] = rounds, T, checkpoints
    summary["training_runs_per_seed"] = runs[0]["training_runs"]
    summary["seconds_per_seed"] = sum(r["seconds"] for r in runs) / seeds
    summary["cpu_seconds_per_seed"] = sum(r["cpu_seconds"] for r in runs) / seeds
    summary["history"] = runs[0]["history"]
    summary["recall_history"] = [sum(r["recall_history"][i] for r in runs) / seeds for i in range(rounds)]
    if verbose:
        print(f"MNIST-1D, {NOISE:.0%} flipped labels, T = {T} steps, {seeds} seed(s); test accuracy (mean ± 95% CI):")
        for k in ("all", "small_loss", "oracle", "learned"):
            m, ci = summary[k]
            print(f"  {k:11s} {m:.4f} ± {ci:.4f}")
        print(f"flipped among the {NOISE:.0%} lowest learned weights: precision {summary['precision'][0]:.3f}, "
              f"recall {summary['recall'][0]:.3f} ± {summary['recall'][1]:.3f} "
              f"(small-loss filtering's recall {summary['small_loss_recall'][0]:.3f})")
        print("recall after each round (mean over seeds): " + " ".join(f"{v:.2f}" for v in summary["recall_history"]))
        print(f"{rounds} rounds ({outer_opt}) of replay metagradients of the validation loss at {checkpoints} "
              f"point(s) of the run: {summary['training_runs_per_seed']:.0f} training runs' steps, "
              f"{summary['seconds_per_seed']:.0f} s per seed ({summary['cpu_seconds_per_seed']:.0f} s of CPU)")
    if plot and not smoke:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        lg, fl = runs[0]["logits"], runs[0]["flipped"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist([lg[~fl].numpy(), lg[fl].numpy()], bins=40, label=["clean", "flipped"], stacked=False)
        ax.set_xlabel("learned example logit (seed 0)")
        ax.set_ylabel("examples")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--outer-opt", choices=("gd", "adam"), default="gd",
                    help="gd: gradient descent in units of the first metagradient's RMS (default); adam: Adam")
    ap.add_argument("--meta-lr", type=float, default=None, help="outer learning rate (default 0.1 for gd, 0.3 for adam)")
    ap.add_argument("--checkpoints", type=int, default=4,
                    help="outer loss: the validation loss averaged after T·j/K steps, j = 1..K (1: the final one only)")
    ap.add_argument("--max-logit", type=float, default=2.0,
                    help="upper bound on the logits: no weight above e^max times the start's (inf: none)")
    ap.add_argument("--smooth", action="store_true", help="LayerNorm before each tanh and lr warm-up over 10%%")
    ap.add_argument("--plot", default="data_selection.png")
    a = ap.parse_args()
    main(smoke=a.smoke, seeds=a.seeds, rounds=a.rounds, T=a.steps, meta_lr=a.meta_lr, smooth=a.smooth,
         outer_opt=a.outer_opt, checkpoints=a.checkpoints, max_logit=a.max_logit, plot=a.plot)
