"""Sliced inference for large images with small objects: ``multibox predict --tile 640``, or in Python
``TiledDetector(multibox.load(path), tile=640).predict(images)``.

An SSD sees its input resized to ``model.image_size`` (300 x 300 px for the VGG16 presets; S x S or H x W,
stretched or letterboxed as ``data.resize`` says): in a 1920x1080 photo a 20 px object shrinks to 3x6 px at 300 x
300, below anything its anchors match. :class:`TiledDetector` also runs the detector on overlapping ``tile`` x
``tile`` crops (square for a square model), where the same object keeps about half its size, and merges:

1. the whole image, always (large objects, which tiles cut, are found there);
2. tiles on a grid of stride ``1 - overlap`` of the tile's side on each axis, the last row and column aligned to
   the image's bottom and right edges (:func:`tile_windows_xyxy`); an image no larger than one tile is predicted
   whole, alone;
3. tile boxes shifted to image pixels, less those that reach an inner tile border (see below), concatenated with
   the whole image's, class-wise NMS (``torchvision.ops.batched_nms``) at the model's own ``eval.nms_threshold``,
   then the best ``max_det`` by score.

The tiles have the shape of the model's input (:func:`tile_hw`): ``tile`` px along its longer side, the other
side in proportion (at 320x544, ``tile=640`` cuts 376x640 crops), so a crop is resized without stretching or
letterbox padding. Each crop goes through the detector's own ``predict``, which resizes it as any image and maps
its boxes back to the crop's pixels.

Boxes at inner tile borders: a box of a tile whose edge lies within ``border_margin`` px of a border that another
tile overlaps (not the image's own border) is most likely an object that the border cuts, its box cut with it (the
postprocessing clips boxes to the crop). Its IoU with the object's whole box is about the fraction of the object
inside the tile, often below the NMS threshold, so NMS alone would keep both: a duplicate half box. An object
smaller than the overlap (``overlap`` of the tile's side: 128 px at 640 and 0.2) lies whole in the neighbouring
tile, and a larger one is what the whole image finds, so these boxes are dropped. SAHI keeps them instead and
merges them (greedy NMM by intersection over the smaller box); dropping keeps the merge a plain NMS. The cost: with
``overlap=0`` an object that the border cuts is left to the whole image alone.
"""
from __future__ import annotations

import logging
import numbers
from typing import Iterable

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from multibox.core.resize import as_hw
from multibox.errors import InputError
from multibox.inference.detector import ImageLike, check_limits, image_batches

__all__ = ["MIN_TILE", "TiledDetector", "check_tiling", "tile_hw", "tile_windows_xyxy"]

log = logging.getLogger(__name__)

# Smaller tiles than this are no slicing an SSD can use (its input is some hundred px a side) and would make
# thousands of crops of a photo.
MIN_TILE = 32


def check_tiling(tile, overlap) -> None:
    """:class:`InputError` unless ``tile`` is an int >= :data:`MIN_TILE` and ``overlap`` a fraction in [0, 1)."""
    if isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile < MIN_TILE:
        raise InputError(f"tile {tile!r}: the tile size is a whole number of pixels, at least {MIN_TILE}")
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) or not 0 <= overlap < 1:
        raise InputError(f"tile overlap {overlap!r}: a fraction of the tile, at least 0 and below 1")


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Offsets of the tiles along one axis of ``length`` px: every ``stride`` px, the last one at ``length - tile``
    (so that the tiles end at the edge), no offset twice; ``[0]`` when one tile covers the axis."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, stride)) + [length - tile]


def tile_hw(tile: int, input_hw: tuple[int, int] | None) -> tuple[int, int]:
    """The (height, width) of the tiles for a model whose input is ``input_hw`` (None: square): ``tile`` px along the
    input's longer side, the shorter side in the input's proportion (rounded, at least :data:`MIN_TILE`)."""
    check_tiling(tile, 0.0)
    if input_hw is None:
        return tile, tile
    height, width = input_hw
    short = max(MIN_TILE, round(tile * min(height, width) / max(height, width)))
    return (tile, short) if height > width else (short, tile)


def tile_windows_xyxy(height: int, width: int, tile: int | tuple[int, int],
                      overlap: float) -> list[tuple[int, int, int, int]]:
    """The tiles of an (H, W) image as (x0, y0, x1, y1) pixel windows (x1, y1 exclusive), row by row: ``tile`` px
    square, or (tile_h, tile_w) px, clipped to the image where it is smaller, strides ``(1 - overlap)`` of the tile
    on each axis (at least 1 px) and the last row and column aligned to the bottom and right edges, so every pixel
    is in some tile. One window (the whole image) when the image is no larger than a tile."""
    tile_h, tile_w = (tile, tile) if isinstance(tile, numbers.Integral) else tile
    for side in (tile_h, tile_w):
        check_tiling(side, overlap)
    stride_h, stride_w = (max(1, int(side * (1 - overlap))) for side in (tile_h, tile_w))
    return [(x0, y0, min(x0 + tile_w, width), min(y0 + tile_h, height))
            for y0 in _starts(height, tile_h, stride_h) for x0 in _starts(width, tile_w, stride_w)]


def _input_hw(detector) -> tuple[int, int] | None:
    """The detector's network input (H, W) from its ``cfg.model.image_size``; None where it has none."""
    size = getattr(getattr(detector.cfg, "model", None), "image_size", None)
    return None if size is None else as_hw(size)


