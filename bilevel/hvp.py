"""Hessian-vector products: ``bl.hvp``, ``bl.mixed_vjp`` and ``bl.HessianOperator``.

They live in :mod:`bilevel.operators` with the curvature operators they are built from; this
module keeps the import path of the API contract (``from bilevel.hvp import hvp``).
"""

from .operators import HVP_MODES, HessianOperator, hvp, mixed_vjp

__all__ = ["hvp", "mixed_vjp", "HessianOperator", "HVP_MODES"]
