"""Smoke runs of the comparison benchmarks (benchmarks/baselines.py, make_results.py) and their measuring
helpers (benchmarks/_measure.py): tiny sizes, a few seconds.

The benchmarks themselves (``python -m pytest benchmarks``, ``python benchmarks/make_results.py``)
are not part of the default test run; these tests run every experiment with ``smoke=True`` so that
none of them can rot, check what a tiny run still means (against the independent references the
experiments compute), and check that the generated Markdown blocks match the committed JSON.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import BENCHMARKS as BENCH, import_benchmark

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # TorchOpt 0.7.3 calls the deprecated functorch.vjp (one FutureWarning per call)
              pytest.mark.filterwarnings("ignore:.*functorch.vjp.*:FutureWarning")]


@pytest.fixture(scope="module")
def baselines():
    return import_benchmark("baselines")


def test_accuracy_smoke(baselines):
    res = baselines.run_accuracy(smoke=True)
    assert len(res["problems"]) == 3
    for p in res["problems"]:
        cg = {r["k"]: r["rel_err"] for r in p["rows"] if r["method"] == "CG"}
        assert cg[5] < cg[1]                                     # more CG iterations, smaller error
        assert {r["method"] for r in p["rows"]} >= {"Identity", "CG", "Neumann (auto α)", "Nyström"}
        # each method's cost in Hessian-vector products follows its definition (Neumann: 20 power
        # iterations choose α, then k terms; Nyström: k sampled columns and one residual product)
        cost = {"Identity": lambda k: 0, "CG": lambda k: k, "Neumann (auto α)": lambda k: 20 + k,
                "Nyström": lambda k: k + 1, "Nyström (ρ = 1e-3)": lambda k: k + 1}
        for r in p["rows"]:
            if r["method"] in cost:
                assert r["hvps"] == cost[r["method"]](r["k"]), r
    ridge = res["problems"][0]
    full_cg = [r for r in ridge["rows"] if r["method"] == "CG" and r["k"] == 5][0]
    assert full_cg["rel_err"] < 0.5


def test_ift_anchor_smoke(baselines):
    pytest.importorskip("torchopt")
    res = baselines.run_ift_anchor(smoke=True)
    for p in res["problems"]:
        rows = {r["name"].split(",")[0] + r["name"].split(",")[1]: r for r in p["rows"]}
        topt = [r for r in p["rows"] if "solve_cg" in r["name"]][0]
        assert topt["rel_diff_to_ours"] < 1e-4                  # same algorithm, same answer
        # the reported ratio is the median of the paired ratios, inside their range
        assert all(r["ratio_lo"] <= r["ratio"] <= r["ratio_hi"] for r in p["rows"])
        assert rows


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory needs Linux /proc")
def test_unroll_anchor_smoke(baselines):
    pytest.importorskip("higher")
    pytest.importorskip("torchopt")
    res = baselines.run_unroll_anchor(smoke=True)
    sgd = {r["config"]: r for r in res["rows"] if "SGD" in r["config"]}
    # higher, TorchOpt and bilevel differentiate the same SGD steps: the same error vs the IFT reference
    errs = [sgd[c]["rel_err"] for c in ("higher SGD", "TorchOpt MetaSGD", "bilevel reverse SGD",
                                        "bilevel checkpoint SGD")]
    assert max(errs) - min(errs) < 1e-3 * max(1.0, max(errs))
    adam = [r for r in res["rows"] if r["config"] == "bilevel reverse Adam"][0]
    assert adam["rel_diff_to_torchopt"] < 1e-3
    # the fresh-process memory path works; at this size the growth can round to zero pages (the
    # warm-up run already sized the allocator), so only a finite, non-negative figure is required
    peak = sgd["bilevel reverse SGD"]["peak_mb"]
    assert math.isfinite(peak) and peak >= 0
    assert all(math.isfinite(r["rel_err"]) for r in res["ift"])


def test_cost_smoke(baselines):
    res = baselines.run_cost(smoke=True)
    assert [r["n_hparams"] for r in res["by_groups"]] == [4, res["by_groups"][1]["n_params"]]
    assert all(r["ratio"] > 1 for r in res["by_size"] + res["by_groups"])


def test_grouped_decay_closed_forms(baselines):
    """GroupedDecay's declared Hessian diagonal and mixed term against autograd."""
    import bilevel as bl

    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64),
              "b": torch.randn(5, generator=g, dtype=torch.float64)}
    pen = baselines.GroupedDecay(params, 3)
    h = {"log_decay": torch.randn(3, generator=g, dtype=torch.float64)}
    v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in params.items()}
    hv = bl.hvp(lambda p, hh: pen(p, hh), params, v, h)
    diag = pen.hessian_diag(params, h)
    for k in params:
        torch.testing.assert_close(hv[k], diag[k] * v[k])
    mixed = bl.mixed_vjp(lambda p, hh: pen(p, hh), params, h, v)
    torch.testing.assert_close(mixed["log_decay"], pen.mixed_closed_form(params, h, v)["log_decay"])


