"""Which implementation runs a kernel: Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``) or torch."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

#: The values of every kernel's ``backend=``: ``"auto"`` (Triton on CUDA tensors when it is
#: installed, torch otherwise), ``"torch"`` (the pure-torch reference) or ``"triton"`` (raises
#: where Triton cannot run).
BACKENDS = ("auto", "torch", "triton")
#: dtypes every Triton kernel here supports; the interpreter has no bfloat16.
TRITON_DTYPES_CUDA = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TRITON_DTYPES_INTERPRET = (torch.float32, torch.float64, torch.float16)


@functools.lru_cache(maxsize=None)
def _triton_spec() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the optional ``triton`` package can be imported here.

    Example:
        >>> isinstance(bl.kernels.triton_available(), bool)
        True
    """
    return _triton_spec()     # a filesystem lookup, done once (0.3 ms a call)


def interpreting() -> bool:
    """Whether Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``, read at first kernel use).

    Example:
        >>> import os
        >>> bl.kernels.interpreting() == (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
        True
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unusable_reason(*tensors: Tensor, dtypes: Optional[tuple] = None) -> Optional[str]:
    """Why Triton cannot run on these tensors (``None`` when it can).

    Shapes: any; only the tensors' devices and dtypes matter.

    Example:
        >>> reason = bl.kernels.triton_unusable_reason(torch.ones(3))   # e.g. "... TRITON_INTERPRET=1 is not set ..."
        >>> reason is None or isinstance(reason, str)
        True
    """
    if not triton_available():
        return "the optional `triton` package is not installed (pip install 'bilevel[triton]')"
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"the tensors are on different devices {sorted(map(str, devices))}"
    dev = next(iter(devices))
    if dev.type == "cuda":
        allowed = TRITON_DTYPES_CUDA if dtypes is None else tuple(d for d in dtypes if d in TRITON_DTYPES_CUDA)
    elif dev.type == "cpu" and interpreting():
        allowed = TRITON_DTYPES_INTERPRET if dtypes is None else tuple(d for d in dtypes if d in TRITON_DTYPES_INTERPRET)
    elif dev.type == "cpu":
        return "the tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton compiles for GPUs only)"
    else:
        return f"Triton does not support device type {dev.type!r}"
    bad = sorted({str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype not in allowed})
    if bad:
        return f"dtype {', '.join(bad)} is not supported on {dev.type} (supported: {[str(d) for d in allowed]})"
    return None


def resolve_backend(backend: str, *tensors: Tensor, name: str, dtypes: Optional[tuple] = None) -> str:
    """``"torch"`` or ``"triton"`` for ``backend`` in ``("auto", "torch", "triton")``.

    ``"auto"`` picks Triton for CUDA tensors when it is installed and supports them, torch
    otherwise (the torch path is what runs on CPU). An explicit ``"triton"`` that cannot run
    raises ``RuntimeError`` saying why; it runs on CPU tensors under ``TRITON_INTERPRET=1``.

    Shapes: any; only the tensors' devices and dtypes matter.

    Example:
        >>> x = torch.ones(3)                                       # a CPU tensor: "auto" means torch
        >>> bl.kernels.resolve_backend("auto", x, name="demo"), bl.kernels.resolve_backend("torch", x, name="demo")
        ('torch', 'torch')
    """
    if backend not in BACKENDS:
        raise ValueError(f"{name}: expected backend in {BACKENDS}, got {backend!r}.")
    if backend == "torch" or (backend == "auto" and not any(t.is_cuda for t in tensors)):
        return "torch"                # "auto" on CPU: the torch path, without looking for Triton
    why = triton_unusable_reason(*tensors, dtypes=dtypes)
    if backend == "triton":
        if why is not None:
            raise RuntimeError(f"{name}: backend='triton' cannot run: {why}. Fix: backend='auto' (falls back "
                               f"to torch) or backend='torch'.")
        return "triton"
    return "triton" if why is None and tensors[0].device.type == "cuda" else "torch"
