"""The DARTS operation set, for 1-D sequences (``dim=1``) and 2-D images (``dim=2``).

Every operation maps ``(N, C, *spatial)`` to ``(N, C, *spatial / stride)``. Names follow the DARTS
paper (Liu et al. 2019); ``3x3`` means kernel 3 in every spatial dimension, also in 1-D.
In the search the operations use ``BatchNorm(affine=False)`` (an affine BN would let a
candidate rescale its output and fight the architecture weights); a derived network
retrained from scratch uses ``affine=True``.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["PRIMITIVES", "PARAMETER_FREE", "OPS", "make_op", "Zero", "Identity", "ReLUConvBN", "DilConv",
           "SepConv", "FactorizedReduce", "PoolBN"]

#: The standard DARTS search space, in the paper's order.
PRIMITIVES: tuple[str, ...] = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                               "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")

#: Operations without weights (a derived cell with many of them is the DARTS "collapse").
PARAMETER_FREE: frozenset[str] = frozenset({"none", "max_pool_3x3", "avg_pool_3x3", "skip_connect"})


def check_dim(dim: int, fn: str) -> None:
    if dim not in (1, 2):
        raise ValueError(f"{fn}: expected dim 1 (sequences, (N, C, L)) or 2 (images, (N, C, H, W)), got {dim!r}.")


def conv_class(dim: int) -> type:
    return nn.Conv1d if dim == 1 else nn.Conv2d


def batch_norm(dim: int) -> type:
    return nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d


class Zero(nn.Module):
    """The ``none`` operation: zeros of the output shape (``stride`` subsamples).

    Shapes: ``(N, C, *S)`` → ``(N, C, *ceil(S/stride))``.

    Example:
        >>> out = bl.nas.Zero(stride=2)(torch.randn(2, 3, 8, 8))
        >>> out.shape, bool((out == 0).all())
        (torch.Size([2, 3, 4, 4]), True)
    """

    def __init__(self, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        idx = (slice(None), slice(None)) + (slice(None, None, self.stride),) * (x.dim() - 2)
        return x[idx].mul(0.0)


class Identity(nn.Module):
    """``skip_connect`` with stride 1.

    Shapes: any; returns its input.

    Example:
        >>> x = torch.randn(2, 3, 5)
        >>> bl.nas.Identity()(x) is x
        True
    """

    def forward(self, x: Tensor) -> Tensor:
        return x


class ReLUConvBN(nn.Module):
    """ReLU → conv(k, stride, padding) → BN.

    Shapes: ``(N, C_in, *S)`` → ``(N, C_out, *S')`` with ``S'`` the conv's output size
    (``S`` for ``kernel = 2·padding + 1`` and stride 1); ``dim`` spatial dimensions (1 or 2).

    Example:
        >>> bl.nas.ReLUConvBN(3, 8, kernel=1, stride=1, padding=0)(torch.randn(2, 3, 6, 6)).shape
        torch.Size([2, 8, 6, 6])
    """

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, *, dim: int = 2,
                 affine: bool = True) -> None:
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(inplace=False),
                                conv_class(dim)(C_in, C_out, kernel, stride=stride, padding=padding, bias=False),
                                batch_norm(dim)(C_out, affine=affine))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """ReLU → depthwise dilated conv → pointwise conv → BN.

    Shapes: ``(N, C_in, *S)`` → ``(N, C_out, *S')``; ``S' = S/stride`` when
    ``padding = dilation·(kernel − 1)/2`` (as in :data:`OPS`).

    Example:
        >>> op = bl.nas.DilConv(4, 4, kernel=3, stride=2, padding=2, dilation=2, dim=1)
        >>> op(torch.randn(2, 4, 10)).shape
        torch.Size([2, 4, 5])
    """

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, dilation: int, *,
                 dim: int = 2, affine: bool = True) -> None:
        super().__init__()
        conv = conv_class(dim)
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            conv(C_in, C_in, kernel, stride=stride, padding=padding, dilation=dilation, groups=C_in, bias=False),
            conv(C_in, C_out, 1, bias=False),
            batch_norm(dim)(C_out, affine=affine))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class SepConv(nn.Module):
    """Two stacked separable convolutions (the DARTS ``sep_conv``; only the first one strides).

    Shapes: ``(N, C_in, *S)`` → ``(N, C_out, *S/stride)`` when ``padding = (kernel − 1)/2``.

    Example:
        >>> bl.nas.SepConv(4, 6, kernel=3, stride=1, padding=1)(torch.randn(2, 4, 5, 5)).shape
        torch.Size([2, 6, 5, 5])
    """

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, *, dim: int = 2,
                 affine: bool = True) -> None:
        super().__init__()
        self.op = nn.Sequential(DilConv(C_in, C_in, kernel, stride, padding, 1, dim=dim, affine=affine),
                                DilConv(C_in, C_out, kernel, 1, padding, 1, dim=dim, affine=affine))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class FactorizedReduce(nn.Module):
    """``skip_connect`` with stride 2: two offset 1×1 convs of stride 2, concatenated, then BN.

    Shapes: ``(N, C_in, *S)`` → ``(N, C_out, *ceil(S/2))``; ``C_out`` must be even.

    Example:
        >>> bl.nas.FactorizedReduce(3, 8)(torch.randn(2, 3, 6, 6)).shape
        torch.Size([2, 8, 3, 3])
    """

    def __init__(self, C_in: int, C_out: int, *, dim: int = 2, affine: bool = True) -> None:
        super().__init__()
        if C_out % 2:
            raise ValueError(f"bilevel.nas.FactorizedReduce: expected an even C_out, got {C_out}.")
        conv = conv_class(dim)
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = conv(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = conv(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = batch_norm(dim)(C_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        # the second conv sees the input shifted by one in every spatial dimension (zero-padded at the end)
        pad = (0, 1) * (x.dim() - 2)
        shifted = nn.functional.pad(x, pad)[(slice(None), slice(None)) + (slice(1, None),) * (x.dim() - 2)]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class PoolBN(nn.Module):
    """3×3 max or average pooling (average excludes padding), followed by BN as in the DARTS search.

    Shapes: ``(N, C, *S)`` → ``(N, C, *ceil(S/stride))``.

    Example:
        >>> bl.nas.PoolBN("avg", 4, stride=2, dim=1)(torch.randn(2, 4, 9)).shape
        torch.Size([2, 4, 5])
    """

    def __init__(self, kind: str, C: int, stride: int, *, dim: int = 2, affine: bool = False) -> None:
        super().__init__()
        if kind == "max":
            self.pool = (nn.MaxPool1d if dim == 1 else nn.MaxPool2d)(3, stride=stride, padding=1)
        else:
            self.pool = (nn.AvgPool1d if dim == 1 else nn.AvgPool2d)(3, stride=stride, padding=1,
                                                                      count_include_pad=False)
        self.bn = batch_norm(dim)(C, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.pool(x))


OpFactory = Callable[[int, int, int, bool], nn.Module]

#: ``OPS[name](C, stride, dim, affine) -> nn.Module`` for every name of :data:`PRIMITIVES`.
OPS: Mapping[str, OpFactory] = {
    "none": lambda C, stride, dim, affine: Zero(stride),
    "max_pool_3x3": lambda C, stride, dim, affine: PoolBN("max", C, stride, dim=dim, affine=affine),
    "avg_pool_3x3": lambda C, stride, dim, affine: PoolBN("avg", C, stride, dim=dim, affine=affine),
    "skip_connect": lambda C, stride, dim, affine: (Identity() if stride == 1
                                                    else FactorizedReduce(C, C, dim=dim, affine=affine)),
    "sep_conv_3x3": lambda C, stride, dim, affine: SepConv(C, C, 3, stride, 1, dim=dim, affine=affine),
    "sep_conv_5x5": lambda C, stride, dim, affine: SepConv(C, C, 5, stride, 2, dim=dim, affine=affine),
    "dil_conv_3x3": lambda C, stride, dim, affine: DilConv(C, C, 3, stride, 2, 2, dim=dim, affine=affine),
    "dil_conv_5x5": lambda C, stride, dim, affine: DilConv(C, C, 5, stride, 4, 2, dim=dim, affine=affine),
}


def make_op(name: str, C: int, stride: int = 1, *, dim: int = 2, affine: bool = True) -> nn.Module:
    """Build the operation ``name`` of :data:`PRIMITIVES` on ``C`` channels.

    Args:
        name: an operation name, e.g. ``"sep_conv_3x3"``.
        C: channels in and out.
        stride: 1, or 2 in a reduction cell.
        dim: 1 for ``(N, C, L)`` sequences, 2 for ``(N, C, H, W)`` images.
        affine: affine BatchNorm (``False`` in the search, ``True`` when retraining).

    Returns:
        An ``nn.Module`` mapping ``(N, C, *S)`` to ``(N, C, *S/stride)``.

    Example:
        >>> op = bl.nas.make_op("dil_conv_3x3", 16, dim=1)
        >>> op(torch.randn(8, 16, 40)).shape
        torch.Size([8, 16, 40])
    """
    fn = "bilevel.nas.make_op"
    check_dim(dim, fn)
    if name not in OPS:
        raise KeyError(f"{fn}: unknown operation {name!r}; expected one of {sorted(OPS)}.")
    if stride not in (1, 2):
        raise ValueError(f"{fn}: expected stride 1 or 2, got {stride!r}.")
    return OPS[name](C, stride, dim, affine)
