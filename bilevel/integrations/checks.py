"""What the integrations share: the checks before training starts (the framework's version, and
inputs that would make a run silently useless: hyperparameters no loss reads, nothing to train, no
validation data), and the checkpoint state of a framework callback."""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

__all__ = ["require", "check_trainable", "first_batch", "check_hparams_reach_a_loss", "check_before_training",
           "callback_state", "restore_callback_state"]


def _version_tuple(text: str) -> tuple[int, ...]:
    """``"2.6.6+cpu"`` -> ``(2, 6, 6)``; pre-release tags are dropped (``"5.0.0rc1"`` -> ``(5, 0, 0)``)."""
    m = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(x) for x in m.group(0).split(".")) if m else (0,)


def require(module: str, *, extra: str, package: str, minimum: str, below: str, fn: str) -> Any:
    """Import ``module`` or raise an ImportError naming the extra to install; refuse versions
    outside ``[minimum, below)``, the range the integration is tested on."""
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{fn} needs {package}, which is not installed. Fix: pip install 'bilevel[{extra}]' "
                          f"(or pip install '{package}>={minimum},<{below}').") from err
    version = getattr(mod, "__version__", "0")
    if not _version_tuple(minimum) <= _version_tuple(version) < _version_tuple(below):
        raise ImportError(f"{fn}: expected {package}>={minimum},<{below} (the versions it is tested on), got "
                          f"{package} {version}. Fix: pip install 'bilevel[{extra}]'.")
    return mod


def check_trainable(model: nn.Module, fn: str) -> None:
    """Raise if ``model`` has no parameter that requires a gradient (nothing to train, so no inner problem)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{fn}: expected a model with parameters that require gradients (the inner "
                         f"variables), got none ({sum(1 for _ in model.parameters())} parameters, all frozen "
                         f"or absent). Fix: leave requires_grad=True on the weights to train.")


def first_batch(loader: Optional[Iterable[Any]], what: str, fn: str) -> Any:
    """The first batch of ``loader``; raise if it yields nothing."""
    if loader is None:
        raise ValueError(f"{fn}: expected a {what} loader, got None.")
    for batch in loader:
        return batch
    raise ValueError(f"{fn}: the {what} loader yielded no batch, so no hyper step could be taken. "
                     f"Fix: check its dataset is not empty (and drop_last with a batch size larger than it).")


def check_hparams_reach_a_loss(losses: Mapping[str, Callable[[], Tensor]], hparams: Mapping[str, Tensor],
                               inner_params: Iterable[Tensor], fn: str) -> None:
    """Raise if a hyperparameter reaches neither loss (its hypergradient would be zero forever).

    A hyperparameter counts as reached by the inner loss when the inner gradient depends on it
    (the path of every implicit or unrolled hypergradient), and by the outer loss when the loss does.

    Args:
        losses: ``{"inner_loss": f, "outer_loss": g}``, each evaluating its loss on the first batch.
        hparams: the hyperparameter tree.
        inner_params: the weights the inner optimizer trains.
    """
    keys, leaves, params = list(hparams), list(hparams.values()), [p for p in inner_params if p.requires_grad]
    reached: set[str] = set()
    with torch.enable_grad():
        inner = losses["inner_loss"]()
        grads = torch.autograd.grad(inner, params, create_graph=True, allow_unused=True)
        probe = sum((g.sum() for g in grads if g is not None), inner)
        for name, f in (("inner", lambda: probe), ("outer", losses["outer_loss"])):
            value = f()
            if value.requires_grad:
                got = torch.autograd.grad(value, leaves, allow_unused=True, retain_graph=True)
                reached |= {k for k, g in zip(keys, got) if g is not None}
    lost = [k for k in keys if k not in reached]
    if lost:
        raise ValueError(f"{fn}: the hyperparameters {lost[:5]} reach neither the inner nor the outer loss on the "
                         f"first batch, so their hypergradient is zero and they would never move. Fix: use them "
                         f"in a loss (e.g. pass the penalty of bl.hparams.weight_decay), or drop them from hparams.")


def check_before_training(hopt: Any, inner_batch: Any, outer_batch: Any, fn: str) -> None:
    """The first-batch checks of a :class:`bilevel.HyperOptimizer` about to train: something to train,
    and every hyperparameter read by the inner loss (with the penalty) or the outer loss."""
    check_trainable(hopt.model, fn)

    def inner() -> Tensor:
        loss = hopt.inner_loss(hopt.model, hopt.hparams, inner_batch)
        if hopt.penalty is not None:
            loss = loss + hopt.penalty(dict(hopt.model.named_parameters()), hopt.hparams)
        return loss

    params = [p for g in hopt.inner_optimizer.param_groups for p in g["params"]]
    check_hparams_reach_a_loss({"inner_loss": inner, "outer_loss": lambda: hopt.outer_loss(hopt.model, hopt.hparams,
                                                                                          outer_batch)},
                               hopt.hparams, params, fn)


#: the parts of a HyperOptimizer's state a framework callback keeps (the framework saves the model
#: and its optimizer itself)
STATE_KEYS = ("hparams", "outer_optimizer", "counters", "outer_batches", "method_state", "trajectory")


def callback_state(hopt: Any, last_step: int, loaded: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """A callback's checkpoint: :data:`STATE_KEYS` of ``hopt.state_dict()`` and the last step it acted on
    (what was loaded, when ``hopt`` is not built yet)."""
    if hopt is None:
        return dict(loaded or {})
    state = hopt.state_dict()
    return {**{k: state[k] for k in STATE_KEYS}, "last_step": last_step}


def restore_callback_state(hopt: Any, state: Mapping[str, Any]) -> int:
    """Load :func:`callback_state` into ``hopt`` (the model and inner optimizer stay as the framework
    restored them); returns the last step."""
    hopt.load_state_dict({**hopt.state_dict(), **{k: state[k] for k in STATE_KEYS if k in state}})
    return int(state.get("last_step", -1))
