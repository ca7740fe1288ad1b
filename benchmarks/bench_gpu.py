"""The library on one CUDA GPU: products, hypergradients, kernels and the inner step, as ratios.

Skipped without CUDA. Every figure is a ratio taken in the same run, from CUDA-event timings of
back-to-back pairs (unit, candidate), each side the median over ``REPS`` calls after warm-up:

- ``gpu-hvp-<size>``: unit = one gradient (forward + backward) of the batch loss of a tanh MLP
  (``small`` 784-1024-256-10, batch 256, 1.07M weights; ``wide`` 784-4096-4096-4096-10, batch 2048,
  37.7M weights), float32. Candidates: a Hessian-vector product on a built operator, a Gauss-Newton
  product, a CG-10 implicit hypergradient (one decay per weight, exact H and Gauss-Newton), and the
  matmul FLOP floor of each (``torch.utils.flop_counter``: the candidate's counted FLOPs over the
  gradient's; time ratio ÷ FLOP ratio is the overhead over that floor).
- ``gpu-kernels``: each Triton kernel against its torch reference on the GPU (time ratio, achieved
  bandwidth or FLOP rate) and ``linear_ce_hvp``'s peak memory against autograd's double backward.
- ``gpu-inner-step``: ``HyperOptimizer.inner_step`` against a plain ``zero_grad / forward / backward /
  step`` loop, and one default hyper step in inner steps.

Run: ``python -m pytest benchmarks/bench_gpu.py --benchmark-json=gpu.json`` (add
``--gpu-report=PATH`` for the markdown table that RESULTS.md quotes).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel as bl
import bilevel.kernels as K
from bilevel.hparams import WeightDecay
from conftest import make_mlp

# BILEVEL_BENCH_DEVICE=cpu BILEVEL_BENCH_SMOKE=1: a dry run of every code path on the CPU, tiny shapes
DEV = os.environ.get("BILEVEL_BENCH_DEVICE", "cuda")
SMOKE = os.environ.get("BILEVEL_BENCH_SMOKE") == "1"
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
PAIRS, REPS, WARMUP = (2, 1, 1) if SMOKE else (7, 5, 3)
ROWS: List[Dict[str, Any]] = []
SIZES = ({"small": ((20, 16, 8, 3), 16), "wide": ((20, 32, 32, 3), 32)} if SMOKE else
         {"small": ((784, 1024, 256, 10), 256), "wide": ((784, 4096, 4096, 4096, 10), 2048)})
N_BIG = 20_000 if SMOKE else 50_000_000
N_CG = 20_000 if SMOKE else 10_000_000
TRITON = "triton" if DEV == "cuda" else "torch"   # the CPU dry run checks the code paths only


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _sync_time(fn: Callable[[], Any], reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls, each bracketed by CUDA events."""
    times = []
    if DEV != "cuda":
        import time
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
        return statistics.median(times)
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def paired(unit: Callable[[], Any], fn: Callable[[], Any]) -> Dict[str, float]:
    """Median of ``PAIRS`` back-to-back ratios time(fn)/time(unit), and each side's median ms."""
    for _ in range(WARMUP):
        unit(), fn()
    _sync()
    u, c = [], []
    for _ in range(PAIRS):
        u.append(_sync_time(unit, REPS))
        c.append(_sync_time(fn, REPS))
    return {"ratio": statistics.median(x / y for x, y in zip(c, u)), "ms": statistics.median(c),
            "unit_ms": statistics.median(u)}


def flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return mode.get_total_flops()


def record(benchmark: Any, group: str, name: str, fn: Callable[[], Any], **extra: Any) -> None:
    """pytest-benchmark's own timing of ``fn`` (synchronized), plus the paired figures in extra_info."""
    benchmark.group = group
    benchmark.extra_info.update(extra)
    benchmark.pedantic(lambda: (fn(), _sync()), rounds=REPS, warmup_rounds=1)
    ROWS.append({"group": group, "name": name, **extra})


