"""Quick paired ratios for A/B comparisons of two versions of the library, outside pytest-benchmark.

``python benchmarks/paired_breakdown.py ggn [pairs]``: the Gauss–Newton CG-10 hypergradient of
``bench_ift.py`` (the 1.07 M MLP of ``conftest.py``, ``penalty=``) against one gradient, ``pairs``
back-to-back pairs, median ratio. ``python benchmarks/paired_breakdown.py inner-step``: the
``HyperOptimizer.inner_step`` of ``bench_inner_step.py`` (MLP 64-512-256-10, batch 64) against the
plain torch step, and the same step with its finiteness check removed (300 paired blocks of 20
steps, medians). Run two checkouts alternately (``PYTHONPATH=<checkout>``) to compare versions in
one window; ``OMP_NUM_THREADS`` sets the threads. Figures in RESULTS.md.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bilevel as bl  # noqa: E402
import bilevel._training as training  # noqa: E402
from torch import nn  # noqa: E402


def ggn(pairs: int = 25) -> float:
    """Median of ``pairs`` (hypergradient time / gradient time) ratios, taken back to back."""
    bench_ift, conftest = _benchmark_modules()
    p = conftest._build_problem()
    solver = bl.CG(maxiter=10, tol=0.0)
    hypergrad = lambda: bench_ift.gauss_newton_hypergrad(p, solver)      # noqa: E731
    gradient = bench_ift._gradient_fn(p)

    for _ in range(3):
        hypergrad()
        gradient()
    ratios = []
    for _ in range(pairs):
        ratios.append(_seconds(hypergrad, 1) / _seconds(gradient, 1))
    return statistics.median(ratios)


def mlp(sizes: tuple[int, ...]) -> nn.Module:
    """``Linear -> tanh -> ... -> Linear`` with seed 0."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def twin_steps(sizes: tuple[int, ...], batch: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(plain, ours)``: a plain torch SGD-momentum step and ``HyperOptimizer.inner_step`` on twin
    MLPs of ``sizes``, one fixed batch of ``batch`` examples (``bl.FirstOrder()``: the inner step
    does not read the per-tensor decays)."""
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(batch, sizes[0], generator=gen), torch.randint(0, sizes[-1], (batch,), generator=gen)
    plain_model, model = mlp(sizes), mlp(sizes)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=1e-3, momentum=0.9)
    hp, _ = bl.hparams.weight_decay(model, init=1e-4, per="tensor")
    loss = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])      # noqa: E731
    hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, method=bl.FirstOrder(),
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9),
                             outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1))

    def plain() -> None:
        plain_opt.zero_grad()
        F.cross_entropy(plain_model(X), y).backward()
        plain_opt.step()

    def ours() -> None:
        hopt.inner_step((X, y))

    return plain, ours


def inner_step(blocks: int = 300) -> tuple[float, float]:
    """``(inner step / plain step, inner step without its finiteness check / plain step)``, medians,
    on the MLP 64-512-256-10 with batch 64."""
    plain, ours = twin_steps((64, 512, 256, 10), 64)

    def unchecked() -> None:
        check = training.fresh_tensors_finite
        training.fresh_tensors_finite = lambda ts: True
        try:
            ours()
        finally:
            training.fresh_tensors_finite = check

    for f in (plain, ours, unchecked):
        _seconds(f, 200)
    with_check, without = [], []
    for _ in range(blocks):
        a, b, c = _seconds(plain, 20), _seconds(ours, 20), _seconds(unchecked, 20)
        with_check.append(b / a)
        without.append(c / a)
    return statistics.median(with_check), statistics.median(without)


def run_speed(smoke: bool = False) -> dict:
    """The speed targets of the Gauss–Newton and inner-step work, for ``make_results.py`` (part
    ``speed``): one GGN product and a GGN CG-10 hypergradient against one gradient on the 1.07 M MLP
    of ``conftest.py`` (paired medians, and the matmul FLOP floor of each), and
    ``HyperOptimizer.inner_step`` against the plain torch step on the MLP 64-512-256-10 (batch 64)
    and the 1.07 M MLP (batch 256). ``smoke``: tiny sizes, a few pairs."""
    bench_ift, conftest = _benchmark_modules()
    layers, batch = ((20, 32, 16, 4), 16) if smoke else (conftest.LAYERS, conftest.BATCH)
    p = conftest._build_problem(layers, batch)
    solver = bl.CG(maxiter=10, tol=0.0)
    hypergrad = lambda: bench_ift.gauss_newton_hypergrad(p, solver)      # noqa: E731
    gradient = bench_ift._gradient_fn(p)
    op = bl.operators.make_operator(p.output_loss, p.params, p.hparams, (p.X, p.y), mode="gauss_newton",
                                    penalty=p.penalty)
    v = torch.randn(op.flat.size, generator=torch.Generator().manual_seed(0))
    buf = torch.empty_like(v)
    product = lambda: op.matvec_flat(v, out=buf)                         # noqa: E731
    pairs = 3 if smoke else 25
    for _ in range(2 if smoke else 3):
        hypergrad(), gradient(), product()
    hg, pr = [], []
    for _ in range(pairs):
        hg.append(_seconds(hypergrad, 1) / _seconds(gradient, 1))
        pr.append(_seconds(product, 3) / _seconds(gradient, 3))
    unit = conftest.matmul_flops(gradient)
    out = {"n_params": p.n_params, "ggn_cg10": statistics.median(hg), "ggn_product": statistics.median(pr),
           "ggn_cg10_floor": conftest.matmul_flops(hypergrad) / unit, "ggn_product_floor": conftest.matmul_flops(product) / unit,
           "inner_step": []}
    shapes = [((16, 32, 16, 4), 8), ((20, 32, 4), 16)] if smoke else [((64, 512, 256, 10), 64), (conftest.LAYERS, 256)]
    for sizes, b in shapes:
        plain, ours = twin_steps(sizes, b)
        n = 5 if smoke else 20
        for f in (plain, ours):
            _seconds(f, 2 * n)
        ratios = [_seconds(ours, n) / _seconds(plain, n) for _ in range(3 if smoke else 150)]
        out["inner_step"].append({"sizes": list(sizes), "batch": b, "ratio": statistics.median(ratios)})
    return out


def _benchmark_modules() -> tuple:
    """``(bench_ift, conftest)`` of benchmarks/, also inside a pytest session whose ``conftest`` module
    is the tests' own (the benchmarks' one is then loaded by path, under ``conftest`` while
    ``bench_ift`` imports from it, and the tests' module is put back)."""
    import importlib.util

    here = Path(__file__).resolve().parent
    mine = sys.modules.get("conftest")
    if mine is not None and Path(getattr(mine, "__file__", "")).resolve().parent == here:
        import bench_ift
        return bench_ift, mine
    spec = importlib.util.spec_from_file_location("conftest", here / "conftest.py")
    assert spec is not None and spec.loader is not None
    bench_conftest = importlib.util.module_from_spec(spec)
    sys.modules["conftest"] = bench_conftest
    try:
        spec.loader.exec_module(bench_conftest)
        sys.modules.pop("bench_ift", None)
        import bench_ift
    finally:
        if mine is not None:
            sys.modules["conftest"] = mine
        else:
            sys.modules.pop("conftest", None)
    return bench_ift, bench_conftest


def _seconds(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main(argv: list[str]) -> None:
    what = argv[0] if argv else "ggn"
    if what == "ggn":
        print(f"GGN CG-10 hypergradient, paired x gradient (median): {ggn(int(argv[1]) if len(argv) > 1 else 25):.2f}")
    elif what == "inner-step":
        a, b = inner_step()
        print(f"inner step / plain step: {a:.3f}; without the finiteness check: {b:.3f}")
    else:
        raise SystemExit(f"paired_breakdown.py: expected 'ggn' or 'inner-step', got {what!r}.")


if __name__ == "__main__":
    main(sys.argv[1:])
