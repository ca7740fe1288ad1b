"""Demo task ``logreg``: tune one L2 weight decay per weight of a logistic regression.

``python -m bilevel demo --task logreg`` (see :mod:`bilevel.__main__`) runs :func:`run`:

- data: a dataset that ships inside scikit-learn (``load_breast_cancer`` or
  ``load_digits``; nothing is downloaded), split train/val/test with the seed,
  features standardized with the *train* statistics. The train set is small
  relative to the number of weights, so regularization matters.
- model: logistic regression in float64; binary for breast cancer (30 weights),
  multinomial for digits (64 features x 10 classes = 640 weights); the bias is
  not decayed.
- inner problem: ``L_T(w, λ) = mean CE_train(w) + ½ Σ_j exp(λ_j) w_j²``, solved to
  high accuracy by L-BFGS (strong Wolfe), warm-started from the previous solution.
- outer problem: ``L_V = mean CE_val(w*(λ))``; Adam on the log-decays ``λ``
  (log keeps every decay positive), hypergradient by
  :func:`bilevel.implicit_hypergrad` with CG / Neumann / Nyström.
- baseline: the same model with one global decay, picked by validation loss on
  a log-spaced grid. The per-weight decays start from that decay, so the tuned
  model contains the baseline as its starting point and the comparison measures
  what per-weight decays add.

:func:`run` returns a plain dict of numbers (JSON-serializable) so tests and
scripts can check results without parsing text.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel as bl

from ._demo_common import finish_result, Progress, require_sklearn, torch_threads, with_overrides

__all__ = ["DATASETS", "SOLVERS", "DemoConfig", "Split", "load_split", "make_solver", "run", "format_report", "save_plot"]

DATASETS = ("breast_cancer", "digits")
SOLVERS = ("cg", "neumann", "nystrom")
DTYPE = torch.float64


# --------------------------------------------------------------------------- configuration
@dataclass
class DemoConfig:
    """Settings of one demo run; ``None`` fields are chosen per dataset by :meth:`resolved`.

    Attributes:
        dataset: ``"breast_cancer"`` or ``"digits"``.
        solver: ``"cg"`` | ``"neumann"`` | ``"nystrom"`` (linear solver of the hypergradient).
        seed: seed of the train/val/test split.
        outer_steps: Adam steps on the log-decays.
        outer_lr: Adam learning rate on the log-decays.
        n_train, n_val: split sizes (the test set is the rest).
        grid: number of log-spaced global decays tried by the baseline.
        grid_range: ``(low, high)`` decades of the baseline grid, ``10**low .. 10**high``.
        inner_tol: stop L-BFGS when ``max |∇_w L_T| ≤ inner_tol``.
        solver_iters: CG ``maxiter`` / Neumann ``steps`` / Nyström ``rank``.
        quick: fewer outer steps (a few seconds; used by the tests).
        threads: torch intra-op threads during the run (restored afterwards); ``None``: 1.
    """

    dataset: str = "breast_cancer"
    solver: str = "cg"
    seed: int = 0
    outer_steps: Optional[int] = None
    outer_lr: Optional[float] = None
    n_train: Optional[int] = None
    n_val: Optional[int] = None
    grid: int = 10
    grid_range: tuple = (-4.0, 1.0)
    inner_tol: float = 1e-10
    solver_iters: Optional[int] = None
    quick: bool = False
    threads: Optional[int] = None

    def resolved(self) -> "DemoConfig":
        """A copy with every ``None`` replaced by the dataset's default; validates the fields."""
        if self.dataset not in DATASETS:
            raise ValueError(f"bilevel demo: expected dataset in {DATASETS}, got {self.dataset!r}.")
        if self.solver not in SOLVERS:
            raise ValueError(f"bilevel demo: expected solver in {SOLVERS}, got {self.solver!r}.")
        d = _DEFAULTS[self.dataset]
        steps = self.outer_steps
        if steps is None:
            steps = d["quick_steps"] if self.quick else d["outer_steps"]
        if steps < 1:
            raise ValueError(f"Invalid outer_steps for bilevel demo: {steps} (expected outer_steps >= 1).")
        if self.grid < 2:
            raise ValueError(f"Invalid grid for bilevel demo: {self.grid} (expected grid >= 2).")
        return DemoConfig(
            dataset=self.dataset, solver=self.solver, seed=int(self.seed), outer_steps=int(steps),
            outer_lr=d["outer_lr"] if self.outer_lr is None else float(self.outer_lr),
            n_train=d["n_train"] if self.n_train is None else int(self.n_train),
            n_val=d["n_val"] if self.n_val is None else int(self.n_val),
            grid=int(self.grid), grid_range=tuple(self.grid_range), inner_tol=float(self.inner_tol),
            solver_iters=self.solver_iters, quick=self.quick,
            threads=1 if self.threads is None else max(1, int(self.threads)),
        )


