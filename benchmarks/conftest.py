"""Shared problem, measurement helper and ratio report of the benchmark suite.

Run from the repository root (the files are named ``bench_*.py``; the
:func:`pytest_collect_file` hook below collects them, so no ``-o python_files``
is needed)::

    python -m pytest benchmarks --benchmark-only

(The HVP/IFT/tree figures of RESULTS.md add ``--benchmark-min-rounds=10 --benchmark-max-time=2``.)

Every benchmark belongs to a *group* with one *unit* benchmark measured in the
same run (one gradient for ``hvp`` and ``ift``, one flat-buffer update for
``tree``). Ratios ``mean / unit mean`` and ``min / unit min`` are stored in
``benchmark.extra_info`` (so they land in ``--benchmark-json``), printed in a
table at the end of the session, and written as JSON with ``--ratios-json PATH``.
The table also gives the CPU load of *other* processes during each benchmark
(:class:`ForeignLoad`): on a shared 2-core machine that is what spoils a run.

The problem: an MLP 784-1024-256-10 with tanh (1,068,810 float32 parameters),
batches of 256, seed 0, as a pure loss ``loss(params, X, y)`` through
``torch.func.functional_call``. It is trained for a few Adam steps on the
weight-decayed inner loss so that the Hessian is positive definite on the
Krylov spaces the solvers explore (CG raises on negative curvature, Neumann on
growth); the cost of a product does not depend on the point.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TypeVar

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import bilevel as bl
from _measure import paired_ratio
from bilevel.hparams import WeightDecay
from bilevel.solvers import power_iteration

T = TypeVar("T")
Tree = Dict[str, Tensor]

SEED = 0
LAYERS = (784, 1024, 256, 10)
BATCH = 256
WEIGHT_DECAY = 1e-2  # exp(log-decay) of every parameter at the benchmarked point
TRAIN_STEPS = 50
TRAIN_LR = 3e-3
WARMUP_CALLS = 2  # untimed calls before each benchmark (allocator, lazy init)
PAIRS = 15  # back-to-back (unit, X) pairs of a paired ratio
NOISY_LOAD = 0.1  # cores of foreign load above which a benchmark is flagged as disturbed


# -- collection ----------------------------------------------------------------
def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Optional[pytest.Module]:
    """Collect ``bench_*.py`` in this folder as test modules.

    The repository's ``python_files`` is pytest's default (``test_*.py``), which a
    conftest cannot change. Files that pytest collects anyway (given explicitly
    on the command line, or matched by a ``-o python_files=...`` override) are
    left to it, so nothing is collected twice.
    """
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--ratios-json", default=None, metavar="PATH",
                     help="bilevel benchmarks: also write the ratio table as JSON to PATH.")
    parser.addoption("--gpu-report", default=None, metavar="PATH",
                     help="bench_gpu.py: also write its ratio table as markdown to PATH (and JSON beside it).")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> Dict[str, Any]:
    """What the figures depend on: CPU, cores, torch version and thread count."""
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


class ForeignLoad:
    """CPU used by *other* processes while a benchmark runs, in cores (Linux only).

    ``/proc/stat`` gives the whole machine's busy time, ``os.times()`` this
    process's; the difference over the wall time is the load of everything else.
    On this 2-core machine with 2 torch threads, one foreign busy core slows
    BLAS-bound code by 2-20x (OpenMP threads wait for the preempted one), and it
    does so for whole seconds, so ``mean/min`` alone does not reveal it.
    """

    def __init__(self) -> None:
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: Optional[tuple[float, float, float]] = None

    def _snapshot(self) -> Optional[tuple[float, float, float]]:
        try:
            with open("/proc/stat", encoding="ascii") as fh:
                fields = [int(x) for x in fh.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields) - fields[3] - fields[4]) / self._hz  # minus idle and iowait
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> Optional[float]:
        end = self._snapshot()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        wall = end[0] - self._start[0]
        foreign = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(0.0, foreign / wall)


def pytest_report_header(config: pytest.Config) -> str:
    m = machine_info()
    return (f"bilevel benchmarks: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
            f"({m['torch_threads']} threads), Python {m['python']}")


# -- the problem -----------------------------------------------------------------
def make_mlp(layers: tuple[int, ...] = LAYERS) -> nn.Sequential:
    """``Linear -> tanh -> ... -> Linear`` (tanh: smooth, so second derivatives are meaningful)."""
    mods: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(layers[:-1], layers[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(layers) - 2:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods)


@dataclass
class MLPProblem:
    """The benchmarked bilevel problem (all tensors float32 on CPU).

    Attributes:
        model: the module whose parameters are swapped in by ``functional_call``.
        params: the point (detached leaves), keys as in ``model.named_parameters()``.
        hparams: per-parameter log weight decay, same keys and shapes as ``params``.
        X, y: training batch (256 × 784, labels in 0..9).
        X_val, y_val: validation batch of the same size.
    """

    model: nn.Module
    params: Tree
    hparams: Tree
    X: Tensor
    y: Tensor
    X_val: Tensor
    y_val: Tensor

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def loss(self, params: Tree, X: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy of the MLP with parameters ``params`` on ``(X, y)``."""
        return nn.functional.cross_entropy(functional_call(self.model, params, (X,)), y)

    def inner_loss(self, params: Tree, hparams: Tree, X: Tensor, y: Tensor) -> Tensor:
        """``CE + 0.5 Σ exp(hparams) ⊙ params²``: one learned decay per weight."""
        reg = sum((hparams[k].exp() * params[k].square()).sum() for k in params)
        return self.loss(params, X, y) + 0.5 * reg

    def data_loss(self, params: Tree, hparams: Tree, X: Tensor, y: Tensor) -> Tensor:
        """The inner loss without its penalty: ``inner_loss = data_loss + penalty``."""
        return self.loss(params, X, y)

    def output_loss(self, params: Tree, hparams: Tree, X: Tensor, y: Tensor) -> Tensor:
        """``data_loss`` written with ``bl.losses.cross_entropy``: the seam of ``hvp_mode="gauss_newton"``."""
        return bl.losses.cross_entropy(functional_call(self.model, params, (X,)), y)

    @property
    def penalty(self) -> WeightDecay:
        """``0.5 Σ exp(hparams) ⊙ params²`` as a declared separable penalty (``penalty=`` of the library)."""
        return WeightDecay({k: k for k in self.params}, per="parameter", kind="exp")

    def outer_loss(self, params: Tree, hparams: Tree, X: Tensor, y: Tensor) -> Tensor:
        """Validation cross-entropy (no direct dependence on ``hparams``)."""
        return self.loss(params, X, y)

    def leaves(self) -> Tree:
        """Fresh detached copies of ``params`` with ``requires_grad=True``."""
        return {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}

    def random_direction(self, seed: int = 1) -> Tree:
        """A tree ``v`` like ``params`` with N(0, 1) entries (seeded)."""
        gen = torch.Generator().manual_seed(seed)
        return {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in self.params.items()}


