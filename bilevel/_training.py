"""Helpers of the stateful edge (:class:`bilevel.HyperOptimizer`): argument checks, the model seen
as a pure function of its parameters, transactional snapshots, and the cycling outer loader."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._errors import NonFiniteError, all_finite, check_tree, fresh_tensors_finite
from ._second_order import twice_differentiable_kernels
from ._rng import get_state as get_rng
from ._rng import set_state as set_rng
from .distributed import all_reduce_mean_grads, world_size

#: inner optimizers that evaluate the loss several times per step and so need a closure
CLOSURE_OPTIMIZERS: tuple[type, ...] = (torch.optim.LBFGS,)



def drop_straddling_pair(optimizer: torch.optim.Optimizer) -> None:
    """Make ``torch.optim.LBFGS`` keep its curvature history across a change of the objective, except
    the one (s, y) pair that would straddle the change.

    L-BFGS forms its next pair at the start of its next ``step()``: s = the last step (``state["d"]``
    times ``state["t"]``) and y = the gradient there minus ``state["prev_flat_grad"]``. When the
    hyperparameters changed in between, that y mixes the gradients of two functions and can point
    anywhere (even give s·y ≤ 0); the pairs before it are differences of one function each, and
    describe the new objective up to the change of its Hessian (a weight decay's diagonal). Setting
    the last step to zero makes s·y = 0, which L-BFGS skips, so only the straddling pair is dropped:
    the warm-started solve keeps its curvature model and its scale ``H_diag`` and converges in a few
    iterations instead of restarting from steepest descent. The solve still stops on the gradient of
    the new objective (``tolerance_grad``), so where it ends is unchanged up to that tolerance.

    Shapes: none changed; ``state["d"]`` (the flat step, one entry per weight) becomes zeros. An
    optimizer with no step taken yet, or another optimizer, is left as it is.

    Example:
        >>> w = torch.zeros(3, requires_grad=True)
        >>> opt = torch.optim.LBFGS([w], line_search_fn="strong_wolfe")
        >>> loss = lambda lam: ((w - 1) ** 2).sum() + lam * (w ** 2).sum()
        >>> def closure(lam=0.1):
        ...     opt.zero_grad(); out = loss(lam); out.backward(); return out
        >>> _ = opt.step(closure)
        >>> drop_straddling_pair(opt)                 # the objective changes: lam 0.1 -> 0.2
        >>> _ = opt.step(lambda: closure(0.2))
        >>> bool(torch.allclose(w, torch.full((3,), 1 / 1.2), atol=1e-5))
        True
    """
    if not isinstance(optimizer, torch.optim.LBFGS):
        return
    for state in optimizer.state.values():
        d = state.get("d")
        if isinstance(d, Tensor):
            state["d"] = torch.zeros_like(d)


def _ids(tensors: Iterable[Tensor]) -> set[int]:
    return {id(t) for t in tensors}


def unwrap_ddp(model: Any, process_group: Any) -> tuple[nn.Module, Optional[nn.Module], Any]:
    """``(module, the DDP wrapper or None, process group)``: the library evaluates the losses itself
    (``functional_call`` on the module) and averages gradients where the global batch would; DDP's own
    hooks only fire in ``.backward()``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, model, model.process_group if process_group == "auto" else process_group
    if not isinstance(model, nn.Module):
        raise TypeError(f"bilevel.HyperOptimizer: expected `model` to be an nn.Module, got {type(model).__name__}.")
    return model, None, process_group


def check_hparams(hparams: Mapping[str, Tensor], fn: str) -> dict[str, Tensor]:
    hparams = check_tree(hparams, fn, "hparams")
    for k, v in hparams.items():
        if not (v.is_leaf and v.requires_grad):
            raise ValueError(
                f"{fn}: expected hparams[{k!r}] to be a leaf tensor with requires_grad=True (the outer "
                f"optimizer updates it), got requires_grad={v.requires_grad}, is_leaf={v.is_leaf}. "
                f"Fix: torch.tensor(..., requires_grad=True), or `.detach().requires_grad_()`.")
    return hparams


def check_options(fn: str, *, inner_loss: Any, outer_loss: Any, inner_optimizer: Any, outer_optimizer: Any,
                  method: Any, penalty: Any, on_error: Any, hyper_every: Any, clip_grad_norm: Any) -> None:
    """The checks of the HyperOptimizer's arguments that need no model."""
    if not callable(inner_loss) or not callable(outer_loss):
        raise TypeError(f"{fn}: expected inner_loss and outer_loss to be callables (model, hparams, batch) -> scalar.")
    for name, opt in (("inner_optimizer", inner_optimizer), ("outer_optimizer", outer_optimizer)):
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"{fn}: expected `{name}` to be a torch.optim.Optimizer, got {type(opt).__name__}.")
    if not callable(getattr(method, "hypergrad", None)):
        raise TypeError(f"{fn}: expected method bl.Implicit(...), bl.Unrolled(...), bl.FirstOrder() or another "
                        f"object with hypergrad(problem, inner_batch, outer_batch, state), got {type(method).__name__}.")
    if penalty is not None and not callable(penalty):
        raise TypeError(f"{fn}: expected `penalty` to be a callable penalty(params, hparams) -> scalar "
                        f"(e.g. from bl.hparams.weight_decay), got {type(penalty).__name__}.")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"{fn}: expected on_error 'raise' or 'skip', got {on_error!r}.")
    if isinstance(hyper_every, bool) or not isinstance(hyper_every, int) or hyper_every < 1:
        raise ValueError(f"Invalid hyper_every for {fn}: {hyper_every!r} (expected an int >= 1).")
    if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
                                       or not math.isfinite(clip_grad_norm) or clip_grad_norm <= 0):
        raise ValueError(f"{fn}: expected clip_grad_norm None or a finite number > 0, got {clip_grad_norm!r}.")
    if isinstance(inner_optimizer, CLOSURE_OPTIMIZERS) and clip_grad_norm is not None:
        raise ValueError(f"{fn}: clip_grad_norm does not go with {type(inner_optimizer).__name__}: its line "
                         f"search needs the true gradient. Fix: clip_grad_norm=None, or an SGD/Adam inner optimizer.")


