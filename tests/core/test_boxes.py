"""Tests for multibox.core.boxes.

References: hand-computed values, torchvision.ops (box_iou, box_convert) and round trips.
"""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from multibox.core.boxes import (
    area_xyxy,
    box_iou_xyxy,
    cxcywh_to_xyxy,
    decode_cxcywh,
    encode_cxcywh,
    ltwh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_ltwh,
    xyxy_to_yxyx,
    yxyx_to_xyxy,
)


def random_xyxy(n: int, generator: torch.Generator, min_size: float = 0.0) -> torch.Tensor:
    """n valid (x1 <= x2, y1 <= y2) boxes in [0, 1]."""
    xy = torch.rand(n, 2, generator=generator)
    wh = min_size + torch.rand(n, 2, generator=generator) * 0.5
    return torch.cat((xy, xy + wh), dim=-1)


# --------------------------------------------------------------------------- format conversions

def test_conversions_hand_values():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 80.0]])
    # cx = (10 + 50)/2 = 30, cy = (20 + 80)/2 = 50, w = 40, h = 60
    assert torch.equal(xyxy_to_cxcywh(xyxy), torch.tensor([[30.0, 50.0, 40.0, 60.0]]))
    assert torch.equal(cxcywh_to_xyxy(torch.tensor([[30.0, 50.0, 40.0, 60.0]])), xyxy)
    # COCO ltwh: (left, top, width, height) = (10, 20, 40, 60)
    assert torch.equal(xyxy_to_ltwh(xyxy), torch.tensor([[10.0, 20.0, 40.0, 60.0]]))
    assert torch.equal(ltwh_to_xyxy(torch.tensor([[10.0, 20.0, 40.0, 60.0]])), xyxy)
    # yxyx is (y1, x1, y2, x2)
    assert torch.equal(xyxy_to_yxyx(xyxy), torch.tensor([[20.0, 10.0, 80.0, 50.0]]))
    assert torch.equal(yxyx_to_xyxy(torch.tensor([[20.0, 10.0, 80.0, 50.0]])), xyxy)


def test_conversions_match_torchvision_box_convert():
    g = torch.Generator().manual_seed(0)
    xyxy = random_xyxy(100, g)
    torch.testing.assert_close(xyxy_to_cxcywh(xyxy), box_convert(xyxy, "xyxy", "cxcywh"))
    # torchvision calls COCO's (left, top, w, h) "xywh"; multibox calls it ltwh.
    torch.testing.assert_close(xyxy_to_ltwh(xyxy), box_convert(xyxy, "xyxy", "xywh"))
    cxcywh = box_convert(xyxy, "xyxy", "cxcywh")
    torch.testing.assert_close(cxcywh_to_xyxy(cxcywh), box_convert(cxcywh, "cxcywh", "xyxy"))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_conversions_round_trip_any_batch_shape(shape):
    g = torch.Generator().manual_seed(1)
    xyxy = random_xyxy(math.prod(shape), g).reshape(*shape, 4).double()
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy)
    torch.testing.assert_close(ltwh_to_xyxy(xyxy_to_ltwh(xyxy)), xyxy)
    assert torch.equal(yxyx_to_xyxy(xyxy_to_yxyx(xyxy)), xyxy)
    assert xyxy_to_cxcywh(xyxy).shape == xyxy.shape


def test_area_hand_values_and_inverted_boxes():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0],    # 2 * 3 = 6
                          [1.0, 1.0, 1.0, 5.0],    # zero width -> 0
                          [3.0, 3.0, 1.0, 1.0]])   # doubly inverted: must not count as (-2)(-2) = 4
    assert torch.equal(area_xyxy(boxes), torch.tensor([6.0, 0.0, 0.0]))


# --------------------------------------------------------------------------- IoU

def test_iou_hand_value():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    # overlap 1x1 = 1, union 4 + 4 - 1 = 7; identical -> 1; disjoint -> 0
    torch.testing.assert_close(box_iou_xyxy(a, b), torch.tensor([[1.0 / 7.0, 1.0, 0.0]]))


def test_iou_matches_torchvision_on_random_boxes():
    g = torch.Generator().manual_seed(2)
    b1, b2 = random_xyxy(50, g, min_size=1e-3), random_xyxy(70, g, min_size=1e-3)
    torch.testing.assert_close(box_iou_xyxy(b1, b2), box_iou(b1, b2), rtol=1e-6, atol=1e-7)


