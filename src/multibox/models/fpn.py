"""The feature extractors of the MindSpore model zoo's SSD-FPN detectors (640x640): MobileNetV1 or ResNet50, an FPN
top-down pathway over strides 8/16/32 and two strided "bottom-up" levels (strides 64, 128), 256 channels each.

Source: mindspore model_zoo/official/cv/ssd/src/fpn.py (``FpnTopDown``, ``BottomUp``, ``MobileNetV1Fpn``,
``ResNetV1Fpn``), src/mobilenet_v1.py, src/resnet.py. MindSpore's convolutions pad 'same': at stride 2 on the even
inputs of a 640 image that is one row / column at the bottom / right only (:class:`Conv2dSame`); at stride 1 with
odd kernels it is PyTorch's symmetric padding. Module names follow the zoo's cells so that a checkpoint maps by
name (multibox/interop/mindspore_fpn.py). ResNet50 here is the zoo's, not torchvision's: no conv biases either, but
BatchNorm eps 1e-3 and 'same' padding (7x7 / stride 2 pads 2 before and 3 after; the max-pool 0 / 1).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multibox.models.same_padding import Conv2dSame, pad_same


def same_conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    """A MindSpore 'same' convolution: symmetric padding where that is exact (stride 1, odd kernel), else
    :class:`Conv2dSame`. (N, c_in, H, W) -> (N, c_out, ceil(H / stride), ceil(W / stride))."""
    if stride == 1 and kernel % 2 == 1:
        return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=bias)
    return Conv2dSame(c_in, c_out, kernel, stride, groups=groups, bias=bias)


def conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int = 1, depthwise: bool = False) -> nn.Sequential:
    """mobilenet_v1.py's ``conv_bn_relu``: conv without bias -> BatchNorm (MindSpore's defaults eps 1e-5, momentum
    0.9 = PyTorch momentum 0.1) -> ReLU6. Parameters ``0.weight``, ``1.*``."""
    return nn.Sequential(same_conv(c_in, c_out, kernel, stride, groups=c_in if depthwise else 1),
                         nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.1), nn.ReLU6(inplace=True))


# (in, out, stride) of MobileNetV1's 13 depthwise-separable pairs, after Conv0 (3 -> 32, stride 2).
MOBILENET_V1_PAIRS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
                      (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2),
                      (1024, 1024, 1)]


class MobileNetV1Trunk(nn.Module):
    """MobileNetV1 (``MobileNetV1(features_only=True)``): ``network.0`` is Conv0, ``network.2i-1`` / ``network.2i``
    the depthwise / pointwise convolutions of pair i. (N, 3, 640, 640) -> the outputs of layers 10, 22, 26
    (Conv5/11/13 pointwise): (N, 256, 80, 80), (N, 512, 40, 40), (N, 1024, 20, 20)."""

    taps = (10, 22, 26)
    out_channels = [256, 512, 1024]

    def __init__(self):
        super().__init__()
        layers = [conv_bn_relu6(3, 32, 3, 2)]
        for c_in, c_out, stride in MOBILENET_V1_PAIRS:
            layers += [conv_bn_relu6(c_in, c_in, 3, stride, depthwise=True), conv_bn_relu6(c_in, c_out, 1)]
        self.network = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.network[:self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


def _bn_resnet(channels: int) -> nn.BatchNorm2d:
    """resnet.py's ``_bn``: eps 1e-3, MindSpore momentum 0.997 (PyTorch 0.003)."""
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.003)