@dataclass
class ModelFunctions:
    """The model seen as pure functions of its parameters (``torch.func.functional_call``).

    Attributes:
        inner_names: names of the model's parameters the inner optimizer holds (the inner variables).
        hp_in_model: ``{model parameter name: hparams key}`` for hyperparameters living in the model
            (architecture weights).
    """

    model: nn.Module
    inner_names: list[str]
    hp_in_model: dict[str, str]

    @classmethod
    def build(cls, model: nn.Module, hparams: Mapping[str, Tensor], inner_optimizer: torch.optim.Optimizer,
              outer_optimizer: torch.optim.Optimizer, fn: str) -> "ModelFunctions":
        """Check which tensors each optimizer holds against the model and hparams."""
        hp_ids = _ids(hparams.values())
        key_of_hp = {id(v): k for k, v in hparams.items()}
        named = dict(model.named_parameters())
        model_ids = _ids(named.values())
        inner_params = [p for g in inner_optimizer.param_groups for p in g["params"]]
        for p in inner_params:
            if id(p) in hp_ids:
                raise ValueError(f"{fn}: expected inner_optimizer to hold only inner parameters, got the "
                                 f"hyperparameter {key_of_hp[id(p)]!r} in it. Fix: build it over "
                                 f"bl.nas.weight_parameters(model) or the model parameters that are not hparams.")
            if id(p) not in model_ids:
                raise ValueError(f"{fn}: expected inner_optimizer to hold parameters of `model`, got a tensor of "
                                 f"shape {tuple(p.shape)} that is not a parameter of `model`. Fix: build it over "
                                 f"model.parameters().")
        held = _ids(inner_params)
        inner_names = [n for n, p in named.items() if id(p) in held]
        if not inner_names:
            raise ValueError(f"{fn}: expected inner_optimizer to hold some of the model's parameters, got none of "
                             f"them. Fix: build it over model.parameters().")
        outer = [p for g in outer_optimizer.param_groups for p in g["params"]]
        stray = [tuple(p.shape) for p in outer if id(p) not in hp_ids]
        if stray:
            raise ValueError(f"{fn}: expected outer_optimizer to hold only hparams, got tensors that are not in "
                             f"hparams (shapes {stray[:3]}). Fix: build it over hparams.values().")
        missing = [k for k, v in hparams.items() if id(v) not in _ids(outer)]
        if missing:
            raise ValueError(f"{fn}: expected outer_optimizer to hold every hparam, got hparams {missing[:5]} "
                             f"outside it, so they would never be updated. Fix: build outer_optimizer over "
                             f"hparams.values().")
        hp_in_model = {n: key_of_hp[id(p)] for n, p in named.items() if id(p) in hp_ids}
        return cls(model, inner_names, hp_in_model)

    def params(self) -> dict[str, Tensor]:
        """``{name: Parameter}`` of the inner variables (the live tensors)."""
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self.inner_names}

    def leaves(self) -> list[Tensor]:
        """The inner variables' Parameters, in order (cached: the hot path of every inner step; the
        cache is rebuilt when a module's parameter was replaced rather than updated in place)."""
        cached = getattr(self, "_leaves", None)
        # NOTE: `_parameters` read directly: Module.__getattr__ is a Python function (a third of this
        # check's cost); a parameter replaced by anything else is not found there and rebuilds the cache
        if cached is None or any(mod._parameters.get(attr) is not p for mod, attr, p in cached):
            slots = [n.rpartition(".") for n in self.inner_names]
            cached = [(self.model.get_submodule(m), a, getattr(self.model.get_submodule(m), a)) for m, _, a in slots]
            self._leaves = cached
        return [p for _, _, p in cached]

    def fixed(self) -> dict[str, Tensor]:
        """The model's other parameters (not inner variables), detached: constants of a hyper step."""
        inner = set(self.inner_names)
        return {n: p.detach() for n, p in self.model.named_parameters() if n not in inner}

    def evaluator(self, loss_fn: Callable[..., Tensor], buffers: Mapping[str, Tensor]) -> Callable[..., Tensor]:
        """``f(params, hparams, batch) = loss_fn(model, hparams, batch)`` with the model's inner
        parameters replaced by ``params``, its in-model hyperparameters by ``hparams``' entries and its
        buffers by ``buffers`` (copies: the passes of a hyper step must not move BatchNorm statistics).

        NOTE: the passes of a hyper step differentiate twice (double backward, or a forward tangent
        through a backward pass), so within them attention runs on PyTorch's math kernel
        (``scaled_dot_product_attention``'s fused flash and memory-efficient kernels have no second
        derivative and no forward-mode rule: ``nn.TransformerEncoderLayer`` failed there), weight
        normalization runs as its formula instead of the fused ``torch._weight_norm`` (whose second
        derivative is wrong in torch 2.13) and embedding bags as a lookup and a per-bag sum (the
        fused op has no second derivative), all by :func:`twice_differentiable_kernels`; and
        sparse-gradient embeddings give dense gradients. Inner steps keep the fast kernels."""
        holder, hp_in_model, aliases = _LossCall(self.model), self.hp_in_model, _aliases(self.model)
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        tables = [m for m in self.model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]

        def call(params: Mapping[str, Tensor], hparams: Mapping[str, Tensor], batch: Any) -> Tensor:
            tensors = {**params, **{n: hparams[k] for n, k in hp_in_model.items()}, **buffers}
            tensors.update({alias: tensors[name] for alias, name in aliases.items() if name in tensors})
            with batch_statistics_only(norms), dense_embedding_gradients(tables), twice_differentiable_kernels():
                return functional_call(holder, {"m." + n: t for n, t in tensors.items()}, (loss_fn, hparams, batch),
                                       tie_weights=False)

        return call


