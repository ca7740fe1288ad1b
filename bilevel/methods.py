"""Hypergradient methods: small configured objects, each with one ``hypergrad(...)``.

:class:`bilevel.HyperOptimizer` builds a :class:`Problem` at the current weights and asks its
method for the hypergradient; it never looks at which method it holds. A new method is a new
object with the same ``hypergrad`` signature (and, if it needs to, ``validate``), with no edit to
the HyperOptimizer::

    class MyMethod(bl.Method):
        def hypergrad(self, problem, inner_batch, outer_batch, state):
            ...
            return bl.MethodResult(hypergrad=tree, outer_loss=..., inner_grad_norm=...)

``state`` is what the method returned as ``MethodResult.state`` at the last *accepted* hyper
step (``None`` at first): the HyperOptimizer keeps it, puts it in its checkpoints, and hands it
back, so a method can warm-start (``Implicit`` keeps ``{"adjoint", "eigvec", "lambda_max"}``: the adjoint
with ``warm_start=True``, Neumann's λ_max estimate with ``alpha=None``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from ._errors import check_finite_tree, check_scalar
from ._tree import Tree, tree_detach
from .distributed import all_reduce_mean_list
from .implicit import implicit_hypergrad
from .inner import check_convertible, from_torch
from .solvers import CG
from .unroll import UNROLL_MODES, finite_difference_hypergrad, unrolled_hypergrad

__all__ = ["Problem", "MethodResult", "Method", "Implicit", "Unrolled", "FiniteDifference", "FirstOrder"]


@dataclass
class Problem:
    """The bilevel problem of one hyper step at the current weights, as a method sees it.

    Attributes:
        inner_loss: ``inner_loss(params, hparams, batch) -> scalar`` (the data term; the penalty apart).
        outer_loss: ``outer_loss(params, hparams, batch) -> scalar``.
        params: the current inner weights (detached tree).
        hparams: the hyperparameters (the live leaf tensors; methods must not modify them).
        penalty: ``penalty(params, hparams) -> scalar`` added to ``inner_loss``, or ``None``.
        fixed: model parameters that are neither inner weights nor hyperparameters (held constant);
            the penalty reads them.
        inner_optimizer: the user's ``torch.optim`` optimizer of the inner weights.
        live_params: ``{name: the Parameter the inner optimizer holds}`` (for its state).
        group: the data-parallel process group, or ``None``.

    Shapes: ``params``, ``fixed`` and ``live_params`` are trees of the model's parameter shapes.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> hp = {"c": torch.tensor(0.5, requires_grad=True)}
        >>> loss = lambda m, h, b: ((m(b) - h["c"]) ** 2).mean()
        >>> hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss,
        ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...     outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1))
        >>> problem = hopt.problem()                     # what hopt's method sees at the current weights
        >>> sorted(problem.params), problem.inner_loss(problem.params, hp, torch.ones(4, 2)).shape
        (['bias', 'weight'], torch.Size([]))
    """

    inner_loss: Callable[..., Tensor]
    outer_loss: Callable[..., Tensor]
    params: Tree
    hparams: Mapping[str, Tensor]
    penalty: Optional[Callable[..., Tensor]] = None
    fixed: Tree = field(default_factory=dict)
    inner_optimizer: Optional[torch.optim.Optimizer] = None
    live_params: Tree = field(default_factory=dict)
    group: Any = None

    def inner_objective(self) -> Callable[..., Tensor]:
        """``inner_loss + penalty`` as one loss ``(params, hparams, batch) -> scalar``."""
        if self.penalty is None:
            return self.inner_loss
        data, pen, fixed = self.inner_loss, self.penalty, self.fixed
        return lambda p, h, b: data(p, h, b) + pen({**fixed, **p}, h)


@dataclass
class MethodResult:
    """What a method returns for one hyper step.

    Attributes:
        hypergrad: ``dL_V/dλ`` (keys and shapes of ``hparams``).
        outer_loss: ``L_V`` at the weights used. inner_grad_norm: ``‖∇_w L_T‖`` there.
        solver: the linear solve's :class:`~bilevel.SolverInfo` (implicit methods), else ``None``.
        state: kept by the HyperOptimizer if the step is accepted and handed back at the next one.

    Example:
        >>> res = bl.MethodResult({"c": torch.tensor(0.1)}, outer_loss=0.25, state={"u": torch.zeros(2)})
        >>> res.hypergrad["c"], res.inner_grad_norm, res.solver
        (tensor(0.1000), nan, None)
    """

    hypergrad: Tree
    outer_loss: float
    inner_grad_norm: float = math.nan
    solver: Any = None
    state: Any = None


class Method:
    """Base of the hypergradient methods (optional: any object with ``hypergrad`` works).

    Example:
        >>> class DirectOnly(bl.Method):          # first-order DARTS, written as a new method
        ...     def hypergrad(self, problem, inner_batch, outer_batch, state):
        ...         h = {k: v.detach().requires_grad_() for k, v in problem.hparams.items()}
        ...         lv = problem.outer_loss(problem.params, h, outer_batch)
        ...         g = torch.autograd.grad(lv, list(h.values()), allow_unused=True)
        ...         return bl.MethodResult({k: torch.zeros_like(v) if gi is None else gi
        ...                                 for (k, v), gi in zip(h.items(), g)}, float(lv))
        >>> DirectOnly().validate(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), "demo")
    """

    def validate(self, inner_optimizer: torch.optim.Optimizer, fn: str) -> None:
        """Raise if this method cannot work with ``inner_optimizer`` (called at construction)."""

    def hypergrad(self, problem: Problem, inner_batch: Any, outer_batch: Any, state: Any) -> MethodResult:
        """The hypergradient of ``problem`` on the two batches (nothing is updated)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Implicit(Method):
    """Implicit differentiation at the current weights (assumed near a minimum of the inner loss).

    Args:
        solver: linear solver for ``H u = ∂_w L_V``. Default ``bl.CG(maxiter=10, on_indefinite="stop")``:
            at most 10 Hessian-vector products (the cost of a Neumann-10 with a fixed step, a third of
            ``bl.Neumann(steps=10)`` with ``alpha=None`` before its λ_max was warm-started), the
            hypergradient to a cosine of 1.000 at a converged convex inner problem (Neumann-10: 0.95),
            and on a non-convex network it never raises: a direction of negative curvature truncates
            the solve (Steihaug), ``info.extra["indefinite"]`` and ``HyperStepStats.negative_curvature``
            say so, and the HyperOptimizer warns once. Measured in docs/choosing.md, "Defaults on
            non-convex networks".
            With ``bl.Neumann(alpha=None)`` the λ_max estimate (its eigenvector) is part of the
            state: the first step spends ``power_iters`` products, later steps ``refresh_iters`` (1).
        hvp_mode: ``"auto"`` | ``"reverse"`` | ``"forward"`` | ``"gauss_newton"``: the generalized
            Gauss-Newton ``Jᵀ H_ℓ J`` in the solve (positive semi-definite, so CG is safe on a
            non-convex net; the mixed term stays exact). Then ``inner_loss(model, hparams, batch)``
            must return one output loss, e.g. ``bl.losses.cross_entropy(model(x), y)``, and a weight
            decay goes in the HyperOptimizer's ``penalty=`` (see :func:`bilevel.implicit_hypergrad`).
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
        >>> stats.method, stats.matvecs                  # 4 weights: CG is exact after 4 products
        ('Implicit', 4)
    """

    solver: Any = field(default_factory=lambda: CG(maxiter=10, on_indefinite="stop"))
    hvp_mode: str = "auto"
    warm_start: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.warm_start, bool):
            raise TypeError(f"bilevel.Implicit: expected warm_start True or False, got {self.warm_start!r}.")
        if self.warm_start and not getattr(self.solver, "warm_startable", False):
            raise ValueError(f"bilevel.Implicit: warm_start=True needs a solver that takes a starting point "
                             f"(bl.CG, bl.Neumann), got {type(self.solver).__name__}. Fix: solver=bl.CG(...).")

    def hypergrad(self, problem: Problem, inner_batch: Any, outer_batch: Any, state: Any) -> MethodResult:
        state = _implicit_state(state)
        hg = implicit_hypergrad(problem.inner_loss, problem.outer_loss, problem.params, problem.hparams,
                                solver=self.solver, hvp_mode=self.hvp_mode, inner_args=(inner_batch,),
                                outer_args=(outer_batch,), penalty=problem.penalty, penalty_fixed=problem.fixed,
                                group=problem.group, u0=state["adjoint"] if self.warm_start else None,
                                solver_state=state)
        info = hg.info
        extra = {} if info.solver is None else info.solver.extra
        new = {"adjoint": info.adjoint if self.warm_start else None, "eigvec": extra.get("eigvec"),
               "lambda_max": extra.get("lambda_max") if extra.get("eigvec") is not None else None}
        return MethodResult(dict(hg), info.outer_loss, info.inner_grad_norm, info.solver,
                            new if new["adjoint"] is not None or new["eigvec"] is not None else None)