@pytest.fixture(scope="session", autouse=True)
def _report(request: pytest.FixtureRequest):
    yield
    path = request.config.getoption("--gpu-report", default=None) or os.environ.get("BILEVEL_GPU_REPORT")
    if not path or not ROWS:
        return
    name = (lambda pr: f"{pr.name}, {pr.multi_processor_count} SMs")(torch.cuda.get_device_properties(0)) \
        if DEV == "cuda" else "CPU dry run"
    head = (f"{name}, torch {torch.__version__}, "
            f"triton {getattr(__import__('triton'), '__version__', '?') if K.triton_available() else 'absent'}")
    lines = [f"GPU: {head}", ""]
    for group in dict.fromkeys(r["group"] for r in ROWS):
        lines += [f"#### `{group}`", "", "| benchmark | ms | unit ms | × unit | figures |", "|---|---|---|---|---|"]
        for r in (r for r in ROWS if r["group"] == group):
            rest = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                             if k not in ("group", "name", "ms", "unit_ms", "ratio"))
            lines.append(f"| {r['name']} | {r.get('ms', float('nan')):.3f} | {r.get('unit_ms', float('nan')):.3f} | "
                         f"{r.get('ratio', float('nan')):.2f} | {rest} |")
        lines.append("")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as fh:
        json.dump({"device": head, "rows": ROWS}, fh, indent=1)


# -- the MLP problem on the GPU ------------------------------------------------------------------
class GPUProblem:
    def __init__(self, size: str) -> None:
        layers, batch = SIZES[size]
        torch.manual_seed(0)
        self.model = make_mlp(layers).to(DEV)
        teacher = torch.randn(layers[0], layers[-1], device=DEV)
        self.X, self.Xv = torch.randn(batch, layers[0], device=DEV), torch.randn(batch, layers[0], device=DEV)
        self.y, self.yv = (self.X @ teacher).argmax(1), (self.Xv @ teacher).argmax(1)
        self.hp = {k: torch.full_like(v, math.log(1e-2)) for k, v in self.model.named_parameters()}
        w = {k: v.detach().clone().requires_grad_(True) for k, v in self.model.named_parameters()}
        opt = torch.optim.Adam(list(w.values()), lr=3e-3)
        for _ in range(50):                          # a few steps: CG-10 and Neumann are fine there
            opt.zero_grad(set_to_none=True)
            self.inner(w, self.hp, self.X, self.y).backward()
            opt.step()
        self.params = {k: v.detach() for k, v in w.items()}
        self.penalty = WeightDecay({k: k for k in self.params}, per="parameter", kind="exp")
        self.n = sum(p.numel() for p in self.params.values())

    def loss(self, p, X, y):
        return F.cross_entropy(functional_call(self.model, p, (X,)), y)

    def inner(self, p, h, X, y):
        return self.loss(p, X, y) + 0.5 * sum((h[k].exp() * p[k].square()).sum() for k in p)

    def data_loss(self, p, h, X, y):
        return self.loss(p, X, y)

    def output_loss(self, p, h, X, y):
        return bl.losses.cross_entropy(functional_call(self.model, p, (X,)), y)

    def outer(self, p, h, X, y):
        return self.loss(p, X, y)

    def gradient(self) -> Callable[[], Any]:
        w = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
        leaves = list(w.values())
        return lambda: torch.autograd.grad(self.loss(w, self.X, self.y), leaves)


@pytest.fixture(scope="module", params=list(SIZES))
def gpu_problem(request: pytest.FixtureRequest) -> GPUProblem:
    return GPUProblem(request.param)


def _size(p: GPUProblem) -> str:
    return "small" if p.n < 5e6 else "wide"


def test_hessian_products(gpu_problem: GPUProblem, benchmark: Any) -> None:
    p = gpu_problem
    grad = p.gradient()
    op = bl.HessianOperator(p.data_loss, p.params, p.hp, (p.X, p.y), penalty=p.penalty)
    v = torch.randn(op.flat.size, device=DEV)
    r = paired(grad, lambda: op.matvec_flat(v))
    r["flop_ratio"] = flops(lambda: op.matvec_flat(v)) / flops(grad)
    record(benchmark, f"gpu-hvp-{_size(p)}", "Hessian product on a built operator (marginal)",
           lambda: op.matvec_flat(v), weights=p.n, **r)


def test_gauss_newton_product(gpu_problem: GPUProblem, benchmark: Any) -> None:
    p = gpu_problem
    grad = p.gradient()
    op = bl.HessianOperator(p.output_loss, p.params, p.hp, (p.X, p.y), penalty=p.penalty, mode="gauss_newton")
    v = torch.randn(op.flat.size, device=DEV)
    r = paired(grad, lambda: op.matvec_flat(v))
    r["flop_ratio"] = flops(lambda: op.matvec_flat(v)) / flops(grad)
    record(benchmark, f"gpu-hvp-{_size(p)}", "Gauss-Newton product on a built operator (marginal)",
           lambda: op.matvec_flat(v), weights=p.n, **r)


