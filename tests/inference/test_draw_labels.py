"""``draw_detections`` (what ``multibox predict`` draws): each caption on a filled box of its detection's colour,
in a contrasting colour, sized with the image."""
from __future__ import annotations

import pytest
import torch
from PIL import ImageColor

from multibox.evaluation.visualize import PALETTE, draw_detections

NAMES = ["background", "person", "car"]
GREY = 128


def drawn(height: int, width: int, box_xyxy: list[float], label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the annotated image, the (H, W) mask of pixels that differ from the grey input)."""
    image = torch.full((3, height, width), GREY, dtype=torch.uint8)
    det = {"boxes": torch.tensor([box_xyxy]), "scores": torch.tensor([0.87]), "labels": torch.tensor([label])}
    out = draw_detections(image, det, NAMES)
    assert out.shape == image.shape and out.dtype == torch.uint8
    return out, (out != GREY).any(0)


def label_band(out: torch.Tensor, changed: torch.Tensor, y1: int) -> torch.Tensor:
    """The changed pixels above the box's top edge (where the caption goes when there is room): (3, n) colours."""
    above = changed.clone()
    above[y1 - out.shape[1] // 200 - 2:] = False   # leave out the box's own (scaled) outline
    return out[:, above]


@pytest.mark.parametrize("label", [1, 2])   # an orange box (dark text) and a green one
def test_caption_on_a_filled_box_of_the_box_colour_with_contrasting_text(label):
    out, changed = drawn(300, 400, [100, 120, 260, 250], label)
    colour = torch.tensor(ImageColor.getrgb(PALETTE[label]), dtype=torch.uint8)[:, None]
    band = label_band(out, changed, 120)
    assert band.shape[1] > 300, "no caption above the box"
    background = (band == colour).all(0)
    text = ~background
    assert background.float().mean() > 0.5            # a filled box: mostly the box's colour
    assert text.sum() > 20                             # with the caption's pixels on it
    luma = torch.tensor([0.299, 0.587, 0.114])
    contrast = (luma @ band[:, text].float() - float(luma @ colour.float()[:, 0])).abs()
    assert (contrast > 100).sum() > 20   # readable: the strokes (not just their antialiased edges) far from the fill


def test_caption_and_lines_grow_with_the_image():
    def sizes(scale: int) -> tuple[int, int]:
        """(rows above the box with a changed pixel: the caption's height, the bottom edge's line width)."""
        out, changed = drawn(300 * scale, 400 * scale, [100 * scale, 120 * scale, 260 * scale, 250 * scale], 1)
        caption = int(changed[:120 * scale].any(1).sum())
        line = int(changed[:, 220 * scale].sum()) // 2   # a column right of the caption: the two edges only
        return caption, line

    (small_caption, small_line), (large_caption, large_line) = sizes(1), sizes(8)
    assert small_caption >= 11 and small_line >= 2      # legible on a small image
    assert large_caption >= 0.015 * 3200 and large_line >= 0.002 * 3200   # and as large, relatively, on a photo


def filled_with(out: torch.Tensor, label: int) -> torch.Tensor:
    colour = torch.tensor(ImageColor.getrgb(PALETTE[label]), dtype=torch.uint8)[:, None, None]
    return (out == colour).all(0)


def test_caption_of_a_box_at_the_top_edge_goes_inside_it():
    out, changed = drawn(200, 300, [150, 0, 299, 80], 2)
    assert filled_with(out, 2)[3:10, 153:170].float().mean() > 0.3   # the caption's fill (grey without it)


def test_caption_of_a_box_at_the_right_edge_is_shifted_into_the_image():
    out, changed = drawn(200, 300, [285, 100, 299, 150], 2)
    assert filled_with(out, 2)[90:99, 250:284].float().mean() > 0.3   # above the box, left of it
