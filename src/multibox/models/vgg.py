"""VGG16 backbones for SSD300 / SSD512 (Simonyan & Zisserman 2015; Liu et al. 2016, §3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg_block(in_channels: int, widths: tuple[int, ...], bias: bool, relu: bool = True,
              batch_norm: bool = False) -> nn.Sequential:
    """One VGG16 stage: per width a 3x3 convolution (padding 1), then BatchNorm if ``batch_norm`` (eps 1e-5,
    PyTorch momentum 0.1: MindSpore's defaults, momentum 0.9, as the model zoo's ``ssd_vgg_bn``), then ReLU, or
    ``nn.Identity`` without ``relu`` (the tutorial's ``_make_layer``), which keeps the convolutions at indices
    0, 2, 4 (0, 3, 6 with BatchNorm) whether or not there is an activation.

    (N, in_channels, H, W) -> (N, widths[-1], H, W)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Conv2d(in_channels, width, 3, padding=1, bias=bias))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True) if relu else nn.Identity())
        in_channels = width
    return nn.Sequential(*layers)


def vgg16_blocks(bias: bool, relu: bool = True, batch_norm: bool = False) -> nn.ModuleList:
    """VGG16's five convolution blocks (13 3x3 convolutions, each followed by ReLU unless ``relu`` is false, with
    BatchNorm in between if ``batch_norm``; see :func:`vgg_block`), without the pools."""
    blocks, in_channels = [], 3
    for widths in VGG16_BLOCKS:
        blocks.append(vgg_block(in_channels, widths, bias=bias, relu=relu, batch_norm=batch_norm))
        in_channels = widths[-1]
    return nn.ModuleList(blocks)


class TutorialVGG16Backbone(nn.Module):
    """The MindSpore SSD300-VGG16 trunk, layer for layer: the tutorial's (SPEC §2) and the model zoo's
    (``official/cv/ssd``, ``src/vgg16.py`` and ``SSD300VGG16`` in ``src/ssd.py``), which differ only in the VGG
    stages.

    - ``relu=False``: the tutorial's text: its ``_make_layer`` stacks the 3x3 convolutions with no activation at
      all (VGG16 is then linear up to the max-pools). Convolutions at ``blocks.B.{0, 2, 4}`` (an identity between).
    - ``relu=True``: the model zoo's ``_make_layer``: a ReLU cell after each convolution.
    - ``batch_norm=True``: the zoo's ``ssd_vgg_bn`` option: conv -> BatchNorm2d (MindSpore's defaults) -> ReLU;
      convolutions at ``blocks.B.{0, 3, 6}``, BatchNorms at ``blocks.B.{1, 4, 7}``.

    In both sources MindSpore's ``nn.Conv2d`` has no bias by default, and there is no activation after fc6, fc7 or
    the extra layers; both are kept for fidelity (the paper preset fixes them). 2x2 'SAME' max-pools are
    ``ceil_mode=True`` here (300 -> 150 -> 75 -> 38 -> 19).

    Feature maps: (N, 512, 38, 38), (N, 1024, 19, 19), (N, 512, 10, 10), (N, 256, 5, 5), (N, 256, 3, 3),
    (N, 256, 1, 1).
    """

    out_channels = (512, 1024, 512, 256, 256, 256)

    def __init__(self, dropout: float = 0.5, relu: bool = True, batch_norm: bool = False):
        super().__init__()
        self.blocks = vgg16_blocks(bias=False, relu=relu, batch_norm=batch_norm)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.pool5 = nn.MaxPool2d(3, 1, padding=1)
        self.fc6 = nn.Conv2d(512, 1024, 3, padding=6, dilation=6, bias=False)
        self.fc7 = nn.Conv2d(1024, 1024, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.extras = nn.ModuleList([
            nn.Sequential(nn.Conv2d(1024, 256, 1, padding=1, bias=False), nn.Conv2d(256, 512, 3, stride=2, bias=False)),
            nn.Sequential(nn.Conv2d(512, 128, 1, padding=1, bias=False), nn.Conv2d(128, 256, 3, stride=2, bias=False)),
            nn.Sequential(nn.Conv2d(256, 128, 1, bias=False), nn.Conv2d(128, 256, 3, bias=False)),
            nn.Sequential(nn.Conv2d(256, 128, 1, bias=False), nn.Conv2d(128, 256, 3, bias=False)),
        ])

    def forward(self, x: Tensor) -> list[Tensor]:
        for block in self.blocks[:3]:
            x = self.pool(block(x))
        block4 = self.blocks[3](x)
        x = self.pool5(self.blocks[4](self.pool(block4)))
        x = self.dropout(self.fc7(self.dropout(self.fc6(x))))
        features = [block4, x]
        for extra in self.extras:
            x = extra(x)
            features.append(x)
        return features


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale (Liu et al. 2016, §3.1 "PASCAL VOC2007",
    after ParseNet): conv4_3's activations are much larger than the deeper maps', so they are normalised to unit
    length at each location and rescaled by ``scale`` (initialised to 20).

    (N, C, H, W) -> (N, C, H, W): ``scale[c] · x[:, c] / max(‖x[:, :, h, w]‖₂, eps)``.
    """

    def __init__(self, channels: int, initial_scale: float = 20.0, eps: float = 1e-12):
        super().__init__()
        self.initial_scale, self.eps = initial_scale, eps
        self.scale = nn.Parameter(torch.full((channels,), float(initial_scale)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.scale, self.initial_scale)

    def forward(self, x: Tensor) -> Tensor:
        # scale · normalize(x), in this order: the same arithmetic as torchvision's SSD, so converted weights give
        # bit-identical features.
        return self.scale.view(1, -1, 1, 1) * F.normalize(x, p=2.0, dim=1, eps=self.eps)


def extra_level(in_channels: int, mid_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2,
                padding: int = 1) -> nn.Sequential:
    """One extra feature level of the paper: 1x1 reduction + ReLU, then a k x k convolution + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 1), nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, kernel_size, stride=stride, padding=padding), nn.ReLU(inplace=True),
    )


