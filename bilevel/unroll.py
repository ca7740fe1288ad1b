"""Unrolled hypergradients: differentiate through ``steps`` steps of a differentiable optimizer.

``w_{t+1}, s_{t+1} = opt.step(w_t, ∇_w L_T(w_t, λ; batch_t), s_t, λ)`` from ``w_0 = params``
(a constant), then ``dL_V(w_T, λ)/dλ``. Four ways to get the same derivative:

==============  ==============================  =====================================
mode            memory                          cost
==============  ==============================  =====================================
``reverse``     O(T·(P + activations))          ≈ 3-4 gradients per step
``truncate=K``  O(K·...), biased (last K steps)  same per differentiated step
``checkpoint``  O(√T·P) states + one step graph ≈ reverse + one more forward per step
``forward``     O(m·P), independent of T        ∝ m = number of hyperparameter entries
==============  ==============================  =====================================

The optimizer state (momentum buffers, Adam moments) is carried, differentiated
and cut by truncation like the parameters. Two more derivatives of the same unroll:
``init_grad=True`` (reverse, checkpoint) also gives ``dL_V/dw_0``, MAML's meta-gradient, and
``weights_jacobian=True`` (forward) the Jacobian ``dw_T/dλ`` whose columns forward mode pushes anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._errors import check_finite_scalar, check_finite_tree, check_scalar, check_tree
from ._tree import Flat, Tree, tree_detach, tree_norm
from ._rng import get_state as get_rng
from ._rng import set_state as set_rng
from ._autograd import detach_state, grads_or_zeros, reachable_leaves
from ._forward_ad import CallsMseLoss, fixes_for
from ._result import Hypergrad
from ._second_order import with_twice_differentiable_kernels
from .inner import InnerOptimizer
from .distributed import all_reduce_mean_grads, all_reduce_mean_list, check_group

__all__ = ["unrolled_hypergrad", "finite_difference_hypergrad", "UnrollInfo", "UNROLL_MODES"]

UNROLL_MODES = ("reverse", "forward", "checkpoint", "replay")
Args = Union[Sequence[Any], Callable[[int], Sequence[Any]]]


@dataclass
class UnrollInfo:
    """Diagnostics of one unrolled hypergradient.

    Attributes:
        mode: ``"reverse"``, ``"forward"`` or ``"checkpoint"``.
        steps: inner steps run; ``differentiated``: how many of them are differentiated.
        outer_loss: ``L_V`` at the final params.
        inner_loss: ``L_T`` at the last step (before its update).
        inner_grad_norm: ``‖∇_w L_T‖`` at the last step.
        state: the optimizer state after the last step (detached; to continue training).
        checkpoint_every: spacing of stored states in checkpoint mode (else ``None``).
        replay_k: branching factor of the replay tree in replay mode (else ``None``).
        stored_states_max: checkpoint and replay modes: the most states (weights, optimizer state and
            RNG state of one step) held at once; replay holds at most ``k·⌈log_k K⌉ + 1``.
        forward_steps: inner steps evaluated in all (a differentiated step of reverse mode counts once;
            checkpoint and replay modes count the training run, the recomputations and the rebuilt
            one-step graphs: replay at most ``(1 + ⌈log_k K⌉)·K``; forward mode counts traced steps).
        weights_jacobian: with ``weights_jacobian=True`` (forward mode), the Jacobian of the final
            params with respect to the hyperparameters: ``{param key: Tensor (m, *param.shape)}``, row
            ``i`` being ``dw_T/dλ · e_i`` for the ``i``-th of the ``m`` hyperparameter entries, counted
            key by key in the order of ``hparams``, each flattened row-major (so
            ``torch.cat([v.reshape(-1) for v in hparams.values()])[i]`` is entry ``i``). Else ``None``.

    Example:
        >>> inner = lambda p, h: 0.5 * ((p["w"] - h["c"]) ** 2).sum()
        >>> hg, w = bl.unrolled_hypergrad(inner, lambda p, h: (p["w"] ** 2).sum(), {"w": torch.zeros(2)},
        ...                               {"c": torch.ones(2)}, optimizer=bl.inner.SGD(lr=0.5), steps=10, truncate=4)
        >>> info = hg.info
        >>> info.mode, info.steps, info.differentiated, info.checkpoint_every
        ('reverse', 10, 4, None)
    """

    mode: str
    steps: int
    differentiated: int
    outer_loss: float
    inner_loss: float
    inner_grad_norm: float
    state: Any
    checkpoint_every: Optional[int] = None
    replay_k: Optional[int] = None
    stored_states_max: Optional[int] = None
    forward_steps: Optional[int] = None
    weights_jacobian: Optional[Tree] = None


# -- helpers ------------------------------------------------------------------------------------
def _args_at(args: Args, t: int) -> tuple:
    out = args(t) if callable(args) else args
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class _Stepper:
    """One inner step ``(w, s) -> (w', s')`` with autograd (reverse modes) or torch.func (forward mode).

    A parameter that does not reach the inner loss gets the gradient ``None`` ("no gradient"), so the
    optimizer skips it as ``torch.optim`` does (no update, no decay, state untouched).
    """

    def __init__(self, inner_loss: Callable[..., Tensor], optimizer: InnerOptimizer, inner_args: Args, fn: str,
                 group: Any = None):
        self.inner_loss, self.opt, self.inner_args, self.fn = inner_loss, optimizer, inner_args, fn
        self.group = group
        self.first_loss: Optional[Tensor] = None
        self.track_first = False                     # reverse mode: keep the first step's loss graph
        self.checked = False
        self.last_loss: Optional[Tensor] = None
        self._last_grads: Optional[dict] = None      # the last step's gradients (detached), for the norm
        self._last_gnorm: Optional[Tensor] = None
        self.unused: frozenset = frozenset()         # forward mode: keys without gradient (find_unused)
        self.calls_mse_loss = False                  # forward mode: seen by find_unused
        self.evaluated = 0                           # steps evaluated, recomputations included
        self.stored_states_max: Optional[int] = None

    def _loss(self, w: Tree, h: Tree, t: int) -> Tensor:
        self.evaluated += 1
        loss = self.inner_loss(w, h, *_args_at(self.inner_args, t))
        if not self.checked:
            loss = check_scalar(loss, self.fn, "inner_loss")
            self.checked = True
        return loss.reshape(())

    @property
    def last_gnorm(self) -> Optional[Tensor]:
        """``‖∇_w L_T‖`` of the last step, computed when read (not at every step: a reduction over all
        the weights per step, and a host sync where it is read, would slow a long unroll for nothing)."""
        if self._last_gnorm is None and self._last_grads is not None:
            self._last_gnorm = self._norm(self._last_grads, self.last_loss)
            self._last_grads = None
        return self._last_gnorm

    @last_gnorm.setter
    def last_gnorm(self, value: Optional[Tensor]) -> None:
        self._last_gnorm, self._last_grads = value, None

    @staticmethod
    def _norm(g: Mapping[str, Optional[Tensor]], like: Tensor) -> Tensor:
        used = {k: v for k, v in g.items() if v is not None}
        return tree_norm(used) if used else torch.zeros((), dtype=like.dtype, device=like.device)

    def autograd(self, w: Tree, s: Any, h: Tree, t: int, create_graph: bool) -> tuple[Tree, Any]:
        """A step; with ``create_graph`` it is differentiable in ``w``, ``s`` and ``h``."""
        with torch.enable_grad():
            if not create_graph:                     # no graph through the hyperparameters either
                w, h = tree_detach(w, requires_grad=True), tree_detach(h)
            loss = self._loss(w, h, t)
            if create_graph and self.track_first and self.first_loss is None:
                self.first_loss = loss              # for the check that every hparam is used
            gl = list(torch.autograd.grad(loss, list(w.values()), create_graph=create_graph, allow_unused=True))
            # the global batch's gradient and loss (differentiable when unrolled); no-op in one process
            gl, loss = all_reduce_mean_grads(gl, list(w.values()), loss, self.group, differentiable=create_graph)
        g = dict(zip(w, gl))
        self.last_loss = loss.detach()
        self._last_grads, self._last_gnorm = {k: None if v is None else v.detach() for k, v in g.items()}, None
        if create_graph:
            return self.opt.step(w, g, s, h)
        with torch.no_grad():                        # outputs without graph: no detach walk of the state
            w2, s2 = self.opt.step(tree_detach(w), g, s, h)
        return tree_detach(w2), s2

    def find_unused(self, w: Tree, h: Tree, t: int) -> None:
        """Forward mode: record the keys of ``w`` that the inner loss at step ``t`` does not reach.

        NOTE: ``torch.func.grad`` returns zeros, not ``None``, for an input that does not reach the
        output, so forward mode cannot see per step which parameters get no gradient. The loss is
        evaluated once, outside the transforms, at the first differentiated step (a plain forward,
        no backward: a walk of its graph; the RNG state is restored so the unrolled steps draw the
        same dropout masks), and those keys get ``None`` at every step. A parameter unused at the
        first step but used later would lose real gradients: :meth:`functional` returns the squared
        norm of the gradients it dropped, and forward mode refuses a nonzero one. (A parameter used
        at the first step and unused later gets zeros, as before: indistinguishable there.)
        """

        rng = get_rng()
        with torch.enable_grad(), CallsMseLoss() as calls:
            wl = tree_detach(w, requires_grad=True)
            reach = reachable_leaves([self._loss(wl, tree_detach(h), t)])
        set_rng(rng)
        self.unused = frozenset(k for k, v in wl.items() if id(v) not in reach)
        self.calls_mse_loss = calls.seen

    def functional(self, w: Tree, s: Any, h: Tree, t: int) -> tuple[Tree, Any, Tensor, Tensor, Tensor]:
        """A step under torch.func transforms; also returns the loss, the gradient norm and the squared
        norm of the gradients of the keys in :attr:`unused` (zero unless they reach the loss after all)."""
        g, loss = torch.func.grad_and_value(lambda ww: self._loss(ww, h, t))(w)
        dropped = [g[k].pow(2).sum() for k in self.unused]
        stray = torch.stack(dropped).sum() if dropped else torch.zeros((), dtype=loss.dtype, device=loss.device)
        g = {k: None if k in self.unused else v for k, v in g.items()}
        w2, s2 = self.opt.step(w, g, s, h)
        return w2, s2, loss, self._norm(g, loss), stray


def _outer(outer_loss: Callable[..., Tensor], w: Tree, h: Tree, outer_args: tuple, fn: str) -> Tensor:
    return check_scalar(outer_loss(w, h, *outer_args), fn, "outer_loss")


# -- the modes ------------------------------------------------------------------------------------
def _reverse(step: _Stepper, outer_loss, w: Tree, s: Any, h: Tree, t0: int, T: int, outer_args, fn,
             init_grad: bool = False):
    step.track_first = True
    w = tree_detach(w, requires_grad=True)
    w0 = w
    s = detach_state(s)
    with torch.enable_grad():
        for t in range(t0, T):
            w, s = step.autograd(w, s, h, t, create_graph=True)
        lv = _outer(outer_loss, w, h, outer_args, fn)
        reach = reachable_leaves([lv, step.first_loss])
        unused = [k for k, v in h.items() if id(v) not in reach]
        if unused:
            raise ValueError(
                f"{fn}: expected every hyperparameter to reach the losses or the optimizer, got {unused} reaching "
                f"neither (their hypergradient would be zero forever). Fix: remove them from hparams, or read "
                f"them as hparams[key] inside a loss / name them in the optimizer (e.g. lr='lr').")
        g = grads_or_zeros(lv, [*h.values(), *(w0.values() if init_grad else ())])
    extra = {"init_grad": dict(zip(w0, g[len(h):]))} if init_grad else {}
    return dict(zip(h, g[:len(h)])), tree_detach(w), detach_state(s), lv.detach(), extra


def _checkpoint(step: _Stepper, outer_loss, w: Tree, s: Any, h: Tree, t0: int, T: int, outer_args, fn,
                every: int, init_grad: bool = False):
    # Forward: run without graph, keep (w, s, rng) every `every` steps.
    ckpts: dict[int, tuple] = {}
    w, s = tree_detach(w), detach_state(s)
    for t in range(t0, T):
        if (t - t0) % every == 0:
            ckpts[t] = (w, s, get_rng())
        w, s = step.autograd(w, s, h, t, create_graph=False)
    rng_end = get_rng()
    last_loss, last_gnorm = step.last_loss, step.last_gnorm
    w_final, s_final = w, s
    lv, a_w, a_s, hg = _outer_adjoint(outer_loss, w, s, h, outer_args, fn)
    peak = len(ckpts)
    # Backward: segments from last to first; recompute each segment's states from its checkpoint,
    # then take one vector-Jacobian product per step through a freshly built one-step graph.
    for start in sorted(ckpts, reverse=True):
        end = min(start + every, T)
        w, s, rng = ckpts.pop(start)
        set_rng(rng)
        seg = []
        for t in range(start, end):
            seg.append((w, s, get_rng()))
            if t < end - 1:
                w, s = step.autograd(w, s, h, t, create_graph=False)
        peak = max(peak, len(ckpts) + len(seg))
        for t in range(end - 1, start - 1, -1):
            a_w, a_s, hg = _step_vjp(step, *seg.pop(), h, t, a_w, a_s, hg)
    set_rng(rng_end)
    step.last_loss, step.last_gnorm = last_loss, last_gnorm
    step.stored_states_max = peak
    # after the last pullback a_w is the adjoint of w_{t0}: dL_V/dw_0 (the initial state is a constant)
    extra = {"init_grad": dict(zip(w_final, a_w))} if init_grad else {}
    return dict(zip(h, hg)), w_final, s_final, lv.detach(), extra


def _outer_adjoint(outer_loss, w: Tree, s: Any, h: Tree, outer_args, fn):
    """``L_V(w_T)`` and the adjoints where the backward sweep starts: ``∂L_V/∂w_T``, none for the
    optimizer state (``L_V`` does not read it), and the direct term ``∂_λ L_V``."""
    with torch.enable_grad():
        wl = tree_detach(w, requires_grad=True)
        lv = _outer(outer_loss, wl, h, outer_args, fn)
        g = grads_or_zeros(lv, list(wl.values()) + list(h.values()))
    a_s: list[Optional[Tensor]] = [None] * len(pytree.tree_flatten(s)[0])
    return lv, g[: len(wl)], a_s, g[len(wl):]


def _step_vjp(step: _Stepper, w_t: Tree, s_t: Any, rng_t, h: Tree, t: int, a_w, a_s, hg):
    """One vector-Jacobian product through step ``t`` rebuilt from its stored input ``(w_t, s_t)``
    and RNG state: the adjoints ``(a_w, a_s)`` of its output become those of its input, and its
    contribution is added to the hypergradient ``hg``."""
    set_rng(rng_t)
    hl = list(h.values())
    wl = tree_detach(w_t, requires_grad=True)
    sl = detach_state(s_t, requires_grad=True)
    with torch.enable_grad():
        w1, s1 = step.autograd(wl, sl, h, t, create_graph=True)
        s1_leaves = pytree.tree_flatten(s1)[0]
        sl_leaves = pytree.tree_flatten(sl)[0]
        outs, gos = [], []
        for o, a in zip(list(w1.values()) + s1_leaves, list(a_w) + a_s):
            if isinstance(o, Tensor) and o.requires_grad and a is not None:
                outs.append(o)
                gos.append(a)
        s_in = [x for x in sl_leaves if isinstance(x, Tensor) and x.requires_grad]
        inputs = list(wl.values()) + s_in + hl
        gr = torch.autograd.grad(outs, inputs, gos, allow_unused=True) if outs else [None] * len(inputs)
    nw, ns = len(wl), len(s_in)
    a_w = [torch.zeros_like(x) if gi is None else gi for x, gi in zip(wl.values(), gr[:nw])]
    it = iter(gr[nw:nw + ns])
    a_s = [next(it) if (isinstance(x, Tensor) and x.requires_grad) else None for x in sl_leaves]
    hg = [acc if gi is None else acc + gi for acc, gi in zip(hg, gr[nw + ns:])]
    step._last_grads = None                          # this graph's gradients: not the run's last step
    return a_w, a_s, hg


def _replay_tolerance(loss: Tensor) -> float:
    # NOTE: on the CPU a replayed step runs the very same kernels on the very same inputs, so its
    # loss is bit-identical to the training run's (tolerance 0: any difference is a batch or a state
    # that changed). GPU kernels may reduce in a different order from call to call (atomics), so there
    # a relative difference up to √eps of the dtype (3.5e-4 float32, 1.5e-8 float64) is accepted.
    return 0.0 if loss.device.type == "cpu" else math.sqrt(torch.finfo(loss.dtype).eps)


def _replay(step: _Stepper, outer_loss, w: Tree, s: Any, h: Tree, t0: int, T: int, outer_args, fn, k: int):
    """REPLAY (Engstrom et al. 2025): exact reverse mode through ``T − t0`` steps, storing states only
    at the points of a k-ary subdivision of the run and recomputing the rest recursively.

    NOTE: a segment ``[a, b)`` whose input state is stored is cut into ≤ k chunks of ``⌈(b−a)/k⌉``
    steps; one forward pass from ``a`` stores the chunks' starts, then the chunks are reversed last to
    first, each recursively, and each stored state is dropped once its chunk is done. Depth
    ``D = ⌈log_k n⌉``, so at most ``k + (k−1)(D−1) ≤ k·D`` states are alive at once. The training
    run itself stores the top level's points; every deeper level recomputes at most ``n`` steps and
    the leaves rebuild each step once with a graph, so at most ``(1 + D)·n`` steps are evaluated.
    Each step's inner loss from the training run is kept (one scalar per step) and every recomputed
    step must reproduce it (:func:`_replay_tolerance`): a batch callable that is not a function of
    ``t`` would otherwise give the derivative of a run that never happened.
    """
    n = T - t0
    if n == 1:                                       # one step: its graph is the one stored state
        step.stored_states_max = 1
        return _reverse(step, outer_loss, w, s, h, t0, T, outer_args, fn)[:4]
    store: dict[int, tuple] = {}                     # t -> (w_t, s_t, rng before step t)
    losses: list[Tensor] = []                        # one buffer of n losses, not n 0-dim tensors
    peak = [0]

    def keep(t: int, ww: Tree, ss: Any) -> None:
        store[t] = (ww, ss, get_rng())
        peak[0] = max(peak[0], len(store))

    def cuts(a: int, b: int) -> list[int]:
        return list(range(a, b, math.ceil((b - a) / k)))

    def check(t: int) -> None:
        got, want = step.last_loss, losses[0][t - t0]
        tol = _replay_tolerance(want)
        same = torch.equal(got, want) if tol == 0 else bool((got - want).abs() <= tol * max(1.0, float(want.abs())))
        if not same:
            raise RuntimeError(
                f"{fn}: mode='replay' recomputed step {t} from a stored state and got the inner loss "
                f"{float(got)!r}, but {float(want)!r} in the training run (expected the same: tolerance "
                f"{'0, bit-exact on the CPU' if tol == 0 else f'{tol:.1e} relative'}). The step is not a "
                f"function of (params, optimizer state, RNG state, t) alone: `inner_args(t)` returned another "
                f"batch for the same t, or inner_loss reads state that changes between calls (a counter, a "
                f"module buffer). Fix: make inner_args(t) depend only on t (index a fixed list, or seed a "
                f"torch.Generator with t), keep mutable state out of inner_loss, or use mode='reverse'.")

    def replayed(ww: Tree, ss: Any, t: int, create_graph: bool) -> tuple[Tree, Any]:
        try:
            out = step.autograd(ww, ss, h, t, create_graph=create_graph)
        except Exception as err:
            raise RuntimeError(f"{fn}: mode='replay' recomputes step {t} from a stored state, and the step "
                               f"(inner_args({t}) or inner_loss) raised {type(err).__name__}: {err}. Expected "
                               f"a step that can be evaluated again for the same t. Fix: make inner_args(t) "
                               f"a pure function of t (no iterator that runs out), or use mode='reverse'.") from err
        check(t)
        return out

    # NOTE: the adjoints (a_w, a_s, hg) travel in a one-element list, replaced in place, and no frame
    # of the recursion keeps a state or an adjoint in a local: else each of the D levels would hold a
    # stale adjoint and its last recomputed state until it returns (D·(3P + m) more memory than counted).
    def reverse(a: int, b: int, adj: list) -> None:
        if b - a == 1:
            w_t, s_t, rng_t = store.pop(a)
            adj.append(_step_vjp(step, w_t, s_t, rng_t, h, a, *adj.pop()))
            check(a)
            return
        pts = cuts(a, b)
        if pts[-1] not in store:                      # the training run stored the top level
            ww, ss, rng = store[a]
            set_rng(rng)
            t = a
            for nxt in pts[1:]:
                while t < nxt:
                    ww, ss = replayed(ww, ss, t, create_graph=False)
                    t += 1
                keep(t, ww, ss)
            del ww, ss
        for lo, hi in reversed(list(zip(pts, pts[1:] + [b]))):
            reverse(lo, hi, adj)

    w, s = tree_detach(w), detach_state(s)
    top = set(cuts(t0, T))
    for t in range(t0, T):                           # the training run
        if t in top:
            keep(t, w, s)
        w, s = step.autograd(w, s, h, t, create_graph=False)
        if not losses:
            losses.append(step.last_loss.new_empty(n))
        losses[0][t - t0] = step.last_loss
    rng_end = get_rng()
    last_loss, last_gnorm = step.last_loss, step.last_gnorm
    lv, *adjoints = _outer_adjoint(outer_loss, w, s, h, outer_args, fn)
    adj = [tuple(adjoints)]
    del adjoints
    reverse(t0, T, adj)
    hg = adj.pop()[2]
    set_rng(rng_end)
    step.last_loss, step.last_gnorm = last_loss, last_gnorm
    step.stored_states_max = peak[0]
    return dict(zip(h, hg)), w, s, lv.detach()


def _forward(step: _Stepper, outer_loss, w: Tree, s: Any, h: Tree, t0: int, T: int, outer_args, fn,
             chunk: Optional[int], weights_jacobian: bool = False):

    w0 = tree_detach(w)
    s0 = detach_state(s)
    hd = tree_detach(h)
    fl = Flat(hd)
    step.find_unused(w0, hd, t0)

    meta: dict[str, Any] = {}

    def run(hh: Tree):
        ww, ss = w0, s0
        loss = gnorm = torch.full((), math.nan, dtype=fl.dtype, device=fl.device)
        stray = torch.zeros((), dtype=fl.dtype, device=fl.device)
        for t in range(t0, T):
            ww, ss, loss, gnorm, dropped = step.functional(ww, ss, hh, t)
            stray = stray + dropped
        lv = _outer(outer_loss, ww, hh, outer_args, fn)
        # transforms return tensors only: the state's non-tensor leaves (step counts) travel aside
        leaves, meta["spec"] = pytree.tree_flatten(ss)
        meta["static"] = [None if isinstance(x, Tensor) else x for x in leaves]
        return (lv, ww), (ww, [x for x in leaves if isinstance(x, Tensor)], lv, loss, gnorm, stray)

    def directional(tvec: Tensor):
        # the tangent of w_T comes with that of L_V: the jvp carries it through every step anyway
        _, (dlv, dw), aux = torch.func.jvp(run, (hd,), (fl.unflatten(tvec),), has_aux=True)
        return dlv, dw, aux

    basis = torch.eye(fl.size, dtype=fl.dtype, device=fl.device)
    # NOTE: vmap's own chunk_size cannot concatenate unbatched (out_dims=None) outputs, so chunk here.
    n = fl.size if chunk is None else max(1, int(chunk))
    parts, jac_parts = [], []
    try:
        # exact rewrites of calls that PyTorch's forward-mode AD gets wrong (see _forward_ad)
        with fixes_for([*w0.values(), *hd.values(), *pytree.tree_leaves(s0)], step.calls_mse_loss):
            for i in range(0, fl.size, n):
                d, dw, aux = torch.func.vmap(directional, out_dims=(0, 0, None))(basis[i:i + n])
                parts.append(d)
                if weights_jacobian:
                    jac_parts.append(dw)
    except NotImplementedError as err:
        if "forward AD" not in str(err):
            raise
        raise NotImplementedError(
            f"{fn}: mode='forward' needs forward-mode AD of every operation of inner_loss and outer_loss "
            f"(forward-over-reverse), and PyTorch has none for one of them (CPU LSTM/GRU kernels, for "
            f"example): {err} Fix: mode='reverse' or mode='checkpoint' (reverse mode only), or an equivalent "
            f"operation that has a forward derivative.") from err
    except RuntimeError as err:
        if "mutate a captured Tensor" in str(err):
            raise RuntimeError(
                f"{fn}: mode='forward' runs the steps under torch.func.jvp, and inner_loss or outer_loss writes "
                f"in place into a tensor that is not one of its inputs (a module buffer updated in forward, such "
                f"as a running statistic or a counter, or a tensor captured from outside). Expected losses that "
                f"write only to their own intermediate tensors, got: {err}. Fix: mode='reverse' or "
                f"mode='checkpoint', or stop the write (eval mode for that module, or pass the tensor in as an "
                f"argument). bl.HyperOptimizer already keeps batch-norm layers' running statistics fixed "
                f"during a hyper step.") from err
        if "ZeroTensors are immutable" not in str(err):
            raise
        raise RuntimeError(
            f"{fn}: mode='forward' hit a PyTorch forward-mode AD limitation: an operation of inner_loss or "
            f"outer_loss writes in place into the zero tangent of an input that carries none (as "
            f"F.mse_loss(reduction='mean') does, pytorch/pytorch#123996: it is rewritten when the first step's "
            f"inner_loss calls it). Expected losses whose operations all support forward-over-reverse AD, got: {err}. "
            f"Fix: mode='reverse' or mode='checkpoint', or write the failing operation out (e.g. "
            f"((a - b) ** 2).mean() for a mean squared error).") from err
    dl = torch.cat(parts)
    wT, s_tensors, lv, loss, gnorm, stray = aux
    if float(stray) > 0:
        raise ValueError(
            f"{fn}: mode='forward' decides once, at the first differentiated step, which parameters get no "
            f"gradient (torch.optim skips those); {sorted(step.unused)} did not reach inner_loss at step {t0} but "
            f"got a gradient at a later step, which forward mode cannot follow. Expected the same parameters to "
            f"be used at every step. Fix: mode='reverse' or mode='checkpoint' (they decide at every step).")
    it = iter(s_tensors)
    sT = pytree.tree_unflatten([next(it) if x is None else x for x in meta["static"]], meta["spec"])
    hg = {k: v.clone() for k, v in fl.unflatten(dl).items()}
    step.last_loss, step.last_gnorm = loss.detach(), gnorm.detach()
    extra = {"weights_jacobian": {k: torch.cat([p[k] for p in jac_parts]).detach() for k in w0}} \
        if weights_jacobian else {}
    return hg, tree_detach(wT), detach_state(sT), lv.detach(), extra


# -- public -----------------------------------------------------------------------------------------
@with_twice_differentiable_kernels
def unrolled_hypergrad(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[..., Tensor],
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    optimizer: InnerOptimizer,
    steps: int,
    truncate: Optional[int] = None,
    mode: str = "reverse",
    inner_args: Args = (),
    outer_args: Sequence[Any] = (),
    state: Any = None,
    checkpoint_every: Optional[int] = None,
    replay_k: int = 2,
    forward_chunk: Optional[int] = None,
    check_finite: bool = True,
    group: Any = None,
    init_grad: bool = False,
    weights_jacobian: bool = False,
) -> tuple[Hypergrad, Tree]:
    """Hypergradient of ``outer_loss`` after ``steps`` differentiable optimizer steps on ``inner_loss``.

    Args:
        inner_loss: ``inner_loss(params, hparams, *inner_args) -> scalar``.
        outer_loss: ``outer_loss(params, hparams, *outer_args) -> scalar``.
        params: tree, the starting point ``w_0`` (treated as a constant of ``hparams``).
        hparams: tree of floating hyperparameters (of the losses and/or named by ``optimizer``); may be
            ``{}`` with ``init_grad=True`` (MAML: the starting point is the only thing learned).
        optimizer: a differentiable inner optimizer (:class:`bilevel.inner.SGD`, ``Adam``, ``AdamW``,
            :class:`bilevel.inner.TorchOpt`).
        steps: number of inner steps ``T``.
        truncate: differentiate only the last ``K`` steps (the first ``T − K`` run without a graph).
            Memory O(K·P); the result is biased, the bias shrinking geometrically in ``K`` near a minimum.
        mode: ``"reverse"``: backprop through the steps; memory grows linearly with the
            (differentiated) steps. ``"checkpoint"``: the same result (to rounding) with
            O(√steps) stored states, by recomputing segments in the backward pass; RNG state is saved
            per checkpoint, so dropout masks are replayed exactly. ``"replay"``: the same result with
            at most ``k·⌈log_k steps⌉ + 1`` stored states and ``≤ (1 + ⌈log_k steps⌉)`` training runs
            of compute (REPLAY, Engstrom et al. 2025: a k-ary tree of stored states, the rest
            recomputed recursively): metagradients through whole training runs; every recomputed step
            must reproduce the training run's inner loss (bit-exact on the CPU), else it raises.
            ``"forward"``: forward-mode
            (jvp through the steps, vmapped over the hyperparameter entries): memory does not grow
            with steps, cost grows with the number of hyperparameter entries.
        inner_args: a tuple used at every step, or a callable ``t -> tuple`` giving step ``t``'s batch
            (it must return the same batch when called again with the same ``t``: checkpoint and
            replay modes recompute steps).
        outer_args: tuple of extra arguments of ``outer_loss``.
        state: initial optimizer state (default ``optimizer.init(params)``), e.g. to continue a run.
        checkpoint_every: spacing of stored states in checkpoint mode (default ``⌈√K⌉``).
        replay_k: branching factor ``k >= 2`` of the replay tree (replay mode): larger ``k`` stores more
            states (``k·⌈log_k K⌉``) and recomputes less (``⌈log_k K⌉`` runs).
        forward_chunk: in forward mode, how many hyperparameter directions are pushed at once
            (``None``: all; smaller saves memory).
        check_finite: raise :class:`bilevel.NonFiniteError` on NaN/Inf losses or hypergradients.
        group: a ``torch.distributed`` process group for data parallelism (each rank passes its
            shard of every batch): each step's inner gradient is averaged over the ranks by a
            differentiable all-reduce, then the hypergradient; every rank gets the global-batch
            result (:mod:`bilevel.distributed`). Modes ``"reverse"``, ``"checkpoint"`` and ``"replay"``.
        init_grad: also return ``dL_V/dparams``, the gradient with respect to the starting point
            ``w_0`` (MAML's meta-gradient), in ``hypergrad.init_grad``; the initial optimizer state is
            held constant (``optimizer.init`` gives zeros, whatever ``params``). Modes ``"reverse"``
            and ``"checkpoint"`` (one more output of the same backward pass, no extra cost), without
            ``truncate``: a truncated unroll differentiates from ``w_{T−K}``, not from ``params``, and
            forward mode would need one pushed direction per weight.
        weights_jacobian: forward mode only: also return the Jacobian ``dw_T/dλ`` of the final params in
            ``hypergrad.info.weights_jacobian`` (one row per hyperparameter entry, see
            :class:`UnrollInfo`). Forward mode pushes every direction anyway; keeping the rows costs
            ``m·P`` memory (with ``forward_chunk``, more than the pushes themselves).

    Returns:
        ``(hypergrad, final_params)``: a :class:`bilevel.Hypergrad` tree (keys of ``hparams``) whose
        ``.info`` is an :class:`UnrollInfo` (losses, last inner gradient norm, final optimizer state),
        and the final params tree (detached). ``hypergrad.init_grad`` is ``None`` unless
        ``init_grad=True``.

    Shapes: ``params`` and ``hparams`` are trees of any leaf shapes; the hypergradient has the keys
    and shapes of ``hparams``, the final params and ``init_grad`` those of ``params``; the weights
    Jacobian is ``{key: (m, *params[key].shape)}`` with ``m`` the number of hyperparameter entries.
    The losses return 0-dim tensors.

    Example:
        >>> inner = lambda p, h: 0.5 * ((p["w"] - h["c"]) ** 2).sum()         # w_T → c
        >>> outer = lambda p, h: (p["w"] ** 2).sum()
        >>> opt = bl.inner.SGD(lr="lr")                                       # the step size is a hyperparameter
        >>> hg, w = bl.unrolled_hypergrad(inner, outer, {"w": torch.zeros(2)},
        ...                               {"c": torch.ones(2), "lr": torch.tensor(0.5)}, optimizer=opt, steps=20)
        >>> hg["c"].shape, hg["lr"].shape, torch.allclose(hg["c"], 2 * w["w"], atol=1e-4)
        (torch.Size([2]), torch.Size([]), True)
        >>> shrink = lambda p, h: 0.5 * (p["w"] ** 2).sum()                     # one step: w_1 = w_0 / 2
        >>> hg, _ = bl.unrolled_hypergrad(shrink, outer, {"w": torch.ones(2)}, {}, optimizer=bl.inner.SGD(lr=0.5),
        ...                               steps=1, init_grad=True)           # MAML: no hparams, only w_0
        >>> hg.init_grad["w"]                                                 # d‖w_1‖²/dw_0 = w_1
        tensor([0.5000, 0.5000])
    """
    fn = "bilevel.unrolled_hypergrad"
    params = check_tree(params, fn, "params")
    # MAML learns only the starting point: no hyperparameter at all is fine when init_grad is asked for
    no_hparams = init_grad and isinstance(hparams, Mapping) and len(hparams) == 0
    hparams = {} if no_hparams else check_tree(hparams, fn, "hparams")
    if not isinstance(optimizer, InnerOptimizer):
        raise TypeError(f"{fn}: expected `optimizer` to be a bilevel.inner optimizer (bl.inner.SGD, bl.inner.Adam, "
                        f"bl.inner.TorchOpt(...)), got {type(optimizer).__name__}. Fix: for a torchopt "
                        f"transformation wrap it as bl.inner.TorchOpt(opt).")
    optimizer.check_hparams(hparams, fn)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps for {fn}: {steps!r} (expected an int >= 1, the number of inner steps "
                         f"to unroll). Fix: pass e.g. steps=100.")
    if truncate is not None and (isinstance(truncate, bool) or not isinstance(truncate, int)
                                 or not 1 <= truncate <= steps):
        raise ValueError(f"Invalid truncate for {fn}: {truncate!r} (expected None or an int in [1, steps={steps}]).")
    if mode not in UNROLL_MODES:
        raise ValueError(f"{fn}: expected mode in {UNROLL_MODES}, got {mode!r}.")
    if isinstance(replay_k, bool) or not isinstance(replay_k, int) or replay_k < 2:
        raise ValueError(f"Invalid replay_k for {fn}: {replay_k!r} (expected an int >= 2, the branching factor of "
                         f"the replay tree; 2 stores the fewest states).")
    if not (callable(inner_args) or isinstance(inner_args, (tuple, list))):
        raise TypeError(f"{fn}: expected `inner_args` to be a tuple or a callable t -> tuple, "
                        f"got {type(inner_args).__name__}.")
    outer_args = _args_at(outer_args, 0)
    if init_grad and mode == "forward":
        raise ValueError(
            f"{fn}: init_grad=True needs mode='reverse' or 'checkpoint', got mode='forward': forward mode pushes "
            f"one tangent per hyperparameter entry through the whole unroll, and the gradient with respect to "
            f"params would take one per weight ({sum(v.numel() for v in params.values())} of them), where a "
            f"reverse pass gets it at no extra cost. Fix: mode='reverse', or mode='checkpoint' for long unrolls.")
    if init_grad and mode == "replay":
        raise ValueError(f"{fn}: init_grad=True is not available with mode='replay' yet. Fix: mode='checkpoint' "
                         f"(O(√steps) stored states), or mode='reverse'.")
    if init_grad and truncate is not None and truncate < steps:
        raise ValueError(
            f"{fn}: init_grad=True needs the whole unroll differentiated, got truncate={truncate} < "
            f"steps={steps}: a truncated unroll differentiates from the params after {steps - truncate} steps, so "
            f"its gradient is not the gradient with respect to `params`. Fix: truncate=None (with "
            f"mode='checkpoint' if memory is short), or fewer steps.")
    if weights_jacobian and mode != "forward":
        raise ValueError(
            f"{fn}: weights_jacobian=True needs mode='forward' (it pushes one tangent per hyperparameter entry "
            f"and returns their values at the final params), got mode={mode!r}. Fix: mode='forward'.")
    if check_finite:
        check_finite_tree(params, fn, "params")
        check_finite_tree(hparams, fn, "hparams")

    group = check_group(group, fn)
    if group is not None and mode == "forward":
        raise ValueError(f"{fn}: mode='forward' does not support a process group (collectives have no "
                         f"forward-mode derivative). Fix: mode='reverse' or 'checkpoint'.")
    K = steps if truncate is None else truncate
    step = _Stepper(inner_loss, optimizer, inner_args, fn, group)
    w = tree_detach(params)
    s = optimizer.init(w) if state is None else detach_state(state)
    h = tree_detach(hparams, requires_grad=True)
    every = None
    if mode == "checkpoint":
        every = checkpoint_every or max(1, math.ceil(math.sqrt(K)))
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid checkpoint_every for {fn}: {checkpoint_every!r} (expected an int >= 1).")
    rng_start = get_rng()
    try:
        for t in range(steps - K):                   # the undifferentiated prefix
            w, s = step.autograd(w, s, h, t, create_graph=False)
        extra: dict[str, Any] = {}
        if mode == "reverse":
            hg, w, s, lv, extra = _reverse(step, outer_loss, w, s, h, steps - K, steps, outer_args, fn, init_grad)
        elif mode == "checkpoint":
            hg, w, s, lv, extra = _checkpoint(step, outer_loss, w, s, h, steps - K, steps, outer_args, fn, every,
                                              init_grad)
        elif mode == "replay":
            hg, w, s, lv = _replay(step, outer_loss, w, s, h, steps - K, steps, outer_args, fn, replay_k)
        else:
            hg, w, s, lv, extra = _forward(step, outer_loss, w, s, h, steps - K, steps, outer_args, fn,
                                           forward_chunk, weights_jacobian)
    except BaseException:
        set_rng(rng_start)                           # a failed call leaves the RNG as it found it
        raise
    g0 = extra.get("init_grad", {})
    # mean over ranks of the per-rank outer losses' hypergradients (no-op in one process)
    *red, lv = all_reduce_mean_list([*hg.values(), *g0.values(), lv], group)
    hg, g0 = dict(zip(hg, red[:len(hg)])), dict(zip(g0, red[len(hg):]))
    if check_finite:
        check_finite_tree(w, fn, "the final params (the inner optimization diverged; lower the learning rate)")
        check_finite_scalar(lv, fn, "outer_loss at the final params")
        check_finite_tree(hg, fn, "the hypergradient")
        check_finite_tree(g0, fn, "the gradient with respect to params (init_grad)")
    last_loss = float(step.last_loss) if step.last_loss is not None else math.nan
    last_gn = float(step.last_gnorm) if step.last_gnorm is not None else math.nan
    info = UnrollInfo(mode, steps, K, float(lv), last_loss, last_gn, s, every,
                      replay_k if mode == "replay" else None, step.stored_states_max, step.evaluated,
                      weights_jacobian=extra.get("weights_jacobian"))
    return Hypergrad(hg, info, init_grad=g0 if init_grad else None), w


def finite_difference_hypergrad(
    inner_loss: Callable[..., Tensor],
    outer_loss: Callable[..., Tensor],
    params: Mapping[str, Tensor],
    hparams: Mapping[str, Tensor],
    *,
    optimizer: InnerOptimizer,
    state: Any = None,
    radius: float = 0.01,
    inner_args: Sequence[Any] = (),
    outer_args: Sequence[Any] = (),
) -> tuple[Hypergrad, Tree]:
    """``dL_V(w', λ)/dλ`` for one step ``w' = step(w, ∇_w L_T(w, λ), s, λ)``, with the one second-order
    term taken by a central finite difference (second-order DARTS's approximation).

    NOTE: the chain rule gives ``∂_λ L_V + (∂w'/∂λ)ᵀ v + ∂_λ⟨∇_w L_T(w, λ), u⟩`` with
    ``v = ∇_{w'} L_V`` and ``u = (∂w'/∂g)ᵀ v`` (one backward through the optimizer's update rule only;
    for SGD ``u = −ξ v``). The mixed term is ``[∂_λ L_T(w + εu) − ∂_λ L_T(w − εu)] / 2ε`` with
    ``ε = radius/‖u‖``: the weights move by ``radius`` along ``v``, exactly DARTS's ``w± = w ± εv``,
    ``ε = 0.01/‖v‖`` for SGD. No Hessian-vector product; error O(radius²) (0 for a quadratic L_T).
    """
    fn = "bilevel.Unrolled(second_order='finite_difference')"
    w = tree_detach(params)
    s = optimizer.init(w) if state is None else detach_state(state)
    h = tree_detach(hparams, requires_grad=True)
    hl = list(h.values())
    rng = get_rng()
    with torch.enable_grad():
        wl = tree_detach(w, requires_grad=True)
        lt = check_scalar(inner_loss(wl, h, *inner_args), fn, "inner_loss")
        gs = torch.autograd.grad(lt, list(wl.values()), allow_unused=True)
        # None: no gradient, the optimizer leaves that parameter (and its state) alone, as torch.optim
        gl = {k: None if gk is None else gk.detach().requires_grad_() for k, gk in zip(wl, gs)}
        w1, s1 = optimizer.step(w, gl, s, h)
        w1l = tree_detach(w1, requires_grad=True)
        lv = _outer(outer_loss, w1l, h, outer_args, fn)
        gv = grads_or_zeros(lv, list(w1l.values()) + hl)
        v, direct = dict(zip(w1l, gv[: len(w1l)])), gv[len(w1l):]
        moved = [k for k, o in w1.items() if o.requires_grad]
        live = [k for k, gk in gl.items() if gk is not None]
        pulled = torch.autograd.grad([w1[k] for k in moved], [gl[k] for k in live] + hl, [v[k] for k in moved],
                                     allow_unused=True) if moved else [None] * (len(live) + len(hl))
    u = {k: torch.zeros_like(w[k]) for k in w}
    u.update({k: pk for k, pk in zip(live, pulled[: len(live)]) if pk is not None})
    hg = [d if p is None else d + p for d, p in zip(direct, pulled[len(live):])]
    unorm = float(tree_norm(u))
    if unorm > 0 and math.isfinite(unorm):
        eps = radius / unorm

        def dl_dh(sign: float) -> list[Tensor]:
            set_rng(rng)                                   # the same dropout masks as the step itself
            with torch.enable_grad():
                ws = {k: w[k] + sign * eps * u[k] for k in w}
                return grads_or_zeros(inner_loss(ws, h, *inner_args), hl)

        plus, minus = dl_dh(1.0), dl_dh(-1.0)
        hg = [a + (p - m) / (2 * eps) for a, p, m in zip(hg, plus, minus)]
    out = dict(zip(h, hg))
    check_finite_tree(out, fn, "the hypergradient")
    info = UnrollInfo("finite_difference", 1, 1, float(lv.detach()), float(lt.detach()),
                      float(tree_norm({k: gk for k, gk in gl.items() if gk is not None} or u)), detach_state(s1))
    return Hypergrad(out, info), tree_detach(w1)
