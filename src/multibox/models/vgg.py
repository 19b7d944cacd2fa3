"""VGG16 backbones for SSD300 (Simonyan & Zisserman 2015; Liu et al. 2016, §3)."""
from __future__ import annotations

from torch import Tensor, nn

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg_block(in_channels: int, widths: tuple[int, ...], bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=bias), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)


class TutorialVGG16Backbone(nn.Module):
    """The tutorial's SSD300 trunk, layer for layer (SPEC §2).

    MindSpore's ``nn.Conv2d`` has no bias by default, and the tutorial puts no activation after fc6, fc7 or the
    extra layers; both are kept for fidelity (the paper preset fixes them). 2x2 'SAME' max-pools are
    ``ceil_mode=True`` here (300 -> 150 -> 75 -> 38 -> 19).

    Feature maps: (N, 512, 38, 38), (N, 1024, 19, 19), (N, 512, 10, 10), (N, 256, 5, 5), (N, 256, 3, 3),
    (N, 256, 1, 1).
    """

    out_channels = (512, 1024, 512, 256, 256, 256)

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        blocks, in_channels = [], 3
        for widths in VGG16_BLOCKS:
            blocks.append(vgg_block(in_channels, widths, bias=False))
            in_channels = widths[-1]
        self.blocks = nn.ModuleList(blocks)
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