def test_hpo_smoke(baselines):
    pytest.importorskip("sklearn")
    res = baselines.run_hpo(smoke=True)
    (task,) = res["tasks"]
    rows = {r["method"].split(" (")[0]: r for r in task["rows"]}
    assert all(math.isfinite(r["val_ce"]) and 0 <= r["test_acc"] <= 1 for r in task["rows"])
    hop = [r for r in task["rows"] if "HyperOptimizer" in r["method"]][0]
    assert hop["skipped"] == 0
    assert rows
    assert {r["key"] for r in task["rows"]} >= {"lbfgs", "lbfgs_tight", "tpe"}
    # every full-size task loads with its documented split and number of decays (no run: that is the benchmark)
    sizes = {"breast_cancer": (100, 235, 234, 30), "digits": (500, 500, 797, 640), "wine": (60, 59, 59, 39)}
    assert set(sizes) == set(baselines.HPO_TASKS)
    for name, (n_tr, n_va, n_te, n_hp) in sizes.items():
        t = baselines.HPOTask(name, seed=1)
        assert (len(t.ytr), len(t.yva), len(t.yte), t.n_hparams) == (n_tr, n_va, n_te, n_hp), name


def test_repro_smoke(baselines):
    pytest.importorskip("sklearn")
    res = baselines.run_hypertorch_repro(smoke=True)
    assert res["val_bce_final"] < res["val_bce_first"]


def test_make_results_smoke(tmp_path):
    """The generator end to end on tiny runs, into a temporary folder (the repository is not touched)."""
    pytest.importorskip("matplotlib")
    mr = import_benchmark("make_results")
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
    """README's and RESULTS.md's generated blocks are exactly what make_results renders from the JSON."""
    mr = import_benchmark("make_results")
    path = BENCH / "results_baselines.json"
    if not path.exists():
        pytest.skip("benchmarks/results_baselines.json not generated yet")
    data = json.loads(path.read_text(encoding="utf-8"))
    readme = (BENCH.parent / "README.md").read_text(encoding="utf-8")
    results = (BENCH / "RESULTS.md").read_text(encoding="utf-8")
    assert mr.render_readme(data["results"], data["meta"]) in readme
    assert mr.render_results(data["results"], data["meta"]) in results


# -- benchmarks/_measure.py: the timing and memory helpers every figure goes through --------------
@pytest.fixture(scope="module")
def measure_mod():
    return import_benchmark("_measure")


def test_measure_doctests(measure_mod):
    import doctest

    res = doctest.testmod(measure_mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


def test_paired_times_on_a_scripted_clock(measure_mod, monkeypatch):
    """Durations known in advance (unit, fn, unit, fn, ...): the ratios and unit times are exact."""
    now = [0.0]
    durations = iter([2.0, 5.0, 4.0, 2.0, 1.0, 3.0])

    def tick():
        now[0] += next(durations)

    monkeypatch.setattr(measure_mod, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])}))
    ratios, units = measure_mod.paired_times(tick, tick, pairs=3)
    assert ratios == [0.5, 2.5, 3.0] and units == [1.0, 2.0, 4.0]
    durations = iter([2.0, 5.0, 4.0, 2.0, 1.0, 3.0])
    assert measure_mod.paired_ratio(tick, tick, pairs=3) == 2.5


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory needs Linux /proc")
def test_peak_rss_growth_sees_a_known_allocation(measure_mod):
    """A 64 MiB bytes object, written and freed inside the call, in a fresh process: the peak is 64 MiB."""
    script = ("import json\nfrom _measure import peak_rss_growth\n"
              "n, mb, s = peak_rss_growth(lambda: len(b'x' * (64 << 20)))\n"
              "_, idle_mb, _ = peak_rss_growth(lambda: None)\n"
              "print(json.dumps({'n': n, 'mb': mb, 'idle_mb': idle_mb, 's': s}))")
    out = measure_mod.run_in_fresh_process(["-c", script])
    assert out["n"] == 64 << 20 and out["s"] > 0
    assert 62.0 <= out["mb"] <= 66.0, out       # 64 MiB ± 2 (measured 63.8: other pages come and go)
    assert out["idle_mb"] < 1.0, out


