"""Closed-form products and fused solver updates, on this machine's CPU.

Groups (each with its unit measured in the same run):

- ``logistic``: logistic regression, X of 8192 × 1024 float32 (32 MiB). Unit: one
  autograd gradient of the mean BCE loss. Target: the closed-form product inside a
  solve (``logistic_hvp`` with the row curvatures precomputed once per point) costs at
  most 1.0 gradient, against about 2 for autograd.
- ``neumann-update``: one Neumann step's vector work on 1,068,810 float32 numbers.
  Unit: the former out-of-place update (``p = p − αAp; acc = acc + p``); against it the
  fused in-place ``bilevel.kernels.neumann_step`` (torch path on CPU). The flat-buffer vs
  per-tensor comparison at 200 tensors is ``bench_tree.py``.
- ``linear-ce``: ``linear_ce_hvp`` at B = 8192, C = 32768, D = 16 against autograd's
  double backward: time (in-process) and peak memory (fresh process, VmHWM above the
  RSS before the call, in ``extra_info["peak_mb"]``). Target: at most 1/4 of autograd's
  peak memory.

No GPU was lent to this task, so the Triton kernels are not timed here (they are
tested on CPU through the Triton interpreter, which measures nothing about speed).
"""

from __future__ import annotations

import os
import textwrap
from typing import Any, Dict

import pytest
import torch
import torch.nn.functional as F

import bilevel as bl
import bilevel.kernels as K
from _measure import run_in_fresh_process
from conftest import Measure

N_ROWS, N_FEAT = 8192, 1024


@pytest.fixture(scope="module")
def logistic() -> Dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N_ROWS, N_FEAT, generator=g)
    wt = torch.randn(N_FEAT, generator=g) / N_FEAT ** 0.5
    y = (torch.rand(N_ROWS, generator=g) < torch.sigmoid(X @ wt)).float()
    w = wt + 0.1 * torch.randn(N_FEAT, generator=g) / N_FEAT ** 0.5
    v = torch.randn(N_FEAT, generator=g)
    return {"X": X, "y": y, "w": w, "v": v}


def _bce(X: torch.Tensor, y: torch.Tensor):
    return lambda p: F.binary_cross_entropy_with_logits(X @ p["w"], y)


def _gradient(logistic: Dict[str, Any]):
    X, y = logistic["X"], logistic["y"]
    w = logistic["w"].clone().requires_grad_(True)
    return lambda: torch.autograd.grad(F.binary_cross_entropy_with_logits(X @ w, y), w)


def test_logistic_gradient(logistic: Dict[str, Any], measure: Measure) -> None:
    """Unit: ``torch.autograd.grad`` of the mean BCE."""
    measure(_gradient(logistic), group="logistic", name="gradient (unit)", unit=True)


def test_logistic_autograd_hvp(logistic: Dict[str, Any], measure: Measure) -> None:
    f = _bce(logistic["X"], logistic["y"])
    p, v = {"w": logistic["w"]}, {"w": logistic["v"]}
    measure(lambda: bl.hvp(f, p, v, mode="reverse"), group="logistic", name="autograd HVP, from scratch",
            paired_with=_gradient(logistic))


def test_logistic_autograd_marginal(logistic: Dict[str, Any], measure: Measure) -> None:
    f = _bce(logistic["X"], logistic["y"])
    op = bl.HessianOperator(lambda p: f(p), {"w": logistic["w"]}, None, mode="reverse")
    v = logistic["v"]
    measure(lambda: op.matvec_flat(v), group="logistic", name="autograd HVP, graph reused (marginal)",
            paired_with=_gradient(logistic))


def test_logistic_closed_form(logistic: Dict[str, Any], measure: Measure) -> None:
    X, w, v = logistic["X"], logistic["w"], logistic["v"]
    measure(lambda: K.logistic_hvp(X, w, v), group="logistic", name="logistic_hvp (computes σ'(Xw))",
            paired_with=_gradient(logistic))


