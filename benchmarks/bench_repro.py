"""hypertorch's logistic-regression setting (n=1000, d=20, T=100, K=10), ours.

hypertorch's notebook reaches a validation BCE of about 0.28; ``extra_info`` holds ours after 300
outer steps (one round, timed by pytest-benchmark).
"""

from __future__ import annotations

from typing import Any

import pytest

import baselines


def test_hypertorch_logistic_regression(benchmark: Any) -> None:
    pytest.importorskip("sklearn")
    benchmark.group = "repro"
    res = benchmark.pedantic(baselines.run_hypertorch_repro, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in res.items() if isinstance(v, (int, float))})
    assert res["val_bce_final"] < res["val_bce_first"]