def test_iou_degenerate_boxes_never_nan():
    g = torch.Generator().manual_seed(3)
    good = random_xyxy(20, g, min_size=1e-3)
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    line = torch.tensor([[0.2, 0.1, 0.2, 0.9]])            # zero width
    zeros = torch.zeros(1, 4)                              # the padding box of pad_targets
    degenerate = torch.cat((point, line, zeros))
    b1 = torch.cat((good, degenerate))
    b2 = torch.cat((degenerate, good))
    iou = box_iou_xyxy(b1, b2)
    assert not torch.isnan(iou).any()
    assert ((iou >= 0) & (iou <= 1)).all()
    # Where the union is not empty torchvision is the reference ...
    ref = box_iou(b1, b2)
    finite = ~torch.isnan(ref)
    torch.testing.assert_close(iou[finite], ref[finite], rtol=1e-6, atol=1e-7)
    # ... and torchvision's 0/0 = NaN cells (degenerate vs degenerate) become 0.
    assert torch.isnan(ref).any()
    assert (iou[~finite] == 0).all()


def test_iou_broadcasts_over_batch():
    g = torch.Generator().manual_seed(4)
    b1 = random_xyxy(2 * 3, g).reshape(2, 3, 4)
    b2 = random_xyxy(5, g)
    iou = box_iou_xyxy(b1, b2)
    assert iou.shape == (2, 3, 5)
    for i in range(2):
        torch.testing.assert_close(iou[i], box_iou(b1[i], b2))


# --------------------------------------------------------------------------- encode / decode

def test_encode_hand_value():
    anchors = torch.tensor([[0.5, 0.5, 0.2, 0.4]])         # cx, cy, w, h
    gt = torch.tensor([[0.55, 0.4, 0.1, 0.8]])
    # dx = (0.55 - 0.5)/(0.1 * 0.2) = 2.5; dy = (0.4 - 0.5)/(0.1 * 0.4) = -2.5
    # dw = log(0.1/0.2)/0.2 = -3.4657359; dh = log(0.8/0.4)/0.2 = +3.4657359
    expected = torch.tensor([[2.5, -2.5, -3.4657359, 3.4657359]])
    torch.testing.assert_close(encode_cxcywh(gt, anchors, 0.1, 0.2), expected)
    torch.testing.assert_close(decode_cxcywh(expected, anchors, 0.1, 0.2), gt)


def test_encode_floors_degenerate_size_ratio():
    anchors = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    gt = torch.tensor([[0.5, 0.5, 0.0, 0.2]])
    # log(max(0/0.2, 1e-6))/0.2 = log(1e-6)/0.2 = -69.0775528
    out = encode_cxcywh(gt, anchors, 0.1, 0.2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 2], torch.tensor(-69.0775528))


def test_encode_decode_round_trip_batched():
    g = torch.Generator().manual_seed(5)
    anchors = xyxy_to_cxcywh(random_xyxy(30, g, min_size=0.01)).double()
    gt = xyxy_to_cxcywh(random_xyxy(2 * 30, g, min_size=0.01)).reshape(2, 30, 4).double()
    offsets = encode_cxcywh(gt, anchors, 0.1, 0.2)
    assert offsets.shape == (2, 30, 4)
    torch.testing.assert_close(decode_cxcywh(offsets, anchors, 0.1, 0.2), gt)
    # and the other way round
    torch.testing.assert_close(encode_cxcywh(decode_cxcywh(offsets, anchors, 0.1, 0.2), anchors, 0.1, 0.2), offsets)


def test_encode_matches_torchvision_box_coder():
    """torchvision's SSD box coder uses weights (10, 10, 5, 5) = 1 / variances (0.1, 0.2), on xyxy boxes."""
    from torchvision.models.detection._utils import BoxCoder

    g = torch.Generator().manual_seed(6)
    anchors_xyxy = random_xyxy(40, g, min_size=0.01)
    gt_xyxy = random_xyxy(40, g, min_size=0.01)
    ref = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).encode_single(gt_xyxy, anchors_xyxy)
    ours = encode_cxcywh(xyxy_to_cxcywh(gt_xyxy), xyxy_to_cxcywh(anchors_xyxy), 0.1, 0.2)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_decode_clamps_log_ratio_only_when_asked():
    anchors = torch.tensor([[0.5, 0.5, 0.1, 0.1]])
    offsets = torch.tensor([[0.0, 0.0, 100.0, 0.0]])       # exp(100 * 0.2) = exp(20)
    free = decode_cxcywh(offsets, anchors, 0.1, 0.2)
    torch.testing.assert_close(free[0, 2], torch.tensor(math.exp(20.0) * 0.1))
    capped = decode_cxcywh(offsets, anchors, 0.1, 0.2, max_log_ratio=math.log(1000 / 16))
    # exp(log(62.5)) * 0.1 = 6.25
    torch.testing.assert_close(capped[0, 2], torch.tensor(6.25))
    assert capped[0, 3] == pytest.approx(0.1)
