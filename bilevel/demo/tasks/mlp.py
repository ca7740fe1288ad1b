"""Demo task ``mlp`` (the default): one weight decay per weight of an MLP, tuned during training.

``python -m bilevel demo`` (see :mod:`bilevel.demo`) runs :func:`run`:

- data: scikit-learn's bundled ``load_digits`` (8x8 images, 10 classes, 1797
  samples; nothing is downloaded), split train/val/test deterministically by
  the seed (300 / 300 / 1197, stratified), features standardized with the
  *train* statistics. 300 training images for a 166k-weight network: without
  regularization it overfits, so the decays matter.
- model: MLP 64-512-256-10 with ReLU, float32, initialized from the seed.
- hyperparameters: ``bl.hparams.weight_decay(model, per="parameter",
  exclude=("bias",), shared=True)``, one L2 decay per weight: 64·512 +
  512·256 + 256·10 = 166,400 hyperparameters, ``log decay_i = g + δ_i`` with
  one shared global log-decay ``g`` (one more) learned with the offsets.
- inner problem: Adam (lr 1e-3) on minibatches of 64 training images of
  ``CE + ½ Σ decay ⊙ w²``, 1000 steps.
- outer problem: validation cross-entropy. Every 10 inner steps
  ``bl.HyperOptimizer.step`` takes a hyper step: implicit hypergradient at the
  current weights, ``H u = ∇_w L_V`` solved by a 5-term Neumann series
  (``alpha=0.1``) on the current training minibatch, then Adam (eps 1e-12) on
  the raw log-decays: lr 0.05 on the offsets, 0.2 on the global. For
  the first 100 inner steps a hyper step every 2, so that a far start is left
  before the weights settle under it (140 hyper steps in all).
  ``on_error="skip"`` drops a hyper step whose solve diverges (the MLP's
  Hessian is indefinite early in training); their number is reported.
- the tuned run starts every decay at a fixed 1e-4 (``--init-decay``), not at
  a value the grid found: it replaces the grid search. ``--starts`` /
  ``--compare-starts`` run it from other starts too (1e-6, 1e-4, 1e-2, 1e-1).
- grid: the same model, optimizer, minibatch order and number of inner steps
  with ONE global decay, each of 9 half-decades 1e-5 .. 1e-1; the best by
  validation loss is the "baseline" row. Each tuned run is compared with the
  lowest *test* loss of the 9 (``reached``) and its wall time with the whole
  grid's (``result["starts"]``).

:func:`run` returns a plain JSON-serializable dict of numbers (tests and
scripts check it without parsing text); :mod:`bilevel.demo.report` prints and
draws it.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, TextIO, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel as bl
from bilevel import hparams as hparams_mod

from .. import report
from ..data import Split, load_split
from ..report import Progress
from ..settings import config_dict, torch_threads, with_overrides

__all__ = ["MLPConfig", "SOLVERS", "make_mlp", "make_solver", "solver_text", "load_data", "train_run", "run",
           "decay_stats"]

SOLVERS = ("neumann", "cg")
#: where the tuned run's decays start by default: a fixed global decay, not chosen by the grid
DEFAULT_START = 1e-4
#: ``shared`` settings: one shared log-decay in all (model), one per layer (module), or none ("")
SHARED = ("model", "module", "")
LR_SCHEDULES = ("constant", "cosine")
#: the starts of ``--compare-starts``
COMPARE_STARTS = (1e-6, 1e-4, 1e-2, 1e-1)
DTYPE = torch.float32
IN_FEATURES, N_CLASSES = 64, 10           # digits: 8x8 pixels, 10 classes


# --------------------------------------------------------------------------- configuration
@dataclass
class MLPConfig:
    """Settings of one ``mlp`` demo run; ``None`` fields get defaults (smaller ones with ``quick``) in :meth:`resolved`.

    Attributes:
        seed: seed of the split, the initialization and the minibatch order.
        hidden: hidden layer widths (``(512, 256)``: 166,400 weights, so as many decays).
        n_train, n_val: split sizes (the test set is the rest of the 1797 images).
        inner_steps: Adam steps on the training loss, for the baseline runs and the tuned run alike.
        batch_size: training minibatch size.
        inner_lr: Adam learning rate of the weights.
        hyper_every: a hyper step every this many inner steps.
        outer_lr: Adam learning rate of the raw log-decays.
        solver: ``"neumann"`` or ``"cg"``, the linear solver of the implicit hypergradient.
        solver_iters: Neumann ``steps`` / CG ``maxiter``.
        neumann_alpha: Neumann step ``alpha`` (fixed: no power iteration).
        cg_damping: CG ``damping`` (CG stops at negative curvature: ``on_indefinite="stop"``).
        val_batch: validation images per hyper step (``0``: the whole validation set).
        grid: global decays tried by the baseline.
        init_decay: where the per-weight decays start (``None``: :data:`DEFAULT_START`, 1e-4, whatever the
            grid finds: the tuned run replaces the grid search).
        eval_every: record train/val/test loss every this many inner steps (the curves; default
            40 points, 20 with ``quick``).
        quick: a run of a few seconds (fewer steps, a 3-point grid; same network, same 166,400 decays).
        threads: torch intra-op threads during the run (restored afterwards); ``None``: 1.
        shared: ``"model"`` (default): ``log decay_i = g + δ_i``, one shared global log-decay learned
            with the per-weight offsets (``bl.hparams.weight_decay(shared=True)``); ``"module"``: one
            global per layer; ``""``: plain per-weight log-decays.
        outer_eps: Adam's ``eps`` on the log-decays (1e-12: see :func:`make_outer_optimizer`).
        global_lr: Adam learning rate of the shared globals (the offsets use ``outer_lr``).
        lr_schedule: the globals' rate over the hyper steps, ``"constant"`` or ``"cosine"`` (to 0).
        warm_start: start each hypergradient solve from the last adjoint (``bl.Implicit(warm_start=True)``).
        early_steps: for the first this many inner steps a hyper step every ``early_hyper_every`` steps
            instead of ``hyper_every`` (``None``: a tenth of ``inner_steps``; 0 with ``quick``), so the
            globals travel from a far start before the weights settle under it.
        early_hyper_every: the hyper step interval of that first phase.
        starts: more global decays to run the tuned run from (each one's test loss and wall time
            against the grid: ``result["starts"]``); ``None``: only ``init_decay``.
    """

    seed: int = 0
    hidden: Tuple[int, ...] = (512, 256)
    n_train: int = 300
    n_val: int = 300
    inner_steps: Optional[int] = None
    batch_size: int = 64
    inner_lr: float = 1e-3
    hyper_every: int = 10
    outer_lr: float = 0.05
    solver: str = "neumann"
    solver_iters: Optional[int] = None
    neumann_alpha: float = 0.1
    cg_damping: float = 0.1
    val_batch: int = 0
    grid: Optional[Tuple[float, ...]] = None
    init_decay: Optional[float] = None
    eval_every: Optional[int] = None
    quick: bool = False
    threads: Optional[int] = None
    shared: str = "model"
    outer_eps: float = 1e-12
    global_lr: float = 0.2
    lr_schedule: str = "constant"
    warm_start: bool = False
    early_steps: Optional[int] = None
    early_hyper_every: int = 2
    starts: Optional[Tuple[float, ...]] = None

    def resolved(self) -> "MLPConfig":
        """A copy with every ``None`` replaced by its default; validates the fields."""
        fn = "bilevel demo (mlp)"
        if self.solver not in SOLVERS:
            raise ValueError(f"{fn}: expected solver in {SOLVERS}, got {self.solver!r}.")
        steps = self.inner_steps if self.inner_steps is not None else (300 if self.quick else 1000)
        grid = tuple(float(g) for g in (self.grid if self.grid is not None else
                                        ((1e-4, 1e-3, 1e-2) if self.quick else
                                         tuple(float(10 ** (e / 2)) for e in range(-10, -1)))))
        for name, v in (("inner_steps", steps), ("batch_size", self.batch_size), ("hyper_every", self.hyper_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {name} for {fn}: {v!r} (expected an int >= 1).")
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            raise ValueError(f"Invalid hidden for {fn}: {self.hidden!r} (expected widths >= 1).")
        if not grid or any(not (g > 0 and math.isfinite(g)) for g in grid):
            raise ValueError(f"Invalid grid for {fn}: {grid!r} (expected decays > 0).")
        for name, v in (("inner_lr", self.inner_lr), ("outer_lr", self.outer_lr),
                        ("neumann_alpha", self.neumann_alpha)):
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"Invalid {name} for {fn}: {v!r} (expected a number > 0).")
        if self.init_decay is not None and not (self.init_decay > 0 and math.isfinite(self.init_decay)):
            raise ValueError(f"Invalid init_decay for {fn}: {self.init_decay!r} (expected a decay > 0).")
        if self.starts is not None and any(not (float(x) > 0 and math.isfinite(float(x))) for x in self.starts):
            raise ValueError(f"Invalid starts for {fn}: {self.starts!r} (expected decays > 0).")
        if self.val_batch < 0 or self.cg_damping < 0:
            raise ValueError(f"{fn}: expected val_batch >= 0 and cg_damping >= 0, got {self.val_batch}, {self.cg_damping}.")
        iters = self.solver_iters if self.solver_iters is not None else (5 if self.solver == "neumann" else 10)
        # NOTE: --quick (300 steps) has no early phase: measured on seed 0, its 15 early hyper steps
        # lowered the decays (the greedy hypergradient early in training) and 300 steps did not
        # bring them back (tuned val loss 0.202 vs the grid's 0.199; without: 0.043).
        early = self.early_steps if self.early_steps is not None else (0 if self.quick else steps // 10)
        if self.shared not in SHARED:
            raise ValueError(f"{fn}: expected shared in {SHARED}, got {self.shared!r}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"{fn}: expected lr_schedule in {LR_SCHEDULES}, got {self.lr_schedule!r}.")
        for name, v in (("outer_eps", self.outer_eps), ("global_lr", self.global_lr)):
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"Invalid {name} for {fn}: {v!r} (expected a number > 0).")
        if early < 0 or self.early_hyper_every < 1:
            raise ValueError(f"{fn}: expected early_steps >= 0 and early_hyper_every >= 1, got {early}, "
                             f"{self.early_hyper_every}.")
        return MLPConfig(
            seed=int(self.seed), hidden=tuple(int(h) for h in self.hidden), n_train=int(self.n_train),
            n_val=int(self.n_val), inner_steps=steps, batch_size=self.batch_size, inner_lr=float(self.inner_lr),
            hyper_every=self.hyper_every, outer_lr=float(self.outer_lr), solver=self.solver, solver_iters=int(iters),
            neumann_alpha=float(self.neumann_alpha), cg_damping=float(self.cg_damping), val_batch=int(self.val_batch),
            grid=grid, init_decay=float(DEFAULT_START if self.init_decay is None else self.init_decay),
            eval_every=self.eval_every or max(1, steps // (20 if self.quick else 40)), quick=self.quick,
            threads=1 if self.threads is None else max(1, int(self.threads)),
            shared=self.shared, outer_eps=float(self.outer_eps),
            global_lr=float(self.global_lr),
            lr_schedule=self.lr_schedule, warm_start=bool(self.warm_start),
            early_steps=int(early), early_hyper_every=int(self.early_hyper_every),
            starts=None if not self.starts else tuple(float(x) for x in self.starts),
        )

    @property
    def layer_sizes(self) -> List[int]:
        return [IN_FEATURES, *[int(h) for h in self.hidden], N_CLASSES]

    @property
    def n_hparams(self) -> int:
        """Number of hyperparameters (one decay per weight, biases not decayed), without building anything."""
        s = self.layer_sizes
        return sum(a * b for a, b in zip(s[:-1], s[1:]))

    @property
    def n_params(self) -> int:
        s = self.layer_sizes
        return self.n_hparams + sum(s[1:])


# --------------------------------------------------------------------------- model, solver, data
def make_mlp(cfg: MLPConfig) -> nn.Sequential:
    """The MLP ``64 → hidden... → 10`` with ReLU, initialized from ``cfg.seed`` (same init for every run)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        layers: List[nn.Module] = []
        sizes = cfg.layer_sizes
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers).to(DTYPE)
    finally:
        torch.random.set_rng_state(gen_state)


