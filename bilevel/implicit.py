"""Implicit differentiation (IFT) of an inner solution.

At a stationary point ``∇_w L_T(w*, λ) = 0`` of the inner loss,

    dL_V/dλ = ∂_λ L_V − ∇_λ <∂_w L_T, u>,   (H + damping·I) u = ∂_w L_V,   H = ∂²_ww L_T

so a hypergradient is (1) ``b = ∂_w L_V``, (2) ``u = solver(H·, b)``, (3) one mixed
product. One :class:`~bilevel.hvp.HessianOperator` (the inner gradient graph,
built once) serves every product of step (2) and the mixed product of (3).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ._errors import (NonFiniteError, all_finite, check_finite_scalar, check_finite_tree, check_like, check_scalar,
                      check_tree)
from ._tree import Tree, tree_detach
from .distributed import all_reduce_mean_list, check_group, world_size
from .hvp import HessianOperator
from .solvers import CG, Solver, SolverInfo

__all__ = ["implicit_hypergrad", "implicit_diff", "Hypergrad", "HypergradInfo", "solve_adjoint"]


@dataclass
class HypergradInfo:
    """Diagnostics of one implicit hypergradient.

    Attributes:
        inner_grad_norm: ``‖∇_w L_T‖`` at params: how stationary the point was.
            The hypergradient's error grows roughly linearly with it.
        inner_loss: ``L_T`` at params.
        outer_loss: ``L_V`` at params (``nan`` for :func:`implicit_diff`).
        solver: the linear solve's :class:`~bilevel.solvers.SolverInfo` (``None`` for
            a user solver that returns a plain tree).
        hvp_mode: how the Hessian products were taken (``"reverse"``/``"forward"``).

    Example:
        >>> f = lambda p, h: 0.5 * ((p["w"] - h["c"]) ** 2).sum()          # argmin_w f = c
        >>> hg = bl.implicit_hypergrad(f, lambda p, h: (p["w"] ** 2).sum(), {"w": torch.ones(2)}, {"c": torch.ones(2)})
        >>> hg.info.inner_grad_norm, hg.info.solver.solver, hg.info.hvp_mode
        (0.0, 'CG', 'reverse')
    """

    inner_grad_norm: float
    inner_loss: float
    outer_loss: float
    solver: Optional[SolverInfo]
    hvp_mode: str
    #: the adjoint ``u = (H + damping I)⁻¹ ∂_w L_V`` (keys of params, detached): pass it as the next
    #: call's ``u0`` to warm-start the solve when params and hparams moved little
    adjoint: Optional[Tree] = None


class Hypergrad(dict):
    """The hypergradient tree (keys of ``hparams``) plus diagnostics in ``.info``.

    ``.info`` is a :class:`HypergradInfo` for implicit hypergradients and a
    :class:`bilevel.unroll.UnrollInfo` for unrolled ones.

    Shapes: the keys and shapes of ``hparams``.

    Example:
        >>> f = lambda p, h: 0.5 * ((p["w"] - h["c"]) ** 2).sum()          # w*(c) = c
        >>> hg = bl.implicit_hypergrad(f, lambda p, h: (p["w"] ** 2).sum(), {"w": torch.ones(2)}, {"c": torch.ones(2)})
        >>> hg["c"], type(hg.info).__name__                                # d‖c‖²/dc = 2c
        (tensor([2., 2.]), 'HypergradInfo')
    """

    info: Any

    def __init__(self, tree: Mapping[str, Tensor], info: Any) -> None:
        super().__init__(tree)
        self.info = info


def warm_startable(solver: Any) -> bool:
    """Whether ``solver`` takes a starting point (``solve_flat(matvec, b, x0)``): bl.CG, bl.Neumann."""
    import inspect

    return isinstance(solver, Solver) and "x0" in inspect.signature(solver.solve_flat).parameters


def solve_adjoint(op: HessianOperator, b: Mapping[str, Tensor], solver: Any,
                  u0: Optional[Mapping[str, Tensor]] = None) -> tuple[Tree, Optional[SolverInfo]]:
    """Solve ``(H + damping I) u = b`` with ``solver`` on the operator ``op`` (from ``u0`` if given).

    Built-in solvers run on flat buffers; any other callable ``solver(matvec, b) -> tree``
    gets tree-valued ``matvec`` (the seam of API.md).
    """
    if isinstance(solver, Solver):
        if u0 is not None:
            x, info = solver.solve_flat(op.matvec_flat, op.flat.flatten(b), x0=op.flat.flatten(u0))
        else:
            x, info = solver.solve_flat(op.matvec_flat, op.flat.flatten(b))
        return op.flat.unflatten(x), info
    if not callable(solver):
        raise TypeError(f"bilevel: expected `solver` to be a bl.Solver or a callable solver(matvec, b) -> tree, "
                        f"got {type(solver).__name__}. Fix: pass e.g. bl.CG(maxiter=20).")
    out = solver(op.matvec, dict(b))
    return dict(out), getattr(out, "info", None)


def _resolve_args(args: Any, fn: str, name: str) -> tuple:
    if isinstance(args, tuple):
        return args
    if isinstance(args, list):
        return tuple(args)
    raise TypeError(f"{fn}: expected `{name}` to be a tuple of extra arguments, got {type(args).__name__}. "
                    f"Fix: wrap a single argument as ({name}_value,).")


def implicit_hypergrad(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[..., Tensor],
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    solver: Any = None,
    inner_args: Sequence[Any] = (),
    outer_args: Sequence[Any] = (),
    hvp_mode: str = "auto",
    check_finite: bool = True,
    penalty: Optional[Callable[..., Tensor]] = None,
    group: Any = None,
    u0: Optional[Mapping[str, Tensor]] = None,
) -> Hypergrad:
    """Hypergradient ``dL_V/dhparams`` at an (approximately) stationary point of the inner loss.

    Args:
        inner_loss: ``inner_loss(params, hparams, *inner_args) -> scalar`` (training loss).
        outer_loss: ``outer_loss(params, hparams, *outer_args) -> scalar`` (validation
            loss; may use ``hparams`` directly or not at all).
        params: tree ``{name: Tensor}``, approximately ``argmin_w inner_loss``.
        hparams: tree ``{name: Tensor}`` of floating-point hyperparameters.
        solver: a linear solver (``bl.CG()`` by default, ``bl.Neumann``, ``bl.Nystrom``,
            ``bl.Identity``, ``bl.Exact``) or any ``solver(matvec, b) -> tree``.
        inner_args, outer_args: extra positional arguments (batches).
        hvp_mode: ``"auto"`` | ``"reverse"`` | ``"forward"`` (see :mod:`bilevel.hvp`).
        check_finite: check inputs and the result for NaN/Inf (a few host syncs).
        penalty: optional ``penalty(params, hparams) -> scalar`` that is separable in
            ``params`` (a diagonal Hessian, e.g. the penalty of
            ``bl.hparams.weight_decay``), *added* to ``inner_loss``. Passing it here
            instead of inside ``inner_loss`` gives the same hypergradient with its Hessian
            and mixed term applied elementwise, not through double backward: with one decay
            per weight that saves about 0.5 gradient per Hessian product
            (benchmarks/RESULTS.md). A coupled penalty raises ``ValueError``.
        group: a ``torch.distributed`` process group for data parallelism (each rank passes
            its shard of the batches): the outer gradient, every Hessian-vector product and the
            mixed product are averaged over the ranks, so every rank returns the global-batch
            hypergradient, bit-identical across ranks (:mod:`bilevel.distributed`). ``"auto"``:
            the default group when ``torch.distributed`` is initialized with more than one rank.
        u0: a starting point for the adjoint solve (keys and shapes of ``params``), typically the
            previous call's ``hg.info.adjoint``: across hyper steps that move params and hparams
            a little, a warm-started solver continues where the last one stopped, so a fixed
            iteration budget buys more accuracy. Needs a solver that takes one (``bl.CG``,
            ``bl.Neumann``).

    Returns:
        :class:`Hypergrad`: a tree with the keys and shapes of ``hparams`` and
        ``.info`` (:class:`HypergradInfo`: inner gradient norm, losses, solver diagnostics, the
        adjoint ``u``).

    Shapes: ``params`` and ``hparams`` are trees of any leaf shapes; the result has the keys and
    shapes of ``hparams``. The losses must return 0-dim tensors.

    Raises:
        ShapeError: a loss is not scalar, or trees are malformed.
        NonFiniteError: NaN/Inf in inputs, losses, or the result.
        DivergenceError: the linear solver diverged (e.g. Neumann with too large a step).

    Example:
        >>> X, y, Xv, yv = torch.randn(20, 3), torch.randn(20), torch.randn(10, 3), torch.randn(10)
        >>> inner = lambda p, h, X, y: ((X @ p["w"] - y) ** 2).mean() + (h["l2"].exp() * p["w"] ** 2).sum()
        >>> outer = lambda p, h, X, y: ((X @ p["w"] - y) ** 2).mean()
        >>> h = {"l2": torch.zeros(3)}                                       # one decay per feature
        >>> w = torch.linalg.solve(X.T @ X / 20 + torch.eye(3), X.T @ y / 20)  # argmin of inner at h
        >>> hg = bl.implicit_hypergrad(inner, outer, {"w": w}, h, solver=bl.CG(maxiter=10),
        ...                            inner_args=(X, y), outer_args=(Xv, yv))
        >>> hg["l2"].shape, hg.info.inner_grad_norm < 1e-4
        (torch.Size([3]), True)
    """
    fn = "bilevel.implicit_hypergrad"
    params = check_tree(params, fn, "params")
    hparams = check_tree(hparams, fn, "hparams")
    inner_args = _resolve_args(inner_args, fn, "inner_args")
    outer_args = _resolve_args(outer_args, fn, "outer_args")
    solver = CG() if solver is None else solver
    group = check_group(group, fn)
    if u0 is not None:
        u0 = check_tree(u0, fn, "u0")
        check_like(params, u0, fn, "params", "u0")
        if not warm_startable(solver):
            raise TypeError(f"{fn}: expected a solver that takes a starting point (bl.CG, bl.Neumann) with u0=, got "
                            f"{type(solver).__name__}. Fix: solver=bl.CG(...), or u0=None.")
    if check_finite:
        check_finite_tree(params, fn, "params")
        check_finite_tree(hparams, fn, "hparams")
        if u0 is not None:
            check_finite_tree(u0, fn, "u0")

    # (1) b = ∂_w L_V and the direct term ∂_λ L_V.
    w = tree_detach(params, requires_grad=True)
    h = tree_detach(hparams, requires_grad=True)
    with torch.enable_grad():
        lv = check_scalar(outer_loss(w, h, *outer_args), fn, "outer_loss")
        if check_finite and group is None:
            check_finite_scalar(lv, fn, "outer_loss(params, hparams, *outer_args)")
        leaves = list(w.values()) + list(h.values())
        grads = torch.autograd.grad(lv, leaves, allow_unused=True) if lv.requires_grad else [None] * len(leaves)
    nw = len(w)
    b = {k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(w.items(), grads[:nw])}
    direct = {k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(h.items(), grads[nw:])}
    if world_size(group) > 1:            # the global batch's outer gradient, direct term and loss
        red = all_reduce_mean_list([*b.values(), *direct.values(), lv.detach()], group)
        b, direct = dict(zip(b, red[:nw])), dict(zip(direct, red[nw:-1]))
        lv = red[-1]
        # NOTE: checked after the reduction, so that every rank raises (or none does): a rank
        # raising alone would leave the others waiting in the next collective.
        if check_finite:
            check_finite_scalar(lv, fn, "outer_loss(params, hparams, *outer_args) (mean over ranks)")

    # (2) u = (H + damping I)⁻¹ b on one reused inner-gradient graph.
    op = HessianOperator(inner_loss, params, hparams, inner_args, mode=hvp_mode, penalty=penalty, group=group,
                         name=fn)
    if check_finite:
        check_finite_scalar(op.loss, fn, "inner_loss(params, hparams, *inner_args)")
    inner_used = op.hparams_in_loss()
    unused = [k for k, g in zip(h, grads[nw:]) if g is None and k not in inner_used]
    if unused:
        raise ValueError(
            f"{fn}: expected every hyperparameter to reach inner_loss (or penalty) or outer_loss, got {unused} "
            f"reaching neither (their hypergradient would be zero forever). Fix: remove them from hparams, or "
            f"read them as hparams[key] inside a loss (a tensor captured from elsewhere is not the one passed).")
    u, sinfo = solve_adjoint(op, b, solver, u0)

    # (3) hypergrad = ∂_λ L_V − ∇_λ <∂_w L_T, u>.
    mixed = op.mixed_vjp(u)
    hg = {k: direct[k] - mixed[k] for k in hparams}
    if check_finite:
        check_finite_tree(hg, fn, "the hypergradient")
    info = HypergradInfo(float(op.grad_norm), float(op.loss), float(lv.detach()), sinfo, op.mode,
                         {k: v.detach() for k, v in u.items()})
    return Hypergrad(hg, info)


class ImplicitSolution(dict):
    """The params tree returned by an :func:`implicit_diff`-wrapped solver.

    ``.info`` is ``None`` until a backward pass runs through it; then it holds the
    :class:`HypergradInfo` of that backward pass (inner gradient norm, solver diagnostics).

    Shapes: the keys and shapes of the tree the wrapped solver returns.

    Example:
        >>> inner = lambda p, h: 0.5 * ((p["w"] - h["c"]) ** 2).sum()      # argmin_w = c
        >>> solve = bl.implicit_diff(inner)(lambda h: {"w": h["c"].clone()})
        >>> c = torch.ones(2, requires_grad=True)
        >>> w = solve({"c": c})
        >>> w.info is None
        True
        >>> (w["w"] ** 2).sum().backward()
        >>> c.grad, w.info.solver.solver
        (tensor([2., 2.]), 'CG')
    """

    info: Optional[HypergradInfo]

    def __init__(self, tree: Mapping[str, Tensor]) -> None:
        super().__init__(tree)
        self.info = None


class _ImplicitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, cfg: dict, *hvals: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.cfg = cfg
        ctx.save_for_backward(*hvals)
        return tuple(p.detach().clone() for p in cfg["params"].values())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grad_out: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        cfg = ctx.cfg
        fn = "bilevel.implicit_diff (backward)"
        params = cfg["params"]
        hkeys = cfg["hkeys"]
        hparams = dict(zip(hkeys, ctx.saved_tensors))
        b = {k: (torch.zeros_like(p) if g is None else g) for (k, p), g in zip(params.items(), grad_out)}
        # NOTE: grad mode is off inside backward; the HessianOperator turns it on for its products.
        op = HessianOperator(cfg["inner_loss"], params, hparams, cfg["args"], mode=cfg["hvp_mode"],
                             penalty=cfg["penalty"], name=fn)
        u, sinfo = solve_adjoint(op, b, cfg["solver"])
        mixed = op.mixed_vjp(u)
        out = [-mixed[k] for k in hkeys]
        if not all_finite(*out):
            raise NonFiniteError(f"{fn}: the implicit gradient holds NaN/Inf (inner gradient norm "
                                 f"{float(op.grad_norm):.3e}). Fix: check inner_loss at the solution, add damping.")
        result: Optional[ImplicitSolution] = cfg["result"]()
        if result is not None:
            result.info = HypergradInfo(float(op.grad_norm), float(op.loss), float("nan"), sinfo, op.mode)
        grads: list[Optional[Tensor]] = [None]
        grads += [o if need else None for o, need in zip(out, ctx.needs_input_grad[1:])]
        return tuple(grads)


def implicit_diff(inner_loss: Callable[..., Tensor], *, solver: Any = None, hvp_mode: str = "auto",
                  penalty: Optional[Callable[..., Tensor]] = None) -> Callable[[Callable[..., Mapping[str, Tensor]]], Callable[..., ImplicitSolution]]:
    """Decorator: make any inner solver differentiable in its hyperparameters by the IFT.

    The wrapped ``solve(hparams, *args) -> params`` runs as written (on detached
    hyperparameters, so its own iterations build no graph); the returned params
    carry gradients to ``hparams`` through ``(H + damping I) u = ∂L/∂params``,
    ``∂L/∂hparams = −∇_hparams <∇_params inner_loss, u>``, evaluated in the
    backward pass. ``outer(solve(hparams)).backward()`` fills ``hparams[k].grad``.

    Args:
        inner_loss: ``inner_loss(params, hparams, *args) -> scalar``, the objective
            ``solve`` minimizes (the same ``*args``).
        solver: linear solver for the backward pass (``bl.CG()`` by default).
        hvp_mode: ``"auto"`` | ``"reverse"`` | ``"forward"``.
        penalty: optional separable ``penalty(params, hparams)`` added to ``inner_loss``
            (see :func:`implicit_hypergrad`).

    Returns:
        A decorator. The wrapped function returns an :class:`ImplicitSolution`
        (a params tree; ``.info`` is filled by the backward pass). Gradients flow
        to ``hparams`` only, not through ``*args``.

    Shapes: ``hparams`` and the returned params are trees of any leaf shapes; ``hparams[k].grad``
    gets the shape of ``hparams[k]``.

    Example:
        >>> X, y, Xv, yv = torch.randn(20, 3), torch.randn(20), torch.randn(10, 3), torch.randn(10)
        >>> def inner(p, h, X, y):
        ...     return ((X @ p["w"] - y) ** 2).sum() + h["l2"] * (p["w"] ** 2).sum()
        >>> def solve(h, X, y):                                   # the exact ridge solution
        ...     A = X.T @ X + h["l2"] * torch.eye(X.shape[1], dtype=X.dtype)
        ...     return {"w": torch.linalg.solve(A, X.T @ y)}
        >>> ridge = bl.implicit_diff(inner)(solve)                # or @bl.implicit_diff(inner) on `solve`
        >>> h = {"l2": torch.tensor(1.0, requires_grad=True)}
        >>> ((Xv @ ridge(h, X, y)["w"] - yv) ** 2).mean().backward()
        >>> l2 = torch.tensor(1.0, requires_grad=True)            # reference: backprop through the solve
        >>> ((Xv @ solve({"l2": l2}, X, y)["w"] - yv) ** 2).mean().backward()
        >>> torch.allclose(h["l2"].grad, l2.grad, rtol=1e-3, atol=1e-6)
        True
    """
    slv = CG() if solver is None else solver

    def decorator(solve: Callable[..., Mapping[str, Tensor]]) -> Callable[..., ImplicitSolution]:
        name = getattr(solve, "__name__", "solve")

        @functools.wraps(solve)
        def wrapped(hparams: Mapping[str, Tensor], *args: Any) -> ImplicitSolution:
            fn = f"bilevel.implicit_diff({name})"
            hp = check_tree(hparams, fn, "hparams")
            need = torch.is_grad_enabled() and any(v.requires_grad for v in hp.values())
            with torch.enable_grad():
                raw = solve(tree_detach(hp), *args)
            params = check_tree(raw, fn, f"the value returned by {name}")
            params = tree_detach(params)
            result = ImplicitSolution(params)
            if not torch.is_grad_enabled():
                return result
            if not need:
                raise ValueError(
                    f"{fn}: expected at least one hparams tensor with requires_grad=True (the IFT gradient "
                    f"flows to them), got none among {list(hp)}. Fix: `hparams[k].requires_grad_()`, or call "
                    f"the solver under `torch.no_grad()` if you only need its value."
                )
            cfg = {"params": params, "hkeys": list(hp), "inner_loss": inner_loss, "args": args,
                   "solver": slv, "hvp_mode": hvp_mode, "penalty": penalty,
                   # weak: the result holds the outputs, whose graph holds cfg (no cycle)
                   "result": weakref.ref(result)}
            outs = _ImplicitFunction.apply(cfg, *hp.values())
            for k, o in zip(params, outs):
                dict.__setitem__(result, k, o)
            return result

        return wrapped

    return decorator
