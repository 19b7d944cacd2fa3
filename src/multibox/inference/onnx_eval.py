"""COCO evaluation of an exported model (:class:`~multibox.inference.onnx.OnnxDetector`), the counterpart of
:func:`multibox.evaluation.evaluate.evaluate_model` for checkpoints: same split, same scoring, same result.

The images go through the detector's own :meth:`~multibox.inference.onnx.OnnxDetector.predict` -- the
preprocessing a deployed model gets (:func:`~multibox.inference.onnx.resize_for_model` to the export's (H, W) with
its resize -- stretched or letterboxed -- and input dtype), not the training pipeline's
:class:`~multibox.data.transforms.EvalTransform`: decoded uint8 images in, detections in original-image pixels out
(the letterbox padding and scale undone), scored against the split's ground truth.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from multibox.data.build import DataSplits, TransformedSubset, make_loader
from multibox.evaluation.coco import evaluate_coco
from multibox.evaluation.results import to_coco_results
from multibox.evaluation.voc import evaluate_voc
from multibox.io import progress_bar

__all__ = ["evaluate_onnx", "raw_evaluation_images"]


def _keep_decoded(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """The transform of :func:`raw_evaluation_images`: the decoded (3, H, W) uint8 image as it is."""
    return image, target


def _collate_lists(batch: Sequence[tuple[Tensor, dict] | None]) -> tuple[list[Tensor], list[dict]]:
    """(images, targets) lists of a batch of images of any sizes; unreadable ones (None, logged by the dataset)
    are left out."""
    kept = [sample for sample in batch if sample is not None]
    return [image for image, _ in kept], [target for _, target in kept]


def raw_evaluation_images(splits: DataSplits) -> TransformedSubset:
    """``splits.val`` without its EvalTransform: ``(uint8 (3, H, W) image, target)`` per image, the same images
    in the same order (what a deployed model is given)."""
    val = splits.val
    if not isinstance(val, TransformedSubset):
        raise TypeError(f"splits.val must be the TransformedSubset of build_splits, got {type(val).__name__}")
    return TransformedSubset(val.dataset, val.indices, _keep_decoded)


def evaluate_onnx(detector: Any, splits: DataSplits, progress: bool = False, return_detections: bool = False,
                  label_to_category_id: dict[int, int | None] | None = None, cfg: Any = None):
    """COCO evaluation of ``detector`` (an :class:`~multibox.inference.onnx.OnnxDetector`, any runtime, or anything
    with its ``predict``) on ``splits.val`` (from :func:`multibox.data.build.build_splits`), batched and scored as
    ``cfg`` (default ``detector.cfg``) says: ``eval.batch_size``, ``eval.backend``, ``data.num_workers``.

    Detections at the model's own thresholds (``predict(score=None)``: the graph's, which are the config's
    ``eval.*`` of the checkpoint, as :func:`~multibox.evaluation.evaluate.evaluate_model` applies them).
    ``label_to_category_id``: the model's labels -> the data's category ids when they are not the data's own
    (:func:`multibox.evaluation.evaluate.category_map_by_name`). Returns a
    :class:`~multibox.evaluation.coco.CocoEvalResult` (VOC metrics too for VOC data), or ``(result, COCO result
    dicts)`` with ``return_detections``.
    """
    cfg = detector.cfg if cfg is None else cfg
    mapping = label_to_category_id or splits.label_to_category_id
    loader = make_loader(raw_evaluation_images(splits), cfg.eval.batch_size, shuffle=False,
                         num_workers=cfg.data.num_workers, seed=cfg.train.seed, collate_fn=_collate_lists)
    results: list[dict] = []
    with torch.inference_mode():
        for images, targets in progress_bar(loader, progress, desc="eval", leave=False):
            if not images:   # every image of the batch was unreadable
                continue
            detections = detector.predict(images, batch_size=len(images))
            for target, det in zip(targets, detections):
                results += to_coco_results(int(target["image_id"]), det, mapping)
    result = evaluate_coco(splits.val_gt, results, backend=cfg.eval.backend, image_ids=splits.val_image_ids,
                           verbose=False)
    if splits.val_source_kind == "voc":
        voc = evaluate_voc(splits.val_gt, results, image_ids=splits.val_image_ids)
        result.voc = {"VOC07_mAP": voc["VOC07_mAP"], "VOC_mAP": voc["VOC_mAP"]}
    return (result, results) if return_detections else result
