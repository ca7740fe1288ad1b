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
import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._errors import NonFiniteError, ShapeError, all_finite, check_finite_scalar, check_finite_tree, check_like, check_scalar, check_tree
from ._result import Hypergrad, HypergradInfo
from ._second_order import with_twice_differentiable_kernels
from ._tree import Flat, Tree, tree_detach, tree_norm
from .distributed import all_reduce_mean_list, check_group
from .operators import CurvatureOperator, make_operator
from .solvers import CG, GMRES, Nystrom, Solver, SolverInfo

__all__ = ["implicit_hypergrad", "implicit_diff", "implicit_root", "implicit_fixed_point", "ImplicitSolution",
           "solve_adjoint"]


def solve_adjoint(op: CurvatureOperator, b: Mapping[str, Tensor], solver: Any,
                  u0: Optional[Mapping[str, Tensor]] = None,
                  solver_state: Optional[Mapping[str, Any]] = None) -> tuple[Tree, Optional[SolverInfo]]:
    """Solve ``(H + damping I) u = b`` with ``solver`` on the operator ``op`` (from ``u0`` if given).

    Built-in solvers run on flat buffers; any other callable ``solver(matvec, b) -> tree``
    gets tree-valued ``matvec`` (the seam of API.md). ``solver_state``: a previous solve's
    ``info.extra``; its ``"eigvec"`` (a ``(P,)`` eigenvector estimate) warm-starts the ``λ_max``
    estimate of a solver whose ``solve_flat`` takes ``eigvec0`` (:class:`bilevel.Neumann`).
    """
    kw: dict[str, Any] = {}
    eigvec = None if solver_state is None else solver_state.get("eigvec")
    if eigvec is not None and isinstance(solver, Solver) and "eigvec0" in inspect.signature(solver.solve_flat).parameters:
        kw["eigvec0"] = eigvec
    # a Hessian (or its Gauss-Newton model) is its own transpose
    return _solve(solver, op.flat, op.matvec_flat, b, u0, matvec=op.matvec, rmatvec_flat=op.matvec_flat, **kw)


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
                     check_finite: bool, fn: str) -> tuple[Tensor, Tree, dict[str, Optional[Tensor]], list[str]]:
    """``(L_V, ∂_w L_V, ∂_λ L_V (None where L_V does not read a key), hparams keys L_V does not use)``,
    averaged over the ranks of ``group``."""
    w = tree_detach(params, requires_grad=True)
    h = tree_detach(hparams, requires_grad=True)
    with torch.enable_grad():
        lv = check_scalar(outer_loss(w, h, *args), fn, "outer_loss")
        leaves = [*w.values(), *h.values()]
        grads = torch.autograd.grad(lv, leaves, allow_unused=True) if lv.requires_grad else [None] * len(leaves)
    unused = [k for k, g in zip(h, grads[len(w):]) if g is None]
    used = [(k, g) for k, g in zip(h, grads[len(w):]) if g is not None]
    # NOTE: ∂_w L_V goes straight into one flat buffer, and the tree returned is views of it: the
    # solvers take that buffer as it is (Flat.as_flat), where a tree of separate tensors would be
    # copied into one, two weight-sized vectors alive through the whole solve instead of one.
    flat = Flat(w)
    b_flat = flat.flatten_list(grads[:len(w)])
    del grads
    # the global batch's loss and gradients; NOTE: checked after the reduction, so that every rank
    # raises (or none does): a rank raising alone would leave the others waiting in a collective.
    # A hyperparameter outer_loss does not read has no direct term (None, not a tree of zeros).
    lv, b_flat, *direct = all_reduce_mean_list([lv.detach(), b_flat, *(g for _, g in used)], group)
    if check_finite:
        check_finite_scalar(lv, fn, "outer_loss(params, hparams, *outer_args)")
    reduced = dict(zip((k for k, _ in used), direct))
    return lv, flat.unflatten(b_flat), {k: reduced.get(k) for k in h}, unused


def _resolve_args(args: Any, fn: str, name: str) -> tuple:
    if isinstance(args, tuple):
        return args
    if isinstance(args, list):
        return tuple(args)
    raise TypeError(f"{fn}: expected `{name}` to be a tuple of extra arguments, got {type(args).__name__}. "
                    f"Fix: wrap a single argument as ({name}_value,).")


@with_twice_differentiable_kernels
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
        hvp_mode: ``"auto"`` | ``"reverse"`` | ``"forward"`` (exact Hessian products, see
            :mod:`bilevel.hvp`) | ``"gauss_newton"``: the generalized Gauss-Newton ``Jᵀ H_ℓ J``
            replaces ``H`` in the solve (positive semi-definite for a loss convex in the network
            output, so CG never meets negative curvature: the usual choice on a non-convex net away
            from a minimum). ``inner_loss`` must then return one output loss,
            ``bl.losses.cross_entropy(logits, y)``, ``bl.losses.mse(out, y)`` or
            ``bl.losses.OutputLoss(fn)(out, ...)``, with separable regularizers in ``penalty=``. The
            mixed term ``∇_λ <∂_w L_T, u>`` stays exact.
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
    # NOTE: taken before the solve, while the fewest weight-sized vectors are alive (a penalty's
    # gradient is only summed in here, see operators._Penalized)
    inner_grad_norm = float(op.grad_norm)
    unused = [k for k in outer_unused if k not in op.hparams_in_loss()]
    if unused:
        raise ValueError(
            f"{fn}: expected every hyperparameter to reach inner_loss (or penalty) or outer_loss, got {unused} "
            f"reaching neither (their hypergradient would be zero forever). Fix: remove them from hparams, or "
            f"read them as hparams[key] inside a loss (a tensor captured from elsewhere is not the one passed).")
    mixed, u, sinfo = _root_vjp(op, b, solver, u0, solver_state)
    # dL_V/dλ = ∂_λ L_V − ∇_λ <∂_w L_T, u>
    hg = {k: -mixed[k] if direct[k] is None else direct[k] - mixed[k] for k in hparams}
    if check_finite:
        check_finite_tree(hg, fn, "the hypergradient")
    info = HypergradInfo(inner_grad_norm, float(op.loss), float(lv), sinfo, op.mode,
                         {k: v.detach() for k, v in u.items()})
    return Hypergrad(hg, info)


