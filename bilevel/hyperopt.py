"""HyperOptimizer: the stateful edge that adds hyperparameter steps to an ordinary training loop.

Like a ``torch.optim`` optimizer: construct it from the model, the hyperparameters,
two ordinary optimizers and a method; call ``inner_step(batch)`` to train,
``hyper_step(inner_batch, outer_batch)`` to update the hyperparameters, or
``step(batch)`` for both on a schedule; save with ``state_dict()``.

The losses are written as ordinary PyTorch on the model (``model(x)``); the
library evaluates them at the parameters it needs through
``torch.func.functional_call``, with copies of the buffers, so the extra passes of a
hyper step never touch BatchNorm running statistics.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._errors import BilevelError, NonFiniteError, all_finite, check_finite_tree, check_scalar, check_tree
from ._rng import get_state as get_rng
from ._rng import set_state as set_rng
from ._io import atomic_save
from ._tree import Tree, tree_detach, tree_norm
from .distributed import all_reduce_mean_list, broadcast_from_first_, check_group, world_size
from .implicit import implicit_hypergrad, warm_startable
from .inner import from_torch
from .solvers import Neumann
from .unroll import UNROLL_MODES, _one_step_finite_difference, unrolled_hypergrad

__all__ = ["HyperOptimizer", "Implicit", "Unrolled", "FirstOrder", "HyperStepStats"]


# -- methods (small configured objects: a new method is a new object) ---------------------------
@dataclass(frozen=True)
class Implicit:
    """Implicit differentiation at the current weights (assumed near a minimum of the inner loss).

    Args:
        solver: linear solver for ``H u = ∂_w L_V`` (default ``bl.Neumann(steps=10)``).
        hvp_mode: ``"auto"`` | ``"reverse"`` | ``"forward"``.
        warm_start: start each solve from the previous hyper step's adjoint ``u`` (kept by the
            HyperOptimizer and in its checkpoints). Weights and hyperparameters move little
            between hyper steps, so the solver continues where it stopped and a fixed budget
            (``CG(maxiter=k)``) buys more accuracy over the run. Needs ``bl.CG`` or ``bl.Neumann``.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> hp = {"log_wd": torch.tensor(-3.0, requires_grad=True)}
        >>> inner = lambda m, h, b: F.mse_loss(m(b[0]), b[1]) + h["log_wd"].exp() * (m.weight ** 2).sum()
        >>> outer = lambda m, h, b: F.mse_loss(m(b[0]), b[1])
        >>> hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer,
        ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...     outer_optimizer=torch.optim.Adam(hp.values(), lr=0.01), method=bl.Implicit(solver=bl.CG(maxiter=5)))
        >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
        >>> stats = hopt.hyper_step(batch, batch)
        >>> stats.method, stats.matvecs
        ('Implicit', 5)
    """

    solver: Any = field(default_factory=lambda: Neumann(steps=10))
    hvp_mode: str = "auto"
    warm_start: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"bilevel.Implicit: expected warm_start True or False, got {self.warm_start!r}.")
        if self.warm_start and not warm_startable(self.solver):
            raise ValueError(f"bilevel.Implicit: warm_start=True needs a solver that takes a starting point "
                             f"(bl.CG, bl.Neumann), got {type(self.solver).__name__}. Fix: solver=bl.CG(...).")


@dataclass(frozen=True)
class Unrolled:
    """Differentiate ``steps`` look-ahead steps of a differentiable copy of the inner optimizer.

    The copy has the inner optimizer's update rule, current numbers (lr, momentum, betas...) and
    current state (momentum buffers, Adam moments), and starts from the current weights; the
    model itself is not moved. ``steps=1`` with SGD is second-order DARTS.

    Args:
        steps: look-ahead steps ``K``.
        truncate: differentiate only the last ``truncate`` of them.
        mode: ``"reverse"`` | ``"checkpoint"`` | ``"forward"`` (see :func:`bilevel.unrolled_hypergrad`).
        second_order: ``"exact"`` (default: differentiate the step, one Hessian-vector product) or
            ``"finite_difference"`` (``steps=1`` only): the mixed second-order term by a central
            difference of ``∂_λ L_T`` at ``w ± ε·v``, ``ε = fd_radius/‖v‖``, as second-order DARTS.
        fd_radius: how far the finite difference moves the weights (DARTS: 0.01).

    Example:
        >>> model = nn.Linear(3, 1)
        >>> hp = {"log_wd": torch.tensor(-3.0, requires_grad=True)}
        >>> inner = lambda m, h, b: F.mse_loss(m(b[0]), b[1]) + h["log_wd"].exp() * (m.weight ** 2).sum()
        >>> outer = lambda m, h, b: F.mse_loss(m(b[0]), b[1])
        >>> hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer,
        ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...     outer_optimizer=torch.optim.Adam(hp.values(), lr=0.01), method=bl.Unrolled(steps=2))
        >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
        >>> hopt.hyper_step(batch, batch).method
        'Unrolled'
    """

    steps: int = 1
    truncate: Optional[int] = None
    mode: str = "reverse"
    second_order: str = "exact"
    fd_radius: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Invalid steps for bilevel.Unrolled: {self.steps!r} (expected an int >= 1).")
        if self.mode not in UNROLL_MODES:
            raise ValueError(f"bilevel.Unrolled: expected mode in {UNROLL_MODES}, got {self.mode!r}.")
        if self.second_order not in ("exact", "finite_difference"):
            raise ValueError(f"bilevel.Unrolled: expected second_order 'exact' or 'finite_difference', "
                             f"got {self.second_order!r}.")
        if self.second_order == "finite_difference":
            if self.steps != 1 or self.truncate is not None or self.mode != "reverse":
                raise ValueError(f"bilevel.Unrolled: second_order='finite_difference' is the one-step DARTS "
                                 f"approximation; expected steps=1, truncate=None, mode='reverse', got "
                                 f"steps={self.steps}, truncate={self.truncate}, mode={self.mode!r}. Fix: use "
                                 f"second_order='exact' for longer unrolls.")
            if not (isinstance(self.fd_radius, (int, float)) and math.isfinite(self.fd_radius) and self.fd_radius > 0):
                raise ValueError(f"Invalid fd_radius for bilevel.Unrolled: {self.fd_radius!r} (expected a finite "
                                 f"number > 0, e.g. 0.01).")


@dataclass(frozen=True)
class FirstOrder:
    """Only the direct term ``∂_λ L_V`` at the current weights (first-order DARTS). No second derivatives.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> hp = {"log_wd": torch.tensor(-3.0, requires_grad=True)}
        >>> inner = lambda m, h, b: F.mse_loss(m(b[0]), b[1]) + h["log_wd"].exp() * (m.weight ** 2).sum()
        >>> outer = lambda m, h, b: F.mse_loss(m(b[0]), b[1])
        >>> hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer,
        ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...     outer_optimizer=torch.optim.Adam(hp.values(), lr=0.01), method=bl.FirstOrder())
        >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
        >>> stats = hopt.hyper_step(batch, batch)       # the decay is not in L_V: direct term 0
        >>> stats.method, stats.hypergrad_norm
        ('FirstOrder', 0.0)
    """


@dataclass
class HyperStepStats:
    """What one hyper step did.

    Attributes:
        hypergrad_norm: ``‖dL_V/dλ‖`` (``nan`` when skipped).
        outer_loss: ``L_V`` at the weights used.
        inner_grad_norm: ``‖∇_w L_T‖`` at the weights used (how far from stationary).
        solver_iterations, solver_residual, matvecs: the linear solve's diagnostics (Implicit).
        skipped: the step changed nothing (``on_error="skip"``); ``error`` says why.
        seconds: wall time of the hyper step.
        method: ``"Implicit"``, ``"Unrolled"`` or ``"FirstOrder"``.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> hp = {"log_wd": torch.tensor(-3.0, requires_grad=True)}
        >>> inner = lambda m, h, b: F.mse_loss(m(b[0]), b[1]) + h["log_wd"].exp() * (m.weight ** 2).sum()
        >>> outer = lambda m, h, b: F.mse_loss(m(b[0]), b[1])
        >>> hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer,
        ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...     outer_optimizer=torch.optim.Adam(hp.values(), lr=0.01), method=bl.Implicit(solver=bl.CG(maxiter=5)))
        >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
        >>> stats = hopt.hyper_step(batch, batch)
        >>> stats.skipped, stats.solver_iterations, sorted(stats.as_dict())[:3]
        (False, 5, ['error', 'hypergrad_norm', 'inner_grad_norm'])
    """

    hypergrad_norm: float = math.nan
    outer_loss: float = math.nan
    inner_grad_norm: float = math.nan
    solver_iterations: Optional[int] = None
    solver_residual: Optional[float] = None
    matvecs: Optional[int] = None
    skipped: bool = False
    error: Optional[str] = None
    seconds: float = 0.0
    method: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The statistics as a plain ``dict`` (for logging)."""
        return asdict(self)


