"""Linear solvers for ``(H + damping·I) x = b`` that only see ``matvec(v) = H v``.

Every solver is a small configured object called as ``solver(matvec, b) -> x``
on trees (API.md). Internally it runs on one flat contiguous buffer
(:meth:`Solver.solve_flat`), and the result is a :class:`Solution`: a dict (the
tree ``x``) that also carries :class:`SolverInfo` diagnostics in ``.info``.

NOTE: no ``.item()`` (host sync) inside the iteration loops. Iterates that have
converged are frozen with ``torch.where`` masks on device, and convergence or
blow-up is checked on the host only every ``check_every`` iterations, so a GPU
pipeline is not stalled by every step. On the CPU, where a host read costs nothing,
CG on one system keeps its scalars on the host instead (``_HostScalarCG``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Union

import torch
from torch import Tensor

from ._errors import DivergenceError, NonFiniteError, ShapeError, all_finite, check_tree
from ._tree import Flat, Tree
from .kernels import CG_STATE_FIELDS, cg_update, neumann_step, partial_dot, resolve_backend

__all__ = ["Solver", "SolverInfo", "Solution", "CG", "Neumann", "Nystrom", "Identity", "Exact", "GMRES", "BiCGSTAB",
           "NormalCG"]

#: ``matvec(v) -> H v`` on flat vectors. A matvec whose function carries ``writes_out = True``
#: (``CurvatureOperator.matvec_flat``) also takes ``matvec(v, out=buf)``: it writes ``H v`` into
#: ``buf`` and returns it, so a solver's loop reuses one buffer instead of a fresh weight-sized
#: tensor per product (on CPU each fresh one is also first-touch page faults).
FlatMatvec = Callable[[Tensor], Tensor]


def writes_out(matvec: Callable[..., Tensor]) -> bool:
    """Whether ``matvec`` takes ``out=`` (see :data:`FlatMatvec`)."""
    return bool(getattr(matvec, "writes_out", False))


@dataclass
class SolverInfo:
    """Diagnostics of one linear solve.

    Attributes:
        solver: the solver's name.
        iterations: iterations needed (CG: the step at which the residual test first passed, which
            can be fewer than ``matvecs`` since convergence is checked every ``check_every`` steps;
            Neumann terms; Nyström rank; ...).
        matvecs: matrix-vector products used (the cost, in Hessian-vector products).
        residual_norm: ``‖(H + damping I) x − b‖`` as a float, or an upper bound
            where stated (Neumann), or ``nan`` when not computed.
        b_norm: ``‖b‖`` (the relative residual is ``residual_norm / b_norm``).
        converged: whether the solver's own stopping test passed.
        extra: solver-specific figures (Neumann's ``alpha`` and ``lambda_max``, ...).

    Example:
        >>> A = torch.tensor([[2., 0.], [0., 1.]])
        >>> info = bl.CG()(lambda v: {"x": A @ v["x"]}, {"x": torch.ones(2)}).info
        >>> info.solver, info.converged, info.relative_residual < 1e-6
        ('CG', True, True)
    """

    solver: str
    iterations: int
    matvecs: int
    residual_norm: float
    b_norm: float
    converged: bool
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def relative_residual(self) -> float:
        """``residual_norm / ‖b‖`` (``residual_norm`` itself when ``b = 0``)."""
        return self.residual_norm / self.b_norm if self.b_norm > 0 else self.residual_norm


class Solution(dict):
    """The solution tree ``x`` of a solve (a plain ``dict[str, Tensor]``) plus ``.info``.

    Shapes: the keys and shapes of the right-hand side ``b`` of the solve.

    Example:
        >>> x = bl.Identity(scale=0.5)(lambda v: v, {"x": torch.ones(2)})
        >>> isinstance(x, dict), x["x"], x.info.solver
        (True, tensor([0.5000, 0.5000]), 'Identity')
    """

    info: Optional[SolverInfo]

    def __init__(self, tree: Mapping[str, Tensor], info: Optional[SolverInfo] = None) -> None:
        super().__init__(tree)
        self.info = info


def _check_number(fn: str, name: str, value: Any, *, low: float = 0.0, strict: bool = False,
                  integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        kind = "an int" if integer else "a finite number"
        raise TypeError(f"{fn}: expected `{name}` to be {kind}, got {value!r}.")
    if value < low or (strict and value == low):
        rel = ">" if strict else ">="
        raise ValueError(f"Invalid {name} for {fn}: {value} (expected {name} {rel} {low}).")


def _check_backend(fn: str, backend: Any) -> None:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"{fn}: expected backend 'auto', 'torch' or 'triton', got {backend!r}.")


def _use_triton(backend: str, b: Tensor, fn: str) -> bool:
    """Whether a solver runs its fused Triton updates on ``b`` (``"auto"``: CUDA vectors only)."""
    if backend == "torch" or (backend == "auto" and not b.is_cuda):
        return False
    return resolve_backend(backend, b, name=fn) == "triton"


def _flat_operator(op: Callable[[Tree], Tree], fl: Flat, fn: str, name: str) -> FlatMatvec:
    """``op`` on trees of layout ``fl`` as a map of flat vectors, checking the keys it returns."""

    def flat_op(v: Tensor) -> Tensor:
        out = op(fl.unflatten(v))
        if not isinstance(out, Mapping) or set(out) != set(fl.keys):
            raise ShapeError(f"{fn}: expected `{name}` to return a tree with the keys {fl.keys} of `b`, "
                             f"got {type(out).__name__} with keys {list(out) if isinstance(out, Mapping) else None}.")
        return fl.flatten(out)

    return flat_op


class Solver:
    """Base class: subclasses implement :meth:`solve_flat`.

    ``damping`` turns every solve into ``(H + damping·I) x = b``. ``warm_startable`` (a class
    attribute, ``False`` here) says whether :meth:`solve_flat` takes a starting point ``x0``;
    :class:`CG` and :class:`Neumann` set it ``True``, and a subclass whose ``solve_flat`` takes
    ``x0`` should too (implicit differentiation reads it to warm-start solves).

    Shapes: called on trees, ``b`` is a tree of any leaf shapes (``P`` entries in all) and the
    returned :class:`Solution` has the same keys and shapes; :meth:`solve_flat` takes and returns
    vectors of shape ``(P,)``.

    Example:
        >>> class Half(bl.Solver):                    # x = b / 2, i.e. assumes H = 2 I
        ...     def solve_flat(self, matvec, b):
        ...         return b / 2, bl.SolverInfo("Half", 0, 0, float("nan"), float(b.norm()), True)
        >>> Half()(lambda v: v, {"x": torch.ones(2)})["x"]
        tensor([0.5000, 0.5000])
    """

    damping: float = 0.0
    #: Whether :meth:`solve_flat` takes a starting point ``x0`` (a warm start, e.g. the previous
    #: hyper step's solution). ``True`` on :class:`CG` and :class:`Neumann`.
    warm_startable: ClassVar[bool] = False
    #: Whether :meth:`solve_flat` takes ``rmatvec`` (``v -> Hᵀ v``): solvers of the normal
    #: equations need transpose products. ``True`` on :class:`NormalCG`.
    uses_rmatvec: ClassVar[bool] = False
    #: Whether :meth:`solve_flat_batched` solves a batch of independent systems at once (one batched
    #: product per iteration for all of them). ``True`` on :class:`CG` and :class:`Exact`.
    batchable: ClassVar[bool] = False

    @property
    def name(self) -> str:
        """The solver's class name (``"CG"``, ``"Neumann"``...), as reported in diagnostics."""
        return type(self).__name__

    def _damped(self, matvec: FlatMatvec) -> FlatMatvec:
        d = self.damping
        if d == 0.0:
            return matvec
        if not writes_out(matvec):
            return lambda v: torch.add(matvec(v), v, alpha=d)   # one fused pass

        def damped(v: Tensor, out: Optional[Tensor] = None) -> Tensor:
            return torch.add(matvec(v), v, alpha=d) if out is None else matvec(v, out=out).add_(v, alpha=d)

        damped.writes_out = True  # type: ignore[attr-defined]
        return damped

    def solve_flat(self, matvec: FlatMatvec, b: Tensor) -> tuple[Tensor, SolverInfo]:
        """Solve ``(H + damping I) x = b`` for flat vectors ``b`` of shape ``(P,)``.

        ``matvec`` maps a ``(P,)`` vector to ``H v`` (without damping).
        Returns ``(x, info)``.
        """
        raise NotImplementedError

    def solve_flat_batched(self, matvec: FlatMatvec, b: Tensor) -> tuple[Tensor, list[SolverInfo]]:
        """Solve ``B`` independent systems ``(H_i + damping I) x_i = b_i`` at once (``batchable`` solvers).

        ``b`` has shape ``(B, P)``; ``matvec`` maps ``V`` of shape ``(B, P)`` to the ``(B, P)`` tensor
        whose row ``i`` is ``H_i V[i]``: one call serves every system (e.g. one vmapped
        Hessian-vector product). Returns ``(x, infos)``: ``x`` of shape ``(B, P)`` and one
        :class:`SolverInfo` per system (``matvecs`` counts batched products).
        """
        raise NotImplementedError(f"bilevel.{self.name}: no batched solve (batchable = False). Fix: call solve_flat "
                                  f"on each system, or use bl.CG() / bl.Exact().")

    def __call__(self, matvec: Callable[[Tree], Tree], b: Mapping[str, Tensor], *,
                 rmatvec: Optional[Callable[[Tree], Tree]] = None) -> Solution:
        """Solve on trees: ``matvec`` maps a tree to a tree; ``b`` a tree. Returns a :class:`Solution`.

        ``rmatvec`` (a tree to a tree, ``v -> Hᵀ v``, without damping) is passed on to solvers
        with ``uses_rmatvec = True`` (:class:`NormalCG`) and ignored by the others.
        """
        fn = f"bilevel.{self.name}"
        b = check_tree(b, fn, "b")
        fl = Flat(b)
        kwargs = {}
        if self.uses_rmatvec and rmatvec is not None:
            kwargs["rmatvec"] = _flat_operator(rmatvec, fl, fn, "rmatvec")
        x, info = self.solve_flat(_flat_operator(matvec, fl, fn, "matvec"), fl.flatten(b), **kwargs)
        return Solution(fl.unflatten(x), info)

    # shared checks -----------------------------------------------------------
    def _check_b(self, b: Tensor) -> Tensor:
        if not all_finite(b):
            raise NonFiniteError(
                f"bilevel.{self.name}: expected a finite right-hand side b, got NaN/Inf entries. "
                f"Fix: check the outer loss and its gradient for NaN/Inf."
            )
        return torch.linalg.vector_norm(b, dim=-1)

    def _residual(self, A: FlatMatvec, x: Tensor, b: Tensor) -> float:
        return float(torch.linalg.vector_norm(A(x) - b))


# -- conjugate gradients -----------------------------------------------------------------------------
# NOTE: rounding-aware curvature tests. The Rayleigh quotient ρ = pᵀAp/pᵀp of an SPD operator lies
# in [λ_min, λ_max]; computed in floating point it carries an error of a few eps·‖A‖. On a singular
# positive semi-definite operator (softmax logits are invariant to a shared shift), CG drives the
# residual down to rounding, and the rounding left in p then lies partly in the null space, where ρ
# is 0 ± rounding: −5e-18 in float64, −1e-9 in float32 on a 20-parameter softmax regression. A test
# `ρ ≤ 0` calls that negative curvature, and a tiny positive ρ gives a step α = ‖r‖²/pᵀAp that
# throws x far along the null space (errors of 300–1100 % there). Two tests fix it:
# - the residual test never asks for less than ‖r‖ ≤ _FLOOR_EPS·eps·‖b‖: below that the range part
#   of r is gone and what is left is rounding in the null space, which no step can reduce (this
#   alone stops the softmax solves at 16 steps with x equal to the pseudo-inverse solution);
# - curvature is judged against `scale`, the largest |ρ| seen so far (a lower bound of ‖A‖):
#   ρ < −_FLAT_EPS·eps·scale is negative curvature, |ρ| ≤ _FLAT_EPS·eps·scale is zero to rounding
#   (no step is taken). Zero curvature with the residual under _FLOOR_EPS·eps·(‖b‖ + scale·‖x‖)
#   is the breakdown of a converged solve and returns x as converged; anywhere else (e.g. b with a
#   component in the null space) it is a failure like negative curvature.
_FLAT_EPS = 64.0
_FLOOR_EPS = 8.0
_RUNNING, _NEGATIVE, _FLAT = 0, 1, 2     # the status codes of bilevel.kernels.CG_STATE_FIELDS


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` over the last dim: 0-dim for vectors, ``(B,)`` for a batch ``(B, P)`` of them."""
    return torch.dot(a, b) if a.dim() == 1 else torch.linalg.vecdot(a, b)


def _col(t: Tensor) -> Tensor:
    """A per-system scalar ready to scale its vector: 0-dim as is, ``(B,)`` as ``(B, 1)``."""
    return t if t.dim() == 0 else t.unsqueeze(-1)


def _threshold(bnorm: Tensor, tol: float, atol: float) -> Tensor:
    """The residual test ``‖r‖ ≤ max(tol·‖b‖ + atol, 8·eps·‖b‖)``: never below the rounding floor."""
    eps = torch.finfo(bnorm.dtype).eps
    return torch.maximum(tol * bnorm + atol, _FLOOR_EPS * eps * bnorm)


def _symmetry_tol(dtype: torch.dtype) -> float:
    """Largest relative asymmetry ``|uᵀAv − vᵀAu| / (‖u‖‖Av‖ + ‖v‖‖Au‖)`` taken as rounding."""
    # NOTE: √eps (1.5e-8 in float64, 3.5e-4 in float32). Measured in float32 on random vectors:
    # double-backward HVPs are symmetric to 1e-8 relative on softmax regression and 4e-9 on a
    # tanh MLP (22k weights), so rounding is far below; a non-symmetric operator (a fixed-point
    # Jacobian, SPD plus a comparable antisymmetric part) is off by O(0.1–1). Between the two,
    # CG's error grows only like asymmetry·κ, which is not what this check exists for.
    return math.sqrt(torch.finfo(dtype).eps)


class _SymmetryProbe:
    """Compares ``uᵀ(A v)`` with ``vᵀ(A u)`` on the first two vectors whose products CG takes anyway.

    Free of extra products: at most two copies and four dot products (with norms) once per solve.
    """

    def __init__(self) -> None:
        self._first: Optional[tuple[Tensor, Tensor]] = None
        self.gap: Optional[Tensor] = None     # relative asymmetry, 0-dim on the device

    def see(self, v: Tensor, Av: Tensor, v_kept: Optional[Tensor] = None, Av_kept: bool = False,
            v_norm: Optional[Union[Tensor, float]] = None) -> None:
        """Record ``(v, A v)``; on the second call compute :attr:`gap`. ``v_kept``: a tensor equal
        to ``v`` that nobody modifies (saves a copy); ``Av_kept``: ``Av`` is the caller's to give
        (it will not be written again), so it is kept without a copy; ``v_norm``: ``‖v‖`` when the
        caller knows it (saves a pass)."""
        if self.gap is not None:
            return
        if self._first is None:
            # v is updated in place by CG; matvec may reuse its output buffer
            self._first = (v.clone() if v_kept is None else v_kept, Av if Av_kept else Av.clone(), v_norm)
            return
        u, Au, u_norm = self._first
        self._first = None
        num = (_dot(v, Au) - _dot(u, Av)).abs()
        nrm = lambda t, known=None: torch.linalg.vector_norm(t, dim=-1) if known is None else known
        den = nrm(u, u_norm) * nrm(Av) + nrm(v, v_norm) * nrm(Au)
        self.gap = num / den.clamp_min(torch.finfo(den.dtype).tiny)


@dataclass
class _CGOutcome:
    """What one CG run found, read on the host once at the end."""

    x: Tensor
    rs: float                 # ‖r‖² of x (recursive residual)
    steps: int                # steps taken: the iteration at which the residual test passed, if it did
    loop_iterations: int
    matvecs: int
    status: int               # _RUNNING, _NEGATIVE or _FLAT
    min_rq: float
    scale: float
    asymmetry: float          # nan when not probed (fewer than 2 iterations)
    fallback: bool = False    # stopped before the first step; x = b / scale (see CG's on_indefinite)


def _initial_residual(A: FlatMatvec, b: Tensor, x0: Optional[Tensor]) -> tuple[Tensor, Tensor, int]:
    """``(x, r, matvecs)`` at the start of a solve: from 0, or from ``x0`` (one product)."""
    if x0 is None:
        return torch.zeros_like(b), b.clone(), 0
    x = x0.clone()
    return x, b - A(x), 1


class _TextbookProducts:
    """The products of a textbook CG run (:class:`_HestenesStiefelCG`, :class:`_HostScalarCG`).

    An operator that writes into a buffer (``writes_out``) returns a fresh product without one:
    the first goes to the symmetry probe as is, the later ones reuse one buffer.
    """

    A: FlatMatvec
    matvecs: int
    _matvecs0: int
    _into: bool
    _Ap: Optional[Tensor]

    def _product(self, p: Tensor) -> tuple[Tensor, bool]:
        """``(A p, whether it is the run's first product)``."""
        first = self.matvecs == self._matvecs0
        if self._into and not first:
            if self._Ap is None:
                self._Ap = torch.empty_like(p)
            Ap = self.A(p, out=self._Ap)
        else:
            Ap = self.A(p)
        self.matvecs += 1
        return Ap, first


class _HestenesStiefelCG(_TextbookProducts):
    """Textbook CG (``x += αp; r −= αAp; p = r + βp``) with device-side masks and no host sync.

    ``fallback``: a system that stops before its first step returns ``b / scale`` (``CG(on_indefinite="stop")``).
    ``b`` of shape ``(B, P)`` runs ``B`` independent systems in lockstep (``A`` maps ``(B, P)`` to
    ``(B, P)``): every scalar (``α``, ``β``, ``‖r‖²``, status, masks) is then a ``(B,)`` tensor, and a
    system that has stopped is frozen by its own mask while the others go on.
    """

    def __init__(self, A: FlatMatvec, b: Tensor, x0: Optional[Tensor], thresh: Tensor, flat_tol: float,
                 fallback: bool = False) -> None:
        self.A, self.thresh, self.flat_tol = A, thresh, flat_tol
        self.x, self.r, self.matvecs = _initial_residual(A, b, x0)
        self._matvecs0 = self.matvecs
        self._into, self._Ap = writes_out(A), None   # the products' buffer (after the first)
        self.p = self.r.clone()
        self.rs = _dot(self.r, self.r)
        # ‖p‖² by the recurrence ‖p_{k+1}‖² = ‖r_{k+1}‖² + β²‖p_k‖² (r_{k+1} ⊥ p_k): saves a pass per iteration.
        self.pp = self.rs
        scalar = lambda v, dt=b.dtype: torch.full(b.shape[:-1], v, dtype=dt, device=b.device)
        self.status, self.steps = scalar(_RUNNING, torch.long), scalar(0, torch.long)
        self.negative_code, self.flat_code = scalar(_NEGATIVE, torch.long), scalar(_FLAT, torch.long)
        self.tiny = torch.finfo(b.dtype).tiny
        self.min_rq, self.scale, self.zero = scalar(math.inf), scalar(0.0), scalar(0.0)
        self.probe = _SymmetryProbe()
        self.b0 = b if x0 is None else None      # the first direction p equals b then
        # stop mode from zero: a stop before the first step falls back to x = b / scale (see CG)
        self.fallback = scalar(False, torch.bool) if fallback and x0 is None else None

    def residual_sq(self) -> Tensor:
        return self.rs

    def step(self) -> None:
        p, r, x = self.p, self.r, self.x
        Ap, first = self._product(p)
        self.probe.see(p, Ap, self.b0, Av_kept=first and self._into)
        pAp = _dot(p, Ap)
        # the curvature along p (Rayleigh quotient), on the scale of H's eigenvalues
        rq = pAp / self.pp.clamp_min(self.tiny)
        # every Rayleigh quotient of a symmetric A is at most ‖A‖, so scale needs no mask (fmax skips NaN)
        self.scale = torch.fmax(self.scale, rq.abs())
        rq = torch.nan_to_num(rq, nan=-math.inf)
        tol = self.flat_tol * self.scale
        negative = rq < -tol                                    # NaN too (now −inf)
        flat = rq.abs() <= tol
        active = (self.status == _RUNNING) & (self.rs > self.thresh)
        self.status = torch.where(active, torch.where(negative, self.negative_code,
                                                      torch.where(flat, self.flat_code, self.status)), self.status)
        self.min_rq = torch.where(active, torch.minimum(self.min_rq, rq), self.min_rq)
        ok = active & ~(negative | flat)
        alpha = torch.where(ok, self.rs / torch.where(ok, pAp, 1.0), self.zero)
        moved = ok
        if self.fallback is not None:
            # stopped before any step, so x = 0 and p = b: x = b / scale, r = b − Ab / scale
            first = active & (negative | flat) & (self.steps == 0) & (self.scale > 0) & torch.isfinite(self.scale)
            alpha = torch.where(first, 1.0 / torch.where(first, self.scale, 1.0), alpha)
            self.fallback = self.fallback | first
            moved = ok | first
        # NOTE: fused in-place updates (one kernel each, no temporaries). A frozen solve has
        # alpha = 0, so x and r stay put; p is then never used again, so it needs no mask.
        x.addcmul_(_col(alpha), p)
        r.addcmul_(_col(alpha), Ap, value=-1.0)
        rs_new = torch.where(moved, _dot(r, r), self.rs)
        beta = torch.where(ok, rs_new / torch.where(self.rs > 0, self.rs, 1.0), self.zero)
        torch.addcmul(r, _col(beta), p, out=p)   # in place: no 4-byte-per-weight allocation per iteration
        self.pp = rs_new + beta * beta * self.pp
        self.rs = rs_new
        self.steps = self.steps + ok

    def outcome(self, loop_iterations: int) -> _CGOutcome:
        return self.outcomes(loop_iterations)[0]

    def outcomes(self, loop_iterations: int) -> list[_CGOutcome]:
        """One outcome per system (one host sync): a list of one for a single system."""
        x, rs = self.x, self.rs
        gap = self.probe.gap if self.probe.gap is not None else torch.full_like(rs, math.nan)
        fb = self.fallback if self.fallback is not None else torch.zeros_like(self.status, dtype=torch.bool)
        rows = torch.stack([rs, self.status.to(rs.dtype), self.steps.to(rs.dtype), self.min_rq, self.scale, gap,
                            fb.to(rs.dtype)], -1)
        xs = [x] if x.dim() == 1 else list(x)
        return [_CGOutcome(xi, rs_h, int(steps), loop_iterations, self.matvecs, int(status), min_rq, scale, asym,
                           bool(f)) for xi, (rs_h, status, steps, min_rq, scale, asym, f) in
                zip(xs, rows.reshape(-1, 7).tolist())]


class _HostScalarCG(_TextbookProducts):
    """Textbook CG for one system on the CPU, its scalars kept on the host as Python floats.

    On the CPU a host read costs nothing, so the masks and device scalars of
    :class:`_HestenesStiefelCG` (about 30 tiny tensor ops per iteration) become a few float
    operations and branches, the residual test runs every iteration (no product past
    convergence), and a solve from zero copies nothing: the first step reads ``b`` as
    ``p`` and writes ``x = αb`` and ``r = b − αAb`` into fresh buffers. Same decisions
    (curvature stop, ``b / scale`` fallback, symmetry probe) as the device form; its scalars
    are in double precision.

    From zero the symmetry probe keeps nothing but ``b``: with ``u = p₀ = b`` and ``v = p₁ =
    r₁ + β₁b``, ``vᵀAu = r₁ᵀ(Ab) + β₁ bᵀAb`` is taken at the first step, while ``Ab`` is at hand
    (both terms accurate: no cancellation beyond ``2·eps·‖v‖‖Au‖``), and ``uᵀAv = bᵀ(Ap₁)`` at
    the second, so the first product's buffer is free to take the later ones (one weight-sized
    buffer fewer, and no copy of it).
    """

    def __init__(self, A: FlatMatvec, b: Tensor, x0: Optional[Tensor], thresh: float, flat_tol: float,
                 fallback: bool = False) -> None:
        self.A, self.thresh, self.flat_tol = A, thresh, flat_tol
        self.b, self.b0 = b, (b if x0 is None else None)
        self.x: Optional[Tensor]
        self.r: Optional[Tensor]
        if x0 is None:
            self.x = self.r = None          # 0 and b: written at the first step
            self.p, self.matvecs, self.rs = b, 0, float(torch.dot(b, b))
        else:
            self.x, self.r, self.matvecs = _initial_residual(A, b, x0)
            self.p, self.rs = self.r.clone(), float(torch.dot(self.r, self.r))
        self._matvecs0 = self.matvecs
        self._into, self._Ap = writes_out(A), None
        self.pp = self.rs                   # ‖p‖² by the recurrence, as the device form
        self.status, self.steps, self.moved = _RUNNING, 0, True
        self.tiny = torch.finfo(b.dtype).tiny
        self.min_rq, self.scale = math.inf, 0.0
        self.probe, self.gap = _SymmetryProbe(), math.nan
        self.fallback, self.fell_back = fallback and x0 is None, False
        # the probe from zero (see above): ‖b‖, ‖Ab‖ and vᵀAu, from the first step
        self._from_zero = x0 is None
        self._b_norm, self._Au_norm, self._vAu = math.sqrt(self.rs), math.nan, math.nan

    def done(self) -> bool:
        return self.status != _RUNNING or self.rs <= self.thresh or not self.moved

    def asymmetric(self, sym_tol: float) -> bool:
        return self.gap > sym_tol

    def step(self) -> None:
        p = self.p
        Ap, first = self._product(p)
        if not self._from_zero:
            self.probe.see(p, Ap, None, Av_kept=first and self._into, v_norm=math.sqrt(self.pp))
            if self.probe.gap is not None and math.isnan(self.gap):
                self.gap = float(self.probe.gap)
        elif first:
            self._Au_norm = float(torch.linalg.vector_norm(Ap))
        elif self.matvecs == 2 and not math.isnan(self._vAu):          # v = p₁, u = b
            den = self._b_norm * float(torch.linalg.vector_norm(Ap)) + math.sqrt(self.pp) * self._Au_norm
            self.gap = abs(self._vAu - float(torch.dot(self.b, Ap))) / max(den, self.tiny)
        pAp = float(torch.dot(p, Ap))
        rq = pAp / max(self.pp, self.tiny)
        if math.isnan(rq):
            rq = -math.inf                  # NaN counts as negative curvature
        else:
            self.scale = max(self.scale, abs(rq))
        tol = self.flat_tol * self.scale
        negative, flat = rq < -tol, abs(rq) <= tol
        active = self.status == _RUNNING and self.rs > self.thresh
        if active:
            self.status = _NEGATIVE if negative else _FLAT if flat else _RUNNING
            self.min_rq = min(self.min_rq, rq)
        ok = active and not (negative or flat)
        alpha = self.rs / pAp if ok else 0.0
        if self.fallback and active and not ok and self.steps == 0 and 0.0 < self.scale < math.inf:
            alpha, self.fell_back = 1.0 / self.scale, True      # stopped before any step: x = b / scale
        self.moved = ok or self.fell_back
        if not self.moved:
            return
        if self.x is None or self.r is None:                    # from zero: p is b
            self.x, self.r = torch.mul(p, alpha), torch.add(p, Ap, alpha=-alpha)
        else:
            self.x.add_(p, alpha=alpha)
            self.r.add_(Ap, alpha=-alpha)
        rs_new = float(torch.dot(self.r, self.r))
        if ok:
            beta = rs_new / self.rs if self.rs > 0 else rs_new
            if p is self.b0:                # the first step from zero: vᵀAu for the probe, then Ab is free
                self._vAu = float(torch.dot(self.r, Ap)) + beta * pAp
                if self._into:
                    self._Ap = Ap
            # p = r + βp, in place once p is ours (the first p is the caller's b)
            self.p = torch.add(self.r, p, alpha=beta) if p is self.b0 else torch.add(self.r, p, alpha=beta, out=p)
            self.pp = rs_new + beta * beta * self.pp
            self.steps += 1
        self.rs = rs_new

    def outcome(self, loop_iterations: int) -> _CGOutcome:
        x = torch.zeros_like(self.b) if self.x is None else self.x
        return _CGOutcome(x, self.rs, self.steps, loop_iterations, self.matvecs, self.status, self.min_rq,
                          self.scale, self.gap, self.fell_back)


class _ChronopoulosGearCG:
    """CG in the Chronopoulos–Gear form: product ``w = A r``, both reductions in one fused update.

    The same iterates as :class:`_HestenesStiefelCG` in exact arithmetic; each iteration is one
    product, :func:`bilevel.kernels.partial_dot` and :func:`bilevel.kernels.cg_update` (Triton,
    or their torch references with ``backend="torch"``), and every scalar stays on the device.
    """

    def __init__(self, A: FlatMatvec, b: Tensor, x0: Optional[Tensor], thresh: Tensor, flat_tol: float,
                 backend: str, fallback: bool = False) -> None:
        self.A, self.thresh, self.flat_tol, self.backend = A, float(thresh), flat_tol, backend
        self.fallback = fallback and x0 is None
        self.x, self.r, self.matvecs = _initial_residual(A, b, x0)
        self.p, self.s = torch.zeros_like(b), torch.zeros_like(b)
        self.gamma_parts = partial_dot(self.r, self.r, backend=backend)
        self.state: Optional[Tensor] = None
        self.probe = _SymmetryProbe()
        self.b0 = b if x0 is None else None      # the first residual r equals b then
        self._status = CG_STATE_FIELDS.index("status")

    def residual_sq(self) -> Tensor:
        return self.gamma_parts.sum()

    @property
    def status(self) -> Tensor:
        if self.state is None:
            return torch.zeros((), dtype=self.gamma_parts.dtype, device=self.gamma_parts.device)
        return self.state[self._status]

    def step(self) -> None:
        w = self.A(self.r)
        self.matvecs += 1
        self.probe.see(self.r, w, self.b0)
        self.gamma_parts, self.state = cg_update(
            self.x, self.r, self.p, self.s, w, self.gamma_parts, partial_dot(w, self.r, backend=self.backend),
            self.state, thresh=self.thresh, flat_tol=self.flat_tol, backend=self.backend)

    def outcome(self, loop_iterations: int) -> _CGOutcome:
        rs = self.residual_sq()
        gap = self.probe.gap if self.probe.gap is not None else torch.full((), math.nan, device=rs.device)
        if self.state is None:
            st = {"status": _RUNNING, "steps": 0, "min_rayleigh_quotient": math.inf, "scale": 0.0}
            rs_h, asym = float(rs), math.nan
        else:
            vals = torch.cat([self.state, rs.reshape(1), gap.to(self.state.dtype).reshape(1)]).tolist()
            st = dict(zip(CG_STATE_FIELDS, vals))
            rs_h, asym = vals[-2], vals[-1]
        fell_back = (self.fallback and int(st["status"]) != _RUNNING and int(st["steps"]) == 0
                     and 0 < st["scale"] < math.inf)
        if fell_back:
            # stopped before any step: x = 0, r = b, and the update left s = A r (β = 0). As the
            # textbook path: x = b / scale, r = b − Ab / scale.
            self.x.add_(self.r, alpha=1.0 / st["scale"])
            self.r.sub_(self.s, alpha=1.0 / st["scale"])
            rs_h = float(torch.dot(self.r, self.r))
        return _CGOutcome(self.x, rs_h, int(st["steps"]), loop_iterations, self.matvecs, int(st["status"]),
                          st["min_rayleigh_quotient"], st["scale"], asym, fell_back)


def _iterate_cg(run: Union[_HestenesStiefelCG, _ChronopoulosGearCG, _HostScalarCG], maxiter: int,
                check_every: int, thresh: Tensor, sym_tol: float) -> int:
    """The CG loop: steps until the residual test, a curvature stop or an asymmetric operator is seen.

    The state is read on the host only every ``check_every`` iterations (one sync); iterations
    after a stop are no-ops on the device. A run with host scalars (:class:`_HostScalarCG`) is
    tested after every iteration, for free. Returns the number of loop iterations run.
    """
    it = 0
    if isinstance(run, _HostScalarCG):
        while it < maxiter and not run.done():
            run.step()
            it += 1
            if run.asymmetric(sym_tol):
                break
        return it
    if bool((run.residual_sq() <= thresh).all()):
        return it
    while it < maxiter:
        run.step()
        it += 1
        if it % check_every == 0 or it == maxiter:
            # systems run in lockstep: stop when every one has stopped, or any one is asymmetric (an error)
            stop = ((run.residual_sq() <= thresh) | (run.status != _RUNNING)).all()
            if run.probe.gap is not None:
                stop = stop | (run.probe.gap > sym_tol).any()
            if bool(stop):
                break
    return it


@dataclass(frozen=True)
class CG(Solver):
    """Conjugate gradient on ``(H + damping·I) x = b``; ``H`` must be symmetric positive (semi-)definite.

    Error shrinks like ``((√κ−1)/(√κ+1))^k``. The accurate default: ``bl.Implicit()`` uses
    ``CG(maxiter=10, on_indefinite="stop")`` and :func:`bilevel.implicit_hypergrad`
    ``CG(on_indefinite="stop")``; the class keeps ``on_indefinite="raise"`` so that a solver the user
    configures is loud (docs/choosing.md, "Defaults on non-convex networks", measures both).

    Args:
        maxiter: at most this many iterations (= Hessian-vector products).
        tol: stop when ``‖r‖ ≤ max(tol·‖b‖ + atol, 8·eps·‖b‖)`` (relative residual; the second
            term is the rounding floor, below which steps only amplify rounding). ``tol=0`` runs
            the whole budget (benchmarks use it) unless the residual reaches that floor.
        damping: added to the diagonal; makes an indefinite or singular ``H`` solvable.
        atol: absolute residual tolerance.
        check_every: test convergence on the host every this many iterations (one system on the
            CPU is tested after every iteration: there the host read is free, so no product is
            spent past convergence).
        on_indefinite: ``"raise"`` (default): a direction of negative curvature or NaN
            raises :class:`DivergenceError`; ``"stop"``: stop there (Steihaug truncation) and
            return the last iterate before it (CG's iterates decrease the quadratic model
            ``½xᵀAx − bᵀx`` while the curvature is positive), with ``info.converged = False`` and
            ``info.extra["indefinite"] = True``. A solve from zero
            that stops before its first step (``b`` itself has non-positive curvature, common at a
            random initialization) returns ``b / scale`` rather than zero (which would make the
            hypergradient zero), ``scale = |bᵀAb|/bᵀb``: the identity approximation of ``A``, at no
            extra product; ``info.extra["fallback"]`` says so and ``residual_norm`` is its own.
        backend: ``"auto"`` (fused Triton updates for CUDA vectors when Triton is installed,
            torch otherwise), ``"torch"``, or ``"triton"`` (see :mod:`bilevel.kernels`). The
            fused path runs the Chronopoulos–Gear form of CG (the same iterates in exact
            arithmetic) with every reduction on the device; ``on_indefinite="stop"`` there
            returns the iterate from before the direction of non-positive curvature (or the
            same ``b / scale`` fallback).
        symmetry_tol: the relative asymmetry above which the operator counts as non-symmetric
            (an error); ``None`` (default): ``√eps`` of ``b``'s dtype. See below.

    Curvature is judged relative to the operator's scale and to rounding: with ``ρ = pᵀAp/pᵀp``
    and ``scale`` the largest ``|ρ|`` seen so far, ``ρ < −64·eps·scale`` (or NaN) is negative
    curvature; ``|ρ| ≤ 64·eps·scale`` is zero curvature, where CG cannot step. Zero curvature
    once the residual is at rounding level (the usual end of a solve on a singular positive
    semi-definite ``H``, e.g. softmax regression) returns that iterate with ``converged=True``;
    anywhere else it counts as negative curvature. ``info.extra`` holds
    ``min_rayleigh_quotient`` and ``indefinite``.

    The operator must be symmetric: on the second iteration CG compares ``uᵀ(Av)`` with
    ``vᵀ(Au)`` for the two vectors whose products it already has (no extra product) and raises
    :class:`DivergenceError` when they differ by more than ``symmetry_tol`` relative (default
    ``√eps`` of ``b``'s dtype), which rounding of a Hessian-vector product never reaches in that
    precision. For a non-symmetric system use a solver for non-symmetric systems, or symmetrize the
    operator; :class:`Exact` solves any non-singular one. Products computed in lower precision than
    ``b`` (a loss under ``torch.autocast``) round more: set ``symmetry_tol`` to about ``√eps`` of
    that precision (0.1 for bfloat16, 0.03 for float16); ``math.inf`` turns the check off.

    ``solve_flat(matvec, b, x0)`` takes a warm start ``x0`` (``warm_startable = True``).

    Shapes: called on trees, ``b`` is a tree of any leaf shapes (``P`` entries in all) and the
    returned :class:`Solution` has the same keys and shapes; :meth:`solve_flat` takes and returns
    vectors of shape ``(P,)``.

    Example:
        >>> A = torch.tensor([[4., 1.], [1., 3.]])
        >>> x = bl.CG(tol=1e-6)(lambda v: {"x": A @ v["x"]}, {"x": torch.tensor([1., 2.])})
        >>> x["x"], x.info.iterations, x.info.converged
        (tensor([0.0909, 0.6364]), 2, True)
    """

    warm_startable: ClassVar[bool] = True
    batchable: ClassVar[bool] = True

    maxiter: int = 100
    tol: float = 1e-10
    damping: float = 0.0
    atol: float = 0.0
    check_every: int = 5
    on_indefinite: str = "raise"
    backend: str = "auto"
    symmetry_tol: Optional[float] = None

    def __post_init__(self) -> None:
        _check_backend("bilevel.CG", self.backend)
        if self.symmetry_tol is not None:
            _check_number("bilevel.CG", "symmetry_tol", self.symmetry_tol)
        _check_number("bilevel.CG", "maxiter", self.maxiter, low=1, integer=True)
        _check_number("bilevel.CG", "tol", self.tol)
        _check_number("bilevel.CG", "atol", self.atol)
        _check_number("bilevel.CG", "damping", self.damping)
        _check_number("bilevel.CG", "check_every", self.check_every, low=1, integer=True)
        if self.on_indefinite not in ("raise", "stop"):
            raise ValueError(f"bilevel.CG: expected on_indefinite 'raise' or 'stop', got {self.on_indefinite!r}.")

    def _indefinite_error(self, min_curv: float, it: int) -> DivergenceError:
        fix = max(1e-3, 2 * abs(min_curv)) if math.isfinite(min_curv) else 1.0
        return DivergenceError(
            f"bilevel.CG: expected a symmetric positive definite operator (H + damping·I), but found "
            f"curvature pᵀAp/pᵀp = {min_curv:.3e} ≤ 0 (or NaN) within the first {it} iterations "
            f"(damping={self.damping}). The inner loss is not locally convex at params, or params is "
            f"far from a minimum. Fix: add damping above that, e.g. CG(damping={self.damping + fix:.3g}), "
            f"use on_indefinite='stop', or solve the inner problem further."
        )

    def _symmetry_tol(self, dtype: torch.dtype) -> float:
        return _symmetry_tol(dtype) if self.symmetry_tol is None else float(self.symmetry_tol)

    def _asymmetric_error(self, gap: float, tol: float) -> DivergenceError:
        return DivergenceError(
            f"bilevel.CG: expected a symmetric operator (H + damping·I), but the operator is not symmetric: "
            f"uᵀ(Av) and vᵀ(Au) differ by {gap:.3e} relative to ‖u‖‖Av‖ + ‖v‖‖Au‖ (rounding stays below "
            f"{tol:.1e}). CG needs a symmetric positive definite operator, e.g. a Hessian; the Jacobian of a "
            f"root or fixed-point map is not symmetric. Fix: use a solver for non-symmetric systems, or "
            f"symmetrize the operator; bl.Exact() solves any non-singular system densely. If the products are "
            f"a Hessian computed in reduced precision (torch.autocast, float16/bfloat16 matmuls), this gap is "
            f"their rounding: pass CG(symmetry_tol=0.1) (about √eps of bfloat16), or compute the inner loss "
            f"in float32."
        )

    def solve_flat(self, matvec: FlatMatvec, b: Tensor, x0: Optional[Tensor] = None) -> tuple[Tensor, SolverInfo]:
        """As :meth:`Solver.solve_flat`; ``x0`` (shape ``(P,)``) is the starting point (one more product)."""
        fused = "triton" if _use_triton(self.backend, b, "bilevel.CG") else None
        return self._solve(matvec, b, x0, fused)

    def solve_flat_batched(self, matvec: FlatMatvec, b: Tensor, x0: Optional[Tensor] = None
                           ) -> tuple[Tensor, list[SolverInfo]]:
        """As :meth:`Solver.solve_flat_batched`: ``B`` systems in lockstep, textbook CG (any ``backend``).

        Each system has its own step sizes ``α_i``, ``β_i``, residual test and curvature stop (a
        ``(B,)`` mask freezes the systems that have stopped); the loop ends when all have stopped, or
        at ``maxiter``. Each system's iterates are those :meth:`solve_flat` takes on it alone.
        ``x0``: starting points, shape ``(B, P)``.

        Example:
            >>> D = torch.tensor([[1., 2.], [4., 8.]])                 # two diagonal systems
            >>> x, infos = bl.CG().solve_flat_batched(lambda V: D * V, torch.ones(2, 2))
            >>> x, [i.converged for i in infos]
            (tensor([[1.0000, 0.5000],
                    [0.2500, 0.1250]]), [True, True])
        """
        if b.dim() != 2 or (x0 is not None and x0.shape != b.shape):
            raise ShapeError(f"bilevel.CG.solve_flat_batched: expected b of shape (B, P) and x0 None or of b's shape, "
                             f"got b {tuple(b.shape)}, x0 {None if x0 is None else tuple(x0.shape)}. Fix: stack the "
                             f"systems' right-hand sides as rows.")
        run, bnorm, thresh = self._start(matvec, b, x0, None)
        it = _iterate_cg(run, self.maxiter, self.check_every, thresh, self._symmetry_tol(b.dtype))
        assert isinstance(run, _HestenesStiefelCG)
        outs = [self._result(o, b, bn, th, None) for o, bn, th in zip(run.outcomes(it), bnorm, thresh.tolist())]
        return torch.stack([x for x, _ in outs]), [info for _, info in outs]

    def _start(self, matvec: FlatMatvec, b: Tensor, x0: Optional[Tensor], fused: Optional[str],
               host_scalars: Optional[bool] = None
               ) -> tuple[Union[_HestenesStiefelCG, _ChronopoulosGearCG, _HostScalarCG], Tensor, Tensor]:
        """``(run, ‖b‖, squared residual threshold)``, per system for a batch ``b`` of shape ``(B, P)``.

        ``host_scalars``: run :class:`_HostScalarCG` (one system); ``None``: for one system on the CPU."""
        A = self._damped(matvec)
        bnorm = self._check_b(b)
        eps = torch.finfo(b.dtype).eps
        # the residual test, never below the rounding floor of the recursive residual
        thresh = _threshold(bnorm, self.tol, self.atol) ** 2
        flat_tol = _FLAT_EPS * eps
        if fused is not None:
            return _ChronopoulosGearCG(A, b, x0, thresh, flat_tol, fused, fallback=self.on_indefinite == "stop"), \
                bnorm, thresh
        if host_scalars is None:
            host_scalars = b.dim() == 1 and b.device.type == "cpu"
        if host_scalars:
            return _HostScalarCG(A, b, x0, float(thresh), flat_tol, fallback=self.on_indefinite == "stop"), \
                bnorm, thresh
        # NOTE: on_indefinite="stop" returns the last iterate (Steihaug's truncation), not the one of
        # smallest residual: CG's iterates decrease the quadratic model ½xᵀAx − bᵀx monotonically while
        # the curvature is positive, but not the residual, and a smallest-residual rule returned the
        # zero start (a zero hypergradient) at most steps of a random or partly trained network.
        return _HestenesStiefelCG(A, b, x0, thresh, flat_tol, fallback=self.on_indefinite == "stop"), bnorm, thresh

    def _solve(self, matvec: FlatMatvec, b: Tensor, x0: Optional[Tensor], fused: Optional[str],
               host_scalars: Optional[bool] = None) -> tuple[Tensor, SolverInfo]:
        """The solve; ``fused``: run the Chronopoulos–Gear form on that kernel backend, else textbook
        CG, with host scalars as :meth:`_start` says."""
        run, bnorm, thresh = self._start(matvec, b, x0, fused, host_scalars)
        it = _iterate_cg(run, self.maxiter, self.check_every, thresh, self._symmetry_tol(b.dtype))
        return self._result(run.outcome(it), b, bnorm, float(thresh), fused)

    def _result(self, out: _CGOutcome, b: Tensor, bnorm: Tensor, thresh: float, fused: Optional[str]
                ) -> tuple[Tensor, SolverInfo]:
        """Turn a run's outcome into ``(x, info)``, or the error it calls for."""
        eps = torch.finfo(b.dtype).eps
        if out.asymmetry > self._symmetry_tol(b.dtype):
            raise self._asymmetric_error(out.asymmetry, self._symmetry_tol(b.dtype))
        x, rs = out.x, out.rs
        converged = rs <= thresh
        if out.status == _FLAT:
            floor = _FLOOR_EPS * eps * (float(bnorm) + out.scale * float(torch.linalg.vector_norm(x)))
            converged = rs <= floor * floor     # breakdown of a solve already at its rounding floor
        indefinite = out.status == _NEGATIVE or (out.status == _FLAT and not converged)
        if indefinite and self.on_indefinite == "raise":
            raise self._indefinite_error(out.min_rq, out.loop_iterations)
        rnorm = math.sqrt(rs) if math.isfinite(rs) else math.nan
        if not math.isfinite(rnorm) or not all_finite(x):
            raise DivergenceError(f"bilevel.CG: the iterate became non-finite after {out.loop_iterations} "
                                  f"iterations. Fix: check matvec for NaN/Inf, or add damping.")
        extra: Dict[str, Any] = {"min_rayleigh_quotient": out.min_rq, "indefinite": indefinite}
        if out.fallback:
            extra["fallback"] = "b / scale: stopped before the first step (x = 0 would give a zero hypergradient)"
        if fused is not None:
            extra["backend"] = fused
        return x, SolverInfo("CG", out.steps, out.matvecs, rnorm, float(bnorm), converged and not indefinite, extra)


def _power_steps(matvec: FlatMatvec, v: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """``iters`` power-iteration products from the unit vector ``v``: ``(Rayleigh quotient, next unit vector)``."""
    lam = torch.zeros((), dtype=v.dtype, device=v.device)
    for _ in range(iters):
        Av = matvec(v)
        lam = torch.dot(v, Av)
        n = torch.linalg.vector_norm(Av)
        v = torch.where(n > 0, Av / torch.where(n > 0, n, 1.0), v)
    return lam, v


def _unit(v: Tensor) -> Tensor:
    n = torch.linalg.vector_norm(v)
    return torch.where(n > 0, v / torch.where(n > 0, n, 1.0), v)


def power_iteration(matvec: FlatMatvec, like: Tensor, *, iters: int = 20, seed: int = 0,
                    v0: Optional[Tensor] = None, return_vector: bool = False) -> Any:
    """Estimate the dominant eigenvalue of a symmetric operator (Rayleigh quotient).

    Args:
        matvec: ``v -> A v`` on flat vectors of shape ``like.shape``.
        like: a vector giving shape, dtype and device.
        iters: number of products (cost).
        seed: seed of the random start vector (deterministic), when ``v0`` is not given.
        v0: a start vector of shape ``like.shape`` (e.g. the eigenvector estimate of a nearby
            operator: a warm start needs one or two products where a random start needs ~20).
        return_vector: also return the eigenvector estimate (to warm-start the next call).

    Returns:
        0-dim tensor: the Rayleigh quotient after ``iters`` products; it tends to the
        eigenvalue of largest magnitude (negative if that one is negative). With
        ``return_vector=True``: ``(eigenvalue, unit vector of shape like.shape)``.

    Example:
        >>> A = torch.diag(torch.tensor([3., 1., 0.5], dtype=torch.float64))
        >>> lam, v = bl.solvers.power_iteration(lambda v: A @ v, torch.zeros(3, dtype=torch.float64),
        ...                                     iters=50, return_vector=True)
        >>> round(float(lam), 6), round(float(v.abs()[0]), 6)
        (3.0, 1.0)
    """
    if v0 is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v0 = torch.randn(like.shape, generator=gen, dtype=like.dtype).to(like.device)
    elif v0.shape != like.shape:
        raise ShapeError(f"bilevel.power_iteration: expected v0 of shape {tuple(like.shape)}, got {tuple(v0.shape)}.")
    lam, v = _power_steps(matvec, _unit(v0.to(like.dtype)), iters)
    return (lam, v) if return_vector else lam


@dataclass(frozen=True)
class Neumann(Solver):
    """Truncated Neumann series ``x = α Σ_{j=0..steps} (I − αA)^j b``, ``A = H + damping·I``.

    Lorraine et al. (2020). ``steps`` products; at an inner optimum it equals
    ``steps + 1`` unrolled gradient-descent steps with learning rate ``α``
    differentiated from there. Converges iff all eigenvalues of ``A`` lie in
    ``(0, 2/α)``.

    Args:
        steps: number of series terms after the first (= Hessian-vector products).
        alpha: step ``α``; ``None`` picks ``1/λ_max`` from ``power_iters`` power
            iterations (cost: ``power_iters`` extra products).
        damping: added to the diagonal of ``H``.
        power_iters: products spent estimating ``λ_max`` when ``alpha`` is ``None`` (from a random vector).
        refresh_iters: products spent refreshing ``λ_max`` from the eigenvector estimate of a previous
            solve (``solve_flat(..., eigvec0=info.extra["eigvec"])``; ``bl.Implicit`` keeps it across
            hyper steps): the weights move little between hyper steps, so 1 product keeps the
            estimate where 20 from a random vector were spent before (cosines unchanged to 3 digits
            in docs/choosing.md, "Defaults on non-convex networks"). The Rayleigh quotient never
            exceeds ``λ_max``, so ``α = 1/λ`` errs on the large side; a jump of ``λ_max`` by 2× between
            steps makes the series grow, which raises (``max_growth``).
        max_growth: raise :class:`DivergenceError` if a series term grows beyond
            ``max_growth·‖b‖`` (a convergent series on a symmetric ``A`` never grows).
        check_every: test for growth/NaN on the host every this many terms.
        seed: seed of the power iteration's start vector.
        backend: ``"auto"`` | ``"torch"`` | ``"triton"``: the fused in-place update
            (:func:`bilevel.kernels.neumann_step`; Triton for CUDA vectors under ``"auto"``).

    ``info.residual_norm`` is ``‖(I−αA)^steps b‖``, the exact residual of the series one
    term shorter (``A x − b = −(I−αA)^{steps+1} b`` for the returned ``x``), hence an upper
    bound of the returned ``x``'s residual when the series converges (free: no extra product).

    Negative curvature: the terms ``(I − αA)^j b`` concentrate on eigenvalues where ``|1 − αλ|`` is
    largest, negative ones first, so the smallest Rayleigh quotient of the terms (one dot product per
    term) finds it: ``info.extra["min_rayleigh_quotient"]`` and ``["indefinite"]`` report it, and
    ``info.converged`` is then ``False`` (the series sums growing components, a direction no
    minimum has). A dominant negative eigenvalue raises :class:`DivergenceError` (no step size).
    ``info.extra["eigvec"]`` (with ``alpha=None``) is the eigenvector estimate for the next solve.

    Shapes: called on trees, ``b`` is a tree of any leaf shapes (``P`` entries in all) and the
    returned :class:`Solution` has the same keys and shapes; :meth:`solve_flat` takes and returns
    vectors of shape ``(P,)`` (and ``eigvec0`` of shape ``(P,)``).

    Example:
        >>> A = torch.tensor([[2., 0.], [0., 1.]])
        >>> x = bl.Neumann(steps=60)(lambda v: {"x": A @ v["x"]}, {"x": torch.ones(2)})
        >>> x["x"]
        tensor([0.5000, 1.0000])
    """

    warm_startable: ClassVar[bool] = True

    steps: int = 20
    alpha: Optional[float] = None
    damping: float = 0.0
    power_iters: int = 20
    refresh_iters: int = 1
    max_growth: float = 1.001
    check_every: int = 5
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        _check_backend("bilevel.Neumann", self.backend)
        _check_number("bilevel.Neumann", "steps", self.steps, low=0, integer=True)
        if self.alpha is not None:
            _check_number("bilevel.Neumann", "alpha", self.alpha, strict=True)
        _check_number("bilevel.Neumann", "damping", self.damping)
        _check_number("bilevel.Neumann", "power_iters", self.power_iters, low=1, integer=True)
        _check_number("bilevel.Neumann", "refresh_iters", self.refresh_iters, low=1, integer=True)
        _check_number("bilevel.Neumann", "max_growth", self.max_growth, low=1.0)
        _check_number("bilevel.Neumann", "check_every", self.check_every, low=1, integer=True)

    def solve_flat(self, matvec: FlatMatvec, b: Tensor, x0: Optional[Tensor] = None, *,
                   eigvec0: Optional[Tensor] = None) -> tuple[Tensor, SolverInfo]:
        """As :meth:`Solver.solve_flat`; ``x0`` (shape ``(P,)``) warm-starts the series: it then sums
        ``x0 + α Σ_j (I − αA)^j r₀`` with ``r₀ = b − A x0`` (Richardson iteration from ``x0``, one
        more product). ``eigvec0`` (shape ``(P,)``, with ``alpha=None``): the eigenvector estimate of
        a previous solve (``info.extra["eigvec"]``); ``λ_max`` is then refreshed from it with
        ``refresh_iters`` products instead of ``power_iters`` from a random vector."""
        A = self._damped(matvec)
        bnorm = self._check_b(b)
        matvecs = 0
        lam_max: Optional[float] = None
        eigvec: Optional[Tensor] = None
        if self.alpha is None:
            iters = self.power_iters if eigvec0 is None else self.refresh_iters
            lam, eigvec = power_iteration(A, b, iters=iters, seed=self.seed, v0=eigvec0, return_vector=True)
            matvecs += iters
            lam_max = float(lam)
            if not (math.isfinite(lam_max) and lam_max > 0):
                raise DivergenceError(
                    f"bilevel.Neumann: expected a positive dominant eigenvalue of H + damping·I to choose alpha, "
                    f"got λ ≈ {lam_max:.3e} from {iters} power iterations (damping={self.damping}). "
                    f"The inner loss has strong negative curvature at params (or matvec returns NaN). "
                    f"Fix: add damping larger than |λ|, solve the inner problem further, or use CG(on_indefinite='stop')."
                )
            alpha = 1.0 / lam_max
        else:
            alpha = float(self.alpha)
        backend = "triton" if _use_triton(self.backend, b, "bilevel.Neumann") else "torch"
        r0 = b
        if x0 is not None:
            r0 = b - A(x0)
            matvecs += 1
        p = r0.clone()
        acc = r0.clone()
        alpha_t = torch.tensor(alpha, dtype=b.dtype, device=b.device)
        pp = torch.dot(r0, r0)
        limit = self.max_growth * torch.sqrt(pp)
        # NOTE: the Rayleigh quotient of each term (one dot product, no host sync) detects negative
        # curvature: the terms (I − αA)^j b concentrate on the eigenvalues where |1 − αλ| is largest,
        # negative ones first (factor > 1), so a negative quotient appears within a few terms.
        tiny = torch.finfo(b.dtype).tiny
        min_rq = torch.full((), math.inf, dtype=b.dtype, device=b.device)
        # one buffer for every product when the operator writes into one (no allocation per term;
        # the peak is unchanged: a fresh product is as large, and is alive while it is taken)
        buf = torch.empty_like(p) if writes_out(A) else None
        for j in range(1, self.steps + 1):
            Ap = A(p) if buf is None else A(p, out=buf)
            min_rq = torch.minimum(min_rq, torch.dot(p, Ap) / pp.clamp_min(tiny))
            pp = neumann_step(p, Ap, acc, alpha_t, backend=backend)   # in place: p ← p − αAp; acc += p
            # NOTE: a fresh product is freed now, not when the next one is assigned: otherwise two
            # products are alive while the next one is taken (a weight-sized vector more at the
            # solve's peak); with `buf` this only drops the name
            del Ap
            matvecs += 1
            if j % self.check_every == 0 or j == self.steps:
                pn = torch.sqrt(pp)
                if not bool(torch.isfinite(pn)) or bool(pn > limit):
                    raise DivergenceError(
                        f"bilevel.Neumann: expected the series terms (I − αA)^j b to shrink, but at term {j} "
                        f"‖(I − αA)^j b‖ = {float(pn):.3e} > {self.max_growth}·‖b‖ = {float(limit):.3e} "
                        f"(alpha={alpha:.3e}, damping={self.damping}). The series diverges: α·λ_max(H) ≥ 2 or H has "
                        f"negative curvature. Fix: use alpha=None (chosen by power iteration), a smaller alpha, "
                        f"damping > 0, or the CG solver."
                    )
        x = acc.mul_(alpha) if x0 is None else acc.mul_(alpha).add_(x0)     # in place: no third vector
        res = float(torch.sqrt(pp))
        rq_min = float(min_rq)
        # negative beyond rounding, on the scale 1/α of the operator
        indefinite = rq_min < -_FLAT_EPS * torch.finfo(b.dtype).eps / alpha
        extra: Dict[str, Any] = {"alpha": alpha, "lambda_max": lam_max, "residual_is_bound": True,
                                 "min_rayleigh_quotient": rq_min, "indefinite": indefinite}
        if eigvec is not None:
            extra["eigvec"] = eigvec
        return x, SolverInfo("Neumann", self.steps, matvecs, res, float(bnorm), not indefinite, extra)


def _sym_pinv_apply(M: Tensor, y: Tensor, rcond: float) -> Tensor:
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.mT))
    cut = rcond * evals.abs().max().clamp_min(torch.finfo(M.dtype).tiny)
    inv = torch.where(evals > cut, 1.0 / torch.where(evals > cut, evals, 1.0), torch.zeros_like(evals))
    return evecs @ (inv * (evecs.mT @ y))


@dataclass(frozen=True)
class Nystrom(Solver):
    """Nyström approximation ``Â = C W⁺ Cᵀ`` of ``A = H + damping·I``, solved by Woodbury.

    Hataya & Yamada (2023). Takes ``rank`` products ``C = A Ω`` (``Ω`` random
    coordinate columns, or a Gaussian sketch), and returns ``(Â + ρI)⁻¹ b``
    from an eigendecomposition of the rank-``k`` factor. No step size, no
    divergence; cost ``rank`` products (+1 for the residual), memory ``O(P·rank)``.
    With ``rank ≥ P`` it is exact (up to ``rho`` when a number is given).

    Args:
        rank: number of sampled columns / sketch vectors ``k``.
        rho: ``"auto"`` (default): ``x = U Λ⁻¹ Uᵀ b + (b − U Uᵀ b) / λ_k`` with ``Â = U Λ Uᵀ``
            and ``λ_k`` its smallest eigenvalue: the captured subspace is inverted exactly and
            the unseen rest of the spectrum is taken to be ``λ_k``; scale-free, exact when
            ``rank ≥ P``. A number ``ρ > 0``: ``(Â + ρI)⁻¹ b`` (Hataya & Yamada's
            regularization), which must be on the scale of ``H``'s small eigenvalues: the former
            default 1e-3 gave hypergradients orders of magnitude off on the problems of
            benchmarks/RESULTS.md §1 (both are tabulated there).
        damping: added to the diagonal of ``H``.
        sketch: ``"columns"`` (uniformly sampled coordinates, as in the paper) or
            ``"gaussian"`` (randomized Nyström, better spectral approximation).
        seed: seed of the sampling (deterministic).
        residual: spend one more product to report the true residual.

    Shapes: called on trees, ``b`` is a tree of any leaf shapes (``P`` entries in all) and the
    returned :class:`Solution` has the same keys and shapes; :meth:`solve_flat` takes and returns
    vectors of shape ``(P,)``.

    Example:
        >>> A = torch.tensor([[2., 0.], [0., 1.]])
        >>> x = bl.Nystrom(rank=2, rho=1e-8)(lambda v: {"x": A @ v["x"]}, {"x": torch.ones(2)})
        >>> torch.allclose(x["x"], torch.tensor([0.5, 1.0]))
        True
    """

    rank: int = 10
    rho: Union[float, str] = "auto"
    damping: float = 0.0
    sketch: str = "columns"
    seed: int = 0
    residual: bool = True

    def __post_init__(self) -> None:
        _check_number("bilevel.Nystrom", "rank", self.rank, low=1, integer=True)
        if isinstance(self.rho, str):
            if self.rho != "auto":
                raise ValueError(f"bilevel.Nystrom: expected rho 'auto' or a number > 0, got {self.rho!r}.")
        else:
            _check_number("bilevel.Nystrom", "rho", self.rho, strict=True)
        _check_number("bilevel.Nystrom", "damping", self.damping)
        if self.sketch not in ("columns", "gaussian"):
            raise ValueError(f"bilevel.Nystrom: expected sketch 'columns' or 'gaussian', got {self.sketch!r}.")

    def solve_flat(self, matvec: FlatMatvec, b: Tensor) -> tuple[Tensor, SolverInfo]:
        A = self._damped(matvec)
        bnorm = self._check_b(b)
        P = b.shape[0]
        k = min(self.rank, P)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        if self.sketch == "columns":
            idx = torch.randperm(P, generator=gen)[:k].to(b.device)
            cols = []
            for i in idx.tolist():
                e = torch.zeros_like(b)
                e[i] = 1.0
                cols.append(A(e))
            C = torch.stack(cols, dim=1)                      # (P, k)
            W = C[idx]                                        # (k, k) = Ωᵀ A Ω
        else:
            Om = torch.randn(P, k, generator=gen, dtype=b.dtype).to(b.device)
            Om, _ = torch.linalg.qr(Om)
            C = torch.stack([A(Om[:, j].contiguous()) for j in range(k)], dim=1)
            W = Om.mT @ C
        matvecs = k
        if not bool(torch.isfinite(C).all()):
            raise DivergenceError("bilevel.Nystrom: matvec returned NaN/Inf while sampling columns. "
                                  "Fix: check the inner loss at params for NaN/Inf.")
        # Â = C W⁺ Cᵀ = B Bᵀ with B = C V_+ S_+^{-1/2}; negative eigenvalues of W (indefinite H)
        # are dropped, which keeps Â positive semi-definite.
        s, V = torch.linalg.eigh(0.5 * (W + W.mT))
        keep = s > s.abs().max().clamp_min(torch.finfo(b.dtype).tiny) * (k * torch.finfo(b.dtype).eps)
        B = (C @ V[:, keep]) / torch.sqrt(s[keep])
        U, sig, _ = torch.linalg.svd(B, full_matrices=False)  # Â = U diag(sig²) Uᵀ
        lam = sig ** 2
        Utb = U.mT @ b
        # Component of b outside span(U), projected twice ("twice is enough"): a single
        # projection leaves O(eps·‖b‖) rounding that the 1/ρ factor would amplify.
        perp = b - U @ Utb
        perp = perp - U @ (U.mT @ perp)
        if self.rho == "auto":
            # Â's own smallest eigenvalue stands in for the unseen rest of the spectrum, on the
            # complement of Â's range only: scale-free, and exact once rank ≥ P
            rho_c = lam.min().clamp_min(torch.finfo(b.dtype).tiny) if lam.numel() else bnorm.new_tensor(1.0)
            x = U @ (Utb / lam) + perp / rho_c
        else:
            x = U @ (Utb / (lam + self.rho)) + perp / self.rho
        res = math.nan
        if self.residual:
            res = self._residual(A, x, b)
            matvecs += 1
        info = SolverInfo("Nystrom", k, matvecs, res, float(bnorm), True,
                          {"rank": int(keep.sum()), "eigenvalues": lam.detach().cpu()})
        return x, info


@dataclass(frozen=True)
class Identity(Solver):
    """``H ≈ I/scale``: ``x = scale·b / (1 + scale·damping)`` (the "one-step" / T1–T2 approximation).

    Costs nothing (one product if ``residual=True``). The direction is biased but
    cheap; use it when the inner problem is far from converged or for a first try.

    Shapes: called on trees, ``b`` is a tree of any leaf shapes (``P`` entries in all) and the
    returned :class:`Solution` has the same keys and shapes; :meth:`solve_flat` takes and returns
    vectors of shape ``(P,)``.

    Example:
        >>> bl.Identity()(lambda v: v, {"x": torch.ones(2)})["x"]
        tensor([1., 1.])
    """

    scale: float = 1.0
    damping: float = 0.0
    residual: bool = True

    def __post_init__(self) -> None:
        _check_number("bilevel.Identity", "scale", self.scale, strict=True)
        _check_number("bilevel.Identity", "damping", self.damping)

    def solve_flat(self, matvec: FlatMatvec, b: Tensor) -> tuple[Tensor, SolverInfo]:
        bnorm = self._check_b(b)
        x = b * (self.scale / (1.0 + self.scale * self.damping))
        res, mv = math.nan, 0
        if self.residual:
            res, mv = self._residual(self._damped(matvec), x, b), 1
        return x, SolverInfo("Identity", 0, mv, res, float(bnorm), True)


@dataclass(frozen=True)
class Exact(Solver):
    """Materialize ``A = H + damping·I`` with ``P`` products and solve densely.

    For small problems and tests (cost ``P`` products, memory ``P²``).

    Args:
        damping: added to the diagonal.
        dtype: dtype of the dense solve (default float64, whatever ``b``'s dtype).
        max_size: refuse problems with more than this many unknowns.

    Shapes: called on trees, ``b`` is a tree of any leaf shapes (``P`` entries in all) and the
    returned :class:`Solution` has the same keys and shapes; :meth:`solve_flat` takes and returns
    vectors of shape ``(P,)``.

    Example:
        >>> A = torch.tensor([[4., 1.], [1., 3.]], dtype=torch.float64)
        >>> bl.Exact()(lambda v: {"x": A @ v["x"]}, {"x": torch.tensor([1., 2.], dtype=torch.float64)})["x"]
        tensor([0.0909, 0.6364], dtype=torch.float64)
    """

    batchable: ClassVar[bool] = True

    damping: float = 0.0
    dtype: Optional[torch.dtype] = torch.float64
    max_size: int = 20_000

    def __post_init__(self) -> None:
        _check_number("bilevel.Exact", "damping", self.damping)
        _check_number("bilevel.Exact", "max_size", self.max_size, low=1, integer=True)

    def solve_flat(self, matvec: FlatMatvec, b: Tensor) -> tuple[Tensor, SolverInfo]:
        x, infos = self._dense(matvec, b)
        return x, infos[0]

    def solve_flat_batched(self, matvec: FlatMatvec, b: Tensor) -> tuple[Tensor, list[SolverInfo]]:
        """As :meth:`Solver.solve_flat_batched`: ``P`` batched products build the ``B`` matrices, one
        batched dense solve."""
        if b.dim() != 2:
            raise ShapeError(f"bilevel.Exact.solve_flat_batched: expected b of shape (B, P), got {tuple(b.shape)}. "
                             f"Fix: stack the systems' right-hand sides as rows.")
        return self._dense(matvec, b)

    def _dense(self, matvec: FlatMatvec, b: Tensor) -> tuple[Tensor, list[SolverInfo]]:
        """``b`` of shape ``(P,)`` or ``(B, P)``; one info per system."""
        P = b.shape[-1]
        if P > self.max_size:
            raise ShapeError(
                f"bilevel.Exact: expected at most max_size={self.max_size} unknowns for a dense solve, got {P}. "
                f"Fix: use bl.CG() (or raise max_size if {P}² entries fit in memory)."
            )
        bnorm = self._check_b(b)
        A = self._damped(matvec)
        eye = torch.eye(P, dtype=b.dtype, device=b.device)
        H = torch.stack([A(eye[j].expand_as(b).contiguous()) for j in range(P)], dim=-1)   # column j: A e_j
        if not bool(torch.isfinite(H).all()):
            raise DivergenceError("bilevel.Exact: matvec returned NaN/Inf. Fix: check the inner loss at params.")
        dt = self.dtype or b.dtype
        Hd = H.to(dt)
        x, info_code = torch.linalg.solve_ex(Hd, b.to(dt))
        if bool((info_code != 0).any()) or not all_finite(x):
            raise DivergenceError(
                f"bilevel.Exact: the {P}x{P} operator H + damping·I is singular (damping={self.damping}). "
                f"Fix: add damping > 0, or remove parameters the inner loss does not use."
            )
        x = x.to(b.dtype)
        res = torch.linalg.vector_norm((Hd @ x.to(dt).unsqueeze(-1)).squeeze(-1) - b.to(dt), dim=-1)
        return x, [SolverInfo("Exact", P, P, r, bn, True) for r, bn in zip(res.reshape(-1).tolist(),
                                                                           bnorm.reshape(-1).tolist())]


# -- non-symmetric systems ---------------------------------------------------------------------------
# NOTE: GMRES, BiCGSTAB and NormalCG follow CG's rules on rounding. The residual test never asks for
# less than 8·eps·‖b‖ (_threshold). A breakdown is judged relative to its natural size: `scale` is
# the largest gain ‖A v‖/‖v‖ seen so far (a lower bound of ‖A‖), and a quantity counts as zero when
# it is below 64·eps (_FLAT_EPS) times the product of the norms it is made of; NaN counts as a
# breakdown too. A breakdown once the residual is at its rounding floor returns the iterate as
# converged; anywhere else it raises DivergenceError, never returning the garbage that a step with
# a rounding-size divisor would make. GMRES's residual (from the Givens rotations) and BiCGSTAB's
# (updated recursively) can drift away from b − A x, so a passed test is confirmed on the true
# residual (one product) before the solve returns, and a failed confirmation restarts from there.
# The true residual of an exact solution is itself only accurate to about eps·(‖b‖ + ‖A‖‖x‖):
# _true_floor accepts that much, but never more than √eps·‖b‖. That cap matters: an iteration that
# blew up (BiCGSTAB on a singular operator reached ‖x‖ = 2e15 with ‖b − Ax‖ = 0.7‖b‖) would
# otherwise pass, its ‖A‖‖x‖ making any residual look like rounding.
_BREAKDOWN, _LEAST_SQUARES, _NONFINITE = 3, 4, 5


def _true_floor(bnorm: float, scale: float, xnorm: float, dtype: torch.dtype) -> float:
    """Rounding level of a true residual ``b − A x`` computed in ``dtype`` (at most ``√eps·‖b‖``)."""
    eps = torch.finfo(dtype).eps
    return min(_FLOOR_EPS * eps * (bnorm + scale * xnorm), math.sqrt(eps) * bnorm)


def _true_residual(A: FlatMatvec, b: Tensor, x: Tensor) -> tuple[Tensor, float, float]:
    """``(r, ‖r‖, ‖x‖)`` with ``r = b − A x`` (one product, one host sync)."""
    r = b - A(x)
    rn, xn = torch.stack([torch.linalg.vector_norm(r), torch.linalg.vector_norm(x)]).tolist()
    return r, rn, xn


def _nonfinite_error(fn: str, iterations: int) -> DivergenceError:
    return DivergenceError(
        f"bilevel.{fn}: expected finite products, but the iteration produced NaN/Inf after {iterations} "
        f"iterations. Fix: check matvec (and rmatvec) for NaN/Inf at this point, or add damping.")


def _singular_error(fn: str, what: str, iterations: int, damping: float) -> DivergenceError:
    return DivergenceError(
        f"bilevel.{fn}: expected a non-singular operator (H + damping·I), but {what} after {iterations} "
        f"iterations (damping={damping}): the operator is singular to rounding on the Krylov space, and the "
        f"system has no solution there. Fix: add damping > 0, or check that the root / fixed point is "
        f"isolated (its Jacobian invertible); bl.Exact() reports singularity densely on small problems.")


def _transpose_by_autograd(matvec: FlatMatvec, like: Tensor, fn: str) -> FlatMatvec:
    """``u -> Aᵀ u`` by reverse-mode autograd through one recorded call ``A v`` (``A`` linear).

    Costs one product to record; each call is one backward pass through that graph.
    """
    with torch.enable_grad():
        v = torch.zeros(like.shape, dtype=like.dtype, device=like.device, requires_grad=True)
        y = matvec(v)
    how = ("Fix: pass rmatvec= (u -> Hᵀ u, without damping): for H the Jacobian ∂F/∂x of a function F at x, "
           "rmatvec = lambda u: torch.func.vjp(F, x)[1](u)[0]; a symmetric H (a Hessian) is its own "
           "transpose: rmatvec=matvec.")
    if not (isinstance(y, Tensor) and y.requires_grad):
        raise TypeError(
            f"bilevel.{fn}: expected rmatvec (v -> Hᵀ v), or a matvec differentiable by autograd to build it "
            f"from, but rmatvec is None and matvec's output carries no graph (it detaches, or calls "
            f"torch.autograd.grad without create_graph=True, as Hessian-vector products do). {how}")

    def rmatvec(u: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(y, v, u, retain_graph=True, allow_unused=True)
        if g is None:
            raise TypeError(f"bilevel.{fn}: expected matvec's output to depend on its input, but autograd "
                            f"finds no path from v to matvec(v). {how}")
        return g

    return rmatvec


def _check_iteration_options(solver: Solver, counts: tuple[str, ...]) -> None:
    fn = f"bilevel.{solver.name}"
    for name in counts:
        _check_number(fn, name, getattr(solver, name), low=1, integer=True)
    for name in ("tol", "atol", "damping"):
        _check_number(fn, name, getattr(solver, name))


@dataclass(frozen=True)
class _ShortRecurrence(Solver):
    """The options of :class:`BiCGSTAB` and :class:`NormalCG` (see theirs)."""

    maxiter: int = 100
    tol: float = 1e-10
    damping: float = 0.0
    atol: float = 0.0
    check_every: int = 5

    def __post_init__(self) -> None:
        _check_iteration_options(self, ("maxiter", "check_every"))


class _Arnoldi:
    """One GMRES cycle on the device: Krylov basis ``V``, the Hessenberg matrix rotated to upper
    triangular ``R`` by Givens rotations (accumulated in ``Q``), and ``g = Q·(‖r‖ e₁)``.

    After ``k`` steps the least-squares residual ``min_y ‖‖r‖e₁ − H_k y‖`` is ``|g[k]|``: the
    residual estimate comes from the rotations, with no extra product. ``cols`` counts the steps
    taken before the estimate passed the test (the columns the update uses); later steps are no-ops.
    """

    def __init__(self, m: int, b: Tensor, thresh: Tensor, flat_tol: float) -> None:
        dt, dev = b.dtype, b.device
        self.m, self.thresh, self.flat_tol = m, thresh, flat_tol
        self.V = torch.empty(m + 1, b.shape[0], dtype=dt, device=dev)
        self.R = torch.zeros(m, m, dtype=dt, device=dev)
        self.Q = torch.empty(m + 1, m + 1, dtype=dt, device=dev)
        self.g = torch.empty(m + 1, dtype=dt, device=dev)
        self.scale = torch.zeros((), dtype=dt, device=dev)    # largest ‖A v_j‖ (‖v_j‖ = 1) so far
        self.tiny = torch.finfo(dt).tiny
        self.identity_cs = torch.tensor([1.0, 0.0], dtype=dt, device=dev)
        self.flip_sign = torch.tensor([-1.0, 1.0], dtype=dt, device=dev)

    def start(self, r: Tensor, rnorm: Tensor) -> None:
        torch.div(r, rnorm, out=self.V[0])
        self.g.zero_()
        self.g[0] = rnorm
        self.Q.zero_()
        self.Q.fill_diagonal_(1.0)
        dev = r.device
        self.cols = torch.zeros((), dtype=torch.long, device=dev)
        self.active = torch.ones((), dtype=torch.bool, device=dev)
        self.singular = torch.zeros((), dtype=torch.bool, device=dev)

    def step(self, A: FlatMatvec, k: int) -> None:
        V, Q, R, g = self.V, self.Q, self.R, self.g
        w = A(V[k])
        Vk = V[: k + 1]
        # NOTE: classical Gram-Schmidt applied twice ("twice is enough", Giraud, Langou & Rozložník
        # 2005): orthogonal to working precision like modified Gram-Schmidt, but two matrix-vector
        # products per step instead of k+1 dependent dot/axpy pairs (k kernel launches each).
        h = Vk @ w
        w = torch.addmv(w, Vk.mT, h, alpha=-1.0)
        h2 = Vk @ w
        w = torch.addmv(w, Vk.mT, h2, alpha=-1.0)
        h.add_(h2)
        hn = torch.linalg.vector_norm(w)
        rc = Q[: k + 1, : k + 1] @ h                        # the earlier rotations applied to the new column
        R[: k + 1, k] = rc
        denom = torch.hypot(rc[k], hn)
        R[k, k] = denom
        self.scale = torch.fmax(self.scale, torch.hypot(torch.linalg.vector_norm(rc), hn))   # ‖A v_k‖
        pivot_ok = denom > self.flat_tol * self.scale        # False for NaN
        self.singular = self.singular | (self.active & ~pivot_ok)
        ok = self.active & pivot_ok
        # the rotation G = [[c, s], [−s, c]] that zeroes hn below the pivot (the identity on a frozen step)
        cs = torch.where(ok, torch.stack([rc[k], hn]) / denom, self.identity_cs)
        G = torch.stack([cs, cs.flip(0) * self.flip_sign])
        Q[k: k + 2, : k + 2] = G @ Q[k: k + 2, : k + 2]     # row k+1 of Q was e_{k+1}
        g[k: k + 2] = G @ g[k: k + 2]                        # g[k+1] was 0
        self.cols = self.cols + ok
        self.active = ok & (g[k + 1].abs() > self.thresh)
        torch.div(w, hn.clamp_min(self.tiny), out=V[k + 1])

    def read(self, k: int) -> tuple[bool, int, bool, bool, float]:
        """``(active, cols, singular, nonfinite, scale)`` on the host after ``k`` steps (one sync)."""
        dt = self.scale.dtype
        finite = torch.isfinite(self.R[:k, :k]).all()
        active, cols, singular, finite_h, scale = torch.stack(
            [self.active.to(dt), self.cols.to(dt), self.singular.to(dt), finite.to(dt), self.scale]).tolist()
        return bool(active), int(cols), bool(singular), not finite_h, scale

    def update(self, x: Tensor, cols: int) -> Tensor:
        """``x + V y`` with ``y`` the least-squares solution on the first ``cols`` columns."""
        if cols == 0:
            return x
        y = torch.linalg.solve_triangular(self.R[:cols, :cols], self.g[:cols, None], upper=True)[:, 0]
        return torch.addmv(x, self.V[:cols].mT, y)


@dataclass(frozen=True)
class GMRES(Solver):
    """Restarted GMRES on ``(H + damping·I) x = b``: any non-singular ``H``, symmetric or not.

    Each cycle builds an orthonormal basis of the Krylov space of dimension up to ``restart``
    (Arnoldi, Gram-Schmidt applied twice) and picks the ``x`` of least residual in it (Givens
    rotations on the Hessenberg matrix, which also give that residual without a product), then
    restarts from the new residual ``b − A x`` (one product). Memory: ``restart + 1`` vectors.
    Without restarts (``restart ≥ maxiter``) it converges in at most ``P`` steps in exact
    arithmetic; a small ``restart`` saves memory and can slow convergence or stagnate.

    Args:
        maxiter: at most this many Arnoldi steps (one product each) over all cycles.
        restart: Krylov dimension per cycle (capped at ``P``).
        tol: stop when ``‖r‖ ≤ max(tol·‖b‖ + atol, 8·eps·‖b‖)``, the test of :class:`CG`.
        damping: added to the diagonal.
        atol: absolute residual tolerance.
        check_every: read the residual estimate on the host every this many steps (and at the
            end of each cycle).

    A cycle whose estimate passes the test is confirmed on the true residual ``b − A x`` (the
    product that starts the next cycle anyway); if rounding kept the true one above the test, the
    next cycle goes on from there. A true residual at its rounding level ``min(8·eps·(‖b‖ + ‖A‖‖x‖), √eps·‖b‖)``
    counts as converged. ``info.residual_norm`` is the true residual of the returned ``x``
    (that one product at the end of the last cycle); ``info.iterations`` counts the Arnoldi steps
    until the test passed, ``info.matvecs`` every product (with the restarts' and any steps
    taken after the test passed but before the host saw it).

    Raises :class:`DivergenceError` on NaN/Inf products and when the rotated Hessenberg matrix
    has a zero pivot (``|R_kk| ≤ 64·eps·‖A‖``) before convergence: the operator is singular on
    the Krylov space. A cycle that does not reduce the residual (GMRES(restart) can stagnate)
    ends the solve with ``converged=False`` and ``info.extra["stagnated"] = True``.

    ``solve_flat(matvec, b, x0)`` takes a warm start ``x0`` (``warm_startable = True``).

    Shapes: called on trees, ``b`` is a tree of any leaf shapes (``P`` entries in all) and the
    returned :class:`Solution` has the same keys and shapes; :meth:`solve_flat` takes and returns
    vectors of shape ``(P,)``.

    Example:
        >>> A = torch.tensor([[2., 1.], [-1., 3.]], dtype=torch.float64)     # not symmetric
        >>> x = bl.GMRES(tol=1e-12)(lambda v: {"x": A @ v["x"]}, {"x": torch.ones(2, dtype=torch.float64)})
        >>> x["x"], x.info.iterations, x.info.converged
        (tensor([0.2857, 0.4286], dtype=torch.float64), 2, True)
    """

    warm_startable: ClassVar[bool] = True

    maxiter: int = 100
    restart: int = 20
    tol: float = 1e-10
    damping: float = 0.0
    atol: float = 0.0
    check_every: int = 5

    def __post_init__(self) -> None:
        _check_iteration_options(self, ("maxiter", "restart", "check_every"))

    def solve_flat(self, matvec: FlatMatvec, b: Tensor, x0: Optional[Tensor] = None) -> tuple[Tensor, SolverInfo]:
        """As :meth:`Solver.solve_flat`; ``x0`` (shape ``(P,)``) is the starting point (one more product)."""
        A = self._damped(matvec)
        bnorm = self._check_b(b)
        thresh = _threshold(bnorm, self.tol, self.atol)
        x, r, matvecs = _initial_residual(A, b, x0)
        rnorm = torch.linalg.vector_norm(r)
        rn, th, bn = torch.stack([rnorm, thresh, bnorm]).tolist()
        if not math.isfinite(rn):
            raise _nonfinite_error("GMRES", 0)
        arn = _Arnoldi(min(self.restart, b.shape[0]), b, thresh, _FLAT_EPS * torch.finfo(b.dtype).eps)
        converged, stagnated = rn <= th, False
        steps = iters = cycles = 0
        while not converged and iters < self.maxiter:
            arn.start(r, rnorm)
            k = 0
            while k < arn.m and iters < self.maxiter:
                arn.step(A, k)
                k, iters = k + 1, iters + 1
                if k % self.check_every == 0 or k == arn.m or iters == self.maxiter:
                    active, cols, singular, nonfinite, scale = arn.read(k)
                    if nonfinite:
                        raise _nonfinite_error("GMRES", iters)
                    if singular:
                        raise _singular_error("GMRES", "the rotated Hessenberg matrix has a zero pivot",
                                              iters, self.damping)
                    if not active:
                        break
            matvecs += k + 1                                  # the cycle's steps and its true residual
            cycles += 1
            steps += cols
            x = arn.update(x, cols)
            r, rn_new, xn = _true_residual(A, b, x)
            if not math.isfinite(rn_new):
                raise _nonfinite_error("GMRES", iters)
            rnorm = torch.linalg.vector_norm(r)
            converged = rn_new <= max(th, _true_floor(bn, scale, xn, b.dtype))
            stagnated = not converged and rn_new >= rn
            rn = rn_new
            if stagnated:
                break
        info = SolverInfo("GMRES", steps, matvecs, rn, bn, converged,
                          {"cycles": cycles, "stagnated": stagnated, "loop_iterations": iters})
        return x, info


class _BiCGSTABRun:
    """BiCGSTAB (van der Vorst 1992) with device-side breakdown tests and no host sync."""

    def __init__(self, A: FlatMatvec, b: Tensor, x0: Optional[Tensor], thresh_sq: Tensor, zero_tol: float) -> None:
        self.A, self.thresh_sq, self.zero_tol = A, thresh_sq, zero_tol
        self.x, r, self.matvecs = _initial_residual(A, b, x0)
        scalar = lambda v, dt=b.dtype: torch.full((), v, dtype=dt, device=b.device)
        self.status, self.steps = scalar(_RUNNING, torch.long), scalar(0, torch.long)
        self.breakdown_code = scalar(_BREAKDOWN, torch.long)
        self.scale, self.tiny = scalar(0.0), torch.finfo(b.dtype).tiny
        self.one = scalar(1.0)
        self.restart(r)

    def restart(self, r: Tensor) -> None:
        """Start over from the residual ``r`` (shadow residual ``r̂ = r``)."""
        self.r = r
        self.r_hat = r.clone()
        self.rs = torch.dot(r, r)
        self.rhat_sq = self.rs
        self.p, self.v = torch.zeros_like(r), torch.zeros_like(r)
        self.rho = self.alpha = self.omega = self.one

    def _zero(self, value: Tensor, size_sq: Tensor) -> Tensor:
        """``|value| ≤ 64·eps·size`` (or NaN): a divisor that is rounding."""
        return ~(value.abs() > self.zero_tol * torch.sqrt(size_sq))

    def step(self) -> None:
        x, r, p, v = self.x, self.r, self.p, self.v
        active = (self.status == _RUNNING) & (self.rs > self.thresh_sq)
        rho = torch.dot(self.r_hat, r)
        rho_zero = self._zero(rho, self.rhat_sq * self.rs)
        go = active & ~rho_zero
        beta = torch.where(go, (rho / self.rho) * (self.alpha / self.omega), 0.0)
        p.addcmul_(self.omega, v, value=-1.0).mul_(beta).add_(r)      # p = r + β (p − ω v)
        v.copy_(self.A(p))          # own buffer: matvec may reuse its output for t below
        rv, vv, pp = torch.dot(self.r_hat, v), torch.dot(v, v), torch.dot(p, p)
        self.scale = torch.fmax(self.scale, torch.sqrt(vv / pp.clamp_min(self.tiny)))
        rv_zero = self._zero(rv, self.rhat_sq * vv)
        ok1 = go & ~rv_zero
        alpha = torch.where(ok1, rho / torch.where(ok1, rv, 1.0), 0.0)
        x.addcmul_(alpha, p)
        s = r.addcmul_(alpha, v, value=-1.0)                          # in place: r becomes s
        ss = torch.dot(s, s)
        t = self.A(s)
        self.matvecs += 2
        tt, ts = torch.dot(t, t), torch.dot(t, s)
        self.scale = torch.fmax(self.scale, torch.sqrt(tt / ss.clamp_min(self.tiny)))
        # ω = 0 (t ⊥ s) stalls the method (r = s, and the next β divides by ω), unless s already passes
        omega_zero = self._zero(ts, tt * ss) & (ss > self.thresh_sq)
        ok2 = ok1 & ~self._zero(ts, tt * ss)
        omega = torch.where(ok2, ts / torch.where(ok2, tt, 1.0), 0.0)
        x.addcmul_(omega, s)
        r.addcmul_(omega, t, value=-1.0)                              # r = s − ω t
        self.rs = torch.where(ok1, torch.dot(r, r), self.rs)
        broke = active & (rho_zero | rv_zero | omega_zero)
        self.status = torch.where(broke, self.breakdown_code, self.status)
        self.rho = torch.where(ok1, rho, self.rho)
        self.alpha = torch.where(ok1, alpha, self.alpha)
        self.omega = torch.where(ok2, omega, self.omega)
        self.steps = self.steps + ok1

    def read(self) -> tuple[float, int, int, float]:
        """``(‖r‖², status, steps, scale)`` on the host (one sync)."""
        rs, status, steps, scale = torch.stack(
            [self.rs, self.status.to(self.rs.dtype), self.steps.to(self.rs.dtype), self.scale]).tolist()
        return rs, int(status), int(steps), scale


@dataclass(frozen=True)
class BiCGSTAB(_ShortRecurrence):
    """BiCGSTAB on ``(H + damping·I) x = b``: any non-singular ``H``, two products per iteration.

    Van der Vorst (1992). Short recurrences (memory: 7 vectors, whatever the iteration count),
    unlike :class:`GMRES`, but no minimal-residual guarantee: its residual is not monotone, and the
    method can break down.

    Args:
        maxiter: at most this many iterations (two products each).
        tol: stop when ``‖r‖ ≤ max(tol·‖b‖ + atol, 8·eps·‖b‖)``, the test of :class:`CG`.
        damping: added to the diagonal.
        atol: absolute residual tolerance.
        check_every: test convergence and breakdown on the host every this many iterations.

    Breakdown: a divisor ``ρ = r̂ᵀr``, ``r̂ᵀAp`` or ``ω``'s ``tᵀs`` that is zero to rounding
    (``≤ 64·eps`` times the norms it is made of), or NaN, stops the iteration. If the true
    residual is then at its rounding level (``min(8·eps·(‖b‖ + ‖A‖‖x‖), √eps·‖b‖)``) or passes the test, the
    solve has converged; otherwise it raises :class:`DivergenceError` (use :class:`GMRES`,
    which does not break down on a non-singular operator). A passed test on the recursive
    residual is confirmed on the true residual ``b − A x`` (one product); where rounding kept the
    true one above the test, the iteration restarts from it with a new shadow residual.
    ``info.residual_norm`` is the true residual of the returned ``x`` (one product at the end,
    counted in ``info.matvecs``); ``info.iterations`` counts the iterations that moved ``x``.

    ``solve_flat(matvec, b, x0)`` takes a warm start ``x0`` (``warm_startable = True``).

    Shapes: called on trees, ``b`` is a tree of any leaf shapes (``P`` entries in all) and the
    returned :class:`Solution` has the same keys and shapes; :meth:`solve_flat` takes and returns
    vectors of shape ``(P,)``.

    Example:
        >>> A = torch.tensor([[2., 1.], [-1., 3.]], dtype=torch.float64)     # not symmetric
        >>> x = bl.BiCGSTAB(tol=1e-12)(lambda v: {"x": A @ v["x"]}, {"x": torch.ones(2, dtype=torch.float64)})
        >>> x["x"], x.info.converged
        (tensor([0.2857, 0.4286], dtype=torch.float64), True)
    """

    warm_startable: ClassVar[bool] = True

    def solve_flat(self, matvec: FlatMatvec, b: Tensor, x0: Optional[Tensor] = None) -> tuple[Tensor, SolverInfo]:
        """As :meth:`Solver.solve_flat`; ``x0`` (shape ``(P,)``) is the starting point (one more product)."""
        A = self._damped(matvec)
        bnorm = self._check_b(b)
        thresh = _threshold(bnorm, self.tol, self.atol)
        run = _BiCGSTABRun(A, b, x0, thresh ** 2, _FLAT_EPS * torch.finfo(b.dtype).eps)
        rs, th, bn = torch.stack([run.rs, thresh, bnorm]).tolist()
        if not math.isfinite(rs):
            raise _nonfinite_error("BiCGSTAB", 0)
        true: Optional[tuple[float, float]] = None     # (‖b − A x‖, ‖x‖) of the current x, once computed
        restarts, last_restart, lost = 0, math.inf, False
        it, status, steps, scale = 0, _RUNNING, 0, 0.0
        if rs <= th * th:
            true = (math.sqrt(rs), float(torch.linalg.vector_norm(run.x)))
        while true is None and it < self.maxiter:
            run.step()
            it += 1
            if it % self.check_every and it != self.maxiter:
                continue
            rs, status, steps, scale = run.read()
            if status != _RUNNING or not math.isfinite(rs):
                break
            if rs > th * th:
                continue
            r, rn, xn = _true_residual(A, b, run.x)
            run.matvecs += 1
            if rn <= max(th, _true_floor(bn, scale, xn, b.dtype)) or not rn < last_restart:
                true, lost = (rn, xn), not rn < last_restart     # confirmed, or restarting did not help
                break
            last_restart, restarts = rn, restarts + 1
            run.restart(r)
        if true is None:
            _, rn, xn = _true_residual(A, b, run.x)
            run.matvecs += 1
            true = (rn, xn)
        rn, xn = true
        if not (math.isfinite(rn) and math.isfinite(xn)):
            raise _nonfinite_error("BiCGSTAB", it)
        converged = rn <= max(th, _true_floor(bn, scale, xn, b.dtype))
        if lost and not converged:
            raise DivergenceError(
                f"bilevel.BiCGSTAB: expected the recursive residual to track b − A x, but it passed the test "
                f"while the true residual stays at {rn / max(bn, 1e-300):.3e} relative after {restarts} restart(s) "
                f"({it} iterations): the iteration lost its accuracy (typical near a singular operator). "
                f"Fix: use bl.GMRES(), or add damping (damping={self.damping}).")
        if status == _BREAKDOWN and not converged:
            raise DivergenceError(
                f"bilevel.BiCGSTAB: the iteration broke down after {it} iterations (a divisor ρ = r̂ᵀr, r̂ᵀAp or "
                f"tᵀs of ω was zero to rounding) with the residual at {rn / max(bn, 1e-300):.3e} relative, "
                f"above the test (tol={self.tol}). Fix: use bl.GMRES(), which does not break down on a "
                f"non-singular operator, or add damping (damping={self.damping}).")
        info = SolverInfo("BiCGSTAB", steps, run.matvecs, rn, bn, converged,
                          {"restarts": restarts, "loop_iterations": it})
        return run.x, info


class _NormalCGRun:
    """CG on ``AᵀA x = Aᵀb`` (CGNR), tracking the residual ``r = b − A x`` of the system itself."""

    def __init__(self, A: FlatMatvec, At: FlatMatvec, b: Tensor, x0: Optional[Tensor], thresh_sq: Tensor) -> None:
        self.A, self.At, self.thresh_sq = A, At, thresh_sq
        eps = torch.finfo(b.dtype).eps
        self.flat_tol, self.lsq_tol = _FLAT_EPS * eps, _FLOOR_EPS * eps
        self.x, self.r, self.matvecs = _initial_residual(A, b, x0)
        self.p = At(self.r).clone()                 # z = Aᵀr, the residual of the normal equations
        self.rmatvecs = 1
        self.gamma = torch.dot(self.p, self.p)
        self.rs = torch.dot(self.r, self.r)
        scalar = lambda v, dt=b.dtype: torch.full((), v, dtype=dt, device=b.device)
        self.status, self.steps = scalar(_RUNNING, torch.long), scalar(0, torch.long)
        self.codes = {c: scalar(c, torch.long) for c in (_FLAT, _LEAST_SQUARES, _NONFINITE)}
        self.scale, self.tiny = scalar(0.0), torch.finfo(b.dtype).tiny
        self.adjoint_gap: Optional[Tensor] = None

    def step(self) -> None:
        x, r, p = self.x, self.r, self.p
        active = (self.status == _RUNNING) & (self.rs > self.thresh_sq)
        w = self.A(p)
        self.matvecs += 1
        ww, pp = torch.dot(w, w), torch.dot(p, p)
        if self.adjoint_gap is None:
            # rᵀ(A p) = (Aᵀr)ᵀp = pᵀp on the first step (p = Aᵀr): a free test that rmatvec is Aᵀ
            nrm = torch.linalg.vector_norm
            den = nrm(r) * nrm(w) + pp
            self.adjoint_gap = (torch.dot(r, w) - pp).abs() / den.clamp_min(self.tiny)
        self.scale = torch.fmax(self.scale, torch.sqrt(ww / pp.clamp_min(self.tiny)))
        # Aᵀr is rounding (≤ 8·eps·‖A‖‖r‖) while r is not: r is orthogonal to A's range, i.e. x is a
        # least-squares solution of a system that has none.
        lsq = ~(self.gamma > (self.lsq_tol * self.scale) ** 2 * self.rs)
        flat = ~(ww > (self.flat_tol * self.scale) ** 2 * pp)                 # ‖Ap‖ ≈ 0 for p ∈ range(Aᵀ), or NaN
        bad = ~torch.isfinite(self.gamma + ww)
        status = torch.where(lsq, self.codes[_LEAST_SQUARES], torch.where(flat, self.codes[_FLAT], self.status))
        status = torch.where(bad, self.codes[_NONFINITE], status)
        self.status = torch.where(active, status, self.status)
        ok = active & ~lsq & ~flat
        alpha = torch.where(ok, self.gamma / torch.where(ok, ww, 1.0), 0.0)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, w, value=-1.0)
        z = self.At(r)
        self.rmatvecs += 1
        gamma = torch.where(ok, torch.dot(z, z), self.gamma)
        beta = torch.where(ok, gamma / torch.where(ok, self.gamma, 1.0), 0.0)
        p.mul_(beta).add_(z)
        self.gamma = gamma
        self.rs = torch.where(ok, torch.dot(r, r), self.rs)
        self.steps = self.steps + ok

    def read(self) -> tuple[float, int, int, float, float]:
        """``(‖r‖², status, steps, scale, adjoint gap)`` on the host (one sync)."""
        dt = self.rs.dtype
        gap = self.adjoint_gap if self.adjoint_gap is not None else torch.full((), math.nan, dtype=dt,
                                                                              device=self.rs.device)
        rs, status, steps, scale, gap_h = torch.stack(
            [self.rs, self.status.to(dt), self.steps.to(dt), self.scale, gap.to(dt)]).tolist()
        return rs, int(status), int(steps), scale, gap_h


@dataclass(frozen=True)
class NormalCG(_ShortRecurrence):
    """CG on the normal equations ``Aᵀ A x = Aᵀ b`` with ``A = H + damping·I`` (CGNR): any non-singular ``H``.

    Needs transpose products ``rmatvec(v) = Hᵀ v`` besides ``matvec``: call
    ``solver(matvec, b, rmatvec=...)``. Two products per iteration, and the error shrinks like
    CG's with ``κ(A)²`` in place of ``κ``: slower than :class:`GMRES` on the same system, but with
    CG's short recurrences (4 vectors) and a residual ``‖b − A x‖`` that falls monotonically.

    Args:
        maxiter: at most this many iterations (one ``A`` and one ``Aᵀ`` product each).
        tol: stop when ``‖b − A x‖ ≤ max(tol·‖b‖ + atol, 8·eps·‖b‖)``, the test of :class:`CG`.
        damping: added to the diagonal of ``H`` (then ``(H + damping·I)ᵀ`` is used in the normal
            equations).
        atol: absolute residual tolerance.
        check_every: test convergence on the host every this many iterations (one system on the
            CPU is tested after every iteration: there the host read is free, so no product is
            spent past convergence).

    ``rmatvec=None`` builds ``Aᵀ`` products by reverse-mode autograd through one recorded call of
    ``matvec`` (one more product, its graph kept for the solve; right for a ``matvec`` written with
    differentiable torch operations, such as ``A @ v`` or a ``torch.func.jvp``). A ``matvec`` whose
    output carries no graph (a Hessian-vector product by ``torch.autograd.grad`` without
    ``create_graph``) raises ``TypeError`` saying how to pass ``rmatvec``. On the first iteration
    the solver compares ``rᵀ(A p)`` with ``(Aᵀ r)ᵀ p`` (no extra product) and raises
    :class:`DivergenceError` when they differ by more than ``√eps`` relative: ``rmatvec`` is then
    not the transpose of ``matvec``.

    A singular operator shows as ``Aᵀ r`` at rounding level while ``r`` is not (``x`` is then a
    least-squares solution of a system without one) or ``‖A p‖ ≈ 0``; both raise
    :class:`DivergenceError` unless the residual is at its rounding floor, as do NaN/Inf.
    ``info.residual_norm`` is the recursively updated ``‖b − A x‖`` (no extra product), as in
    :class:`CG`; ``info.matvecs`` counts ``A`` and ``Aᵀ`` products together,
    ``info.extra["rmatvecs"]`` the ``Aᵀ`` ones.

    ``solve_flat(matvec, b, x0, rmatvec=...)`` takes a warm start ``x0`` (``warm_startable = True``).

    Shapes: called on trees, ``b`` is a tree of any leaf shapes (``P`` entries in all) and the
    returned :class:`Solution` has the same keys and shapes (and so do ``matvec``'s and
    ``rmatvec``'s); :meth:`solve_flat` takes and returns vectors of shape ``(P,)``.

    Example:
        >>> A = torch.tensor([[2., 1.], [-1., 3.]], dtype=torch.float64)     # not symmetric
        >>> x = bl.NormalCG(tol=1e-12)(lambda v: {"x": A @ v["x"]}, {"x": torch.ones(2, dtype=torch.float64)},
        ...                            rmatvec=lambda v: {"x": A.T @ v["x"]})
        >>> x["x"], x.info.converged
        (tensor([0.2857, 0.4286], dtype=torch.float64), True)
    """

    warm_startable: ClassVar[bool] = True
    uses_rmatvec: ClassVar[bool] = True

    def solve_flat(self, matvec: FlatMatvec, b: Tensor, x0: Optional[Tensor] = None, *,
                   rmatvec: Optional[FlatMatvec] = None) -> tuple[Tensor, SolverInfo]:
        """As :meth:`Solver.solve_flat`; ``x0`` (shape ``(P,)``) is the starting point (one more product);
        ``rmatvec`` maps ``v`` to ``Hᵀ v`` (without damping); ``None``: by autograd through ``matvec``."""
        bnorm = self._check_b(b)
        built = rmatvec is None
        if rmatvec is None:
            rmatvec = _transpose_by_autograd(matvec, b, "NormalCG")
        A, At = self._damped(matvec), self._damped(rmatvec)
        thresh = _threshold(bnorm, self.tol, self.atol)
        run = _NormalCGRun(A, At, b, x0, thresh ** 2)
        rs, th, bn = torch.stack([run.rs, thresh, bnorm]).tolist()
        it, status, steps, scale, gap = 0, _RUNNING, 0, 0.0, math.nan
        sym_tol = _symmetry_tol(b.dtype)
        if math.isfinite(rs) and rs > th * th:
            while it < self.maxiter:
                run.step()
                it += 1
                if it % self.check_every == 0 or it == self.maxiter:
                    rs, status, steps, scale, gap = run.read()
                    if rs <= th * th or status != _RUNNING or gap > sym_tol or not math.isfinite(rs):
                        break
        if gap > sym_tol:
            raise DivergenceError(
                f"bilevel.NormalCG: expected rmatvec to be the transpose of matvec, but rᵀ(Ap) and (Aᵀr)ᵀp "
                f"differ by {gap:.3e} relative (rounding stays below {sym_tol:.1e}). Fix: pass "
                f"rmatvec(v) = Hᵀ v without damping (the solver adds it), e.g. from torch.func.vjp; "
                f"rmatvec=None builds it by autograd when matvec is differentiable.")
        xn = float(torch.linalg.vector_norm(run.x))
        rn = math.sqrt(rs) if rs >= 0 else math.nan
        if not (math.isfinite(rn) and math.isfinite(xn)) or status == _NONFINITE:
            raise _nonfinite_error("NormalCG", it)
        converged = rs <= th * th
        if status != _RUNNING:
            converged = rn <= _true_floor(bn, scale, xn, b.dtype)      # breakdown at the rounding floor
            if not converged:
                what = ("Aᵀr is zero to rounding while the residual r is not (b has a component outside the "
                        "operator's range)" if status == _LEAST_SQUARES else "‖A p‖ is zero to rounding")
                raise _singular_error("NormalCG", what, it, self.damping)
        matvecs = run.matvecs + run.rmatvecs + (1 if built else 0)
        info = SolverInfo("NormalCG", steps, matvecs, rn, bn, converged,
                          {"rmatvecs": run.rmatvecs, "loop_iterations": it, "adjoint_gap": gap})
        return run.x, info