def _build_problem(layers: tuple[int, ...] = LAYERS, batch: int = BATCH) -> MLPProblem:
    torch.manual_seed(SEED)
    model = make_mlp(layers)
    teacher = torch.randn(layers[0], layers[-1])  # learnable labels: argmax of a random linear map
    X, X_val = torch.randn(batch, layers[0]), torch.randn(batch, layers[0])
    y, y_val = (X @ teacher).argmax(1), (X_val @ teacher).argmax(1)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    hparams = {k: torch.full_like(v, math.log(WEIGHT_DECAY)) for k, v in init.items()}
    prob = MLPProblem(model, init, hparams, X, y, X_val, y_val)
    # NOTE: at the random initialization the Hessian is indefinite and
    # bl.CG(maxiter=10, tol=0.0) raises DivergenceError; a few Adam steps on the
    # decayed loss give a point where 10 CG steps and the Neumann series are fine.
    w = prob.leaves()
    opt = torch.optim.Adam(list(w.values()), lr=TRAIN_LR)
    for _ in range(TRAIN_STEPS):
        opt.zero_grad(set_to_none=True)
        prob.inner_loss(w, hparams, X, y).backward()
        opt.step()
    prob.params = {k: v.detach() for k, v in w.items()}
    return prob


@pytest.fixture(scope="session")
def problem() -> MLPProblem:
    """The trained MLP problem, built once per session."""
    return _build_problem()


