"""Optuna + hypergradients: TPE picks the discrete hyperparameters, hypergradients the continuous ones.

    python examples/optuna_hybrid.py                 # 3 seeds x 2 searches x 20 s, writes optuna_hybrid.png
    python examples/optuna_hybrid.py --decays feature  # 65 continuous decays instead of 2
    python examples/optuna_hybrid.py --smoke         # two trials per search, a few seconds (CI)

Data: scikit-learn's bundled ``load_digits`` (no download), split train / validation / test.
Model: an MLP 64-width-10. Hyperparameters:

* discrete: ``width`` in {32, 64, 128}, ``optimizer`` in {sgd, adam}, ``batch_size`` in {32, 64, 128};
* continuous, ``--decays tensor`` (default): one weight decay per weight matrix (two);
  ``--decays feature``: one per input pixel on the first layer's weights (64: a pixel that carries
  little signal can be shrunk on its own) and one on the second layer's, 65 in all. Biases are not
  decayed.

Two searches get the same wall-clock budget per seed:

* **TPE alone** samples all of them (the decays log-uniform in [1e-6, 1e-1]) and trains with them fixed;
* **hybrid** lets TPE sample the three discrete ones and, inside each trial,
  ``bl.integrations.optuna.tune`` trains with a ``bl.HyperOptimizer`` whose decays (starting at
  1e-4) move by implicit hypergradient on the validation loss. The trial reports the tuned
  validation loss and keeps the tuned decays in ``trial.user_attrs["hparams"]``.

Both choose by validation cross-entropy; each trial also records its test cross-entropy, the
honest figure (the validation set was used to tune). The plot shows the best validation loss so
far against wall time, one line per seed.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Callable

import optuna
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import bilevel as bl
from bilevel.integrations.optuna import tune, validation_loss

WIDTHS, OPTIMIZERS, BATCH_SIZES = (32, 64, 128), ("sgd", "adam"), (32, 64, 128)
LR = {"sgd": 0.1, "adam": 3e-3}


def load_data(seed: int, n_train: int = 1000, n_val: int = 300):
    """Digits, standardized on the training split: ``(train, val, test)`` pairs of ``(X, y)``."""
    X, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = torch.tensor(X, dtype=torch.float32)[perm], torch.tensor(y)[perm]
    tr, va, te = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None)
    mean, std = X[tr].mean(0), X[tr].std(0).clamp_min(1e-3)
    X = (X - mean) / std
    return (X[tr], y[tr]), (X[va], y[va]), (X[te], y[te])


def batches(data, batch_size: int, seed: int) -> list:
    X, y = data
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(X[perm[i:i + batch_size]], y[perm[i:i + batch_size]]) for i in range(0, len(y), batch_size)]


def ce(m: nn.Module, h: dict, b: tuple) -> torch.Tensor:
    return F.cross_entropy(m(b[0]), b[1])


class FeatureDecay:
    """``½ Σ_j e^{h_in[j]} ‖W₁[:, j]‖² + ½ e^{h_out} ‖W₂‖²``: one decay per input feature, one for the
    output layer, of ``nn.Sequential(Linear, act, Linear)``; called with a model or its named parameters."""

    def __init__(self, model: nn.Sequential, init: float):
        w = model[0].weight
        self.hparams = {"decay/input": torch.full((w.shape[1],), math.log(init), requires_grad=True),
                        "decay/output": torch.full((), math.log(init), requires_grad=True)}

    def __call__(self, params, hp: dict) -> torch.Tensor:
        p = dict(params.named_parameters()) if isinstance(params, nn.Module) else params
        return 0.5 * ((hp["decay/input"].exp() * p["0.weight"].square().sum(0)).sum()
                      + hp["decay/output"].exp() * p["2.weight"].square().sum())


def build(trial: optuna.Trial, seed: int, decays: str = "feature"):
    """The model, its decays (weights only) and the inner optimizer of a trial's discrete choices."""
    width = trial.suggest_categorical("width", WIDTHS)
    name = trial.suggest_categorical("optimizer", OPTIMIZERS)
    batch_size = trial.suggest_categorical("batch_size", BATCH_SIZES)
    torch.manual_seed(seed * 1000 + trial.number)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10))
    if decays == "feature":
        penalty = FeatureDecay(model, init=1e-4)
        hp = penalty.hparams
    else:
        hp, penalty = bl.hparams.weight_decay(model, init=1e-4, per="tensor", exclude=("bias",))
    opt = (torch.optim.SGD(model.parameters(), lr=LR["sgd"], momentum=0.9) if name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=LR["adam"]))
    return model, hp, penalty, opt, batch_size


