"""Pure box maths. Every name carries its format:

- ``xyxy``: (x1, y1, x2, y2) corners;
- ``cxcywh``: (centre x, centre y, width, height);
- ``yxyx``: (y1, x1, y2, x2) corners, the MindSpore tutorial's order;
- ``ltwh``: COCO's ``bbox`` field (left, top, width, height).

All functions accept any leading batch dimensions ``(..., 4)``. The format converters (``*_to_*``) take a torch
tensor or a numpy array and return the same kind, dtype kept (the data layer's float64 COCO maths stays in
numpy); the box-pair functions (area, IoU, encode / decode) are tensor-only.
"""
from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

#: A (..., 4) box array: a torch tensor or a numpy array (a converter returns the kind it was given).
Boxes = TypeVar("Boxes", Tensor, np.ndarray)


def _stack_last(parts: tuple, like: Boxes) -> Boxes:
    return np.stack(parts, axis=-1) if isinstance(like, np.ndarray) else torch.stack(parts, dim=-1)


def _cat_last(parts: tuple, like: Boxes) -> Boxes:
    return np.concatenate(parts, axis=-1) if isinstance(like, np.ndarray) else torch.cat(parts, dim=-1)


def _columns(boxes: Boxes) -> tuple:
    """The four (...) coordinate columns of (..., 4) boxes."""
    return tuple(np.moveaxis(boxes, -1, 0)) if isinstance(boxes, np.ndarray) else boxes.unbind(-1)


def cxcywh_to_xyxy(boxes: Boxes) -> Boxes:
    """(..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = _columns(boxes)
    return _stack_last((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), boxes)


def xyxy_to_cxcywh(boxes: Boxes) -> Boxes:
    """(..., 4) xyxy -> (..., 4) cxcywh."""
    x1, y1, x2, y2 = _columns(boxes)
    return _stack_last((0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1), boxes)


def yxyx_to_xyxy(boxes: Boxes) -> Boxes:
    """Swap (..., 4) (y1, x1, y2, x2) <-> (x1, y1, x2, y2); the map is its own inverse."""
    return boxes[..., [1, 0, 3, 2]]


xyxy_to_yxyx = yxyx_to_xyxy


def xyxy_to_ltwh(boxes: Boxes) -> Boxes:
    """(..., 4) xyxy -> (..., 4) ltwh (COCO ``bbox``)."""
    return _cat_last((boxes[..., :2], boxes[..., 2:] - boxes[..., :2]), boxes)


def ltwh_to_xyxy(boxes: Boxes) -> Boxes:
    """(..., 4) ltwh (COCO ``bbox``) -> (..., 4) xyxy: right = left + width, bottom = top + height."""
    return _cat_last((boxes[..., :2], boxes[..., :2] + boxes[..., 2:]), boxes)


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
