"""Smoke run of benchmarks/lorraine.py (Neumann vs CG, Lorraine et al. 2020): tiny sizes, a few seconds.

The exact hypergradient the experiment compares against is itself checked against a central
finite difference of the validation loss (inner problem re-solved tightly), the oracle of the
whole comparison; the library's CG run to convergence must reproduce it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import bilevel as bl

from conftest import import_benchmark

pytest.importorskip("sklearn")

SETTING = "decay 1e-2"      # the setting the oracle checks use
FD_EPS = 1e-3               # central-difference step along a N(0, I) direction in log-decay space
FD_RTOL = 1e-5              # measured: 1e-7 (truncation ~ eps², inner solves to ‖∇‖∞ ≤ 1e-12)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lorraine() -> Any:
    return import_benchmark("lorraine")


@pytest.fixture(scope="module")
def res(lorraine: Any) -> dict:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return lorraine.run_lorraine(smoke=True)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def point(lorraine: Any, res: dict) -> dict:
    """The smoke problem, the setting's log decays, a tight inner solution and ``g*`` from ``res``."""
    prob = lorraine.make_problem(smoke=True)
    h = lorraine.settings(prob)[SETTING]
    theta, info = prob.solve_inner(h, tol=1e-12)
    s = next(s for s in res["settings"] if s["name"] == SETTING)
    g = torch.tensor(s["exact_hypergrad"], dtype=torch.float64).reshape(h.shape)
    return {"prob": prob, "h": h, "theta": theta, "g": g, "info": info}


def test_structure(lorraine: Any, res: dict) -> None:
    json.dumps(res)                                           # JSON-serializable
    assert res["smoke"] is True and res["ks"] == list(lorraine.SMOKE_KS)
    assert res["methods"] == list(lorraine.METHODS)
    assert res["problem"]["n_hparams"] == 640 and res["problem"]["n_params"] == 650
    assert [s["name"] for s in res["settings"]] == list(lorraine.settings(lorraine.make_problem(smoke=True)))
    for s in res["settings"]:
        assert len(s["exact_hypergrad"]) == 640
        assert s["grad_inf"] <= lorraine.GRAD_TOL
        assert 0 < s["lambda_min"] < s["lambda_max"] and math.isclose(s["cond"], s["lambda_max"] / s["lambda_min"])
        # the dropped eigenvalue is the softmax's null direction, and the outer gradient is orthogonal to it
        assert abs(s["lambda_null"]) < 1e-12 * s["lambda_max"] and s["null_overlap"] > 1 - 1e-9
        assert s["b_null"] < 1e-12 and s["solve_residual"] < 1e-10
        assert s["penalty_path_rel_diff"] < 1e-10             # penalty= and the plain inner loss agree
    keys = {(r["setting"], r["method"], r["k"]) for r in res["rows"]}
    assert keys == {(s["name"], m, k) for s in res["settings"] for m in res["methods"] for k in res["ks"]}
    for r in res["rows"]:
        assert -1 - 1e-12 <= r["cosine"] <= 1 + 1e-12 and math.isfinite(r["rel_l2"]) and r["rel_l2"] >= 0
        extra = 20 if r["method"] == "Neumann (auto α)" else 0   # power iterations of the automatic α
        assert r["matvecs"] == r["k"] + extra                    # exactly k products: no early stop
        assert r["solver"] == ("Identity" if (r["method"] == "CG" and r["k"] == 0) else r["method"].split()[0])


def test_cg_improves_with_k(res: dict) -> None:
    kmax = max(res["ks"])
    for s in res["settings"]:
        cg = {r["k"]: r for r in res["rows"] if r["setting"] == s["name"] and r["method"] == "CG"}
        assert cg[kmax]["rel_l2"] < cg[0]["rel_l2"]
        assert cg[kmax]["cosine"] > cg[0]["cosine"]


def test_exact_hypergrad_matches_finite_difference(point: dict) -> None:
    prob, h, theta, g = point["prob"], point["h"], point["theta"], point["g"]
    v = torch.randn(h.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tp, _ = prob.solve_inner(h + FD_EPS * v, theta, tol=1e-12)
    tm, _ = prob.solve_inner(h - FD_EPS * v, theta, tol=1e-12)
    fd = (float(prob.outer_flat(tp)) - float(prob.outer_flat(tm))) / (2 * FD_EPS)
    d = float((g * v).sum())
    assert abs(fd - d) <= FD_RTOL * abs(d), (fd, d)


def test_library_cg_converges_to_exact(point: dict) -> None:
    prob, h, g = point["prob"], point["h"], point["g"]
    hg = bl.implicit_hypergrad(prob.data_loss, prob.outer_loss, prob.unflatten(point["theta"]), {"log_decay": h},
                               solver=bl.CG(maxiter=500, tol=1e-13), penalty=prob.penalty)
    assert float((hg["log_decay"] - g).norm() / g.norm()) < 1e-9


def test_render_and_plot(lorraine: Any, res: dict, tmp_path: Path) -> None:
    md = lorraine.render_lorraine(res)
    assert md.startswith("## ")
    for r in res["rows"]:                                      # every figure of the table comes from res
        if r["k"] in lorraine.TABLE_KS:
            assert f"{r['cosine']:.3f} / {r['rel_l2']:.3g}" in md, r
    pytest.importorskip("matplotlib")
    files = lorraine.plot_lorraine(res, tmp_path / "plots")
    assert files == ["lorraine_neumann_vs_cg.png"]
    assert (tmp_path / "plots" / files[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
