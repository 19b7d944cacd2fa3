"""SSDLite's MobileNetV3-Large trunk (Howard et al. 2019, §6.3; Sandler et al. 2018, §6.2 "SSDLite"), the same
function and parameter names as torchvision's ``ssdlite320_mobilenet_v3_large`` feature extractor.

The trunk is torchvision's own ``mobilenet_v3_large`` (a library model, so that its ImageNet weights load by name);
the SSD feature split and the extra levels are built here as torchvision's ``SSDLiteFeatureExtractorMobileNet``
builds them.
"""
from __future__ import annotations

from functools import partial

from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large
from torchvision.ops.misc import Conv2dNormActivation

# torchvision's SSDLite: BatchNorm eps 1e-3, momentum 0.03 everywhere (trunk, extras, heads).
SSDLITE_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


def ssdlite_extra_level(in_channels: int, out_channels: int) -> nn.Sequential:
    """One extra level (MobileNetV2 §6.2): 1x1 to out/2, depthwise 3x3 stride 2, 1x1 to out; BN + ReLU6 after each.
    (N, C_in, H, W) -> (N, C_out, ceil(H / 2), ceil(W / 2))."""
    mid = out_channels // 2
    block = partial(Conv2dNormActivation, norm_layer=SSDLITE_NORM, activation_layer=nn.ReLU6)
    return nn.Sequential(block(in_channels, mid, kernel_size=1),
                         block(mid, mid, kernel_size=3, stride=2, groups=mid),
                         block(mid, out_channels, kernel_size=1))


def c4_position(features: nn.Sequential) -> int:
    """Index of the last strided block before the final layer (C4; 13 in MobileNetV3-Large), where torchvision splits
    the trunk: the first feature map is that block's expansion layer (stride 16)."""
    strided = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
    return strided[-1]


class SSDLiteMobileNetV3Backbone(nn.Module):
    """MobileNetV3-Large split at C4's expansion layer, then four extra levels.

    Args:
        reduced_tail: halve the channels of the last stage (MobileNetV3 §6.3, Table 6), as torchvision does when no
            ImageNet weights are loaded (its COCO model); ImageNet weights need the full tail.
        width_mult: MobileNetV3's width multiplier (1.0: torchvision's model).

    Feature maps at 320x320 (reduced tail): (N, 672, 20, 20), (N, 480, 10, 10), (N, 512, 5, 5), (N, 256, 3, 3),
    (N, 256, 2, 2), (N, 128, 1, 1); with the full tail the second has 960 channels. State-dict names are
    torchvision's (``features.0.*``, ``features.1.*``, ``extra.K.*``).
    """

    def __init__(self, reduced_tail: bool = True, width_mult: float = 1.0):
        super().__init__()
        trunk = mobilenet_v3_large(weights=None, norm_layer=SSDLITE_NORM, reduced_tail=reduced_tail,
                                   width_mult=width_mult).features
        c4 = c4_position(trunk)
        if trunk[c4].use_res_connect:
            raise ValueError("MobileNetV3's C4 block must be strided (no residual) to split at its expansion")
        self.features = nn.Sequential(
            nn.Sequential(*trunk[:c4], trunk[c4].block[0]),          # up to C4's expansion layer: stride 16
            nn.Sequential(trunk[c4].block[1:], *trunk[c4 + 1:]),     # C4's depthwise to the end: stride 32
        )
        depth = lambda d: max(16, int(d * width_mult))  # noqa: E731  (torchvision's min_depth 16)
        last = trunk[-1].out_channels
        self.extra = nn.ModuleList([ssdlite_extra_level(last, depth(512)), ssdlite_extra_level(depth(512), depth(256)),
                                    ssdlite_extra_level(depth(256), depth(256)),
                                    ssdlite_extra_level(depth(256), depth(128))])
        self.out_channels = (trunk[c4].block[0].out_channels, last, depth(512), depth(256), depth(256), depth(128))

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for block in (*self.features, *self.extra):
            x = block(x)
            features.append(x)
        return features