# -- implicit differentiation of a solver: minimizers, roots and fixed points ------------------------
# NOTE: how the torch.func support is built. A decorated call runs the user's solver on detached
# hyperparameters (so its iterations build no graph; under vmap the solver itself is vmapped), then
# passes the solution through `_Solution`, an identity whose derivative rules are the IFT:
#   backward (VJP):  J_xᵀ u = cotangent,   cotangent of λ = −(∂F/∂λ)ᵀ u      → `_Adjoint`
#   jvp (JVP):       J_x y = −(∂F/∂λ) t,   tangent of x* = y                → `_Tangent`
# with F = ∇_x inner_loss (J_x = H, symmetric) for `implicit_diff`, F itself for roots. `_Solution`
# only clones, so torch.func may vmap it (generate_vmap_rule). Its rules call `_Adjoint` / `_Tangent`,
# whose forward runs a linear solver (Python loops, host syncs), which vmap cannot trace: their own
# vmap rule moves the batch to the front (`_run`). With a batchable solver (bl.CG, bl.Exact) the B
# items are solved together (`_Items`): F of the batch is torch.func.vmap(F) over the items, and as
# item i reads only its own (x*_i, λ_i, data_i), J_x of the batch is block diagonal, so ONE product
# on the batch's graph is the B items' products, and CG runs the B systems in lockstep (per-item
# steps and stopping masks, `CG.solve_flat_batched`). Otherwise (another solver, a loss vmap cannot
# batch, Gauss-Newton) it solves one item at a time, reusing one linearization while the point
# (x*, λ, data) is the same (jacrev/jacfwd batch only the cotangents), and says so in the record.
# A solver that vmap cannot batch runs item by item the same way (`_Itemwise`).
# Every tensor the rules read (x*, λ, the tensors among *args/**kwargs) is an input of the Functions,
# never captured, as torch.func requires. Second derivatives through the rules are not supported.


class _Record:
    """Where the rules of a decorated call leave the diagnostics of their last solve.

    ``notes``: one line per fallback taken (a part that ran item by item under vmap). A record
    with a ``parent`` (the decorated function's own record) copies everything there too.
    """

    __slots__ = ("info", "notes", "parent", "unbatchable", "why")

    def __init__(self, parent: Optional["_Record"] = None) -> None:
        self.info: Optional[HypergradInfo] = None
        self.notes: list[str] = []
        self.parent = parent
        self.unbatchable = False      # the solver failed under vmap once: run it item by item from then on
        self.why = ""

    def set(self, info: HypergradInfo) -> None:
        self.info = info
        if self.parent is not None:
            self.parent.set(info)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
        if self.parent is not None:
            self.parent.note(text)


