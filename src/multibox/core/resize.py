"""How an image of any size becomes the network's (H, W) input, and how boxes map between the two.

Two geometries (``data.resize``):

- stretch (``antialias``, ``torchvision``): each axis is scaled on its own, the image fills the whole input;
- ``letterbox``: one scale for both axes (the largest that fits), the resized image centred and the rest padded
  with the data's mean colour, so objects keep their shape (Redmon & Farhadi, YOLOv3's ``letterbox_image``).

A :class:`Placement` says where the resized image lies in the input. Boxes go from image pixels to the input's
normalised [0, 1] coordinates and back by one affine map per axis, so a round trip is exact up to floating point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``model.image_size`` (S, or [H, W]) -> (H, W)."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


@dataclass(frozen=True)
class Placement:
    """The resized image fills rows ``top .. top + height`` and columns ``left .. left + width`` of the input."""

    top: int
    left: int
    height: int
    width: int


def placement(image_hw: Sequence[int], input_hw: Sequence[int], letterbox: bool) -> Placement:
    """Where an (h, w) image lands in the (H, W) input: all of it (stretch), or scaled by min(H/h, W/w), rounded
    to whole pixels and centred (letterbox)."""
    (h, w), (big_h, big_w) = image_hw, input_hw
    if not letterbox:
        return Placement(0, 0, int(big_h), int(big_w))
    ratio = min(big_h / h, big_w / w)
    height, width = min(big_h, max(1, round(h * ratio))), min(big_w, max(1, round(w * ratio)))
    return Placement((big_h - height) // 2, (big_w - width) // 2, height, width)


def pixels_to_input(image_hw: Sequence[int], input_hw: Sequence[int], letterbox: bool) -> tuple[Tensor, Tensor]:
    """(4,) scale and (4,) offset that map xyxy image pixels to the input's normalised xyxy: ``box * s + o``."""
    p = placement(image_hw, input_hw, letterbox)
    (h, w), (big_h, big_w) = image_hw, input_hw
    sx, sy = p.width / (w * big_w), p.height / (h * big_h)
    ox, oy = p.left / big_w, p.top / big_h
    return (torch.tensor([sx, sy, sx, sy], dtype=torch.float64),
            torch.tensor([ox, oy, ox, oy], dtype=torch.float64))


def input_to_pixels(image_sizes: Sequence[Sequence[int]] | Tensor, input_hw: Sequence[int],
                    letterbox: bool) -> tuple[Tensor, Tensor]:
    """(N, 4) scale and (N, 4) offset that map the input's normalised xyxy back to each image's pixels, the
    inverse of :func:`pixels_to_input`: ``box_px = box * s + o``. Stretched images get scale (w, h) exactly."""
    big_h, big_w = input_hw
    rows = []
    for h, w in torch.as_tensor(image_sizes).reshape(-1, 2).tolist():
        p = placement((h, w), input_hw, letterbox)
        sx, sy = w * big_w / p.width, h * big_h / p.height
        ox, oy = -p.left * w / p.width, -p.top * h / p.height
        rows.append([sx, sy, sx, sy, ox, oy, ox, oy])
    maps = torch.tensor(rows, dtype=torch.float64).reshape(-1, 8)
    return maps[:, :4], maps[:, 4:]


def detections_to_pixels(boxes_xyxy: Tensor, image_idx: Tensor, image_sizes: Sequence[Sequence[int]] | Tensor,
                         input_hw: Sequence[int], letterbox: bool) -> tuple[Tensor, Tensor]:
    """Detections of a batch, in the input's normalised xyxy, -> (K, 4) xyxy in their images' pixels, clipped to
    the image, and a (K,) mask of those to keep: all of them when stretched; when letterboxed, those not wholly in
    the padding (clipped to nothing).

    Args:
        boxes_xyxy: (K, 4); image_idx: (K,) the image of each, into the N ``image_sizes`` (h, w).
    """
    n = len(image_sizes)
    scale, offset = input_to_pixels(image_sizes, input_hw, letterbox)
    scale, offset = (t.to(boxes_xyxy.device, boxes_xyxy.dtype)[image_idx] for t in (scale, offset))
    limits = torch.as_tensor(image_sizes, dtype=boxes_xyxy.dtype, device=boxes_xyxy.device).reshape(n, 2)
    pixels = torch.minimum((boxes_xyxy * scale + offset).clamp(min=0), limits[image_idx][:, [1, 0, 1, 0]])
    if not letterbox:
        return pixels, torch.ones(len(pixels), dtype=torch.bool, device=pixels.device)
    return pixels, (pixels[:, 2] > pixels[:, 0]) & (pixels[:, 3] > pixels[:, 1])


def boxes_to_input_xyxy(boxes_xyxy: Tensor, image_hw: Sequence[int], input_hw: Sequence[int],
                        letterbox: bool) -> Tensor:
    """(..., 4) xyxy boxes in image pixels -> the same boxes normalised to the (H, W) input."""
    s, o = pixels_to_input(image_hw, input_hw, letterbox)
    return (boxes_xyxy.double() * s + o).to(boxes_xyxy.dtype)


def boxes_to_image_xyxy(boxes_xyxy: Tensor, image_hw: Sequence[int], input_hw: Sequence[int],
                        letterbox: bool) -> Tensor:
    """(..., 4) xyxy boxes normalised to the input -> the same boxes in the (h, w) image's pixels."""
    s, o = input_to_pixels([image_hw], input_hw, letterbox)
    return (boxes_xyxy.double() * s[0] + o[0]).to(boxes_xyxy.dtype)


def letterbox_fill(mean: Sequence[float]) -> list[int]:
    """The uint8 padding colour of a letterboxed image: the data's mean (0..255 units, ``data.mean``), which
    normalises to about zero."""
    return [min(255, max(0, round(m))) for m in mean]


def letterbox_uint8(images: Tensor, input_hw: Sequence[int], fill: Sequence[int]) -> Tensor:
    """(..., 3, h, w) uint8 (one image or a batch of one size) -> (..., 3, H, W) uint8: antialiased resize to the
    :func:`placement`, padded with ``fill``."""
    p = placement(tuple(images.shape[-2:]), input_hw, letterbox=True)
    inner = F.resize(images, [p.height, p.width], antialias=True) \
        if (p.height, p.width) != tuple(images.shape[-2:]) else images
    colour = torch.tensor(list(fill), dtype=torch.uint8, device=images.device)[:, None, None]
    out = colour.expand(*images.shape[:-2], *input_hw).clone()
    out[..., p.top:p.top + p.height, p.left:p.left + p.width] = inner
    return out
