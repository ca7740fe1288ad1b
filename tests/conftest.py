"""Shared fixtures and oracles for the test-suite.

Tolerances are explicit per dtype: float64 oracles are compared at ~1e-8..1e-10
relative, float32 at ~1e-4.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

# NOTE: Triton reads TRITON_INTERPRET when it is first imported, and other packages the suite uses
# (transformers, through the Trainer integration's tests) import it earlier than tests/test_kernels.py
# could set it: the kernel tests then failed with "Cannot call @triton.jit'd outside of the scope of a
# kernel" only when run after them. Without a GPU, the CPU kernel tests need the interpreter: set it
# before anything is imported. With a GPU it stays unset so that tests/test_kernels_gpu.py compiles.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

RTOL = {torch.float64: 1e-8, torch.float32: 2e-4}
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def import_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``name``, with benchmarks/ on ``sys.path`` as its scripts expect."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


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


def nested_equal(a, b) -> bool:
    """Exact equality of nested dicts / lists / tuples of tensors and plain values.

    Tensors must match in dtype and value bit for bit (``torch.equal``); meta tensors, which hold
    no data, in shape and dtype.
    """
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype:
            return False
        if a.device.type == "meta":
            return b.device.type == "meta" and a.shape == b.shape
        return torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(nested_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (the benchmark experiments' setting), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cube_fn(with_jvp: bool):
    """x³ whose backward cannot be differentiated again (once_differentiable)."""

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x ** 3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.save_for_forward(inputs[0])

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * x ** 2 * g

        if with_jvp:
            @staticmethod
            def jvp(ctx, t):
                (x,) = ctx.saved_tensors
                return 3 * x ** 2 * t

    return Cube
