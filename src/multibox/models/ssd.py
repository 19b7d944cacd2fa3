"""The SSD meta-architecture: a backbone giving K feature maps, one loc and one cls head per map, default boxes.

``forward`` returns raw tensors only; matching, loss and postprocessing are separate objects.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


def separable_head(in_channels: int, out_channels: int) -> nn.Sequential:
    """The tutorial's head: depthwise 3x3 (no bias) -> BatchNorm -> ReLU6 -> 1x1 conv with bias.

    MindSpore's BatchNorm momentum 0.97 weights the running value; PyTorch's momentum weights the new batch (0.03).
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels, eps=1e-3, momentum=0.03),
        nn.ReLU6(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1),
    )


def conv_head(in_channels: int, out_channels: int) -> nn.Conv2d:
    """The paper's head: one 3x3 convolution with bias."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


HEADS = {"separable": separable_head, "conv": conv_head}


def flatten_levels(outputs: Sequence[Tensor], values_per_anchor: int) -> Tensor:
    """[(N, k_i·D, H_i, W_i)] -> (N, Σ H_i·W_i·k_i, D), rows ordered level, row, column, anchor (NHWC)."""
    n = outputs[0].shape[0]
    return torch.cat([o.permute(0, 2, 3, 1).reshape(n, -1, values_per_anchor) for o in outputs], dim=1)


class SSD(nn.Module):
    """Single Shot MultiBox Detector (Liu et al. 2016).

    Args:
        backbone: module mapping (N, 3, S, S) images to a list of K feature maps.
        feature_channels: channels of each feature map.
        boxes_per_location: default boxes per location on each map.
        num_classes: object classes, background excluded (the cls heads predict 1 + num_classes values).
        anchors_cxcywh: (A, 4) default boxes normalised to [0, 1], kept as a buffer so they follow ``.to(device)``.
        head: "conv" or "separable" (one loc and one cls head per level: ``loc_heads.K``, ``cls_heads.K``), or a
            module mapping the K feature maps to K loc maps (N, k_i·4, H_i, W_i) and K cls maps (N, k_i·(1 + C),
            H_i, W_i) with a ``cls_predictor`` conv, kept as ``head`` (the weight-shared towers of
            :class:`multibox.models.shared_head.WeightSharedHead`; ``loc_heads`` / ``cls_heads`` are then empty).
    """

    def __init__(self, backbone: nn.Module, feature_channels: Sequence[int], boxes_per_location: Sequence[int],
                 num_classes: int, anchors_cxcywh: Tensor, head: str | nn.Module = "conv"):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = head if isinstance(head, nn.Module) else None
        make_head = None if self.head is not None else HEADS[head]
        self.loc_heads = nn.ModuleList(
            () if make_head is None else (make_head(c, k * 4) for c, k in zip(feature_channels, boxes_per_location)))
        self.cls_heads = nn.ModuleList(
            () if make_head is None else
            (make_head(c, k * (num_classes + 1)) for c, k in zip(feature_channels, boxes_per_location)))
        # Not persistent: anchors derive from the config, so state dicts hold learned weights only.
        self.register_buffer("anchors_cxcywh", anchors_cxcywh, persistent=False)

    @torch.no_grad()
    def init_class_prior(self, prior: float) -> None:
        """Start every anchor at background probability 1 - ``prior`` and object probabilities ``prior`` under
        sigmoid scores (Lin et al. 2017, §4.1), so the first steps are not spent silencing 8732·(1 + C) logits."""
        logit = math.log((1 - prior) / prior)
        for last in self.class_layers():
            bias = last.bias.view(-1, self.num_classes + 1)
            bias[:, 0] = logit
            bias[:, 1:] = -logit

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 3, S, S) normalised images -> loc (N, A, 4) offsets and cls (N, A, 1 + C) logits."""
        features = self.backbone(images)
        if self.head is not None:
            loc_maps, cls_maps = self.head(features)
        else:
            loc_maps = [h(f) for h, f in zip(self.loc_heads, features)]
            cls_maps = [h(f) for h, f in zip(self.cls_heads, features)]
        return flatten_levels(loc_maps, 4), flatten_levels(cls_maps, self.num_classes + 1)

    def class_layers(self) -> list[nn.Conv2d]:
        """The convolutions whose k·(1 + C) output channels are class logits (anchor-major): the last layer of each
        level's cls head, or the one predictor a weight-shared head applies to every level."""
        if self.head is not None:
            return [self.head.cls_predictor]
        return [head[-1] if isinstance(head, nn.Sequential) else head for head in self.cls_heads]