def solver_text(cfg: MLPConfig) -> str:
    """A short description of :func:`make_solver`'s solver for the report."""
    if cfg.solver == "neumann":
        return f"bl.Neumann(steps={cfg.solver_iters}, alpha={cfg.neumann_alpha})"
    return f"bl.CG(maxiter={cfg.solver_iters}, damping={cfg.cg_damping}, on_indefinite='stop')"


def make_solver(cfg: MLPConfig) -> bl.Solver:
    """The linear solver of the implicit hypergradient.

    NOTE: early in training the MLP's Hessian is indefinite and its largest
    eigenvalue is large (> 2 measured at step 10, seed 0). A Neumann series with
    ``alpha=1`` then grows (DivergenceError: 7 of 100 hyper steps skipped);
    ``alpha=0.1`` skipped none on seeds 0-2. ``alpha=None`` would spend 20
    extra Hessian products per hyper step on power iteration. CG gets damping
    and stops at negative curvature instead of raising.
    """
    if cfg.solver == "neumann":
        return bl.Neumann(steps=cfg.solver_iters, alpha=cfg.neumann_alpha)
    return bl.CG(maxiter=cfg.solver_iters, damping=cfg.cg_damping, on_indefinite="stop", tol=1e-6)


def load_data(cfg: MLPConfig) -> Split:
    """Digits, split by ``cfg.seed`` and standardized with train statistics (:func:`bilevel.demo.data.load_split`), float32."""
    return load_split("digits", seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val, dtype=DTYPE)


