"""One IFT hypergradient (CG-10, ``penalty=``) in gradients vs model size and vs
the number of hyperparameters.

Groups ``cost-<size>`` (MLPs of about 10k, 100k, 1M, 5M weights, one decay per weight) and
``hparams-<G>`` (the 1.07M-weight MLP with G = 10 … 10⁶ weight-decay groups); unit: one gradient of
the batch loss. Target: ≤ 16 gradients at k = 10; the cost should be flat in G.
"""

from __future__ import annotations

import pytest

import baselines
from conftest import Measure


@pytest.mark.parametrize("config", ["gradient", "hypergrad"])
@pytest.mark.parametrize("size", list(baselines.MODEL_SIZES))
def test_cost_vs_model_size(size: str, config: str, measure: Measure) -> None:
    P, n_h, hg, grad = baselines._cost_problem(baselines.MODEL_SIZES[size], None)
    measure(hg if config == "hypergrad" else grad, group=f"cost-{size}", name=config, unit=(config == "gradient"),
            paired_with=None if config == "gradient" else grad, pairs=7, n_params=P, n_hparams=n_h,
            target_gradients=16)


@pytest.mark.parametrize("config", ["gradient", "hypergrad"])
@pytest.mark.parametrize("groups", baselines.GROUPS)
def test_cost_vs_hparams(groups: int, config: str, measure: Measure) -> None:
    P, n_h, hg, grad = baselines._cost_problem(baselines.MODEL_SIZES["1M"], groups)
    measure(hg if config == "hypergrad" else grad, group=f"hparams-{n_h}", name=config, unit=(config == "gradient"),
            paired_with=None if config == "gradient" else grad, pairs=7, n_params=P, n_hparams=n_h)
