"""Hessian-vector products and mixed second-order products.

Two ways to get ``H v`` in eager PyTorch, measured on this machine
(torch 2.13, CPU, 2 threads, MLP of ~1M parameters; ``benchmarks/bench_hvp.py``):

- ``"reverse"``: double backward. Build ``g = grad(f, w, create_graph=True)``
  once, then ``grad(g, w, v, retain_graph=True)`` per product. One product from
  scratch costs about 2.3-2.5 gradients; with the graph reused across the k
  products of one solve the marginal product costs 1.1-1.4 gradients (about 1.7-1.9 when a per-weight L2 term also goes through double backward; benchmarks/RESULTS.md).
- ``"forward"``: forward-over-reverse, ``torch.func.jvp(torch.func.grad(f))``.
  About 4 gradients per product and nothing to reuse in eager mode.

So ``mode="auto"`` uses ``"reverse"`` and falls back to ``"forward"`` when an
op of the loss lacks a double-backward formula (e.g. a custom
``autograd.Function`` marked ``once_differentiable``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ._rng import get_state as get_rng
from ._rng import replay as replay_rng
from ._errors import check_like, check_scalar, check_tree
from ._tree import Flat, Tree, tree_detach, tree_norm
from .distributed import all_reduce_mean_, all_reduce_mean_list, all_reduce_mean_tree, world_size

__all__ = ["hvp", "mixed_vjp", "HessianOperator", "SeparablePenalty", "HVP_MODES"]

HVP_MODES = ("auto", "reverse", "forward")


def reachable_leaves(roots: Sequence[Tensor | None]) -> set[int]:
    """``id``s of the leaf tensors that the autograd graphs of ``roots`` reach (a walk, no compute)."""
    seen: set[int] = set()
    out: set[int] = set()
    stack = [t.grad_fn for t in roots if t is not None and t.grad_fn is not None]
    out.update(id(t) for t in roots if t is not None and t.grad_fn is None and t.requires_grad)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None:
            out.add(id(var))
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return out


def _needs_fallback(err: BaseException) -> bool:
    msg = str(err).lower()
    return any(s in msg for s in ("derivative", "not implemented", "double backward",
                                  "differentiate twice", "once_differentiable"))


class SeparablePenalty:
    """A penalty ``P(params, hparams)`` whose Hessian in ``params`` is diagonal, kept out of the big graph.

    A per-weight L2 penalty ``½ Σ e^λ ⊙ w²`` inside the inner loss would add elementwise
    work over every weight to each double-backward product (about 0.5 gradient per
    product on the benchmark MLP, benchmarks/RESULTS.md). Its Hessian is diagonal, so
    ``H_P v = diag ⊙ v`` and the mixed term ``∇_λ <∇_w P, u>`` are one elementwise pass
    each. :class:`HessianOperator` uses this object when it is given ``penalty=``.

    The diagonal and the mixed product come from the penalty's own methods when it has
    them (``hessian_diag(params, hparams) -> tree`` and
    ``mixed_closed_form(params, hparams, u) -> tree``, as
    :class:`bilevel.hparams.WeightDecay` has), otherwise from autograd on the penalty's
    own small graph. A plain callable is checked once: ``H_P z`` for a random ±1 vector
    ``z`` must equal ``diag ⊙ z``; a penalty that couples weights raises ``ValueError``.

    Args:
        penalty: ``penalty(params, hparams) -> scalar``, separable in ``params``
            (each term depends on one weight; hyperparameters may be shared).
        params: tree of leaves with ``requires_grad=True`` (the operator's point).
        hparams: tree of leaves with ``requires_grad=True`` (may be empty).
        name: function name for error messages.

    Attributes:
        value: ``P`` at the point (0-dim, detached).
        grad: ``∇_params P`` (tree, zeros where ``P`` does not depend on a tensor).
        diag: ``∂²P/∂w²`` (tree like ``params``).

    Shapes: ``grad``, ``diag`` and the argument of :meth:`mixed_vjp` are trees shaped like
    ``params``; :meth:`mixed_vjp` returns a tree shaped like ``hparams``.

    Example:
        >>> p = {"w": torch.tensor([1., 2.], requires_grad=True)}
        >>> h = {"l": torch.zeros(2, requires_grad=True)}
        >>> sp = bl.SeparablePenalty(lambda p, h: 0.5 * (h["l"].exp() * p["w"] ** 2).sum(), p, h, "demo")
        >>> sp.value, sp.diag["w"]                                    # P and e^l
        (tensor(2.5000), tensor([1., 1.]))
        >>> sp.mixed_vjp({"w": torch.ones(2)})["l"]                   # e^l ⊙ w ⊙ u
        tensor([1., 2.])
    """

    def __init__(self, penalty: Callable[..., Tensor], params: Mapping[str, Tensor],
                 hparams: Mapping[str, Tensor], name: str) -> None:
        if not callable(penalty):
            raise TypeError(f"{name}: expected `penalty` to be a callable penalty(params, hparams) -> scalar "
                            f"(e.g. the penalty of bl.hparams.weight_decay), got {type(penalty).__name__}.")
        self._name = name
        self._penalty = penalty
        self._params = params
        self._hparams = hparams
        closed = callable(getattr(penalty, "hessian_diag", None)) and callable(getattr(penalty, "mixed_closed_form", None))
        leaves = list(params.values())
        with torch.enable_grad():
            value = check_scalar(penalty(params, hparams), name, "penalty(params, hparams)")
            grads = torch.autograd.grad(value, leaves, create_graph=not closed, allow_unused=True) \
                if value.requires_grad else [None] * len(leaves)
        reach = reachable_leaves([value])
        #: keys of ``hparams`` the penalty's value depends on
        self.hparams_in_value = {k for k, h in hparams.items() if id(h) in reach}
        self.value = value.detach()
        self.grad: Tree = {k: torch.zeros_like(p) if g is None else g.detach()
                           for (k, p), g in zip(params.items(), grads)}
        self._g = None
        if closed:
            d = penalty.hessian_diag(tree_detach(params), tree_detach(hparams))
            self.diag: Tree = {k: (d[k].detach().expand_as(p) if k in d else torch.zeros_like(p)).to(p.dtype)
                               for k, p in params.items()}
            return
        live = [(k, g) for k, g in zip(params, grads) if g is not None and g.requires_grad]
        self._g = live
        self.diag = {k: torch.zeros_like(p) for k, p in params.items()}
        if not live:
            return
        ones = [torch.ones_like(g) for _, g in live]
        self.diag.update(self._hvp_live(ones))
        # One probe: a coupled penalty would give H z != diag ⊙ z for a random ±1 vector z.
        gen = torch.Generator(device="cpu").manual_seed(12345)
        z = [(torch.randint(0, 2, g.shape, generator=gen).to(g) * 2 - 1) for _, g in live]
        hz = self._hvp_live(z)
        for (k, _), zk in zip(live, z):
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
            out = self._penalty.mixed_closed_form(tree_detach(self._params), tree_detach(self._hparams), u)
            return {k: (out[k].detach() if k in out else torch.zeros_like(h)) for k, h in self._hparams.items()}
        if not self._g or not self._hparams:
            return {k: torch.zeros_like(h) for k, h in self._hparams.items()}
        with torch.enable_grad():
            out = torch.autograd.grad([g for _, g in self._g], list(self._hparams.values()),
                                      grad_outputs=[u[k] for k, _ in self._g], retain_graph=True, allow_unused=True)
        return {k: torch.zeros_like(h) if o is None else o for (k, h), o in zip(self._hparams.items(), out)}


class HessianOperator:
    """``H = ∇²_params f(params, hparams, *args)`` at one point, as a linear operator.

    Builds the graph of ``g = ∇_params f`` once and reuses it for every product
    (``retain_graph=True``): the k products of one linear solve cost about
    ``1 + 1.4 k`` gradients instead of ``2.4 k`` (1.6 per product when a per-weight
    decay goes through double backward instead of ``penalty=``; benchmarks/RESULTS.md).
    The same graph also gives the mixed product ``∇_hparams <g, u>`` of the implicit hypergradient.

    Args:
        f: ``f(params, hparams, *args) -> scalar`` (or ``f(params, *args)`` when
            ``hparams`` is ``None``).
        params: tree at which to linearize; detached copies are used, the
            originals are not modified.
        hparams: tree of hyperparameters, or ``None``.
        args: extra positional arguments of ``f`` (e.g. a batch).
        mode: ``"auto"`` | ``"reverse"`` (double backward, graph reused) |
            ``"forward"`` (forward-over-reverse with ``torch.func``).
        penalty: optional ``penalty(params, hparams) -> scalar`` with a diagonal Hessian in
            ``params`` (e.g. ``bl.hparams.weight_decay``'s penalty), *added* to ``f``. Its
            Hessian and mixed term are applied elementwise (:class:`SeparablePenalty`)
            instead of going through double backward with the rest of the loss.
        group: a ``torch.distributed`` process group: the loss, gradient, every product and
            the mixed product are averaged over its ranks (data parallelism; see
            :mod:`bilevel.distributed`). ``None``: one process.

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

    def __init__(
        self,
        f: Callable[..., Tensor],
        params: Mapping[str, Tensor],
        hparams: Mapping[str, Tensor] | None = None,
        args: Sequence[Any] = (),
        *,
        mode: str = "auto",
        penalty: Callable[..., Tensor] | None = None,
        group: Any = None,
        name: str = "HessianOperator",
    ) -> None:
        if mode not in HVP_MODES:
            raise ValueError(f"{name}: expected mode in {HVP_MODES}, got {mode!r}.")
        params = check_tree(params, name, "params")
        self._name = name
        self._f = f
        self._with_h = hparams is not None
        self._args = tuple(args)
        self.params = tree_detach(params, requires_grad=True)
        self.hparams = tree_detach(check_tree(hparams, name, "hparams"), requires_grad=True) if hparams is not None else {}
        self.flat = Flat(self.params)
        self.matvecs = 0
        self.mode = "reverse" if mode == "auto" else mode
        self._auto = mode == "auto"
        # A structured loss (bilevel.losses) declares its Hessian: "auto" uses the closed form.
        self._structured = callable(getattr(f, "hvp", None))   # takes hparams always (bilevel.losses)
        self._closed = mode == "auto" and self._structured
        if self._closed:
            self.mode = "closed"
        # Forward-mode products re-run f: they replay this RNG state so that dropout draws the
        # same mask as the pass below (one Hessian, not a different one per product).
        self._rng = get_rng()
        with torch.enable_grad():
            loss = check_scalar(self._call(self.params, self.hparams), name, "the loss")
            keep = self.mode == "reverse"          # closed form / forward mode: no graph to keep
            grads = torch.autograd.grad(loss, list(self.params.values()), create_graph=keep, allow_unused=True)
        self._group = group
        self._reach = reachable_leaves([loss])     # which leaves the loss depends on (a graph walk)
        self._g = grads
        self.grad: Tree = {k: (torch.zeros_like(p) if g is None else g.detach()) for (k, p), g in zip(self.params.items(), grads)}
        if world_size(group) > 1:        # the data term's loss and gradient, averaged over ranks
            red = all_reduce_mean_list([loss.detach(), *self.grad.values()], group)
            loss, self.grad = red[0], dict(zip(self.grad, red[1:]))
        self.loss = loss.detach()
        self._pen: SeparablePenalty | None = None
        self._pen_diag: Tensor | None = None
        if penalty is not None:
            self._pen = SeparablePenalty(penalty, self.params, self.hparams, name)
            self._pen_diag = self.flat.flatten(self._pen.diag)
            self.loss = self.loss + self._pen.value
            self.grad = {k: g + self._pen.grad[k] for k, g in self.grad.items()}
        self.grad_norm = tree_norm(self.grad)
        # A structured loss may prepare its Hessian once per point (e.g. the logistic row curvatures).
        prepare = getattr(f, "hessian", None) if self._closed else None
        self._hess = prepare(tree_detach(self.params), tree_detach(self.hparams), *self._args) \
            if callable(prepare) else None
        # Only gradient leaves that carry a graph have a non-zero Hessian row.
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        # NOTE: a gradient that exists but carries no graph means either a loss that is
        # linear in that tensor, or an op whose backward is not differentiable (a custom
        # autograd.Function with once_differentiable, a detach inside a backward). Double
        # backward would then silently give a zero Hessian row. Forward-over-reverse gets
        # both cases right (or fails loudly), so "auto" switches to it.
        self._dead = [k for (k, _), g in zip(self.params.items(), grads) if g is not None and not g.requires_grad]
        self._forced_forward = False
        if self._dead and self.mode == "reverse":
            if self._auto:
                self._forced_forward = True
                self._switch_to_forward()
            else:
                warnings.warn(
                    f"{name}: the gradient of {self._dead} carries no autograd graph, so mode='reverse' takes "
                    f"their Hessian rows as zero. That is right only if the loss is linear in them; otherwise "
                    f"an op's backward is not differentiable (once_differentiable). Use mode='auto' or 'forward'.",
                    stacklevel=3,
                )

    # -- evaluation helpers -------------------------------------------------
    def _call(self, params: Mapping[str, Tensor], hparams: Mapping[str, Tensor]) -> Tensor:
        if self._with_h or self._structured:      # structured losses always take hparams
            return self._f(params, hparams, *self._args)
        return self._f(params, *self._args)

    def _release(self) -> None:
        self._g = None

    def _switch_to_forward(self) -> None:
        self.mode = "forward"
        self._release()

    # -- products -----------------------------------------------------------
    def _dispatch(self, reverse: Callable[[Any], Any], forward: Callable[[Any], Any], arg: Any) -> Any:
        """Run ``reverse(arg)``; in "auto" mode fall back to ``forward(arg)`` for a missing derivative."""
        if self.mode == "reverse":
            try:
                return reverse(arg)
            except (RuntimeError, NotImplementedError) as err:
                if not (self._auto and _needs_fallback(err)):
                    raise
                self._switch_to_forward()
        try:
            return forward(arg)
        except (RuntimeError, NotImplementedError) as err:
            if not self._forced_forward:
                raise
            raise RuntimeError(
                f"{self._name}: cannot take Hessian products: the gradient of {self._dead} carries no autograd "
                f"graph under double backward (an op's backward is not differentiable, e.g. a custom "
                f"autograd.Function marked once_differentiable), and forward-over-reverse failed too "
                f"({type(err).__name__}: {err}). Fix: give that autograd.Function a differentiable backward "
                f"or a jvp (forward-mode) rule."
            ) from err

    def matvec_flat(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` of shape ``(flat.size,)``; returns the same shape."""
        self.matvecs += 1
        if self._closed:
            vt = self.flat.unflatten(v.to(self.flat.dtype))
            hv = self._hess(vt) if self._hess is not None else \
                self._f.hvp(tree_detach(self.params), tree_detach(self.hparams), vt, *self._args)
            out = self.flat.flatten_list([hv.get(k) for k in self.flat.keys])
        else:
            out = self._dispatch(self._matvec_reverse,
                                 lambda x: self.flat.flatten(self._matvec_forward(self.flat.unflatten(x))), v)
        all_reduce_mean_(out, self._group)          # every product of a data-parallel solve is averaged
        if self._pen_diag is not None:
            out = out.addcmul_(self._pen_diag, v.to(out.dtype))   # `out` is a fresh buffer
        return out

    def matvec(self, v: Mapping[str, Tensor]) -> Tree:
        """``H v`` for a tree ``v`` with the keys and shapes of ``params``."""
        check_like(self.params, v, f"{self._name}.matvec", "params", "v")
        return {k: t.clone() for k, t in self.flat.unflatten(self.matvec_flat(self.flat.flatten(v))).items()}

    def _matvec_reverse(self, v: Tensor) -> Tensor:
        if not self._live:
            return torch.zeros_like(v)
        views = self.flat.unflatten(v.to(self.flat.dtype))
        keys = self.flat.keys
        outs = [self._g[i] for i in self._live]
        gos = [views[keys[i]] for i in self._live]
        with torch.enable_grad():
            hv = torch.autograd.grad(outs, list(self.params.values()), grad_outputs=gos,
                                     retain_graph=True, allow_unused=True)
        return self.flat.flatten_list(hv)

    def _matvec_forward(self, v: Mapping[str, Tensor]) -> Tree:
        h = tree_detach(self.hparams)
        grad_w = torch.func.grad(lambda p: self._call(p, h))
        with torch.enable_grad(), replay_rng(self._rng):
            _, out = torch.func.jvp(grad_w, (tree_detach(self.params),), (dict(v),))
        return out

    def mixed_vjp(self, u: Mapping[str, Tensor]) -> Tree:
        """``∇_hparams <∇_params f, u>`` (keys of ``hparams``); ``u`` has the layout of ``params``."""
        if not self._with_h:
            raise ValueError(f"{self._name}.mixed_vjp: this operator was built without hparams.")
        check_like(self.params, u, f"{self._name}.mixed_vjp", "params", "u")
        if self._closed:
            out = self._mixed_closed(dict(u))
        else:
            out = self._dispatch(self._mixed_reverse, self._mixed_forward, dict(u))
        if world_size(self._group) > 1:
            out = all_reduce_mean_tree(out, self._group)
        if self._pen is not None:
            pm = self._pen.mixed_vjp(u)
            out = {k: o + pm[k] for k, o in out.items()}
        return out

    def _mixed_reverse(self, u: Mapping[str, Tensor]) -> Tree:
        hp = list(self.hparams.values())
        keys = self.flat.keys
        if not self._live:
            return {k: torch.zeros_like(v) for k, v in self.hparams.items()}
        with torch.enable_grad():
            out = torch.autograd.grad([self._g[i] for i in self._live], hp,
                                      grad_outputs=[u[keys[i]] for i in self._live],
                                      retain_graph=True, allow_unused=True)
        return {k: (torch.zeros_like(h) if o is None else o) for (k, h), o in zip(self.hparams.items(), out)}

    def hparams_in_loss(self) -> set[str]:
        """Keys of the hyperparameters that the loss (with the penalty) depends on at all."""
        keys = {k for k, h in self.hparams.items() if id(h) in self._reach}
        if self._pen is not None:
            keys |= self._pen.hparams_in_value
        return keys

    def _mixed_closed(self, u: Mapping[str, Tensor]) -> Tree:
        mixed = getattr(self._f, "mixed_vjp", None)
        if callable(mixed):
            out = mixed(tree_detach(self.params), tree_detach(self.hparams), u, *self._args)
            return {k: (out[k] if k in out else torch.zeros_like(h)) for k, h in self.hparams.items()}
        # no declared mixed term: one gradient graph, built now (the products did not need it)
        with torch.enable_grad():
            loss = self._call(self.params, self.hparams)
            g = torch.autograd.grad(loss, list(self.params.values()), create_graph=True, allow_unused=True)
            pairs = [(gi, u[k]) for k, gi in zip(self.params, g) if gi is not None and gi.requires_grad]
            if not pairs:
                return {k: torch.zeros_like(h) for k, h in self.hparams.items()}
            out = torch.autograd.grad([a for a, _ in pairs], list(self.hparams.values()),
                                      grad_outputs=[b for _, b in pairs], allow_unused=True)
        return {k: torch.zeros_like(h) if o is None else o for (k, h), o in zip(self.hparams.items(), out)}

    def _mixed_forward(self, u: Mapping[str, Tensor]) -> Tree:
        # Symmetry of mixed partials: ∇_h <∇_w f, u> = d/dε ∇_h f(w + εu, h).
        h = tree_detach(self.hparams)
        grad_h = torch.func.grad(lambda p, hh: self._call(p, hh), argnums=1)
        with torch.enable_grad(), replay_rng(self._rng):
            _, out = torch.func.jvp(lambda p: grad_h(p, h), (tree_detach(self.params),), (dict(u),))
        return dict(out)


def hvp(f: Callable[..., Tensor], params: Mapping[str, Tensor], v: Mapping[str, Tensor], *args: Any,
        mode: str = "auto") -> Tree:
    """Exact Hessian-vector product ``H v`` with ``H = ∇²_params f(params, *args)``.

    Args:
        f: ``f(params, *args) -> scalar``; ``params`` a tree.
        params: tree ``{name: Tensor[shape]}`` at which ``H`` is taken (not modified).
        v: tree with the same keys and shapes as ``params``.
        *args: further arguments of ``f`` (a batch, ...), not differentiated.
        mode: ``"auto"`` (double backward, falling back to forward-over-reverse
            when an op lacks a double-backward formula), ``"reverse"`` or ``"forward"``.

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
    op = HessianOperator(f, params, None, args, mode=mode, name="bilevel.hvp")
    return op.matvec(v)


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
    op = HessianOperator(f, params, hparams, args, mode=mode, name="bilevel.mixed_vjp")
    return op.mixed_vjp(u)