def _implicit_state(state: Any) -> dict[str, Any]:
    """:class:`Implicit`'s state as ``{"adjoint": tree or None, "eigvec": (P,) or None, "lambda_max": float or
    None}``; ``None`` (the first hyper step) and the bare adjoint tree of older checkpoints are read too."""
    empty: dict[str, Any] = {"adjoint": None, "eigvec": None, "lambda_max": None}
    if state is None:
        return empty
    if isinstance(state, Mapping) and state and all(isinstance(v, Tensor) for v in state.values()):
        return {**empty, "adjoint": dict(state)}        # written before the state was a dict
    if isinstance(state, Mapping) and set(state) <= set(empty):
        return {**empty, **state}
    raise TypeError(f"bilevel.Implicit: expected a method state {{'adjoint', 'eigvec', 'lambda_max'}} (or None), got "
                    f"{type(state).__name__}{' with keys ' + str(sorted(state)) if isinstance(state, Mapping) else ''}. "
                    f"Fix: load a checkpoint written by the same method, or set hopt.method_state = None.")


@dataclass(frozen=True)
class FiniteDifference(Method):
    """One look-ahead step of a differentiable copy of the inner optimizer, with the one second-order
    term taken by a central finite difference: second-order DARTS's approximation, no Hessian product.

    The mixed term is ``[∂_λ L_T(w + εu) − ∂_λ L_T(w − εu)] / 2ε`` with ``ε = radius/‖u‖`` (DARTS:
    ``radius = 0.01``); its error is O(radius²), 0 for an inner loss quadratic in the weights.
    Not with data parallelism.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> hp = {"log_wd": torch.tensor(-3.0, requires_grad=True)}
        >>> inner = lambda m, h, b: F.mse_loss(m(b[0]), b[1]) + h["log_wd"].exp() * (m.weight ** 2).sum()
        >>> outer = lambda m, h, b: F.mse_loss(m(b[0]), b[1])
        >>> hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer,
        ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...     outer_optimizer=torch.optim.Adam(hp.values(), lr=0.01), method=bl.FiniteDifference(radius=0.01))
        >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
        >>> hopt.hyper_step(batch, batch).method
        'FiniteDifference'
    """

    radius: float = 0.01

    def __post_init__(self) -> None:
        if isinstance(self.radius, bool) or not isinstance(self.radius, (int, float)) \
                or not math.isfinite(self.radius) or self.radius <= 0:
            raise ValueError(f"Invalid radius for bilevel.FiniteDifference: {self.radius!r} (expected a finite "
                             f"number > 0, e.g. 0.01).")

    def validate(self, inner_optimizer: torch.optim.Optimizer, fn: str) -> None:
        check_convertible(inner_optimizer, fn, type(self).__name__)

    def hypergrad(self, problem: Problem, inner_batch: Any, outer_batch: Any, state: Any) -> MethodResult:
        if problem.group is not None:
            raise ValueError("bilevel.HyperOptimizer: the finite-difference one-step method does not support data "
                             "parallelism. Fix: bl.Unrolled(steps=1), which differentiates the step exactly.")
        opt, opt_state = from_torch(problem.inner_optimizer, problem.live_params)
        hg, _ = finite_difference_hypergrad(problem.inner_objective(), problem.outer_loss, problem.params,
                                            problem.hparams, optimizer=opt, state=opt_state, radius=self.radius,
                                            inner_args=(inner_batch,), outer_args=(outer_batch,))
        return MethodResult(dict(hg), hg.info.outer_loss, hg.info.inner_grad_norm)


