"""Crash-safe files: write to a temporary file beside the target, fsync, rename over it."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = ["atomic_save"]


def atomic_save(obj: Any, path: Any) -> None:
    """``torch.save(obj, path)`` that never leaves a torn file: readers see the old or the new one.

    Example:
        >>> atomic_save({"step": torch.tensor(3)}, "ckpt.pt")
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)                 # atomic on POSIX and Windows
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:                                      # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
