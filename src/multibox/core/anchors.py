"""Default boxes ("anchors") of SSD (Liu et al. 2016, §2.2 "Choosing scales and aspect ratios").

Order, which must match the heads' flattening (NCHW -> NHWC -> flat): level by level; inside a level rows
``i``, then columns ``j``, then the sizes of one location in this order: (s_k, s_k); for each aspect ratio r,
(s_k·√r, s_k/√r) then (s_k/√r, s_k·√r); last (√(s_k·s_{k+1}), same).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from multibox.core.resize import as_hw

if TYPE_CHECKING:
    from multibox.config import AnchorConfig


@dataclass(frozen=True)
class AnchorSpec:
    """Geometry of the default boxes, in units of the input image (x over its width, y over its height).

    ``feature_sizes``: per level f (an f x f map) or (f_h, f_w). ``image_size``: S or (H, W). ``scales`` has one
    more entry than ``feature_sizes``: the last is s_{k+1} of the last level; a scale is a fraction of the input's
    shorter side, so a box of aspect ratio 1 is square in pixels on any input. ``steps`` None, or a non-square
    input: f_k is the feature size on each axis (torchvision's ``DefaultBoxGenerator`` without steps); else
    f_k = S / step_k. ``sizes``: per level None (derived from scales and aspect ratios, :func:`level_sizes`) or
    the explicit (w, h) list of one location, in units of each axis, for layouts no scale rule gives (MindSpore's
    model zoo, fitted boxes).
    """

    feature_sizes: Sequence[int | Sequence[int]]
    steps: Sequence[float] | None
    scales: Sequence[float]
    aspect_ratios: Sequence[Sequence[float]]
    image_size: int | Sequence[int]
    clip: bool = False
    extra_box_second: bool = False  # torchvision puts the √(s_k·s_{k+1}) box second, the tutorial last
    sizes: Sequence[Sequence[Sequence[float]] | None] | None = None

    @property
    def image_hw(self) -> tuple[int, int]:
        return as_hw(self.image_size)

    def grid_hw(self, level: int) -> tuple[int, int]:
        """(f_h, f_w): the rows and columns of ``level``'s feature map."""
        return as_hw(self.feature_sizes[level])

    def density_hw(self, level: int) -> tuple[float, float]:
        """(f_k on y, f_k on x): centres of row i and column j at ((j + 0.5) / f_k_x, (i + 0.5) / f_k_y)."""
        (height, width), (rows, cols) = self.image_hw, self.grid_hw(level)
        if self.steps is None or height != width:
            return float(rows), float(cols)
        return height / self.steps[level], width / self.steps[level]

    def location_sizes(self, level: int) -> list[tuple[float, float]]:
        """(w, h) of the boxes at one location of ``level``, in order."""
        if self.sizes is not None and self.sizes[level] is not None:
            return [(float(w), float(h)) for w, h in self.sizes[level]]
        sizes = level_sizes(self.scales[level], self.scales[level + 1], self.aspect_ratios[level],
                            self.extra_box_second)
        height, width = self.image_hw
        if height == width:
            return sizes
        short = min(height, width)
        return [(w * short / width, h * short / height) for w, h in sizes]

    def boxes_per_location(self) -> list[int]:
        return [len(self.location_sizes(k)) for k in range(len(self.feature_sizes))]

    def num_anchors(self) -> int:
        return sum(math.prod(self.grid_hw(k)) * n for k, n in enumerate(self.boxes_per_location()))


def tutorial_scales(num_levels: int, s_min: float = 0.1, s_max: float = 0.95, s_last: float = 1.0) -> list[float]:
    """s_k = s_min + (s_max - s_min)·k/(m - 1) for k = 0..m-1, then ``s_last`` (the tutorial's 1.0)."""
    step = (s_max - s_min) / (num_levels - 1)
    return [s_min + step * k for k in range(num_levels)] + [s_last]


def level_sizes(scale: float, next_scale: float, ratios: Sequence[float],
                extra_second: bool = False) -> list[tuple[float, float]]:
    """(w, h) of the boxes at one location of a level, in the order documented above."""
    sizes = [(scale, scale)]
    for r in ratios:
        root = math.sqrt(r)
        sizes += [(scale * root, scale / root), (scale / root, scale * root)]
    extra = math.sqrt(scale * next_scale)
    sizes.insert(1 if extra_second else len(sizes), (extra, extra))
    return sizes


def default_boxes_cxcywh(spec: AnchorSpec, dtype: torch.dtype = torch.float32) -> Tensor:
    """All default boxes as an (A, 4) cxcywh tensor normalised to [0, 1] (sizes clipped only if ``spec.clip``).

    Centres are ((j + 0.5)/f_k_x, (i + 0.5)/f_k_y) (:meth:`AnchorSpec.density_hw`).
    """
    levels = []
    for k in range(len(spec.feature_sizes)):
        (rows, cols), (f_y, f_x) = spec.grid_hw(k), spec.density_hw(k)
        cy, cx = torch.meshgrid((torch.arange(rows, dtype=torch.float64) + 0.5) / f_y,
                                (torch.arange(cols, dtype=torch.float64) + 0.5) / f_x, indexing="ij")  # rows i, then j
        wh = torch.tensor(spec.location_sizes(k), dtype=torch.float64)
        n = len(wh)
        xy = torch.stack((cx, cy), dim=-1).reshape(-1, 1, 2).expand(-1, n, 2)
        levels.append(torch.cat((xy, wh.expand(xy.shape[0], n, 2)), dim=-1).reshape(-1, 4))
    boxes = torch.cat(levels)
    if spec.clip:   # sizes only, as torchvision: centres of the last row/column may lie just past 1
        boxes[:, 2:] = boxes[:, 2:].clamp(0.0, 1.0)
    return boxes.to(dtype)


def anchor_spec(anchors: AnchorConfig, image_size: int | Sequence[int]) -> AnchorSpec:
    """The default-box geometry of an ``anchors`` config section (scales: the tutorial's rule when not given).
    ``anchors.feature_sizes`` must be known: a config whose feature sizes come from the network gets them from
    :func:`multibox.models.resolve_feature_sizes`."""
    if anchors.feature_sizes is None:
        raise ValueError("anchors.feature_sizes is null: the network's feature sizes are not resolved yet "
                         "(multibox.models.resolve_feature_sizes)")
    scales = anchors.scales or tutorial_scales(len(anchors.feature_sizes))
    if anchors.sizes is not None and len(anchors.sizes) != len(anchors.feature_sizes):
        raise ValueError(f"anchors.sizes has {len(anchors.sizes)} levels, anchors.feature_sizes "
                         f"{len(anchors.feature_sizes)}")
    return AnchorSpec(anchors.feature_sizes, anchors.steps, scales, anchors.aspect_ratios, image_size,
                      anchors.clip, anchors.extra_box_second, anchors.sizes)
