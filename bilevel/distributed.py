"""Data-parallel hypergradients: averages across ranks where a single process would average.

With the batch split over ``W`` ranks (equal shards, mean losses), the single-process
global-batch computation averages per-example terms. So every quantity that a
hypergradient builds from data is averaged across ranks *where it is formed*:

- implicit: the outer gradient ``∂_w L_V`` and direct term ``∂_λ L_V``, the inner gradient
  (diagnostics), **every** Hessian-vector product inside the solver (``(avg H)⁻¹`` is not
  the average of per-rank inverses), and the mixed product. Every rank then holds the same
  vectors bit for bit, so power iterations, step sizes and convergence tests agree and all
  ranks stop at the same iteration;
- unrolled: the inner gradient of every step (a differentiable all-reduce, so the backward
  pass all-reduces its cotangents), then the hypergradient;
- separable penalties are the same on every rank and are added after the reduction.

``group`` arguments take a ``torch.distributed`` process group; ``None`` means one process.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["world_size", "resolve_group", "all_reduce_mean_", "all_reduce_mean_tree", "all_reduce_mean_list",
           "all_reduce_mean_grads", "differentiable_mean", "broadcast_from_first_", "teardown", "spawn"]

AUTO = "auto"


def world_size(group: Any) -> int:
    """Number of ranks of ``group`` (1 for ``None``)."""
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


def resolve_group(group: Any) -> Any:
    """``"auto"`` → the default group when ``torch.distributed`` is initialized with > 1 rank, else ``None``."""
    if group != AUTO:
        return group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def all_reduce_mean_(t: Tensor, group: Any) -> Tensor:
    """In place: ``t ← mean over ranks of t`` (no-op without a group). Returns ``t``."""
    n = world_size(group)
    if n > 1:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
        t.div_(n)
    return t


def all_reduce_mean_list(tensors: Sequence[Tensor], group: Any) -> list[Tensor]:
    """Mean over ranks of several tensors: one collective per dtype (packed into one buffer)."""
    if world_size(group) <= 1 or not tensors:
        return list(tensors)
    out: list[Optional[Tensor]] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        all_reduce_mean_(flat, group)
        o = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[o:o + n].view(tensors[i].shape)
            o += n
    return out  # type: ignore[return-value]


def all_reduce_mean_grads(grads: Sequence[Optional[Tensor]], like: Sequence[Tensor], loss: Tensor, group: Any, *,
                          differentiable: bool = False) -> tuple[list[Optional[Tensor]], Tensor]:
    """Mean over ranks of one step's gradients and (detached) loss; ``None`` in ``grads`` means "this
    rank's loss does not reach the tensor". Returns ``(grads, loss)``; in one process, as they came.

    A mean gradient is ``None`` only where no rank's loss reaches the tensor (DistributedDataParallel
    with ``find_unused_parameters`` averages the zeros of the ranks where it is unused): the mask of
    used entries and the loss travel in the same collective as the gradients. ``differentiable``:
    through :func:`differentiable_mean` (an unrolled step). The gradients share ``like[0]``'s dtype.
    """
    if world_size(group) <= 1:
        return list(grads), loss.detach()
    dt = like[0].dtype
    used = torch.tensor([g is not None for g in grads], dtype=dt, device=like[0].device)
    filled = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]
    *out, mean, used = (differentiable_mean if differentiable else all_reduce_mean_list)(
        [*filled, loss.detach().reshape(1).to(dt), used], group)
    return [g if u > 0 else None for g, u in zip(out, used.tolist())], mean.reshape(()).to(loss.dtype)


def broadcast_from_first_(tensors: Sequence[Tensor], group: Any) -> None:
    """In place: every tensor takes the value it has on the group's first rank (one collective per
    dtype, packed). What ``DistributedDataParallel`` does to buffers before each forward."""
    if world_size(group) <= 1 or not tensors:
        return
    import torch.distributed as dist

    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    with torch.no_grad():
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            same = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.detach().reshape(-1) for t in same])
            dist.broadcast(flat, src=src, group=group)
            o = 0
            for t in same:
                t.copy_(flat[o:o + t.numel()].view(t.shape))
                o += t.numel()


def all_reduce_mean_tree(tree: Mapping[str, Tensor], group: Any) -> dict[str, Tensor]:
    """Mean over ranks of every tensor of ``tree`` (one collective)."""
    keys = list(tree)
    return dict(zip(keys, all_reduce_mean_list([tree[k] for k in keys], group)))


def differentiable_mean(tensors: Sequence[Tensor], group: Any) -> list[Tensor]:
    """Mean over ranks, differentiable (its backward all-reduces the cotangents); one collective."""
    n = world_size(group)
    if n <= 1 or not tensors:
        return list(tensors)
    from torch.distributed.nn.functional import all_reduce

    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = all_reduce(flat, group=group) / n
    out, o = [], 0
    for t in tensors:
        out.append(flat[o:o + t.numel()].view(t.shape))
        o += t.numel()
    return out


def check_group(group: Any, fn: str) -> Optional[Any]:
    """Validate a ``group`` argument (``None``, ``"auto"`` or a process group)."""
    group = resolve_group(group)
    if group is not None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{fn}: got a process group but torch.distributed is not initialized. Fix: call "
                               f"torch.distributed.init_process_group(...) first, or pass group=None.")
    return group


# NOTE: why teardown is "barrier, destroy" and a spawned rank ends with os._exit.
# A gloo rank sometimes died with SIGABRT ("terminate called without an active exception") after
# printing correct results. Two things meet at exit:
# - `DistributedDataParallel` keeps its process group alive past `destroy_process_group()` (torch
#   2.13: the gloo threads `pt_gloo_runloop` x2 and `gloo_tcp_loop` still run after destroy and
#   `gc.collect()` once a DDP wrapper was built, even if deleted; without DDP they are joined).
#   Known upstream: pytorch/pytorch#107298 ("destroy_process_group did not destroy the process
#   group well", threads still running after it);
# - so the rank reaches interpreter finalization with gloo threads alive. A worker thread that
#   still holds a finished work object drops its tensors late; a tensor with a Python object needs
#   the GIL, and taking the GIL during finalization unwinds the thread through a noexcept
#   destructor: std::terminate without an active exception. pytorch/pytorch#179291 describes this
#   mechanism (its atexit fix was abandoned; pytorch/pytorch#157193 is still open), so there is no
#   torch-side fix to wait for. The abort was not reproduced on our 2-core test machine (0 in 35
#   runs of the old example, 14 runs of a reduced copy), so this part rests on the upstream report;
#   the surviving threads are measured.
# The order here removes both halves: a barrier first, so no rank destroys its group (and closes
# its sockets) while a peer still communicates or has work in flight; then destroy; then a spawned
# rank, whose results are already on disk, leaves with os._exit after flushing its streams, so no
# finalization runs next to threads we cannot join. (os._exit is how multiprocessing itself ends
# forked children.) Under torchrun the process is the user's, so `teardown` stops at destroy.
def teardown() -> None:
    """End this rank's part in the default process group: wait for every rank, then destroy the group.

    Call it on every rank once its last collective is issued (a rank that leaves early would close
    connections a peer still uses). No-op when ``torch.distributed`` is not initialized.

    Example:
        >>> from bilevel.distributed import teardown
        >>> teardown()          # nothing to do in a single process
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def _spawned_rank(rank: int, nprocs: int, backend: str, init_file: str, out_dir: str,
                  fn: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=nprocs)
    # An exception leaves as it is (no barrier, no destroy): multiprocessing writes its traceback for
    # the parent, then the exit closes this rank's sockets. Destroying the group first would let a
    # peer waiting in the teardown barrier fail with "Connection reset by peer" before this rank
    # exits, and the parent reports the first rank to exit: the peer's error instead of the cause.
    result = fn(rank, *args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, backend: str = "gloo") -> list:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh processes joined in one process group.

    Each process initializes the default group (``backend``, rendezvous through a file in a fresh
    temporary directory, so no port is chosen or shared), runs ``fn``, saves its return value, and
    tears down in a safe order (see :func:`teardown` and the NOTE above it).

    Args:
        fn: a module-level function (it is pickled into each process); ``fn(rank, *args)``.
        nprocs: number of processes (ranks ``0 .. nprocs-1``).
        *args: passed to ``fn`` after the rank; must be picklable.
        backend: a ``torch.distributed`` backend; ``"gloo"`` (CPU processes) is the tested one
            (with ``"nccl"``, ``fn`` must pick its GPU, e.g. ``torch.cuda.set_device(rank)``).

    Returns:
        ``[fn(0, *args), ..., fn(nprocs - 1, *args)]`` (values go through ``torch.save``).

    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised; the message holds its traceback.

    Example:
        >>> import operator
        >>> from bilevel.distributed import spawn
        >>> spawn(operator.add, 2, 10)      # rank + 10 on each rank
        [10, 11]
    """
    import torch.multiprocessing as mp

    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"bilevel.distributed.spawn: expected nprocs to be a positive int, got {nprocs!r}. "
                         f"Fix: pass the number of processes, e.g. spawn(fn, 2).")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawned_rank, args=(nprocs, backend, os.path.join(tmp, "init"), tmp, fn, args), nprocs=nprocs)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(nprocs)]