@pytest.mark.parametrize("curvature", ["exact", "gauss_newton"])
def test_cg10_hypergradient(gpu_problem: GPUProblem, curvature: str, benchmark: Any) -> None:
    p = gpu_problem
    # damped, stopping at negative curvature: the cost is measured; matvecs says if it stopped early
    solver = bl.CG(maxiter=10, tol=0.0, damping=1.0 if SMOKE else 0.05, on_indefinite="stop")
    inner = p.output_loss if curvature == "gauss_newton" else p.data_loss

    def run() -> Any:
        return bl.implicit_hypergrad(inner, p.outer, p.params, p.hp, solver=solver, inner_args=(p.X, p.y),
                                     outer_args=(p.Xv, p.yv), penalty=p.penalty,
                                     hvp_mode="gauss_newton" if curvature == "gauss_newton" else "auto")
    matvecs = run().info.solver.matvecs
    grad = p.gradient()
    r = paired(grad, run)
    r["flop_ratio"] = flops(run) / flops(grad)
    r["over_flop_floor"] = r["ratio"] / r["flop_ratio"]
    record(benchmark, f"gpu-hvp-{_size(p)}", f"IFT CG-10 hypergradient ({curvature}), penalty=", run,
           weights=p.n, matvecs=matvecs, **r)


# -- kernels ---------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(DEV == "cuda" and (not K.triton_available() or K.interpreting()),
                                  reason="needs triton compiled for the GPU")


@needs_triton
def test_kernel_logistic(benchmark: Any) -> None:
    g = torch.Generator(device=DEV).manual_seed(0)
    R, C = (512, 64) if SMOKE else (65536, 1024)
    X = torch.randn(R, C, device=DEV, generator=g)
    w, v = torch.randn(C, device=DEV, generator=g) / C ** 0.5, torch.randn(C, device=DEV, generator=g)
    y = (torch.rand(R, device=DEV, generator=g) < 0.5).float()
    wl = w.clone().requires_grad_(True)
    grad = lambda: torch.autograd.grad(F.binary_cross_entropy_with_logits(X @ wl, y), wl)  # noqa: E731
    curv = K.logistic_curvature(X, w)
    tri = lambda: K.logistic_hvp(X, w, v, curvature=curv, backend=TRITON)  # noqa: E731
    ref = lambda: K.logistic_hvp(X, w, v, curvature=curv, backend="torch")  # noqa: E731
    auto = lambda: bl.hvp(lambda p: F.binary_cross_entropy_with_logits(X @ p["w"], y), {"w": w}, {"w": v},  # noqa: E731
                          mode="reverse")
    rt, rr, ra = paired(grad, tri), paired(grad, ref), paired(grad, auto)
    gbs = X.numel() * 4 * 2 / (rt["ms"] * 1e-3) / 1e9          # X read twice (Xv, then Xᵀ(·))
    record(benchmark, "gpu-kernels", f"logistic_hvp triton (curvature cached), X {R}×{C}", tri,
           **rt, torch_ref_ratio=rr["ratio"], autograd_ratio=ra["ratio"], GBps=gbs)


@needs_triton
def test_kernel_linear_ce(benchmark: Any) -> None:
    B, D, C = (64, 8, 128) if SMOKE else (8192, 128, 32768)
    g = torch.Generator(device=DEV).manual_seed(0)
    X, W, V = (torch.randn(s, device=DEV, generator=g) for s in ((B, D), (C, D), (C, D)))
    W *= 0.1
    y = torch.randint(0, C, (B,), device=DEV, generator=g)
    auto = lambda: bl.hvp(lambda p: F.cross_entropy(X @ p["W"].T, y), {"W": W}, {"W": V}, mode="reverse")  # noqa: E731
    tri = lambda: K.linear_ce_hvp(X, W, V, backend=TRITON)  # noqa: E731
    ref = lambda: K.linear_ce_hvp(X, W, V, backend="torch")  # noqa: E731
    peak = {}
    for name, fn in (("autograd", auto), ("triton", tri), ("torch_ref", ref)):
        if DEV != "cuda":
            fn()
            peak[name] = 1.0
            continue
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    r = paired(auto, tri)
    rr = paired(auto, ref)
    record(benchmark, "gpu-kernels", f"linear_ce_hvp triton vs autograd double backward (B={B}, D={D}, C={C})",
           tri, **r, torch_ref_ratio=rr["ratio"], peak_mb_triton=peak["triton"], peak_mb_autograd=peak["autograd"],
           peak_mb_torch_ref=peak["torch_ref"], memory_ratio=peak["triton"] / peak["autograd"])