class TiledDetector:
    """A detector (:class:`~multibox.inference.detector.Detector`, :class:`~multibox.inference.onnx.OnnxDetector`,
    anything with their ``predict`` and ``cfg``) that predicts each image whole and in tiles and merges the two
    (see the module's documentation). Every other attribute (``class_names``, ``category_ids``, ``cfg``,
    ``score_threshold``, ``label_to_category_id``, ...) is the wrapped detector's.

    Args:
        detector: the detector run on the whole image and on each tile.
        tile: tile size in pixels (>= :data:`MIN_TILE`) along the longer side of the model's input (:func:`tile_hw`);
            overlap: fraction of a tile shared with the next, in [0, 1).
        border_margin: a tile box with an edge within this many pixels of an inner tile border is dropped.
    """

    def __init__(self, detector, tile: int = 640, overlap: float = 0.2, border_margin: float = 2.0):
        check_tiling(tile, overlap)
        self.detector, self.tile, self.overlap, self.border_margin = detector, int(tile), float(overlap), border_margin
        self.tile_hw = tile_hw(self.tile, _input_hw(detector))
        self._logged: set[tuple[int, int]] = set()

    def __getattr__(self, name: str):
        if name == "detector":   # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.detector, name)

    def predict(self, images: ImageLike | Iterable[ImageLike], score: float | None = None, *, batch_size: int = 16,
                max_det: int | None = None) -> list[dict[str, Tensor]]:
        """Detections per image, the arguments and results of
        :meth:`multibox.inference.detector.Detector.predict`: ``boxes`` (K, 4) xyxy in the image's pixels,
        ``scores`` (K,), ``labels`` (K,), sorted by score. ``max_det`` None: the model's ``eval.max_per_image``
        (an ONNX graph with NMS inside: its K), else no cap. The whole images and tiles of ``batch_size`` images go
        through the detector's ``predict`` together (in its batches of ``batch_size``)."""
        check_limits(score, max_det)
        cap = max_det if max_det is not None else self._own_cap()
        results: list[dict[str, Tensor]] = []
        for batch, sizes in image_batches(images, batch_size):
            crops, windows = [], []   # per image: the whole image (window None), then its tiles
            for image, (height, width) in zip(batch, sizes):
                grid = tile_windows_xyxy(height, width, self.tile_hw, self.overlap)
                self._log_tiles(height, width, grid)
                windows.append([None] + grid if len(grid) > 1 else [None])
                crops += [image if w is None else image[:, w[1]:w[3], w[0]:w[2]] for w in windows[-1]]
            dets = iter(self.detector.predict(crops, score, batch_size=batch_size, max_det=max_det))
            for image_windows, size in zip(windows, sizes):
                parts = [(next(dets), window) for window in image_windows]
                results.append(parts[0][0] if len(parts) == 1 else self._merge(parts, size, cap))
        return results

    def _own_cap(self) -> int | None:
        """The detector's own detections-per-image cap: ``eval.max_per_image``, else an ONNX graph's K, else None."""
        cap = getattr(self.detector.cfg.eval, "max_per_image", None)
        return cap if cap is not None else getattr(self.detector, "max_detections", None)

    def _merge(self, parts: list[tuple[dict[str, Tensor], tuple[int, int, int, int] | None]],
               size: tuple[int, int], cap: int | None) -> dict[str, Tensor]:
        """One image's detections of the whole image (window None) and its tiles -> merged: tile boxes shifted to
        image pixels less those at inner borders, class-wise NMS, the best ``cap``."""
        boxes, scores, labels = [], [], []
        for det, window in parts:
            det_boxes = det["boxes"].float()
            keep = torch.ones(len(det_boxes), dtype=torch.bool)
            if window is not None:
                det_boxes = det_boxes + torch.tensor(window[:2] * 2, dtype=det_boxes.dtype)
                keep = ~self._at_inner_border(det_boxes, window, size)
            boxes.append(det_boxes[keep])
            scores.append(det["scores"].float()[keep])
            labels.append(det["labels"].long()[keep])
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        order = batched_nms(boxes, scores, labels, float(self.detector.cfg.eval.nms_threshold))   # best first
        if cap is not None:
            order = order[:cap]
        return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}

    def _at_inner_border(self, boxes_xyxy: Tensor, window: tuple[int, int, int, int],
                         size: tuple[int, int]) -> Tensor:
        """(K,) bool: boxes (image pixels, (K, 4) xyxy) with an edge within ``border_margin`` of one of
        ``window``'s borders that is not the image's own border."""
        height, width = size
        x0, y0, x1, y1 = window
        m = self.border_margin
        near = torch.zeros(len(boxes_xyxy), dtype=torch.bool)
        for column, border, inner in ((0, x0, x0 > 0), (1, y0, y0 > 0), (2, x1, x1 < width), (3, y1, y1 < height)):
            if inner:
                near |= (boxes_xyxy[:, column] - border).abs() <= m
        return near

    def _log_tiles(self, height: int, width: int, windows: list) -> None:
        """Say once per image size how many tiles its images are predicted in."""
        if (height, width) in self._logged:
            return
        self._logged.add((height, width))
        if len(windows) > 1:
            log.info("%dx%d images: the whole image and %d tiles of %s px (overlap %g)", width, height,
                     len(windows), self._tile_text(), self.overlap)
        else:
            log.info("%dx%d images: no larger than a %s px tile, predicted whole", width, height, self._tile_text())

    def _tile_text(self) -> str:
        """``640`` for square tiles, ``640x376`` (width x height, as the image sizes are logged) otherwise."""
        height, width = self.tile_hw
        return str(width) if height == width else f"{width}x{height}"