def minibatches(X: Tensor, y: Tensor, batch_size: int, seed: int) -> Iterator[Tuple[Tensor, Tensor]]:
    """Endless shuffled minibatches (a new permutation every epoch), deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    bs = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - bs + 1, bs):
            idx = perm[i:i + bs]
            yield X[idx], y[idx]


class ValLoader:
    """The ``outer_loader`` of the HyperOptimizer: validation batches (the whole set when ``batch_size`` is 0)."""

    def __init__(self, X: Tensor, y: Tensor, batch_size: int, seed: int) -> None:
        self.X, self.y, self.batch_size, self.seed = X, y, batch_size, seed

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        if self.batch_size <= 0 or self.batch_size >= self.X.shape[0]:
            while True:
                yield self.X, self.y
        yield from minibatches(self.X, self.y, self.batch_size, self.seed)


def ce(model: nn.Module, batch: Tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


@torch.no_grad()
def evaluate(model: nn.Module, data: Split) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for part in ("train", "val", "test"):
        X, y = getattr(data, f"X_{part}"), getattr(data, f"y_{part}")
        logits = model(X)
        out[f"{part}_loss"] = float(F.cross_entropy(logits, y))
        out[f"{part}_acc"] = float((logits.argmax(1) == y).to(DTYPE).mean())
    return out


def make_outer_optimizer(cfg: MLPConfig, hp: Dict[str, Tensor], penalty: bl.hparams.WeightDecay) -> torch.optim.Adam:
    """Adam on the raw log-decays: the per-weight offsets at ``outer_lr``, the shared globals at ``global_lr``.

    NOTE: ``eps=1e-12``, not Adam's default 1e-8. A log-decay's hypergradient is
    ``decay · w · u``: from a start of 1e-6 it is ~1e-12 per weight, and with
    ``eps=1e-8`` Adam's step ``lr · m / (√v + eps)`` shrank to ~1e-4·lr, so the
    decays never left the start.
    """
    gkeys = set(penalty.shared.values())
    groups = [{"params": [v for k, v in hp.items() if k not in gkeys], "lr": cfg.outer_lr}]
    if gkeys:
        groups.append({"params": [hp[k] for k in sorted(gkeys)], "lr": cfg.global_lr})
    return torch.optim.Adam(groups, lr=cfg.outer_lr, eps=cfg.outer_eps)


def n_hyper_steps(cfg: MLPConfig) -> int:
    """Hyper steps of a tuned run: every ``early_hyper_every`` inner steps for the first ``early_steps``,
    then every ``hyper_every``."""
    early = min(cfg.early_steps, cfg.inner_steps)
    late = cfg.inner_steps // cfg.hyper_every - early // cfg.hyper_every
    return (early // cfg.early_hyper_every if early > 0 else 0) + late


def outer_schedule(cfg: MLPConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The shared globals' learning rate over the run's hyper steps (stepped after each one taken):
    ``"constant"``, or ``"cosine"`` (from ``global_lr`` down to 0). The offsets keep ``outer_lr``."""
    total = max(1, n_hyper_steps(cfg))

    def cosine(i: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(i, total) / total))

    def constant(i: int) -> float:
        return 1.0

    n = len(optimizer.param_groups)
    lambdas = [cosine if cfg.lr_schedule == "cosine" and g == 1 else constant for g in range(n)]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


