"""Which default solver works on non-convex networks, and what it costs.

Three points of one bilevel problem (one log weight decay per weight, inner loss
``CE_train + ½ Σ e^λ ⊙ w²``, outer loss ``CE_val``, wine from scikit-learn, standardized,
float64):

- ``random``: a tanh MLP 13-H-H-3 at its random initialization (indefinite Hessian);
- ``partial``: the same MLP after full-batch gradient descent until ‖∇L_T‖ ≈ 1e-2;
- ``convex``: softmax regression with per-weight decay, solved to ‖∇L_T‖ ≤ 1e-10 (Newton).

Each candidate default runs at ``points`` consecutive points (``steps_between`` inner
gradient-descent steps apart, as in a run of hyper steps) and carries its state from one
to the next (the warm-started λ_max). Reported per candidate: the cosine of its
hypergradient to the reference at each point (mean and min), the Hessian-vector products
of the first point and of the later points (the mixed product, the same for all, is not
counted), and the wall time of a hypergradient as a paired ratio to one inner gradient.

References (explicit):

- ``ref exact``: ``bl.Exact(damping=1e-6·λ_max)`` on the exact Hessian, i.e. the IFT
  hypergradient with a tiny regularization; on an indefinite Hessian it is still the
  IFT formula at that point (not a minimum), dominated by the eigenvalues nearest zero;
- ``ref |H|``: the same solve on ``|H| = V|Λ|Vᵀ`` (eigendecomposition; negative
  curvature taken as positive): what a method that "stops trusting" negative curvature
  aims at, and on a PD Hessian the same as ``ref exact``;
- ``ref GGN``: ``bl.Exact(damping=1e-6·λ_max)`` on the Gauss–Newton matrix (GGN rows;
  only when ``hvp_mode="gauss_newton"`` exists).

Run (about a minute at the default size)::

    python benchmarks/defaults.py                 # writes benchmarks/results_defaults.{json,md}
    python benchmarks/defaults.py --smoke --out /tmp/d   # tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

import bilevel as bl
from bilevel.operators import make_operator
from bilevel.solvers import power_iteration

HERE = Path(__file__).resolve().parent
Tree = Dict[str, Tensor]
LOG_DECAY = math.log(1e-3)


# -- the problem -----------------------------------------------------------------------------------
@dataclass
class Point:
    """One case: model, inner weights along a short trajectory, hyperparameters and batches."""

    name: str
    model: nn.Module
    trajectory: List[Tree]
    hparams: Tree
    train: tuple
    val: tuple

    def inner(self, p: Tree, h: Tree, batch: tuple) -> Tensor:
        out = functional_call(self.model, p, (batch[0],))
        reg = sum((h[k].exp() * p[k].square()).sum() for k in p)
        return nn.functional.cross_entropy(out, batch[1]) + 0.5 * reg

    def outer(self, p: Tree, h: Tree, batch: tuple) -> Tensor:
        return nn.functional.cross_entropy(functional_call(self.model, p, (batch[0],)), batch[1])

    def grad(self, p: Tree) -> Tree:
        w = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
        g = torch.autograd.grad(self.inner(w, self.hparams, self.train), list(w.values()))
        return dict(zip(w, g))


def _data(smoke: bool) -> tuple[tuple, tuple]:
    from sklearn.datasets import load_wine
    X, y = load_wine(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float64)
    y = torch.tensor(y)
    X = (X - X.mean(0)) / X.std(0)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    if smoke:
        perm = perm[:60]
    n = (2 * len(perm)) // 3
    return (X[perm[:n]], y[perm[:n]]), (X[perm[n:]], y[perm[n:]])


def _mlp(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 3)).double()


def _trajectory(pt: Point, start: Tree, points: int, steps_between: int, lr: float) -> List[Tree]:
    out, w = [], {k: v.detach().clone() for k, v in start.items()}
    for i in range(points):
        if i:
            for _ in range(steps_between):
                g = pt.grad(w)
                w = {k: w[k] - lr * g[k] for k in w}
        out.append(w)
    return out


def _norm(t: Tree) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in t.values())))


def build_cases(hidden: int, points: int, steps_between: int, smoke: bool) -> List[Point]:
    train, val = _data(smoke)
    cases = []
    for name in ("random", "partial"):
        model = _mlp(hidden)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        h = {k: torch.full_like(v, LOG_DECAY) for k, v in params.items()}
        pt = Point(name, model, [], h, train, val)
        if name == "partial":
            # full-batch SGD with momentum until the inner gradient is about 1e-2
            mom = {k: torch.zeros_like(v) for k, v in params.items()}
            for _ in range(50 if smoke else 5000):
                g = pt.grad(params)
                if _norm(g) < 1e-2:
                    break
                mom = {k: 0.9 * mom[k] + g[k] for k in params}
                params = {k: params[k] - 0.1 * mom[k] for k in params}
        pt.trajectory = _trajectory(pt, params, points, steps_between, lr=0.05)
        cases.append(pt)
    lin = nn.Linear(13, 3).double()
    params = {k: v.detach().clone() for k, v in lin.named_parameters()}
    h = {k: torch.full_like(v, math.log(1e-2)) for k, v in params.items()}
    pt = Point("convex", lin, [], h, train, val)
    # Newton on the strictly convex softmax regression: converged to rounding
    flat_keys = list(params)
    for _ in range(50):
        g = pt.grad(params)
        if _norm(g) <= 1e-10:
            break
        op = make_operator(pt.inner, params, h, (train,))
        step = bl.Exact()(op.matvec, g)
        params = {k: params[k] - step[k] for k in flat_keys}
    pt.trajectory = _trajectory(pt, params, points, steps_between, lr=0.05)
    cases.append(pt)
    return cases


# -- candidates ----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    hypergrad: Tree
    matvecs: int
    indefinite: bool
    state: Any


def _hg(pt: Point, p: Tree, solver: Any, mode: str = "auto", solver_state: Any = None) -> bl.Hypergrad:
    return bl.implicit_hypergrad(pt.inner, pt.outer, p, pt.hparams, solver=solver, inner_args=(pt.train,),
                                 outer_args=(pt.val,), hvp_mode=mode, solver_state=solver_state)


def _lambda_max(pt: Point, p: Tree, state: Any, mode: str = "auto") -> tuple[float, Tensor, int]:
    """λ_max of the inner Hessian: 20 power iterations, or 1 from the previous eigenvector."""
    op = make_operator(pt.inner, p, pt.hparams, (pt.train,), mode=mode)
    iters = 20 if state is None else 1
    lam, v = power_iteration(op.matvec_flat, op.flat.zeros(), iters=iters, v0=state, return_vector=True)
    return float(lam), v, iters


def _solver_run(solver: Any, mode: str = "auto") -> Callable[[Point, Tree, Any], Outcome]:
    def run(pt: Point, p: Tree, state: Any) -> Outcome:
        hg = _hg(pt, p, solver, mode)
        info = hg.info.solver
        return Outcome(dict(hg), info.matvecs, bool(info.extra.get("indefinite", False)), None)
    return run


def _warm_neumann(steps: int, refresh: int) -> Callable[[Point, Tree, Any], Outcome]:
    solver = bl.Neumann(steps=steps, refresh_iters=refresh)

    def run(pt: Point, p: Tree, state: Any) -> Outcome:
        hg = _hg(pt, p, solver, solver_state=state)
        info = hg.info.solver
        return Outcome(dict(hg), info.matvecs, bool(info.extra["indefinite"]), {"eigvec": info.extra["eigvec"]})
    return run


def _damped_cg(rel: float, mode: str = "auto") -> Callable[[Point, Tree, Any], Outcome]:
    def run(pt: Point, p: Tree, state: Any) -> Outcome:
        lam, v, iters = _lambda_max(pt, p, state, mode)
        hg = _hg(pt, p, bl.CG(maxiter=10, tol=0.0, damping=rel * lam, on_indefinite="stop"), mode)
        info = hg.info.solver
        return Outcome(dict(hg), info.matvecs + iters, bool(info.extra["indefinite"]), v)
    return run


def candidates(ggn: bool) -> Dict[str, Callable[[Point, Tree, Any], Outcome]]:
    out = {
        "CG-10 exact H, on_indefinite='stop'": _solver_run(bl.CG(maxiter=10, tol=0.0, on_indefinite="stop")),
        "CG-10 exact H, damping 1e-3·λ_max (warm), stop": _damped_cg(1e-3),
        "CG-10 exact H, damping 1e-2·λ_max (warm), stop": _damped_cg(1e-2),
        "Neumann-10, α=1/λ_max (20 power its each step)": _solver_run(bl.Neumann(steps=10)),
        "Neumann-10, α=1/λ_max warm (1 product/step)": _warm_neumann(10, 1),
        "Neumann-10, α=1/λ_max warm (2 products/step)": _warm_neumann(10, 2),
        "Identity": _solver_run(bl.Identity(residual=False)),
    }
    if ggn:
        out["GGN CG-10"] = _solver_run(bl.CG(maxiter=10, tol=0.0), "gauss_newton")
        out["GGN CG-10, on_indefinite='stop'"] = _solver_run(bl.CG(maxiter=10, tol=0.0, on_indefinite="stop"),
                                                             "gauss_newton")
    return out


def _ggn_available(pt: Point) -> bool:
    try:
        make_operator(pt.inner, pt.trajectory[0], pt.hparams, (pt.train,), mode="gauss_newton")
    except (ValueError, TypeError):
        return False
    return True


# -- references ------------------------------------------------------------------------------------------
def _dense(op: Any) -> Tensor:
    P = op.flat.zeros().numel()
    eye = torch.eye(P, dtype=torch.float64)
    return torch.stack([op.matvec_flat(eye[:, j].contiguous()) for j in range(P)], dim=1)


def references(pt: Point, p: Tree, ggn: bool) -> Dict[str, Any]:
    op = make_operator(pt.inner, p, pt.hparams, (pt.train,))
    H = _dense(op)
    H = 0.5 * (H + H.T)
    ev, V = torch.linalg.eigh(H)
    lam_max = float(ev.abs().max())
    damp = 1e-6 * lam_max
    out: Dict[str, Any] = {"lambda_min": float(ev[0]), "lambda_max": float(ev[-1]),
                           "negative_fraction": float((ev < -1e-12 * lam_max).double().mean()),
                           "inner_grad_norm": float(op.grad_norm)}
    out["ref exact"] = dict(_hg(pt, p, bl.Exact(damping=damp)))
    absH = (V * ev.abs()) @ V.T
    out["ref |H|"] = dict(_hg(pt, p, lambda mv, b, A=absH + damp * torch.eye(len(ev), dtype=H.dtype): _tree_solve(A, b, op)))
    if ggn:
        gop = make_operator(pt.inner, p, pt.hparams, (pt.train,), mode="gauss_newton")
        G = _dense(gop)
        out["ref GGN"] = dict(_hg(pt, p, bl.Exact(damping=1e-6 * float(torch.linalg.eigvalsh(0.5 * (G + G.T)).max())),
                                  "gauss_newton"))
    return out


def _tree_solve(A: Tensor, b: Tree, op: Any) -> Tree:
    return op.flat.unflatten(torch.linalg.solve(A, op.flat.flatten(b)))


def cosine(a: Tree, b: Tree) -> float:
    va = torch.cat([a[k].reshape(-1) for k in sorted(a)]).double()
    vb = torch.cat([b[k].reshape(-1) for k in sorted(a)]).double()
    den = float(va.norm() * vb.norm())
    return float(va @ vb) / den if den > 0 else math.nan


def _time_ratio(pt: Point, p: Tree, run: Callable[[Point, Tree, Any], Outcome], state: Any, pairs: int) -> float:
    sys.path.insert(0, str(HERE))
    from _measure import paired_ratio
    return paired_ratio(lambda: run(pt, p, state), lambda: pt.grad(p), pairs)


# -- the experiment ------------------------------------------------------------------------------------
def run(hidden: int = 32, points: int = 5, steps_between: int = 5, smoke: bool = False, pairs: int = 7
        ) -> Dict[str, Any]:
    cases = build_cases(hidden, points, steps_between, smoke)
    ggn = _ggn_available(cases[0])
    result: Dict[str, Any] = {"hidden": hidden, "points": points, "steps_between": steps_between, "ggn": ggn,
                              "torch": torch.__version__, "cases": {}}
    for pt in cases:
        refs = [references(pt, p, ggn) for p in pt.trajectory]
        case: Dict[str, Any] = {
            "params": sum(v.numel() for v in pt.trajectory[0].values()),
            "inner_grad_norm": [r["inner_grad_norm"] for r in refs],
            "lambda_min": [r["lambda_min"] for r in refs], "lambda_max": [r["lambda_max"] for r in refs],
            "negative_fraction": [r["negative_fraction"] for r in refs], "rows": []}
        for name, cand in candidates(ggn).items():
            state: Any = None
            cos: Dict[str, List[float]] = {k: [] for k in ("ref exact", "ref |H|", "ref GGN") if k in refs[0]}
            mv, indef, error = [], [], None
            for p, ref in zip(pt.trajectory, refs):
                try:
                    o = cand(pt, p, state)
                except bl.BilevelError as err:
                    error = f"{type(err).__name__}: {str(err)[:120]}"
                    break
                state = o.state
                mv.append(o.matvecs)
                indef.append(o.indefinite)
                for k in cos:
                    cos[k].append(cosine(o.hypergrad, ref[k]))
            row: Dict[str, Any] = {"candidate": name, "error": error, "matvecs": mv, "indefinite": indef,
                                   "cosine": cos}
            if error is None and pairs:
                row["time_vs_gradient"] = _time_ratio(pt, pt.trajectory[-1], cand, state, pairs)
            case["rows"].append(row)
        result["cases"][pt.name] = case
    return result


def markdown(res: Dict[str, Any]) -> str:
    lines = [f"MLP 13-{res['hidden']}-{res['hidden']}-3 (tanh) and softmax regression on wine, float64; "
             f"{res['points']} points {res['steps_between']} inner GD steps apart; cosines mean (min) over the points.",
             ""]
    for cname, case in res["cases"].items():
        lines.append(f"**{cname}** ({case['params']} weights; ‖∇L_T‖ {case['inner_grad_norm'][0]:.1e}; "
                     f"λ_min {case['lambda_min'][0]:.2e}, λ_max {case['lambda_max'][0]:.2e}, "
                     f"{100 * case['negative_fraction'][0]:.0f} % negative eigenvalues)")
        lines.append("")
        refs = list(case["rows"][0]["cosine"])
        lines.append("| candidate | " + " | ".join(f"cos vs {r}" for r in refs)
                     + " | HVPs first / later | time ÷ gradient | negative curvature reported |")
        lines.append("|---|" + "---|" * (len(refs) + 3))
        for row in case["rows"]:
            if row["error"] is not None:
                lines.append(f"| {row['candidate']} | " + " | ".join("—" for _ in refs)
                             + f" | — | — | raised {row['error'].split(':')[0]} |")
                continue
            cs = " | ".join(f"{sum(v) / len(v):.3f} ({min(v):.3f})" for v in row["cosine"].values())
            later = row["matvecs"][1:] or row["matvecs"]
            t = row.get("time_vs_gradient")
            lines.append(f"| {row['candidate']} | {cs} | {row['matvecs'][0]} / {sum(later) / len(later):.0f} | "
                         f"{'—' if t is None else f'{t:.1f}'} | {sum(row['indefinite'])}/{len(row['indefinite'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--points", type=int, default=5)
    ap.add_argument("--steps-between", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=7, help="paired timings per candidate (0: none)")
    ap.add_argument("--smoke", action="store_true", help="tiny: hidden 4, 2 points, 60 samples, no timing")
    ap.add_argument("--out", default=str(HERE / "results_defaults"), help="writes OUT.json and OUT.md")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small problems: 1 is fastest)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.smoke:
        a.hidden, a.points, a.pairs = 4, 2, 0
    t0 = time.perf_counter()
    res = run(a.hidden, a.points, a.steps_between, a.smoke, a.pairs)
    res["seconds"] = time.perf_counter() - t0
    md = markdown(res)
    Path(a.out + ".json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    Path(a.out + ".md").write_text(md + "\n", encoding="utf-8")
    if not a.smoke:
        print(md)
    return res


if __name__ == "__main__":
    main()