@needs_triton
def test_kernel_neumann_step(benchmark: Any) -> None:
    n = N_BIG
    g = torch.Generator(device=DEV).manual_seed(0)
    v, av, acc = (torch.randn(n, device=DEV, generator=g) for _ in range(3))
    a = torch.tensor(1e-9, device=DEV)
    ref = lambda: K.neumann_step(v, av, acc, a, backend="torch")  # noqa: E731
    tri = lambda: K.neumann_step(v, av, acc, a, backend=TRITON)  # noqa: E731
    r = paired(ref, tri)
    gbs = n * 4 * 5 / (r["ms"] * 1e-3) / 1e9                    # read v, av, acc; write v, acc
    record(benchmark, "gpu-kernels", f"neumann_step triton vs torch reference ({n:.0e} float32)", tri, **r, GBps=gbs)


@needs_triton
def test_kernel_decay_mixed(benchmark: Any) -> None:
    n = N_BIG
    g = torch.Generator(device=DEV).manual_seed(0)
    lam, w, u = (torch.randn(n, device=DEV, generator=g) for _ in range(3))
    ref = lambda: K.decay_mixed(lam, w, u, backend="torch")  # noqa: E731
    tri = lambda: K.decay_mixed(lam, w, u, backend=TRITON)  # noqa: E731
    r = paired(ref, tri)
    gbs = n * 4 * 4 / (r["ms"] * 1e-3) / 1e9
    record(benchmark, "gpu-kernels", f"decay_mixed triton vs torch reference ({n:.0e} float32)", tri, **r, GBps=gbs)


@needs_triton
def test_fused_cg_loop(benchmark: Any) -> None:
    n = N_CG
    g = torch.Generator(device=DEV).manual_seed(0)
    d = torch.rand(n, device=DEV, generator=g) + 0.5
    b = torch.randn(n, device=DEV, generator=g)
    fused = lambda: bl.CG(maxiter=50, tol=0.0).solve_flat(lambda z: d * z, b)  # noqa: E731
    plain = lambda: bl.CG(maxiter=50, tol=0.0, backend="torch").solve_flat(lambda z: d * z, b)  # noqa: E731
    assert DEV != "cuda" or fused()[1].extra.get("backend") == "triton"
    r = paired(plain, fused)
    record(benchmark, "gpu-kernels", f"CG-50 loop, fused Chronopoulos-Gear (triton) vs textbook (torch), n={n:.0e}",
           fused, **r)


# -- HyperOptimizer's inner step and hyper step ----------------------------------------------------
@pytest.mark.parametrize("size", ["mlp-64-512-256-10", "mlp-784-1024-256-10"])
def test_inner_step_overhead(size: str, benchmark: Any) -> None:
    layers, batch = {"mlp-64-512-256-10": ((64, 512, 256, 10), 64),
                     "mlp-784-1024-256-10": ((784, 1024, 256, 10), 256)}[size]
    if SMOKE:
        layers, batch = (20, 16, 10), 8
    torch.manual_seed(0)
    X, y = torch.randn(batch, layers[0], device=DEV), torch.randint(0, 10, (batch,), device=DEV)
    plain_model, hyper_model = make_mlp(layers).to(DEV), make_mlp(layers).to(DEV)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=1e-3)

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain_model(X), y).backward()
        plain_opt.step()

    hp, penalty = bl.hparams.weight_decay(hyper_model, init=1e-4)
    loss = lambda m, h, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    hopt = bl.HyperOptimizer(hyper_model, hp, inner_loss=loss, outer_loss=loss, penalty=penalty,
                             inner_optimizer=torch.optim.Adam(hyper_model.parameters(), lr=1e-3),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=1e-2), outer_loader=[(X, y)])
    # the plain loop gets the same decay, written as users write it
    plain_pen = lambda: 0.5 * sum((h.exp() * w.square()).sum() for h, w in zip(hp.values(), plain_model.parameters()))  # noqa: E731

    def plain_decayed() -> None:
        plain_opt.zero_grad(set_to_none=True)
        (F.cross_entropy(plain_model(X), y) + plain_pen()).backward()
        plain_opt.step()

    step = lambda: hopt.inner_step((X, y))  # noqa: E731
    r = paired(plain_decayed, step)
    r_bare = paired(plain, step)
    hyper = lambda: hopt.hyper_step((X, y), (X, y))  # noqa: E731
    rh = paired(step, hyper)
    record(benchmark, "gpu-inner-step", f"HyperOptimizer.inner_step vs plain decayed loop, {size}, batch {batch}",
           step, **r, vs_undecayed_loop=r_bare["ratio"], hyper_step_in_inner_steps=rh["ratio"],
           hyper_step_ms=rh["ms"])
