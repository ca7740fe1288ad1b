"""Per-weight decay tuned on several processes: HyperOptimizer under torch.distributed.

    torchrun --nproc_per_node=2 examples/ddp_weight_decay.py        # one machine, 2 processes
    python examples/ddp_weight_decay.py --nproc 2                   # the same without torchrun
    python examples/ddp_weight_decay.py --nproc 2 --smoke --check   # seconds; compares with 1 process

Many machines: run the same command on every node with ``torchrun --nnodes=N --node_rank=i
--rdzv-endpoint=HOST:PORT --nproc_per_node=G`` (backend ``nccl`` on GPUs, ``gloo`` on CPUs).

Data: scikit-learn's bundled ``load_digits`` (no download); model: MLP 64-256-10 wrapped in
``DistributedDataParallel``; hyperparameters: one log decay per weight (``penalty=``), tuned by
implicit differentiation (CG) on validation batches. Every global batch is split in equal shards,
one per rank. The HyperOptimizer averages across ranks exactly where one process would average
over the global batch: each inner gradient, the outer gradient, *every* Hessian-vector product of
the solve and the mixed product (averaging per-rank hypergradients would be wrong: the inverse of
an average Hessian is not the average of inverses). So all ranks hold bit-identical weights and
hyperparameters, and ``--check`` shows that they match a single process on the global batches.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits

import bilevel as bl
from bilevel.distributed import spawn, teardown


def load(seed: int = 0, dtype: torch.dtype = torch.float32):
    X, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = torch.tensor(X, dtype=dtype)[perm], torch.tensor(y)[perm]
    X = (X - X[:1000].mean(0)) / X[:1000].std(0).clamp_min(1e-3)
    return (X[:1000], y[:1000]), (X[1000:1300], y[1000:1300]), (X[1300:], y[1300:])


def train(rank: int, world: int, group, steps: int, dtype: torch.dtype, verbose: bool) -> dict:
    """Train with hyper steps; each rank uses rows ``rank::world`` of every global batch."""
    torch.manual_seed(0)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = load(dtype=dtype)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)).to(dtype)
    hp, penalty = bl.hparams.weight_decay(model, init=1e-3, per="parameter", exclude=("bias",))
    net = torch.nn.parallel.DistributedDataParallel(model, process_group=group) if group is not None else model
    ce = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])
    hopt = bl.HyperOptimizer(net, hp, inner_loss=ce, outer_loss=ce, penalty=penalty,
                             inner_optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=0.05),
                             method=bl.Implicit(solver=bl.CG(maxiter=10, damping=0.1, on_indefinite="stop")), hyper_every=10,
                             on_error="skip", process_group=group if group is not None else None)
    g = torch.Generator().manual_seed(1)                       # the same global batches on every rank
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(ytr), (128,), generator=g)[rank::world]
        vidx = torch.randint(0, len(yva), (128,), generator=g)[rank::world]
        batch = (Xtr[idx], ytr[idx])
        hopt.inner_step(batch)
        if (step + 1) % 10 == 0:
            hopt.hyper_step(batch, (Xva[vidx], yva[vidx]))
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = model(Xte)
        test = {"test_loss": float(F.cross_entropy(out, yte)), "test_acc": float((out.argmax(1) == yte).float().mean())}
    decays = torch.cat([penalty.decays(hp)[k].detach().reshape(-1) for k in penalty.keys])
    res = {"hparams": {k: v.detach().clone() for k, v in hp.items()},
           "weights": {k: v.detach().clone() for k, v in model.named_parameters()},
           "seconds": seconds, "hyper_steps": hopt.hyper_steps, "skipped": hopt.skipped,
           "decay_median": float(decays.median()), "decay_range": (float(decays.min()), float(decays.max())), **test}
    if verbose and rank == 0:
        print(f"[{world} process(es)] {steps} steps, {hopt.hyper_steps} hyper steps ({hopt.skipped} skipped) "
              f"in {seconds:.1f} s; test loss {test['test_loss']:.4f}, test acc {100 * test['test_acc']:.2f}%; "
              f"decays median {res['decay_median']:.2e}, range {res['decay_range'][0]:.1e}..{res['decay_range'][1]:.1e}")
    return res


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a)


def worker(rank: int, world: int, steps: int, double: bool, check: bool) -> dict | None:
    """One rank's run; rank 0 returns the results (and the one-process run with ``check``)."""
    torch.set_num_threads(1)
    dtype = torch.float64 if double else torch.float32
    res = train(rank, world, dist.group.WORLD, steps, dtype, verbose=True)
    # every rank holds the same hyperparameters, bit for bit
    flat = torch.cat([v.reshape(-1) for v in res["hparams"].values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(gathered[0], t) for t in gathered)
    if rank != 0:
        return None
    print(f"hyperparameters identical on all {world} ranks: {identical}")
    if check:
        single = train(0, 1, None, steps, dtype, verbose=True)
        print(f"max relative difference to one process on the global batches: hyperparameters "
              f"{_max_rel(res['hparams'], single['hparams']):.2e}, weights "
              f"{_max_rel(res['weights'], single['weights']):.2e} ({dtype})")
        res["single"] = single
    res["identical"] = identical
    return res


def main(nproc: int = 2, smoke: bool = False, double: bool = False, check: bool = False) -> dict | None:
    steps = 40 if smoke else 600
    if "RANK" in os.environ:                                    # launched by torchrun
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
        worker(dist.get_rank(), dist.get_world_size(), steps, double, check)
        teardown()                                              # barrier, then destroy (see its NOTE)
        return None
    # spawn: file rendezvous, then barrier, destroy and os._exit in each rank (see bilevel/distributed.py)
    return spawn(worker, nproc, nproc, steps, double, check)[0]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    ap.add_argument("--smoke", action="store_true", help="40 steps (seconds)")
    ap.add_argument("--double", action="store_true", help="float64")
    ap.add_argument("--check", action="store_true", help="also run one process on the global batches and compare")
    a = ap.parse_args()
    main(a.nproc, a.smoke, a.double, a.check)
