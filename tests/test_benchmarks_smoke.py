"""Smoke runs of issue 7's benchmarks (benchmarks/issue7.py, make_results.py): tiny sizes, a few seconds.

The benchmarks themselves (``python -m pytest benchmarks``, ``python benchmarks/make_results.py``)
are not part of the default test run; these tests run every experiment with ``smoke=True`` so that
none of them can rot, check what a tiny run still means (against the independent references the
experiments compute), and check that the generated Markdown blocks match the committed JSON.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
# TorchOpt 0.7.3 calls the deprecated functorch.vjp (one FutureWarning per call)
pytestmark = pytest.mark.filterwarnings("ignore:.*functorch.vjp.*:FutureWarning")


def _load(name: str):
    key = f"bilevel_bench_{name}"
    if key not in sys.modules:
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        spec = importlib.util.spec_from_file_location(name if name == "issue7" else key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def issue7():
    return _load("issue7")


def test_accuracy_smoke(issue7):
    res = issue7.run_accuracy(smoke=True)
    assert len(res["problems"]) == 3
    for p in res["problems"]:
        cg = {r["k"]: r["rel_err"] for r in p["rows"] if r["method"] == "CG"}
        assert cg[5] < cg[1]                                     # more CG iterations, smaller error
        assert {r["method"] for r in p["rows"]} >= {"Identity", "CG", "Neumann (auto α)", "Nyström"}
        assert all(r["hvps"] >= 0 for r in p["rows"])
    ridge = res["problems"][0]
    full_cg = [r for r in ridge["rows"] if r["method"] == "CG" and r["k"] == 5][0]
    assert full_cg["rel_err"] < 0.5


def test_ift_anchor_smoke(issue7):
    pytest.importorskip("torchopt")
    res = issue7.run_ift_anchor(smoke=True)
    for p in res["problems"]:
        rows = {r["name"].split(",")[0] + r["name"].split(",")[1]: r for r in p["rows"]}
        topt = [r for r in p["rows"] if "solve_cg" in r["name"]][0]
        assert topt["rel_diff_to_ours"] < 1e-4                  # same algorithm, same answer
        assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in p["rows"])
        assert rows


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory needs Linux /proc")
def test_unroll_anchor_smoke(issue7):
    pytest.importorskip("higher")
    pytest.importorskip("torchopt")
    res = issue7.run_unroll_anchor(smoke=True)
    sgd = {r["config"]: r for r in res["rows"] if "SGD" in r["config"]}
    # higher, TorchOpt and bilevel differentiate the same SGD steps: the same error vs the IFT reference
    errs = [sgd[c]["rel_err"] for c in ("higher SGD", "TorchOpt MetaSGD", "bilevel reverse SGD",
                                        "bilevel checkpoint SGD")]
    assert max(errs) - min(errs) < 1e-3 * max(1.0, max(errs))
    adam = [r for r in res["rows"] if r["config"] == "bilevel reverse Adam"][0]
    assert adam["rel_diff_to_torchopt"] < 1e-3
    assert sgd["bilevel reverse SGD"]["peak_mb"] > 0            # the fresh-process memory path works
    assert all(math.isfinite(r["rel_err"]) for r in res["ift"])


def test_cost_smoke(issue7):
    res = issue7.run_cost(smoke=True)
    assert [r["n_hparams"] for r in res["by_groups"]] == [4, res["by_groups"][1]["n_params"]]
    assert all(r["ratio"] > 1 for r in res["by_size"] + res["by_groups"])


def test_grouped_decay_closed_forms(issue7):
    """GroupedDecay's declared Hessian diagonal and mixed term against autograd."""
    import bilevel as bl

    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64),
              "b": torch.randn(5, generator=g, dtype=torch.float64)}
    pen = issue7.GroupedDecay(params, 3)
    h = {"log_decay": torch.randn(3, generator=g, dtype=torch.float64)}
    v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in params.items()}
    hv = bl.hvp(lambda p, hh: pen(p, hh), params, v, h)
    diag = pen.hessian_diag(params, h)
    for k in params:
        torch.testing.assert_close(hv[k], diag[k] * v[k])
    mixed = bl.mixed_vjp(lambda p, hh: pen(p, hh), params, h, v)
    torch.testing.assert_close(mixed["log_decay"], pen.mixed_closed_form(params, h, v)["log_decay"])


def test_hpo_smoke(issue7):
    pytest.importorskip("sklearn")
    res = issue7.run_hpo(smoke=True)
    (task,) = res["tasks"]
    rows = {r["method"].split(" (")[0]: r for r in task["rows"]}
    assert all(math.isfinite(r["val_ce"]) and 0 <= r["test_acc"] <= 1 for r in task["rows"])
    hop = [r for r in task["rows"] if "HyperOptimizer" in r["method"]][0]
    assert hop["skipped"] == 0
    assert rows


def test_repro_smoke(issue7):
    pytest.importorskip("sklearn")
    res = issue7.run_hypertorch_repro(smoke=True)
    assert res["val_bce_final"] < res["val_bce_first"]


def test_make_results_smoke(tmp_path):
    """The generator end to end on tiny runs, into a temporary folder (the repository is not touched)."""
    pytest.importorskip("matplotlib")
    mr = _load("make_results")
    data = mr.main(["--smoke", "--out", str(tmp_path), "--only", "accuracy,cost,repro"])
    assert set(data["results"]) == {"accuracy", "cost", "repro"}
    text = (tmp_path / "RESULTS.md").read_text(encoding="utf-8")
    assert text.count(mr.BEGIN) == 1 and text.count(mr.END) == 1
    assert (tmp_path / "plots" / "accuracy_vs_hvps.png").stat().st_size > 1000
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert readme.count(mr.BEGIN) == 1
    mr.main(["--smoke", "--out", str(tmp_path), "--render-only"])   # idempotent: still one block
    assert (tmp_path / "RESULTS.md").read_text(encoding="utf-8").count(mr.BEGIN) == 1


def test_committed_tables_are_generated():
    """README's and RESULTS.md's issue-7 blocks are exactly what make_results renders from the JSON."""
    mr = _load("make_results")
    path = BENCH / "results_issue7.json"
    if not path.exists():
        pytest.skip("benchmarks/results_issue7.json not generated yet")
    data = json.loads(path.read_text(encoding="utf-8"))
    readme = (BENCH.parent / "README.md").read_text(encoding="utf-8")
    results = (BENCH / "RESULTS.md").read_text(encoding="utf-8")
    assert mr.render_readme(data["results"], data["meta"]) in readme
    assert mr.render_results(data["results"], data["meta"]) in results