class ImplicitSolution(dict):
    """The params tree returned by an :func:`implicit_diff`-wrapped solver (or a root / fixed-point one).

    ``.info`` is ``None`` until a derivative rule runs through it; then it holds the
    :class:`HypergradInfo` of the last solve (inner gradient norm, or ``‖F(x*)‖`` for roots, and the
    solver's diagnostics). Under ``torch.func.vmap``/``jacrev``/``jacfwd`` the returned tree is rebuilt
    by torch.func and ``.info`` is ``None``.

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

    def __init__(self, tree: Mapping[str, Tensor], record: Optional[_Record] = None) -> None:
        super().__init__(tree)
        self._record = record

    @property
    def info(self) -> Optional[HypergradInfo]:
        """The diagnostics of the last solve of a derivative rule through this solution (``None`` before one)."""
        return None if self._record is None else self._record.info


# torch.func flattens what a transformed function returns: a dict subclass must be a registered node.
pytree.register_pytree_node(ImplicitSolution, lambda d: (list(d.values()), list(d.keys())),
                            lambda values, keys: ImplicitSolution(dict(zip(keys, values))),
                            serialized_type_name="bilevel.ImplicitSolution")


@dataclass(frozen=True, eq=False)
class _Problem:
    """Everything the rules of one decorated call need besides tensors (shared by its batch levels).

    ``kind``: ``"min"`` (``fn`` is an inner loss, ``F = ∇_x fn``) or ``"root"`` (``fn`` is ``F``).
    ``leaves``/``tensor_at``/``spec``: the pytree of ``(args, kwargs)`` with its tensors taken out.
    ``batch``: leading batch dims of every tensor input (one per vmap level the rules were batched by).
    """

    kind: str
    fn: Callable[..., Any]
    solver: Any
    hvp_mode: str
    penalty: Optional[Callable[..., Tensor]]
    symmetric: bool
    name: str
    xkeys: tuple
    hkeys: tuple
    leaves: tuple
    tensor_at: tuple
    spec: Any
    record: _Record
    batch: tuple = ()

    @property
    def nx(self) -> int:
        return len(self.xkeys)

    @property
    def nh(self) -> int:
        return len(self.hkeys)

    @property
    def na(self) -> int:
        return len(self.tensor_at)

    def batched(self, size: int) -> "_Problem":
        return replace(self, batch=(size, *self.batch))

    def linearize(self, tensors: Sequence[Tensor]) -> Any:
        """The Jacobian ``J_x`` at the point ``(x*, λ, arg tensors)`` as an operator (an object with
        ``flat``, ``matvec_flat`` (``J_x v``), ``mixed_vjp``, ``mixed_jvp``, ``grad_norm``, ``loss``, ``mode``)."""
        x = dict(zip(self.xkeys, tensors[:self.nx]))
        h = dict(zip(self.hkeys, tensors[self.nx:self.nx + self.nh]))
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_at, tensors[self.nx + self.nh:]):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        if self.kind == "root":
            return _RootJacobian(self.fn, x, h, args, kwargs, self.name)
        f = self.fn if not kwargs else functools.partial(_with_kwargs, self.fn, kwargs)
        return make_operator(f, x, h, args, mode=self.hvp_mode, penalty=self.penalty, name=self.name)

    def linearize_items(self, tensors: Sequence[Tensor]) -> "_Items":
        """``J_x`` of ``B`` items at once: ``tensors = (x*, λ, arg tensors)``, each with a leading dim ``B``.

        The loss (or residual) of the batch is ``torch.func.vmap`` of ``fn`` over the items (an arg
        tensor that is the same for every item, an expanded one, is passed once, unbatched). Item
        ``i`` reads only ``x*_i`` and ``λ_i``, so the batch's ``J_x`` is block diagonal and one product
        on its graph is the ``B`` items' products. Raises whatever vmap raises on ``fn``.
        """
        size = tensors[0].shape[0]
        # NOTE: x* and λ as separate memory per item, also where they are one expanded tensor (jacrev's
        # batch of cotangents at one point): the items' derivatives must not land in shared memory.
        x = {k: t.contiguous() for k, t in zip(self.xkeys, tensors[:self.nx])}
        h = {k: t.contiguous() for k, t in zip(self.hkeys, tensors[self.nx:self.nx + self.nh])}
        shared = [size > 1 and t.dim() > 0 and t.stride(0) == 0 for t in tensors[self.nx + self.nh:]]
        data = tuple(t[0] if s else t for t, s in zip(tensors[self.nx + self.nh:], shared))

        def item(xi: Tree, hi: Tree, *ti: Tensor) -> Any:
            leaves = list(self.leaves)
            for i, t in zip(self.tensor_at, ti):
                leaves[i] = t
            args, kwargs = pytree.tree_unflatten(leaves, self.spec)
            out = self.fn(xi, hi, *args, **kwargs)
            return check_scalar(out, self.name, "inner_loss(params, hparams, *args)") if self.kind == "min" else out

        batch = torch.func.vmap(item, in_dims=(0, 0, *(None if s else 0 for s in shared)))
        if self.kind == "root":
            return _Items(_RootJacobian(batch, x, h, data, {}, self.name), size)
        penalty = None if self.penalty is None else (lambda p, hh: torch.func.vmap(self.penalty)(p, hh).sum())
        op = make_operator(lambda p, hh, *ti: batch(p, hh, *ti).sum(), x, h, data, mode=self.hvp_mode,
                           penalty=penalty, name=self.name)
        return _Items(op, size)

    def products(self, lin: Any) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """``(v ↦ J_x v, v ↦ J_xᵀ v)``: for a symmetric ``J_x`` (a Hessian, or asserted) one product serves both,
        the one that reuses a graph (a root's ``J_xᵀ v``)."""
        if self.kind == "min":
            return lin.matvec_flat, lin.matvec_flat
        return (lin.rmatvec_flat if self.symmetric else lin.matvec_flat), lin.rmatvec_flat


def _with_kwargs(f: Callable[..., Tensor], kwargs: Mapping[str, Any], p: Tree, h: Tree, *args: Any) -> Tensor:
    return f(p, h, *args, **kwargs)


def _check_residual(x: Mapping[str, Tensor], res: Any, fn: str, what: str) -> Tree:
    """``res`` must be a tree with the keys, shapes and dtypes of ``x`` (the residual lives where x lives)."""
    if not isinstance(res, Mapping):
        raise ShapeError(f"{fn}: expected {what} to return a tree {{name: Tensor}} with the keys and shapes of x "
                         f"({ {k: tuple(v.shape) for k, v in x.items()} }), got {type(res).__name__}. Fix: return "
                         f"one residual tensor per entry of x, e.g. {{k: ... for k in x}}.")
    check_like(x, res, fn, "x (the solution)", what)
    return dict(res)


class _RootJacobian:
    """``J_x = ∂F/∂x`` of a residual ``F(x, hparams, *args)`` at one point, by products only.

    All four products are reverse passes on one graph of ``F``: ``rmatvec_flat`` (``J_xᵀ v``) and
    ``mixed_vjp`` (``(∂F/∂λ)ᵀ u``) directly; ``matvec_flat`` (``J_x v``) and ``mixed_jvp``
    (``(∂F/∂λ) t``) as the derivative in a dummy cotangent ``z`` of ``J_xᵀ z`` (the double-vjp trick:
    ``J v = ∇_z <Jᵀ z, v>``), so no forward-mode formulas are needed.
    """

    mode = "reverse"

    def __init__(self, F: Callable[..., Any], x: Tree, h: Tree, args: tuple, kwargs: dict, name: str) -> None:
        self.x, self.h = tree_detach(x, requires_grad=True), tree_detach(h, requires_grad=True)
        self.flat = Flat(self.x)
        with torch.enable_grad():
            res = _check_residual(self.x, F(self.x, self.h, *args, **kwargs), name, "F(x, hparams, *args)")
        self._live = [(k, r) for k, r in res.items() if r.requires_grad]
        self._transposed: dict[str, tuple] = {}
        self.grad = {k: r.detach() for k, r in res.items()}      # F(x*): the residual, in the place of a gradient
        self.grad_norm = tree_norm(self.grad)
        self.loss = torch.tensor(float("nan"))

    def _vjp(self, inputs: Tree, cot: Sequence[Tensor], create_graph: bool = False) -> Tree:
        """``(∂F/∂inputs)ᵀ cot`` (keys of ``inputs``; zeros where F does not depend on one)."""
        grads: Sequence[Optional[Tensor]] = [None] * len(inputs)
        if self._live:
            with torch.enable_grad():
                grads = torch.autograd.grad([r for _, r in self._live], list(inputs.values()), grad_outputs=list(cot),
                                            retain_graph=True, create_graph=create_graph, allow_unused=True)
        return {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(inputs.items(), grads)}

    def _jvp(self, which: str, tangent: Mapping[str, Tensor]) -> Tree:
        """``(∂F/∂which) tangent`` = ``∇_z <(∂F/∂which)ᵀ z, tangent>``; the graph of ``(∂F/∂which)ᵀ z`` is built once."""
        inputs = self.x if which == "x" else self.h
        if which not in self._transposed:
            z = [torch.zeros_like(r, requires_grad=True) for _, r in self._live]
            self._transposed[which] = (z, self._vjp(inputs, z, create_graph=True))
        z, back = self._transposed[which]
        pairs = [(b, tangent[k]) for k, b in back.items() if b.requires_grad]
        out: Sequence[Optional[Tensor]] = [None] * len(z)
        if pairs:
            with torch.enable_grad():
                out = torch.autograd.grad([b for b, _ in pairs], z, grad_outputs=[t for _, t in pairs],
                                          retain_graph=True, allow_unused=True)
        live = {k: o for (k, _), o in zip(self._live, out)}
        return {k: torch.zeros_like(v) if live.get(k) is None else live[k] for k, v in self.x.items()}

    def rmatvec_flat(self, v: Tensor) -> Tensor:
        cot = self.flat.unflatten(v)
        return self.flat.flatten(self._vjp(self.x, [cot[k] for k, _ in self._live]))

    def matvec_flat(self, v: Tensor) -> Tensor:
        return self.flat.flatten(self._jvp("x", self.flat.unflatten(v)))

    def mixed_vjp(self, u: Mapping[str, Tensor]) -> Tree:
        return self._vjp(self.h, [u[k] for k, _ in self._live])

    def mixed_jvp(self, t: Mapping[str, Tensor]) -> Tree:
        return self._jvp("h", t)


class _ItemsFlat:
    """The layout of a tree whose leaves share a leading batch dim ``B``, as a ``(B, P)`` matrix (row i: item i)."""

    def __init__(self, fl: Flat, size: int) -> None:
        self.size, self.keys = size, fl.keys
        self.shapes = [s[1:] for s in fl.shapes]
        self.numels = [math.prod(s) for s in self.shapes]

    def flatten(self, tree: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([tree[k].reshape(self.size, -1) for k in self.keys], 1)

    def unflatten(self, mat: Tensor) -> Tree:
        cols = torch.split(mat, self.numels, 1)
        return {k: c.reshape(self.size, *s) for k, c, s in zip(self.keys, cols, self.shapes)}


class _Items:
    """A linearization of ``B`` items on one block-diagonal operator ``lin`` (from
    :meth:`_Problem.linearize_items`), with the interface of a single one on ``(B, P)`` matrices."""

    def __init__(self, lin: Any, size: int) -> None:
        self.lin, self.size, self.mode = lin, size, lin.mode
        self.flat = _ItemsFlat(lin.flat, size)
        rows = self.flat.flatten(lin.grad)
        self.grad_norms = torch.linalg.vector_norm(rows, dim=1)
        self.grad_norm = self.grad_norms.max()              # the least stationary item
        self.loss = lin.loss / size                         # the items' mean (nan for a root)

    def _through(self, product: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
        fl = self.lin.flat
        return self.flat.flatten(fl.unflatten(product(fl.flatten(self.flat.unflatten(v)))))

    def matvec_flat(self, v: Tensor) -> Tensor:
        return self._through(self.lin.matvec_flat, v)

    def rmatvec_flat(self, v: Tensor) -> Tensor:
        return self._through(self.lin.rmatvec_flat, v)

    def mixed_vjp(self, u: Mapping[str, Tensor]) -> Tree:
        return self.lin.mixed_vjp(u)

    def mixed_jvp(self, t: Mapping[str, Tensor]) -> Tree:
        return self.lin.mixed_jvp(t)


def _solve_items(solver: Solver, flat: _ItemsFlat, matvec_flat: Callable[[Tensor], Tensor], b: Mapping[str, Tensor]
                 ) -> tuple[Tree, SolverInfo]:
    """``B`` systems in one batched solve; one :class:`SolverInfo` for all (the worst item's figures),
    the items' own in ``extra["items"]``."""
    x, infos = solver.solve_flat_batched(matvec_flat, flat.flatten(b))
    worst = max(range(len(infos)), key=lambda i: infos[i].relative_residual)
    extra = {**infos[worst].extra, "vmap": f"batched: {len(infos)} systems in lockstep", "items": infos}
    info = SolverInfo(infos[0].solver, max(i.iterations for i in infos), infos[0].matvecs, infos[worst].residual_norm,
                      infos[worst].b_norm, all(i.converged for i in infos), extra)
    return flat.unflatten(x), info


def _solve(solver: Any, flat: Flat, matvec_flat: Callable[[Tensor], Tensor], b: Mapping[str, Tensor],
           u0: Optional[Mapping[str, Tensor]] = None, matvec: Optional[Callable[[Tree], Tree]] = None,
           rmatvec_flat: Optional[Callable[[Tensor], Tensor]] = None, **solver_kw: Any
           ) -> tuple[Tree, Optional[SolverInfo]]:
    """``A x = b`` with ``A`` given by ``matvec_flat`` (and ``Aᵀ`` by ``rmatvec_flat``, for solvers that
    use it): built-in solvers on flat buffers (``solver_kw``: further keywords of ``solve_flat``), any
    other callable ``solver(matvec, b) -> tree`` on trees; a batch of items (``_ItemsFlat``) in one batched solve."""
    if isinstance(flat, _ItemsFlat):
        return _solve_items(solver, flat, matvec_flat, b)
    if isinstance(solver, Solver):
        kw: dict[str, Any] = dict(solver_kw) if u0 is None else {**solver_kw, "x0": flat.flatten(u0)}
        if solver.uses_rmatvec and rmatvec_flat is not None:
            kw["rmatvec"] = rmatvec_flat
        x, info = solver.solve_flat(matvec_flat, flat.as_flat(b), **kw)      # solvers never write b
        return flat.unflatten(x), info
    if not callable(solver):
        raise TypeError(f"bilevel: expected `solver` to be a bl.Solver or a callable solver(matvec, b) -> tree, "
                        f"got {type(solver).__name__}. Fix: pass e.g. bl.CG(maxiter=20).")
    tree_mv = matvec or (lambda v: flat.unflatten(matvec_flat(flat.flatten(v))))
    out = solver(tree_mv, dict(b))
    return dict(out), getattr(out, "info", None)


def _finite(tree: Tree, lin: Any, fn: str, what: str) -> Tree:
    if not all_finite(*tree.values()):
        raise NonFiniteError(f"{fn}: the {what} holds NaN/Inf (optimality residual norm {float(lin.grad_norm):.3e} at "
                             f"the solution). Fix: check the solver converged and the loss / residual there; add damping.")
    return tree


def _adjoint_rule(problem: _Problem, lin: Any, cot: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """VJP: ``J_xᵀ u = cotangent`` (``(H + damping I) u`` for minimizers), then ``−(∂F/∂λ)ᵀ u``."""
    forward, transposed = problem.products(lin)
    u, sinfo = _solve(problem.solver, lin.flat, transposed, dict(zip(problem.xkeys, cot)), rmatvec_flat=forward)
    mixed = _finite(lin.mixed_vjp(u), lin, problem.name, "implicit gradient")
    problem.record.set(HypergradInfo(float(lin.grad_norm), float(lin.loss), float("nan"), sinfo, lin.mode))
    return tuple(-mixed[k] for k in problem.hkeys)


def _tangent_rule(problem: _Problem, lin: Any, tangent: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """JVP (JAXopt's ``root_jvp``): ``J_x y = −(∂F/∂λ) t``; ``y`` is the tangent of ``x*``."""
    rhs = lin.mixed_jvp(dict(zip(problem.hkeys, tangent)))
    forward, transposed = problem.products(lin)
    y, sinfo = _solve(problem.solver, lin.flat, forward, {k: -v for k, v in rhs.items()}, rmatvec_flat=transposed)
    y = _finite(y, lin, problem.name, "implicit tangent")
    problem.record.set(HypergradInfo(float(lin.grad_norm), float(lin.loss), float("nan"), sinfo, lin.mode))
    return tuple(y[k] for k in problem.xkeys)


def _items_unsupported(problem: _Problem) -> Optional[str]:
    """Why the items of a batch cannot be solved together (``None``: they can)."""
    if not getattr(problem.solver, "batchable", False):
        return f"{getattr(problem.solver, 'name', type(problem.solver).__name__)} has no batched solve"
    if problem.hvp_mode == "gauss_newton":
        return "hvp_mode='gauss_newton' is not batched"
    return None


def _run_items(problem: _Problem, tensors: Sequence[Tensor], lead: int,
               rule: Callable[..., tuple[Tensor, ...]]) -> Union[tuple[Tensor, ...], str]:
    """``rule`` on all the items of ``problem.batch`` at once, or why it cannot (noted in the record)."""
    why = _items_unsupported(problem)
    size = math.prod(problem.batch)
    flat = [t.reshape(size, *t.shape[len(problem.batch):]) for t in tensors]
    if why is None:
        try:
            lin = problem.linearize_items(flat[lead:])
        except Exception as err:        # noqa: BLE001 -- anything vmap refuses; the item loop re-raises real errors
            why = f"torch.func.vmap cannot batch the loss ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    if why is not None:
        problem.record.note(f"{problem.name}: solved the {size} vmapped items one by one: {why}.")
        return why
    outs = rule(problem, lin, flat[:lead])
    return tuple(o.reshape(*problem.batch, *o.shape[1:]) for o in outs)


@with_twice_differentiable_kernels
def _run(problem: _Problem, tensors: Sequence[Tensor], lead: int, rule: Callable[..., tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """``rule`` on ``tensors = (lead vectors, x*, λ, arg tensors)`` at every item of ``problem.batch``:
    all items at once where the solver and the loss allow it, else one at a time. The derivative
    rules of ``implicit_diff``/``implicit_root``/``implicit_fixed_point`` (backward, jvp, vmap) all
    run here, inside :func:`~bilevel.twice_differentiable_kernels`."""
    if not problem.batch:
        return rule(problem, problem.linearize(tensors[lead:]), tensors[:lead])
    together = _run_items(problem, tensors, lead, rule)
    if not isinstance(together, str):
        return together
    outs, key, lin = [], None, None
    for idx in itertools.product(*(range(n) for n in problem.batch)):
        item = [t[idx] for t in tensors]
        # an expanded (unbatched) point gives the same memory at every index: linearize it once
        here = tuple((t.data_ptr(), t.stride()) for t in item[lead:])
        if here != key:
            lin, key = problem.linearize(item[lead:]), here
        outs.append(rule(problem, lin, item[:lead]))
    info = problem.record.info
    if info is not None and isinstance(info.solver, SolverInfo):    # the last item's, and why it was alone
        info.solver.extra["vmap"] = f"per item: {together}"
    return tuple(torch.stack(col).reshape(*problem.batch, *col[0].shape) for col in zip(*outs))


def _to_front(tensors: Sequence[Tensor], in_dims: Sequence[Optional[int]], size: int) -> list[Tensor]:
    return [t.movedim(d, 0) if d is not None else t.expand(size, *t.shape) for t, d in zip(tensors, in_dims)]


def _second_order(ctx: Any, *grads: Any) -> Any:
    raise NotImplementedError(f"{ctx.name}: expected first derivatives only; differentiating the implicit "
                              f"gradient again (a Hessian in hparams) is not supported. Fix: use finite differences "
                              f"of the hypergradient, or unrolled differentiation (bl.unrolled_hypergrad).")


def _rule_function(name: str, rule: Callable[..., tuple[Tensor, ...]], lead: Callable[[_Problem], int]) -> Any:
    """An ``autograd.Function`` running ``rule`` (through :func:`_run`) whose vmap rule adds a batch level."""

    class Rule(torch.autograd.Function):
        @staticmethod
        def forward(problem: _Problem, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
            return _run(problem, tensors, lead(problem), rule)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
            ctx.name = inputs[0].name

        backward = staticmethod(_second_order)  # type: ignore[assignment]

        @staticmethod
        def vmap(info: Any, in_dims: tuple, problem: _Problem, *tensors: Tensor) -> tuple[tuple[Tensor, ...], tuple]:  # type: ignore[override]
            out = Rule.apply(problem.batched(info.batch_size), *_to_front(tensors, in_dims[1:], info.batch_size))
            return out, (0,) * len(out)

    Rule.__name__ = Rule.__qualname__ = name
    return Rule


#: ``(cotangents of x*, x*, λ, arg tensors) -> cotangents of λ`` (:func:`_adjoint_rule`)
_Adjoint = _rule_function("_Adjoint", _adjoint_rule, lambda p: p.nx)
#: ``(tangents of λ, x*, λ, arg tensors) -> tangents of x*`` (:func:`_tangent_rule`)
_Tangent = _rule_function("_Tangent", _tangent_rule, lambda p: p.nh)


class _Solution(torch.autograd.Function):
    """``(x*, λ, arg tensors) -> x*`` (a copy) whose derivative in λ is the implicit one."""

    generate_vmap_rule = True

    @staticmethod
    def forward(problem: _Problem, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(x.clone() for x in tensors[:problem.nx])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.problem = inputs[0]
        ctx.save_for_backward(*inputs[1:])
        ctx.save_for_forward(*inputs[1:])

    @staticmethod
    def backward(ctx: Any, *cots: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        p, saved = ctx.problem, ctx.saved_tensors
        cots = tuple(torch.zeros_like(x) if c is None else c for c, x in zip(cots, saved[:p.nx]))
        dh = _Adjoint.apply(p, *cots, *saved)
        return (None, *(None,) * p.nx, *dh, *(None,) * p.na)

    @staticmethod
    def jvp(ctx: Any, _problem: None, *tangents: Optional[Tensor]) -> tuple[Tensor, ...]:  # type: ignore[override]
        p, saved = ctx.problem, ctx.saved_tensors
        hs = saved[p.nx:p.nx + p.nh]
        th = tuple(torch.zeros_like(h) if t is None else t for t, h in zip(tangents[p.nx:p.nx + p.nh], hs))
        return _Tangent.apply(p, *th, *saved)


def _transformed() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is active around this call."""
    # NOTE: torch has no public query for this; the interpreter stack is what torch.func itself reads.
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _detached(tree: Mapping[str, Tensor]) -> Tree:
    # NOTE: not tree_detach: requires_grad_(False) raises inside torch.func transforms.
    return {k: v.detach() for k, v in tree.items()}


def _has_tangent(t: Tensor) -> bool:
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def _call_solver(solve: Callable[..., Any], hparams: Tree, args: tuple, kwargs: dict) -> Any:
    with torch.enable_grad():
        return solve(hparams, *args, **kwargs)


def _run_solver(solve: Callable[..., Any], hparams: Tree, args: tuple, kwargs: dict, fn: str, record: _Record) -> Any:
    """The user's solver; under ``torch.func.vmap`` batched, or item by item where vmap cannot batch it."""
    top = record if record.parent is None else record.parent
    if not (top.unbatchable and _transformed()):
        try:
            return _call_solver(solve, hparams, args, kwargs)
        except RuntimeError as err:
            if not (_transformed() and "vmap" in str(err)):
                raise
            top.unbatchable = True
            top.why = str(err).splitlines()[0][:200]
    record.note(f"{fn}: the solver ran item by item under torch.func.vmap, which cannot batch it ({top.why}). A "
                f"batchable solver (fixed iteration counts, torch.where instead of `if tensor`, no .item()) runs "
                f"the items together, faster.")
    leaves, spec = pytree.tree_flatten((hparams, args, kwargs))
    at = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor))
    call = _SolverCall(solve, tuple(None if i in at else leaf for i, leaf in enumerate(leaves)), at, spec)
    outs = _Itemwise.apply(call, *(leaves[i] for i in at))
    return call.rebuild(outs)


class _SolverCall:
    """One call of a user's solver with its tensors taken out (for :class:`_Itemwise`); remembers how
    to rebuild what the solver returns (its tensors become the Function's outputs)."""

    def __init__(self, solve: Callable[..., Any], leaves: tuple, at: tuple, spec: Any) -> None:
        self.solve, self.leaves, self.at, self.spec = solve, leaves, at, spec
        self.out_leaves: Optional[list] = None
        self.out_spec: Any = None

    def __call__(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        leaves = list(self.leaves)
        for i, t in zip(self.at, tensors):
            leaves[i] = t
        hparams, args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        out_leaves, out_spec = pytree.tree_flatten(_call_solver(self.solve, hparams, args, kwargs))
        if self.out_leaves is None:
            self.out_leaves, self.out_spec = out_leaves, out_spec
        return tuple(leaf.detach() for leaf in out_leaves if isinstance(leaf, Tensor))

    def rebuild(self, tensors: Sequence[Tensor]) -> Any:
        assert self.out_leaves is not None
        it = iter(tensors)
        return pytree.tree_unflatten([next(it) if isinstance(leaf, Tensor) else leaf for leaf in self.out_leaves],
                                     self.out_spec)


class _Itemwise(torch.autograd.Function):
    """``(hparams and arg tensors) -> the solver's tensors``, run item by item under vmap (no derivative:
    the solution's derivative is :class:`_Solution`'s)."""

    @staticmethod
    def forward(call: _SolverCall, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return call(tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.mark_non_differentiable(*output)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # type: ignore[override]
        return None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, call: _SolverCall, *tensors: Tensor) -> tuple[tuple[Tensor, ...], tuple]:  # type: ignore[override]
        items = [_Itemwise.apply(call, *(t if d is None else t.select(d, i) for t, d in zip(tensors, in_dims[1:])))
                 for i in range(info.batch_size)]
        out = tuple(torch.stack(col) for col in zip(*items))
        return out, (0,) * len(out)


def _decorator(kind: str, fn: Callable[..., Any], api: str, *, solver: Any, hvp_mode: str = "auto",
               penalty: Optional[Callable[..., Tensor]] = None, has_aux: bool = False,
               symmetric: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    if not callable(fn):
        raise TypeError(f"bilevel.{api}: expected a callable as first argument, got {type(fn).__name__}.")

    def decorator(solve: Callable[..., Any]) -> Callable[..., Any]:
        name = getattr(solve, "__name__", "solve")
        shared = _Record()

        @functools.wraps(solve)
        def wrapped(hparams: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
            fname = f"bilevel.{api}({name})"
            hp = check_tree(hparams, fname, "hparams")
            record = _Record(shared)
            raw = _run_solver(solve, _detached(hp), args, kwargs, fname, record)
            aux = None
            if has_aux:
                if not (isinstance(raw, (tuple, list)) and len(raw) == 2):
                    raise TypeError(f"{fname}: expected the solver to return (solution, aux) with has_aux=True, got "
                                    f"{type(raw).__name__}. Fix: `return x, aux`, or has_aux=False.")
                raw, aux = raw
            params = _detached(check_tree(raw, fname, f"the solution returned by {name}"))
            if kind == "root":
                with torch.no_grad():
                    _check_residual(params, fn(params, _detached(hp), *args, **kwargs), fname, _WHAT[api])
            live = _transformed() or any(_has_tangent(v) for v in hp.values())
            if not live and not (torch.is_grad_enabled() and any(v.requires_grad for v in hp.values())):
                if torch.is_grad_enabled():
                    raise ValueError(
                        f"{fname}: expected at least one hparams tensor with requires_grad=True (the IFT gradient "
                        f"flows to them), got none among {list(hp)}. Fix: `hparams[k].requires_grad_()`, or call "
                        f"the solver under `torch.no_grad()` if you only need its value.")
                out = ImplicitSolution(params)
                return (out, aux) if has_aux else out
            leaves, spec = pytree.tree_flatten((args, kwargs))
            at = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor))
            problem = _Problem(kind, fn, solver, hvp_mode, penalty, symmetric, f"{fname} (derivative)", tuple(params),
                               tuple(hp), tuple(None if i in at else leaf for i, leaf in enumerate(leaves)), at,
                               spec, record)
            outs = _Solution.apply(problem, *params.values(), *hp.values(), *(leaves[i] for i in at))
            out = ImplicitSolution(dict(zip(params, outs)), problem.record)
            return (out, aux) if has_aux else out

        wrapped.diagnostics = shared  # type: ignore[attr-defined]
        return wrapped

    return decorator


_WHAT = {"implicit_root": "F(x, hparams, *args)", "implicit_fixed_point": "T(x, hparams, *args)"}


def implicit_diff(inner_loss: Callable[..., Tensor], *, solver: Any = None, hvp_mode: str = "auto",
                  penalty: Optional[Callable[..., Tensor]] = None,
                  has_aux: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make any inner solver differentiable in its hyperparameters by the IFT.

    The wrapped ``solve(hparams, *args, **kwargs) -> params`` runs as written (on detached
    hyperparameters, so its own iterations build no graph); the returned params carry derivatives
    in ``hparams``, evaluated only when asked for:

    - reverse mode (``.backward()``, ``torch.autograd.grad``, ``torch.func.grad``/``vjp``/``jacrev``):
      ``(H + damping I) u = ∂L/∂params``, ``∂L/∂hparams = −∇_hparams <∇_params inner_loss, u>``;
    - forward mode (``torch.func.jvp``/``jacfwd``, ``torch.autograd.forward_ad``):
      ``(H + damping I) y = −(∂²inner_loss/∂params∂hparams) t``, the tangent of params (JAXopt's
      ``root_jvp``);
    - ``torch.func.vmap`` over hyperparameters or data: the solver is vmapped when vmap can batch it
      (fixed iteration counts, no ``.item()``), else it runs item by item (noted in
      ``solve.diagnostics.notes``). With a batchable linear solver (``bl.CG``, ``bl.Exact``) the
      derivative rules solve the ``B`` items together: CG runs the ``B`` systems in lockstep, each
      with its own step sizes and stopping test, on one vmapped Hessian-vector product per step;
      other solvers, ``hvp_mode="gauss_newton"`` and losses vmap cannot batch solve item by item
      (noted too). Semantics are per item: a solver cannot mix the items of a vmapped batch. Pass
      batched data as arguments of the decorated function, never captured by ``inner_loss`` (the
      rules run outside the vmap level, as torch.func requires).

    ``outer(solve(hparams)).backward()`` fills ``hparams[k].grad``.

    Args:
        inner_loss: ``inner_loss(params, hparams, *args, **kwargs) -> scalar``, the objective
            ``solve`` minimizes (the same ``*args`` and ``**kwargs`` as ``solve``).
        solver: linear solver for the derivative rules (``bl.CG()`` by default).
        hvp_mode: ``"auto"`` | ``"reverse"`` | ``"forward"`` | ``"gauss_newton"`` (as in
            :func:`implicit_hypergrad`).
        penalty: optional separable ``penalty(params, hparams)`` added to ``inner_loss``
            (see :func:`implicit_hypergrad`).
        has_aux: the solver returns ``(params, aux)``; ``aux`` is passed through, undifferentiated.

    Returns:
        A decorator. The wrapped function returns an :class:`ImplicitSolution` (a params tree;
        ``.info`` is filled by the derivative rules, ``None`` under vmap/jacrev/jacfwd), or
        ``(solution, aux)`` with ``has_aux``. Derivatives flow to ``hparams`` only, not through
        ``*args``/``**kwargs`` (their derivative is zero). The decorated function's
        ``.diagnostics`` holds ``.info`` (the :class:`HypergradInfo` of the last derivative rule of any
        call, under torch.func too; under vmap with a batched solve, ``info.solver`` holds the worst
        item's figures and ``info.solver.extra["items"]`` each item's) and ``.notes`` (one line per
        part that ran item by item under vmap).

    Raises:
        ValueError: outside torch.func, no ``hparams`` tensor requires grad while grad mode is on.
        RuntimeError: second derivatives requested.

    Shapes: ``hparams`` and the returned params are trees of any leaf shapes; ``hparams[k].grad``
    gets the shape of ``hparams[k]``; ``torch.func.jacrev(lambda h: solve(h)[a])(h)[b]`` has shape
    ``params[a].shape + hparams[b].shape``.

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
        >>> J = torch.func.jacrev(lambda l: ridge({"l2": l}, X, y)["w"])(torch.tensor(1.0))   # dw*/dl2
        >>> torch.allclose(J, torch.func.jacfwd(lambda l: solve({"l2": l}, X, y)["w"])(torch.tensor(1.0)), atol=1e-5)
        True
    """
    return _decorator("min", inner_loss, "implicit_diff", solver=CG() if solver is None else solver,
                      hvp_mode=hvp_mode, penalty=penalty, has_aux=has_aux)


def _root_solver(solver: Any, symmetric: bool, api: str) -> Any:
    if not symmetric and isinstance(solver, (CG, Nystrom)):
        raise ValueError(
            f"bilevel.{api}: expected a solver for non-symmetric systems, got bl.{solver.name}: the adjoint system "
            f"J_xᵀ u = b of a root or fixed point is not symmetric in general, and {solver.name} assumes it is "
            f"(a wrong answer, not an error). Fix: solver=bl.Exact() for small problems, bl.GMRES() or "
            f"bl.BiCGSTAB() for large ones, or pass symmetric=True if "
            f"J_x = ∂F/∂x is symmetric positive definite (e.g. F is the gradient of a convex function).")
    return solver


def _default_root_solver() -> Solver:
    """Roots and fixed points have non-symmetric Jacobians: restarted GMRES, any size."""
    return GMRES(maxiter=200, restart=50)


def implicit_root(F: Callable[..., Mapping[str, Tensor]], *, solver: Any = None, symmetric: bool = False,
                  has_aux: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: differentiate a solver of ``F(x, hparams, *args) = 0`` by the implicit function theorem.

    For problems that are not minimizations (equilibria, games, optimality conditions): the wrapped
    ``solve(hparams, *args, **kwargs) -> x`` returns a root ``x*`` of ``F``; its derivatives in
    ``hparams`` come from ``J_x dx = −(∂F/∂hparams) dλ``, ``J_x = ∂F/∂x``:

    - reverse mode: ``J_xᵀ u = ∂L/∂x``, ``∂L/∂hparams = −(∂F/∂hparams)ᵀ u``, with the solver seeing only
      ``matvec(v) = J_xᵀ v`` (vector-Jacobian products on one graph of ``F``, never a dense matrix);
    - forward mode (``torch.func.jvp``/``jacfwd``): ``J_x y = −(∂F/∂hparams) t`` by Jacobian-vector
      products; vmap as in :func:`implicit_diff`.

    Args:
        F: ``F(x, hparams, *args, **kwargs) -> tree`` with the keys and shapes of ``x`` (the residual).
        solver: a linear solver for non-symmetric systems: ``bl.GMRES(maxiter=200, restart=50)`` by
            default; ``bl.BiCGSTAB``, ``bl.NormalCG`` (which also gets ``J_x`` products), or ``bl.Exact()``
            (dense, ``P`` products) for small problems. ``bl.CG`` and ``bl.Nystrom`` are refused unless
            ``symmetric``.
        symmetric: assert ``J_x`` is symmetric (positive definite for CG): allows CG.
        has_aux: the solver returns ``(x, aux)``; ``aux`` is passed through, undifferentiated.

    Returns:
        A decorator; the wrapped function returns an :class:`ImplicitSolution` (``.info.inner_grad_norm``
        is ``‖F(x*)‖``), or ``(solution, aux)`` with ``has_aux``.

    Raises:
        ShapeError: ``F`` does not return a tree like ``x`` (checked at the call, before any derivative).
        ValueError: a symmetric-only solver without ``symmetric=True``.

    Shapes: ``x`` and ``F(x, ...)`` are trees of the same keys and leaf shapes; ``hparams`` any tree.

    Example:
        >>> A = torch.tensor([[3., 1.], [-1., 2.]])                  # non-symmetric
        >>> F = lambda x, h: {"x": A @ x["x"] - h["b"]}               # root: x = A⁻¹ b
        >>> solve = bl.implicit_root(F)(lambda h: {"x": torch.linalg.solve(A, h["b"])})
        >>> b = torch.tensor([1., 0.], requires_grad=True)
        >>> solve({"b": b})["x"].sum().backward()                    # d(1ᵀA⁻¹b)/db = A⁻ᵀ 1
        >>> torch.allclose(b.grad, torch.linalg.solve(A.T, torch.ones(2)))
        True
    """
    slv = _root_solver(_default_root_solver() if solver is None else solver, symmetric, "implicit_root")
    return _decorator("root", F, "implicit_root", solver=slv, has_aux=has_aux, symmetric=symmetric)


def implicit_fixed_point(T: Callable[..., Mapping[str, Tensor]], *, solver: Any = None, symmetric: bool = False,
                         has_aux: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: differentiate a solver of the fixed point ``x = T(x, hparams, *args)`` by the IFT.

    The root of ``F = T(x) − x`` (:func:`implicit_root`): the adjoint system is
    ``(∂T/∂x − I)ᵀ u = ∂L/∂x``, solved with vector-Jacobian products of ``T`` only. Typical ``T``:
    a proximal-gradient step, a contraction (deep equilibrium layer), a best-response map.

    Args:
        T: ``T(x, hparams, *args, **kwargs) -> tree`` with the keys and shapes of ``x``.
        solver: a linear solver for non-symmetric systems; ``bl.GMRES(maxiter=200, restart=50)`` by
            default, or ``bl.BiCGSTAB``/``bl.NormalCG``/``bl.Exact()`` (small problems). ``bl.CG``/``bl.Nystrom`` need
            ``symmetric=True`` (``∂T/∂x`` symmetric and ``I − ∂T/∂x``
            positive definite, as for a gradient step on a convex loss).
        symmetric: assert ``∂T/∂x`` is symmetric.
        has_aux: the solver returns ``(x, aux)``; ``aux`` is passed through, undifferentiated.

    Returns:
        A decorator; the wrapped function returns an :class:`ImplicitSolution`
        (``.info.inner_grad_norm`` is ``‖T(x*) − x*‖``), or ``(solution, aux)`` with ``has_aux``.

    Raises:
        ShapeError: ``T`` does not return a tree like ``x`` (checked at the call).
        ValueError: a symmetric-only solver without ``symmetric=True``.

    Shapes: ``x`` and ``T(x, ...)`` are trees of the same keys and leaf shapes; ``hparams`` any tree.

    Example:
        >>> W = torch.tensor([[0.2, 0.3], [-0.1, 0.4]])
        >>> T = lambda x, h: {"z": W @ x["z"] + h["u"]}                # x* = (I − W)⁻¹ u
        >>> @bl.implicit_fixed_point(T)
        ... def iterate(h):
        ...     z = torch.zeros(2)
        ...     for _ in range(100):
        ...         z = W @ z + h["u"]
        ...     return {"z": z}
        >>> u = torch.tensor([1., 2.], requires_grad=True)
        >>> iterate({"u": u})["z"].sum().backward()                  # (I − W)⁻ᵀ 1
        >>> torch.allclose(u.grad, torch.linalg.solve((torch.eye(2) - W).T, torch.ones(2)))
        True
    """
    slv = _root_solver(_default_root_solver() if solver is None else solver, symmetric, "implicit_fixed_point")
    return _decorator("root", functools.partial(_fixed_point_residual, T), "implicit_fixed_point", solver=slv,
                      has_aux=has_aux, symmetric=symmetric)


def _fixed_point_residual(T: Callable[..., Any], x: Tree, h: Tree, *args: Any, **kwargs: Any) -> Tree:
    """``T(x) − x``, after checking that ``T`` returns a tree like ``x``."""
    out = _check_residual(x, T(x, h, *args, **kwargs), "bilevel.implicit_fixed_point", "T(x, hparams, *args)")
    return {k: out[k] - v for k, v in x.items()}
