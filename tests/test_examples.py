"""Smoke runs of the scripts in examples/ (each ``main(smoke=True)``, a few seconds).

The examples are imported by path (examples/ is not a package) and their returned figures are
checked where a smoke-sized run still means something. The full-size figures (and their
targets) are printed by running the scripts themselves.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytest.importorskip("sklearn")


def _load(name: str):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bilevel_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # dataclasses/pickling look modules up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_threads():
    # the examples set torch's thread count for themselves; put it back for the other tests
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_millions_of_hyperparameters_smoke():
    out = _load("millions_of_hyperparameters").main(smoke=True, verbose=False)
    assert out["n_hparams"] == out["n_weights"] > 20_000      # one decay per weight
    assert out["skipped"] == 0                                 # the Neumann series did not diverge
    assert out["hvps_per_hyper_step"] == 10
    assert out["hyper_step_s"] > 0 and math.isfinite(out["time_ratio"])
    assert out["val_ce_after"] < out["val_ce_before"]


def test_ten_million_hyperparameters_smoke():
    # tiny sizes (the example's CLI flags); the full-size figures are in benchmarks/RESULTS.md
    out = _load("ten_million_hyperparameters").main(hidden=32, hyper_steps=2, inner_per_hyper=1, warmup=5,
                                                    verbose=False)
    assert out["n_hparams"] == out["n_weights"] == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert out["hvps_per_hyper_step"] == 10 and out["skipped"] == 0
    assert len(out["hyper_step_s"]) == 2 and all(s > 0 for s in out["hyper_step_s"])
    assert all(math.isfinite(v) for v in out["val_ce"])
    assert out["alpha"] > 0 and out["damping"] >= 0


def test_data_reweighting_smoke():
    out = _load("data_reweighting").main(smoke=True, seeds=(0,), verbose=False)
    (run,) = out["runs"]
    assert run["skipped"] == 0 and run["hyper_steps"] > 0
    assert run["auc"] > 0.7                                    # clean examples get more weight...
    assert run["mean_weight_clean"] > run["mean_weight_flipped"]
    assert run["test_acc_reweighted"] >= run["test_acc_uniform"] - 0.01   # ...and it does not hurt


def test_logistic_per_feature_l2_smoke():
    out = _load("logistic_per_feature_l2").main(smoke=True, verbose=False)
    assert out["val_after"] < out["val_before"]               # the outer objective went down
    eps = [h["eps"] for h in out["history"]]
    assert all(b < a for a, b in zip(eps, eps[1:]))           # HOAG: tolerances decrease
    assert all(h["inner_grad_norm"] <= h["inner_tol"] * (1 + 1e-6) for h in out["history"])   # solved to ε_k
    assert all(math.isfinite(v) and v > 0 for v in out["l2"])


def test_learning_rate_smoke():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)            # e.g. float() of a tensor that requires grad
        out = _load("learning_rate").main(smoke=True, verbose=False)
    curve = out["val_curve"]
    assert out["forward_reverse_rel_diff"] < 1e-4              # forward mode == reverse mode
    assert out["val_final"] < 0.8 * curve[0]                   # tuning the lr lowers the validation loss
    assert curve[-1] < curve[0]
    assert out["lr"] > 0.01                                    # from lr = 0.01, too small for 30 steps
    assert 0.0 < out["momentum"] < 1.0


def test_ddp_weight_decay_smoke():
    """2 processes (gloo, spawned): ranks identical and equal to one process on the global batches."""
    import re
    import subprocess

    out = subprocess.run([sys.executable, str(EXAMPLES / "ddp_weight_decay.py"), "--nproc", "2", "--smoke", "--check",
                          "--double"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hyperparameters identical on all 2 ranks: True" in out.stdout
    m = re.search(r"hyperparameters ([0-9.e+-]+), weights ([0-9.e+-]+)", out.stdout)
    assert m and float(m.group(1)) < 1e-10 and float(m.group(2)) < 1e-10, out.stdout
    assert "4 hyper steps (0 skipped)" in out.stdout


def test_closed_form_products_smoke():
    out = _load("closed_form_products").main(smoke=True, verbose=False)
    assert [r["mode"] for r in out["rows"]] == ["closed", "linear_ce_hvp", "penalty="]
    for r in out["rows"]:          # the declared-structure paths give autograd's hypergradient / product
        assert r["rel_diff"] < 1e-5, r
    # speedups are timings: measured and recorded by benchmarks/bench_kernels.py, never asserted here


def test_learned_schedule_smoke():
    out = _load("learned_schedule").main(smoke=True, verbose=False)
    res = out["results"]
    assert set(res) == {"constant", "step", "cosine", "learned"} and out["T"] == 20
    assert len(out["schedule"]) == 4 and all(0.0 <= v <= 1.0 for v in out["schedule"])
    # two metagradient steps from the constant rate: the validation loss they saw went down
    assert out["history"][1] < out["history"][0]
    assert all(math.isfinite(v["test"]) for v in res.values())


def test_data_selection_smoke():
    pytest.importorskip("mnist1d")
    mod = _load("data_selection")
    out = mod.main(smoke=True, verbose=False)          # gradient descent on the validation loss at 4 points
    assert out["rounds"] == 2 and out["T"] == 12 and out["checkpoints"] == 4
    for k in ("all", "small_loss", "oracle", "learned", "precision", "recall", "small_loss_recall"):
        assert 0.0 <= out[k][0] <= 1.0, k
    # each round is one replay metagradient per point (after 3, 6, 9, 12 steps), a replay of s steps
    # running at most s·(1 + ⌈log2 s⌉) steps: at most (9 + 24 + 45 + 60) / 12 = 11.5 training runs per round
    assert 2 * (3 + 6 + 9 + 12) / 12 <= out["training_runs_per_seed"] <= 2 * 11.5
    assert len(out["history"]) == 2 and out["history"][1] < out["history"][0]   # the averaged loss went down
    old = mod.main(smoke=True, verbose=False, outer_opt="adam", checkpoints=1)   # the final loss only, Adam
    assert 2 <= old["training_runs_per_seed"] <= 2 * 5
    with pytest.raises(ValueError, match="checkpoints"):
        mod.main(smoke=True, verbose=False, checkpoints=13)


def test_maml_sinusoid_smoke():
    out = _load("maml_sinusoid").main(smoke=True, verbose=False)
    assert out["batching_rel_err"] < 1e-5          # a batch of tasks as one tree == one call per task
    res = out["results"]
    assert set(res) == {"MAML, 1 step", "MAML, 5 steps", "first-order MAML, 5 steps", "iMAML (CG, λ=1)",
                        "joint training + 5 steps"}
    for r in res.values():
        assert math.isfinite(r["mse"]) and r["ci95"] > 0 and r["mse_before_adaptation"] > 0


@pytest.mark.parametrize("decays,n", [("feature", 65), ("tensor", 2)])
def test_optuna_hybrid_smoke(tmp_path, decays, n):
    pytest.importorskip("optuna")
    out = _load("optuna_hybrid").main(smoke=True, seeds=(0,), out=str(tmp_path / "p.png"), verbose=False,
                                      decays=decays)
    runs = {r["kind"]: r for r in out["runs"]}
    assert set(runs) == {"tpe", "hybrid"}
    for r in runs.values():                    # smoke: two trials each, whatever they cost
        assert r["n_trials"] == 2 and r["curve"][0][0] < r["curve"][1][0] <= out["budget_s"]
        assert r["curve"][1][1] == min(r["curve"][0][1], r["curve"][1][1]) == r["best_val"]   # best so far
        assert math.isfinite(r["best_val"]) and math.isfinite(r["test_of_best"])
        assert len(r["best_decays"]) == n and all(0 < d < 1 for d in r["best_decays"])
        assert {"width", "optimizer", "batch_size"} <= set(r["best_params"])
    assert {f"decay{i}" for i in range(n)} == {k for k in runs["tpe"]["best_params"] if k.startswith("decay")}
    assert sorted(runs["tpe"]["best_decays"]) != sorted(runs["hybrid"]["best_decays"])
    if out["plot"]:
        assert (tmp_path / "p.png").stat().st_size > 5000


def test_optuna_hybrid_feature_decay_is_the_written_penalty():
    pytest.importorskip("optuna")
    ex = _load("optuna_hybrid")
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10))
    pen = ex.FeatureDecay(model, init=1e-3)
    hp = {"decay/input": torch.randn(64), "decay/output": torch.tensor(0.3)}
    W1, W2 = model[0].weight.detach(), model[2].weight.detach()
    want = 0.5 * sum(float(hp["decay/input"][j].exp()) * float(W1[:, j].square().sum()) for j in range(64)) \
        + 0.5 * float(hp["decay/output"].exp()) * float(W2.square().sum())
    assert float(pen(model, hp)) == pytest.approx(want, rel=1e-5)
    assert float(pen(dict(model.named_parameters()), hp)) == pytest.approx(want, rel=1e-5)
