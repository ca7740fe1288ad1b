"""bilevel against exact references, TorchOpt, higher and black-box search (Optuna).

Every experiment is a plain function ``run_<name>(smoke=False) -> dict`` returning the figures
it measured (JSON-serializable). ``benchmarks/make_results.py`` runs them and writes
``benchmarks/results_baselines.json``, the generated block of ``benchmarks/RESULTS.md``, the
README table and the PNG plots; ``bench_accuracy.py``, ``bench_anchors.py``, ``bench_scaling.py``,
``bench_hpo.py`` and ``bench_repro.py`` run the same functions under pytest-benchmark;
``tests/test_benchmarks_smoke.py`` runs each with ``smoke=True`` (tiny sizes, a few seconds in
all) so that none of them can rot.

Timings are ratios measured in this process: ``paired(fn, unit)`` is the median over
back-to-back pairs of ``time(fn) / time(unit)`` (robust to the 15-30% drift of this shared
machine, see benchmarks/RESULTS.md), and every timed row records the CPU load of *other*
processes (:class:`conftest.ForeignLoad`, cores). Peak memory is measured in a fresh
process per configuration (``python benchmarks/baselines.py --mem ...``):
:func:`_measure.peak_rss_growth` of the second call (as bench_unroll.py).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bilevel as bl  # noqa: E402
from _measure import paired_times, peak_rss_growth, run_in_fresh_process  # noqa: E402


def _bench_conftest() -> Any:
    """benchmarks/conftest.py under its own module name (``conftest`` may be tests/conftest.py)."""
    import importlib.util

    name = "bilevel_benchmarks_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


ForeignLoad = _bench_conftest().ForeignLoad
make_mlp = _bench_conftest().make_mlp

Tree = Dict[str, Tensor]
# TorchOpt 0.7.3 calls functorch.vjp, deprecated in torch 2.x: one FutureWarning per call.
warnings.filterwarnings("ignore", message=".*functorch.vjp.*", category=FutureWarning)


# -- measurement helpers ----------------------------------------------------------------------
def timed(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Minimum wall time of ``repeats`` calls (after one warm-up call), seconds."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def paired(fn: Callable[[], Any], unit: Callable[[], Any], pairs: int = 9, warmup: int = 1) -> Dict[str, float]:
    """Median of back-to-back ``time(fn)/time(unit)`` over ``pairs``, the unit's median time and the other load."""
    for _ in range(warmup):
        unit()
        fn()
    load = ForeignLoad()
    load.start()
    ratios, units = paired_times(fn, unit, pairs)
    other = load.stop()
    return {"ratio": ratios[len(ratios) // 2], "ratio_lo": ratios[len(ratios) // 4],
            "ratio_hi": ratios[(3 * len(ratios)) // 4], "unit_s": units[len(units) // 2],
            "other_load": other if other is not None else float("nan")}


def rel_err(a: Tree, b: Tree) -> float:
    """``‖a − b‖ / ‖b‖`` over all keys (float64)."""
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    den = sum(float(b[k].double().square().sum()) for k in b)
    return math.sqrt(num / max(den, 1e-300))


def peak_memory_mb(experiment: str, config: str, size: Any, timeout: float = 600.0) -> float:
    """Peak RSS growth (MB) of one call of ``MEM_RUNNERS[experiment](config, size)`` in a fresh process."""
    out = run_in_fresh_process([str(Path(__file__).resolve()), "--mem", experiment, config, json.dumps(size)],
                               env={"OMP_NUM_THREADS": "1"}, timeout=timeout)
    return float(out["peak_mb"])


def _mem_main(experiment: str, config: str, size: Any) -> None:
    torch.set_num_threads(1)
    run = MEM_RUNNERS[experiment](config, size)
    run()  # warm-up: allocator, lazy initialisation
    _, peak_mb, _ = peak_rss_growth(run)
    print(json.dumps({"peak_mb": peak_mb}))


def machine() -> Dict[str, Any]:
    return _bench_conftest().machine_info()


# =============================================================================================
# 1. Hypergradient accuracy vs cost (problems with exact answers)
# =============================================================================================
class Quadratic:
    """A bilevel problem with a dense float64 reference: ``w*`` solved exactly, ``dL_V/dλ`` by a dense solve."""

    name: str
    params0: Tree
    hparams: Tree

    def inner(self, p: Tree, h: Tree) -> Tensor:
        raise NotImplementedError

    def outer(self, p: Tree, h: Tree) -> Tensor:
        raise NotImplementedError

    def solve_inner(self) -> Tree:
        raise NotImplementedError


class PerFeatureRidge(Quadratic):
    """``½ mean (Xw − y)² + ½ Σ_j e^{λ_j} w_j²``; validation MSE. Closed-form ``w*``."""

    name = "ridge (per-feature L2)"

    def __init__(self, n: int = 200, d: int = 50, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        # correlated features (condition number ~1e3) so that solvers need many products
        scales = torch.logspace(0, -1.5, d, dtype=torch.float64)
        self.X = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
        self.Xv = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
        w = torch.randn(d, generator=g, dtype=torch.float64)
        self.y = self.X @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        self.yv = self.Xv @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
        self.hparams = {"log_l2": torch.linspace(-7, -3, d, dtype=torch.float64)}
        self.params0 = {"w": torch.zeros(d, dtype=torch.float64)}

    def inner(self, p: Tree, h: Tree) -> Tensor:
        return 0.5 * (self.X @ p["w"] - self.y).square().mean() + 0.5 * (h["log_l2"].exp() * p["w"].square()).sum()

    def outer(self, p: Tree, h: Tree) -> Tensor:
        return 0.5 * (self.Xv @ p["w"] - self.yv).square().mean()

    def solve_inner(self) -> Tree:
        n = self.X.shape[0]
        A = self.X.T @ self.X / n + torch.diag(self.hparams["log_l2"].exp())
        return {"w": torch.linalg.solve(A, self.X.T @ self.y / n)}


class PerFeatureLogistic(Quadratic):
    """Mean BCE + ``½ Σ e^{λ_j} w_j²``; validation BCE. ``w*`` by Newton's method to ‖∇‖ < 1e-13."""

    name = "logistic (per-feature L2)"

    def __init__(self, n: int = 500, d: int = 50, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        scales = torch.logspace(0, -1, d, dtype=torch.float64)
        self.X = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
        self.Xv = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
        w = torch.randn(d, generator=g, dtype=torch.float64) * 2
        self.y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(self.X @ w)).double()
        self.yv = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(self.Xv @ w)).double()
        self.hparams = {"log_l2": torch.linspace(-7, -3, d, dtype=torch.float64)}
        self.params0 = {"w": torch.zeros(d, dtype=torch.float64)}

    def inner(self, p: Tree, h: Tree) -> Tensor:
        return (F.binary_cross_entropy_with_logits(self.X @ p["w"], self.y)
                + 0.5 * (h["log_l2"].exp() * p["w"].square()).sum())

    def outer(self, p: Tree, h: Tree) -> Tensor:
        return F.binary_cross_entropy_with_logits(self.Xv @ p["w"], self.yv)

    def solve_inner(self) -> Tree:
        w = torch.zeros(self.X.shape[1], dtype=torch.float64)
        lam = self.hparams["log_l2"].exp()
        n = self.X.shape[0]
        for _ in range(100):
            s = torch.sigmoid(self.X @ w)
            grad = self.X.T @ (s - self.y) / n + lam * w
            if float(grad.norm()) < 1e-13:
                break
            H = self.X.T @ (self.X * (s * (1 - s))[:, None]) / n + torch.diag(lam)
            w = w - torch.linalg.solve(H, grad)
        return {"w": w}


class KernelRidge(Quadratic):
    """Kernel ridge in the dual: ``½ αᵀ(K + e^λ I)α − αᵀy`` with an RBF kernel of bandwidth ``e^γ``.

    Hyperparameters: log ridge ``λ`` and log bandwidth ``γ`` (``K`` depends on it, so the
    mixed term is not diagonal). Validation MSE of ``K_val,train α``.
    """

    name = "kernel ridge (RBF)"

    def __init__(self, n: int = 200, d: int = 5, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.X = torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1
        self.Xv = torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1
        f = lambda Z: torch.sin(3 * Z[:, 0]) + Z[:, 1] ** 2 - Z[:, 2] * Z[:, 3]  # noqa: E731
        self.y = f(self.X) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        self.yv = f(self.Xv) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        self.hparams = {"log_ridge": torch.tensor(math.log(1e-2), dtype=torch.float64),
                        "log_bandwidth": torch.tensor(0.0, dtype=torch.float64)}
        self.params0 = {"alpha": torch.zeros(n, dtype=torch.float64)}

    def _k(self, A: Tensor, B: Tensor, h: Tree) -> Tensor:
        return torch.exp(-torch.cdist(A, B).square() / (2 * h["log_bandwidth"].exp() ** 2))

    def inner(self, p: Tree, h: Tree) -> Tensor:
        a = p["alpha"]
        K = self._k(self.X, self.X, h)
        return 0.5 * a @ (K @ a) + 0.5 * h["log_ridge"].exp() * a.square().sum() - a @ self.y

    def outer(self, p: Tree, h: Tree) -> Tensor:
        return 0.5 * (self._k(self.Xv, self.X, h) @ p["alpha"] - self.yv).square().mean()

    def solve_inner(self) -> Tree:
        K = self._k(self.X, self.X, self.hparams)
        return {"alpha": torch.linalg.solve(K + self.hparams["log_ridge"].exp() * torch.eye(len(self.y),
                                                                                           dtype=torch.float64), self.y)}


ACCURACY_KS = (1, 2, 3, 5, 7, 10, 15, 20, 30, 50)


def _dense_hessian_eigs(prob: Quadratic, w: Tree) -> Tensor:
    (k, v), = w.items()
    f = lambda x: prob.inner({k: x}, prob.hparams)  # noqa: E731
    H = torch.autograd.functional.hessian(f, v)
    return torch.linalg.eigvalsh(H)


def accuracy_curves(prob: Quadratic, ks: Sequence[int] = ACCURACY_KS, truncate_T: int = 400) -> Dict[str, Any]:
    """Relative error of the hypergradient vs Hessian-vector products, per method, on ``prob``."""
    w_star = prob.solve_inner()
    kw = dict(inner_args=(), outer_args=())
    exact = bl.implicit_hypergrad(prob.inner, prob.outer, w_star, prob.hparams, solver=bl.Exact(), **kw)
    eigs = _dense_hessian_eigs(prob, w_star)
    lr = 1.0 / float(eigs.max())
    rows: List[Dict[str, Any]] = []

    def add(method: str, k: int, hvps: int, hg: Optional[Tree], note: str = "") -> None:
        rows.append({"method": method, "k": k, "hvps": hvps,
                     "rel_err": rel_err(hg, exact) if hg is not None else float("nan"), "note": note})

    hg = bl.implicit_hypergrad(prob.inner, prob.outer, w_star, prob.hparams, solver=bl.Identity(), **kw)
    add("Identity", 0, 0, hg)
    for k in ks:
        for name, solver in (("CG", bl.CG(maxiter=k, tol=0.0)), ("Neumann (auto α)", bl.Neumann(steps=k)),
                             ("Nyström", bl.Nystrom(rank=k)), ("Nyström (ρ = 1e-3)", bl.Nystrom(rank=k, rho=1e-3))):
            if name.startswith("Nyström") and k > w_star[next(iter(w_star))].numel():
                continue
            try:
                hg = bl.implicit_hypergrad(prob.inner, prob.outer, w_star, prob.hparams, solver=solver, **kw)
                add(name, k, hg.info.solver.matvecs, hg)
            except bl.DivergenceError as err:
                add(name, k, k, None, note=f"DivergenceError: {str(err)[:60]}")
        # unrolled gradient descent with step 1/λ_max(H(w*)) (a differentiated step costs one HVP)
        opt = bl.inner.SGD(lr=lr)
        hg, _ = bl.unrolled_hypergrad(prob.inner, prob.outer, prob.params0, prob.hparams, optimizer=opt, steps=k)
        add("unrolled, full (k steps from w₀=0)", k, k, hg)
        hg, _ = bl.unrolled_hypergrad(prob.inner, prob.outer, prob.params0, prob.hparams, optimizer=opt,
                                      steps=max(truncate_T, k), truncate=k)
        add(f"unrolled, truncated (last k of {max(truncate_T, k)} steps)", k, k, hg)
    return {"problem": prob.name, "n_hparams": sum(v.numel() for v in prob.hparams.values()),
            "n_params": sum(v.numel() for v in w_star.values()),
            "cond": float(eigs.max() / eigs.min()), "lr": lr, "exact_norm": math.sqrt(sum(float(v.square().sum())
                                                                                      for v in exact.values())),
            "rows": rows}


def run_accuracy(smoke: bool = False) -> Dict[str, Any]:
    if smoke:
        probs = [PerFeatureRidge(n=40, d=8), PerFeatureLogistic(n=60, d=8), KernelRidge(n=30)]
        return {"problems": [accuracy_curves(p, ks=(1, 5), truncate_T=20) for p in probs]}
    probs = [PerFeatureRidge(), PerFeatureLogistic(), KernelRidge()]
    return {"problems": [accuracy_curves(p) for p in probs]}


# =============================================================================================
# 2a. IFT vs TorchOpt custom_root (same problem, same CG budget, same process)
# =============================================================================================
class LogisticIFT:
    """Per-feature L2 logistic regression (float32): ``w*`` by L-BFGS, ``d`` hyperparameters."""

    name = "logistic regression"

    def __init__(self, n: int = 4000, d: int = 1000, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, d, generator=g) / math.sqrt(d) * 3
        self.Xv = torch.randn(n, d, generator=g) / math.sqrt(d) * 3
        w = torch.randn(d, generator=g)
        self.y = (torch.rand(n, generator=g) < torch.sigmoid(self.X @ w)).float()
        self.yv = (torch.rand(n, generator=g) < torch.sigmoid(self.Xv @ w)).float()
        self.hparams = {"l2": torch.full((d,), math.log(1e-3))}
        self.penalty = bl.hparams.WeightDecay({"w": "l2"}, per="parameter", kind="exp")
        self.data_loss = bl.losses.Logistic()
        w0 = torch.zeros(d, requires_grad=True)
        opt = torch.optim.LBFGS([w0], max_iter=500, tolerance_grad=1e-7, tolerance_change=0.0,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = self.inner({"w": w0}, self.hparams)
            loss.backward()
            return loss
        opt.step(closure)
        self.params = {"w": w0.detach()}
        self.inner_args, self.outer_args = (self.X, self.y), (self.Xv, self.yv)

    def inner(self, p: Tree, h: Tree, *args: Any) -> Tensor:
        return F.binary_cross_entropy_with_logits(self.X @ p["w"], self.y) + self.penalty(p, h)

    def outer(self, p: Tree, h: Tree, *args: Any) -> Tensor:
        return F.binary_cross_entropy_with_logits(self.Xv @ p["w"], self.yv)

    # the fastest honest configuration of the library: closed-form logistic HVP + penalty=
    def ours(self, solver: Any) -> Tree:
        return bl.implicit_hypergrad(self.data_loss, self.data_loss, self.params, self.hparams, solver=solver,
                                     inner_args=self.inner_args, outer_args=self.outer_args, penalty=self.penalty)

    def ours_plain(self, solver: Any) -> Tree:
        return bl.implicit_hypergrad(self.inner, self.outer, self.params, self.hparams, solver=solver)

    def gradient(self) -> Callable[[], Any]:
        w = self.params["w"].clone().requires_grad_(True)
        return lambda: torch.autograd.grad(self.inner({"w": w}, self.hparams), [w])

    def exact(self) -> Tree:
        p64 = {"w": self.params["w"].double()}
        h64 = {"l2": self.hparams["l2"].double()}
        X, y, Xv, yv = self.X.double(), self.y.double(), self.Xv.double(), self.yv.double()
        inner = lambda p, h: F.binary_cross_entropy_with_logits(X @ p["w"], y) + self.penalty(p, h)  # noqa: E731
        outer = lambda p, h: F.binary_cross_entropy_with_logits(Xv @ p["w"], yv)  # noqa: E731
        hg = bl.implicit_hypergrad(inner, outer, p64, h64, solver=bl.CG(maxiter=2000, tol=1e-13))
        return {k: v.float() for k, v in hg.items()}


class MLPIFT:
    """MLP with one log-decay per weight (as benchmarks/conftest.py, smaller by default), trained by L-BFGS.

    (After conftest.py's 50 Adam steps, CG to a tight tolerance meets negative curvature: the
    reference hypergradient needs a point close to a minimum.)
    """

    name = "MLP"

    def __init__(self, layers: Sequence[int] = (784, 256, 10), batch: int = 256, train_steps: int = 200,
                 seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = make_mlp(tuple(layers))
        teacher = torch.randn(layers[0], layers[-1])
        self.X, self.Xv = torch.randn(batch, layers[0]), torch.randn(batch, layers[0])
        self.y, self.yv = (self.X @ teacher).argmax(1), (self.Xv @ teacher).argmax(1)
        self.hparams = {k: torch.full_like(v, math.log(1e-2)) for k, v in self.model.named_parameters()}
        self.penalty = bl.hparams.WeightDecay({k: k for k in self.hparams}, per="parameter", kind="exp")
        w = {k: v.detach().clone().requires_grad_(True) for k, v in self.model.named_parameters()}
        opt = torch.optim.LBFGS(list(w.values()), max_iter=train_steps, tolerance_grad=1e-9, tolerance_change=0.0,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = self.inner(w, self.hparams)
            loss.backward()
            return loss
        opt.step(closure)
        self.params = {k: v.detach() for k, v in w.items()}
        self.n_params = sum(v.numel() for v in self.params.values())
        self.inner_args, self.outer_args = (self.X, self.y), (self.Xv, self.yv)

    def loss(self, p: Tree, X: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(self.model, p, (X,)), y)

    def data_loss(self, p: Tree, h: Tree, X: Tensor, y: Tensor) -> Tensor:
        return self.loss(p, X, y)

    def inner(self, p: Tree, h: Tree, *args: Any) -> Tensor:
        return self.loss(p, self.X, self.y) + self.penalty(p, h)

    def outer(self, p: Tree, h: Tree, *args: Any) -> Tensor:
        return self.loss(p, self.Xv, self.yv)

    def ours(self, solver: Any) -> Tree:
        return bl.implicit_hypergrad(self.data_loss, self.data_loss, self.params, self.hparams, solver=solver,
                                     inner_args=self.inner_args, outer_args=self.outer_args, penalty=self.penalty)

    def ours_plain(self, solver: Any) -> Tree:
        return bl.implicit_hypergrad(self.inner, self.outer, self.params, self.hparams, solver=solver)

    def gradient(self) -> Callable[[], Any]:
        w = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
        leaves = list(w.values())
        return lambda: torch.autograd.grad(self.loss(w, self.X, self.y), leaves)

    def exact(self) -> Tree:
        return self.ours(bl.CG(maxiter=300, tol=1e-7, on_indefinite="raise"))


def torchopt_hypergrad(prob: Any, solve: Any) -> Tree:
    """TorchOpt's ``custom_root`` on the same problem: optimality = ``torch.func.grad`` of the inner loss."""
    import torchopt

    keys = list(prob.params)
    hkeys = list(prob.hparams)

    def inner_t(w: tuple, h: tuple) -> Tensor:
        return prob.inner(dict(zip(keys, w)), dict(zip(hkeys, h)))

    optimality = torch.func.grad(inner_t, argnums=0)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver_fn(w_init: tuple, h: tuple) -> tuple:
        return tuple(prob.params[k] for k in keys)  # w* computed beforehand, as for ours

    h = tuple(prob.hparams[k].clone().requires_grad_(True) for k in hkeys)
    w = solver_fn(tuple(prob.params[k] for k in keys), h)
    grads = torch.autograd.grad(prob.outer(dict(zip(keys, w)), dict(zip(hkeys, h))), h)
    return dict(zip(hkeys, grads))


def ift_anchor(prob: Any, pairs: int = 9, k: int = 10, default_full: bool = True) -> Dict[str, Any]:
    """Time of our IFT-CG-k vs TorchOpt custom_root (CG-k, normal-CG-k, default normal CG), paired."""
    import torchopt.linear_solve as ls

    exact = prob.exact()
    ours = lambda: prob.ours(bl.CG(maxiter=k, tol=0.0))  # noqa: E731
    ours_plain = lambda: prob.ours_plain(bl.CG(maxiter=k, tol=0.0))  # noqa: E731
    cfgs: Dict[str, Callable[[], Any]] = {
        f"TorchOpt custom_root, solve_cg(maxiter={k})":
            lambda: torchopt_hypergrad(prob, ls.solve_cg(maxiter=k, rtol=0.0, atol=0.0)),
        f"TorchOpt custom_root, default solve_normal_cg, maxiter={k}":
            lambda: torchopt_hypergrad(prob, ls.solve_normal_cg(maxiter=k, rtol=0.0, atol=0.0)),
    }
    if default_full:
        cfgs["TorchOpt custom_root, default solve_normal_cg() (rtol 1e-5, maxiter 10·P)"] = \
            lambda: torchopt_hypergrad(prob, ls.solve_normal_cg())
    grad = prob.gradient()
    out_ours = ours()
    rows = [{"name": f"bilevel IFT, CG({k}), fastest config", "rel_err": rel_err(out_ours, exact),
             **paired(ours, grad, pairs)}]
    rows.append({"name": f"bilevel IFT, CG({k}), penalty inside the loss (autograd HVP)",
                 "rel_err": rel_err(ours_plain(), exact), **paired(ours_plain, grad, pairs)})
    for name, fn in cfgs.items():
        hg = fn()
        r = {"name": name, "rel_err": rel_err(hg, exact), "rel_diff_to_ours": rel_err(hg, out_ours)}
        r.update(paired(fn, grad, pairs))
        # the speed-up of ours, paired directly against this anchor (anchor = unit)
        r["ours_speedup_paired"] = 1.0 / paired(ours, fn, pairs)["ratio"]
        r["plain_speedup_paired"] = 1.0 / paired(ours_plain, fn, pairs)["ratio"]
        rows.append(r)
    n_p = sum(v.numel() for v in prob.params.values())
    n_h = sum(v.numel() for v in prob.hparams.values())
    return {"problem": prob.name, "n_params": n_p, "n_hparams": n_h, "k": k, "rows": rows}


def run_ift_anchor(smoke: bool = False) -> Dict[str, Any]:
    if smoke:
        return {"problems": [ift_anchor(LogisticIFT(n=100, d=20), pairs=2, k=3),
                             ift_anchor(MLPIFT(layers=(20, 16, 3), batch=32), pairs=2, k=3,
                                        default_full=False)]}
    return {"problems": [ift_anchor(LogisticIFT()), ift_anchor(MLPIFT(), default_full=False)]}


# =============================================================================================
# 2b. Unrolled T = 10/50/200 vs higher and TorchOpt MetaSGD/MetaAdam; IFT memory at equal accuracy
# =============================================================================================
UNROLL_T = (10, 50, 200)
UNROLL_CONFIGS = ("higher SGD", "TorchOpt MetaSGD", "bilevel reverse SGD", "bilevel checkpoint SGD",
                  "higher Adam", "TorchOpt MetaAdam", "bilevel reverse Adam")


class UnrollProblem:
    """bench_unroll.py's problem: MLP 100-256-10 (28,426 weights), batch 64, one log-decay per tensor.

    Unlike bench_unroll.py the unroll starts at ``w*`` (L-BFGS to ‖∇‖ ≈ 1e-6), as a warm-started
    hyperparameter step does, so that every method estimates the same quantity, the IFT
    hypergradient at ``w*`` (reference: CG to 1e-10 in float64).
    """

    def __init__(self, hidden: int = 256, d_in: int = 100, batch: int = 64, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 10))
        self.X, self.Xv = torch.randn(batch, d_in), torch.randn(batch, d_in)
        teacher = torch.randn(d_in, 10)
        self.y, self.yv = (self.X @ teacher).argmax(1), (self.Xv @ teacher).argmax(1)
        self.hp = {k: torch.full((), -4.0) for k, _ in self.net.named_parameters()}
        self.penalty = bl.hparams.WeightDecay({k: k for k in self.hp}, per="tensor", kind="exp")
        # w* in float64 (a float32 L-BFGS stops where float64 CG still sees slightly negative curvature)
        net64 = copy.deepcopy(self.net).double()
        X64, h64 = self.X.double(), {k: v.double() for k, v in self.hp.items()}
        # cached across processes: the peak-memory subprocesses need the same point, not 30 s of L-BFGS each
        import tempfile
        cache = Path(tempfile.gettempdir()) / f"bilevel_baselines_unroll_{d_in}_{hidden}_{batch}_{seed}.pt"
        if cache.exists():
            self.params64 = torch.load(cache)
        else:
            w = {k: v.detach().clone().requires_grad_(True) for k, v in net64.named_parameters()}
            opt = torch.optim.LBFGS(list(w.values()), max_iter=3000, tolerance_grad=1e-11, tolerance_change=0.0,
                                    history_size=20, line_search_fn="strong_wolfe")

            def closure() -> Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(functional_call(net64, w, (X64,)), self.y) + self.penalty(w, h64)
                loss.backward()
                return loss
            opt.step(closure)
            self.params64 = {k: v.detach() for k, v in w.items()}
            torch.save(self.params64, cache)
        self.params = {k: v.float() for k, v in self.params64.items()}
        # Adam runs start at the random initialisation: at w* (∇ ≈ 0) Adam's step g/(√v + ε) has a
        # derivative of order 1/ε and the unrolled hypergradient is dominated by rounding
        # (measured: higher and bilevel disagree by 1e4× there; TorchOpt MetaAdam returns NaN)
        self.init = {k: v.detach().clone() for k, v in self.net.named_parameters()}
        self.net_adam = copy.deepcopy(self.net)
        with torch.no_grad():
            for (k, p) in self.net.named_parameters():
                p.copy_(self.params[k])

    def ce(self, p: Tree, X: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(self.net, p, (X,)), y)

    def data(self, p: Tree, h: Tree) -> Tensor:
        return self.ce(p, self.X, self.y)

    def inner(self, p: Tree, h: Tree) -> Tensor:
        return self.ce(p, self.X, self.y) + self.penalty(p, h)

    def outer(self, p: Tree, h: Tree) -> Tensor:
        return self.ce(p, self.Xv, self.yv)

    def reference(self) -> Tree:
        net64 = copy.deepcopy(self.net).double()
        p64 = self.params64
        h64 = {k: v.double() for k, v in self.hp.items()}
        X, Xv = self.X.double(), self.Xv.double()
        inner = lambda p, h: F.cross_entropy(functional_call(net64, p, (X,)), self.y) + self.penalty(p, h)  # noqa
        outer = lambda p, h: F.cross_entropy(functional_call(net64, p, (Xv,)), self.yv)  # noqa: E731
        hg = bl.implicit_hypergrad(inner, outer, p64, h64, solver=bl.CG(maxiter=3000, tol=1e-10))
        return {k: v.float() for k, v in hg.items()}

    def runner(self, config: str, T: int) -> Callable[[], Any]:
        """One hypergradient (a tuple/dict of the 4 decays' gradients) by ``config``."""
        X, y, Xv, yv, hp = self.X, self.y, self.Xv, self.yv, self.hp
        keys = list(hp)
        sgd = dict(lr=0.05, momentum=0.9)
        adam_lr = 1e-3
        if config.startswith("higher"):
            import higher

            def run() -> Any:
                h = {k: v.clone().requires_grad_(True) for k, v in hp.items()}
                net = self.net if "SGD" in config else self.net_adam
                opt = (torch.optim.SGD(net.parameters(), **sgd) if "SGD" in config
                       else torch.optim.Adam(net.parameters(), lr=adam_lr))
                with higher.innerloop_ctx(net, opt, copy_initial_weights=True) as (fm, dopt):
                    for _ in range(T):
                        p = dict(zip(keys, fm.parameters()))
                        dopt.step(F.cross_entropy(fm(X), y) + self.penalty(p, h))
                    return dict(zip(keys, torch.autograd.grad(F.cross_entropy(fm(Xv), yv), list(h.values()))))
            return run
        if config.startswith("TorchOpt"):
            import torchopt

            def run() -> Any:
                h = {k: v.clone().requires_grad_(True) for k, v in hp.items()}
                net = copy.deepcopy(self.net if "SGD" in config else self.net_adam)
                opt = (torchopt.MetaSGD(net, **sgd) if "SGD" in config else torchopt.MetaAdam(net, lr=adam_lr))
                for _ in range(T):
                    opt.step(F.cross_entropy(net(X), y) + self.penalty(dict(net.named_parameters()), h))
                return dict(zip(keys, torch.autograd.grad(F.cross_entropy(net(Xv), yv), list(h.values()))))
            return run
        if config.startswith("bilevel IFT"):
            k = int(config.split("CG")[1].strip("() "))
            return lambda: bl.implicit_hypergrad(self.data, self.outer, self.params, hp, penalty=self.penalty,
                                                 solver=bl.CG(maxiter=k, tol=0.0))
        opt = bl.inner.SGD(**sgd) if "SGD" in config else bl.inner.Adam(lr=adam_lr)
        mode = "checkpoint" if "checkpoint" in config else "reverse"
        start = self.params if "SGD" in config else self.init
        return lambda: bl.unrolled_hypergrad(self.inner, self.outer, start, hp, optimizer=opt, steps=T,
                                             mode=mode)[0]


_UNROLL_CACHE: Dict[Any, UnrollProblem] = {}


def _unroll_problem(smoke: bool) -> UnrollProblem:
    key = bool(smoke)
    if key not in _UNROLL_CACHE:
        _UNROLL_CACHE[key] = UnrollProblem(hidden=16, d_in=10, batch=16) if smoke else UnrollProblem()
    return _UNROLL_CACHE[key]


def _mem_unroll(config: str, size: Any) -> Callable[[], Any]:
    T, smoke = size
    return _unroll_problem(smoke).runner(config, T)


def run_unroll_anchor(smoke: bool = False) -> Dict[str, Any]:
    """Time (paired, unit: higher SGD at the same T), peak memory and error vs the IFT reference.

    SGD rows start at ``w*`` and are compared with the exact IFT hypergradient there; Adam rows start
    at the random initialisation and are compared with higher's Adam (implementation agreement).
    """
    prob = _unroll_problem(smoke)
    ref = prob.reference()
    Ts = (3,) if smoke else UNROLL_T
    cgs = (1, 3) if smoke else (1, 2, 3, 5, 10, 20)
    pairs = 2 if smoke else 5
    rows = []
    # smoke: peak memory (a fresh process each) for one configuration only, to keep CI fast
    mem = (lambda cfg: cfg == "bilevel reverse SGD") if smoke else (lambda cfg: True)
    nan = float("nan")
    for T in Ts:
        unit = prob.runner("higher SGD", T)
        ref_adam = prob.runner("higher Adam", T)()
        ref_topt = prob.runner("TorchOpt MetaAdam", T)()
        for cfg in UNROLL_CONFIGS:
            fn = prob.runner(cfg, T)
            hg = fn()
            r = {"config": cfg, "T": T, "start": "w*" if "SGD" in cfg else "random init",
                 "rel_err": rel_err(hg, ref) if "SGD" in cfg else float("nan"),
                 "rel_diff_to_higher": rel_err(hg, ref_adam) if "Adam" in cfg else float("nan"),
                 "rel_diff_to_torchopt": rel_err(hg, ref_topt) if "Adam" in cfg else float("nan"),
                 **paired(fn, unit, pairs)}
            r["peak_mb"] = peak_memory_mb("unroll", cfg, [T, smoke]) if mem(cfg) else nan
            rows.append(r)
    ift = []
    unit = prob.runner("higher SGD", Ts[min(1, len(Ts) - 1)])
    for k in cgs:
        cfg = f"bilevel IFT CG({k})"
        fn = prob.runner(cfg, 0)
        ift.append({"config": cfg, "k": k, "rel_err": rel_err(fn(), ref), **paired(fn, unit, pairs),
                    "peak_mb": nan if smoke else peak_memory_mb("unroll", cfg, [0, smoke])})
    n = sum(v.numel() for v in prob.params.values())
    return {"n_params": n, "n_hparams": len(prob.hp), "rows": rows, "ift": ift,
            "ift_unit_T": Ts[min(1, len(Ts) - 1)]}


MEM_RUNNERS: Dict[str, Callable[[str, Any], Callable[[], Any]]] = {"unroll": _mem_unroll}


# =============================================================================================
# 4. HPO quality: hypergradients vs Optuna TPE and random search, same split, same refit
# =============================================================================================
HPO_TASKS = ("breast_cancer", "digits", "wine")


class HPOTask:
    """Per-feature (and per-class) L2 logistic regression on a bundled scikit-learn dataset (float64).

    ``breast_cancer``: 100 train / 235 val / 234 test, 30 decays (examples/logistic_per_feature_l2.py's
    split). ``digits``: 500 / 500 / 797, multinomial, 64 × 10 = 640 decays. ``wine``: 60 / 59 / 59,
    multinomial, 13 × 3 = 39 decays. Features standardized with
    the train statistics. Every method's hyperparameters are scored the same way: :meth:`fit`
    (L-BFGS from zero, ‖∇‖∞ ≤ 1e-6 or 100 iterations) then validation CE and test accuracy.
    """

    LOG_LO, LOG_HI = math.log(1e-5), math.log(1e2)  # search box of the log-decays (all methods)

    def __init__(self, name: str, seed: int = 0, n_sub: Optional[int] = None) -> None:
        from sklearn.datasets import load_breast_cancer, load_digits, load_wine
        from sklearn.model_selection import train_test_split
        import numpy as np

        self.name = name
        self.seed = seed
        if name == "breast_cancer":
            X, y = load_breast_cancer(return_X_y=True)
            n_tr, n_va = 100, 235
        elif name == "digits":
            X, y = load_digits(return_X_y=True)
            n_tr, n_va = 500, 500
        elif name == "wine":
            X, y = load_wine(return_X_y=True)
            n_tr, n_va = 60, 59
        else:
            raise ValueError(name)
        if n_sub is not None:  # smoke
            X, y = X[:n_sub], y[:n_sub]
            n_tr, n_va = n_sub // 3, n_sub // 3
        X_tr, X_rest, y_tr, y_rest = train_test_split(X, y, train_size=n_tr, stratify=y, random_state=seed)
        X_va, X_te, y_va, y_te = train_test_split(X_rest, y_rest, train_size=n_va, stratify=y_rest,
                                                  random_state=seed + 1)
        mean, std = X_tr.mean(0), X_tr.std(0)
        std = np.where(std > 0, std, 1.0)
        self.Xtr, self.Xva, self.Xte = (torch.tensor((a - mean) / std) for a in (X_tr, X_va, X_te))
        self.classes = int(y.max()) + 1
        self.binary = self.classes == 2
        cast = (lambda a: torch.tensor(a, dtype=torch.float64)) if self.binary else (lambda a: torch.tensor(a))
        self.ytr, self.yva, self.yte = cast(y_tr), cast(y_va), cast(y_te)
        d = self.Xtr.shape[1]
        self.shape = (d,) if self.binary else (self.classes, d)
        self.n_hparams = int(torch.Size(self.shape).numel())

    # the model: logits = X Wᵀ + b (W of shape ``self.shape``), bias not decayed
    def logits(self, p: Tree, X: Tensor) -> Tensor:
        return X @ p["w"] + p["b"] if self.binary else X @ p["w"].T + p["b"]

    def ce(self, p: Tree, X: Tensor, y: Tensor) -> Tensor:
        z = self.logits(p, X)
        return F.binary_cross_entropy_with_logits(z, y) if self.binary else F.cross_entropy(z, y)

    def inner(self, p: Tree, h: Tree, X: Tensor, y: Tensor) -> Tensor:
        return self.ce(p, X, y) + 0.5 * (h["log_l2"].exp() * p["w"].square()).sum()

    def outer(self, p: Tree, h: Tree, X: Tensor, y: Tensor) -> Tensor:
        return self.ce(p, X, y)

    def zeros(self) -> Tree:
        return {"w": torch.zeros(self.shape, dtype=torch.float64),
                "b": torch.zeros(() if self.binary else (self.classes,), dtype=torch.float64)}

    def fit(self, log_l2: Tensor, start: Optional[Tree] = None, tol: float = 1e-6, max_iter: int = 100) -> Tree:
        # NOTE: at most 100 L-BFGS iterations (scikit-learn's LogisticRegression default) to
        # ‖∇‖∞ ≤ 1e-6. Weak random decays make these small problems nearly separable: without the cap
        # a fit runs 1000 iterations (1.5 s instead of ~0.05 s, measured), which would inflate every
        # black-box trial and flatter the hypergradient methods' wall-time ratio.
        h = {"log_l2": log_l2.detach()}
        w = {k: v.detach().clone().requires_grad_(True) for k, v in (start or self.zeros()).items()}
        opt = torch.optim.LBFGS(list(w.values()), max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = self.inner(w, h, self.Xtr, self.ytr)
            loss.backward()
            return loss
        opt.step(closure)
        return {k: v.detach() for k, v in w.items()}

    def score(self, log_l2: Tensor) -> Dict[str, float]:
        p = self.fit(log_l2)
        pred = (self.logits(p, self.Xte) > 0).double() if self.binary else self.logits(p, self.Xte).argmax(1)
        return {"val_ce": float(self.ce(p, self.Xva, self.yva)), "test_ce": float(self.ce(p, self.Xte, self.yte)),
                "test_acc": float((pred == self.yte).double().mean())}


def _hpo_model(task: HPOTask, init: float) -> Tuple[nn.Module, Dict[str, Tensor], Any, Callable[..., Tensor]]:
    """The task's linear model at zero, one log-decay per weight (bias not decayed), its data loss."""
    model = nn.Linear(task.Xtr.shape[1], 1 if task.binary else task.classes).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    hp, penalty = bl.hparams.weight_decay(model, init=init, per="parameter", exclude=("bias",))
    if task.binary:
        loss = lambda m, h, b: F.binary_cross_entropy_with_logits(m(b[0]).squeeze(1), b[1])  # noqa: E731
    else:
        loss = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    return model, hp, penalty, loss


def hpo_hyperoptimizer(task: HPOTask, hyper_steps: int = 150, hyper_every: int = 20, warmup: int = 200,
                       lr_inner: float = 0.1, lr_outer: float = 0.1, init: float = 1e-2) -> Dict[str, Any]:
    """``bl.HyperOptimizer``: SGD (momentum 0.9, full batch) inner steps, a CG-10 implicit hyper step
    every ``hyper_every`` of them (penalty= declared), Adam on the log-decays."""
    t0 = time.perf_counter()
    model, hp, penalty, loss = _hpo_model(task, init)
    hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=penalty,
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=lr_inner, momentum=0.9),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=lr_outer),
                             method=bl.Implicit(solver=bl.CG(maxiter=10)), outer_loader=[(task.Xva, task.yva)],
                             hyper_every=hyper_every, on_error="skip")
    train = (task.Xtr, task.ytr)
    for _ in range(warmup):
        hopt.inner_step(train)
    for _ in range(hyper_steps * hyper_every):
        hopt.step(train)
        with torch.no_grad():  # keep the decays in the same box as the black-box searches
            for v in hp.values():
                v.clamp_(task.LOG_LO, task.LOG_HI)
    (raw,) = hp.values()
    log_l2 = raw.detach().reshape(task.shape)
    res = task.score(log_l2)  # the refit is part of the method's cost, as for a trial
    seconds = time.perf_counter() - t0
    return {"method": f"bilevel HyperOptimizer (SGD inner, IFT CG-10 every {hyper_every} steps)",
            "seconds": seconds, "evaluations": hyper_steps, "skipped": hopt.skipped, **res}


def hpo_hyperoptimizer_lbfgs(task: HPOTask, hyper_steps: int = 20, lr_outer: float = 0.3, cg: int = 10,
                             init: float = 1e-2, warm_start: bool = True, tol: float = 1e-4) -> Dict[str, Any]:
    """``bl.HyperOptimizer`` with ``torch.optim.LBFGS`` as the inner optimizer: each inner step is a
    line-search solve to ‖∇‖∞ ≤ ``tol`` (at most 100 iterations), warm-started from the previous weights
    and, across the hyper step, from L-BFGS's curvature history (only the pair straddling the change of
    hyperparameters is dropped); then a CG implicit hyper step (``hyper_every=1``) and Adam on the
    log-decays. ``warm_start=True``: each CG solve starts from the previous adjoint
    (``bl.Implicit(warm_start=True)``), which keeps a small ``cg`` budget accurate over the run.
    ``tol=1e-6, cg=20, warm_start=False`` is :func:`hpo_implicit_lbfgs`'s 20-step configuration through
    the high-level API."""
    t0 = time.perf_counter()
    model, hp, penalty, loss = _hpo_model(task, init)
    lbfgs = torch.optim.LBFGS(model.parameters(), max_iter=100, tolerance_grad=tol, tolerance_change=0.0,
                              history_size=20, line_search_fn="strong_wolfe")
    hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=penalty, inner_optimizer=lbfgs,
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=lr_outer),
                             method=bl.Implicit(solver=bl.CG(maxiter=cg), warm_start=warm_start),
                             outer_loader=[(task.Xva, task.yva)], hyper_every=1, on_error="skip")
    train = (task.Xtr, task.ytr)
    for _ in range(hyper_steps):
        hopt.step(train)
        with torch.no_grad():  # keep the decays in the same box as the black-box searches
            for v in hp.values():
                v.clamp_(task.LOG_LO, task.LOG_HI)
    (raw,) = hp.values()
    res = task.score(raw.detach().reshape(task.shape))  # the refit is part of the method's cost, as for a trial
    return {"method": f"bilevel HyperOptimizer (L-BFGS inner to ‖∇‖∞ ≤ {tol:.0e}, IFT "
                      f"{'warm-started ' if warm_start else ''}CG-{cg}, {hyper_steps} Adam steps, lr {lr_outer})",
            "seconds": time.perf_counter() - t0, "evaluations": hyper_steps, "skipped": hopt.skipped, **res}


def hpo_implicit_lbfgs(task: HPOTask, outer_steps: int = 60, lr_outer: float = 0.1,
                       init: float = 1e-2) -> Dict[str, Any]:
    """The core API: warm-started L-BFGS inner solves + ``bl.implicit_hypergrad`` (CG-20) + Adam."""
    t0 = time.perf_counter()
    raw = torch.full(task.shape, math.log(init), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=lr_outer)
    p = task.zeros()
    for _ in range(outer_steps):
        p = task.fit(raw.detach(), start=p, tol=1e-6)
        hg = bl.implicit_hypergrad(task.inner, task.outer, p, {"log_l2": raw.detach()}, solver=bl.CG(maxiter=20),
                                   inner_args=(task.Xtr, task.ytr), outer_args=(task.Xva, task.yva))
        opt.zero_grad()
        raw.grad = hg["log_l2"]
        opt.step()
        with torch.no_grad():
            raw.clamp_(task.LOG_LO, task.LOG_HI)
    res = task.score(raw.detach())
    return {"method": f"bilevel implicit_hypergrad + warm-started L-BFGS (CG-20, {outer_steps} Adam steps, lr {lr_outer})",
            "seconds": time.perf_counter() - t0, "evaluations": outer_steps, **res}


def hpo_blackbox(task: HPOTask, sampler: str, trials: int = 100, seed: int = 0) -> Dict[str, Any]:
    """Optuna (TPE or random sampler): each trial refits from zero and returns the validation CE."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    n = task.n_hparams
    smp = optuna.samplers.TPESampler(seed=seed) if sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="minimize", sampler=smp)

    def objective(trial: Any) -> float:
        lam = torch.tensor([trial.suggest_float(f"l{j}", task.LOG_LO, task.LOG_HI) for j in range(n)],
                           dtype=torch.float64).reshape(task.shape)
        p = task.fit(lam)
        return float(task.ce(p, task.Xva, task.yva))

    study.optimize(objective, n_trials=trials)
    seconds = time.perf_counter() - t0
    best = torch.tensor([study.best_params[f"l{j}"] for j in range(n)], dtype=torch.float64).reshape(task.shape)
    res = task.score(best)
    return {"method": f"Optuna {'TPE' if sampler == 'tpe' else 'random search'} ({trials} trials)",
            "seconds": seconds, "evaluations": trials, **res}


#: the tight, cold configuration of :func:`hpo_hyperoptimizer_lbfgs` (the row it is compared with)
HPO_LBFGS_TIGHT: Dict[str, Any] = {"tol": 1e-6, "cg": 20, "warm_start": False}


def _load_avg() -> Optional[float]:
    """The 1-minute load average of the machine (all processes, this one included), None where unknown."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _hpo_methods(smoke: bool) -> List[Tuple[str, Callable[[HPOTask], Dict[str, Any]]]]:
    if smoke:
        return [("sgd", lambda t: hpo_hyperoptimizer(t, hyper_steps=3, hyper_every=5, warmup=10)),
                ("lbfgs", lambda t: hpo_hyperoptimizer_lbfgs(t, hyper_steps=3, cg=2)),
                ("lbfgs_tight", lambda t: hpo_hyperoptimizer_lbfgs(t, hyper_steps=3, **HPO_LBFGS_TIGHT)),
                ("implicit", lambda t: hpo_implicit_lbfgs(t, outer_steps=3)),
                ("tpe", lambda t: hpo_blackbox(t, "tpe", trials=2))]
    return [("sgd", hpo_hyperoptimizer),
            # inner to 1e-4, warm-started L-BFGS (history kept across hyper steps), warm-started CG-10
            ("lbfgs", hpo_hyperoptimizer_lbfgs),
            # the same 20 steps with every solve tight and cold (inner 1e-6, CG-20): the core API's
            # "implicit20" through the high-level API
            ("lbfgs_tight", lambda t: hpo_hyperoptimizer_lbfgs(t, **HPO_LBFGS_TIGHT)),
            ("implicit", hpo_implicit_lbfgs),
            # fewer, larger outer steps: a third of the inner solves (chosen on breast cancer's
            # validation loss, the quantity every method minimizes; test figures untouched)
            ("implicit20", lambda t: hpo_implicit_lbfgs(t, outer_steps=20, lr_outer=0.3)),
            ("tpe", lambda t: hpo_blackbox(t, "tpe", seed=t.seed)),
            ("random", lambda t: hpo_blackbox(t, "random", seed=t.seed))]


def run_hpo(smoke: bool = False, seeds: Sequence[int] = (0, 1, 2)) -> Dict[str, Any]:
    """Every method on every (task, split seed); split seed s also seeds the black-box samplers.

    A warm-up pass runs every method once on a tiny task first, so that one-time costs (lazy
    imports, first autograd and ``functional_call`` passes: about 1 s, measured) are charged to
    no method's wall time.
    """
    methods = _hpo_methods(smoke)
    load_start = _load_avg()
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        methods = [m for m in methods if m[0] not in ("tpe", "random")]
    warm = HPOTask("breast_cancer", seed=0, n_sub=60)
    for key, fn in _hpo_methods(True):
        if any(key == k for k, _ in methods):
            fn(warm)
    out = []
    for name in (("breast_cancer",) if smoke else HPO_TASKS):
        for seed in ((0,) if smoke else seeds):
            task = HPOTask(name, seed=seed, n_sub=90 if smoke else None)
            base = task.score(torch.full(task.shape, math.log(1e-2), dtype=torch.float64))
            rows = [{"method": "baseline: every decay 1e-2 (no search)", "key": "baseline", "seconds": 0.0,
                     "evaluations": 1, **base}]
            for key, fn in methods:
                c0 = time.process_time()      # CPU time of this process: what other load cannot inflate
                row = fn(task)
                rows.append({"key": key, **row, "cpu_seconds": time.process_time() - c0})
            out.append({"task": name, "seed": seed, "n_hparams": task.n_hparams, "load_avg": _load_avg(),
                        "n_train": len(task.ytr), "n_val": len(task.yva), "n_test": len(task.yte), "rows": rows})
    return {"tasks": out, "load_avg_start": load_start}


# =============================================================================================
# 2c/3. Cost of one hypergradient vs model size and vs number of hyperparameters
# =============================================================================================
MODEL_SIZES = {"10k": (784, 12, 10), "100k": (784, 128, 10), "1M": (784, 1024, 256, 10),
               "5M": (784, 2048, 1536, 10)}
GROUPS = (10, 1_000, 100_000, None)  # None: one decay per weight


class GroupedDecay:
    """``½ Σ_i e^{h[g(i)]} w_i²`` with weight ``i`` in group ``g(i) = i mod G``: G hyperparameters.

    Declares ``hessian_diag`` and ``mixed_closed_form`` (scatter-add over groups), so that the
    library applies it elementwise as it does ``bl.hparams.weight_decay``'s penalty.
    """

    def __init__(self, params: Tree, groups: int) -> None:
        self.groups = groups
        self.idx: Tree = {}
        off = 0
        for k, v in params.items():
            self.idx[k] = (torch.arange(off, off + v.numel()) % groups).reshape(v.shape)
            off += v.numel()

    def __call__(self, p: Tree, h: Tree) -> Tensor:
        d = h["log_decay"].exp()
        return 0.5 * sum((d[self.idx[k]] * p[k].square()).sum() for k in self.idx)

    def hessian_diag(self, p: Tree, h: Tree) -> Tree:
        d = h["log_decay"].exp()
        return {k: d[i] for k, i in self.idx.items()}

    def mixed_closed_form(self, p: Tree, h: Tree, u: Tree) -> Tree:
        d = h["log_decay"].exp()
        out = torch.zeros_like(d)
        for k, i in self.idx.items():
            out.index_add_(0, i.reshape(-1), (d[i] * p[k] * u[k]).reshape(-1))
        return {"log_decay": out}


def _cost_problem(layers: Sequence[int], groups: Optional[int], batch: int = 256, train_steps: int = 50) -> Any:
    """conftest.py's recipe: MLP (tanh), batch 256, 50 Adam steps on the decayed loss (decay 1e-2)."""
    torch.manual_seed(0)
    model = make_mlp(tuple(layers))
    teacher = torch.randn(layers[0], layers[-1])
    X, Xv = torch.randn(batch, layers[0]), torch.randn(batch, layers[0])
    y, yv = (X @ teacher).argmax(1), (Xv @ teacher).argmax(1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    P = sum(v.numel() for v in params.values())
    if groups is None or groups >= P:
        hp = {k: torch.full_like(v, math.log(1e-2)) for k, v in params.items()}
        penalty: Any = bl.hparams.WeightDecay({k: k for k in params}, per="parameter", kind="exp")
    else:
        hp = {"log_decay": torch.full((groups,), math.log(1e-2))}
        penalty = GroupedDecay(params, groups)
    loss = lambda p, h, X_, y_: F.cross_entropy(functional_call(model, p, (X_,)), y_)  # noqa: E731
    w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(list(w.values()), lr=3e-3)
    for _ in range(train_steps):
        opt.zero_grad(set_to_none=True)
        (loss(w, hp, X, y) + penalty(w, hp)).backward()
        opt.step()
    params = {k: v.detach() for k, v in w.items()}
    # damping 1.0 only guards CG against the negative curvature that may be left after
    # 50 Adam steps. tol=0: CG runs 10 products unless its residual reaches the rounding floor
    # (8·eps·‖b‖) first, which the well-conditioned small models do; the count is recorded
    solver = bl.CG(maxiter=10, tol=0.0, damping=1.0)
    products: list[int] = []

    def hypergrad() -> Any:
        hg = bl.implicit_hypergrad(loss, loss, params, hp, solver=solver, inner_args=(X, y), outer_args=(Xv, yv),
                                   penalty=penalty)
        k = hg.info.solver.matvecs
        assert k == 10 or (k < 10 and hg.info.solver.converged), hg.info.solver
        products.append(k)
        return hg
    hypergrad.products = products  # type: ignore[attr-defined]
    wl = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    leaves = list(wl.values())
    gradient = lambda: torch.autograd.grad(loss(wl, hp, X, y), leaves)  # noqa: E731
    n_h = sum(v.numel() for v in hp.values())
    return P, n_h, hypergrad, gradient


def _mem_cost(config: str, size: Any) -> Callable[[], Any]:
    layers, groups = size
    P, n_h, hypergrad, gradient = _cost_problem(layers, groups)
    return hypergrad if config == "hypergrad" else gradient


MEM_RUNNERS["cost"] = _mem_cost


def flop_ratio(fn: Callable[[], Any], unit: Callable[[], Any]) -> Dict[str, Any]:
    """Floating-point operations of ``fn`` and ``unit`` counted by ``torch.utils.flop_counter``
    (matmuls and convolutions: the work no implementation can skip), and their ratio.

    The ratio is the floor of the time ratio on any hardware that runs matmuls at one speed: for
    an exact Hessian-vector product of an MLP, Pearlmutter's R-pass needs ``2u₁ + 6u₂ + ...``
    matmul units against the gradient's ``2u₁ + 3u₂ + ...`` (``u_l = 2·batch·|W_l|``; the input
    layer needs no input cotangent), so wide hidden layers make a product cost up to 2 gradients.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for f_ in (fn, unit):
        mode = FlopCounterMode(display=False)
        with mode:
            f_()
        counts.append(mode.get_total_flops())
    return {"flops": counts[0], "flops_unit": counts[1], "flop_ratio": counts[0] / counts[1]}


def run_cost(smoke: bool = False, memory: bool = True) -> Dict[str, Any]:
    """One IFT hypergradient (CG-10, penalty=) in gradients: vs model size, and vs hyperparameter count."""
    sizes = {"tiny": (20, 16, 3)} if smoke else MODEL_SIZES
    pairs = 2 if smoke else 7
    by_size = []
    for name, layers in sizes.items():
        P, n_h, hg, grad = _cost_problem(layers, None, batch=32 if smoke else 256, train_steps=5 if smoke else 50)
        r = {"model": name, "layers": list(layers), "n_params": P, "n_hparams": n_h, **paired(hg, grad, pairs),
             **flop_ratio(hg, grad), "products": max(hg.products)}
        if memory and not smoke:
            r["peak_mb_hypergrad"] = peak_memory_mb("cost", "hypergrad", [list(layers), None])
            r["peak_mb_gradient"] = peak_memory_mb("cost", "gradient", [list(layers), None])
        by_size.append(r)
    by_groups = []
    layers = (20, 16, 3) if smoke else MODEL_SIZES["1M"]
    for G in ((4, None) if smoke else GROUPS):
        P, n_h, hg, grad = _cost_problem(layers, G, batch=32 if smoke else 256, train_steps=5 if smoke else 50)
        r = {"groups": G, "n_params": P, "n_hparams": n_h, **paired(hg, grad, pairs), **flop_ratio(hg, grad),
             "products": max(hg.products)}
        if memory and not smoke:
            r["peak_mb_hypergrad"] = peak_memory_mb("cost", "hypergrad", [list(layers), G])
        by_groups.append(r)
    return {"by_size": by_size, "by_groups": by_groups}


# =============================================================================================
# 5. Reproduction: hypertorch's logistic-regression notebook setting
# =============================================================================================
def run_hypertorch_repro(smoke: bool = False, outer_steps: int = 300) -> Dict[str, Any]:
    """hypertorch examples/logistic_regression.ipynb's data and inner problem, with our truncated unroll.

    Data (as the notebook): seed 1, n = 1000, d = 20, ``w_oracle ~ N(0, I)``,
    ``y = 1[x·w_oracle + 0.1 ε > 0]``, half for validation (sklearn split), float32. Inner:
    ``BCE + ½ wᵀ diag(λ) w`` (λ raw, starting at 1), T = 100 GD steps of lr 0.1 from zero;
    hypergradient through the last K = 10 (``bl.unrolled_hypergrad(truncate=10)``). The outer
    optimizer is ours (Adam, lr 0.05, λ clamped ≥ 0): the notebook's cell with it was not readable
    offline.
    """
    import numpy as np
    from sklearn.model_selection import train_test_split

    n, d = 1000, 20
    np.random.seed(1)
    w_oracle = np.random.randn(d)
    x = np.random.randn(n, d)
    y = ((x @ w_oracle + 0.1 * np.random.randn(n)) > 0).astype(float)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.5)
    xtr, xva, ytr, yva = (torch.from_numpy(a).float() for a in (xtr, xva, ytr, yva))
    inner = lambda p, h: (F.binary_cross_entropy_with_logits(xtr @ p["w"], ytr)  # noqa: E731
                          + 0.5 * (h["l2"] * p["w"].square()).sum())
    outer = lambda p, h: F.binary_cross_entropy_with_logits(xva @ p["w"], yva)  # noqa: E731
    lam = torch.ones(d, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=0.05)
    steps = 5 if smoke else outer_steps
    T, K = (20, 5) if smoke else (100, 10)
    curve = []
    t0 = time.perf_counter()
    for _ in range(steps):
        hg, _w = bl.unrolled_hypergrad(inner, outer, {"w": torch.zeros(d)}, {"l2": lam.detach()},
                                       optimizer=bl.inner.SGD(lr=0.1), steps=T, truncate=K)
        curve.append(hg.info.outer_loss if hasattr(hg.info, "outer_loss") else float(outer(_w, {})))
        opt.zero_grad()
        lam.grad = hg["l2"]
        opt.step()
        with torch.no_grad():
            lam.clamp_(min=0.0)
    seconds = time.perf_counter() - t0
    return {"val_bce_first": curve[0], "val_bce_final": curve[-1], "val_bce_min": min(curve),
            "outer_steps": steps, "T": T, "K": K, "seconds": seconds,
            "curve": curve[:: max(1, len(curve) // 50)], "their_val_bce": 0.28}


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--mem":
        _mem_main(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    else:
        print("usage: python benchmarks/baselines.py --mem EXPERIMENT CONFIG SIZE_JSON "
              "(the experiments run from benchmarks/make_results.py)")
