"""Optuna hybrid search: TPE picks the discrete hyperparameters, hypergradients tune the continuous ones.

A black-box sampler spends a whole training run to learn one point of a continuous hyperparameter;
a hypergradient moves all of them within one run. So the split is: the Optuna study samples what
gradients cannot reach (width, optimizer, batch size: discrete choices), and inside each trial
:func:`tune` trains the model with a :class:`bilevel.HyperOptimizer` whose hyperparameters (weight
decays, ...) move by hypergradient. The trial reports the tuned validation loss (so TPE and
pruners compare trials at their tuned continuous values) and stores those values in
``trial.user_attrs["hparams"]``.

Importing this module imports Optuna (``pip install 'bilevel[optuna]'``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from ..hyperopt import HyperOptimizer
from ..hparams import WeightDecay, positive
from ..trajectory import hparam_summary
from .checks import check_before_training, first_batch, require

optuna = require("optuna", extra="optuna", package="optuna", minimum="3.0", below="6",
                 fn="bilevel.integrations.optuna")

__all__ = ["tune", "validation_loss", "hparam_values"]


def validation_loss(hopt: HyperOptimizer, loader: Iterable[Any]) -> float:
    """The mean of ``hopt.outer_loss`` over the batches of ``loader``, in eval mode, without gradients.

    Example:
        >>> import torch.nn.functional as F
        >>> from bilevel.integrations.optuna import validation_loss
        >>> model, hp = torch.nn.Linear(2, 1), {"a": torch.tensor(0.0, requires_grad=True)}
        >>> loss = lambda m, h, b: F.mse_loss(m(b[0]), b[1]) + 0 * h["a"]
        >>> hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss,
        ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...     outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1))
        >>> validation_loss(hopt, [(torch.zeros(3, 2), model.bias.detach().expand(3, 1))])
        0.0
    """
    was_training = hopt.model.training
    hopt.model.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for batch in loader:
                total += float(hopt.outer_loss(hopt.model, hopt.hparams, batch))
                n += 1
    finally:
        hopt.model.train(was_training)
    if n == 0:
        raise ValueError("bilevel.integrations.optuna.validation_loss: the validation loader yielded no batch. "
                         "Fix: check its dataset is not empty.")
    return total / n


def hparam_values(hopt: HyperOptimizer, *, max_values: int = 64) -> dict[str, Any]:
    """The hyperparameters as JSON-friendly values: a list (or a number) for tensors of at most
    ``max_values`` entries, else their mean/min/max (:func:`bilevel.trajectory.hparam_summary`). The raw
    tensors of a weight-decay penalty are given as the positive decays they stand for (so they
    compare with decays a sampler drew), the others as they are.

    Example:
        >>> from bilevel.integrations.optuna import hparam_values
        >>> model = torch.nn.Linear(2, 1)
        >>> hp, pen = bl.hparams.weight_decay(model, init=0.5, per="tensor")
        >>> loss = lambda m, h, b: F.mse_loss(m(b[0]), b[1])
        >>> hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=pen,
        ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...     outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1))
        >>> {k: round(v, 3) for k, v in hparam_values(hopt).items()}
        {'weight_decay/weight': 0.5, 'weight_decay/bias': 0.5}
    """
    kinds = hopt.penalty.kind if isinstance(hopt.penalty, WeightDecay) else None
    decays = set(hopt.penalty.decay_keys) if kinds else set()
    out: dict[str, Any] = {}
    for k, v in hopt.hparams.items():
        x = positive(v.detach(), kinds) if k in decays else v.detach()
        if v.numel() <= max_values:
            out[k] = x.cpu().double().tolist()
        else:
            out.update(hparam_summary({k: x}))
    return out


def tune(trial: Any, hopt: HyperOptimizer, train_loader: Iterable[Any], *, epochs: int = 1,
         evaluate: Optional[Callable[[], float]] = None, max_values: int = 64) -> float:
    """Train with hyper steps for ``epochs`` inside an Optuna trial; return the tuned validation loss.

    After each epoch the validation loss is reported (``trial.report``), so Optuna's pruners
    work; a pruned trial raises ``optuna.TrialPruned`` after storing what it tuned. At the end,
    ``trial.user_attrs`` holds ``"hparams"`` (:func:`hparam_values`), ``"hyper_steps"`` and
    ``"skipped_hyper_steps"``.

    Before the first step it checks, on the first batches: that the model has weights to train,
    that every hyperparameter reaches the inner loss (penalty included) or the outer loss, and that
    both loaders yield batches. These raise ``ValueError`` before any training.

    Args:
        trial: an ``optuna.Trial`` (its discrete choices already sampled by the objective).
        hopt: a :class:`bilevel.HyperOptimizer` with ``outer_loader`` (validation batches) and
            ``hyper_every`` set; its ``hparams`` are the continuous hyperparameters.
        train_loader: the training batches of one epoch (re-iterated every epoch).
        epochs: passes over ``train_loader``.
        evaluate: ``() -> float``, the loss to report; default :func:`validation_loss` on
            ``hopt.outer_loader``.
        max_values: hyperparameter tensors larger than this are stored as mean/min/max.

    Example:
        >>> import optuna
        >>> from bilevel.integrations.optuna import tune
        >>> X, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> train, val = [(X[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)], [(X[48:], y[48:])]
        >>> def objective(trial):
        ...     width = trial.suggest_categorical("width", [4, 8])             # discrete: TPE
        ...     torch.manual_seed(0)
        ...     model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))
        ...     hp, pen = bl.hparams.weight_decay(model, init=1e-3, per="tensor")   # continuous: hypergradient
        ...     loss = lambda m, h, b: F.mse_loss(m(b[0]), b[1])
        ...     hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=pen,
        ...         inner_optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        ...         outer_optimizer=torch.optim.Adam(hp.values(), lr=0.1), outer_loader=val,
        ...         method=bl.Implicit(solver=bl.CG(maxiter=3, damping=1.0)))     # damped: a non-convex net
        ...     return tune(trial, hopt, train, epochs=2)
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
        >>> study.optimize(objective, n_trials=2)
        >>> sorted(study.best_trial.user_attrs), study.best_trial.user_attrs["hyper_steps"]
        (['hparams', 'hyper_steps', 'skipped_hyper_steps'], 6)
    """
    fn = "bilevel.integrations.optuna.tune"
    if not isinstance(hopt, HyperOptimizer):
        raise TypeError(f"{fn}: expected a bl.HyperOptimizer, got {type(hopt).__name__}.")
    if not callable(getattr(trial, "report", None)) or not callable(getattr(trial, "set_user_attr", None)):
        raise TypeError(f"{fn}: expected an optuna.Trial (the objective's argument), got {type(trial).__name__}.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Invalid epochs for {fn}: {epochs!r} (expected an int >= 1).")
    if hopt.outer_loader is None:
        raise ValueError(f"{fn}: expected a HyperOptimizer built with outer_loader=... (validation batches), got "
                         f"none. Fix: pass outer_loader=val_loader.")
    inner_batch = first_batch(train_loader, "training", fn)
    check_before_training(hopt, inner_batch, first_batch(hopt.outer_loader, "validation", fn), fn)
    evaluate = evaluate or (lambda: validation_loss(hopt, hopt.outer_loader))

    def store() -> None:
        trial.set_user_attr("hparams", hparam_values(hopt, max_values=max_values))
        trial.set_user_attr("hyper_steps", hopt.hyper_steps)
        trial.set_user_attr("skipped_hyper_steps", hopt.skipped)

    value = float("nan")
    for epoch in range(epochs):
        hopt.model.train()
        for batch in train_loader:
            hopt.step(batch)
        value = float(evaluate())
        trial.report(value, epoch)
        if trial.should_prune():
            store()
            raise optuna.TrialPruned(f"pruned after epoch {epoch} (validation loss {value:.4g})")
    store()
    return value