def test_loss(model: nn.Module, test) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(test[0]), test[1]))


def tpe_objective(data, seed: int, epochs: int, decays: str = "feature") -> Callable[[optuna.Trial], float]:
    train, val, test = data

    def objective(trial: optuna.Trial) -> float:
        model, hp, penalty, opt, batch_size = build(trial, seed, decays)
        with torch.no_grad():                   # TPE samples the decays too, one suggestion per value
            i = 0
            for t in hp.values():
                flat = t.view(-1)
                for j in range(flat.numel()):
                    flat[j] = math.log(trial.suggest_float(f"decay{i}", 1e-6, 1e-1, log=True))
                    i += 1
        for epoch in range(epochs):
            for b in batches(train, batch_size, seed + epoch):
                opt.zero_grad()
                (ce(model, hp, b) + penalty(model, hp)).backward()
                opt.step()
        with torch.no_grad():
            value = float(ce(model, hp, val))
        trial.set_user_attr("test_loss", test_loss(model, test))
        return value

    return objective


def hybrid_objective(data, seed: int, epochs: int, decays: str = "feature") -> Callable[[optuna.Trial], float]:
    train, val, test = data

    def objective(trial: optuna.Trial) -> float:
        model, hp, penalty, opt, batch_size = build(trial, seed, decays)
        hopt = bl.HyperOptimizer(model, hp, inner_loss=ce, outer_loss=ce, penalty=penalty, inner_optimizer=opt,
                                 outer_optimizer=torch.optim.Adam(hp.values(), lr=0.2),
                                 method=bl.Implicit(solver=bl.CG(maxiter=5, damping=0.1, on_indefinite="stop")),
                                 outer_loader=[val], hyper_every=4, on_error="skip")
        train_batches = [b for epoch in range(epochs) for b in batches(train, batch_size, seed + epoch)]
        value = tune(trial, hopt, train_batches, evaluate=lambda: validation_loss(hopt, [val]))
        trial.set_user_attr("test_loss", test_loss(model, test))
        trial.set_user_attr("decays", torch.cat([t.detach().exp().flatten() for t in hp.values()]).tolist())
        return value

    return objective


def search(kind: str, seed: int, budget_s: float, epochs: int, trials: int | None = None,
           decays: str = "feature") -> dict[str, Any]:
    """One study of ``budget_s`` seconds (or of exactly ``trials`` trials, however long they take); the
    best-so-far curve of the trials done within it."""
    data = load_data(seed)
    make = tpe_objective if kind == "tpe" else hybrid_objective
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5))
    t0 = time.perf_counter()
    times: list[float] = []
    study.optimize(make(data, seed, epochs, decays), timeout=None if trials else budget_s, n_trials=trials,
                   callbacks=[lambda s, t: times.append(time.perf_counter() - t0)])
    budget_s = math.inf if trials else budget_s
    curve, best, best_trial = [], math.inf, None
    for t, trial in zip(times, study.trials):
        if t <= budget_s and trial.value is not None and trial.value < best:
            best, best_trial = trial.value, trial
        curve.append((t, best))
    curve = [(t, b) for t, b in curve if t <= budget_s]
    return {"kind": kind, "seed": seed, "curve": curve, "n_trials": len(curve), "best_val": best,
            "test_of_best": best_trial.user_attrs["test_loss"] if best_trial else math.nan,
            "best_params": best_trial.params if best_trial else {},
            "best_decays": (best_trial.user_attrs.get("decays") or
                            [v for k, v in best_trial.params.items() if k.startswith("decay")]) if best_trial else []}