class _SwitchOff:
    """Within it, boolean attribute ``attr`` is ``False`` on those of ``modules`` where ``when(m)``
    holds; it is set back to ``True`` on exit (also after an exception)."""

    attr = ""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)
        self.changed: list[nn.Module] = []

    def when(self, m: nn.Module) -> bool:
        return bool(getattr(m, self.attr))

    def __enter__(self) -> "_SwitchOff":
        self.changed = [m for m in self.modules if self.when(m)]
        for m in self.changed:
            setattr(m, self.attr, False)
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in self.changed:
            setattr(m, self.attr, True)
        self.changed = []


class batch_statistics_only(_SwitchOff):
    """Within it, batch-norm layers (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) in training mode
    normalize by the batch's statistics without updating their running statistics (and their batch
    counter).

    A hyper step's passes use copies of the buffers and throw the updates away, so the value is the
    same as in training mode with tracking; what changes is that no buffer is written in place,
    which the ``torch.func`` transforms of forward mode (``jvp`` under ``vmap``) cannot do to a
    tensor that is not an input. Layers in eval mode (running statistics) are left as they are.
    """

    attr = "track_running_stats"

    def when(self, m: nn.Module) -> bool:
        return m.training and m.track_running_stats


class dense_embedding_gradients(_SwitchOff):
    """Within it, ``nn.Embedding`` / ``nn.EmbeddingBag`` layers built with ``sparse=True`` give dense
    gradients: the same values, in the layout that a hyper step's flat vectors, products and
    solvers take (a sparse gradient is a training-step saving for ``torch.optim`` optimizers that
    read it; the inner step keeps it)."""

    attr = "sparse"


