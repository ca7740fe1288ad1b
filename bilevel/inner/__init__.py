"""Differentiable functional inner optimizers for unrolled hypergradients.

``opt.init(params) -> state`` and ``opt.step(params, grads, state, hparams) -> (params, state)``;
numbers may name entries of ``hparams`` so that they are tuned (``SGD(lr="lr")``).
"""

from ._base import InnerOptimizer, Schedule
from ._from_torch import Partitioned, check_convertible, from_torch
from ._torchopt import TorchOpt
from .adam import Adam, AdamState, AdamW
from .sgd import SGD, SGDState

__all__ = ["InnerOptimizer", "Schedule", "SGD", "SGDState", "Adam", "AdamW", "AdamState", "TorchOpt", "Partitioned", "from_torch", "check_convertible"]