class Bottleneck(nn.Module):
    """resnet.py's ``ResidualBlock`` (expansion 4, the stride on the 3x3 as in ResNet v1.5), convolutions without
    bias; a projection shortcut ``down_sample_layer`` (1x1, stride s, BN) when the stride or width changes.
    (N, c_in, H, W) -> (N, c_out, H / s, W / s)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        mid = c_out // 4
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = _bn_resnet(mid)
        self.conv2 = same_conv(mid, mid, 3, stride)
        self.bn2 = _bn_resnet(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = _bn_resnet(c_out)
        self.down_sample_layer = None
        if stride != 1 or c_in != c_out:
            # A 1x1 'same' conv at stride 2 on an even input needs no padding: PyTorch's strided 1x1 is exact.
            self.down_sample_layer = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _bn_resnet(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.down_sample_layer is None else self.down_sample_layer(x)
        return F.relu(out + identity)


class ResNet50Trunk(nn.Module):
    """resnet.py's ``resnet50()``: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool ('same'), stages of 3, 4, 6, 3 bottlenecks.
    (N, 3, 640, 640) -> c3, c4, c5: (N, 512, 80, 80), (N, 1024, 40, 40), (N, 2048, 20, 20)."""

    out_channels = [512, 1024, 2048]

    def __init__(self):
        super().__init__()
        self.conv1 = Conv2dSame(3, 64, 7, 2, bias=False)
        self.bn1 = _bn_resnet(64)
        stages = [(3, 64, 256, 1), (4, 256, 512, 2), (6, 512, 1024, 2), (3, 1024, 2048, 2)]
        for i, (n, c_in, c_out, stride) in enumerate(stages):
            blocks = [Bottleneck(c_in, c_out, stride)] + [Bottleneck(c_out, c_out) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        # 'same' max-pool: pads with -inf (0 before, 1 after at even sizes), so padding never wins.
        x = F.max_pool2d(pad_same(x, (3, 3), (2, 2), value=float("-inf")), 3, 2)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


def resize_bilinear_legacy(x: Tensor, size: Sequence[int]) -> Tensor:
    """MindSpore's ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False; TensorFlow 1's legacy
    rule): output pixel i samples input coordinate i·in/out, clamped at the last pixel; PyTorch's ``interpolate``
    uses half-pixel centres instead and gives other values. (N, C, h, w) -> (N, C, *size)."""
    out = x
    for dim, (n_in, n_out) in ((2, (x.shape[2], size[0])), (3, (x.shape[3], size[1]))):
        src = torch.arange(n_out, device=x.device, dtype=torch.float64) * (n_in / n_out)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = (src - lo).to(x.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = n_out
        out = out.index_select(dim, lo) * (1 - frac.view(shape)) + out.index_select(dim, hi) * frac.view(shape)
    return out


class FPNTopDown(nn.Module):
    """fpn.py's ``FpnTopDown``: 1x1 lateral convs with bias, top-down sum (legacy bilinear upsampling of the coarser
    merged map to the finer size), then a 3x3 conv-BN-ReLU6 per level. Features finest first, same order out,
    ``out_channels`` each."""

    def __init__(self, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        self.lateral_convs_list = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs_list = nn.ModuleList(conv_bn_relu6(out_channels, out_channels, 3) for _ in in_channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs_list, features)]
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            merged.append(resize_bilinear_legacy(merged[-1], lateral.shape[-2:]) + lateral)
        # merged is coarsest first; the zoo applies fpn_convs_list[i] to the i-th finest.
        return [conv(m) for conv, m in zip(self.fpn_convs_list, reversed(merged))]


class FPNBackbone(nn.Module):
    """A trunk (``body``: :class:`MobileNetV1Trunk` or :class:`ResNet50Trunk`), :class:`FPNTopDown` to 256 channels
    and ``levels`` extra 3x3 stride-2 conv-BN-ReLU6 levels (fpn.py's ``BottomUp``, each on the previous one).
    (N, 3, 640, 640) -> 5 maps of (N, 256, S, S), S = 80, 40, 20, 10, 5."""

    def __init__(self, body: nn.Module, channels: int = 256, levels: int = 2):
        super().__init__()
        self.body = body
        self.fpn = FPNTopDown(body.out_channels, channels)
        self.bottom_up = nn.ModuleList(conv_bn_relu6(channels, channels, 3, 2) for _ in range(levels))
        self.out_channels = [channels] * (len(body.out_channels) + levels)

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.fpn(self.body(images))
        for block in self.bottom_up:
            features.append(block(features[-1]))
        return features


# model.arch -> trunk of the zoo's SSD-FPN detectors.
FPN_TRUNKS = {"ssd640_mobilenet_v1_fpn": MobileNetV1Trunk, "ssd640_resnet50_fpn": ResNet50Trunk}


def build_fpn_backbone(arch: str) -> FPNBackbone:
    return FPNBackbone(FPN_TRUNKS[arch]())