class PaperVGG16Backbone(nn.Module):
    """The paper's SSD300 / SSD512 trunk (Liu et al. 2016, §2.2 and Fig. 2; the same function as torchvision's
    ``SSDFeatureExtractorVGG``; SPEC §3).

    VGG16 conv1_1 .. conv5_3 with biases and ReLU; 2x2 max-pools, the third one ``ceil_mode`` (75 -> 38 at 300);
    pool5 = 3x3 stride 1 padding 1; fc6 = 3x3 conv dilated 6 (512 -> 1024) + ReLU; fc7 = 1x1 (1024 -> 1024) + ReLU.
    Feature maps: L2Norm(conv4_3), fc7, then the extra levels (1x1 reduction + ReLU, k x k conv + ReLU):

    ========  ==========================================  ==========================================
    level     SSD300 (``highres=False``)                   SSD512 (``highres=True``)
    ========  ==========================================  ==========================================
    conv4_3   (N, 512, 38, 38)                             (N, 512, 64, 64)
    fc7       (N, 1024, 19, 19)                            (N, 1024, 32, 32)
    conv8_2   1024 -> 256 -> 512, 3x3 s2 p1: 10x10         same: 16x16
    conv9_2   512 -> 128 -> 256, 3x3 s2 p1: 5x5            same: 8x8
    conv10_2  256 -> 128 -> 256, 3x3 s1 p0: 3x3            3x3 s2 p1: 4x4
    conv11_2  256 -> 128 -> 256, 3x3 s1 p0: 1x1            3x3 s2 p1: 2x2
    conv12_2  —                                            256 -> 128 -> 256, 4x4 s1 p1: 1x1
    ========  ==========================================  ==========================================

    SSD512's extras follow the paper's released Caffe model (also mmdetection's and ssd.pytorch's SSD512).
    Dropout is not used (the paper's fc6/fc7 are convolutions without it, as in torchvision).
    """

    def __init__(self, highres: bool = False):
        super().__init__()
        self.blocks = vgg16_blocks(bias=True)
        self.pool = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.pool5 = nn.MaxPool2d(3, 1, padding=1)
        self.l2norm = L2Norm(512)
        self.fc6 = nn.Conv2d(512, 1024, 3, padding=6, dilation=6)
        self.fc7 = nn.Conv2d(1024, 1024, 1)
        self.relu = nn.ReLU(inplace=True)
        if highres:
            extras = [extra_level(1024, 256, 512), extra_level(512, 128, 256), extra_level(256, 128, 256),
                      extra_level(256, 128, 256), extra_level(256, 128, 256, kernel_size=4, stride=1, padding=1)]
        else:
            extras = [extra_level(1024, 256, 512), extra_level(512, 128, 256),
                      extra_level(256, 128, 256, stride=1, padding=0), extra_level(256, 128, 256, stride=1, padding=0)]
        self.extras = nn.ModuleList(extras)
        self.out_channels = (512, 1024, 512, 256, 256, 256) + ((256,) if highres else ())

    def trunk_convolutions(self) -> list[nn.Conv2d]:
        """conv1_1 .. conv5_3, the 13 convolutions that ImageNet VGG16 weights initialise."""
        return [m for block in self.blocks for m in block if isinstance(m, nn.Conv2d)]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.pool(self.blocks[0](x))
        x = self.pool(self.blocks[1](x))
        x = self.pool3(self.blocks[2](x))
        conv4_3 = self.blocks[3](x)
        x = self.pool5(self.blocks[4](self.pool(conv4_3)))
        x = self.relu(self.fc7(self.relu(self.fc6(x))))
        features = [self.l2norm(conv4_3), x]
        for extra in self.extras:
            x = extra(x)
            features.append(x)
        return features


def init_paper_ssd(model: nn.Module) -> None:
    """torchvision's initialisation of ``ssd300_vgg16`` (``model.init: xavier``): the VGG trunk as torchvision's
    VGG (He normal, fan-out), every other convolution (fc6, fc7, extras, heads) Xavier-uniform (as the paper's Caffe
    model), biases 0, the L2Norm scale 20."""
    trunk = set()
    for module in model.modules():
        if isinstance(module, PaperVGG16Backbone):
            trunk.update(id(conv) for conv in module.trunk_convolutions())
        elif isinstance(module, L2Norm):
            module.reset_parameters()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if id(module) in trunk:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def freeze_vgg16_stages(backbone: nn.Module, trainable: int) -> list[str]:
    """Freeze (``requires_grad = False``) the first ``5 - trainable`` of VGG16's five convolution stages (conv1_x,
    conv2_x, ...), as torchvision's ``_vgg_extractor(vgg16(), highres, trainable_layers)`` does with a pretrained
    backbone (4: conv1_1 and conv1_2 frozen; 0: all 13 convolutions; 5: none). fc6, fc7, the L2Norm scale and the
    extra levels always train. Returns the frozen parameters' names (in ``backbone``)."""
    stages = len(VGG16_BLOCKS)
    if not 0 <= trainable <= stages:
        raise ValueError(f"trainable VGG16 stages must be 0 .. {stages}, got {trainable}")
    frozen = []
    for index in range(stages - trainable):
        for name, parameter in backbone.blocks[index].named_parameters():
            parameter.requires_grad_(False)
            frozen.append(f"blocks.{index}.{name}")
    return frozen
