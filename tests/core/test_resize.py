"""The map from image pixels to the network's input and back (multibox.core.resize), against hand-computed
placements and boxes; letterboxed detections mapped back by the postprocessor."""
from __future__ import annotations

import pytest
import torch

from multibox.core.postprocess import PostProcessor
from multibox.core.resize import (as_hw, boxes_to_image_xyxy, boxes_to_input_xyxy, input_to_pixels, letterbox_fill,
                                  letterbox_uint8, placement)


def test_as_hw():
    assert as_hw(300) == (300, 300)
    assert as_hw([320, 544]) == (320, 544)


@pytest.mark.parametrize("image_hw, input_hw, expected", [
    # 480x640 into 320x544: scale min(320/480, 544/640) = 2/3 -> 320 x 426.67, rounded 427; left (544 - 427) // 2
    ((480, 640), (320, 544), (0, 58, 320, 427)),
    # 1080x1920 into 300x300: scale 300/1920 = 0.15625 -> 168.75 x 300, rounded 169; top (300 - 169) // 2 = 65
    ((1080, 1920), (300, 300), (65, 0, 169, 300)),
    # a tall 1000x100 into 320x544: scale 0.32 -> 320 x 32; left (544 - 32) // 2 = 256
    ((1000, 100), (320, 544), (0, 256, 320, 32)),
    ((300, 300), (300, 300), (0, 0, 300, 300)),
])
def test_letterbox_placement_by_hand(image_hw, input_hw, expected):
    p = placement(image_hw, input_hw, letterbox=True)
    assert (p.top, p.left, p.height, p.width) == expected
    assert placement(image_hw, input_hw, letterbox=False) == type(p)(0, 0, *input_hw)


def test_boxes_to_input_by_hand():
    # 480x640 into 320x544 letterboxed (left 58, inner 427 x 320): x -> (58 + x * 427/640) / 544, y -> y * 2/3 / 320
    box = torch.tensor([[64.0, 48.0, 320.0, 240.0]], dtype=torch.float64)
    got = boxes_to_input_xyxy(box, (480, 640), (320, 544), letterbox=True)
    expected = torch.tensor([[(58 + 64 * 427 / 640) / 544, 48 * (320 / 480) / 320,
                              (58 + 320 * 427 / 640) / 544, 240 * (320 / 480) / 320]], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)
    stretched = boxes_to_input_xyxy(box, (480, 640), (320, 544), letterbox=False)
    torch.testing.assert_close(stretched, box / torch.tensor([640, 480, 640, 480]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("letterbox", [False, True])
@pytest.mark.parametrize("image_hw", [(480, 640), (1080, 1920), (1000, 100), (37, 501)])
def test_round_trip_is_exact(image_hw, letterbox):
    g = torch.Generator().manual_seed(0)
    h, w = image_hw
    xy = torch.rand(50, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h])
    wh = torch.rand(50, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h]) / 3
    boxes = torch.cat((xy, xy + wh), 1)
    back = boxes_to_image_xyxy(boxes_to_input_xyxy(boxes, image_hw, (320, 544), letterbox), image_hw, (320, 544),
                               letterbox)
    torch.testing.assert_close(back, boxes, rtol=0, atol=1e-9)


def test_stretch_maps_back_by_the_image_size_exactly():
    scale, offset = input_to_pixels([(480, 640), (7, 3)], (320, 544), letterbox=False)
    assert scale.tolist() == [[640, 480, 640, 480], [3, 7, 3, 7]]
    assert offset.abs().max() == 0


def test_letterbox_image_by_hand():
    image = torch.full((3, 4, 8), 200, dtype=torch.uint8)        # 4x8 into 8x8: inner 4x8 at top 2
    out = letterbox_uint8(image, (8, 8), letterbox_fill((123.675, 116.28, 103.53)))   # ImageNet's mean
    assert letterbox_fill((123.675, 116.28, 103.53)) == [124, 116, 104]
    assert out.shape == (3, 8, 8)
    assert (out[:, 2:6] == 200).all()
    assert (out[:, :2] == torch.tensor([124, 116, 104], dtype=torch.uint8)[:, None, None]).all()
    assert (out[:, 6:] == out[:, :1]).all()
    batch = letterbox_uint8(torch.stack([image, 255 - image]), (8, 8), [0, 0, 0])   # a batch of one size
    assert batch.shape == (2, 3, 8, 8) and (batch[1, :, 2:6] == 55).all() and (batch[:, :, :2] == 0).all()


def test_postprocessor_maps_letterboxed_detections_back():
    # One anchor decoded with zero offsets is the anchor itself: a box in the letterboxed input's units.
    image_hw, input_hw = (480, 640), (320, 544)
    box_px = torch.tensor([[100.0, 50.0, 300.0, 400.0]], dtype=torch.float64)
    xyxy = boxes_to_input_xyxy(box_px, image_hw, input_hw, letterbox=True)[0]
    anchor = torch.stack(((xyxy[0] + xyxy[2]) / 2, (xyxy[1] + xyxy[3]) / 2, xyxy[2] - xyxy[0], xyxy[3] - xyxy[1]))
    logits = torch.tensor([[[-9.0, 9.0]]])
    pp = PostProcessor(score_activation="softmax", input_hw=input_hw, letterbox=True)
    out = pp(torch.zeros(1, 1, 4), logits, anchor[None].float(), [image_hw])
    torch.testing.assert_close(out[0]["boxes"].double(), box_px, rtol=0, atol=1e-3)
    stretched = PostProcessor(score_activation="softmax", input_hw=input_hw)(torch.zeros(1, 1, 4), logits,
                                                                           anchor[None].float(), [image_hw])
    assert (stretched[0]["boxes"].double() - box_px).abs().max() > 10   # the padding is not mapped away
