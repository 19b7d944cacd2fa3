"""Drawing detections onto images: each box in its class's colour, its caption on a filled box of that colour in
black or white (whichever contrasts), lines and text scaled with the image so they read alike at any size."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

# Distinct colours cycled by label (tab10).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light fills, white on dark ones (ITU-R BT.601 luma)."""
    return (0, 0, 0) if 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] > 140 else (255, 255, 255)


@lru_cache(maxsize=16)
def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):     # older Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_detections(image: Tensor, detections: dict[str, Tensor], class_names: Sequence[str]) -> Tensor:
    """(3, H, W) uint8 image + detections in its pixels (``boxes`` (K, 4) xyxy, ``scores`` (K,), ``labels``
    (K,)) -> annotated (3, H, W) uint8 image (a new tensor).

    Caption "<class> <score>" on a filled box of the detection's colour, above the box where there is room, else
    just inside its top; shifted left to stay in the image. Line width ~0.3 % and text height ~2 % of the image's
    longer side (at least 2 px and 11 px). The best detection is drawn last, on top."""
    from PIL import Image, ImageDraw

    height, width = image.shape[-2:]
    line = max(2, round(max(height, width) * 0.003))
    font = _font(max(11, round(max(height, width) * 0.02)))
    pad = max(1, line // 2 + 1)
    canvas = Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy())
    draw = ImageDraw.Draw(canvas)
    boxes = detections["boxes"].float().tolist()
    labels = detections["labels"].tolist()
    scores = detections["scores"].float().tolist()
    for (x1, y1, x2, y2), label, score in reversed(list(zip(boxes, labels, scores))):
        fill = _rgb(PALETTE[label % len(PALETTE)])
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=fill, width=line)
        caption = f"{class_names[label]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
        tx = min(max(0, round(x1)), max(0, width - box_w))
        ty = round(y1) - box_h if round(y1) - box_h >= 0 else max(0, round(y1))
        draw.rectangle([tx, ty, tx + box_w - 1, ty + box_h - 1], fill=fill)
        draw.text((tx + pad - left, ty + pad - top), caption, fill=text_colour(fill), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).to(image.device)