# NOTE: sizes are chosen so that the train set is small next to the number of
# weights (100 samples for 30 weights; 300 samples for 640 weights): there the
# per-weight decays have something to do. The validation set is as large as we
# can afford: with 30-640 hyperparameters the outer problem overfits a small
# validation set (measured on breast_cancer, seeds 0-7, 40 steps: with 200
# validation samples the test loss got worse on 6 of 8 seeds while the
# validation loss fell ~40%; with 235 it improved on 5 of 8). Step counts and
# the learning rate keep the default run well under a minute on 2 CPU cores
# (digits: lr 0.1 overfits validation further, test improved on 3 of 4 seeds
# against 4 of 4 with lr 0.05), and --quick to a few seconds.
_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "breast_cancer": dict(n_train=100, n_val=235, outer_steps=40, quick_steps=15, outer_lr=0.05),
    "digits": dict(n_train=300, n_val=500, outer_steps=40, quick_steps=5, outer_lr=0.05),
}


# --------------------------------------------------------------------------- data
@dataclass
class Split:
    """Standardized float64 tensors of one train/val/test split.

    ``X*``: ``(n, d)``; ``y*``: ``(n,)`` float 0/1 labels (binary) or int64 class indices.
    """

    X_train: Tensor
    y_train: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    n_classes: int
    feature_names: List[str]

    @property
    def binary(self) -> bool:
        return self.n_classes == 2


def load_split(dataset: str, *, seed: int = 0, n_train: int = 100, n_val: int = 200) -> Split:
    """Load a dataset bundled with scikit-learn and split it deterministically.

    Args:
        dataset: ``"breast_cancer"`` (569 x 30, 2 classes) or ``"digits"`` (1797 x 64, 10 classes).
        seed: seed of the stratified split (same seed, same split).
        n_train, n_val: sizes of the train and validation sets; the test set is the rest.

    Returns:
        :class:`Split` with features standardized by the train mean and standard
        deviation (constant train features get scale 1).

    Raises:
        DemoError: scikit-learn is not installed.
        ValueError: unknown dataset or split sizes that do not fit.
    """
    require_sklearn()
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    loaders = {"breast_cancer": load_breast_cancer, "digits": load_digits}
    if dataset not in loaders:
        raise ValueError(f"bilevel demo: expected dataset in {tuple(loaders)}, got {dataset!r}.")
    data = loaders[dataset]()  # bundled with scikit-learn: no network access
    X, y = np.asarray(data.data, dtype=np.float64), np.asarray(data.target)
    n = X.shape[0]
    if n_train < 10 or n_val < 10 or n_train + n_val > n - 10:
        raise ValueError(f"bilevel demo: expected n_train, n_val >= 10 and n_train + n_val <= {n - 10} for "
                         f"{dataset} ({n} samples), got n_train={n_train}, n_val={n_val}.")
    X_tr, X_rest, y_tr, y_rest = train_test_split(X, y, train_size=n_train, stratify=y, random_state=seed)
    X_va, X_te, y_va, y_te = train_test_split(X_rest, y_rest, train_size=n_val, stratify=y_rest,
                                              random_state=seed + 1)
    mean = X_tr.mean(axis=0)
    std = X_tr.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    n_classes = int(y.max()) + 1
    ydt = DTYPE if n_classes == 2 else torch.int64

    def t(a: np.ndarray, dtype: torch.dtype = DTYPE) -> Tensor:
        return torch.as_tensor(a, dtype=dtype)

    names = [str(s) for s in getattr(data, "feature_names", [f"x{i}" for i in range(X.shape[1])])]
    return Split(t((X_tr - mean) / std), t(y_tr, ydt), t((X_va - mean) / std), t(y_va, ydt),
                 t((X_te - mean) / std), t(y_te, ydt), n_classes, names)