def test_logistic_closed_form_cached(logistic: Dict[str, Any], measure: Measure) -> None:
    X, w, v = logistic["X"], logistic["w"], logistic["v"]
    curv = K.logistic_curvature(X, w)
    measure(lambda: K.logistic_hvp(X, w, v, curvature=curv), group="logistic",
            name="logistic_hvp, curvature cached (marginal)", target_gradients=1.0, paired_with=_gradient(logistic))


def test_logistic_structured_operator(logistic: Dict[str, Any], measure: Measure) -> None:
    """The library path: ``HessianOperator`` on ``bl.losses.Logistic`` (closed mode, flat vectors)."""
    op = bl.HessianOperator(bl.losses.Logistic(), {"w": logistic["w"]}, None, (logistic["X"], logistic["y"]))
    assert op.mode == "closed"
    v = logistic["v"]
    measure(lambda: op.matvec_flat(v), group="logistic", name="HessianOperator(bl.losses.Logistic) (marginal)",
            paired_with=_gradient(logistic))


# -- Neumann step: fused in place vs out of place --------------------------------------------------
N_VEC = 1_068_810


@pytest.fixture(scope="module")
def vectors() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(N_VEC, generator=g) for k in ("p", "ap", "acc")}


def test_neumann_out_of_place(vectors: Dict[str, torch.Tensor], measure: Measure) -> None:
    p, ap, acc = vectors["p"], vectors["ap"], vectors["acc"]
    alpha = 1e-3

    def step():
        q = p - alpha * ap
        return acc + q, torch.linalg.vector_norm(q)
    measure(step, group="neumann-update", name="out of place: p − αAp, acc + p, ‖p‖ (unit)", unit=True)


def test_neumann_fused(vectors: Dict[str, torch.Tensor], measure: Measure) -> None:
    p, ap, acc = (vectors[k].clone() for k in ("p", "ap", "acc"))
    alpha = torch.tensor(1e-9)     # tiny: the repeated in-place updates keep the data in range
    measure(lambda: K.neumann_step(p, ap, acc, alpha), group="neumann-update",
            name="kernels.neumann_step (in place, torch path)")


# -- linear_ce_hvp: memory and time against autograd ------------------------------------------------
CE_SHAPE = (8192, 16, 32768)   # B, D, C

_CE_SCRIPT = textwrap.dedent('''
    import json, sys, time, torch
    import torch.nn.functional as F
    import bilevel as bl
    import bilevel.kernels as K
    torch.manual_seed(0)
    B, D, C = (int(a) for a in sys.argv[2:5])
    X, W, V = torch.randn(B, D), 0.1 * torch.randn(C, D), torch.randn(C, D)
    y = torch.randint(0, C, (B,))
    if sys.argv[1] == "autograd":
        run = lambda: bl.hvp(lambda p: F.cross_entropy(X @ p["W"].T, y), {"W": W}, {"W": V}, mode="reverse")["W"]
    else:
        run = lambda: K.linear_ce_hvp(X, W, V)
    from _measure import peak_rss_growth
    out, peak_mb, seconds = peak_rss_growth(run)
    print(json.dumps({"peak_mb": peak_mb, "seconds": seconds, "norm": float(out.norm())}))
''')


def _ce_memory(kind: str) -> Dict[str, Any]:
    return run_in_fresh_process(["-c", _CE_SCRIPT, kind, *map(str, CE_SHAPE)])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory needs Linux /proc")
@pytest.mark.parametrize("kind", ["autograd", "linear_ce_hvp"])
def test_linear_ce_memory_and_time(kind: str, measure: Measure) -> None:
    mem = _ce_memory(kind)
    B, D, C = CE_SHAPE
    torch.manual_seed(0)
    X, W, V = torch.randn(B, D), 0.1 * torch.randn(C, D), torch.randn(C, D)
    y = torch.randint(0, C, (B,))
    if kind == "autograd":
        fn = lambda: bl.hvp(lambda p: F.cross_entropy(X @ p["W"].T, y), {"W": W}, {"W": V}, mode="reverse")
    else:
        fn = lambda: K.linear_ce_hvp(X, W, V)
    measure(fn, group="linear-ce", name=f"{kind} (B={B}, D={D}, C={C})", unit=(kind == "autograd"),
            peak_mb=round(mem["peak_mb"], 1), norm=mem["norm"])
