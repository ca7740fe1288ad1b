"""Curvature operators: ``H = ∇²_params f(params, hparams, *args)`` at one point, as small objects.

Every operator has one interface (:class:`CurvatureOperator`): ``matvec_flat`` / ``matvec``
(``H v``), ``mixed_vjp`` (``∇_hparams <∇_params f, u>``), ``mixed_jvp`` (``∂²f/∂params∂hparams · t``,
the mixed product of forward mode), and the point's ``loss``, ``grad``, ``grad_norm``. The ways of
taking the products are separate classes, and the two things that modify any of them are wrappers,
composed the way optax chains transforms::

    op = ReverseHessian(point)                 # or ForwardHessian, ClosedFormHessian, AutoHessian, GaussNewton
    op = averaged(op, group)                   # data parallelism: one place for every all-reduce
    op = with_penalty(op, penalty)             # a separable penalty, applied elementwise

Products, measured on this machine (torch 2.13, CPU, MLP of ~1M parameters;
``benchmarks/bench_hvp.py``):

- reverse (double backward): build ``g = grad(f, w, create_graph=True)`` once, then
  ``grad(g, w, v, retain_graph=True)`` per product. One product from scratch costs about
  2.3-2.5 gradients; with the graph reused across the k products of one solve the marginal
  product costs 1.1-1.4 gradients.
- forward (forward-over-reverse, ``torch.func.jvp(torch.func.grad(f))``): about 4 gradients per
  product and nothing to reuse in eager mode.
- closed form: a structured loss (:class:`bilevel.losses.Structured`) declares ``hvp``.

So ``mode="auto"`` uses the closed form when the loss declares one, else reverse, falling back to
forward when an op lacks a double-backward formula. ``mode="gauss_newton"`` replaces ``H`` by the
generalized Gauss-Newton matrix ``Jᵀ H_ℓ J`` (:class:`GaussNewton`), positive semi-definite for a
loss convex in the network output.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ._autograd import missing_derivative, reachable_leaves
from ._errors import check_like, check_scalar, check_tree
from ._rng import get_state as get_rng
from ._second_order import with_twice_differentiable_kernels
from ._rng import replay as replay_rng
from ._tree import Flat, Tree, tree_detach, tree_norm
from .distributed import all_reduce_mean_, all_reduce_mean_list, all_reduce_mean_tree, world_size
from .losses import OutputLoss, declares

__all__ = ["HVP_MODES", "Point", "CurvatureOperator", "ReverseHessian", "ForwardHessian", "ClosedFormHessian",
           "AutoHessian", "GaussNewton", "averaged", "with_penalty", "make_operator", "HessianOperator", "hvp", "mixed_vjp"]

HVP_MODES = ("auto", "reverse", "forward", "gauss_newton")


def _zeros_for_none(grads: Sequence[Optional[Tensor]], like: Mapping[str, Tensor]) -> Tree:
    return {k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(like.items(), grads)}


def _mixed_jvp_reverse(f: Callable[[Tree, Tree], Tensor], params: Mapping[str, Tensor], hparams: Mapping[str, Tensor],
                       t: Mapping[str, Tensor]) -> Tree:
    """``(∂²f/∂params∂hparams) t = ∇_params <∇_hparams f, t>`` (symmetry of mixed partials).

    NOTE: two reverse passes rather than forward over reverse (``torch.func.jvp`` of the gradient):
    DESIGN.md §3 measures double backward as the cheaper one in eager mode, and it also runs inside a
    ``torch.autograd.forward_ad.dual_level``, where a nested forward-mode pass is refused.
    """
    p, h = tree_detach(params, requires_grad=True), tree_detach(hparams, requires_grad=True)
    with torch.enable_grad():
        loss = f(p, h)
        gh = torch.autograd.grad(loss, list(h.values()), create_graph=True, allow_unused=True) \
            if loss.requires_grad else [None] * len(h)
        terms = [(g * t[k]).sum() for k, g in zip(h, gh) if g is not None and g.requires_grad]
        out = torch.autograd.grad(torch.stack(terms).sum(), list(p.values()), allow_unused=True) \
            if terms else [None] * len(p)
    return {k: v.detach() for k, v in _zeros_for_none(out, p).items()}


def _pull_back(live: Sequence[tuple[str, Tensor]], inputs: list[Tensor],
               cotangents: Mapping[str, Tensor]) -> tuple[Optional[Tensor], ...]:
    """``∇_inputs Σ_k <g_k, cotangents[k]>`` over the gradient leaves ``live = [(key, g_k)]`` (graph kept)."""
    with torch.enable_grad():
        return torch.autograd.grad([g for _, g in live], inputs, grad_outputs=[cotangents[k] for k, _ in live],
                                   retain_graph=True, allow_unused=True)


class Point:
    """``f`` at ``(params, hparams, *args)``: detached leaves that require grad, and how to call ``f``.

    ``f(params, hparams, *args)``, or ``f(params, *args)`` when ``hparams`` is ``None`` (structured
    losses always take ``hparams``). The RNG state is captured here, before the first evaluation,
    so that every later pass at this point (forward-mode products) draws the same dropout masks.
    """

    def __init__(self, f: Callable[..., Tensor], params: Mapping[str, Tensor],
                 hparams: Optional[Mapping[str, Tensor]], args: Sequence[Any], name: str) -> None:
        self.f, self.name = f, name
        self.args = tuple(args)
        self.has_hparams = hparams is not None
        self.takes_hparams = self.has_hparams or declares(f, "hvp")
        self.params = tree_detach(check_tree(params, name, "params"), requires_grad=True)
        self.hparams = tree_detach(check_tree(hparams, name, "hparams"), requires_grad=True) \
            if hparams is not None else {}
        self.flat = Flat(self.params)
        self.rng = get_rng()

    def __call__(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> Tensor:
        if self.takes_hparams:
            return self.f(params, hparams, *self.args)
        return self.f(params, *self.args)

    def loss_and_grad(self, create_graph: bool) -> tuple[Tensor, tuple[Optional[Tensor], ...], set[int]]:
        """``(f, ∇_params f (None where unused), ids of the leaves f reaches)`` at the point."""
        with torch.enable_grad():
            loss = check_scalar(self(self.params, self.hparams), self.name, "the loss")
            grads = torch.autograd.grad(loss, list(self.params.values()), create_graph=create_graph,
                                        allow_unused=True)
        return loss, grads, reachable_leaves([loss])


class CurvatureOperator:
    """``H`` at one point as a linear operator; subclasses implement :meth:`product` and :meth:`mixed`.

    Attributes:
        point: the :class:`Point` (``params``, ``hparams``, ``flat`` layout).
        loss: ``f`` at the point (0-dim, detached). grad: ``∇_params f`` (tree, detached).
        mode: how products are taken (``"reverse"``, ``"forward"``, ``"closed"``).
        matvecs: Hessian-vector products taken so far.

    Shapes: :meth:`matvec_flat` maps ``(flat.size,)`` to ``(flat.size,)``; :meth:`matvec` a tree
    shaped like ``params`` to one shaped like ``params``; :meth:`mixed_vjp` a tree shaped like
    ``params`` to one shaped like ``hparams``.
    """

    mode: str = ""
    point: Point
    loss: Tensor
    grad: Tree
    reach: set[int]

    matvecs = 0

    @property
    def params(self) -> Tree:
        return self.point.params

    @property
    def hparams(self) -> Tree:
        return self.point.hparams

    @property
    def flat(self) -> Flat:
        return self.point.flat

    @functools.cached_property
    def grad_norm(self) -> Tensor:
        """``‖∇_params f‖`` (0-dim tensor): how stationary the point is."""
        return tree_norm(self.grad)

    # -- what subclasses implement -----------------------------------------------------------
    def product(self, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``H v`` on flat vectors, into ``out`` when given (else a fresh buffer); wrappers update
        the result in place. Not counted. By default the leaves of :meth:`product_leaves`, flattened."""
        leaves = self.product_leaves(v)
        if leaves is None:
            raise NotImplementedError
        return self.flat.flatten_list(leaves, out)

    def product_leaves(self, v: Tensor) -> Optional[list[Optional[Tensor]]]:
        """``H v`` as one tensor per leaf in key order (``None``: a zero leaf), for operators whose
        product comes out leaf by leaf (a backward pass); ``None`` where there is only the flat
        :meth:`product`. A wrapper that adds to the product (a penalty's ``diag ⊙ v``) then writes
        ``leaf + diag ⊙ v`` into the solver's buffer in one pass, instead of a copy and an update."""
        return None

    def mixed(self, u: Mapping[str, Tensor]) -> Tree:
        """``∇_hparams <∇_params f, u>`` (keys of ``hparams``)."""
        raise NotImplementedError

    def mixed_tangent(self, t: Mapping[str, Tensor]) -> Tree:
        """``d/dε ∇_params f(params, hparams + ε t)`` (keys of ``params``), as ``∇_params <∇_hparams f, t>``.

        One more evaluation of ``f`` (RNG replayed) and a double backward; subclasses that know a
        cheaper form override it.
        """
        with replay_rng(self.point.rng):
            return _mixed_jvp_reverse(self.point, self.params, self.hparams, t)

    def hparams_in_loss(self) -> set[str]:
        """Keys of the hyperparameters that the loss depends on at all (a graph walk)."""
        return {k for k, h in self.hparams.items() if id(h) in self.reach}

    # -- the public products -------------------------------------------------------------------
    def matvec_flat(self, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``H v`` for a flat vector ``v`` of shape ``(flat.size,)``; returns the same shape.

        ``out``: a ``(flat.size,)`` buffer (not ``v``) that receives the product and is returned; a
        solver's loop passes the same one each time (no weight-sized allocation per product).
        """
        self.matvecs += 1
        return self.product(v, out)

    #: solvers may pass ``out=`` (see :data:`bilevel.solvers.FlatMatvec`)
    matvec_flat.writes_out = True  # type: ignore[attr-defined]

    def matvec(self, v: Mapping[str, Tensor]) -> Tree:
        """``H v`` for a tree ``v`` with the keys and shapes of ``params``."""
        check_like(self.params, v, f"{self.point.name}.matvec", "params", "v")
        return {k: t.clone() for k, t in self.flat.unflatten(self.matvec_flat(self.flat.flatten(v))).items()}

    def mixed_vjp(self, u: Mapping[str, Tensor]) -> Tree:
        """``∇_hparams <∇_params f, u>`` (keys of ``hparams``); ``u`` has the layout of ``params``."""
        if not self.point.has_hparams:
            raise ValueError(f"{self.point.name}.mixed_vjp: this operator was built without hparams.")
        check_like(self.params, u, f"{self.point.name}.mixed_vjp", "params", "u")
        return self.mixed(dict(u))

    def mixed_jvp(self, t: Mapping[str, Tensor]) -> Tree:
        """``(∂²f/∂params∂hparams) t = d/dε ∇_params f(params, hparams + ε t)`` (keys of ``params``).

        The transpose of :meth:`mixed_vjp`: ``<mixed_jvp(t), u> = <t, mixed_vjp(u)>``. ``t`` has the
        layout of ``hparams``. Taken as ``∇_params <∇_hparams f, t>`` (one evaluation of ``f``, a double
        backward: no forward-mode formulas needed), or forward over reverse where the operator takes
        its products that way (``mode="forward"``, and ``"auto"`` after its fallback).

        Example:
            >>> op = bl.HessianOperator(lambda p, h: 0.5 * (h["l"] * p["w"] ** 2).sum(),
            ...                         {"w": torch.tensor([1., 2.])}, {"l": torch.ones(2)})
            >>> op.mixed_jvp({"l": torch.tensor([1., 0.])})["w"]              # t ⊙ w
            tensor([1., 0.])
        """
        if not self.point.has_hparams:
            raise ValueError(f"{self.point.name}.mixed_jvp: this operator was built without hparams.")
        check_like(self.hparams, t, f"{self.point.name}.mixed_jvp", "hparams", "t")
        return self.mixed_tangent(dict(t))


class ReverseHessian(CurvatureOperator):
    """Double backward on one gradient graph, built once and reused by every product (``retain_graph``).

    Attributes:
        dead: keys whose gradient exists but carries no graph: the loss is linear in them, or an op's
            backward is not differentiable (``once_differentiable``); their Hessian rows come out zero.
    """

    mode = "reverse"

    def __init__(self, point: Point) -> None:
        self.point = point
        loss, grads, self.reach = point.loss_and_grad(create_graph=True)
        self.loss, self.grad = loss.detach(), {k: g.detach() for k, g in _zeros_for_none(grads, point.params).items()}
        keys = point.flat.keys
        # Only gradient leaves that carry a graph have a non-zero Hessian row.
        self._live = [(keys[i], g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.dead = [k for k, g in zip(keys, grads) if g is not None and not g.requires_grad]
        # NOTE: a gradient can carry a graph through the hyperparameters alone (``h * f(w)`` with
        # f's backward once-differentiable): then it reaches no parameter, its Hessian products would
        # all come out zero, and it is as ambiguous as a gradient without a graph. One walk decides.
        if self._live and not any(id(p) in reachable_leaves([g for _, g in self._live])
                                  for p in point.params.values()):
            self.dead, self._live = self.dead + [k for k, _ in self._live], []

    def _backward(self, inputs: list[Tensor], cotangents: Mapping[str, Tensor]) -> tuple[Optional[Tensor], ...]:
        return _pull_back(self._live, inputs, cotangents)

    def product_leaves(self, v: Tensor) -> list[Optional[Tensor]]:
        if not self._live:
            return [None] * len(self.flat.keys)
        return list(self._backward(list(self.params.values()), self.flat.unflatten(v.to(self.flat.dtype))))

    def mixed(self, u: Mapping[str, Tensor]) -> Tree:
        if not self._live or not self.hparams:
            return {k: torch.zeros_like(h) for k, h in self.hparams.items()}
        return _zeros_for_none(self._backward(list(self.hparams.values()), u), self.hparams)


class ForwardHessian(CurvatureOperator):
    """Forward-over-reverse with ``torch.func``: each product re-runs ``f`` (RNG replayed)."""

    mode = "forward"

    def __init__(self, point: Point, start: Optional[CurvatureOperator] = None) -> None:
        self.point = point
        if start is None:
            loss, grads, self.reach = point.loss_and_grad(create_graph=False)
            self.loss, self.grad = loss.detach(), _zeros_for_none(grads, point.params)
        else:                                  # the point's loss and gradient are already known
            self.loss, self.grad, self.reach = start.loss, start.grad, start.reach

    def product_leaves(self, v: Tensor) -> list[Optional[Tensor]]:
        h = tree_detach(self.hparams)
        grad_w = torch.func.grad(lambda p: self.point(p, h))
        with torch.enable_grad(), replay_rng(self.point.rng):
            _, hv = torch.func.jvp(grad_w, (tree_detach(self.params),), (self.flat.unflatten(v),))
        return [hv[k] for k in self.flat.keys]

    def mixed(self, u: Mapping[str, Tensor]) -> Tree:
        # Symmetry of mixed partials: ∇_h <∇_w f, u> = d/dε ∇_h f(w + εu, h).
        h = tree_detach(self.hparams)
        grad_h = torch.func.grad(lambda p, hh: self.point(p, hh), argnums=1)
        with torch.enable_grad(), replay_rng(self.point.rng):
            _, out = torch.func.jvp(lambda p: grad_h(p, h), (tree_detach(self.params),), (dict(u),))
        return dict(out)

    def mixed_tangent(self, t: Mapping[str, Tensor]) -> Tree:
        # forward over reverse, like the products: right where double backward is missing or silent
        p = tree_detach(self.params)
        grad_w = torch.func.grad(lambda pp, hh: self.point(pp, hh))
        with torch.enable_grad(), replay_rng(self.point.rng):
            _, out = torch.func.jvp(lambda hh: grad_w(p, hh), (tree_detach(self.hparams),), (dict(t),))
        return dict(out)


class ClosedFormHessian(CurvatureOperator):
    """The products a structured loss declares (:class:`bilevel.losses.Structured`): ``hvp``, and
    ``hessian`` (the work that depends only on the point, done once) and ``mixed_vjp`` when present."""

    mode = "closed"

    def __init__(self, point: Point) -> None:
        self.point = point
        loss, grads, self.reach = point.loss_and_grad(create_graph=False)
        self.loss, self.grad = loss.detach(), _zeros_for_none(grads, point.params)
        f = point.f
        self._prepared = f.hessian(self._p(), self._h(), *point.args) if declares(f, "hessian") else None

    def _p(self) -> Tree:
        return tree_detach(self.params)

    def _h(self) -> Tree:
        return tree_detach(self.hparams)

    def product_leaves(self, v: Tensor) -> list[Optional[Tensor]]:
        vt = self.flat.unflatten(v.to(self.flat.dtype))
        hv = self._prepared(vt) if self._prepared is not None else \
            self.point.f.hvp(self._p(), self._h(), vt, *self.point.args)
        return [hv.get(k) for k in self.flat.keys]

    def mixed(self, u: Mapping[str, Tensor]) -> Tree:
        if declares(self.point.f, "mixed_vjp"):
            out = self.point.f.mixed_vjp(self._p(), self._h(), u, *self.point.args)
            return {k: (out[k] if k in out else torch.zeros_like(h)) for k, h in self.hparams.items()}
        # no declared mixed term: one gradient graph, built now (the products did not need it)
        return ReverseHessian(self.point).mixed(u)


class AutoHessian(CurvatureOperator):
    """Reverse mode, switching to forward-over-reverse where an op lacks a double-backward formula.

    NOTE: a gradient that exists but carries no graph means either a loss that is linear in that
    tensor, or an op whose backward is not differentiable (a custom ``autograd.Function`` with
    ``once_differentiable``, a detach inside a backward). Double backward would then silently give a
    zero Hessian row; forward-over-reverse gets both cases right (or fails loudly), so it is used.
    """

    def __init__(self, point: Point) -> None:
        self.point = point
        reverse = ReverseHessian(point)
        self._dead = reverse.dead
        self.op: CurvatureOperator = ForwardHessian(point, reverse) if self._dead else reverse
        self.loss, self.grad, self.reach = reverse.loss, reverse.grad, reverse.reach

    @property
    def mode(self) -> str:  # type: ignore[override]
        return self.op.mode

    def _run(self, call: Callable[[CurvatureOperator], Any]) -> Any:
        if self.op.mode == "reverse":
            try:
                return call(self.op)
            except (RuntimeError, NotImplementedError) as err:
                if not missing_derivative(err):
                    raise
                self.op = ForwardHessian(self.point, self.op)
        try:
            return call(self.op)
        except (RuntimeError, NotImplementedError) as err:
            if not self._dead:
                raise
            raise RuntimeError(
                f"{self.point.name}: cannot take Hessian products: the gradient of {self._dead} carries no autograd "
                f"graph under double backward (an op's backward is not differentiable, e.g. a custom "
                f"autograd.Function marked once_differentiable), and forward-over-reverse failed too "
                f"({type(err).__name__}: {err}). Fix: give that autograd.Function a differentiable backward "
                f"or a jvp (forward-mode) rule."
            ) from err

    def product(self, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        return self._run(lambda op: op.product(v, out))

    def product_leaves(self, v: Tensor) -> Optional[list[Optional[Tensor]]]:
        return self._run(lambda op: op.product_leaves(v))

    def mixed(self, u: Mapping[str, Tensor]) -> Tree:
        return self._run(lambda op: op.mixed(u))

    def mixed_tangent(self, t: Mapping[str, Tensor]) -> Tree:
        return self._run(lambda op: op.mixed_tangent(t))


class GaussNewton(CurvatureOperator):
    """The generalized Gauss-Newton matrix ``G = Jᵀ H_ℓ J`` in place of ``H``, for a loss written as
    ``f(params, hparams, *args) = ℓ(z, ...)``, ``z = output(params, hparams, *args)``.

    ``J = ∂z/∂params`` and ``H_ℓ = ∂²ℓ/∂z²``. ``G`` drops the network's own curvature
    (``Σ_k ∂ℓ/∂z_k ∇²z_k``), so it is positive semi-definite whenever ``ℓ`` is convex in ``z``: CG
    never meets negative curvature, also far from a minimum. ``G = H`` when ``z`` is linear in params.

    The seam: ``f`` must *return* the value of a :class:`bilevel.losses.OutputLoss` call
    (``bl.losses.cross_entropy(logits, y)``, ``bl.losses.mse(out, y)``, or ``bl.losses.OutputLoss(fn)``)
    and nothing else: the operator evaluates ``f`` once while recording that call, which gives ``z``
    and ``ℓ``. Separable regularizers go in ``penalty=`` (:func:`with_penalty` adds their exact diagonal);
    any other term needs the exact modes. ``ℓ``'s other arguments must not depend on params.

    The loss, the gradient and the mixed product ``∇_hparams <∇_params f, u>`` are exact: only the
    linear solve sees ``G`` (the gradient graph is built with ``create_graph=True`` once, as
    :class:`ReverseHessian` builds it).

    NOTE: one product is ``Jᵀ (H_ℓ (J v))``. The gradient is built as ``g = Jᵀ gz`` with
    ``gz = ∂ℓ/∂z`` and ``create_graph=True``; ``g`` is linear in ``gz``, so ``∂⟨g, v⟩/∂gz = J v``
    (the "double-vjp trick": forward mode by two reverse passes, here on a graph built once). Then
    ``H_ℓ`` (closed form, or double backward of ``gz`` in ``z``: the small output graph) and one
    backward ``Jᵀ(·)`` through the retained forward graph. Against ``torch.func.jvp`` of the output
    (a fresh forward with tangents each product) on the 1.07M MLP of benchmarks/ this was 1.25 vs 1.45
    gradients per product, paired (1.29 vs 1.92 in an earlier run; both on a loaded 2-core machine;
    benchmarks/RESULTS.md, "Gauss–Newton curvature"). The FLOP floor is about 1.11 gradients.
    """

    mode = "gauss_newton"

    def __init__(self, point: Point) -> None:
        self.point = point
        name = point.name
        with OutputLoss.record() as calls, torch.enable_grad():
            value = point(point.params, point.hparams)
        mine = [c for c in calls if c.value is value]
        if len(calls) != 1 or not mine:
            got = "no output-loss call" if not calls else \
                f"{len(calls)} output-loss call(s) whose value it does not return as is" if not mine else \
                f"{len(calls)} output-loss calls"
            raise ValueError(
                f"{name}: hvp_mode='gauss_newton' needs the inner loss to return the value of one output loss, "
                f"ℓ(network output, targets), got {got}. Fix: end the inner loss with `return "
                f"bl.losses.cross_entropy(logits, y)` (or bl.losses.mse, or bl.losses.OutputLoss(fn)(output, ...)), "
                f"move separable regularizers (weight decay) to penalty=, or use hvp_mode='auto' for other terms.")
        call = mine[0]
        with torch.enable_grad():                     # a backward pass (implicit_diff) runs with grad mode off
            loss = check_scalar(value, name, "the loss")
        z, leaves = call.output, list(point.params.values())
        if not (isinstance(z, Tensor) and z.requires_grad):
            raise ValueError(f"{name}: hvp_mode='gauss_newton': the output passed to the output loss does not depend "
                             f"on params. Fix: pass the network output (e.g. model(x)) as its first argument.")
        extra = [t for t in (*call.args, *call.kwargs.values()) if isinstance(t, Tensor)]
        leaked = sorted(k for k, p in point.params.items() if id(p) in reachable_leaves(extra))
        if leaked:
            raise ValueError(f"{name}: hvp_mode='gauss_newton': the output loss's other arguments depend on params "
                             f"{leaked[:3]}, so the loss is not a function of the output alone. Fix: pass them detached, "
                             f"or use hvp_mode='auto'.")
        with torch.enable_grad():
            (gz,) = torch.autograd.grad(loss, [z], create_graph=True)
            if not gz.requires_grad:                    # ℓ linear in z: H_ℓ = 0, but keep g linear in a leaf
                gz = gz.detach().requires_grad_(True)
            grads = torch.autograd.grad([z], leaves, grad_outputs=[gz], create_graph=True, allow_unused=True)
        self.reach = reachable_leaves([loss])
        self.loss = loss.detach()
        self.grad = {k: g.detach() for k, g in _zeros_for_none(grads, point.params).items()}
        keys = point.flat.keys
        self._live = [(keys[i], g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        dead = [k for k, g in zip(keys, grads) if g is not None and not g.requires_grad]
        if dead:
            raise RuntimeError(
                f"{name}: hvp_mode='gauss_newton' takes J v by differentiating the gradient, but the gradient of "
                f"{dead[:3]} carries no autograd graph (an op's backward is not differentiable, e.g. an "
                f"autograd.Function marked once_differentiable). Fix: hvp_mode='forward', or a differentiable backward.")
        self._z, self._gz = z, gz
        self._used = [i for i, g in enumerate(grads) if g is not None]
        closed = call.loss.output_hessian(z, *call.args, **call.kwargs)
        self._output_hvp = closed if closed is not None else self._autograd_output_hvp

    def _autograd_output_hvp(self, u: Tensor) -> Tensor:
        if not self._gz.grad_fn:
            return torch.zeros_like(u)
        with torch.enable_grad():
            (out,) = torch.autograd.grad([self._gz], [self._z], grad_outputs=[u], retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if out is None else out

    def product_leaves(self, v: Tensor) -> list[Optional[Tensor]]:
        if not self._live:
            return [None] * len(self.flat.keys)
        vt = self.flat.unflatten(v.to(self.flat.dtype))
        leaves = list(self.params.values())
        (jv,) = _pull_back(self._live, [self._gz], vt)
        with torch.enable_grad():
            hjv = self._output_hvp(torch.zeros_like(self._gz) if jv is None else jv.detach())
            grads = torch.autograd.grad([self._z], [leaves[i] for i in self._used],
                                        grad_outputs=[hjv.to(self._z.dtype)], retain_graph=True)
        full: list[Optional[Tensor]] = [None] * len(leaves)
        for i, o in zip(self._used, grads):
            full[i] = o
        return full

    def mixed(self, u: Mapping[str, Tensor]) -> Tree:
        if not self._live or not self.hparams:
            return {k: torch.zeros_like(h) for k, h in self.hparams.items()}
        return _zeros_for_none(_pull_back(self._live, list(self.hparams.values()), u), self.hparams)


class _Wrapper(CurvatureOperator):
    """An operator that modifies another: forwards everything it does not change."""

    def __init__(self, inner: CurvatureOperator) -> None:
        self.inner = inner
        self.point = inner.point
        self.loss, self.reach = inner.loss, inner.reach

    @functools.cached_property
    def grad(self) -> Tree:  # type: ignore[override]
        """The inner operator's gradient, read when first needed (wrappers that change it assign or override it)."""
        return self.inner.grad

    @functools.cached_property
    def grad_norm(self) -> Tensor:
        # the inner operator's, unless this wrapper assigned a gradient of its own (or it was read)
        return tree_norm(self.grad) if "grad" in vars(self) else self.inner.grad_norm

    @property
    def mode(self) -> str:  # type: ignore[override]
        return self.inner.mode

    def product(self, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        return self.inner.product(v, out)

    def mixed(self, u: Mapping[str, Tensor]) -> Tree:
        return self.inner.mixed(u)

    def mixed_tangent(self, t: Mapping[str, Tensor]) -> Tree:
        return self.inner.mixed_tangent(t)

    def hparams_in_loss(self) -> set[str]:
        return self.inner.hparams_in_loss()


class _Averaged(_Wrapper):
    def __init__(self, inner: CurvatureOperator, group: Any) -> None:
        super().__init__(inner)
        self.group = group
        red = all_reduce_mean_list([inner.loss, *inner.grad.values()], group)
        self.loss, self.grad = red[0], dict(zip(inner.grad, red[1:]))

    def product(self, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        return all_reduce_mean_(self.inner.product(v, out), self.group)

    def mixed(self, u: Mapping[str, Tensor]) -> Tree:
        return all_reduce_mean_tree(self.inner.mixed(u), self.group)

    def mixed_tangent(self, t: Mapping[str, Tensor]) -> Tree:
        return all_reduce_mean_tree(self.inner.mixed_tangent(t), self.group)


def averaged(op: CurvatureOperator, group: Any) -> CurvatureOperator:
    """``op`` with its loss, gradient, every product and the mixed product averaged over the ranks of
    ``group`` (data parallelism: each rank holds a shard of the batch; see :mod:`bilevel.distributed`).
    Every rank then holds the same vectors bit for bit, so solvers agree on every step.
    Returns ``op`` itself for ``group=None`` or one rank.

    Example:
        >>> op = averaged(ReverseHessian(Point(lambda p: (p["w"] ** 2).sum(), {"w": torch.ones(2)}, None, (), "f")), None)
        >>> op.matvec({"w": torch.ones(2)})["w"]
        tensor([2., 2.])
    """
    return _Averaged(op, group) if world_size(group) > 1 else op


def _diagonal_like(d: Mapping[str, Tensor], params: Tree) -> Tree:
    """A penalty's Hessian diagonal ``d`` (``{name: broadcastable tensor}``) as a tree like ``params``:
    expanded to each weight's shape and dtype, zeros for the weights it does not name."""
    return {k: (d[k].detach().expand_as(p) if k in d else torch.zeros_like(p)).to(p.dtype) for k, p in params.items()}


class _SeparableTerm:
    """A penalty ``P(params, hparams)`` whose Hessian in ``params`` is diagonal, outside the big graph.

    The diagonal and the mixed product come from the penalty's own closed forms when it declares
    them (``hessian_diag`` and ``mixed_vjp``, as :class:`bilevel.hparams.WeightDecay` does),
    otherwise from autograd on the penalty's own small graph, checked once: ``H_P z`` for a random
    ±1 vector ``z`` must equal ``diag ⊙ z``, and a penalty that couples weights raises ``ValueError``.
    ``fixed``: further parameters the penalty reads but that are not differentiated (held constant).
    """

    def __init__(self, penalty: Callable[..., Tensor], params: Tree, hparams: Tree, name: str,
                 fixed: Optional[Mapping[str, Tensor]] = None) -> None:
        if not callable(penalty):
            raise TypeError(f"{name}: expected `penalty` to be a callable penalty(params, hparams) -> scalar "
                            f"(e.g. the penalty of bl.hparams.weight_decay), got {type(penalty).__name__}.")
        self._penalty, self._params, self._hparams = penalty, params, hparams
        self._fixed = {k: v.detach() for k, v in (fixed or {}).items() if k not in params}
        closed = declares(penalty, "hessian_diag") and declares(penalty, "mixed_vjp")
        self._g: Optional[list[tuple[str, Tensor]]] = None
        self._grad: Optional[Tree] = None
        self._quadratic = False
        if closed and getattr(penalty, "quadratic", False) is True and declares(penalty, "hparams_read") \
                and self._quadratic_forms(penalty, params, hparams):
            return
        with torch.enable_grad():
            value = check_scalar(penalty(self._all(params), hparams), name, "penalty(params, hparams)")
        reach = reachable_leaves([value])
        #: keys of ``hparams`` the penalty's value depends on
        self.hparams_in_value = {k for k, h in hparams.items() if id(h) in reach}
        if closed:
            # NOTE: the gradient is left to gradient(), which the solvers never call: one weight-sized
            # tree fewer alive through a solve (and the value's graph is freed on return)
            self.value = value.detach()
            d = penalty.hessian_diag(self._all(tree_detach(params)), tree_detach(hparams))
            self.diag = _diagonal_like(d, params)
            return
        grads = self._grads(value, create_graph=True)
        self.value = value.detach()
        self._grad = {k: g.detach() for k, g in _zeros_for_none(grads, params).items()}
        self._g = [(k, g) for k, g in zip(params, grads) if g is not None and g.requires_grad]
        self.diag = {k: torch.zeros_like(p) for k, p in params.items()}
        if self._g:
            self.diag.update(self._hvp_live([torch.ones_like(g) for _, g in self._g]))
            self._check_separable(name)

    def _quadratic_forms(self, penalty: Any, params: Tree, hparams: Tree) -> bool:
        """``P = ½ Σ diag ⊙ w²`` (``penalty.quadratic``, e.g. :class:`bilevel.hparams.WeightDecay`):
        the value, the diagonal and the hparams it reads from one evaluation of the decays, without
        a graph. False (nothing set) when a name or key it needs is missing: the general path then
        evaluates the penalty and raises its own error."""
        p_all, h = self._all(tree_detach(params)), tree_detach(hparams)
        keys = penalty.hparams_read()
        names = getattr(penalty, "keys", None)
        if not isinstance(names, Mapping) or not all(n in p_all for n in names) or not all(k in h for k in keys):
            return False
        with torch.no_grad():
            d = penalty.hessian_diag(p_all, h)                  # the one e^raw per decayed tensor
            terms = [torch.dot((dk * p_all[n]).reshape(-1), p_all[n].reshape(-1).to(torch.result_type(dk, p_all[n])))
                     for n, dk in d.items()]
            self.value = 0.5 * sum(terms) if terms else torch.zeros((), dtype=next(iter(params.values())).dtype)
        self.hparams_in_value = set(keys)
        self.diag = _diagonal_like(d, params)
        self._quadratic = True
        return True

    def plus_gradient(self, grads: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
        """``(k, grads[k] + ∇_k P)`` key by key (a fresh tensor each; one alive at a time when
        consumed lazily): ``grads[k] + diag ⊙ w`` in one pass for a quadratic penalty."""
        if self._quadratic:
            for k, g in grads.items():
                yield k, torch.addcmul(g, self.diag[k].to(g.dtype), self._params[k].detach().to(g.dtype))
            return
        pen = self.gradient()
        for k, g in grads.items():
            yield k, g + pen[k]

    def _all(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {**self._fixed, **params} if self._fixed else dict(params)

    def _grads(self, value: Tensor, create_graph: bool) -> Sequence[Optional[Tensor]]:
        leaves = list(self._params.values())
        with torch.enable_grad():
            return torch.autograd.grad(value, leaves, create_graph=create_graph, allow_unused=True) \
                if value.requires_grad else [None] * len(leaves)

    def gradient(self) -> Tree:
        """``∇_params P`` (keys of ``params``): kept from the start for a penalty without closed forms
        (its graph is needed anyway), else computed now: by the penalty's own ``gradient`` when it
        declares one (:class:`bilevel.hparams.WeightDecay`: ``decay ⊙ w``), else by one more evaluation."""
        if self._grad is not None:
            return self._grad
        if self._quadratic:
            return {k: self.diag[k] * p.detach() for k, p in self._params.items()}
        if declares(self._penalty, "gradient"):
            out = self._penalty.gradient(self._all(tree_detach(self._params)), tree_detach(self._hparams))
            return {k: (out[k].detach().to(p.dtype) if k in out else torch.zeros_like(p))
                    for k, p in self._params.items()}
        with torch.enable_grad():
            value = self._penalty(self._all(self._params), self._hparams)
        return {k: g.detach() for k, g in _zeros_for_none(self._grads(value, False), self._params).items()}

    def _check_separable(self, name: str) -> None:
        assert self._g is not None
        gen = torch.Generator(device="cpu").manual_seed(12345)
        z = [(torch.randint(0, 2, g.shape, generator=gen).to(g) * 2 - 1) for _, g in self._g]
        hz = self._hvp_live(z)
        for (k, _), zk in zip(self._g, z):
            err = (hz[k] - self.diag[k] * zk).abs().max()
            scale = self.diag[k].abs().max() + hz[k].abs().max()
            tol = 1e3 * torch.finfo(zk.dtype).eps * (float(scale) + torch.finfo(zk.dtype).tiny)
            if float(err) > tol:
                raise ValueError(
                    f"{name}: expected `penalty` to be separable in params (a diagonal Hessian: each term depends "
                    f"on one weight), but its Hessian couples the entries of {k!r} (|H z − diag ⊙ z| = "
                    f"{float(err):.3e} for a random ±1 vector z). Fix: put this term into the inner loss "
                    f"instead of `penalty=`.")

    def _hvp_live(self, vs: Sequence[Tensor]) -> Tree:
        assert self._g is not None
        keys = [k for k, _ in self._g]
        with torch.enable_grad():
            out = torch.autograd.grad([g for _, g in self._g], [self._params[k] for k in keys], grad_outputs=list(vs),
                                      retain_graph=True, allow_unused=True)
        return {k: torch.zeros_like(self._params[k]) if o is None else o.detach() for k, o in zip(keys, out)}

    def mixed_vjp(self, u: Mapping[str, Tensor]) -> Tree:
        """``∇_hparams <∇_params P, u>`` (keys of ``hparams``, zeros where ``P`` does not use one)."""
        if self._g is None:
            zeros = {k: torch.zeros_like(v) for k, v in self._fixed.items()}
            reuse = {"decays": self.diag} if self._quadratic else {}     # the decays evaluated at the start
            out = self._penalty.mixed_vjp(self._all(tree_detach(self._params)), tree_detach(self._hparams),
                                          {**zeros, **u}, **reuse)
            return {k: (out[k].detach() if k in out else torch.zeros_like(h)) for k, h in self._hparams.items()}
        if not self._g or not self._hparams:
            return {k: torch.zeros_like(h) for k, h in self._hparams.items()}
        with torch.enable_grad():
            out = torch.autograd.grad([g for _, g in self._g], list(self._hparams.values()),
                                      grad_outputs=[u[k] for k, _ in self._g], retain_graph=True, allow_unused=True)
        return _zeros_for_none(out, self._hparams)

    def mixed_jvp(self, t: Mapping[str, Tensor]) -> Tree:
        """``d/dε ∇_params P(params, hparams + ε t)`` (keys of ``params``), on the penalty's own small graph."""
        return _mixed_jvp_reverse(lambda pp, hh: self._penalty(self._all(pp), hh), self._params, self._hparams, t)


class _Penalized(_Wrapper):
    def __init__(self, inner: CurvatureOperator, penalty: Callable[..., Tensor],
                 fixed: Optional[Mapping[str, Tensor]]) -> None:
        super().__init__(inner)
        self.term = _SeparableTerm(penalty, self.params, self.hparams, self.point.name, fixed)
        self.loss = inner.loss + self.term.value
        # one flat diagonal, the term's tree made views of it (not a second weight-sized copy)
        self._diag = self.flat.flatten(self.term.diag)
        self.term.diag = self.flat.unflatten(self._diag)
        # NOTE: the norm now, at the point, key by key (one leaf-sized sum alive at a time); the
        # gradient tree itself only when read (`grad`): the solvers never read it, so the penalty's
        # gradient and the sum, two weight-sized trees, are not alive through a solve.
        self.grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s)
                                                               for _, s in self.term.plus_gradient(inner.grad)]))

    @functools.cached_property
    def grad(self) -> Tree:  # type: ignore[override]
        """``∇_params (f + P)``, summed when first read (see ``__init__``)."""
        return dict(self.term.plus_gradient(self.inner.grad))

    def product(self, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        leaves = self.inner.product_leaves(v)
        if leaves is not None:          # leaf + diag ⊙ v straight into the buffer: one pass per leaf
            return self.flat.addcmul_list(leaves, self._diag, v, out)
        hv = self.inner.product(v, out)
        return hv.addcmul_(self._diag, v.to(hv.dtype))         # `hv` is a fresh buffer, or `out`

    def mixed(self, u: Mapping[str, Tensor]) -> Tree:
        pen = self.term.mixed_vjp(u)
        if not isinstance(self.inner, _Averaged) and not self.inner.hparams_in_loss():
            # the data term reads no hparams (the usual weight-decay problem): its mixed product is
            # zero, and zeros plus a sum are two weight-sized passes for nothing. Averaged operators
            # always take it: every rank must join the reduction, whatever its own graph reaches.
            return pen
        data = self.inner.mixed(u)
        return {k: d + pen[k] for k, d in data.items()}

    def mixed_tangent(self, t: Mapping[str, Tensor]) -> Tree:
        data, pen = self.inner.mixed_tangent(t), self.term.mixed_jvp(t)
        return {k: d + pen[k] for k, d in data.items()}

    def hparams_in_loss(self) -> set[str]:
        return self.inner.hparams_in_loss() | self.term.hparams_in_value


def with_penalty(op: CurvatureOperator, penalty: Optional[Callable[..., Tensor]], *,
                 fixed: Optional[Mapping[str, Tensor]] = None) -> CurvatureOperator:
    """``op`` for ``f + penalty``, with the penalty's Hessian applied as ``diag ⊙ v`` and its mixed
    term in closed form (or on its own small graph), not through ``op``'s double backward.

    ``penalty(params, hparams) -> scalar`` must be separable in ``params`` (each term depends on one
    weight); a coupled one raises ``ValueError``. It is added after any averaging (it is the same on
    every rank). ``fixed``: parameters the penalty reads that are held constant (not in ``params``).
    Returns ``op`` itself for ``penalty=None``.

    Shapes: as ``op``.

    Example:
        >>> hp, pen = bl.hparams.weight_decay({"w": torch.ones(2)}, init=2.0, per="tensor")
        >>> op = with_penalty(ReverseHessian(Point(lambda p, h: (p["w"] ** 2).sum(), {"w": torch.ones(2)}, hp, (), "f")), pen)
        >>> op.matvec({"w": torch.ones(2)})["w"]                      # 2 I + decay I
        tensor([4., 4.])
    """
    return op if penalty is None else _Penalized(op, penalty, fixed)


def make_operator(f: Callable[..., Tensor], params: Mapping[str, Tensor], hparams: Optional[Mapping[str, Tensor]],
                  args: Sequence[Any] = (), *, mode: str = "auto", penalty: Optional[Callable[..., Tensor]] = None,
                  fixed: Optional[Mapping[str, Tensor]] = None, group: Any = None,
                  name: str = "HessianOperator") -> CurvatureOperator:
    """The composed operator: products by ``mode``, then :func:`averaged` over ``group``, then
    :func:`with_penalty`. ``mode``: ``"auto"`` (closed form for a structured loss, else reverse with
    the forward fallback), ``"reverse"``, ``"forward"`` or ``"gauss_newton"`` (:class:`GaussNewton`)."""
    if mode not in HVP_MODES:
        raise ValueError(f"{name}: expected mode in {HVP_MODES}, got {mode!r}.")
    point = Point(f, params, hparams, args, name)
    op: CurvatureOperator
    if mode == "forward":
        op = ForwardHessian(point)
    elif mode == "gauss_newton":
        op = GaussNewton(point)
    elif mode == "reverse":
        op = ReverseHessian(point)
        if op.dead:
            warnings.warn(
                f"{name}: the gradient of {op.dead} carries no autograd graph, so mode='reverse' takes "
                f"their Hessian rows as zero. That is right only if the loss is linear in them; otherwise "
                f"an op's backward is not differentiable (once_differentiable). Use mode='auto' or 'forward'.",
                stacklevel=3,
            )
    elif declares(f, "hvp"):
        op = ClosedFormHessian(point)
    else:
        op = AutoHessian(point)
    return with_penalty(averaged(op, group), penalty, fixed=fixed)


class HessianOperator(_Wrapper):
    """``H = ∇²_params f(params, hparams, *args)`` at one point, as a linear operator.

    Builds the graph of ``g = ∇_params f`` once and reuses it for every product
    (``retain_graph=True``): the k products of one linear solve cost about
    ``1 + 1.4 k`` gradients instead of ``2.4 k`` (benchmarks/RESULTS.md). The same graph also
    gives the mixed product ``∇_hparams <g, u>`` of the implicit hypergradient. It is the
    composition :func:`make_operator` builds (products, :func:`averaged`, :func:`with_penalty`).

    Args:
        f: ``f(params, hparams, *args) -> scalar`` (or ``f(params, *args)`` when
            ``hparams`` is ``None``).
        params: tree at which to linearize; detached copies are used, the originals are not modified.
        hparams: tree of hyperparameters, or ``None``.
        args: extra positional arguments of ``f`` (e.g. a batch).
        mode: ``"auto"`` | ``"reverse"`` (double backward, graph reused) |
            ``"forward"`` (forward-over-reverse with ``torch.func``) | ``"gauss_newton"`` (the
            generalized Gauss-Newton ``Jᵀ H_ℓ J`` in place of ``H``; ``f`` returns one
            :class:`bilevel.losses.OutputLoss` value; see :class:`~bilevel.operators.GaussNewton`).
        penalty: optional ``penalty(params, hparams) -> scalar`` with a diagonal Hessian in
            ``params`` (e.g. ``bl.hparams.weight_decay``'s penalty), *added* to ``f``; its
            Hessian and mixed term are applied elementwise instead of through double backward.
        group: a ``torch.distributed`` process group: the loss, gradient, every product and
            the mixed product are averaged over its ranks. ``None``: one process.

    Attributes:
        loss: ``f`` (plus ``penalty``) at the point (0-dim, detached).
        grad: ``∇_params`` of the same (tree, detached).
        grad_norm: ``‖∇_params f‖`` (0-dim tensor): how stationary the point is.
        flat: the :class:`~bilevel._tree.Flat` layout of ``params``.
        matvecs: number of Hessian-vector products taken so far.

    Shapes: :meth:`matvec` maps a tree shaped like ``params`` to one shaped like ``params``;
    :meth:`matvec_flat` a vector of shape ``(flat.size,)`` to one of the same shape;
    :meth:`mixed_vjp` a tree shaped like ``params`` to one shaped like ``hparams``.

    Example:
        >>> op = bl.HessianOperator(lambda p, h: (h["l"] * p["w"] ** 2).sum(),
        ...                         {"w": torch.ones(3)}, {"l": torch.tensor(2.0)})
        >>> op.matvec({"w": torch.ones(3)})["w"]        # H = 2 l I = 4 I
        tensor([4., 4., 4.])
        >>> op.mixed_vjp({"w": torch.ones(3)})["l"]     # Σ 2 w ⊙ u
        tensor(6.)
    """

    def __init__(self, f: Callable[..., Tensor], params: Mapping[str, Tensor],
                 hparams: Optional[Mapping[str, Tensor]] = None, args: Sequence[Any] = (), *, mode: str = "auto",
                 penalty: Optional[Callable[..., Tensor]] = None, group: Any = None,
                 name: str = "HessianOperator") -> None:
        super().__init__(make_operator(f, params, hparams, args, mode=mode, penalty=penalty, group=group, name=name))


@with_twice_differentiable_kernels
def hvp(f: Callable[..., Tensor], params: Mapping[str, Tensor], v: Mapping[str, Tensor], *args: Any,
        mode: str = "auto") -> Tree:
    """Exact Hessian-vector product ``H v`` with ``H = ∇²_params f(params, *args)``.

    Args:
        f: ``f(params, *args) -> scalar``; ``params`` a tree.
        params: tree ``{name: Tensor[shape]}`` at which ``H`` is taken (not modified).
        v: tree with the same keys and shapes as ``params``.
        *args: further arguments of ``f`` (a batch, ...), not differentiated.
        mode: ``"auto"`` (double backward, falling back to forward-over-reverse
            when an op lacks a double-backward formula), ``"reverse"`` or ``"forward"``; or
            ``"gauss_newton"``: ``G v`` with the generalized Gauss-Newton ``G = Jᵀ H_ℓ J`` instead
            of ``H v``, for an ``f`` that returns one :class:`bilevel.losses.OutputLoss` value.

    Returns:
        Tree with the keys and shapes of ``params`` (detached).

    Raises:
        ShapeError: ``v`` does not match ``params``, or ``f`` is not scalar.

    Example:
        >>> f = lambda p, x: ((x @ p["w"]) ** 2).sum()
        >>> x = torch.randn(5, 3)
        >>> out = bl.hvp(f, {"w": torch.zeros(3)}, {"w": torch.ones(3)}, x)
        >>> torch.allclose(out["w"], 2 * x.T @ x @ torch.ones(3))
        True
    """
    params = check_tree(params, "bilevel.hvp", "params")
    check_like(params, check_tree(v, "bilevel.hvp", "v"), "bilevel.hvp", "params", "v")
    return make_operator(f, params, None, args, mode=mode, name="bilevel.hvp").matvec(v)


@with_twice_differentiable_kernels
def mixed_vjp(f: Callable[..., Tensor], params: Mapping[str, Tensor], hparams: Mapping[str, Tensor],
              u: Mapping[str, Tensor], *args: Any, mode: str = "auto") -> Tree:
    """Mixed product ``∇_hparams <∇_params f(params, hparams, *args), u>``.

    This is ``(∂²f/∂hparams∂params) u``, the second term of the implicit
    hypergradient (DESIGN.md §1).

    Args:
        f: ``f(params, hparams, *args) -> scalar``.
        params: tree (not modified).
        hparams: tree (not modified).
        u: tree with the keys and shapes of ``params``.
        *args: further arguments of ``f``, not differentiated.
        mode: as in :func:`hvp`.

    Returns:
        Tree with the keys and shapes of ``hparams`` (zeros where ``f``'s
        gradient in ``params`` does not depend on a hyperparameter).

    Example:
        >>> f = lambda p, h: 0.5 * (h["l"] * p["w"] ** 2).sum()      # ∇_w f = l ⊙ w
        >>> out = bl.mixed_vjp(f, {"w": torch.tensor([1., 2.])},
        ...                    {"l": torch.ones(2)}, {"w": torch.ones(2)})
        >>> out["l"]                                                  # w ⊙ u
        tensor([1., 2.])
    """
    params = check_tree(params, "bilevel.mixed_vjp", "params")
    hparams = check_tree(hparams, "bilevel.mixed_vjp", "hparams")
    check_like(params, check_tree(u, "bilevel.mixed_vjp", "u"), "bilevel.mixed_vjp", "params", "u")
    return make_operator(f, params, hparams, args, mode=mode, name="bilevel.mixed_vjp").mixed_vjp(u)
