"""Implicit differentiation (IFT) of an inner solution.

At a stationary point ``∇_w L_T(w*, λ) = 0`` of the inner loss,

    dL_V/dλ = ∂_λ L_V − ∇_λ <∂_w L_T, u>,   (H + damping·I) u = ∂_w L_V,   H = ∂²_ww L_T

so a hypergradient is (1) ``b = ∂_w L_V``, (2) ``u = solver(H·, b)``, (3) one mixed
product. One :class:`~bilevel.hvp.HessianOperator` (the inner gradient graph,
built once) serves every product of step (2) and the mixed product of (3).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ._errors import NonFiniteError, all_finite, check_finite_scalar, check_finite_tree, check_like, check_scalar, check_tree
from ._result import Hypergrad, HypergradInfo
from ._tree import Tree, tree_detach
from .distributed import all_reduce_mean_list, check_group
from .operators import CurvatureOperator, make_operator
from .solvers import CG, Solver, SolverInfo

__all__ = ["implicit_hypergrad", "implicit_diff", "ImplicitSolution", "solve_adjoint"]


def solve_adjoint(op: CurvatureOperator, b: Mapping[str, Tensor], solver: Any,
                  u0: Optional[Mapping[str, Tensor]] = None,
                  solver_state: Optional[Mapping[str, Any]] = None) -> tuple[Tree, Optional[SolverInfo]]:
    """Solve ``(H + damping I) u = b`` with ``solver`` on the operator ``op`` (from ``u0`` if given).

    Built-in solvers run on flat buffers; any other callable ``solver(matvec, b) -> tree``
    gets tree-valued ``matvec`` (the seam of API.md). ``solver_state``: a previous solve's
    ``info.extra``; its ``"eigvec"`` (a ``(P,)`` eigenvector estimate) warm-starts the ``λ_max``
    estimate of a solver whose ``solve_flat`` takes ``eigvec0`` (:class:`bilevel.Neumann`).
    """
    if isinstance(solver, Solver):
        kw: dict[str, Any] = {} if u0 is None else {"x0": op.flat.flatten(u0)}
        eigvec = None if solver_state is None else solver_state.get("eigvec")
        if eigvec is not None and "eigvec0" in inspect.signature(solver.solve_flat).parameters:
            kw["eigvec0"] = eigvec
        x, info = solver.solve_flat(op.matvec_flat, op.flat.flatten(b), **kw)
        return op.flat.unflatten(x), info
    if not callable(solver):
        raise TypeError(f"bilevel: expected `solver` to be a bl.Solver or a callable solver(matvec, b) -> tree, "
                        f"got {type(solver).__name__}. Fix: pass e.g. bl.CG(maxiter=20).")
    out = solver(op.matvec, dict(b))
    return dict(out), getattr(out, "info", None)


def _root_vjp(op: CurvatureOperator, b: Mapping[str, Tensor], solver: Any,
              u0: Optional[Mapping[str, Tensor]] = None,
              solver_state: Optional[Mapping[str, Any]] = None) -> tuple[Tree, Tree, Optional[SolverInfo]]:
    """The vector-Jacobian product through the inner solution (JAXopt's ``root_vjp``).

    ``u = (H + damping I)⁻¹ b``, then ``∇_λ <∂_w L_T, u>``: the cotangent ``b`` of ``w*`` pulled
    back to the hyperparameters is minus this mixed product. Returns ``(mixed, u, solver info)``.
    """
    u, info = solve_adjoint(op, b, solver, u0, solver_state)
    return op.mixed_vjp(u), u, info


def _outer_gradients(outer_loss: Callable[..., Tensor], params: Tree, hparams: Tree, args: tuple, group: Any,
                     check_finite: bool, fn: str) -> tuple[Tensor, Tree, Tree, list[str]]:
    """``(L_V, ∂_w L_V, ∂_λ L_V, hparams keys L_V does not use)``, averaged over the ranks of ``group``."""
    w = tree_detach(params, requires_grad=True)
    h = tree_detach(hparams, requires_grad=True)
    with torch.enable_grad():
        lv = check_scalar(outer_loss(w, h, *args), fn, "outer_loss")
        leaves = [*w.values(), *h.values()]
        grads = torch.autograd.grad(lv, leaves, allow_unused=True) if lv.requires_grad else [None] * len(leaves)
    unused = [k for k, g in zip(h, grads[len(w):]) if g is None]
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    # the global batch's loss and gradients; NOTE: checked after the reduction, so that every rank
    # raises (or none does): a rank raising alone would leave the others waiting in a collective.
    lv, *grads = all_reduce_mean_list([lv.detach(), *grads], group)
    if check_finite:
        check_finite_scalar(lv, fn, "outer_loss(params, hparams, *outer_args)")
    return lv, dict(zip(w, grads[:len(w)])), dict(zip(h, grads[len(w):])), unused


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
    penalty_fixed: Optional[Mapping[str, Tensor]] = None,
    group: Any = None,
    u0: Optional[Mapping[str, Tensor]] = None,
    solver_state: Optional[Mapping[str, Any]] = None,
) -> Hypergrad:
    """Hypergradient ``dL_V/dhparams`` at an (approximately) stationary point of the inner loss.

    Args:
        inner_loss: ``inner_loss(params, hparams, *inner_args) -> scalar`` (training loss).
        outer_loss: ``outer_loss(params, hparams, *outer_args) -> scalar`` (validation
            loss; may use ``hparams`` directly or not at all).
        params: tree ``{name: Tensor}``, approximately ``argmin_w inner_loss``.
        hparams: tree ``{name: Tensor}`` of floating-point hyperparameters.
        solver: a linear solver (``bl.CG(on_indefinite="stop")`` by default, ``bl.Neumann``,
            ``bl.Nystrom``, ``bl.Identity``, ``bl.Exact``) or any ``solver(matvec, b) -> tree``. The
            default stops at negative curvature instead of raising (a non-convex network away from
            a minimum) and reports it in ``info.solver.extra["indefinite"]``; pass ``bl.CG()`` to raise.
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
        penalty_fixed: further tensors the penalty reads besides ``params``, held constant (e.g. a
            model's frozen parameters, when ``penalty`` covers the whole model).
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
        solver_state: what a previous call's solver learned, ``hg.info.solver.extra``: with
            ``bl.Neumann(alpha=None)`` its ``"eigvec"`` warm-starts the ``λ_max`` estimate, so the
            step ``α = 1/λ_max`` costs ``refresh_iters`` products (1) instead of ``power_iters``
            (20). Other solvers ignore it.

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
    solver = CG(on_indefinite="stop") if solver is None else solver
    group = check_group(group, fn)
    if u0 is not None:
        u0 = check_tree(u0, fn, "u0")
        check_like(params, u0, fn, "params", "u0")
        if not getattr(solver, "warm_startable", False):
            raise TypeError(f"{fn}: expected a solver that takes a starting point (bl.CG, bl.Neumann) with u0=, got "
                            f"{type(solver).__name__}. Fix: solver=bl.CG(...), or u0=None.")
    if check_finite:
        for name, tree in (("params", params), ("hparams", hparams), ("u0", u0 or {})):
            check_finite_tree(tree, fn, name)

    # (1) b = ∂_w L_V and the direct term ∂_λ L_V.
    lv, b, direct, outer_unused = _outer_gradients(outer_loss, params, hparams, outer_args, group, check_finite, fn)
    # (2) u = (H + damping I)⁻¹ b on one reused inner-gradient graph, (3) the mixed product ∇_λ <∂_w L_T, u>.
    op = make_operator(inner_loss, params, hparams, inner_args, mode=hvp_mode, penalty=penalty, fixed=penalty_fixed,
                       group=group, name=fn)
    if check_finite:
        check_finite_scalar(op.loss, fn, "inner_loss(params, hparams, *inner_args)")
    unused = [k for k in outer_unused if k not in op.hparams_in_loss()]
    if unused:
        raise ValueError(
            f"{fn}: expected every hyperparameter to reach inner_loss (or penalty) or outer_loss, got {unused} "
            f"reaching neither (their hypergradient would be zero forever). Fix: remove them from hparams, or "
            f"read them as hparams[key] inside a loss (a tensor captured from elsewhere is not the one passed).")
    mixed, u, sinfo = _root_vjp(op, b, solver, u0, solver_state)
    # dL_V/dλ = ∂_λ L_V − ∇_λ <∂_w L_T, u>
    hg = {k: direct[k] - mixed[k] for k in hparams}
    if check_finite:
        check_finite_tree(hg, fn, "the hypergradient")
    info = HypergradInfo(float(op.grad_norm), float(op.loss), float(lv), sinfo, op.mode,
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

    def __init__(self, tree: Mapping[str, Tensor], backward: Optional[_ImplicitBackward] = None) -> None:
        super().__init__(tree)
        self._backward = backward

    @property
    def info(self) -> Optional[HypergradInfo]:
        """The diagnostics of the last backward pass through this solution (``None`` before one)."""
        return None if self._backward is None else self._backward.info


@dataclass
class _ImplicitBackward:
    """What the backward pass of one :func:`implicit_diff` call needs, and the diagnostics it returns."""

    params: Tree
    inner_loss: Callable[..., Tensor]
    args: tuple
    solver: Any
    hvp_mode: str
    penalty: Optional[Callable[..., Tensor]]
    info: Optional[HypergradInfo] = None

    def __call__(self, hparams: Tree, cotangent: Tree) -> Tree:
        """``dL/dλ = −∇_λ <∂_w L_T, u>`` with ``(H + damping I) u = dL/dw*`` (the cotangent)."""
        fn = "bilevel.implicit_diff (backward)"
        # NOTE: grad mode is off inside backward; the operators turn it on for their products.
        op = make_operator(self.inner_loss, self.params, hparams, self.args, mode=self.hvp_mode,
                           penalty=self.penalty, name=fn)
        mixed, _, sinfo = _root_vjp(op, cotangent, self.solver)
        if not all_finite(*mixed.values()):
            raise NonFiniteError(f"{fn}: the implicit gradient holds NaN/Inf (inner gradient norm "
                                 f"{float(op.grad_norm):.3e}). Fix: check inner_loss at the solution, add damping.")
        self.info = HypergradInfo(float(op.grad_norm), float(op.loss), float("nan"), sinfo, op.mode)
        return {k: -m for k, m in mixed.items()}


class _ImplicitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, backward: _ImplicitBackward, hkeys: list, *hvals: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.backward_fn, ctx.hkeys = backward, hkeys
        ctx.save_for_backward(*hvals)
        return tuple(p.detach().clone() for p in backward.params.values())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grad_out: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        params = ctx.backward_fn.params
        cotangent = {k: (torch.zeros_like(p) if g is None else g) for (k, p), g in zip(params.items(), grad_out)}
        grads = ctx.backward_fn(dict(zip(ctx.hkeys, ctx.saved_tensors)), cotangent)
        return (None, None, *(grads[k] if need else None for k, need in zip(ctx.hkeys, ctx.needs_input_grad[2:])))


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
            if not torch.is_grad_enabled():
                return ImplicitSolution(params)
            if not need:
                raise ValueError(
                    f"{fn}: expected at least one hparams tensor with requires_grad=True (the IFT gradient "
                    f"flows to them), got none among {list(hp)}. Fix: `hparams[k].requires_grad_()`, or call "
                    f"the solver under `torch.no_grad()` if you only need its value."
                )
            backward = _ImplicitBackward(params, inner_loss, args, slv, hvp_mode, penalty)
            outs = _ImplicitFunction.apply(backward, list(hp), *hp.values())
            return ImplicitSolution(dict(zip(params, outs)), backward)

        return wrapped

    return decorator
