"""VOC07 11-point and area mAP against hand-computed values (VOC devkit protocol)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from multibox.evaluation.voc import evaluate_voc, voc_ap

CATS = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "bird"}]


def _gt():
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "iscrowd": 1, "difficult": 1},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [5, 5, 10, 10], "iscrowd": 0},
    ]
    return {"images": [{"id": 1}, {"id": 2}], "annotations": anns, "categories": CATS}


def _dets():
    return [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},    # TP (box 1)
        {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "score": 0.8},  # difficult: ignored
        {"image_id": 1, "category_id": 1, "bbox": [1, 0, 10, 10], "score": 0.7},    # IoU 90/110 with claimed box 1: FP
        {"image_id": 2, "category_id": 1, "bbox": [30, 30, 5, 5], "score": 0.6},    # no overlap: FP
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5},    # TP (box 3)
    ]


def test_hand_computed_example():
    # dog: tp = [1,0,0,0,1], fp = [0,0,1,1,0], 2 non-difficult boxes
    # recall = [.5,.5,.5,.5,1], precision = [1,1,.5,1/3,.5]
    # VOC07: t in 0..0.5 (6 points) -> 1; t in 0.6..1 (5 points) -> 0.5  => 8.5/11
    # area: envelope [1, 1, 1, .5, .5, .5], recall steps 0->.5 (p=1) and .5->1 (p=.5)  => 0.75
    # cat: one box, no detection => 0 and 0; bird: no box => NaN, not in the mean
    out = evaluate_voc(_gt(), _dets())
    assert out["per_class"]["dog"]["VOC07_AP"] == pytest.approx(8.5 / 11, abs=1e-12)
    assert out["per_class"]["dog"]["VOC_AP"] == pytest.approx(0.75, abs=1e-12)
    assert out["per_class"]["dog"]["num_gt"] == 2
    assert out["per_class"]["cat"]["VOC07_AP"] == 0.0 and out["per_class"]["cat"]["VOC_AP"] == 0.0
    assert math.isnan(out["per_class"]["bird"]["VOC_AP"])
    assert out["VOC07_mAP"] == pytest.approx(8.5 / 22, abs=1e-12)
    assert out["VOC_mAP"] == pytest.approx(0.375, abs=1e-12)


def test_iou_must_exceed_half_strictly_and_image_subset():
    gt = {"images": [{"id": 1}, {"id": 2}], "categories": CATS[:1],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
                          {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10]}]}
    half = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 5], "score": 0.9}]       # IoU exactly 0.5
    assert evaluate_voc(gt, half, image_ids=[1])["VOC_mAP"] == 0.0
    above = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 5.1], "score": 0.9}]
    assert evaluate_voc(gt, above, image_ids=[1])["VOC_mAP"] == pytest.approx(1.0)
    # over both images the second box is missed: recall 0.5 at precision 1
    both = evaluate_voc(gt, above)
    assert both["VOC_mAP"] == pytest.approx(0.5) and both["VOC07_mAP"] == pytest.approx(6 / 11)


def test_voc_ap_functions():
    rec = np.array([0.2, 0.4, 0.4, 0.8])
    prec = np.array([1.0, 1.0, 0.67, 0.8])
    # area: 0.2*1 + 0.2*1 + 0.4*0.8 = 0.72
    assert voc_ap(rec, prec) == pytest.approx(0.72)
    # 11-pt: t=0..0.4 -> 1 (5 pts), t=0.5..0.8 -> 0.8 (4 pts), t=0.9, 1.0 -> 0  => (5 + 3.2)/11
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(8.2 / 11)


def test_pixel_inclusive_equals_continuous_on_converted_boxes():
    """Devkit arithmetic (+1) on raw 1-based VOC boxes == continuous IoU on multibox's converted boxes."""
    rng = np.random.default_rng(0)
    raw_gt, raw_det, gt_anns, dets = [], [], [], []
    for i in range(30):
        x1, y1 = rng.integers(1, 50, 2)
        w, h = rng.integers(3, 40, 2)
        raw = [int(x1), int(y1), int(x1 + w), int(y1 + h)]            # VOC xmin..xmax inclusive
        gt_anns.append({"id": i + 1, "image_id": i % 5, "category_id": 1 + i % 2, "iscrowd": int(i % 7 == 0),
                        "bbox": [raw[0] - 1, raw[1] - 1, raw[2] - raw[0] + 1, raw[3] - raw[1] + 1]})
        # devkit frame: corners are the inclusive pixel indices, so x2 = x + w - 1
        raw_gt.append({**gt_anns[-1], "bbox": [raw[0], raw[1], raw[2] - raw[0] + 1, raw[3] - raw[1] + 1]})
        for _ in range(2):
            jitter = rng.integers(-4, 5, 4)
            d = [raw[0] + jitter[0], raw[1] + jitter[1], raw[2] + jitter[2], raw[3] + jitter[3]]
            if d[2] <= d[0] or d[3] <= d[1]:
                continue
            score = float(rng.random())
            raw_det.append({"image_id": i % 5, "category_id": 1 + i % 2, "score": score,
                            "bbox": [d[0], d[1], d[2] - d[0] + 1, d[3] - d[1] + 1]})
            dets.append({**raw_det[-1], "bbox": [d[0] - 1, d[1] - 1, d[2] - d[0] + 1, d[3] - d[1] + 1]})
    images = [{"id": k} for k in range(5)]
    cats = CATS[:2]
    a = evaluate_voc({"images": images, "annotations": gt_anns, "categories": cats}, dets)
    b = evaluate_voc({"images": images, "annotations": raw_gt, "categories": cats}, raw_det, pixel_inclusive=True)
    assert a["VOC_mAP"] == pytest.approx(b["VOC_mAP"], abs=1e-12)
    assert a["VOC07_mAP"] == pytest.approx(b["VOC07_mAP"], abs=1e-12)
    assert 0.05 < a["VOC_mAP"] < 0.99
