"""Pascal VOC detection metrics: VOC07 11-point mAP and area ("all-point", VOC2010+) mAP at IoU 0.5.

The protocol is the VOC devkit's (as in its Python port ``voc_eval.py``), per class:

1. detections of the class, over all evaluated images, sorted by decreasing score (stable: ties keep input order);
2. each detection is matched to the ground-truth box of its class and image with the highest IoU (over all of
   them, ``difficult`` ones included); if that IoU is > 0.5 (strictly): if the box is ``difficult`` the
   detection is ignored (neither TP nor FP); else it is a TP the first time that box is claimed, an FP after;
   IoU <= 0.5 (or no box) is an FP;
3. recall = cum TP / (number of non-difficult boxes), precision = cum TP / (cum TP + cum FP);
4. VOC07: mean over t in {0, 0.1, ..., 1} of max(precision at recall >= t) (0 if none);
   area: the area under the precision envelope (precision made monotone from the right), recall from 0 to 1.

mAP is the mean over classes with at least one non-difficult box (a class without any has no defined recall
and gets NaN in ``per_class``, as the devkit's division by zero would).

Boxes are continuous pixel coordinates (``bbox = [left, top, w, h]``, the COCO convention used everywhere in
multibox), so IoU has no "+1". :mod:`multibox.data.voc` converts VOC's 1-based inclusive indices so that areas
equal the devkit's. ``pixel_inclusive=True`` gives the devkit's own "+1" arithmetic, for boxes whose corners are
inclusive pixel indices (``x2 = x + w - 1``).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["voc_ap", "evaluate_voc"]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """AP from cumulative recall / precision arrays (detections in score order), as the VOC devkit computes it."""
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            above = recall >= t
            ap += (precision[above].max() if above.any() else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]          # precision envelope
    changes = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray, plus: float) -> np.ndarray:
    """IoU of one xyxy box with (n, 4) xyxy boxes; ``plus`` = 1 for the devkit's inclusive pixel arithmetic."""
    iw = np.maximum(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + plus, 0.0)
    ih = np.maximum(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + plus, 0.0)
    inter = iw * ih
    union = ((box[2] - box[0] + plus) * (box[3] - box[1] + plus)
             + (boxes[:, 2] - boxes[:, 0] + plus) * (boxes[:, 3] - boxes[:, 1] + plus) - inter)
    return inter / union


def evaluate_voc(gt: Mapping[str, Any], detections: Iterable[Mapping[str, Any]],
                 image_ids: Iterable[int] | None = None, iou_threshold: float = 0.5,
                 pixel_inclusive: bool = False) -> dict[str, Any]:
    """VOC metrics of COCO-format ``detections`` against a COCO-format ``gt`` dict.

    Args:
        gt: COCO instances dict (e.g. ``VOCDetection.coco_gt()`` or ``DataSplits.val_gt``). An annotation is
            difficult if its ``difficult`` key is true, else if ``iscrowd`` is.
        detections: COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.
        image_ids: evaluate only these images (default: all images of ``gt``); other detections are ignored.
        iou_threshold: 0.5 in the VOC protocol.
        pixel_inclusive: use the devkit's "+1" box arithmetic (for boxes in VOC's raw 1-based coordinates).

    Returns:
        ``{"VOC07_mAP": float, "VOC_mAP": float, "per_class": {name: {"VOC07_AP", "VOC_AP", "num_gt"}}}``;
        fractions in [0, 1]. The two mAP keys are the ones ``eval.json`` carries for VOC data.
    """
    plus = 1.0 if pixel_inclusive else 0.0
    keep_images = {img["id"] for img in gt["images"]} if image_ids is None else set(image_ids)
    categories = sorted(gt["categories"], key=lambda c: c["id"])
    gt_boxes, num_gt = _ground_truth(gt, keep_images, [c["id"] for c in categories], plus)
    per_category = _detections_by_category(detections, keep_images, [c["id"] for c in categories], plus)

    per_class: dict[str, dict[str, float]] = {}
    ap07s, aps = [], []
    for cat in categories:
        cid = cat["id"]
        tp, fp = _match_category(per_category[cid], cid, gt_boxes, iou_threshold, plus)
        n = num_gt.get(cid, 0)
        name = str(cat.get("name", cid))
        if n == 0:
            per_class[name] = {"VOC07_AP": math.nan, "VOC_AP": math.nan, "num_gt": 0}
            continue
        tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
        recall = tp_c / n
        precision = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
        ap07, ap = voc_ap(recall, precision, True), voc_ap(recall, precision, False)
        per_class[name] = {"VOC07_AP": ap07, "VOC_AP": ap, "num_gt": n}
        ap07s.append(ap07)
        aps.append(ap)
    return {"VOC07_mAP": float(np.mean(ap07s)) if ap07s else math.nan,
            "VOC_mAP": float(np.mean(aps)) if aps else math.nan, "per_class": per_class}