@pytest.fixture(scope="session")
def neumann_alpha(problem: MLPProblem) -> float:
    """A fixed Neumann step ``0.9 / λ_max(H)``, estimated once outside any timing."""
    op = bl.HessianOperator(problem.inner_loss, problem.params, problem.hparams, (problem.X, problem.y))
    lam = float(power_iteration(op.matvec_flat, op.flat.zeros(), iters=20))
    if not (math.isfinite(lam) and lam > 0):
        raise RuntimeError(f"benchmarks: expected a positive λ_max at the benchmarked point, got {lam}.")
    return 0.9 / lam


# -- measurement and the ratio report ---------------------------------------------
@dataclass
class Timing:
    """One benchmark's statistics in seconds, and its ratio to its group's unit."""

    group: str
    name: str
    mean: float
    stddev: float
    median: float
    min: float
    rounds: int
    is_unit: bool
    other_load: Optional[float] = None  # cores used by other processes meanwhile
    ratio_mean: Optional[float] = None
    ratio_min: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    paired: Optional[float] = None  # median of back-to-back time(X)/time(unit) pairs (Measure paired_with=)
    flop_floor: Optional[float] = None  # matmul FLOPs of X / those of the unit (torch.utils.flop_counter)


class RatioReport:
    """Timings of the session, grouped; each group's ratios are taken to its unit."""

    def __init__(self) -> None:
        self.groups: Dict[str, List[Timing]] = {}

    def unit(self, group: str) -> Optional[Timing]:
        return next((t for t in self.groups.get(group, []) if t.is_unit), None)

    def add(self, t: Timing) -> None:
        self.groups.setdefault(t.group, []).append(t)

    def finalize(self) -> None:
        """Fill the ratios (the unit may have run after some of its group)."""
        for group, timings in self.groups.items():
            u = self.unit(group)
            for t in timings:
                if u is not None:
                    t.ratio_mean, t.ratio_min = t.mean / u.mean, t.min / u.min

    def lines(self) -> List[str]:
        self.finalize()
        out: List[str] = []
        for group, timings in self.groups.items():
            u = self.unit(group)
            unit_name = u.name if u is not None else "(unit not measured in this run)"
            out.append(f"[{group}] unit = {unit_name}")
            out.append(f"  {'benchmark':<48} {'mean ms':>9} {'± sd':>8} {'min ms':>8} {'mean/min':>8}"
                       f" {'rounds':>6} {'other load':>10} {'x unit (mean)':>14} {'x unit (min)':>13}"
                       f" {'x unit (paired)':>16} {'FLOP floor':>10} {'x floor':>8}")
            for t in timings:
                rm = f"{t.ratio_mean:.2f}" if t.ratio_mean is not None else "-"
                rn = f"{t.ratio_min:.2f}" if t.ratio_min is not None else "-"
                ol = "-" if t.other_load is None else f"{t.other_load:.2f}" + ("!" if t.other_load > NOISY_LOAD else " ")
                out.append(f"  {t.name:<48} {1e3 * t.mean:>9.3f} {1e3 * t.stddev:>8.3f} {1e3 * t.min:>8.3f}"
                           f" {t.mean / t.min:>8.2f} {t.rounds:>6} {ol:>10} {rm:>14} {rn:>13}"
                           f" {'-' if t.paired is None else f'{t.paired:.2f}':>16}"
                           f" {'-' if t.flop_floor is None else f'{t.flop_floor:.2f}':>10}"
                           f" {'-' if t.flop_floor is None or t.paired is None else f'{t.paired / t.flop_floor:.2f}':>8}")
        worst = max((t.other_load or 0.0 for ts in self.groups.values() for t in ts), default=0.0)
        out.append(f"other load = CPU cores used by other processes during the benchmark (worst {worst:.2f}); "
                   f"'!' marks more than {NOISY_LOAD}: those figures are disturbed, rerun.")
        out.append("FLOP floor = matmul FLOPs of one call / those of one unit call (torch.utils.flop_counter): the "
                   "time ratio no implementation can go below on any hardware; x floor = paired ratio / FLOP floor.")
        return out

    def to_json(self) -> Dict[str, Any]:
        self.finalize()
        return {"machine": machine_info(),
                "groups": {g: [asdict(t) for t in ts] for g, ts in self.groups.items()}}


