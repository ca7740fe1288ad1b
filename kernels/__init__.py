"""Fused kernels for bilevel, installed as ``bilevel.kernels`` (never as a top-level ``kernels``).

This folder sits at the top of the repository (DESIGN.md §2) and is mapped into
the ``bilevel`` namespace by ``pyproject.toml`` (``package-dir``). It imports
only torch (and triton, when installed). The Triton kernels with their torch
references are the subject of the kernels issue; until then this package only
reports whether Triton is usable.
"""

from __future__ import annotations

import importlib.util

__all__ = ["triton_available"]


def triton_available() -> bool:
    """Whether the optional ``triton`` package can be imported here."""
    return importlib.util.find_spec("triton") is not None
