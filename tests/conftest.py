"""Shared fixtures and oracles for the test-suite.

Tolerances are explicit per dtype: float64 oracles are compared at ~1e-8..1e-10
relative, float32 at ~1e-4.
"""

from __future__ import annotations

import pytest
import torch

RTOL = {torch.float64: 1e-8, torch.float32: 2e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / max(‖b‖, tiny), in float64."""
    a = a.detach().double()
    b = b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def tree_rel_err(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    da = torch.cat([a[k].detach().double().reshape(-1) for k in sorted(a)])
    db = torch.cat([b[k].detach().double().reshape(-1) for k in sorted(b)])
    return rel_err(da, db)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
