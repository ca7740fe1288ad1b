"""A DARTS search as one call: :class:`bilevel.HyperOptimizer` with the optimizers of Liu et al. (2019)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hyperopt import HyperOptimizer
from ..methods import FirstOrder
from ._mixed import arch_parameters, named_arch_parameters, weight_parameters

__all__ = ["darts", "cross_entropy_loss"]


def cross_entropy_loss(model: nn.Module, hparams: Any, batch: Any) -> Tensor:
    """``F.cross_entropy(model(x), y)`` for a batch ``(x, y)``: the default loss of :func:`darts`.

    Shapes: ``x`` whatever the model takes, ``y`` ``(batch,)`` class indices; returns a 0-dim tensor.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> bl.nas.cross_entropy_loss(net, {}, (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))).shape
        torch.Size([])
    """
    return F.cross_entropy(model(batch[0]), batch[1])


def darts(
    model: nn.Module,
    *,
    method: Any = None,
    inner_loss: Optional[Callable[..., Tensor]] = None,
    outer_loss: Optional[Callable[..., Tensor]] = None,
    lr: float = 0.025,
    momentum: float = 0.9,
    weight_decay: float = 3e-4,
    arch_lr: float = 3e-4,
    arch_betas: tuple[float, float] = (0.5, 0.999),
    arch_weight_decay: float = 1e-3,
    **kwargs: Any,
) -> HyperOptimizer:
    """A :class:`bilevel.HyperOptimizer` set up as a DARTS architecture search over ``model``.

    The hyperparameters are the supernet's architecture weights (the tree :func:`named_arch_parameters`),
    the inner variables every other parameter (:func:`weight_parameters`). The optimizers and their
    numbers are those of DARTS (Liu et al. 2019): SGD (``lr`` 0.025, momentum 0.9, weight decay
    3e-4) on the weights, Adam (``arch_lr`` 3e-4, betas (0.5, 0.999), weight decay 1e-3) on α. Reach
    them as ``hopt.inner_optimizer`` / ``hopt.outer_optimizer`` (to attach a learning-rate schedule).

    Args:
        model: a supernet holding :class:`MixedOp` edges (e.g. :class:`Network`).
        method: ``bl.FirstOrder()`` (default: first-order DARTS), ``bl.Unrolled(steps=1)``
            (second-order DARTS, exact), ``bl.Unrolled(steps=1, second_order="finite_difference")``
            (DARTS's ε = 0.01/‖v‖ approximation) or ``bl.Implicit(solver=bl.Neumann(steps=...))`` (iDARTS).
        inner_loss: ``loss(model, hparams, batch) -> scalar`` on training batches; default
            :func:`cross_entropy_loss`.
        outer_loss: the same on validation batches; default ``inner_loss``.
        lr, momentum, weight_decay: the weights' SGD.
        arch_lr, arch_betas, arch_weight_decay: α's Adam.
        **kwargs: passed to :class:`bilevel.HyperOptimizer` (``outer_loader``, ``hyper_every``,
            ``on_error``, ``process_group``, ``clip_grad_norm=5.0`` as DARTS clips its weights...).

    Returns:
        The configured :class:`bilevel.HyperOptimizer`: ``hopt.step(train_batch)`` with an
        ``outer_loader``, or ``hopt.inner_step`` / ``hopt.hyper_step`` yourself; then
        :func:`derive`.

    Example:
        >>> net = bl.nas.Network(1, 3, dim=1, C=4, layers=1, nodes=2, primitives=("skip_connect", "sep_conv_3x3"))
        >>> data = [(torch.randn(8, 1, 12), torch.randint(0, 3, (8,))) for _ in range(2)]
        >>> hopt = bl.nas.darts(net, method=bl.Unrolled(steps=1), outer_loader=data)
        >>> loss = hopt.step(data[0])                       # an SGD step, then an α step
        >>> hopt.hyper_steps, type(hopt.outer_optimizer).__name__, hopt.inner_optimizer.defaults["lr"]
        (1, 'Adam', 0.025)
    """
    alphas = named_arch_parameters(model)
    inner = inner_loss if inner_loss is not None else cross_entropy_loss
    return HyperOptimizer(
        model, alphas, inner_loss=inner, outer_loss=outer_loss if outer_loss is not None else inner,
        inner_optimizer=torch.optim.SGD(weight_parameters(model), lr=lr, momentum=momentum, weight_decay=weight_decay),
        outer_optimizer=torch.optim.Adam(arch_parameters(model), lr=arch_lr, betas=arch_betas,
                                         weight_decay=arch_weight_decay),
        method=method if method is not None else FirstOrder(), **kwargs)
