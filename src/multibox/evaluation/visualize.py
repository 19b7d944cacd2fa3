"""Drawing detections onto images."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor
from torchvision.utils import draw_bounding_boxes

# Distinct colours cycled by label (tab10).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def draw_detections(image: Tensor, detections: dict[str, Tensor], class_names: Sequence[str]) -> Tensor:
    """(3, H, W) uint8 image + detections in its pixels -> annotated (3, H, W) uint8 image."""
    labels = detections["labels"].tolist()
    captions = [f"{class_names[lab]} {score:.2f}" for lab, score in zip(labels, detections["scores"].tolist())]
    colours = [PALETTE[lab % len(PALETTE)] for lab in labels]
    return draw_bounding_boxes(image, detections["boxes"].float(), labels=captions, colors=colours, width=2)