def test_run_in_fresh_process_reports_a_failing_child(measure_mod):
    with pytest.raises(RuntimeError, match=r"run_in_fresh_process: expected exit status 0 .* got 3"):
        measure_mod.run_in_fresh_process(["-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])


def test_compare_starts_smoke(tmp_path):
    """benchmarks/compare_starts.py at tiny sizes: every (seed, start) row, reached as defined, the committed
    JSON renders."""
    pytest.importorskip("sklearn", reason="the demo's datasets ship with scikit-learn")
    cs = import_benchmark("compare_starts")
    res = cs.main(["--smoke", "--out", str(tmp_path), "--seeds", "0"])
    assert [r["start"] for r in res["rows"]] == [1e-6, 1e-4, 1e-2, 1e-1] and res["runs"] == 4
    for r in res["rows"]:
        assert r["reached"] == (r["test_loss"] <= r["grid_best_test_loss"]) and r["wall_s"] > 0
    assert json.loads((tmp_path / "results_starts.json").read_text())["rows"] == res["rows"]
    committed = cs.HERE / "results_starts.json"
    if committed.exists():
        text = cs.render_table(json.loads(committed.read_text()))
        assert text.count("\n") == 1 + len(json.loads(committed.read_text())["rows"])


# -- benchmarks/long_horizon_stability.py and bench_replay.py: tiny runs of the long-horizon figures --
def test_long_horizon_stability_smoke():
    """Float64, T ≤ 6: the replay metagradient matches central differences (ε = 1e-6) along random
    directions, with and without warm-up and LayerNorm; the finite-step column is reported too."""
    stab = import_benchmark("long_horizon_stability")
    rows = stab.main(["--smoke", "--settings", "plain", "smooth"])
    assert [(r["setting"], r["T"]) for r in rows] == [("plain", 3), ("smooth", 3), ("plain", 6), ("smooth", 6)]
    for r in rows:
        assert r["grad_norm"] > 0 and math.isfinite(r["outer_loss"])
        assert r["cos@1e-06"] > 1 - 1e-9 and r["rel_err@1e-06"] < 1e-5, r
        assert math.isfinite(r["cos@0.01"]) and r["rel_err@0.01"] >= 0


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory needs Linux /proc")
def test_bench_replay_splits_forward_and_reverse_time():
    replay = import_benchmark("bench_replay")
    r = replay.fresh("replay", 8)
    assert r["stored_states_max"] <= 2 * 3 + 1 and r["forward_steps"] <= (1 + 3) * 8
    assert 0 < r["reverse_cpu_s"] <= r["cpu_s"] and 0 < r["reverse_s"] <= r["seconds"], r
    assert r["train_s"] > 0 and r["train_cpu_s"] > 0 and math.isfinite(r["peak_mb"])


def test_paired_breakdown_inner_step_runs():
    """benchmarks/paired_breakdown.py: both ratios are measured (finite, positive) on a few blocks."""
    pb = import_benchmark("paired_breakdown")
    with_check, without = pb.inner_step(blocks=2)
    assert math.isfinite(with_check) and math.isfinite(without) and with_check > 0 and without > 0
    with pytest.raises(SystemExit, match="expected 'ggn' or 'inner-step'"):
        pb.main(["nothing"])


def test_speed_part_smoke():
    """make_results' ``speed`` part on tiny sizes: every ratio finite and positive, the FLOP floors at
    least one product (and ten of them for CG-10), and its rows render with a status."""
    pb, mr = import_benchmark("paired_breakdown"), import_benchmark("make_results")
    r = pb.run_speed(smoke=True)
    assert all(math.isfinite(x) and x > 0 for x in (r["ggn_cg10"], r["ggn_product"]))
    assert r["ggn_product_floor"] >= 1.0 and r["ggn_cg10_floor"] >= 10 * r["ggn_product_floor"]
    assert [s["batch"] for s in r["inner_step"]] == [8, 16] and all(s["ratio"] > 0 for s in r["inner_step"])
    rows = [row for row in mr.headline({"speed": r}) if "Gauss–Newton" in row[0] or "inner_step" in row[0]]
    assert len(rows) == 4 and all(row[3] for row in rows)