# --------------------------------------------------------------------------- model and losses
class LogReg:
    """Logistic regression ``logits = X w + b`` as pure functions of a params tree.

    Binary: ``w: (d,)``, ``b: ()``; multinomial: ``w: (d, C)``, ``b: (C,)``. The
    hyperparameter tree is ``{"log_decay": Tensor[w.shape]}``: one decay per weight.
    """

    def __init__(self, n_features: int, n_classes: int) -> None:
        self.binary = n_classes == 2
        self.w_shape = (n_features,) if self.binary else (n_features, n_classes)
        self.b_shape = () if self.binary else (n_classes,)

    def init_params(self) -> Dict[str, Tensor]:
        return {"w": torch.zeros(self.w_shape, dtype=DTYPE), "b": torch.zeros(self.b_shape, dtype=DTYPE)}

    def data_loss(self, params: Dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy of the labels ``y`` under the model."""
        logits = X @ params["w"] + params["b"]
        if self.binary:
            return F.binary_cross_entropy_with_logits(logits, y)
        return F.cross_entropy(logits, y)

    def inner_loss(self, params: Dict[str, Tensor], hparams: Dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
        """Training objective: mean CE + ``½ Σ exp(log_decay) ⊙ w²`` (bias not decayed)."""
        return self.data_loss(params, X, y) + 0.5 * (hparams["log_decay"].exp() * params["w"] ** 2).sum()

    def outer_loss(self, params: Dict[str, Tensor], hparams: Dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
        """Validation objective: mean CE (does not use ``hparams`` directly)."""
        return self.data_loss(params, X, y)

    @torch.no_grad()
    def accuracy(self, params: Dict[str, Tensor], X: Tensor, y: Tensor) -> float:
        logits = X @ params["w"] + params["b"]
        pred = (logits > 0).to(y.dtype) if self.binary else logits.argmax(dim=1)
        return float((pred == y).to(DTYPE).mean())


def fit_inner(model: LogReg, params: Dict[str, Tensor], log_decay: Tensor, X: Tensor, y: Tensor, *,
              tol: float = 1e-10, max_iter: int = 500, max_rounds: int = 3) -> tuple[Dict[str, Tensor], float, int]:
    """Minimize the inner loss with L-BFGS (strong Wolfe), starting from ``params``.

    Args:
        model: the :class:`LogReg` whose ``inner_loss`` is minimized.
        params: starting point (warm start), not modified.
        log_decay: the hyperparameters, held fixed.
        X, y: the training set.
        tol: stop when ``max |∇_params L_T| ≤ tol``.
        max_iter: L-BFGS iterations per round; up to ``max_rounds`` rounds.

    Returns:
        ``(params, grad_max, evaluations)``: the solution (detached), ``max |∇ L_T|``
        there, and the number of loss evaluations spent.

    NOTE: a fresh L-BFGS is built for every call: its curvature history belongs
    to the previous hyperparameters (DESIGN.md §4, optimizer state when the
    hyperparameters change). Only the solution is warm-started. And
    ``tolerance_change=0``: from a warm start the first L-BFGS step is ``-g``
    (tiny, as g is), the loss barely changes, and any positive
    ``tolerance_change`` stops the solve there, leaving ``‖g‖`` where it was.
    The IFT's error grows with ``‖g‖``, so we stop on the gradient only.
    """
    w = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    h = {"log_decay": log_decay.detach()}
    leaves = list(w.values())
    evals = 0

    def new_lbfgs() -> torch.optim.LBFGS:
        return torch.optim.LBFGS(leaves, lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                                 tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        nonlocal evals
        evals += 1
        opt.zero_grad(set_to_none=False)
        loss = model.inner_loss(w, h, X, y)
        loss.backward()
        return loss

    gmax = math.inf
    for _ in range(max_rounds):
        opt = new_lbfgs()
        opt.step(closure)
        with torch.enable_grad():
            g = torch.autograd.grad(model.inner_loss(w, h, X, y), leaves)
        gmax = max(float(t.abs().max()) for t in g)
        if gmax <= tol:
            break
    return {k: v.detach() for k, v in w.items()}, gmax, evals


def make_solver(name: str, n_params: int, iters: Optional[int] = None) -> bl.Solver:
    """The linear solver of the hypergradient for ``--solver``.

    Args:
        name: ``"cg"`` | ``"neumann"`` | ``"nystrom"``.
        n_params: number of inner parameters ``P`` (bounds the useful CG iterations / Nyström rank).
        iters: CG ``maxiter`` / Neumann ``steps`` / Nyström ``rank``; ``None`` picks a default.
    """
    if name == "cg":
        # Exact arithmetic needs at most P steps; the default stops well before on these problems.
        return bl.CG(maxiter=iters or min(n_params, 1000), tol=1e-8)
    if name == "neumann":
        return bl.Neumann(steps=iters or 50)
    if name == "nystrom":
        return bl.Nystrom(rank=min(iters or 100, n_params), rho=1e-2, sketch="gaussian")
    raise ValueError(f"bilevel demo: expected solver in {SOLVERS}, got {name!r}.")


# --------------------------------------------------------------------------- the run
def _evaluate(model: LogReg, params: Dict[str, Tensor], split: Split) -> Dict[str, float]:
    with torch.no_grad():
        return {
            "train_loss": float(model.data_loss(params, split.X_train, split.y_train)),
            "val_loss": float(model.data_loss(params, split.X_val, split.y_val)),
            "test_loss": float(model.data_loss(params, split.X_test, split.y_test)),
            "test_acc": model.accuracy(params, split.X_test, split.y_test),
            "val_acc": model.accuracy(params, split.X_val, split.y_val),
        }


def run_baseline(model: LogReg, split: Split, cfg: DemoConfig) -> Dict[str, Any]:
    """One global decay for all weights, chosen by validation loss over a log-spaced grid.

    The grid is swept from the largest decay down, each fit warm-started from the
    previous one (a continuation path: the strongly regularized fits are easy).
    """
    t0 = time.perf_counter()
    decays = np.logspace(cfg.grid_range[1], cfg.grid_range[0], cfg.grid)
    params = model.init_params()
    rows, best = [], None
    for dec in decays:
        log_decay = torch.full(model.w_shape, math.log(dec), dtype=DTYPE)
        params, gmax, _ = fit_inner(model, params, log_decay, split.X_train, split.y_train, tol=cfg.inner_tol)
        ev = _evaluate(model, params, split)
        rows.append({"decay": float(dec), "val_loss": ev["val_loss"], "inner_grad_max": gmax})
        if best is None or ev["val_loss"] < best[1]["val_loss"]:
            best = (float(dec), ev, params)
    assert best is not None
    dec, ev, params = best
    return {"decay": dec, **ev, "wall_s": time.perf_counter() - t0, "grid": rows, "params": params}


def run(config: Optional[DemoConfig] = None, *, out_dir: Optional[str] = None, progress: bool = True,
        stream: Optional[TextIO] = None, **overrides: Any) -> Dict[str, Any]:
    """Run the demo: baseline grid search, then per-weight decays tuned by implicit hypergradients.

    Args:
        config: a :class:`DemoConfig`; keyword ``overrides`` (e.g. ``dataset="digits"``,
            ``quick=True``) replace its fields.
        out_dir: folder for the PNG plot; ``None`` makes no plot.
        progress: show the progress bar on ``stream``.
        stream: where the progress bar goes (``sys.stderr`` by default).

    Returns:
        A JSON-serializable dict: ``config``, split sizes, ``baseline`` and ``tuned``
        (``val_loss``, ``test_loss``, ``test_acc``, ``wall_s``, ...), ``tuned["history"]``
        (per outer step: validation/test loss, inner gradient norm, solver
        iterations and products, hypergradient norm), the learned ``decays``, and
        ``plot`` (the PNG's path, or ``None`` with ``plot_skipped`` saying why).

    Example:
        >>> res = run(dataset="breast_cancer", quick=True, progress=False)
        >>> res["tuned"]["val_loss"] < res["baseline"]["val_loss"]
        True
    """
    base = with_overrides(config or DemoConfig(), overrides, "bilevel demo run()")
    cfg = base.resolved()
    with torch_threads(cfg.threads):
        return _run(cfg, out_dir=out_dir, progress=progress, stream=stream)


def _run(cfg: DemoConfig, *, out_dir: Optional[str], progress: bool, stream: Optional[TextIO]) -> Dict[str, Any]:
    t_start = time.perf_counter()

    split = load_split(cfg.dataset, seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val)
    model = LogReg(split.X_train.shape[1], split.n_classes)
    n_params = sum(v.numel() for v in model.init_params().values())
    torch.manual_seed(cfg.seed)

    # -- baseline: one global decay by grid search -------------------------------------------
    if progress:
        out = sys.stderr if stream is None else stream
        out.write(f"baseline: fitting {cfg.grid} global decays {10 ** cfg.grid_range[0]:.0e}..{10 ** cfg.grid_range[1]:.0e} "
                  f"on {split.X_train.shape[0]} {cfg.dataset} samples\n")
        out.flush()
    baseline = run_baseline(model, split, cfg)
    params = baseline.pop("params")

    # -- tuned: one decay per weight, Adam on log-decays, implicit hypergradients ------------
    t0 = time.perf_counter()
    log_decay = torch.full(model.w_shape, math.log(baseline["decay"]), dtype=DTYPE, requires_grad=True)
    adam = torch.optim.Adam([log_decay], lr=cfg.outer_lr)
    solver = make_solver(cfg.solver, n_params, cfg.solver_iters)
    inner_args = (split.X_train, split.y_train)
    outer_args = (split.X_val, split.y_val)
    history: List[Dict[str, Any]] = []
    bar = Progress(cfg.outer_steps, stream=stream, enabled=progress)
    for step in range(cfg.outer_steps):
        params, gmax, evals = fit_inner(model, params, log_decay, *inner_args, tol=cfg.inner_tol)
        hg = bl.implicit_hypergrad(model.inner_loss, model.outer_loss, params, {"log_decay": log_decay},
                                   solver=solver, inner_args=inner_args, outer_args=outer_args)
        sinfo = hg.info.solver
        with torch.no_grad():
            test_loss = float(model.data_loss(params, split.X_test, split.y_test))
        rec = {
            "step": step,
            "val_loss": hg.info.outer_loss,
            "test_loss": test_loss,
            "inner_grad_norm": hg.info.inner_grad_norm,
            "inner_evals": evals,
            "solver_iters": sinfo.iterations if sinfo else None,
            "matvecs": sinfo.matvecs if sinfo else None,
            "relative_residual": sinfo.relative_residual if sinfo else None,
            "converged": sinfo.converged if sinfo else None,
            "hypergrad_norm": float(torch.linalg.vector_norm(hg["log_decay"])),
        }
        history.append(rec)
        log_decay.grad = hg["log_decay"].detach().clone()  # dL_V/dλ
        adam.step()
        bar.update(step + 1, f"val {rec['val_loss']:.4f} (baseline {baseline['val_loss']:.4f})  "
                             f"|grad inner| {rec['inner_grad_norm']:.1e}  {cfg.solver} it {rec['solver_iters']}")
    bar.close()
    # The last Adam step moved the decays: solve once more to evaluate where we ended.
    params, gmax, _ = fit_inner(model, params, log_decay, *inner_args, tol=cfg.inner_tol)
    tuned = _evaluate(model, params, split)
    tuned["wall_s"] = time.perf_counter() - t0
    tuned["final_inner_grad_max"] = gmax
    decays = log_decay.detach().exp()
    tuned["decays"] = decays.reshape(-1).tolist()
    tuned["history"] = history

    result: Dict[str, Any] = {
        "task": "logreg",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "dataset": cfg.dataset,
        "solver": cfg.solver,
        "solver_repr": repr(solver),
        "seed": cfg.seed,
        "n_train": int(split.X_train.shape[0]),
        "n_val": int(split.X_val.shape[0]),
        "n_test": int(split.X_test.shape[0]),
        "n_features": int(split.X_train.shape[1]),
        "n_classes": split.n_classes,
        "n_params": n_params,
        "n_hparams": int(decays.numel()),
        "baseline": baseline,
        "tuned": tuned,
        "plot": None,
        "plot_skipped": None,
    }
    return finish_result(result, out_dir, save_plot, "plot", t_start)


# --------------------------------------------------------------------------- reporting
def format_report(result: Dict[str, Any], *, max_rows: int = 40) -> str:
    """The summary printed on stdout: setup, per-step diagnostics (subsampled), and baseline vs tuned."""
    b, t = result["baseline"], result["tuned"]
    hist = t["history"]
    lines = []
    lines.append(f"bilevel demo: {result['dataset']}  (train {result['n_train']} / val {result['n_val']} / "
                 f"test {result['n_test']}, {result['n_features']} features, {result['n_classes']} classes, seed {result['seed']})")
    lines.append(f"  inner: logistic regression, {result['n_params']} params, L-BFGS (strong Wolfe), float64")
    lines.append(f"  outer: Adam(lr={result['config']['outer_lr']}) on {result['n_hparams']} log-decays, "
                 f"{len(hist)} steps, hypergradient solver {result['solver_repr']}")
    lines.append("")
    if hist:
        n = len(hist)
        stride = max(1, math.ceil(n / max_rows))
        idx = sorted(set(range(0, n, stride)) | {n - 1})
        lines.append("  per outer step (every %d):" % stride if stride > 1 else "  per outer step:")
        lines.append(f"  {'step':>5} {'val loss':>10} {'test loss':>10} {'|grad L_T|':>11} {'solver it':>9} "
                     f"{'HVPs':>5} {'rel. resid':>10} {'|hypergrad|':>11}")
        for i in idx:
            r = hist[i]
            rr = r["relative_residual"]
            lines.append(f"  {r['step']:>5} {r['val_loss']:>10.5f} {r['test_loss']:>10.5f} {r['inner_grad_norm']:>11.2e} "
                         f"{str(r['solver_iters']):>9} {str(r['matvecs']):>5} "
                         f"{(f'{rr:.1e}' if rr is not None and math.isfinite(rr) else '-'):>10} {r['hypergrad_norm']:>11.2e}")
        gn = [r["inner_grad_norm"] for r in hist]
        its = [r["solver_iters"] for r in hist if r["solver_iters"] is not None]
        lines.append(f"  inner gradient norm: max {max(gn):.1e}, median {float(np.median(gn)):.1e};  "
                     f"solver iterations: mean {np.mean(its):.1f}, max {max(its)}" if its else "")
        lines.append("")
    dec = np.asarray(t["decays"])
    header = f"  {'':<34} {'val loss':>9} {'test loss':>9} {'test acc':>9} {'wall s':>8}"
    lines.append(header)
    lines.append("  " + "-" * (len(header) - 2))
    lines.append(f"  {'baseline: global decay %.2e' % b['decay']:<34} {b['val_loss']:>9.4f} {b['test_loss']:>9.4f} "
                 f"{b['test_acc']:>9.2%} {b['wall_s']:>8.2f}")
    lines.append(f"  {'tuned: %d per-weight decays' % dec.size:<34} {t['val_loss']:>9.4f} {t['test_loss']:>9.4f} "
                 f"{t['test_acc']:>9.2%} {t['wall_s']:>8.2f}")
    dv = t["val_loss"] - b["val_loss"]
    dt = t["test_loss"] - b["test_loss"]
    lines.append(f"  change vs baseline: val loss {dv:+.4f} ({dv / b['val_loss']:+.1%}), "
                 f"test loss {dt:+.4f} ({dt / b['test_loss']:+.1%}), test acc {t['test_acc'] - b['test_acc']:+.2%}")
    lines.append(f"  learned decays: min {dec.min():.2e}, median {np.median(dec):.2e}, max {dec.max():.2e}")
    lines.append("  (the decays were fitted to the validation set, so its loss flatters them: the test set is the "
                 "honest comparison)")
    lines.append(f"  total wall time {result.get('total_wall_s', float('nan')):.2f} s "
                 f"(baseline grid of {len(b['grid'])} fits, then the tuned run starting from its best decay)")
    if result.get("plot"):
        lines.append(f"  plot: {result['plot']}")
    elif result.get("plot_skipped"):
        lines.append(f"  plot skipped: {result['plot_skipped']}")
    return "\n".join(lines)


def save_plot(result: Dict[str, Any], out_dir: str) -> str:
    """Write the PNG: validation/test loss per outer step (baseline as lines) and the learned decays.

    matplotlib is imported here, lazily, through its object API (no pyplot, no
    global backend change). Raises ImportError when it is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    b, t = result["baseline"], result["tuned"]
    hist = t["history"]
    steps = [r["step"] for r in hist] + [len(hist)]
    val = [r["val_loss"] for r in hist] + [t["val_loss"]]
    test = [r["test_loss"] for r in hist] + [t["test_loss"]]

    fig = Figure(figsize=(13, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, width_ratios=[1.2, 1.0, 1.0])
    ax1.plot(steps, val, color="C0", lw=2, label="tuned: validation")
    ax1.plot(steps, test, color="C1", lw=1.2, alpha=0.8, label="tuned: test")
    ax1.axhline(b["val_loss"], color="C0", ls="--", lw=1, label=f"baseline (global decay {b['decay']:.1e}): validation")
    ax1.axhline(b["test_loss"], color="C1", ls=":", lw=1, label="baseline: test")
    ax1.set_xlabel("outer step (Adam on log-decays)")
    ax1.set_ylabel("mean cross-entropy")
    ax1.set_title(f"{result['dataset']}: loss vs outer step")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)

    dec = np.sort(np.asarray(t["decays"]))[::-1]
    ax2.semilogy(np.arange(dec.size), dec, ".-", color="C2", ms=3, lw=1, label="learned (sorted)")
    ax2.axhline(b["decay"], color="k", ls="--", lw=1, label="baseline global decay")
    ax2.set_xlabel("weight (sorted by decay)")
    ax2.set_ylabel("L2 decay  exp(λ)")
    ax2.set_title(f"{dec.size} learned per-weight decays")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, which="both")

    gn = [r["inner_grad_norm"] for r in hist]
    its = [r["solver_iters"] if r["solver_iters"] is not None else np.nan for r in hist]
    ax3.semilogy(steps[:-1], gn, color="C3", lw=1, label="inner gradient norm")
    ax3.set_xlabel("outer step")
    ax3.set_ylabel("‖∇_w L_T‖ at w*", color="C3")
    ax3b = ax3.twinx()
    ax3b.plot(steps[:-1], its, color="C4", lw=1, drawstyle="steps-mid", label=f"{result['solver']} iterations")
    ax3b.set_ylabel(f"{result['solver']} iterations", color="C4")
    ax3.set_title("hypergradient diagnostics")
    ax3.grid(alpha=0.3)

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"demo_logreg_{result['dataset']}_{result['solver']}_seed{result['seed']}.png")
    fig.savefig(path, dpi=110)
    return os.path.abspath(path)
