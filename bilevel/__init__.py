"""bilevel: gradient-based bilevel hyperparameter optimization for PyTorch.

``import bilevel as bl``. The core is pure functions over parameter trees
(``dict[str, Tensor]``): :func:`hvp`, :func:`mixed_vjp`, the linear solvers
(:class:`CG`, :class:`Neumann`, :class:`Nystrom`, :class:`Identity`,
:class:`Exact`), and implicit differentiation (:func:`implicit_hypergrad`,
:func:`implicit_diff`).
"""

from ._errors import BilevelError, DivergenceError, NonFiniteError, ShapeError
from ._tree import Flat, Tree
from .hvp import HessianOperator, SeparablePenalty, hvp, mixed_vjp
from .hyperopt import FirstOrder, HyperOptimizer, HyperStepStats, Implicit, Unrolled
from .implicit import Hypergrad, HypergradInfo, ImplicitSolution, implicit_diff, implicit_hypergrad
from . import hparams, inner, kernels, losses, nas
from .unroll import UnrollInfo, unrolled_hypergrad
from .solvers import CG, Exact, Identity, Neumann, Nystrom, Solution, Solver, SolverInfo

__version__ = "0.1.0"

__all__ = [
    "BilevelError",
    "DivergenceError",
    "NonFiniteError",
    "ShapeError",
    "Flat",
    "Tree",
    "HessianOperator",
    "SeparablePenalty",
    "HyperOptimizer",
    "HyperStepStats",
    "Implicit",
    "Unrolled",
    "FirstOrder",
    "hvp",
    "mixed_vjp",
    "Hypergrad",
    "HypergradInfo",
    "ImplicitSolution",
    "implicit_diff",
    "implicit_hypergrad",
    "CG",
    "Exact",
    "Identity",
    "Neumann",
    "Nystrom",
    "Solution",
    "Solver",
    "SolverInfo",
    "hparams",
    "inner",
    "kernels",
    "losses",
    "nas",
    "UnrollInfo",
    "unrolled_hypergrad",
]
