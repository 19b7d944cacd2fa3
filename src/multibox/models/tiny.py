"""A narrow backbone with SSD300's feature-map layout (38, 19, 10, 5, 3, 1 at 300x300), for demos and tests."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Module):
    """Eight widths ``w``: stem 300 -> 150 (w0) -> 75 (w1), then feature maps 38 (w2), 19 (w3), 10 (w4),
    5 (w5), 3 (w6), 1 (w7). The two finest maps get a second 3x3 convolution for more context."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        if len(widths) != 8:
            raise ValueError(f"tiny backbone needs 8 widths, got {list(widths)}")
        w = list(widths)
        self.out_channels = tuple(w[2:])
        self.stem = nn.Sequential(conv_bn_relu(3, w[0], 2), conv_bn_relu(w[0], w[1], 2), conv_bn_relu(w[1], w[1]))
        self.levels = nn.ModuleList([
            nn.Sequential(conv_bn_relu(w[1], w[2], 2), conv_bn_relu(w[2], w[2])),   # 38
            nn.Sequential(conv_bn_relu(w[2], w[3], 2), conv_bn_relu(w[3], w[3])),   # 19
            conv_bn_relu(w[3], w[4], 2),                                              # 10
            conv_bn_relu(w[4], w[5], 2),                                              # 5
            conv_bn_relu(w[5], w[6], 1, padding=0),                                   # 3
            conv_bn_relu(w[6], w[7], 1, padding=0),                                   # 1
        ])

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features
