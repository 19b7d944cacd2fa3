"""MindSpore's (and TensorFlow's) ``pad_mode='same'`` for PyTorch convolutions and pools.

'same' gives ``ceil(in / stride)`` outputs and pads ``max((out - 1)·stride + (k - 1)·dilation + 1 - in, 0)`` in
total, the odd unit at the bottom / right. With stride 1 and an odd kernel that is PyTorch's symmetric
``padding=(k - 1)·dilation / 2``; with stride 2 on an even input it is one row and one column at the end only,
which no symmetric ``padding`` reproduces: networks ported from MindSpore compute other values at every strided
layer unless the padding is asymmetric, as here.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of one axis of length ``size`` under 'same'."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def pad_same(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int] = (1, 1),
             value: float = 0.0) -> Tensor:
    """(N, C, H, W) -> (N, C, H + ph, W + pw), padded for a 'same' convolution or pool."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1], dilation[1])
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with MindSpore's ``pad_mode='same'``: the same parameters (names and shapes) as
    ``nn.Conv2d(in, out, k, stride, groups=..., bias=...)``; the padding is computed from each input's size.
    (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, dilation=dilation,
                         groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride, self.dilation))
