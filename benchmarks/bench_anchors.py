"""Speed and memory against TorchOpt and higher, same problem, same process.

- ``anchor-ift-<problem>`` (unit: one gradient of the inner loss): our IFT with CG-10 in its fastest
  configuration vs TorchOpt ``custom_root`` with ``solve_cg(maxiter=10)`` and with its default
  ``solve_normal_cg`` (10 iterations); the paired ratio ``x unit (paired)`` is in gradients.
- ``anchor-unroll-T<T>`` (unit: higher with SGD): reverse unrolling through T = 10/50/200 steps with
  higher, TorchOpt MetaSGD/MetaAdam and ours; peak memory of each in a fresh process (extra_info).

Targets: IFT ≥ 1.1× faster than TorchOpt+solve_cg and ≥ 1.5× faster than its default solver at
equal accuracy; IFT ≤ 1/10 of higher's memory at T = 50 at equal accuracy. The generated tables are in
RESULTS.md (``python benchmarks/make_results.py --only ift_anchor,unroll_anchor``).
"""

from __future__ import annotations

import os
from typing import Any, Dict

import pytest

import bilevel as bl
import baselines
from conftest import Measure

# TorchOpt 0.7.3 calls the deprecated functorch.vjp (one FutureWarning per call)
pytestmark = pytest.mark.filterwarnings("ignore:.*functorch.vjp.*:FutureWarning")

_IFT: Dict[str, Any] = {}


def _ift_problem(name: str) -> Any:
    if name not in _IFT:
        _IFT[name] = baselines.LogisticIFT() if name == "logistic" else baselines.MLPIFT()
    return _IFT[name]


@pytest.mark.parametrize("config", ["gradient", "bilevel", "torchopt_cg", "torchopt_normal_cg"])
@pytest.mark.parametrize("name", ["logistic", "mlp"])
def test_ift_anchor(name: str, config: str, measure: Measure) -> None:
    pytest.importorskip("torchopt")
    import torchopt.linear_solve as ls

    prob = _ift_problem(name)
    grad = prob.gradient()
    fns = {"gradient": grad,
           "bilevel": lambda: prob.ours(bl.CG(maxiter=10, tol=0.0)),
           "torchopt_cg": lambda: baselines.torchopt_hypergrad(prob, ls.solve_cg(maxiter=10, rtol=0.0, atol=0.0)),
           "torchopt_normal_cg": lambda: baselines.torchopt_hypergrad(prob, ls.solve_normal_cg(maxiter=10, rtol=0.0,
                                                                                             atol=0.0))}
    measure(fns[config], group=f"anchor-ift-{name}", name=config, unit=(config == "gradient"),
            paired_with=None if config == "gradient" else grad)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory needs Linux /proc")
@pytest.mark.parametrize("T", baselines.UNROLL_T)
@pytest.mark.parametrize("config", baselines.UNROLL_CONFIGS)
def test_unroll_anchor(config: str, T: int, measure: Measure) -> None:
    pytest.importorskip("higher")
    pytest.importorskip("torchopt")
    prob = baselines._unroll_problem(False)
    mem = baselines.peak_memory_mb("unroll", config, [T, False])
    unit = prob.runner("higher SGD", T)
    measure(prob.runner(config, T), group=f"anchor-unroll-T{T}", name=config, unit=(config == "higher SGD"),
            paired_with=None if config == "higher SGD" else unit, pairs=5, peak_mb=round(mem, 2))
