"""Neural architecture search by DARTS relaxations, on top of :class:`bilevel.HyperOptimizer`.

A search space is a supernet whose edges are :class:`MixedOp` (``Σ softmax(α)_i · op_i(x)``); the
architecture weights ``α`` live in the model and are the hyperparameters of a bilevel problem
(Liu et al. 2019)::

    hopt = bl.nas.darts(net, method=bl.FirstOrder())          # DARTS's optimizers and numbers; or, spelled out:
    alphas = bl.nas.named_arch_parameters(net)                # hparams: the tree of every α
    hopt = bl.HyperOptimizer(
        net, alphas, inner_loss=ce, outer_loss=ce,
        inner_optimizer=torch.optim.SGD(bl.nas.weight_parameters(net), lr=0.025, momentum=0.9),
        outer_optimizer=torch.optim.Adam(bl.nas.arch_parameters(net), lr=3e-4, betas=(0.5, 0.999)),
        method=bl.FirstOrder())          # first-order DARTS
        # bl.Unrolled(steps=1)                                  second-order DARTS (exact)
        # bl.Unrolled(steps=1, second_order="finite_difference") DARTS's ε = 0.01/‖v‖ approximation
        # bl.Implicit(solver=bl.Neumann(steps=5))               iDARTS
    ...
    genotype = bl.nas.derive(net)                             # argmax per edge, top-2 edges per node
    child = bl.nas.Network(..., genotype=genotype)            # retrain from scratch

Search spaces: :class:`Network` / :class:`Cell` (the DARTS cell, ``dim=2`` images, ``dim=1``
sequences) over :data:`PRIMITIVES`.
"""

from ._cell import Cell, Network, edge_name
from ._derive import Argmax, Perturbation, derive, parameter_free_edges
from ._mixed import (MixedOp, WEIGHTINGS, annealed_temperature, arch_parameters, expected_cost, mixed_ops,
                     named_arch_parameters, named_weight_parameters, set_temperature, weight_parameters,
                     zero_one_loss)
from ._search import cross_entropy_loss, darts
from ._ops import (OPS, PARAMETER_FREE, PRIMITIVES, DilConv, FactorizedReduce, Identity, PoolBN, ReLUConvBN,
                   SepConv, Zero, make_op)

__all__ = [
    "MixedOp", "WEIGHTINGS", "arch_parameters", "weight_parameters", "named_arch_parameters",
    "named_weight_parameters", "mixed_ops", "set_temperature",
    "annealed_temperature", "expected_cost", "zero_one_loss",
    "Cell", "Network", "edge_name",
    "derive", "Argmax", "Perturbation", "parameter_free_edges", "darts", "cross_entropy_loss",
    "PRIMITIVES", "PARAMETER_FREE", "OPS", "make_op", "Zero", "Identity", "ReLUConvBN", "DilConv", "SepConv",
    "FactorizedReduce", "PoolBN",
]
