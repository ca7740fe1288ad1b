"""bilevel.integrations.optuna: hypergradient tuning inside an Optuna trial.

Oracles: the same HyperOptimizer loop run by hand (hyperparameters bit for bit), the validation
loss computed by hand, and Optuna's own records of the trial (reports, user attrs, state)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl

optuna = pytest.importorskip("optuna", reason="the Optuna integration needs optuna: pip install 'bilevel[optuna]'")
from bilevel.integrations import checks  # noqa: E402
from bilevel.integrations.optuna import tune, validation_loss  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

torch.manual_seed(0)
X, Y = torch.randn(96, 4, dtype=torch.float64), torch.randn(96, 1, dtype=torch.float64)
TRAIN = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 64, 16)]
VAL = [(X[64:80], Y[64:80]), (X[80:], Y[80:])]


def mse(m, h, b):
    return F.mse_loss(m(b[0]), b[1])


def make(width: int, unused: bool = False, frozen: bool = False, val=VAL):
    torch.manual_seed(width)
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1)).double()
    hp, pen = bl.hparams.weight_decay(model, init=1e-2, per="tensor", exclude=("bias",))
    if unused:
        hp["unused"] = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)
    hopt = bl.HyperOptimizer(model, hp, inner_loss=mse, outer_loss=mse, penalty=pen, outer_loader=val, hyper_every=2,
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=0.1),
                             method=bl.Implicit(solver=bl.CG(maxiter=4, damping=0.5, on_indefinite="stop")))
    return model, hp, hopt


def test_trial_equals_the_plain_loop_and_stores_tuned_decays():
    tuned = {}

    def objective(trial):
        width = trial.suggest_categorical("width", [3, 5])
        model, hp, hopt = make(width)
        value = tune(trial, hopt, TRAIN, epochs=3)
        tuned[trial.number] = (width, {k: v.detach().clone() for k, v in hp.items()}, value)
        return value

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=2)
    for trial in study.trials:
        width, hp_tuned, value = tuned[trial.number]
        # the plain loop, by hand
        model, hp, hopt = make(width)
        for _ in range(3):
            for b in TRAIN:
                hopt.step(b)
        for k in hp:
            assert torch.equal(hp[k], hp_tuned[k]), k
            assert trial.user_attrs["hparams"][k] == pytest.approx(float(hp[k].detach().exp()), rel=1e-15)   # the decay
        with torch.no_grad():
            by_hand = sum(float(F.mse_loss(model(x), y)) for x, y in VAL) / len(VAL)
        assert value == trial.value == pytest.approx(by_hand, rel=1e-15)
        assert sorted(trial.intermediate_values) == [0, 1, 2] and trial.intermediate_values[2] == value
        assert trial.user_attrs["hyper_steps"] == 3 * len(TRAIN) // 2 and trial.user_attrs["skipped_hyper_steps"] == 0
        assert hp["weight_decay/0.weight"].item() != pytest.approx(-4.6051701859880914)     # it moved from 1e-2


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_pruned_trial_keeps_what_it_tuned():
    study = optuna.create_study(pruner=_AlwaysPrune())
    study.optimize(lambda t: tune(t, make(3)[2], TRAIN, epochs=3), n_trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [0]
    assert trial.user_attrs["hyper_steps"] == 2 and "weight_decay/2.weight" in trial.user_attrs["hparams"]


def _trial():
    return optuna.create_study().ask()


@pytest.mark.parametrize("case, match", [
    ("unused", r"\['unused'\] reach neither"),
    ("frozen", "require gradients"),
    ("empty_val", "validation loader yielded no batch"),
    ("empty_train", "training loader yielded no batch"),
])
def test_bad_input_is_refused_before_training(case, match):
    model, hp, hopt = make(3, unused=case == "unused", frozen=case == "frozen",
                           val=[] if case == "empty_val" else VAL)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        tune(_trial(), hopt, [] if case == "empty_train" else TRAIN)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and hopt.inner_steps == 0


def test_wrong_arguments():
    _, _, hopt = make(3)
    with pytest.raises(TypeError, match="optuna.Trial"):
        tune(object(), hopt, TRAIN)
    with pytest.raises(TypeError, match="HyperOptimizer"):
        tune(_trial(), object(), TRAIN)
    with pytest.raises(ValueError, match="epochs"):
        tune(_trial(), hopt, TRAIN, epochs=0)
    with pytest.raises(ValueError, match="no batch"):
        validation_loss(hopt, [])


def test_missing_or_unsupported_optuna_names_the_extra(monkeypatch):
    monkeypatch.setattr(optuna, "__version__", "2.10.0")
    with pytest.raises(ImportError, match=r"optuna>=3.0,<6 .* got optuna 2.10.0. Fix: pip install 'bilevel\[optuna\]'"):
        checks.require("optuna", extra="optuna", package="optuna", minimum="3.0", below="6", fn="f")
    monkeypatch.setitem(sys.modules, "optuna", None)                 # as if not installed
    monkeypatch.delitem(sys.modules, "bilevel.integrations.optuna")
    with pytest.raises(ImportError, match=r"pip install 'bilevel\[optuna\]'"):
        importlib.import_module("bilevel.integrations.optuna")
    monkeypatch.undo()
    importlib.import_module("bilevel.integrations.optuna")


def test_importing_bilevel_imports_no_framework():
    import subprocess

    code = ("import sys, bilevel, bilevel.integrations; "
            "print(sorted(m for m in ('optuna', 'lightning', 'transformers', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