def plot(runs: list[dict[str, Any]], path: str, budget_s: float, decays: str = "feature") -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colors = {"tpe": "C0", "hybrid": "C3"}
    n = 3 + (65 if decays == "feature" else 2)
    labels = {"tpe": f"TPE over all {n} hyperparameters",
              "hybrid": f"hybrid: TPE (3 discrete) + hypergradient ({n - 3} decays)"}
    for run in runs:
        ts = [0.0] + [t for t, _ in run["curve"]] + [budget_s]
        bs = [math.nan] + [b for _, b in run["curve"]] + [run["curve"][-1][1] if run["curve"] else math.nan]
        first = run["seed"] == min(r["seed"] for r in runs if r["kind"] == run["kind"])
        ax.step(ts, bs, where="post", color=colors[run["kind"]], lw=1.5, alpha=0.8,
                label=labels[run["kind"]] if first else None)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("best validation cross-entropy so far")
    ax.set_yscale("log")
    ax.set_title(f"digits MLP, equal wall time, {len({r['seed'] for r in runs})} seeds (one line each)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path


def main(smoke: bool = False, seeds=(0, 1, 2), budget_s: float | None = None, out: str | None = "optuna_hybrid.png",
         verbose: bool = True, decays: str = "tensor") -> dict[str, Any]:
    """Run both searches for every seed; returns their results (and the plot's path, if drawn).

    ``smoke``: two trials of one epoch per search, not a time budget (CI: the same work on any machine)."""
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budget_s = budget_s if budget_s is not None else 20.0
    epochs, trials = (1, 2) if smoke else (8, None)
    if not smoke:
        search("hybrid", 0, 0.01, 1, decays=decays)   # warm up (first-call costs) outside the timed searches
    runs = [search(kind, seed, budget_s, epochs, trials, decays) for seed in seeds for kind in ("tpe", "hybrid")]
    budget_s = max(t for r in runs for t, _ in r["curve"]) if smoke else budget_s
    result: dict[str, Any] = {"runs": runs, "budget_s": budget_s, "epochs": epochs, "decays": decays}
    if verbose:
        print(f"{'search':>7} {'seed':>4} {'trials':>6} {'best val CE':>11} {'its test CE':>11}  best choice")
        for r in runs:
            params = {k: v for k, v in r["best_params"].items() if not k.startswith("decay")}
            d = sorted(r["best_decays"])
            dec = f"decays {d[0]:.1e}..{d[-1]:.1e} (median {d[len(d) // 2]:.1e})" if d else ""
            print(f"{r['kind']:>7} {r['seed']:>4} {r['n_trials']:>6} {r['best_val']:>11.4f} {r['test_of_best']:>11.4f}"
                  f"  {params} {dec}")
        for kind in ("tpe", "hybrid"):
            vals = sorted(r["best_val"] for r in runs if r["kind"] == kind)
            tests = sorted(r["test_of_best"] for r in runs if r["kind"] == kind)
            print(f"{kind:>7}: median best val CE {vals[len(vals) // 2]:.4f}, median test CE of it "
                  f"{tests[len(tests) // 2]:.4f}")
    if out:
        try:
            result["plot"] = plot(runs, out, budget_s, decays)
        except ImportError:
            result["plot"] = None
        if verbose and result["plot"]:
            print(f"plot: {result['plot']}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="two one-epoch trials per search (CI)")
    ap.add_argument("--budget", type=float, default=None, help="seconds per search and seed (default 20)")
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds")
    ap.add_argument("--decays", choices=("tensor", "feature"), default="tensor",
                    help="continuous hyperparameters: one decay per weight matrix (2), or per input pixel + one (65)")
    ap.add_argument("--out", default="optuna_hybrid.png", help="where to save the plot")
    args = ap.parse_args()
    main(smoke=args.smoke, seeds=tuple(range(args.seeds)), budget_s=args.budget, out=args.out, decays=args.decays)
