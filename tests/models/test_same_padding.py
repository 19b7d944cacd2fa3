"""MindSpore's pad_mode='same' (multibox.models.same_padding) against hand-computed paddings and PyTorch's own
``padding="same"`` (stride 1 only, which PyTorch supports)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multibox.models.same_padding import Conv2dSame, same_padding


@pytest.mark.parametrize("size, kernel, stride, dilation, expected", [
    (300, 3, 2, 1, (0, 1)),     # out 150: (149·2 + 3) - 300 = 1, at the end
    (320, 3, 2, 1, (0, 1)),
    (75, 3, 2, 1, (1, 1)),      # odd input: out 38, (37·2 + 3) - 75 = 2
    (19, 1, 2, 1, (0, 0)),
    (38, 3, 1, 1, (1, 1)),
    (10, 3, 1, 6, (6, 6)),      # dilated: effective kernel 13
    (8, 4, 1, 1, (1, 2)),       # even kernel: the odd unit at the end
    (5, 7, 2, 1, (3, 3)),       # out 3: (2·2 + 7) - 5 = 6
])
def test_same_padding_by_hand(size, kernel, stride, dilation, expected):
    assert same_padding(size, kernel, stride, dilation) == expected


@pytest.mark.parametrize("kernel, dilation", [(3, 1), (4, 1), (3, 2), (5, 1)])
def test_stride_1_equals_pytorchs_same_padding(kernel, dilation):
    torch.manual_seed(0)
    ours = Conv2dSame(4, 6, kernel, dilation=dilation)
    ref = nn.Conv2d(4, 6, kernel, padding="same", dilation=dilation)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 11, 14)
    torch.testing.assert_close(ours(x), ref(x))


def test_stride_2_pads_bottom_and_right_only():
    """An even input under a 3x3 stride-2 'same' convolution: one zero row and column at the end, none before
    (PyTorch's symmetric padding=1 gives the same shape but other values)."""
    torch.manual_seed(1)
    ours = Conv2dSame(3, 5, 3, stride=2, groups=1, bias=False)
    x = torch.randn(1, 3, 10, 12)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), ours.weight, stride=2)
    assert ours(x).shape == (1, 5, 5, 6)
    torch.testing.assert_close(ours(x), expected)
    symmetric = F.conv2d(x, ours.weight, stride=2, padding=1)
    assert symmetric.shape == expected.shape and not torch.allclose(symmetric, expected)
    assert list(ours.state_dict()) == ["weight"]   # nn.Conv2d's names: checkpoints map onto it unchanged