# --------------------------------------------------------------------------- one training run
def train_run(cfg: MLPConfig, data: Split, *, decay: float, tune: bool,
              on_step: Optional[Callable[[int, str], None]] = None) -> Dict[str, Any]:
    """Train the MLP for ``cfg.inner_steps`` Adam steps with L2 decays starting at ``decay``.

    ``tune=False``: one global decay, fixed (a baseline run). ``tune=True``: one decay per
    weight, updated by a hyper step every ``cfg.hyper_every`` inner steps. Both go through
    ``bl.HyperOptimizer.step`` / ``inner_step``, with the same initialization and minibatches.

    Returns a dict: final ``evaluate`` figures, ``wall_s``, the ``curve`` (figures every
    ``eval_every`` steps), and for ``tune=True`` the hyper steps' statistics and the
    learned decays (a tensor under ``"_decays"``, per layer).
    """
    model = make_mlp(cfg)
    # Biases are not decayed: one decay per *weight*.
    shared = (cfg.shared or False) if tune else False
    hp, penalty = bl.hparams.weight_decay(model, init=decay, per="parameter" if tune else "model", exclude=("bias",),
                                          shared=shared)
    outer_optimizer = make_outer_optimizer(cfg, hp, penalty)

    def inner_loss(m: nn.Module, h: Dict[str, Tensor], batch: Tuple[Tensor, Tensor]) -> Tensor:
        return ce(m, batch)    # + penalty, added by the HyperOptimizer (penalty= below)

    def outer_loss(m: nn.Module, h: Dict[str, Tensor], batch: Tuple[Tensor, Tensor]) -> Tensor:
        return ce(m, batch)

    hopt = bl.HyperOptimizer(
        model, hp, inner_loss=inner_loss, outer_loss=outer_loss,
        inner_optimizer=torch.optim.Adam(model.parameters(), lr=cfg.inner_lr),
        outer_optimizer=outer_optimizer,
        method=bl.Implicit(solver=make_solver(cfg), warm_start=cfg.warm_start),
        outer_loader=ValLoader(data.X_val, data.y_val, cfg.val_batch, cfg.seed + 2),
        hyper_every=cfg.early_hyper_every if cfg.early_steps > 0 else cfg.hyper_every, on_error="skip",
        # a separable penalty given apart: its Hessian is applied elementwise in the hyper steps
        penalty=penalty,
    )
    schedule = outer_schedule(cfg, outer_optimizer)
    gkeys = sorted(set(penalty.shared.values()))
    batches = minibatches(data.X_train, data.y_train, cfg.batch_size, cfg.seed + 1)
    curve: Dict[str, List[float]] = {k: [] for k in ("step", "train_loss", "val_loss", "test_loss",
                                                       "train_acc", "val_acc", "test_acc")}

    def record(step: int) -> None:
        ev = evaluate(model, data)
        curve["step"].append(step)
        for k, v in ev.items():
            curve[k].append(v)

    hyper: List[Dict[str, Any]] = []
    errors: List[str] = []
    eval_s = 0.0
    t0 = time.perf_counter()
    t = time.perf_counter()
    record(0)
    eval_s += time.perf_counter() - t
    with warnings.catch_warnings():
        # on_error="skip" warns for each skipped hyper step; they are counted and reported instead.
        warnings.filterwarnings("ignore", message=r"bilevel\.HyperOptimizer", category=RuntimeWarning)
        for step in range(1, cfg.inner_steps + 1):
            batch = next(batches)
            if step == cfg.early_steps + 1:
                hopt.hyper_every = cfg.hyper_every
            if tune:
                last = hopt.last_stats
                loss = hopt.step(batch)
                st = hopt.last_stats
                if st is not None and st is not last:
                    if not st.skipped:
                        schedule.step()
                    hyper.append({"step": step, "skipped": st.skipped, "outer_loss": st.outer_loss,
                                  "hypergrad_norm": st.hypergrad_norm, "inner_grad_norm": st.inner_grad_norm,
                                  "solver_iterations": st.solver_iterations, "solver_residual": st.solver_residual,
                                  "seconds": st.seconds,
                                  "global_decays": [float(hparams_mod.positive(hp[k].detach(), penalty.kind))
                                                    for k in gkeys]})
                    if st.skipped and st.error:
                        errors.append(f"step {step}: {st.error}")
            else:
                loss = hopt.inner_step(batch)
            if step % cfg.eval_every == 0 or step == cfg.inner_steps:
                t = time.perf_counter()
                record(step)
                eval_s += time.perf_counter() - t
            if on_step is not None and (step % 10 == 0 or step == cfg.inner_steps):
                on_step(step, f"inner loss {float(loss):.4f}")
    wall = time.perf_counter() - t0
    res: Dict[str, Any] = {**evaluate(model, data), "decay": float(decay), "wall_s": wall,
                           "train_s": wall - eval_s, "curve": curve}
    if tune:
        skipped = sum(1 for h in hyper if h["skipped"])
        res.update(hyper_steps=len(hyper), skipped_hyper_steps=skipped, skip_errors=errors[:5],
                   hyper_s=float(sum(h["seconds"] for h in hyper)), hyper=hyper,
                   _decays={name: penalty.decays(hp)[name].detach().clone() for name in penalty.keys})
    return res


