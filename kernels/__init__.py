"""Fused kernels for bilevel, installed as ``bilevel.kernels`` (never as a top-level ``kernels``).

This folder sits at the top of the repository (DESIGN.md §2) and is mapped into
the ``bilevel`` namespace by ``pyproject.toml`` (``package-dir``). It imports only
torch, and triton lazily at the first Triton launch.

Every kernel comes as: Triton kernel (``_tl.py``) → launcher → ``autograd.Function``
where gradients are needed → pure-torch ``*_reference``, which is both the CPU
fallback and the test oracle. Each public function takes ``backend="auto" | "torch" |
"triton"``: ``"auto"`` runs Triton on CUDA tensors when it is installed and torch
otherwise; an explicit ``"triton"`` raises where it cannot run. On CPU, Triton runs
the kernels under ``TRITON_INTERPRET=1`` (slowly; that is how CI tests them).

- :func:`logistic_hvp`: closed-form ``H v`` of L2-regularized logistic regression.
- :func:`linear_ce_hvp`: ``H v`` of a linear softmax cross-entropy head, in row chunks.
- :func:`decay_mixed`: the per-weight decay mixed term ``−decay'(λ) ⊙ w ⊙ u`` in one pass.
- :func:`neumann_step`, :func:`partial_dot`, :func:`cg_update`: solver vector updates on flat buffers,
  no host sync. The solver loops themselves live in ``bilevel.solvers``; this package holds no loop.
"""

from __future__ import annotations

from ._backend import BACKENDS, interpreting, resolve_backend, triton_available, triton_unusable_reason
from .decay import decay_mixed, decay_mixed_reference
from .linear_ce import linear_ce_hvp, linear_ce_hvp_reference
from .logistic import logistic_curvature, logistic_hvp, logistic_hvp_reference
from .solver_updates import (CG_STATE_FIELDS, cg_update, cg_update_reference, neumann_step, neumann_step_reference,
                             partial_dot, partial_dot_reference)

__all__ = [
    "BACKENDS",
    "triton_available",
    "triton_unusable_reason",
    "interpreting",
    "resolve_backend",
    "logistic_hvp",
    "logistic_hvp_reference",
    "logistic_curvature",
    "linear_ce_hvp",
    "linear_ce_hvp_reference",
    "decay_mixed",
    "decay_mixed_reference",
    "neumann_step",
    "neumann_step_reference",
    "partial_dot",
    "partial_dot_reference",
    "cg_update",
    "cg_update_reference",
    "CG_STATE_FIELDS",
]
