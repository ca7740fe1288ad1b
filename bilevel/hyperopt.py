"""HyperOptimizer: the stateful edge that adds hyperparameter steps to an ordinary training loop.

Like a ``torch.optim`` optimizer: construct it from the model, the hyperparameters,
two ordinary optimizers and a method; call ``inner_step(batch)`` to train,
``hyper_step(inner_batch, outer_batch)`` to update the hyperparameters, or
``step(batch)`` for both on a schedule; save with ``state_dict()``.

The losses are written as ordinary PyTorch on the model (``model(x)``); the
library evaluates them at the parameters it needs through
``torch.func.functional_call``, with copies of the buffers, so the extra passes of a
hyper step never touch BatchNorm running statistics. Which hypergradient is taken is the
method's business (:mod:`bilevel.methods`): this class only orchestrates and keeps state.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from ._errors import BilevelError, NonFiniteError, all_finite, check_scalar
from ._io import atomic_save
from ._rng import get_state as get_rng
from ._rng import set_state as set_rng
from ._training import (CLOSURE_OPTIMIZERS, ModelFunctions, OuterBatches, Snapshot, check_hparams, check_options,
                        check_weights, clone_state, drop_straddling_pair, gradients_into_grad, nonfinite_inner,
                        unwrap_ddp, warn_if_no_hyper_step)
from ._tree import Tree, tree_norm
from .hparams import WeightDecay
from .distributed import all_reduce_mean_grads, broadcast_from_first_, check_group, world_size
from .methods import FirstOrder, Implicit, Problem, Unrolled
from .trajectory import HyperStepStats, Trajectory

__all__ = ["HyperOptimizer", "HyperStepStats", "Implicit", "Unrolled", "FirstOrder"]


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
            small problem, and a hyper step right after it sees weights near the minimum. Its
            curvature history is kept across hyper steps, less the one pair that straddles the
            change of hyperparameters, so warm-started solves take a few iterations.
        outer_optimizer: a ``torch.optim`` optimizer over ``hparams.values()``.
        method: ``bl.Implicit(solver=...)`` (default ``bl.Implicit()``: ``bl.CG(maxiter=10, on_indefinite="stop")``),
            ``bl.Unrolled(steps=..., truncate=...)``, ``bl.FiniteDifference()``, ``bl.FirstOrder()``, or
            any object with ``hypergrad(problem, inner_batch, outer_batch, state)`` (:mod:`bilevel.methods`).
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
        model, self.ddp, process_group = unwrap_ddp(model, process_group)
        hparams = check_hparams(hparams, fn)
        method = Implicit() if method is None else method
        check_options(fn, inner_loss=inner_loss, outer_loss=outer_loss, inner_optimizer=inner_optimizer,
                      outer_optimizer=outer_optimizer, method=method, penalty=penalty, on_error=on_error,
                      hyper_every=hyper_every, clip_grad_norm=clip_grad_norm)
        self._fns = ModelFunctions.build(model, hparams, inner_optimizer, outer_optimizer, fn)
        if callable(getattr(method, "validate", None)):
            method.validate(inner_optimizer, fn)
        self.model, self.hparams, self.method = model, hparams, method
        self.inner_loss, self.outer_loss, self.penalty = inner_loss, outer_loss, penalty
        self.inner_optimizer, self.outer_optimizer = inner_optimizer, outer_optimizer
        self.outer_loader, self.hyper_every, self.on_error = outer_loader, hyper_every, on_error
        self.clip_grad_norm = clip_grad_norm
        self._closure_optimizer = isinstance(inner_optimizer, CLOSURE_OPTIMIZERS)
        #: the process group of data-parallel hyper steps (None: one process); see bilevel.distributed
        self.group = check_group(process_group, fn)
        # like DDP does for the weights: every rank starts from rank 0's hyperparameters
        broadcast_from_first_(list(hparams.values()), self.group)
        #: broadcast the model's buffers (BatchNorm statistics) from the first rank before every
        #: inner and hyper step, as DDP does before every forward (its ``broadcast_buffers``)
        self._sync_buffers = world_size(self.group) > 1 and (self.ddp is None or bool(self.ddp.broadcast_buffers))
        self._outer = OuterBatches(outer_loader)
        #: what the method returned as its state at the last accepted hyper step (a warm start)
        self.method_state: Any = None
        self._pending_state: Any = None
        self._warned_indefinite = False
        self.inner_steps = self.hyper_steps = self.skipped = self._calls = 0
        #: what a run of step() did, read when this object goes away (warns if it took no hyper step)
        self._run = {"calls": 0, "hyper_steps": 0, "hyper_every": hyper_every}
        weakref.finalize(self, warn_if_no_hyper_step, self._run)
        self.last_stats: Optional[HyperStepStats] = None
        self.step_stats: Optional[HyperStepStats] = None
        #: one row per hyper step (diagnostics, hyperparameter summaries): :class:`bilevel.Trajectory`;
        #: ``None`` keeps nothing
        self.trajectory: Optional[Trajectory] = Trajectory(penalty if isinstance(penalty, WeightDecay) else None)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The outer optimizer's ``param_groups`` (the hyperparameters' learning rates), as ``torch.optim``
        has them. Schedule them with any ``torch.optim.lr_scheduler`` on ``hopt.outer_optimizer``, and
        the weights' with one on ``hopt.inner_optimizer``: every hyper step reads the current numbers
        (``bl.Unrolled`` differentiates through steps at the inner optimizer's current lr)."""
        return self.outer_optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the hyperparameters and of the inner optimizer's parameters."""
        self.outer_optimizer.zero_grad(set_to_none=set_to_none)
        self.inner_optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def outer_batches(self) -> int:
        """Validation batches taken from ``outer_loader`` so far."""
        return self._outer.taken

    def next_outer_batch(self) -> Any:
        """The next validation batch of ``outer_loader`` (cycled; counted in :attr:`outer_batches` and checkpoints)."""
        return self._outer.next()

    def _fail(self, err: BaseException, where: str) -> None:
        self.skipped += 1
        if self.on_error == "raise":
            raise err
        warnings.warn(f"bilevel.HyperOptimizer.{where}: skipped, nothing was updated ({type(err).__name__}: {err})",
                      RuntimeWarning, stacklevel=3)

    def _broadcast_buffers(self) -> None:
        if self._sync_buffers:
            broadcast_from_first_(list(self.model.buffers()), self.group)

    # -- inner steps ------------------------------------------------------------------------------
    def inner_step(self, batch: Any) -> Tensor:
        """One ordinary training step of ``inner_optimizer`` on ``inner_loss``; returns the loss (detached).

        Parameters that get no gradient are left alone, as ``torch.optim`` does (``.grad`` stays
        ``None``: no update, no weight decay, no state change). Optimizers that re-evaluate the
        loss (``torch.optim.LBFGS``: a whole line-search solve per step) get a closure. A NaN/Inf
        loss or gradient leaves the weights untouched, and so does an exception in the loss
        (``on_error`` decides: raise or skip); with a closure optimizer, whose later evaluations
        happen after it moved the weights, weights and optimizer state are restored from a copy
        taken before the step.
        """
        self._broadcast_buffers()
        if self._closure_optimizer:
            return self._closure_inner_step(batch)
        leaves = self._fns.leaves()
        self.inner_optimizer.zero_grad(set_to_none=True)
        loss, finite = gradients_into_grad(self._loss(batch), leaves, self.group)
        if not finite:
            check_weights(self.model)
            self._fail(nonfinite_inner(loss), "inner_step")
            return loss
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(leaves, self.clip_grad_norm)
        self.inner_optimizer.step()
        self.inner_steps += 1
        return loss

    def _loss_and_grads(self, batch: Any, leaves: list[Tensor]) -> tuple[Tensor, list[Optional[Tensor]]]:
        """The inner loss (+ penalty) and its gradient (``None`` where no rank's loss reaches a leaf),
        averaged over ranks: NaN on any rank reaches all, so all skip together."""
        loss = self._loss(batch)
        gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads, loss = all_reduce_mean_grads(gs, leaves, loss, self.group)
        return loss, grads

    def _loss(self, batch: Any) -> Tensor:
        """The inner loss (+ penalty) on ``batch``, with its graph."""
        if not torch.is_grad_enabled():           # entering the context costs more than asking
            with torch.enable_grad():
                return self._loss(batch)
        fn = "bilevel.HyperOptimizer.inner_step"
        loss = check_scalar(self.inner_loss(self.model, self.hparams, batch), fn, "inner_loss")
        if self.penalty is not None:
            loss = loss + check_scalar(self.penalty(dict(self.model.named_parameters()), self.hparams), fn, "penalty")
        return loss

    def _closure_inner_step(self, batch: Any) -> Tensor:
        leaves = self._fns.leaves()
        self.inner_optimizer.zero_grad(set_to_none=True)
        snapshot = Snapshot(leaves, self.inner_optimizer)
        losses: list[Tensor] = []

        def closure() -> Tensor:
            loss, grads = self._loss_and_grads(batch, leaves)
            if not all_finite(loss, *(g for g in grads if g is not None)):
                raise nonfinite_inner(loss)
            for p, g in zip(leaves, grads):
                p.grad = g
            losses.append(loss)
            return loss

        try:
            self.inner_optimizer.step(closure)
            if not all_finite(*leaves):
                raise NonFiniteError("bilevel.HyperOptimizer.inner_step: inner_optimizer.step() produced NaN/Inf "
                                     "weights; they were restored. Fix: lower the learning rate.")
        except NonFiniteError as err:
            snapshot.restore()
            self._fail(err, "inner_step")
            return losses[0] if losses else torch.tensor(float("nan"))
        except BaseException:
            snapshot.restore()
            raise
        self.inner_steps += 1
        return losses[0]

    # -- hyper steps ------------------------------------------------------------------------------
    def problem(self) -> Problem:
        """The bilevel problem at the current weights, as the method sees it (:class:`bilevel.methods.Problem`)."""
        live = self._fns.params()
        # Copies of the buffers: the passes of a hyper step must not move BatchNorm statistics.
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        return Problem(self._fns.evaluator(self.inner_loss, buffers), self._fns.evaluator(self.outer_loss, buffers),
                       {n: p.detach() for n, p in live.items()}, self.hparams, self.penalty, self._fns.fixed(),
                       self.inner_optimizer, live, self.group)

    def hypergradient(self, inner_batch: Any, outer_batch: Any) -> tuple[Tree, HyperStepStats]:
        """The hypergradient of the current method at the current weights (nothing is updated)."""
        self._broadcast_buffers()
        res = self.method.hypergrad(self.problem(), inner_batch, outer_batch, self.method_state)
        info = res.solver
        stats = HyperStepStats(float(tree_norm(res.hypergrad)), res.outer_loss, res.inner_grad_norm,
                               None if info is None else info.iterations, None if info is None else info.residual_norm,
                               None if info is None else info.matvecs, method=type(self.method).__name__,
                               negative_curvature=None if info is None else getattr(info, "extra", {}).get("indefinite"))
        self._pending_state = res.state
        if stats.negative_curvature and not self._warned_indefinite:
            self._warned_indefinite = True     # once per HyperOptimizer: every step of a run may meet it
            warnings.warn(f"bilevel.HyperOptimizer: the {info.solver} solve met negative curvature of the inner loss "
                          f"(Rayleigh quotient {info.extra.get('min_rayleigh_quotient', math.nan):.2e}): the weights are "
                          f"not near a minimum, and the hypergradient uses the solve truncated there (see "
                          f"docs/choosing.md, 'Defaults on non-convex networks'). Warned once; "
                          f"HyperStepStats.negative_curvature reports every step.", RuntimeWarning, stacklevel=3)
        return dict(res.hypergrad), stats

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
            stats = HyperStepStats(method=type(self.method).__name__, skipped=True, error=str(err))
        else:
            self._apply(hg, stats)
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        if self.trajectory is not None:
            self.trajectory.record(stats, self.hparams, inner_step=self.inner_steps)
        return stats

    def _apply(self, hg: Tree, stats: HyperStepStats) -> None:
        """A transactional ``outer_optimizer.step()``: put hyperparameters and state back on NaN/Inf."""
        snapshot = Snapshot(self.hparams.values(), self.outer_optimizer)
        try:
            for k, v in self.hparams.items():
                v.grad = hg[k].to(v.dtype)
            self.outer_optimizer.step()
        except BaseException:
            snapshot.restore()       # an exception inside the outer optimizer (or an interrupt): as before
            raise
        for v, g in zip(self.hparams.values(), snapshot.grads):
            v.grad = g
        if not all_finite(*self.hparams.values()):
            snapshot.restore()
            low = sorted({str(v.dtype) for v in self.hparams.values() if v.dtype in (torch.float16, torch.bfloat16)})
            why = (f" The hyperparameters are {'/'.join(low)}: in half precision an optimizer's eps (Adam's 1e-8) "
                   f"rounds to 0, so a zero hypergradient entry divides 0 by 0. Fix: keep the hyperparameters in "
                   f"float32 (the model may stay in half precision: the hypergradient is cast), or raise the outer "
                   f"optimizer's eps (1e-4 for float16)." if low else " Fix: lower the outer learning rate.")
            err = NonFiniteError("bilevel.HyperOptimizer.hyper_step: outer_optimizer.step() produced NaN/Inf "
                                 "hyperparameters; they were restored." + why)
            self._fail(err, "hyper_step")
            stats.skipped, stats.error = True, str(err)
            return
        self.hyper_steps += 1
        self.method_state = self._pending_state
        if self._closure_optimizer:
            # The inner objective changed with the hyperparameters: the pair L-BFGS would form from
            # the last gradient of the old objective and the first of the new describes neither, and
            # stalled its next line search. Only that pair is dropped: the others keep the warm-started
            # solve short (a few iterations instead of a restart from steepest descent).
            drop_straddling_pair(self.inner_optimizer)

    def step(self, batch: Any) -> Tensor:
        """An inner step on ``batch`` and, every ``hyper_every`` calls, a hyper step on (``batch``,
        the next ``outer_loader`` batch). Returns the inner loss; :attr:`step_stats` is the
        :class:`HyperStepStats` of the hyper step this call took, or ``None`` if it took none."""
        loss = self.inner_step(batch)
        self._calls += 1
        self.step_stats = None
        if self._calls % self.hyper_every == 0:
            self.step_stats = self.hyper_step(batch, self.next_outer_batch())
        self._run.update(calls=self._calls, hyper_steps=self.hyper_steps)
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
                         "outer_batches": self.outer_batches, "skipped": self.skipped, "calls": self._calls},
            "rng": {"cpu": cpu, "cuda": list(cuda) if cuda is not None else []},
            "outer_batches": self._outer.state_dict(),
            "method_state": clone_state(self.method_state),
            "trajectory": None if self.trajectory is None else self.trajectory.state_dict(),
            "version": 2,
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
        """Restore a :meth:`state_dict` (model, hparams, both optimizers, counters, RNG, method state)."""
        fn = "bilevel.HyperOptimizer.load_state_dict"
        lacking = [k for k in ("model", "hparams", "inner_optimizer", "outer_optimizer", "counters", "rng")
                   if k not in state]
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
        self.skipped, self._calls = int(c["skipped"]), int(c["calls"])
        self._outer.load_state_dict(state.get("outer_batches", {"taken": c["outer_batches"]}))
        # "adjoint": the method state of checkpoints written before method objects (Implicit's warm start)
        self.method_state = clone_state(state.get("method_state", state.get("adjoint")))
        if self.trajectory is not None and state.get("trajectory") is not None:
            self.trajectory.load_state_dict(state["trajectory"])
        cuda = state["rng"]["cuda"]
        set_rng((state["rng"]["cpu"], cuda if cuda else None))

