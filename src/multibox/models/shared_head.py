"""The weight-shared box / class towers of the MindSpore model zoo's SSD-FPN detectors (RetinaNet-style).

Source: mindspore model_zoo/official/cv/ssd/src/ssd.py, ``WeightSharedMultiBox`` (``loc_cls_shared_addition=False``)
with ``ConvBNReLU(..., shared_conv=...)``: a loc and a cls tower of ``num_layers`` 3x3 convolutions (with bias),
each convolution's weight and bias shared by every level while each level has its own BatchNorm (eps 1e-3,
MindSpore momentum 0.97 = PyTorch 0.03) after it, then ReLU6; one 3x3 predictor per tower (with bias), shared by
all levels too. So every level must have the same channels and the same boxes per location.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class WeightSharedHead(nn.Module):
    """Maps K feature maps (N, C, H_i, W_i) to K loc maps (N, k·4, H_i, W_i) and K cls maps (N, k·(1 + C'),
    H_i, W_i), with ``loc_tower.j`` / ``cls_tower.j`` (shared convs), ``loc_norms.i.j`` / ``cls_norms.i.j``
    (level i's BatchNorm after layer j), ``loc_predictor`` / ``cls_predictor`` (shared).

    Args:
        channels: channels of every feature map (and of the towers).
        num_levels: K.
        boxes_per_location: k, the same on every level.
        num_outputs_per_box: 1 + C' class logits per box (background included).
        num_layers: tower depth (the zoo's ``num_addition_layers``: 4).
    """

    def __init__(self, channels: int, num_levels: int, boxes_per_location: int, num_outputs_per_box: int,
                 num_layers: int = 4):
        super().__init__()
        self.num_levels = num_levels
        self.boxes_per_location = boxes_per_location
        self.loc_tower = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_layers))
        self.cls_tower = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_layers))
        self.loc_norms = self._norms(channels, num_levels, num_layers)
        self.cls_norms = self._norms(channels, num_levels, num_layers)
        self.loc_predictor = nn.Conv2d(channels, boxes_per_location * 4, 3, padding=1)
        self.cls_predictor = nn.Conv2d(channels, boxes_per_location * num_outputs_per_box, 3, padding=1)
        self.relu = nn.ReLU6(inplace=True)

    @staticmethod
    def _norms(channels: int, num_levels: int, num_layers: int) -> nn.ModuleList:
        return nn.ModuleList(
            nn.ModuleList(nn.BatchNorm2d(channels, eps=1e-3, momentum=0.03) for _ in range(num_layers))
            for _ in range(num_levels))

    def _tower(self, x: Tensor, convs: nn.ModuleList, norms: nn.ModuleList) -> Tensor:
        for conv, norm in zip(convs, norms):
            x = self.relu(norm(conv(x)))
        return x

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if len(features) != self.num_levels:
            raise ValueError(f"WeightSharedHead has {self.num_levels} levels, got {len(features)} feature maps")
        loc = [self.loc_predictor(self._tower(f, self.loc_tower, n)) for f, n in zip(features, self.loc_norms)]
        cls = [self.cls_predictor(self._tower(f, self.cls_tower, n)) for f, n in zip(features, self.cls_norms)]
        return loc, cls