@dataclass(frozen=True)
class Unrolled(Method):
    """Differentiate ``steps`` look-ahead steps of a differentiable copy of the inner optimizer.

    The copy has the inner optimizer's update rule, current numbers (lr, momentum, betas...) and
    current state (momentum buffers, Adam moments), and starts from the current weights; the
    model itself is not moved. ``steps=1`` with SGD is second-order DARTS.

    Args:
        steps: look-ahead steps ``K``.
        truncate: differentiate only the last ``truncate`` of them.
        mode: ``"reverse"`` | ``"checkpoint"`` | ``"replay"`` | ``"forward"`` (see
            :func:`bilevel.unrolled_hypergrad`).
        replay_k: branching factor (an int >= 2) of the replay tree in ``mode="replay"``.
        second_order: ``"exact"`` (default: differentiate the step, one Hessian-vector product) or
            ``"finite_difference"``: the same as ``bl.FiniteDifference(radius=fd_radius)`` (``steps=1``).
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
    replay_k: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Invalid steps for bilevel.Unrolled: {self.steps!r} (expected an int >= 1).")
        if self.mode not in UNROLL_MODES:
            raise ValueError(f"bilevel.Unrolled: expected mode in {UNROLL_MODES}, got {self.mode!r}.")
        if isinstance(self.replay_k, bool) or not isinstance(self.replay_k, int) or self.replay_k < 2:
            raise ValueError(f"Invalid replay_k for bilevel.Unrolled: {self.replay_k!r} (expected an int >= 2, the "
                             f"branching factor of the replay tree of mode='replay').")
        if self.second_order not in ("exact", "finite_difference"):
            raise ValueError(f"bilevel.Unrolled: expected second_order 'exact' or 'finite_difference', "
                             f"got {self.second_order!r}.")
        if self.second_order == "finite_difference":
            if self.steps != 1 or self.truncate is not None or self.mode != "reverse":
                raise ValueError(f"bilevel.Unrolled: second_order='finite_difference' is the one-step DARTS "
                                 f"approximation; expected steps=1, truncate=None, mode='reverse', got "
                                 f"steps={self.steps}, truncate={self.truncate}, mode={self.mode!r}. Fix: use "
                                 f"second_order='exact' for longer unrolls, or bl.FiniteDifference().")
            try:
                FiniteDifference(self.fd_radius)
            except ValueError:
                raise ValueError(f"Invalid fd_radius for bilevel.Unrolled: {self.fd_radius!r} (expected a finite "
                                 f"number > 0, e.g. 0.01).") from None

    def validate(self, inner_optimizer: torch.optim.Optimizer, fn: str) -> None:
        check_convertible(inner_optimizer, fn, type(self).__name__)

    def hypergrad(self, problem: Problem, inner_batch: Any, outer_batch: Any, state: Any) -> MethodResult:
        if self.second_order == "finite_difference":
            return FiniteDifference(self.fd_radius).hypergrad(problem, inner_batch, outer_batch, state)
        opt, opt_state = from_torch(problem.inner_optimizer, problem.live_params)
        hg, _ = unrolled_hypergrad(problem.inner_objective(), problem.outer_loss, problem.params, problem.hparams,
                                   optimizer=opt, state=opt_state, steps=self.steps, truncate=self.truncate,
                                   mode=self.mode, replay_k=self.replay_k, inner_args=(inner_batch,),
                                   outer_args=(outer_batch,), group=problem.group)
        return MethodResult(dict(hg), hg.info.outer_loss, hg.info.inner_grad_norm)


@dataclass(frozen=True)
class FirstOrder(Method):
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

    def hypergrad(self, problem: Problem, inner_batch: Any, outer_batch: Any, state: Any) -> MethodResult:
        fn = "bilevel.HyperOptimizer.hyper_step"
        h = tree_detach(problem.hparams, requires_grad=True)
        with torch.enable_grad():
            lv = check_scalar(problem.outer_loss(problem.params, h, outer_batch), fn, "outer_loss")
            gs = torch.autograd.grad(lv, list(h.values()), allow_unused=True) if lv.requires_grad else [None] * len(h)
        grads = [torch.zeros_like(v) if g is None else g for v, g in zip(h.values(), gs)]
        *grads, lv = all_reduce_mean_list([*grads, lv.detach()], problem.group)
        hg = dict(zip(h, grads))
        check_finite_tree(hg, fn, "the hypergradient")
        return MethodResult(hg, float(lv))

