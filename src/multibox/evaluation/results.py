"""Detections -> COCO result dicts: the one builder behind ``eval.json`` (evaluation passes) and
``detections.json`` (``multibox predict``).

Light on purpose: torch and the box maths only, no COCO evaluator or plotting library, so the prediction path
can import it without pulling those in.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from multibox.core.boxes import xyxy_to_ltwh

__all__ = ["BBOX_DECIMALS", "SCORE_DECIMALS", "to_coco_results"]

# Rounding of the written numbers: 1/1000 pixel and 1e-5 of score are far below what changes a COCO metric,
# and keep the JSON files small. eval.json's numbers were computed from results rounded this way.
BBOX_DECIMALS = 3
SCORE_DECIMALS = 5


def to_coco_results(image_id: Any, detections: Mapping[str, Tensor], label_to_category_id: Mapping[int, int | None],
                    class_names: Sequence[str] | None = None, **extra: Any) -> list[dict]:
    """One image's detections -> COCO result dicts, in detection order.

    Args:
        image_id: the ``image_id`` of every result (an int id, a file stem, a frame index).
        detections: ``boxes`` (K, 4) xyxy pixels, ``scores`` (K,), ``labels`` (K,) int model labels.
        label_to_category_id: model label -> ``category_id`` (:mod:`multibox.data.categories`: a label is not an
            id); a label mapped to None (a class of the model that the evaluated data does not have) is left out.
        class_names: when given, each result also has ``category_name`` = ``class_names[label]``.
        extra: fields added to every result after ``score`` (e.g. ``video``, ``time``).
    Returns:
        ``{"image_id", "category_id", ["category_name",] "bbox": [left, top, width, height] (ltwh pixels,
        rounded to BBOX_DECIMALS), "score" (rounded to SCORE_DECIMALS), **extra}`` per kept detection.
    """
    boxes = detections["boxes"]
    # Half-precision boxes (an fp16 detector) are widened first: ltwh in fp16 would lose pixels.
    boxes_ltwh = xyxy_to_ltwh(boxes.to(torch.promote_types(boxes.dtype, torch.float32))).cpu().tolist()
    scores = detections["scores"].cpu().tolist()
    labels = detections["labels"].cpu().tolist()
    results = []
    for box_ltwh, score, label in zip(boxes_ltwh, scores, labels):
        category_id = label_to_category_id[label]
        if category_id is None:
            continue
        result = {"image_id": image_id, "category_id": category_id}
        if class_names is not None:
            result["category_name"] = class_names[label]
        result["bbox"] = [round(v, BBOX_DECIMALS) for v in box_ltwh]
        result["score"] = round(score, SCORE_DECIMALS)
        results.append({**result, **extra})
    return results
