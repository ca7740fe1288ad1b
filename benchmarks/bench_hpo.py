"""HPO quality vs Optuna TPE and random search (breast cancer: 30 decays; digits: 640; wine: 39).

Each method runs once (``benchmark.pedantic``, one round): the wall time is pytest-benchmark's, the
validation CE, test CE and test accuracy after the common L-BFGS refit are in ``extra_info``. Target:
lower validation loss than TPE (100 trials) at ≤ 1/10 of its wall time. The generated
table is in RESULTS.md (``python benchmarks/make_results.py --only hpo``).
"""

from __future__ import annotations

from typing import Any

import pytest

import baselines


@pytest.mark.parametrize("method", ["hyperoptimizer_lbfgs", "hyperoptimizer", "implicit_lbfgs", "tpe", "random"])
@pytest.mark.parametrize("task", baselines.HPO_TASKS)
def test_hpo(task: str, method: str, benchmark: Any) -> None:
    pytest.importorskip("sklearn")
    if method in ("tpe", "random"):
        pytest.importorskip("optuna")
    import torch

    torch.set_num_threads(1)
    t = baselines.HPOTask(task)
    fn = {"hyperoptimizer_lbfgs": lambda: baselines.hpo_hyperoptimizer_lbfgs(t),
          "hyperoptimizer": lambda: baselines.hpo_hyperoptimizer(t),
          "implicit_lbfgs": lambda: baselines.hpo_implicit_lbfgs(t),
          "tpe": lambda: baselines.hpo_blackbox(t, "tpe"),
          "random": lambda: baselines.hpo_blackbox(t, "random")}[method]
    benchmark.group = f"hpo-{task}"
    res = benchmark.pedantic(fn, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in res.items() if isinstance(v, (int, float, str))})