# --------------------------------------------------------------------------- the run
def run(config: Optional[MLPConfig] = None, *, out_dir: Optional[str] = None, progress: bool = True,
        stream: Optional[TextIO] = None, **overrides: Any) -> Dict[str, Any]:
    """Run the demo: baseline grid of global decays, then 166,400 per-weight decays tuned during training.

    Args:
        config: an :class:`MLPConfig`; keyword ``overrides`` (e.g. ``seed=1``, ``quick=True``)
            replace its fields.
        out_dir: folder for the PNG plots; ``None`` makes none.
        progress: show progress bars on ``stream``.
        stream: where the progress goes (``sys.stderr`` by default).

    Returns:
        A JSON-serializable dict: ``config``, ``n_hparams``, ``baseline`` and ``tuned``
        (``val_loss``, ``val_acc``, ``test_loss``, ``test_acc``, ``wall_s``, ``curve``...),
        ``baseline["grid"]`` (every decay tried), ``tuned["hyper_steps"]`` and
        ``tuned["skipped_hyper_steps"]``, ``tuned["decay_stats"]`` (histograms of the
        learned decays per layer), ``plots`` (PNG paths, or empty with ``plot_skipped``).

    Example:
        >>> res = run(quick=True, progress=False)
        >>> res["n_hparams"], res["tuned"]["val_loss"] < res["baseline"]["val_loss"]
        (166400, True)
    """
    cfg = with_overrides(config or MLPConfig(), overrides, "bilevel demo run()").resolved()
    with torch_threads(cfg.threads):
        result = _run(cfg, progress=progress, stream=stream)
    return result if out_dir is None else report.add_plots(result, out_dir)