class _LossCall(nn.Module):
    """Holds the model so that ``functional_call`` can evaluate any ``loss(model, hparams, batch)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, loss_fn: Callable[..., Tensor], hparams: Mapping[str, Tensor], batch: Any) -> Tensor:
        return loss_fn(self.m, hparams, batch)


class _InnerPenalty:
    """``penalty(params, hparams)`` over the inner parameters, the model's other parameters held fixed.

    Forwards the closed forms of a structured penalty (``hessian_diag``, ``mixed_closed_form``,
    as :class:`bilevel.hparams.WeightDecay` has) so that :class:`bilevel.HessianOperator` can use them.
    """

    def __init__(self, penalty: Callable[..., Tensor], fixed: Mapping[str, Tensor]) -> None:
        self._penalty = penalty
        self._fixed = dict(fixed)
        if callable(getattr(penalty, "hessian_diag", None)) and callable(getattr(penalty, "mixed_closed_form", None)):
            self.hessian_diag = self._hessian_diag
            self.mixed_closed_form = self._mixed_closed_form

    def __call__(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> Tensor:
        return self._penalty({**self._fixed, **params}, hparams)

    def _hessian_diag(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> dict[str, Tensor]:
        d = self._penalty.hessian_diag({**self._fixed, **params}, hparams)  # type: ignore[attr-defined]
        return {k: v for k, v in d.items() if k in params}

    def _mixed_closed_form(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor],
                           u: Mapping[str, Tensor]) -> dict[str, Tensor]:
        zeros = {n: torch.zeros_like(t) for n, t in self._fixed.items()}
        return self._penalty.mixed_closed_form({**self._fixed, **params}, hparams,  # type: ignore[attr-defined]
                                               {**zeros, **u})


def _ids(tensors: Iterable[Tensor]) -> set[int]:
    return {id(t) for t in tensors}


def _clone_state(x: Any) -> Any:
    """A copy of an optimizer ``state_dict()`` that ``step()`` cannot change: tensors cloned,
    containers rebuilt, immutable values shared, anything else deep-copied. Several times faster
    than ``copy.deepcopy`` of the whole state, which a hyper step and an L-BFGS inner step take
    every time."""
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone_state(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone_state(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_clone_state(v) for v in x)
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        return x
    return copy.deepcopy(x)          # anything else a custom optimizer keeps (numpy arrays, sets...)


#: inner optimizers that evaluate the loss several times per step and so need a closure
_CLOSURE_OPTIMIZERS: tuple[type, ...] = (torch.optim.LBFGS,)


class HyperOptimizer:
    """Tune continuous hyperparameters of a model during its training, by hypergradient.

    Args:
        model: the ``nn.Module`` whose parameters are the inner variables. Parameters that are
            also in ``hparams`` (architecture weights living in the model) are hyperparameters.
        hparams: ``{name: Tensor}`` of leaf tensors with ``requires_grad=True``.
        inner_loss: ``inner_loss(model, hparams, batch) -> scalar``, ordinary PyTorch (``model(x)``).
        outer_loss: ``outer_loss(model, hparams, batch) -> scalar`` (validation loss).
        inner_optimizer: a ``torch.optim`` optimizer over (some of) the model's parameters; the
            parameters it holds are the inner variables, the others are constants.
            ``torch.optim.LBFGS`` works too (with ``bl.Implicit`` or ``bl.FirstOrder``): each
            :meth:`inner_step` is then a line-search solve, the natural inner solver of a convex or
            small problem, and a hyper step right after it sees weights near the minimum.
        outer_optimizer: a ``torch.optim`` optimizer over ``hparams.values()``.
        method: ``bl.Implicit(solver=...)`` (default ``bl.Implicit(bl.Neumann(steps=10))``),
            ``bl.Unrolled(steps=..., truncate=...)`` or ``bl.FirstOrder()``.
        outer_loader: an iterable of validation batches, cycled by :meth:`step`.
        hyper_every: :meth:`step` takes a hyper step every this many inner steps.
        penalty: optional ``penalty(params, hparams) -> scalar`` over the model's named
            parameters, added to ``inner_loss`` in every inner and hyper step. Give a penalty
            that is separable in the weights (``bl.hparams.weight_decay``'s) here rather than
            inside ``inner_loss``: the implicit method then applies its Hessian elementwise
            (same hypergradient, about 0.5 gradient less per Hessian product; see
            :func:`bilevel.implicit_hypergrad`).
        on_error: ``"raise"`` (default) or ``"skip"`` (warn and change nothing) when a loss or a
            hypergradient is NaN/Inf or a solver diverges. Either way nothing is updated.
        process_group: data parallelism. ``"auto"`` (default): the group of a
            ``DistributedDataParallel``-wrapped ``model``, else the default group when
            ``torch.distributed`` is initialized with more than one rank, else none. Each rank
            passes its shard of every batch; inner gradients, outer gradients, every
            Hessian-vector product and the mixed product are averaged where the global batch
            would average them, so hyperparameters and weights stay bit-identical across ranks.
            Buffers (BatchNorm statistics) are broadcast from the first rank before every inner
            and hyper step, as DDP does before every forward (unless the DDP wrapper was built
            with ``broadcast_buffers=False``). ``None``: no communication.
        clip_grad_norm: clip the inner gradient to this total 2-norm before each
            ``inner_optimizer.step()`` (``torch.nn.utils.clip_grad_norm_``'s rule; DARTS clips its
            weights at 5). Under data parallelism the norm is that of the averaged gradient, so
            every rank clips alike. Not with ``torch.optim.LBFGS`` (a line search on a clipped
            gradient is not a line search).

    Shapes: ``hparams`` is a tree of any leaf shapes (a per-weight decay has the shapes of the
    weights); batches are whatever the losses take; the losses return 0-dim tensors, and so does
    :meth:`step` (the inner loss).

    Example:
        >>> model = nn.Linear(3, 1)
        >>> hp, penalty = bl.hparams.weight_decay(model, init=1e-3)       # one log-decay per weight
        >>> loss = lambda m, h, b: F.mse_loss(m(b[0]), b[1])
        >>> data = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(4)]
        >>> hopt = bl.HyperOptimizer(
        ...     model, hp, inner_loss=loss, outer_loss=loss, penalty=penalty,
        ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...     outer_optimizer=torch.optim.Adam(hp.values(), lr=1e-2),
        ...     method=bl.Implicit(solver=bl.CG(maxiter=5)), outer_loader=data, hyper_every=2)
        >>> for batch in data:                        # train_loader; outer_loader gives validation batches
        ...     inner_loss = hopt.step(batch)
        >>> inner_loss.shape, hopt.inner_steps, hopt.hyper_steps, hp["weight_decay/weight"].shape
        (torch.Size([]), 4, 2, torch.Size([1, 3]))
    """

    def __init__(
        self,
        model: nn.Module,
        hparams: Mapping[str, Tensor],
        *,
        inner_loss: Callable[..., Tensor],
        outer_loss: Callable[..., Tensor],
        inner_optimizer: torch.optim.Optimizer,
        outer_optimizer: torch.optim.Optimizer,
        method: Any = None,
        outer_loader: Optional[Iterable[Any]] = None,
        hyper_every: int = 1,
        on_error: str = "raise",
        penalty: Optional[Callable[..., Tensor]] = None,
        process_group: Any = "auto",
        clip_grad_norm: Optional[float] = None,
    ) -> None:
        fn = "bilevel.HyperOptimizer"
        ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        if ddp is not None:
            # the library evaluates the losses itself (functional_call on the module) and averages
            # gradients where the global batch would; DDP's own hooks only fire in .backward()
            model = ddp.module
            if process_group == "auto":
                process_group = ddp.process_group
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: expected `model` to be an nn.Module, got {type(model).__name__}.")
        hparams = check_tree(hparams, fn, "hparams")
        for k, v in hparams.items():
            if not (v.is_leaf and v.requires_grad):
                raise ValueError(
                    f"{fn}: expected hparams[{k!r}] to be a leaf tensor with requires_grad=True (the outer "
                    f"optimizer updates it), got requires_grad={v.requires_grad}, is_leaf={v.is_leaf}. "
                    f"Fix: torch.tensor(..., requires_grad=True), or `.detach().requires_grad_()`."
                )
        if not callable(inner_loss) or not callable(outer_loss):
            raise TypeError(f"{fn}: expected inner_loss and outer_loss to be callables (model, hparams, batch) -> scalar.")
        for name, opt in (("inner_optimizer", inner_optimizer), ("outer_optimizer", outer_optimizer)):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"{fn}: expected `{name}` to be a torch.optim.Optimizer, got {type(opt).__name__}.")
        if penalty is not None and not callable(penalty):
            raise TypeError(f"{fn}: expected `penalty` to be a callable penalty(params, hparams) -> scalar "
                            f"(e.g. from bl.hparams.weight_decay), got {type(penalty).__name__}.")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"{fn}: expected on_error 'raise' or 'skip', got {on_error!r}.")
        if isinstance(hyper_every, bool) or not isinstance(hyper_every, int) or hyper_every < 1:
            raise ValueError(f"Invalid hyper_every for {fn}: {hyper_every!r} (expected an int >= 1).")
        method = Implicit() if method is None else method
        if not isinstance(method, (Implicit, Unrolled, FirstOrder)):
            raise TypeError(f"{fn}: expected method bl.Implicit(...), bl.Unrolled(...) or bl.FirstOrder(), "
                            f"got {type(method).__name__}.")

        hp_ids = _ids(hparams.values())
        key_of_hp = {id(v): k for k, v in hparams.items()}
        named = dict(model.named_parameters())
        #: model parameter name -> hparams key, for hyperparameters living in the model
        self._hp_in_model = {n: key_of_hp[id(p)] for n, p in named.items() if id(p) in hp_ids}
        inner_opt_params = [p for g in inner_optimizer.param_groups for p in g["params"]]
        model_ids = _ids(named.values())
        for p in inner_opt_params:
            if id(p) in hp_ids:
                raise ValueError(f"{fn}: expected inner_optimizer to hold only inner parameters, got the "
                                 f"hyperparameter {key_of_hp[id(p)]!r} in it. Fix: build it "
                                 f"over bl.nas.weight_parameters(model) or the model parameters that are not hparams.")
            if id(p) not in model_ids:
                raise ValueError(f"{fn}: expected inner_optimizer to hold parameters of `model`, got a tensor of "
                                 f"shape {tuple(p.shape)} that is not a "
                                 f"parameter of `model`. Fix: build it over model.parameters().")
        opt_ids = _ids(inner_opt_params)
        self._inner_names = [n for n, p in named.items() if id(p) in opt_ids]
        if not self._inner_names:
            raise ValueError(f"{fn}: expected inner_optimizer to hold some of the model's parameters, got none of "
                             f"them. Fix: build it over model.parameters().")
        outer_ids = _ids(p for g in outer_optimizer.param_groups for p in g["params"])
        stray = [tuple(p.shape) for g in outer_optimizer.param_groups for p in g["params"] if id(p) not in hp_ids]
        if stray:
            raise ValueError(f"{fn}: expected outer_optimizer to hold only hparams, got tensors that are not in "
                             f"hparams (shapes {stray[:3]}). "
                             f"Fix: build it over hparams.values().")
        missing = [k for k, v in hparams.items() if id(v) not in outer_ids]
        if missing:
            raise ValueError(f"{fn}: expected outer_optimizer to hold every hparam, got hparams {missing[:5]} "
                             f"outside it, so they would never be "
                             f"updated. Fix: build outer_optimizer over hparams.values().")

        if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
                                           or not math.isfinite(clip_grad_norm) or clip_grad_norm <= 0):
            raise ValueError(f"{fn}: expected clip_grad_norm None or a finite number > 0, got {clip_grad_norm!r}.")
        closure_opt = isinstance(inner_optimizer, _CLOSURE_OPTIMIZERS)
        if closure_opt and clip_grad_norm is not None:
            raise ValueError(f"{fn}: clip_grad_norm does not go with {type(inner_optimizer).__name__}: its line "
                             f"search needs the true gradient. Fix: clip_grad_norm=None, or an SGD/Adam inner "
                             f"optimizer.")
        if closure_opt and isinstance(method, Unrolled):
            raise ValueError(f"{fn}: method bl.Unrolled differentiates copies of the inner optimizer's steps, and "
                             f"{type(inner_optimizer).__name__} (a line search) has no differentiable copy. "
                             f"Fix: method=bl.Implicit(...) (it only needs the weights near a minimum, which "
                             f"{type(inner_optimizer).__name__} gives), or an SGD/Adam/AdamW inner optimizer.")

        self.model = model
        self.ddp = ddp
        self._closure_optimizer = closure_opt
        self.clip_grad_norm = clip_grad_norm
        #: the process group of data-parallel hyper steps (None: one process); see bilevel.distributed
        self.group = check_group(process_group, fn)
        # like DDP does for the weights: every rank starts from rank 0's hyperparameters
        broadcast_from_first_(list(hparams.values()), self.group)
        #: broadcast the model's buffers (BatchNorm statistics) from the first rank before every
        #: inner and hyper step, as DDP does before every forward (its ``broadcast_buffers``)
        self._sync_buffers = world_size(self.group) > 1 and (ddp is None or bool(ddp.broadcast_buffers))
        self.hparams = hparams
        self.inner_loss = inner_loss
        self.outer_loss = outer_loss
        self.inner_optimizer = inner_optimizer
        self.outer_optimizer = outer_optimizer
        self.method = method
        self.outer_loader = outer_loader
        self.hyper_every = hyper_every
        self.on_error = on_error
        self.penalty = penalty
        self._call = _LossCall(model)
        self._outer_iter: Optional[Iterator[Any]] = None
        #: the last accepted hyper step's adjoint u (Implicit(warm_start=True)), else None
        self._adjoint: Optional[dict[str, Tensor]] = None
        self._pending_adjoint: Optional[dict[str, Tensor]] = None
        self.inner_steps = 0
        self.hyper_steps = 0
        self.outer_batches = 0
        self.skipped = 0
        self._calls = 0
        self.last_stats: Optional[HyperStepStats] = None
        self.step_stats: Optional[HyperStepStats] = None

    # -- evaluation at given parameters -------------------------------------------------------
    def _params(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self._inner_names}

    def _evaluator(self, loss_fn: Callable[..., Tensor], buffers: Mapping[str, Tensor]) -> Callable[..., Tensor]:
        prefix = "m."

        def f(params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], batch: Any) -> Tensor:
            tensors = {prefix + n: v for n, v in params.items()}
            tensors.update({prefix + n: hparams[k] for n, k in self._hp_in_model.items()})
            tensors.update({prefix + n: b for n, b in buffers.items()})
            return functional_call(self._call, tensors, (loss_fn, hparams, batch))

        return f

    # -- the two steps ------------------------------------------------------------------------
    def _fail(self, err: BaseException, where: str) -> None:
        self.skipped += 1
        if self.on_error == "raise":
            raise err
        warnings.warn(f"bilevel.HyperOptimizer.{where}: skipped, nothing was updated ({type(err).__name__}: {err})",
                      RuntimeWarning, stacklevel=3)

    def inner_step(self, batch: Any) -> Tensor:
        """One ordinary training step of ``inner_optimizer`` on ``inner_loss``; returns the loss (detached).

        Optimizers that re-evaluate the loss (``torch.optim.LBFGS``: a whole line-search solve per
        step) get a closure. A NaN/Inf loss or gradient leaves the weights untouched, and so does
        an exception in the loss (``on_error`` decides: raise or skip); with a closure optimizer,
        whose later evaluations happen after it moved the weights, weights and optimizer state
        are restored from a copy taken before the step.
        """
        if self._sync_buffers:
            broadcast_from_first_(list(self.model.buffers()), self.group)
        if self._closure_optimizer:
            return self._closure_inner_step(batch)
        leaves = self._leaves()
        self.inner_optimizer.zero_grad(set_to_none=True)
        loss, grads = self._loss_and_grads(batch, leaves)
        if not all_finite(loss, *grads):
            self._check_weights()
            self._fail(self._nonfinite_inner(loss), "inner_step")
            return loss.detach()
        for p, g in zip(leaves, grads):
            p.grad = g
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(leaves, self.clip_grad_norm)
        self.inner_optimizer.step()
        self.inner_steps += 1
        return loss.detach()

    def _leaves(self) -> list[Tensor]:
        return list(self._params().values())

    def _loss_and_grads(self, batch: Any, leaves: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The inner loss (+ penalty) and its gradient (zeros for unused leaves), averaged over ranks."""
        fn = "bilevel.HyperOptimizer.inner_step"
        with torch.enable_grad():
            loss = check_scalar(self.inner_loss(self.model, self.hparams, batch), fn, "inner_loss")
            if self.penalty is not None:
                loss = loss + check_scalar(self.penalty(dict(self.model.named_parameters()), self.hparams), fn,
                                           "penalty")
            gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, gs)]
        loss = loss.detach()
        if world_size(self.group) > 1:
            # the global batch's gradient (and loss); NaN on any rank reaches all, so all skip together
            red = all_reduce_mean_list([*grads, loss.reshape(1).to(grads[0].dtype)], self.group)
            grads, loss = list(red[:-1]), red[-1].reshape(()).to(loss.dtype)
        return loss, grads

    def _check_weights(self) -> None:
        """Raise if the weights themselves hold NaN/Inf: then no step can be skipped safely.

        Finite gradients can still give non-finite weights when the optimizer's own update
        overflows. No copy of the weights is kept for one-evaluation optimizers (it would double
        their memory), so this is found where it shows, at the next NaN loss, and stops training
        whatever ``on_error`` says; :meth:`save` refuses to write such a state.
        """
        if not all_finite(*self.model.parameters()):
            raise NonFiniteError("bilevel.HyperOptimizer.inner_step: the model's weights hold NaN/Inf, so an earlier "
                                 "inner_optimizer.step() overflowed (finite gradients are checked before every "
                                 "step). Fix: lower its learning rate, then resume from the last checkpoint "
                                 "(HyperOptimizer.load).")

    @staticmethod
    def _nonfinite_inner(loss: Tensor) -> NonFiniteError:
        return NonFiniteError(f"bilevel.HyperOptimizer.inner_step: the inner loss or its gradient is NaN/Inf "
                              f"(loss={float(loss):.4g}); the weights were left as they were. "
                              f"Fix: lower the learning rate, check the batch.")

    def _closure_inner_step(self, batch: Any) -> Tensor:
        leaves = self._leaves()
        opt = self.inner_optimizer
        saved = [p.detach().clone() for p in leaves]
        saved_state = _clone_state(opt.state_dict())
        first: list[Tensor] = []

        def closure() -> Tensor:
            loss, grads = self._loss_and_grads(batch, leaves)
            if not all_finite(loss, *grads):
                raise self._nonfinite_inner(loss)
            for p, g in zip(leaves, grads):
                p.grad = g
            first.append(loss)
            return loss

        def restore() -> None:
            with torch.no_grad():
                for p, v in zip(leaves, saved):
                    p.copy_(v)
                    p.grad = None
            opt.load_state_dict(saved_state)

        try:
            opt.zero_grad(set_to_none=True)
            opt.step(closure)
        except NonFiniteError as err:
            restore()
            self._fail(err, "inner_step")
            return first[0] if first else torch.tensor(float("nan"))
        except BaseException:
            restore()
            raise
        if not all_finite(*leaves):
            restore()
            self._fail(NonFiniteError("bilevel.HyperOptimizer.inner_step: inner_optimizer.step() produced NaN/Inf "
                                      "weights; they were restored. Fix: lower the learning rate."), "inner_step")
            return first[0]
        self.inner_steps += 1
        return first[0]

    def hypergradient(self, inner_batch: Any, outer_batch: Any) -> tuple[Tree, HyperStepStats]:
        """The hypergradient of the current method at the current weights (nothing is updated)."""
        stats = HyperStepStats(method=type(self.method).__name__)
        self._pending_adjoint = None
        if self._sync_buffers:
            broadcast_from_first_(list(self.model.buffers()), self.group)
        live = self._params()
        params = {n: p.detach() for n, p in live.items()}
        # Copies of the buffers: the passes of a hyper step must not move BatchNorm statistics.
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        f_in = self._evaluator(self.inner_loss, buffers)
        f_out = self._evaluator(self.outer_loss, buffers)
        m = self.method
        pen = None
        if self.penalty is not None:
            fixed = {n: p.detach() for n, p in self.model.named_parameters() if n not in params}
            pen = _InnerPenalty(self.penalty, fixed)
        if isinstance(m, Implicit):
            hg = implicit_hypergrad(f_in, f_out, params, self.hparams, solver=m.solver, hvp_mode=m.hvp_mode,
                                    inner_args=(inner_batch,), outer_args=(outer_batch,), penalty=pen,
                                    group=self.group, u0=self._adjoint if m.warm_start else None)
            info = hg.info
            self._pending_adjoint = info.adjoint if m.warm_start else None
            stats.outer_loss, stats.inner_grad_norm = info.outer_loss, info.inner_grad_norm
            if info.solver is not None:
                stats.solver_iterations = info.solver.iterations
                stats.solver_residual = info.solver.residual_norm
                stats.matvecs = info.solver.matvecs
        elif isinstance(m, Unrolled):
            if pen is not None:
                f_data, pen_ = f_in, pen
                f_in = lambda p, h, b: f_data(p, h, b) + pen_(p, h)  # noqa: E731
            opt, state = from_torch(self.inner_optimizer, live)
            if m.second_order == "finite_difference":
                if self.group is not None:
                    raise ValueError("bilevel.HyperOptimizer: Unrolled(second_order='finite_difference') does not "
                                     "support data parallelism. Fix: second_order='exact'.")
                hg, _ = _one_step_finite_difference(f_in, f_out, params, self.hparams, optimizer=opt, state=state,
                                                    radius=m.fd_radius, inner_args=(inner_batch,),
                                                    outer_args=(outer_batch,))
            else:
                hg, _ = unrolled_hypergrad(f_in, f_out, params, self.hparams, optimizer=opt, state=state,
                                           steps=m.steps, truncate=m.truncate, mode=m.mode,
                                           inner_args=(inner_batch,), outer_args=(outer_batch,), group=self.group)
            stats.outer_loss, stats.inner_grad_norm = hg.info.outer_loss, hg.info.inner_grad_norm
        else:
            h = tree_detach(self.hparams, requires_grad=True)
            with torch.enable_grad():
                lv = check_scalar(f_out(params, h, outer_batch), "bilevel.HyperOptimizer.hyper_step", "outer_loss")
                gs = torch.autograd.grad(lv, list(h.values()), allow_unused=True) if lv.requires_grad \
                    else [None] * len(h)
            hg = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(h.items(), gs)}
            if world_size(self.group) > 1:
                red = all_reduce_mean_list([*hg.values(), lv.detach()], self.group)
                hg, lv = dict(zip(hg, red[:-1])), red[-1]
            check_finite_tree(hg, "bilevel.HyperOptimizer.hyper_step", "the hypergradient")
            stats.outer_loss = float(lv.detach())
        stats.hypergrad_norm = float(tree_norm(hg))
        return dict(hg), stats

    def hyper_step(self, inner_batch: Any, outer_batch: Any) -> HyperStepStats:
        """One hyperparameter update: hypergradient on the batches, then ``outer_optimizer.step()``.

        Returns :class:`HyperStepStats`. On a NaN/Inf or a diverging solver, nothing changes
        (``on_error="raise"`` re-raises, ``"skip"`` warns and returns stats with ``skipped=True``).
        """
        t0 = time.perf_counter()
        try:
            hg, stats = self.hypergradient(inner_batch, outer_batch)
        except BilevelError as err:
            self._fail(err, "hyper_step")
            stats = HyperStepStats(method=type(self.method).__name__, skipped=True, error=str(err),
                                   seconds=time.perf_counter() - t0)
            self.last_stats = stats
            return stats
        # Transactional update: keep the hyperparameters and the outer optimizer's state, step,
        # and put them back if the step produced NaN/Inf.
        before = {k: v.detach().clone() for k, v in self.hparams.items()}
        grads_before = {k: v.grad for k, v in self.hparams.items()}
        # deep copy: state_dict() returns the live state tensors, which step() updates in place
        opt_state = _clone_state(self.outer_optimizer.state_dict())

        def restore() -> None:
            with torch.no_grad():
                for k, v in self.hparams.items():
                    v.copy_(before[k])
                    v.grad = grads_before[k]
            self.outer_optimizer.load_state_dict(opt_state)

        try:
            for k, v in self.hparams.items():
                v.grad = hg[k].to(v.dtype)
            self.outer_optimizer.step()
            for k, v in self.hparams.items():
                v.grad = grads_before[k]
        except BaseException:
            restore()            # an exception inside the outer optimizer (or an interrupt): as before
            raise
        if not all_finite(*self.hparams.values()):
            restore()
            err = NonFiniteError("bilevel.HyperOptimizer.hyper_step: outer_optimizer.step() produced NaN/Inf "
                                 "hyperparameters; they were restored. Fix: lower the outer learning rate.")
            self._fail(err, "hyper_step")
            stats.skipped, stats.error = True, str(err)
        else:
            self.hyper_steps += 1
            if self._pending_adjoint is not None:        # warm start of the next solve (Implicit)
                self._adjoint = self._pending_adjoint
            if self._closure_optimizer:
                # The inner objective changed with the hyperparameters: L-BFGS's curvature pairs (and
                # the pair it would form from the last gradient of the old objective and the first of
                # the new) describe another function, and can stall its next line search.
                self.inner_optimizer.state.clear()
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return stats

    def _next_outer(self) -> Any:
        if self.outer_loader is None:
            raise ValueError("bilevel.HyperOptimizer.step: a hyper step is due but no outer_loader was given. "
                             "Fix: pass outer_loader=... at construction, or call hyper_step yourself.")
        if self._outer_iter is None:
            self._outer_iter = iter(self.outer_loader)
            n = len(self.outer_loader) if hasattr(self.outer_loader, "__len__") else 0
            for _ in range(self.outer_batches % n if n else 0):       # resume where a checkpoint left off
                next(self._outer_iter)
        try:
            batch = next(self._outer_iter)
        except StopIteration:
            self._outer_iter = iter(self.outer_loader)
            batch = next(self._outer_iter)
        self.outer_batches += 1
        return batch

    def step(self, batch: Any) -> Tensor:
        """An inner step on ``batch`` and, every ``hyper_every`` calls, a hyper step on (``batch``,
        the next ``outer_loader`` batch). Returns the inner loss; :attr:`step_stats` is the
        :class:`HyperStepStats` of the hyper step this call took, or ``None`` if it took none."""
        loss = self.inner_step(batch)
        self._calls += 1
        self.step_stats = None
        if self._calls % self.hyper_every == 0:
            self.step_stats = self.hyper_step(batch, self._next_outer())
        return loss

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically; loadable with ``torch.load(weights_only=True)``."""
        cpu, cuda = get_rng()
        return {
            "model": self.model.state_dict(),
            "hparams": {k: v.detach().clone() for k, v in self.hparams.items()},
            "inner_optimizer": self.inner_optimizer.state_dict(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "counters": {"inner_steps": self.inner_steps, "hyper_steps": self.hyper_steps,
                         "outer_batches": self.outer_batches, "skipped": self.skipped,
                         "calls": self._calls},
            "rng": {"cpu": cpu, "cuda": list(cuda) if cuda is not None else []},
            "adjoint": None if self._adjoint is None else {k: v.clone() for k, v in self._adjoint.items()},
            "version": 1,
        }

    def save(self, path: Any, extra: Optional[Mapping[str, Any]] = None) -> None:
        """Write :meth:`state_dict` (plus ``extra``, e.g. the data position) to ``path`` atomically.

        The file is written next to ``path`` and renamed over it (after ``fsync``), so a process
        killed at any moment leaves either the previous checkpoint or the new one, never a torn
        file; a state holding NaN/Inf weights is refused (``NonFiniteError``), so a good checkpoint
        is never replaced by a corrupted one. Load with :meth:`load` (``torch.load(weights_only=True)``
        underneath).

        Example:
            >>> hopt.save("run/ckpt.pt", extra={"step": step})
            >>> extra = hopt.load("run/ckpt.pt")          # later, in a fresh process
        """
        if not all_finite(*self.model.parameters(), *self.hparams.values()):
            raise NonFiniteError("bilevel.HyperOptimizer.save: expected finite weights and hyperparameters, got "
                                 "NaN/Inf; the checkpoint at the path was left as it was, so training can resume "
                                 "from it. Fix: lower the inner learning rate and resume (HyperOptimizer.load).")
        state = self.state_dict()
        if extra is not None:
            state["extra"] = dict(extra)
        atomic_save(state, path)

    def load(self, path: Any, map_location: Any = None) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save`; returns its ``extra`` dict (empty if none)."""
        state = torch.load(path, map_location=map_location, weights_only=True)
        self.load_state_dict(state)
        return dict(state.get("extra", {}))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (model, hparams, both optimizers, counters, RNG)."""
        fn = "bilevel.HyperOptimizer.load_state_dict"
        need = ("model", "hparams", "inner_optimizer", "outer_optimizer", "counters", "rng")
        lacking = [k for k in need if k not in state]
        if lacking:
            raise KeyError(f"{fn}: the state dict lacks {lacking}; expected one made by HyperOptimizer.state_dict().")
        if set(state["hparams"]) != set(self.hparams):
            raise KeyError(f"{fn}: expected hparams {sorted(self.hparams)}, the state dict has {sorted(state['hparams'])}.")
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            for k, v in self.hparams.items():
                v.copy_(state["hparams"][k])
        self.inner_optimizer.load_state_dict(state["inner_optimizer"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        c = state["counters"]
        self.inner_steps, self.hyper_steps = int(c["inner_steps"]), int(c["hyper_steps"])
        self.outer_batches, self.skipped, self._calls = int(c["outer_batches"]), int(c["skipped"]), int(c["calls"])
        self._outer_iter = None
        adj = state.get("adjoint")                # absent in checkpoints written before warm starts
        self._adjoint = None if adj is None else {k: v.clone() for k, v in adj.items()}
        cuda = state["rng"]["cuda"]
        set_rng((state["rng"]["cpu"], cuda if cuda else None))
