"""bilevel: gradient-based bilevel hyperparameter optimization for PyTorch.

``import bilevel as bl``. The core is pure functions over parameter trees
(``dict[str, Tensor]``): :func:`hvp`, :func:`mixed_vjp`, the linear solvers
(:class:`CG`, :class:`Neumann`, :class:`Nystrom`, :class:`Identity`,
:class:`Exact`; for non-symmetric systems :class:`GMRES`, :class:`BiCGSTAB`, :class:`NormalCG`),
implicit differentiation (:func:`implicit_hypergrad`, :func:`implicit_diff`, :func:`implicit_root`,
:func:`implicit_fixed_point`) and unrolled differentiation (:func:`unrolled_hypergrad`).
The stateful edge is :class:`HyperOptimizer`, driven by a method object
(:class:`Implicit`, :class:`Unrolled`, :class:`FiniteDifference`, :class:`FirstOrder`); it records a
:class:`Trajectory` that :func:`bilevel.plot.trajectory` draws. Framework callbacks live in
:mod:`bilevel.integrations` (imported on demand).
"""

from ._errors import BilevelError, DivergenceError, NonFiniteError, ShapeError
from ._result import Hypergrad, HypergradInfo
from ._second_order import twice_differentiable_kernels
from ._tree import Tree
from .operators import HessianOperator, hvp, mixed_vjp
from .solvers import CG, BiCGSTAB, Exact, GMRES, Identity, Neumann, NormalCG, Nystrom, Solver, SolverInfo
from .implicit import ImplicitSolution, implicit_diff, implicit_fixed_point, implicit_hypergrad, implicit_root
from .unroll import UnrollInfo, unrolled_hypergrad
from .meta import imaml_grad
from .methods import FiniteDifference, FirstOrder, Implicit, Method, MethodResult, Problem, Unrolled
from .trajectory import HyperStepStats, Trajectory
from .hyperopt import HyperOptimizer
from . import hparams, inner, kernels, losses, meta, nas, plot, trajectory

__version__ = "0.1.0"

__all__ = [
    "BilevelError",
    "DivergenceError",
    "NonFiniteError",
    "ShapeError",
    "Tree",
    "HessianOperator",
    "hvp",
    "mixed_vjp",
    "CG",
    "BiCGSTAB",
    "Exact",
    "GMRES",
    "Identity",
    "Neumann",
    "NormalCG",
    "Nystrom",
    "Solver",
    "SolverInfo",
    "Hypergrad",
    "HypergradInfo",
    "ImplicitSolution",
    "implicit_diff",
    "implicit_hypergrad",
    "implicit_root",
    "implicit_fixed_point",
    "UnrollInfo",
    "unrolled_hypergrad",
    "imaml_grad",
    "twice_differentiable_kernels",
    "HyperOptimizer",
    "HyperStepStats",
    "Trajectory",
    "Implicit",
    "Unrolled",
    "FiniteDifference",
    "FirstOrder",
    "Method",
    "MethodResult",
    "Problem",
    "hparams",
    "inner",
    "kernels",
    "losses",
    "meta",
    "nas",
    "plot",
    "trajectory",
]