def _run(cfg: MLPConfig, *, progress: bool, stream: Optional[TextIO]) -> Dict[str, Any]:
    t_start = time.perf_counter()
    out = sys.stderr if stream is None else stream
    data = load_data(cfg)
    # NOTE: the first torch.optim.Adam(...) of a process imports torch._dynamo (~1 s, measured
    # with torch 2.13 CPU); pay it here so that it is not charged to the first baseline run.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    def say(text: str) -> None:
        if progress:
            out.write(text + "\n")
            out.flush()

    say(f"bilevel demo (mlp): digits, MLP {'-'.join(map(str, cfg.layer_sizes))} ({cfg.n_params:,} parameters), "
        f"{cfg.n_hparams:,} hyperparameters (one weight decay per weight)")
    # -- baseline: one global decay, grid search -----------------------------------------------
    say(f"baseline: {len(cfg.grid)} runs of {cfg.inner_steps} Adam steps, global decay "
        f"{cfg.grid[0]:.0e}..{cfg.grid[-1]:.0e}")
    bar = Progress(len(cfg.grid) * cfg.inner_steps, stream=stream, enabled=progress, label="baseline step")
    t0 = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    best: Optional[Dict[str, Any]] = None
    for i, dec in enumerate(cfg.grid):
        def on_step(step: int, text: str, i: int = i, dec: float = dec) -> None:
            bar.update(i * cfg.inner_steps + step, f"decay {dec:.0e}  {text}")

        r = train_run(cfg, data, decay=dec, tune=False, on_step=on_step)
        rows.append({k: r[k] for k in ("decay", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc", "wall_s")})
        if best is None or r["val_loss"] < best["val_loss"]:
            best = r
    bar.close()
    assert best is not None
    baseline = {**best, "grid": rows, "grid_wall_s": time.perf_counter() - t0}

    # -- tuned: one decay per weight, hyper steps during training ------------------------------
    init = float(cfg.init_decay)
    say(f"tuned: {cfg.inner_steps} Adam steps, {n_hyper_steps(cfg)} hyper steps ({solver_text(cfg)}), "
        f"decays start at {init:.1e}")
    bar = Progress(cfg.inner_steps, stream=stream, enabled=progress, label="tuned step")
    tuned = train_run(cfg, data, decay=init, tune=True, on_step=lambda s, text: bar.update(s, text))
    bar.close()
    decays = tuned.pop("_decays")
    tuned["decay_stats"] = decay_stats(decays, init)

    # -- the tuned run from other starts, against the whole grid ------------------------------
    runs = [_start_row(tuned, baseline)]
    for start in cfg.starts or ():
        if any(start == r["start"] for r in runs):
            continue
        say(f"tuned from start {start:.0e}: {cfg.inner_steps} Adam steps")
        bar = Progress(cfg.inner_steps, stream=stream, enabled=progress, label=f"tuned step (start {start:.0e})")
        other = train_run(cfg, data, decay=start, tune=True, on_step=lambda s, text: bar.update(s, text))
        bar.close()
        other["median_decay"] = float(torch.cat([d.reshape(-1) for d in other.pop("_decays").values()]).median())
        runs.append(_start_row(other, baseline))
    order = list(dict.fromkeys(cfg.starts or (init,)))
    by_start = {r["start"]: r for r in runs}
    starts = {"grid_best_test_loss": min(r["test_loss"] for r in baseline["grid"]),
              "grid_selected_test_loss": baseline["test_loss"], "grid_wall_s": baseline["grid_wall_s"],
              "runs": [by_start[x] for x in order]}

    result: Dict[str, Any] = {
        "task": "mlp",
        "config": config_dict(cfg),
        "dataset": "digits",
        "seed": cfg.seed,
        "layers": cfg.layer_sizes,
        "solver_repr": solver_text(cfg),
        "n_train": int(data.X_train.shape[0]),
        "n_val": int(data.X_val.shape[0]),
        "n_test": int(data.X_test.shape[0]),
        "n_params": cfg.n_params,
        "n_hparams": int(sum(d.numel() for d in decays.values())),
        "baseline": baseline,
        "tuned": tuned,
        "starts": starts,
        "plots": [],
        "plot_skipped": None,
        "total_wall_s": time.perf_counter() - t_start,
    }
    return result


def _start_row(run: Dict[str, Any], baseline: Dict[str, Any]) -> Dict[str, Any]:
    """One tuned run against the grid: its start, test loss, wall time, and whether it reached the
    grid's best test loss (the lowest of every grid point, not only the one chosen by validation)."""
    best = min(r["test_loss"] for r in baseline["grid"])
    median = run["decay_stats"]["median"] if "decay_stats" in run else run["median_decay"]
    return {"start": run["decay"], "test_loss": run["test_loss"], "test_acc": run["test_acc"],
            "val_loss": run["val_loss"], "wall_s": run["wall_s"], "reached": run["test_loss"] <= best,
            "test_loss_minus_grid_best": run["test_loss"] - best, "time_vs_grid": run["wall_s"] / baseline["grid_wall_s"],
            "median_decay": median, "hyper_steps": run["hyper_steps"], "skipped_hyper_steps": run["skipped_hyper_steps"],
            "final_global_decays": run["hyper"][-1]["global_decays"] if run["hyper"] else []}


def decay_stats(decays: Dict[str, Tensor], baseline_decay: float, bins: int = 60) -> Dict[str, Any]:
    """Small JSON summary of the learned decays: quantiles, log10 histograms per layer, mean per input pixel."""
    allv = torch.cat([d.reshape(-1) for d in decays.values()]).double()
    logs = allv.log10()
    lo = min(float(logs.min()), math.log10(baseline_decay)) - 0.05
    hi = max(float(logs.max()), math.log10(baseline_decay)) + 0.05
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    hist = {}
    for name, d in decays.items():
        counts = torch.histc(d.reshape(-1).double().log10(), bins=bins, min=lo, max=hi)
        hist[name] = [int(c) for c in counts.tolist()]
    q = torch.quantile(logs, torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0], dtype=torch.float64))
    first = next(iter(decays.values()))                   # (hidden, 64): decays of the input layer
    pixel = first.double().log10().mean(0)
    return {
        "log10_edges": edges.tolist(),
        "hist": hist,
        "shapes": {k: list(v.shape) for k, v in decays.items()},
        "min": float(allv.min()), "max": float(allv.max()), "median": float(10 ** q[2]),
        "q05": float(10 ** q[1]), "q95": float(10 ** q[3]),
        "frac_above_baseline": float((allv > baseline_decay * 1.01).double().mean()),
        "frac_below_baseline": float((allv < baseline_decay / 1.01).double().mean()),
        "pixel_mean_log10": pixel.tolist(),
        "layer_median": {k: float(v.double().median()) for k, v in decays.items()},
    }
