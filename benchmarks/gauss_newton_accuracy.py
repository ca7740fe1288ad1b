"""Hypergradient accuracy of Gauss-Newton curvature against the exact damped solve, on a small MLP.

    python benchmarks/gauss_newton_accuracy.py [--smoke]

A tanh MLP (10-16-4 by default, 244 weights), softmax cross-entropy, one log weight decay per
weight tensor as ``penalty=``. Two points: *converged* (L-BFGS until ``‖∇_w L_T‖ < 1e-6``) and
*partly trained* (30 Adam steps from the random initialization). The reference is
``bl.Exact(damping=1e-6)`` on the exact Hessian (``hvp_mode="auto"``). Printed: the cosine and the
relative error of each hypergradient against it, for CG on the exact Hessian and on the GGN with k
products, and ``bl.Exact`` on the GGN (the limit of GGN-CG: what the curvature model costs alone).
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl

DT = torch.float64


def _problem(sizes: tuple[int, ...], n: int, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.Tanh()] if i < len(sizes) - 2 else [])
    net = torch.nn.Sequential(*layers).to(DT)
    teacher = torch.randn(sizes[0], sizes[-1], dtype=DT)
    X, Xv = torch.randn(n, sizes[0], dtype=DT), torch.randn(n, sizes[0], dtype=DT)
    noisy = lambda Z: (Z @ teacher + 1.5 * torch.randn(len(Z), sizes[-1], dtype=DT)).argmax(1)  # noqa: E731
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    hp, pen = bl.hparams.weight_decay(params, init=1e-2, per="tensor")

    def inner(p: Any, h: Any, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return bl.losses.cross_entropy(functional_call(net, p, (X,)), y)

    def outer(p: Any, h: Any, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, p, (X,)), y)

    return dict(params=params, hp=hp, pen=pen, inner=inner, outer=outer, batch=(X, noisy(X)), val=(Xv, noisy(Xv)))


def _train(prob: dict[str, Any], converged: bool, adam_steps: int = 30) -> dict[str, torch.Tensor]:
    w = {k: v.clone().requires_grad_() for k, v in prob["params"].items()}
    loss = lambda: prob["inner"](w, prob["hp"], *prob["batch"]) + prob["pen"](w, prob["hp"])  # noqa: E731
    if converged:
        opt: torch.optim.Optimizer = torch.optim.LBFGS(list(w.values()), max_iter=5000, tolerance_grad=1e-9,
                                                       tolerance_change=0, history_size=50,
                                                       line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = loss()
            value.backward()
            return value

        opt.step(closure)
    else:
        opt = torch.optim.Adam(list(w.values()), lr=1e-2)
        for _ in range(adam_steps):
            opt.zero_grad()
            loss().backward()
            opt.step()
    return {k: v.detach() for k, v in w.items()}


def _flat(hg: Any) -> torch.Tensor:
    return torch.cat([hg[k].reshape(-1) for k in sorted(hg)])


def rows(sizes: tuple[int, ...] = (10, 16, 4), n: int = 120, ks: tuple[int, ...] = (5, 10, 20)) -> list[dict[str, Any]]:
    """One row per (point, curvature, solver): cosine and relative error against the exact damped solve."""
    out = []
    prob = _problem(sizes, n)
    for point, converged in (("converged", True), ("partly trained", False)):
        w = _train(prob, converged)

        def hypergrad(solver: Any, mode: str) -> bl.Hypergrad:
            return bl.implicit_hypergrad(prob["inner"], prob["outer"], w, prob["hp"], solver=solver, hvp_mode=mode,
                                         inner_args=prob["batch"], outer_args=prob["val"], penalty=prob["pen"])

        ref = hypergrad(bl.Exact(damping=1e-6), "auto")
        r = _flat(ref)
        lam_min = _min_eig(prob, w)
        runs: list[tuple[str, str, Callable[[], Any]]] = [("GGN", "Exact", lambda: bl.Exact(damping=1e-6))]
        runs += [(curv, f"CG-{k}", (lambda k=k: bl.CG(maxiter=k, tol=0.0))) for k in ks for curv in ("exact", "GGN")]
        for curv, solver, make in runs:
            row = dict(point=point, grad_norm=float(ref.info.inner_grad_norm), lam_min=lam_min, curvature=curv,
                       solver=solver)
            try:
                g = _flat(hypergrad(make(), "gauss_newton" if curv == "GGN" else "auto"))
                row.update(cosine=float(g @ r / (g.norm() * r.norm())), rel_err=float((g - r).norm() / r.norm()))
            except bl.DivergenceError:
                row.update(cosine=math.nan, rel_err=math.nan, note="DivergenceError (negative curvature)")
            out.append(row)
    return out


def _min_eig(prob: dict[str, Any], w: dict[str, torch.Tensor]) -> float:
    """The smallest eigenvalue of the exact Hessian of the inner loss with its penalty (dense)."""
    op = bl.HessianOperator(prob["inner"], w, prob["hp"], prob["batch"], penalty=prob["pen"])
    eye = torch.eye(op.flat.size, dtype=DT)
    H = torch.stack([op.matvec_flat(e) for e in eye])
    return float(torch.linalg.eigvalsh(0.5 * (H + H.T))[0])


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| point | ‖∇_w L_T‖ | λ_min(H) | curvature | solver | cosine | rel. error |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        cos = r.get("note") or f"{r['cosine']:.6f}"
        err = "—" if r.get("note") else f"{r['rel_err']:.2e}"
        lines.append(f"| {r['point']} | {r['grad_norm']:.1e} | {r['lam_min']:.2e} | {r['curvature']} | {r['solver']} "
                     f"| {cos} | {err} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny MLP and k = 5 only (seconds)")
    args = ap.parse_args()
    table = rows((4, 6, 3), 30, (5,)) if args.smoke else rows()
    print(markdown(table))


if __name__ == "__main__":
    main()
