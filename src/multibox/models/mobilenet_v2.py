"""The MindSpore model zoo's SSD300 trunk: MobileNetV2 (Sandler et al. 2018) with the zoo's feature split and its
inverted-residual extra levels (mindspore-ai/mindspore, model_zoo/official/cv/ssd/src/ssd.py: ``SSDWithMobileNetV2``,
``InvertedResidual``, ``SSD300``; config/ssd300_config.yaml).

MindSpore's defaults decide the arithmetic: its ``nn.Conv2d`` has no bias unless asked and pads 'same', which at
stride 2 on an even input pads the bottom / right only (:class:`~multibox.models.same_padding.Conv2dSame`; stride-1
3x3 'same' is PyTorch's symmetric ``padding=1``). Every BatchNorm is the zoo's ``_bn``: eps 1e-3, MindSpore momentum
0.97 (= PyTorch momentum 0.03).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from multibox.models.same_padding import Conv2dSame

# MobileNetV2's inverted-residual stages (t: expansion, c: channels, n: blocks, s: stride of the first block),
# Sandler et al. 2018, Table 2 (the zoo's ``inverted_residual_setting`` at width 1.0).
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1))
STEM_CHANNELS, LAST_CHANNELS = 32, 1280
# The zoo cuts the trunk after the stem and 13 inverted residuals (``features_1 = features[:14]``): that output,
# (N, 96, 19, 19) at 300x300, feeds a separate 1x1 expansion (``expand_layer_conv_13``, 96 -> 576) whose output is
# the first feature map; the rest of the trunk (``features_2``) gives the second, (N, 1280, 10, 10).
SPLIT = 14
EXPAND_13_CHANNELS = 576
# The extra levels, ``SSD300``'s ``multi_residual``: (in, out, stride, expansion) from extras_in_channels[2:],
# extras_out_channels[2:], extras_strides[2:], extras_ratio[2:] of ssd300_config.yaml; 10 -> 5 -> 3 -> 2 -> 1.
EXTRAS = ((1280, 512, 2, 0.2), (512, 256, 2, 0.25), (256, 256, 2, 0.5), (256, 128, 2, 0.25))


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """The zoo's ``_bn``: eps 1e-3, MindSpore momentum 0.97 weighting the running value (PyTorch 0.03)."""
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.03)


def conv_same(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free convolution with MindSpore's 'same' padding: asymmetric (:class:`Conv2dSame`) at stride 2,
    PyTorch's symmetric padding otherwise (the same values for odd kernels at stride 1)."""
    if stride != 1:
        return Conv2dSame(in_channels, out_channels, kernel_size, stride, groups=groups, bias=False)
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False)


def conv_bn_relu6(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                  depthwise: bool = False) -> nn.Sequential:
    """The zoo's ``ConvBNReLU``: 'same' conv (no bias) -> BatchNorm -> ReLU6; ``depthwise`` groups by channel
    (then ``out_channels`` must equal ``in_channels``). (N, C_in, H, W) -> (N, C_out, ceil(H/s), ceil(W/s))."""
    if depthwise and in_channels != out_channels:
        raise ValueError(f"a depthwise convolution keeps its channels, got {in_channels} -> {out_channels}")
    groups = in_channels if depthwise else 1
    return nn.Sequential(conv_same(in_channels, out_channels, kernel_size, stride, groups), batch_norm(out_channels),
                         nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """The zoo's ``InvertedResidual`` (MobileNetV2's block): [1x1 expansion ConvBNReLU6 unless t = 1] -> 3x3
    depthwise ConvBNReLU6 (stride s) -> 1x1 linear projection (no bias) -> BatchNorm; the input is added when
    s = 1 and the channels agree; ``last_relu`` (the zoo's extra levels) applies ReLU6 after that.

    The hidden width is ``round(in · t)`` as the zoo computes it (t may be fractional: the extras' 0.2, 0.25, 0.5).
    (N, C_in, H, W) -> (N, C_out, ceil(H/s), ceil(W/s)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: float,
                 last_relu: bool = False):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(in_channels * expand_ratio))
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_channels, hidden, kernel_size=1))
        layers += [conv_bn_relu6(hidden, hidden, stride=stride, depthwise=True),
                   nn.Conv2d(hidden, out_channels, 1, bias=False), batch_norm(out_channels)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.last_relu = nn.ReLU6(inplace=True) if last_relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.use_residual:
            y = y + x
        return self.last_relu(y)


def mobilenet_v2_features(stages: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_STAGES) -> nn.Sequential:
    """MobileNetV2's feature layers at width 1.0: stem 3x3 s2 ConvBNReLU6 (3 -> 32), the 17 inverted residuals
    of ``stages``, and the final 1x1 ConvBNReLU6 (320 -> 1280): 19 modules, indices as the zoo's ``features``.
    (N, 3, 300, 300) -> (N, 1280, 10, 10)."""
    layers: list[nn.Module] = [conv_bn_relu6(3, STEM_CHANNELS, stride=2)]
    channels = STEM_CHANNELS
    for t, c, n, s in stages:
        for i in range(n):
            layers.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
            channels = c
    layers.append(conv_bn_relu6(channels, LAST_CHANNELS, kernel_size=1))
    return nn.Sequential(*layers)


class SSDMobileNetV2Backbone(nn.Module):
    """The zoo's ``SSD300`` feature extractor on ``SSDWithMobileNetV2`` (ssd.py; SPEC §1 ``ssd300-mobilenet-v2``).

    Feature maps at 300x300 (channels = extras_out_channels of ssd300_config.yaml):

    =====  ==================================================================  ====================
    level  layer                                                               shape
    =====  ==================================================================  ====================
    0      ``expand_13``: 1x1 ConvBNReLU6 96 -> 576 on ``features[:14]``'s output   (N, 576, 19, 19)
    1      ``features[14:]`` (4 inverted residuals, 1x1 320 -> 1280)           (N, 1280, 10, 10)
    2-5    ``extras``: inverted residuals, stride 2, ReLU6 after each          512x5x5, 256x3x3,
                                                                               256x2x2, 128x1x1
    =====  ==================================================================  ====================

    ``expand_13`` is a layer of its own, not block 13's expansion (which it mirrors in shape): the zoo keeps both.
    """

    out_channels = (EXPAND_13_CHANNELS, LAST_CHANNELS) + tuple(out for _, out, _, _ in EXTRAS)

    def __init__(self):
        super().__init__()
        self.features = mobilenet_v2_features()
        split_channels = MOBILENET_V2_STAGES[4][1]     # the 96-wide stage ends at index 13
        self.expand_13 = conv_bn_relu6(split_channels, EXPAND_13_CHANNELS, kernel_size=1)
        self.extras = nn.ModuleList(InvertedResidual(c_in, c_out, s, t, last_relu=True)
                                    for c_in, c_out, s, t in EXTRAS)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(N, 3, S, S) normalised images -> the six feature maps of the table above."""
        x = self.features[:SPLIT](x)
        features = [self.expand_13(x)]
        x = self.features[SPLIT:](x)
        features.append(x)
        for extra in self.extras:
            x = extra(x)
            features.append(x)
        return features