def _ground_truth(gt: Mapping[str, Any], keep_images: set, category_ids: list[int], plus: float
                  ) -> tuple[dict[tuple[int, int], tuple[list, list]], dict[int, int]]:
    """(image, category) -> (boxes xyxy [n][4], difficult [n]), and the non-difficult count per category."""
    gt_boxes: dict[tuple[int, int], tuple[list, list]] = {}
    num_gt: dict[int, int] = {cid: 0 for cid in category_ids}
    for a in gt["annotations"]:
        if a["image_id"] not in keep_images:
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        difficult = bool(a.get("difficult", a.get("iscrowd", 0)))
        boxes, flags = gt_boxes.setdefault((a["image_id"], a["category_id"]), ([], []))
        boxes.append([x, y, x + w - plus, y + h - plus])   # ltwh -> xyxy, inclusive corners when plus = 1
        flags.append(difficult)
        if not difficult:
            num_gt[a["category_id"]] = num_gt.get(a["category_id"], 0) + 1
    return gt_boxes, num_gt


def _detections_by_category(detections: Iterable[Mapping[str, Any]], keep_images: set, category_ids: list[int],
                            plus: float) -> dict[int, list[tuple[float, int, list[float]]]]:
    """category id -> [(score, image id, box xyxy)] of the detections on the evaluated images, in input order."""
    per_category: dict[int, list[tuple[float, int, list[float]]]] = {cid: [] for cid in category_ids}
    for d in detections:
        if d["image_id"] not in keep_images or d["category_id"] not in per_category:
            continue
        x, y, w, h = (float(v) for v in d["bbox"])
        per_category[d["category_id"]].append((float(d["score"]), d["image_id"], [x, y, x + w - plus, y + h - plus]))
    return per_category


def _match_category(dets: list[tuple[float, int, list[float]]], cid: int,
                    gt_boxes: dict[tuple[int, int], tuple[list, list]], iou_threshold: float, plus: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The devkit's greedy matching of one category's detections, by descending score (stable on ties):
    (tp, fp), each (len(dets),) in rank order; a detection matching a difficult object is neither."""
    order = np.argsort(-np.asarray([s for s, _, _ in dets], np.float64), kind="stable")
    claimed: dict[int, np.ndarray] = {}
    tp = np.zeros(len(dets))
    fp = np.zeros(len(dets))
    for rank, i in enumerate(order):
        _, image_id, box = dets[i]
        entry = gt_boxes.get((image_id, cid))
        if entry is None:
            fp[rank] = 1
            continue
        boxes = np.asarray(entry[0], np.float64)
        ious = _iou_one_to_many(np.asarray(box, np.float64), boxes, plus)
        j = int(np.argmax(ious))
        if ious[j] > iou_threshold:
            if entry[1][j]:
                continue                      # difficult: ignored
            seen = claimed.setdefault(image_id, np.zeros(len(boxes), bool))
            if not seen[j]:
                tp[rank], seen[j] = 1, True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    return tp, fp
