"""``bl.GMRES`` and ``bl.BiCGSTAB`` against ``scipy.sparse.linalg.gmres`` / ``bicgstab``.

Groups ``nonsym-<operator>-<method>``; unit: SciPy's solver on the same operator. Both solvers call
the *same* torch matvec (SciPy through a ``LinearOperator`` over zero-copy NumPy views of float64
tensors), so the ratio is the solvers' own work: orthogonalization, vector updates, Python and
host-sync overhead. Each solve runs from 0 to a relative residual of ``RTOL`` (``‖b − A x‖ ≤ RTOL·‖b‖``,
the test both libraries use); GMRES restarts every ``RESTART`` steps in both.

Recorded per group (``extra_info`` and the ratio table): iterations and products of each solver,
the true relative residual each reached, the paired time ratio (ours / SciPy, whole solve) and the
time per iteration ratio (paired ratio × SciPy's iterations / ours).

Operators:

- ``dense``: ``I + 0.8·G/√n``, ``G`` standard normal, ``n = 2000`` (eigenvalues in a disc of radius
  about 0.8 around 1): a matvec is a 2000 × 2000 float64 matrix-vector product.
- ``convdiff``: 2-D convection-diffusion ``−Δu + w·∇u`` on the unit square, central differences on a
  48 × 48 interior grid (``n = 2304``), mesh Péclet number 0.5, Dirichlet boundary; a torch
  sparse CSR matvec.

Run: ``python -m pytest benchmarks/bench_solvers.py --benchmark-only --benchmark-min-rounds=3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from torch import Tensor

import bilevel as bl
from conftest import Measure

np = pytest.importorskip("numpy")
sp = pytest.importorskip("scipy.sparse")
sla = pytest.importorskip("scipy.sparse.linalg")

RTOL = 1e-8
RESTART = 30
MAXITER = 3000           # products (GMRES) / iterations (BiCGSTAB): far above what either needs
PAIRS = 7


@dataclass
class Operator:
    """A non-symmetric float64 operator as a torch matvec, with a right-hand side."""

    name: str
    matvec: Callable[[Tensor], Tensor]
    b: Tensor


def dense_operator(n: int = 2000, seed: int = 0) -> Operator:
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(n, dtype=torch.float64) + 0.8 * torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return Operator("dense", lambda v: A @ v, b)


def convection_diffusion(m: int = 48, peclet: float = 0.5, seed: int = 0) -> Operator:
    """``h²·(−Δ + w·∇)`` with ``w = (1, 1)·2·peclet/h``: central differences on ``m × m`` interior points."""
    main = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(m, m))
    conv = sp.diags([-1.0, 1.0], [-1, 1], shape=(m, m)) * peclet      # h²·w·(u_{i+1} − u_{i−1})/(2h), h·w/2 = peclet
    eye = sp.identity(m)
    A = (sp.kron(eye, main + conv) + sp.kron(main + conv, eye)).tocsr()
    At = torch.sparse_csr_tensor(torch.from_numpy(A.indptr.astype(np.int64)), torch.from_numpy(A.indices.astype(np.int64)),
                                 torch.from_numpy(A.data.astype(np.float64)), size=A.shape)
    b = torch.randn(m * m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Operator("convdiff", lambda v: At @ v, b)


def scipy_solve(op: Operator, method: str) -> Tuple[Any, Dict[str, int]]:
    """SciPy's solver on ``op``: ``(x, {"iterations", "matvecs"})``."""
    n = op.b.shape[0]
    counts = {"iterations": 0, "matvecs": 0}

    def mv(v: Any) -> Any:
        counts["matvecs"] += 1
        return op.matvec(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).reshape(-1)).numpy()

    def count(_: Any) -> None:
        counts["iterations"] += 1

    A = sla.LinearOperator((n, n), matvec=mv, dtype=np.float64)
    b = op.b.numpy()
    if method == "gmres":
        x, code = sla.gmres(A, b, rtol=RTOL, atol=0.0, restart=RESTART, maxiter=MAXITER // RESTART + 1,
                            callback=count, callback_type="pr_norm")
    else:
        x, code = sla.bicgstab(A, b, rtol=RTOL, atol=0.0, maxiter=MAXITER, callback=count)
    if code != 0:
        raise RuntimeError(f"bench_solvers: scipy {method} did not converge on {op.name} (info={code}).")
    return x, counts


def ours(method: str) -> bl.Solver:
    if method == "gmres":
        return bl.GMRES(maxiter=MAXITER, restart=RESTART, tol=RTOL)
    return bl.BiCGSTAB(maxiter=MAXITER, tol=RTOL)


def relative_residual(op: Operator, x: Tensor) -> float:
    return float(torch.linalg.vector_norm(op.b - op.matvec(x)) / torch.linalg.vector_norm(op.b))


OPERATORS = {"dense": dense_operator, "convdiff": convection_diffusion}
CASES = [(o, m) for o in OPERATORS for m in ("gmres", "bicgstab")]


@pytest.fixture(scope="module")
def operators() -> Dict[str, Operator]:
    return {name: make() for name, make in OPERATORS.items()}


@pytest.mark.parametrize("op_name,method", CASES)
def test_scipy(operators: Dict[str, Operator], measure: Measure, op_name: str, method: str) -> None:
    """The unit: SciPy's solver to ``RTOL``."""
    op = operators[op_name]
    x, counts = scipy_solve(op, method)
    res = relative_residual(op, torch.from_numpy(x))
    measure(lambda: scipy_solve(op, method), group=f"nonsym-{op_name}-{method}", name=f"scipy {method} (unit)",
            unit=True, relative_residual=res, **counts)


@pytest.mark.parametrize("op_name,method", CASES)
def test_bilevel(operators: Dict[str, Operator], measure: Measure, op_name: str, method: str) -> None:
    """``bl.GMRES`` / ``bl.BiCGSTAB`` to ``RTOL``, with the paired ratio to SciPy's solve."""
    op = operators[op_name]
    solver = ours(method)
    x, info = solver.solve_flat(op.matvec, op.b)
    assert info.converged, info
    res = relative_residual(op, x)
    _, sc = scipy_solve(op, method)
    extra = {"iterations": info.iterations, "matvecs": info.matvecs, "relative_residual": res,
             "scipy_iterations": sc["iterations"], "scipy_matvecs": sc["matvecs"]}
    measure(lambda: solver.solve_flat(op.matvec, op.b), group=f"nonsym-{op_name}-{method}",
            name=f"bl.{solver.name}", paired_with=lambda: scipy_solve(op, method), pairs=PAIRS, **extra)