_REPORT_KEY = pytest.StashKey[RatioReport]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REPORT_KEY] = RatioReport()
    # torch.func's first jvp scripts its decompositions (a torch-internal DeprecationWarning).
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class Measure:
    """Time ``fn`` with pytest-benchmark and record it in the session's report.

    Call as ``measure(fn, group="hvp", name="...", unit=False, **extra)``; returns
    ``fn()``'s value. ``fn`` runs ``WARMUP_CALLS`` times untimed first. Round
    counts follow the command line (``--benchmark-min-rounds``,
    ``--benchmark-max-time``).
    """

    def __init__(self, benchmark: Any, report: RatioReport) -> None:
        self._benchmark = benchmark
        self._report = report

    def __call__(self, fn: Callable[[], T], *, group: str, name: str, unit: bool = False,
                 paired_with: Optional[Callable[[], Any]] = None, pairs: int = PAIRS, **extra: Any) -> T:
        bm = self._benchmark
        bm.group = group
        bm.extra_info.update({"name": name, "unit": unit, **extra})
        for _ in range(WARMUP_CALLS):
            fn()
        load = ForeignLoad()
        load.start()
        result = bm(fn)
        other = load.stop()
        meta = bm.stats  # None when benchmarking is disabled (--benchmark-disable)
        if meta:
            s = meta.stats
            t = Timing(group, name, s.mean, s.stddev, s.median, s.min, s.rounds, unit, other, extra=dict(extra))
            bm.extra_info["other_load_cores"] = other
            self._report.add(t)
            if paired_with is not None:
                t.paired = paired_ratio(fn, paired_with, pairs)
                bm.extra_info["x_unit_paired_median"] = t.paired
                unit_flops = matmul_flops(paired_with)
                if unit_flops > 0:
                    t.flop_floor = matmul_flops(fn) / unit_flops
                    bm.extra_info["flop_floor_x_unit"] = t.flop_floor
            u = self._report.unit(group)
            if u is not None:
                bm.extra_info["x_unit_mean"] = t.mean / u.mean
                bm.extra_info["x_unit_min"] = t.min / u.min
        return result


def matmul_flops(fn: Callable[[], Any]) -> int:
    """Matmul (and convolution) floating-point operations of one call of ``fn``, as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them (forward, backward and double backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@pytest.fixture
def measure(benchmark: Any, request: pytest.FixtureRequest) -> Measure:
    """The :class:`Measure` helper bound to this test's ``benchmark`` fixture."""
    return Measure(benchmark, request.config.stash[_REPORT_KEY])


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    report = config.stash.get(_REPORT_KEY, None)
    if report is None or not report.groups:
        return
    tr = terminalreporter
    tr.write_sep("=", "bilevel: ratios to each group's unit, measured in this run")
    m = machine_info()
    tr.write_line(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)")
    for line in report.lines():
        tr.write_line(line)
    path = config.getoption("--ratios-json", None)
    if path:
        Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        tr.write_line(f"ratios written to {path}")