def _aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: name}`` for tensors that ``named_parameters()``/``named_buffers()`` list once but
    that other module attributes also hold (tied weights: ``head.weight = embed.weight``).

    NOTE: ``functional_call(tie_weights=True)`` swaps every path of a tied tensor, and a submodule
    used twice (``nn.Sequential(proj, act, proj)``) has two paths to one attribute: the second swap
    saves the first swap's tensor as the "original" and restores it, so the model keeps a plain
    tensor in place of its Parameter after the call. Swapping each (module, attribute) once avoids it.
    """
    out: dict[str, str] = {}
    for named in (model.named_parameters, model.named_buffers):
        canonical = {id(t): n for n, t in named()}
        seen: set[tuple[int, str]] = set()
        for name, t in named(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            slot = (id(model.get_submodule(owner)), attr)
            if slot in seen:
                continue
            seen.add(slot)
            if canonical[id(t)] != name:
                out[name] = canonical[id(t)]
    return out


class _LossCall(nn.Module):
    """Holds the model so that ``functional_call`` can evaluate any ``loss(model, hparams, batch)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, loss_fn: Callable[..., Tensor], hparams: Mapping[str, Tensor], batch: Any) -> Tensor:
        return loss_fn(self.m, hparams, batch)


def clone_state(x: Any) -> Any:
    """A copy of an optimizer ``state_dict()`` that ``step()`` cannot change: tensors cloned,
    containers rebuilt, immutable values shared, anything else deep-copied. Several times faster
    than ``copy.deepcopy`` of the whole state, which a hyper step and an L-BFGS inner step take
    every time."""
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone_state(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clone_state(v) for v in x]
    if isinstance(x, tuple):
        return tuple(clone_state(v) for v in x)
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        return x
    return copy.deepcopy(x)          # anything else a custom optimizer keeps (numpy arrays, sets...)


