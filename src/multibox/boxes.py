"""Pure box maths. Every name carries its format:

- ``xyxy``: (x1, y1, x2, y2) corners;
- ``cxcywh``: (centre x, centre y, width, height);
- ``yxyx``: (y1, x1, y2, x2) corners, the MindSpore tutorial's order;
- ``ltwh``: COCO's ``bbox`` field (left, top, width, height).

All functions accept any leading batch dimensions ``(..., 4)``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1), dim=-1)


def yxyx_to_xyxy(boxes: Tensor) -> Tensor:
    """Swap (y1, x1, y2, x2) <-> (x1, y1, x2, y2); the map is its own inverse."""
    return boxes[..., [1, 0, 3, 2]]


xyxy_to_yxyx = yxyx_to_xyxy


def xyxy_to_ltwh(boxes: Tensor) -> Tensor:
    return torch.cat((boxes[..., :2], boxes[..., 2:] - boxes[..., :2]), dim=-1)


def ltwh_to_xyxy(boxes: Tensor) -> Tensor:
    return torch.cat((boxes[..., :2], boxes[..., :2] + boxes[..., 2:]), dim=-1)


def area_xyxy(boxes: Tensor) -> Tensor:
    """Area of (..., 4) boxes; inverted boxes count as 0."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou_xyxy(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU.

    Args:
        boxes1: (..., N, 4) xyxy.
        boxes2: (..., M, 4) xyxy, broadcastable with ``boxes1`` over the leading dimensions.
    Returns:
        (..., N, M) IoU; 0 where the union is empty (degenerate boxes never produce NaN).
    """
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_xyxy(boxes1)[..., :, None] + area_xyxy(boxes2)[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def encode_cxcywh(boxes: Tensor, anchors: Tensor, center_variance: float, size_variance: float) -> Tensor:
    """SSD regression targets (Liu et al. 2016, eq. 2) with the usual variances.

    Args:
        boxes: (..., A, 4) ground-truth boxes, cxcywh.
        anchors: (A, 4) default boxes, cxcywh.
    Returns:
        (..., A, 4) offsets (dx, dy, dw, dh): centre offsets divided by ``center_variance * anchor size``,
        log size ratios divided by ``size_variance``. The ratio is floored at 1e-6 as the tutorial does, so a
        degenerate box gives a large but finite target instead of -inf.
    """
    dxy = (boxes[..., :2] - anchors[:, :2]) / (center_variance * anchors[:, 2:])
    dwh = torch.log((boxes[..., 2:] / anchors[:, 2:]).clamp(min=1e-6)) / size_variance
    return torch.cat((dxy, dwh), dim=-1)


def decode_cxcywh(offsets: Tensor, anchors: Tensor, center_variance: float, size_variance: float,
                  max_log_ratio: float | None = None) -> Tensor:
    """Inverse of :func:`encode_cxcywh`: (..., A, 4) offsets -> (..., A, 4) cxcywh boxes.

    ``max_log_ratio`` clamps the log size ratio before ``exp`` so random weights cannot overflow
    (torchvision uses log(1000/16)).
    """
    xy = offsets[..., :2] * center_variance * anchors[:, 2:] + anchors[:, :2]
    log_wh = offsets[..., 2:] * size_variance
    if max_log_ratio is not None:
        log_wh = log_wh.clamp(max=max_log_ratio)
    wh = torch.exp(log_wh) * anchors[:, 2:]
    return torch.cat((xy, wh), dim=-1)
