"""Mixed operations and the architecture-weight trees of a supernet.

A :class:`MixedOp` holds its architecture weights ``α`` as an ``nn.Parameter`` of the module
(so a checkpoint of the model carries them) and declares them as *architecture* parameters:
:func:`named_arch_parameters` collects them as the hparams tree of a :class:`bilevel.HyperOptimizer`,
:func:`weight_parameters` lists everything else for the inner optimizer (like ``model.parameters()``;
:func:`arch_parameters` and :func:`named_weight_parameters` are the other two views).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._ops import Zero

__all__ = ["MixedOp", "WEIGHTINGS", "arch_parameters", "weight_parameters", "named_arch_parameters",
           "named_weight_parameters", "mixed_ops", "set_temperature",
           "annealed_temperature", "expected_cost", "zero_one_loss"]

#: The ``weighting=`` choices of :class:`MixedOp`: how the architecture weights ``α`` of one edge
#: become the weights of its candidates.
WEIGHTINGS = ("softmax", "gumbel", "sigmoid")

#: Modules list the names of their architecture parameters in this attribute (MixedOp sets ("alpha",)).
ARCH_ATTR = "_arch_param_names"


class MixedOp(nn.Module):
    """A continuous relaxation of the choice among candidate operations: ``Σ_i w_i(α) · op_i(x)``.

    Args:
        candidates: ``{name: module}``; every module maps the same input to outputs of one shape.
            A :class:`bilevel.nas.Zero` candidate (DARTS's ``none``) is not evaluated: its term is 0.
        weighting: how ``α`` (shape ``(n,)``) becomes the mixing weights ``w``:
            ``"softmax"`` (DARTS): ``w = softmax(α)``;
            ``"gumbel"`` (GDAS/SNAS): in training mode a Gumbel-softmax sample
            ``softmax((α + g) / τ)``, ``g`` i.i.d. Gumbel(0, 1); ``hard=True`` makes it one-hot with
            straight-through gradients and evaluates only the sampled candidate; in eval mode
            ``softmax(α)``;
            ``"sigmoid"`` (Fair-DARTS): ``w_i = sigmoid(α_i)``, no competition between candidates
            (pair it with :func:`zero_one_loss`).
        tau: Gumbel temperature ``τ`` (anneal it with :func:`set_temperature`).
        hard: one-hot Gumbel samples (GDAS) instead of soft ones (SNAS).
        alpha: an existing ``(n,)`` parameter to use (to share ``α`` between edges); default a new
            ``nn.Parameter`` of ``init_scale``-scaled normal noise.
        init_scale: standard deviation of the initial ``α`` (DARTS: 1e-3).

    Shapes:
        input whatever the candidates take; output the candidates' output shape.

    Example:
        >>> op = bl.nas.MixedOp({"none": bl.nas.Zero(), "skip": nn.Identity(), "lin": nn.Linear(4, 4)})
        >>> op(torch.randn(2, 4)).shape
        torch.Size([2, 4])
        >>> {k: tuple(a.shape) for k, a in bl.nas.named_arch_parameters(nn.Sequential(op)).items()}
        {'0.alpha': (3,)}
    """

    def __init__(self, candidates: Mapping[str, nn.Module], *, weighting: str = "softmax", tau: float = 1.0,
                 hard: bool = False, alpha: Optional[nn.Parameter] = None, init_scale: float = 1e-3) -> None:
        super().__init__()
        fn = "bilevel.nas.MixedOp"
        if not isinstance(candidates, Mapping) or len(candidates) == 0:
            raise ValueError(f"{fn}: expected `candidates` to be a non-empty dict {{name: nn.Module}}, "
                             f"got {type(candidates).__name__} of length {len(candidates) if hasattr(candidates, '__len__') else '?'}.")
        for k, v in candidates.items():
            if not isinstance(k, str) or not k or "." in k:
                raise ValueError(f"{fn}: expected candidate names to be non-empty str without '.', got {k!r}.")
            if not isinstance(v, nn.Module):
                raise TypeError(f"{fn}: expected candidates[{k!r}] to be an nn.Module, got {type(v).__name__}. "
                                f"Fix: wrap functions in a module (e.g. nn.Identity(), nn.ReLU()).")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"{fn}: expected weighting in {WEIGHTINGS}, got {weighting!r}.")
        if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
            raise ValueError(f"{fn}: expected a finite temperature tau > 0, got {tau!r}.")
        n = len(candidates)
        if alpha is None:
            alpha = nn.Parameter(init_scale * torch.randn(n))
        elif not isinstance(alpha, nn.Parameter) or alpha.shape != (n,):
            raise ValueError(f"{fn}: expected `alpha` to be an nn.Parameter of shape ({n},) (one entry per "
                             f"candidate), got {type(alpha).__name__} of shape {tuple(getattr(alpha, 'shape', ()))}.")
        self.names: tuple[str, ...] = tuple(candidates)
        try:
            self.ops = nn.ModuleDict(dict(candidates))
        except KeyError as err:                  # e.g. "half", "train": attributes of nn.Module
            raise ValueError(f"{fn}: a candidate name clashes with an nn.Module attribute ({err}). "
                             f"Fix: rename it (e.g. 'half' -> 'halve').") from None
        self.alpha = alpha
        self.weighting = weighting
        self.tau = float(tau)
        self.hard = bool(hard)
        self.disabled: set[str] = set()         # candidates removed from the sum (perturbation scoring)
        setattr(self, ARCH_ATTR, ("alpha",))

    def extra_repr(self) -> str:
        return f"weighting={self.weighting!r}, tau={self.tau}, hard={self.hard}"

    # -- weights ---------------------------------------------------------------------------------
    def expected_weights(self) -> Tensor:
        """The deterministic weights ``softmax(α)`` (``sigmoid(α)`` for Fair-DARTS), shape ``(n,)``."""
        return torch.sigmoid(self.alpha) if self.weighting == "sigmoid" else torch.softmax(self.alpha, 0)

    def weights(self) -> Tensor:
        """The weights of the next forward pass, shape ``(n,)``: a Gumbel sample in training mode
        with ``weighting="gumbel"``, :meth:`expected_weights` otherwise."""
        if self.weighting == "gumbel" and self.training:
            return F.gumbel_softmax(self.alpha, tau=self.tau, hard=self.hard)
        return self.expected_weights()

    @contextlib.contextmanager
    def without(self, names: Iterable[str]) -> Iterator["MixedOp"]:
        """Context in which the candidates ``names`` are left out of the sum (the others keep their
        weights, not renormalized): the DARTS-PT perturbation."""
        names = set(names)
        unknown = names - set(self.names)
        if unknown:
            raise KeyError(f"bilevel.nas.MixedOp.without: unknown candidates {sorted(unknown)}; "
                           f"this op has {list(self.names)}.")
        before = set(self.disabled)
        self.disabled |= names
        try:
            yield self
        finally:
            self.disabled = before

    def forward(self, x: Tensor) -> Tensor:
        w = self.weights()
        out: Optional[Tensor] = None
        zero_like: Optional[nn.Module] = None
        sampled = None
        if self.weighting == "gumbel" and self.training and self.hard:
            sampled = int(w.detach().argmax())   # GDAS: only the sampled candidate runs
        for i, (name, op) in enumerate(self.ops.items()):
            if name in self.disabled or (sampled is not None and i != sampled):
                continue
            if isinstance(op, Zero):             # its term is exactly 0: skip the work
                zero_like = op
                continue
            term = w[i] * op(x)
            out = term if out is None else out + term
        if out is None:                          # every evaluated candidate is zero
            op = zero_like if zero_like is not None else next(iter(self.ops.values()))
            out = op(x).mul(0.0) + 0.0 * w.sum()
        return out


# -- trees of a supernet --------------------------------------------------------------------------
def _arch_ids(model: nn.Module) -> dict[int, nn.Parameter]:
    found: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for attr in getattr(mod, ARCH_ATTR, ()):
            p = getattr(mod, attr, None)
            if isinstance(p, nn.Parameter):
                found[id(p)] = p
    return found


def check_model(model: object, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module (a supernet with bl.nas.MixedOp inside), "
                        f"got {type(model).__name__}.")


def named_arch_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The architecture weights of ``model`` by name: ``{parameter name: α}`` for every :class:`MixedOp`.

    Names are those of ``model.named_parameters()`` (a shared ``α`` appears once). Custom modules
    declare their own architecture parameters by listing attribute names in
    ``module._arch_param_names``. This tree is the ``hparams`` of a search (a
    :class:`bilevel.HyperOptimizer`); :func:`arch_parameters` lists the same tensors.

    Returns:
        ``dict[str, nn.Parameter]``, each of shape ``(n_candidates,)``.

    Raises:
        ValueError: ``model`` has no architecture parameters.

    Example:
        >>> op = bl.nas.MixedOp({"none": bl.nas.Zero(), "skip": nn.Identity(), "lin": nn.Linear(4, 4)})
        >>> net = nn.Sequential(op, nn.Linear(4, 2))                # a toy supernet with one mixed edge
        >>> alphas = bl.nas.named_arch_parameters(net)              # the hparams tree of a search
        >>> {k: tuple(a.shape) for k, a in alphas.items()}
        {'0.alpha': (3,)}
    """
    fn = "bilevel.nas.named_arch_parameters"
    check_model(model, fn)
    ids = _arch_ids(model)
    out = {n: p for n, p in model.named_parameters() if id(p) in ids}
    if not out:
        raise ValueError(f"{fn}: expected a model with architecture weights (bl.nas.MixedOp modules), found none "
                         f"in {type(model).__name__}. Fix: build the search space from bl.nas.MixedOp "
                         f"(or bl.nas.Network(..., genotype=None)).")
    return out


def arch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The architecture weights ``α`` of ``model`` as a list, like ``model.parameters()``: pass it to
    the outer optimizer. By name (the ``hparams`` tree of a search): :func:`named_arch_parameters`.

    Returns:
        ``list[nn.Parameter]``, each of shape ``(n_candidates,)``, in ``model.named_parameters()`` order.

    Raises:
        ValueError: ``model`` has no architecture parameters.

    Example:
        >>> op = bl.nas.MixedOp({"none": bl.nas.Zero(), "skip": nn.Identity(), "lin": nn.Linear(4, 4)})
        >>> net = nn.Sequential(op, nn.Linear(4, 2))                # a toy supernet with one mixed edge
        >>> outer_opt = torch.optim.Adam(bl.nas.arch_parameters(net), lr=3e-4, betas=(0.5, 0.999))
        >>> [tuple(a.shape) for a in bl.nas.arch_parameters(net)], bl.nas.arch_parameters(net)[0] is op.alpha
        ([(3,)], True)
    """
    return list(named_arch_parameters(model).values())


def named_weight_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of ``model`` that is not an architecture weight, by name: the inner variables.

    Returns:
        ``dict[str, nn.Parameter]`` (names of ``model.named_parameters()``; any shapes).

    Example:
        >>> op = bl.nas.MixedOp({"none": bl.nas.Zero(), "skip": nn.Identity(), "lin": nn.Linear(4, 4)})
        >>> net = nn.Sequential(op, nn.Linear(4, 2))                # a toy supernet with one mixed edge
        >>> sorted(bl.nas.named_weight_parameters(net))
        ['0.ops.lin.bias', '0.ops.lin.weight', '1.bias', '1.weight']
    """
    check_model(model, "bilevel.nas.named_weight_parameters")
    ids = _arch_ids(model)
    return {n: p for n, p in model.named_parameters() if id(p) not in ids}


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that is not an architecture weight, as a list like
    ``model.parameters()``: pass it to the inner optimizer. By name: :func:`named_weight_parameters`.

    Returns:
        ``list[nn.Parameter]`` (any shapes), in ``model.named_parameters()`` order.

    Example:
        >>> op = bl.nas.MixedOp({"none": bl.nas.Zero(), "skip": nn.Identity(), "lin": nn.Linear(4, 4)})
        >>> net = nn.Sequential(op, nn.Linear(4, 2))                # a toy supernet with one mixed edge
        >>> inner_opt = torch.optim.SGD(bl.nas.weight_parameters(net), lr=0.025, momentum=0.9)
        >>> len(bl.nas.weight_parameters(net)), bl.nas.weight_parameters(net)[-1] is net[1].bias
        (4, True)
    """
    return list(named_weight_parameters(model).values())


def mixed_ops(model: nn.Module) -> dict[str, MixedOp]:
    """``{module name: MixedOp}`` of every mixed operation in ``model`` (in module order).

    Example:
        >>> op = bl.nas.MixedOp({"none": bl.nas.Zero(), "skip": nn.Identity(), "lin": nn.Linear(4, 4)})
        >>> net = nn.Sequential(op, nn.Linear(4, 2))                # a toy supernet with one mixed edge
        >>> list(bl.nas.mixed_ops(net)), bl.nas.mixed_ops(net)["0"] is op
        (['0'], True)
    """
    check_model(model, "bilevel.nas.mixed_ops")
    return {n: m for n, m in model.named_modules() if isinstance(m, MixedOp)}


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set the Gumbel temperature of every ``weighting="gumbel"`` :class:`MixedOp`; returns how many.

    Example:
        >>> net = nn.Sequential(bl.nas.MixedOp({"skip": nn.Identity(), "lin": nn.Linear(4, 4)}, weighting="gumbel"))
        >>> E = 3
        >>> for epoch in range(E):
        ...     n = bl.nas.set_temperature(net, bl.nas.annealed_temperature(epoch, E, start=10.0, end=0.1))
        >>> n, round(net[0].tau, 3)                                  # 10 · (0.1/10)^(2/3)
        (1, 0.464)
    """
    if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
        raise ValueError(f"bilevel.nas.set_temperature: expected a finite temperature tau > 0, got {tau!r}.")
    n = 0
    for m in mixed_ops(model).values():
        if m.weighting == "gumbel":
            m.tau = float(tau)
            n += 1
    return n


def annealed_temperature(step: int, total: int, *, start: float = 10.0, end: float = 0.1) -> float:
    """Exponential annealing ``start · (end/start)^(step/total)`` (clamped to ``[0, total]``), as GDAS/SNAS.

    Example:
        >>> bl.nas.annealed_temperature(0, 10), bl.nas.annealed_temperature(10, 10)
        (10.0, 0.1)
    """
    if total <= 0 or start <= 0 or end <= 0:
        raise ValueError(f"bilevel.nas.annealed_temperature: expected total > 0, start > 0, end > 0, "
                         f"got total={total}, start={start}, end={end}.")
    frac = min(max(step / total, 0.0), 1.0)
    return float(start * (end / start) ** frac)


CostTable = Union[Mapping[str, float], str, Callable[[str, str, nn.Module], float]]


def _op_cost(costs: CostTable, edge: str, name: str, op: nn.Module, fn: str) -> float:
    if costs == "params":
        return float(sum(p.numel() for p in op.parameters()))
    if callable(costs):
        return float(costs(edge, name, op))
    if name not in costs:
        raise KeyError(f"{fn}: the cost table has no entry for candidate {name!r} (edge {edge!r}); it has "
                       f"{sorted(costs)}. Fix: give a cost for every candidate name, e.g. 0.0 for 'none'.")
    return float(costs[name])


def expected_cost(model: nn.Module, costs: CostTable) -> Tensor:
    """Expected cost of the architecture ``Σ_edges Σ_i w_i(α) · cost_i``, differentiable in ``α``.

    Add ``λ · expected_cost(model, costs)`` to the outer loss to trade accuracy for latency/FLOPs
    (as ProxylessNAS/FBNet). The weights are :meth:`MixedOp.expected_weights` (no sampling).

    Args:
        model: a supernet with :class:`MixedOp` modules.
        costs: a per-operation table ``{candidate name: cost}`` (e.g. measured latency in ms, or
            FLOPs), ``"params"`` (each candidate's own parameter count), or a callable
            ``(edge name, candidate name, module) -> cost``.

    Returns:
        A scalar tensor (dtype of ``α``).

    Example:
        >>> op = bl.nas.MixedOp({"none": bl.nas.Zero(), "skip": nn.Identity(), "lin": nn.Linear(4, 4)},
        ...                     alpha=nn.Parameter(torch.zeros(3)))          # uniform weights 1/3
        >>> net = nn.Sequential(op, nn.Linear(4, 2))
        >>> latency = {"none": 0.0, "skip": 0.0, "lin": 1.0}
        >>> bl.nas.expected_cost(net, latency)
        tensor(0.3333, grad_fn=<SumBackward0>)
        >>> outer_loss = lambda m, h, b: F.cross_entropy(m(b[0]), b[1]) + 1e-2 * bl.nas.expected_cost(m, latency)
    """
    fn = "bilevel.nas.expected_cost"
    ops = mixed_ops(model)
    if not ops:
        raise ValueError(f"{fn}: expected a model with bl.nas.MixedOp modules, found none in {type(model).__name__}.")
    total: Optional[Tensor] = None
    for edge, m in ops.items():
        c = torch.tensor([_op_cost(costs, edge, n, m.ops[n], fn) for n in m.names],
                         dtype=m.alpha.dtype, device=m.alpha.device)
        term = (m.expected_weights() * c).sum()
        total = term if total is None else total + term
    assert total is not None
    return total


def zero_one_loss(model: nn.Module) -> Tensor:
    """Fair-DARTS's zero-one loss ``−mean((σ(α) − ½)²)`` over all sigmoid-weighted :class:`MixedOp`.

    Pushes every ``sigmoid(α_i)`` toward 0 or 1 so that thresholding at ½ loses little. Add
    ``w₀₁ · zero_one_loss(model)`` to the outer loss.

    Returns:
        A scalar tensor.

    Example:
        >>> op = bl.nas.MixedOp({"skip": nn.Identity(), "lin": nn.Linear(4, 4)}, weighting="sigmoid",
        ...                     alpha=nn.Parameter(torch.tensor([2.0, -2.0])))
        >>> net = nn.Sequential(nn.Linear(4, 4), op)
        >>> bl.nas.zero_one_loss(net)                                # −mean((σ(±2) − ½)²)
        tensor(-0.1450, grad_fn=<NegBackward0>)
        >>> outer = lambda m, h, b: F.cross_entropy(m(b[0]), b[1]) + 10.0 * bl.nas.zero_one_loss(m)
    """
    ws = [m.expected_weights() for m in mixed_ops(model).values() if m.weighting == "sigmoid"]
    if not ws:
        raise ValueError("bilevel.nas.zero_one_loss: expected MixedOp modules with weighting='sigmoid' "
                         "(Fair-DARTS), found none.")
    return -torch.cat(ws).sub(0.5).square().mean()