class Snapshot:
    """Values and ``.grad`` of some tensors and an optimizer's state, to put back if a step fails."""

    def __init__(self, tensors: Iterable[Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.tensors = list(tensors)
        self.values = [t.detach().clone() for t in self.tensors]
        self.grads = [t.grad for t in self.tensors]
        self.optimizer = optimizer
        # deep copy: state_dict() returns the live state tensors, which step() updates in place
        self.state = clone_state(optimizer.state_dict())

    def restore(self) -> None:
        with torch.no_grad():
            for t, v, g in zip(self.tensors, self.values, self.grads):
                t.copy_(v)
                t.grad = g
        self.optimizer.load_state_dict(self.state)


class OuterBatches:
    """Cycles an iterable of validation batches and can resume mid-epoch with the same order.

    A shuffled ``DataLoader`` draws each epoch's order when its iterator starts, from the global RNG
    (or the generator it was given). So the RNG states at the start of the current epoch are kept
    (:meth:`state_dict`), and a resumed run rebuilds the epoch's iterator under them, skips the
    batches already taken, and puts the RNG back: the same batches follow, in the same order, and
    the rest of the run draws the same random numbers. A loader without ``len()`` resumes by
    skipping ``taken`` batches of a fresh iterator (exact only if its order does not depend on the RNG).
    """

    def __init__(self, loader: Optional[Iterable[Any]]) -> None:
        self.loader = loader
        self.taken = 0                  # batches taken in all
        self.in_epoch = 0               # batches taken from the current iterator
        self._epoch_rng: Optional[dict[str, Any]] = None
        self._it: Optional[Iterator[Any]] = None

    def _generators(self) -> list[torch.Generator]:
        """The generators a DataLoader (or its samplers) may draw an epoch's order from."""
        objs = [self.loader, getattr(self.loader, "sampler", None), getattr(self.loader, "batch_sampler", None),
                getattr(getattr(self.loader, "batch_sampler", None), "sampler", None)]
        gens = [getattr(o, "generator", None) for o in objs]
        return list({id(g): g for g in gens if isinstance(g, torch.Generator)}.values())

    def _rng_states(self) -> dict[str, Any]:
        cpu, cuda = get_rng()
        return {"cpu": cpu, "cuda": list(cuda) if cuda is not None else [],
                "generators": [g.get_state() for g in self._generators()]}

    def _set_rng_states(self, st: Mapping[str, Any]) -> None:
        set_rng((st["cpu"], st["cuda"] or None))
        for g, s in zip(self._generators(), st["generators"]):
            g.set_state(s)

    def _start_epoch(self) -> None:
        assert self.loader is not None
        self._epoch_rng = self._rng_states()
        self._it, self.in_epoch = iter(self.loader), 0

    def state_dict(self) -> dict[str, Any]:
        return {"taken": self.taken, "in_epoch": self.in_epoch, "epoch_rng": self._epoch_rng}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next batch is the one that followed when ``state`` was taken."""
        self.taken, self._it = int(state["taken"]), None
        self.in_epoch = int(state.get("in_epoch", self.taken))
        self._epoch_rng = state.get("epoch_rng")
        if self.loader is None or (self._epoch_rng is None and self.in_epoch == 0):
            return
        n = len(self.loader) if hasattr(self.loader, "__len__") else 0
        if self._epoch_rng is None:          # written before epoch RNG states were kept: position only
            self.in_epoch = self.in_epoch % n if n else self.in_epoch
        now = get_rng()
        if self._epoch_rng is not None:
            self._set_rng_states(self._epoch_rng)
        self._it = iter(self.loader)
        for _ in range(self.in_epoch):
            next(self._it)
        # the global RNG goes back (the checkpoint's is set next); the loader's own generators stay as
        # the epoch's start left them, which is where the interrupted run had them too
        set_rng(now)

    def next(self) -> Any:
        if self.loader is None:
            raise ValueError("bilevel.HyperOptimizer.step: a hyper step is due but no outer_loader was given. "
                             "Fix: pass outer_loader=... at construction, or call hyper_step yourself.")
        if self._it is None:
            self._start_epoch()
        try:
            batch = next(self._it)
        except StopIteration:
            self._start_epoch()
            batch = next(self._it)
        self.taken += 1
        self.in_epoch += 1
        return batch


def warn_if_no_hyper_step(run: Mapping[str, int]) -> None:
    """At the end of a run (the HyperOptimizer is collected, or the program exits): warn if
    ``step()`` was called but no hyper step was taken, so the hyperparameters never moved."""
    if run["calls"] > 0 and run["hyper_steps"] == 0:
        warnings.warn(f"bilevel.HyperOptimizer: the run called step() {run['calls']} times and took no hyper step "
                      f"(hyper_every={run['hyper_every']}, or every hyper step was skipped), so the hyperparameters "
                      f"never changed. Fix: a smaller hyper_every, more epochs, or check the skipped hyper steps' "
                      f"errors.", RuntimeWarning, stacklevel=2)


def gradients_into_grad(loss: Tensor, leaves: list[Tensor], group: Any) -> tuple[Tensor, bool]:
    """Backpropagate ``loss`` into the ``.grad`` of ``leaves`` (averaged over the ranks of ``group``)
    and check loss and gradients for NaN/Inf. Returns ``(loss detached and averaged, all finite)``;
    when not finite, no ``.grad`` of ``leaves`` is left set. A leaf the loss does not reach (on any
    rank) keeps ``.grad = None``, as in plain torch.

    NOTE: in one process ``backward()`` leaves each gradient in ``.grad`` itself (no list of tensors
    to assign one by one), and a CPU loss is read on the host, as are the gradients' sums (see
    :func:`bilevel._errors.fresh_tensors_finite`); a GPU loss rides along in the fused check of the
    gradients (one host sync per step either way). With several ranks
    the gradients come from ``autograd.grad`` and travel in one collective with the loss.

    Shapes: ``loss`` 0-dim; ``leaves`` any shapes; returns a 0-dim loss.
    """
    if world_size(group) <= 1:
        torch.autograd.backward(loss, inputs=leaves)
        grads: list[Optional[Tensor]] = [p.grad for p in leaves]
        loss = loss.detach()
    else:
        grads, loss = all_reduce_mean_grads(torch.autograd.grad(loss, leaves, allow_unused=True), leaves, loss, group)
        for p, g in zip(leaves, grads):
            p.grad = g
    checked = [g for g in grads if g is not None]
    on_host = loss.device.type == "cpu"
    if not on_host:
        checked.insert(0, loss.reshape(1).clone())
    finite = (not on_host or math.isfinite(float(loss))) and fresh_tensors_finite(checked)
    if not finite:
        for p in leaves:                              # nothing of this step stays behind
            p.grad = None
    return loss, finite


def check_weights(model: nn.Module) -> None:
    """Raise if the weights themselves hold NaN/Inf: then no step can be skipped safely.

    Finite gradients can still give non-finite weights when the optimizer's own update overflows.
    No copy of the weights is kept for one-evaluation optimizers (it would double their memory), so
    this is found where it shows, at the next NaN loss, and stops training whatever ``on_error``
    says; :meth:`bilevel.HyperOptimizer.save` refuses to write such a state.
    """
    if not all_finite(*model.parameters()):
        raise NonFiniteError("bilevel.HyperOptimizer.inner_step: the model's weights hold NaN/Inf, so an earlier "
                             "inner_optimizer.step() overflowed (finite gradients are checked before every "
                             "step). Fix: lower its learning rate, then resume from the last checkpoint "
                             "(HyperOptimizer.load).")


def nonfinite_inner(loss: Tensor) -> NonFiniteError:
    return NonFiniteError(f"bilevel.HyperOptimizer.inner_step: the inner loss or its gradient is NaN/Inf "
                          f"(loss={float(loss):.4g}); the weights were left as they were. "
                          f"Fix: lower the learning rate, check the batch.")
