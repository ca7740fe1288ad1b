"""Differentiable functional inner optimizers for unrolled hypergradients.

``opt.init(params) -> state`` and ``opt.step(params, grads, state, hparams) -> (params, state)``;
numbers may name entries of ``hparams`` so that they are tuned (``SGD(lr="lr")``). Each rule is
``torch.optim``'s, with its keyword names and defaults: SGD, Adam/AdamW, RMSprop, Adagrad, Adamax,
NAdam, RAdam.
"""

from ._base import InnerOptimizer, Schedule
from ._from_torch import Partitioned, check_convertible, from_torch
from ._torchopt import TorchOpt
from .adagrad import Adagrad, AdagradState
from .adam import Adam, AdamState, AdamW
from .adamax import Adamax, AdamaxState
from .nadam import NAdam, NAdamState
from .radam import RAdam
from .rmsprop import RMSprop, RMSpropState
from .sgd import SGD, SGDState

__all__ = ["InnerOptimizer", "Schedule", "SGD", "SGDState", "Adam", "AdamW", "AdamState", "RMSprop", "RMSpropState",
           "Adagrad", "AdagradState", "Adamax", "AdamaxState", "NAdam", "NAdamState", "RAdam",
           "TorchOpt", "Partitioned", "from_torch", "check_convertible"]
