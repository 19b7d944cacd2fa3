"""Evaluation passes: run a network over a dataset's evaluation split, turn its detections into COCO results
(with the data's own category ids) and score them (COCO metrics; VOC mAP too for VOC data)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.utils.data import Subset

from multibox import distributed as mbdist
from multibox.config import Config
from multibox.core.postprocess import PostProcessor, build_postprocessor, detections_to_cpu
from multibox.data.build import DataSplits, make_loader
from multibox.data.categories import category_ids_of, match_categories
from multibox.evaluation.coco import evaluate_coco
from multibox.evaluation.results import to_coco_results
from multibox.evaluation.voc import evaluate_voc
from multibox.io import progress_bar
from multibox.runtime import autocast, inference_dtype


@torch.no_grad()
def predict_batches(model: nn.Module, postprocess: PostProcessor, loader: Iterable, device: torch.device,
                    amp_dtype: torch.dtype | None = None, progress: bool = False, desc: str = "eval"):
    """Yield (targets, detections) per batch; detections are in original-image pixels."""
    model.eval()
    for images, targets in progress_bar(loader, progress, desc=desc, leave=False):
        if not targets:   # every image of the batch was unreadable (and skipped)
            continue
        with autocast(device, amp_dtype):
            loc, cls = model(images.to(device, non_blocking=True))
        sizes = [t["orig_size"] for t in targets]
        yield targets, postprocess(loc, cls, model.anchors_cxcywh, sizes)


def collect_coco_results(model: nn.Module, postprocess: PostProcessor, loader: Iterable, device: torch.device,
                         label_to_category_id: dict[int, int | None], amp_dtype: torch.dtype | None = None,
                         progress: bool = False) -> list[dict]:
    results: list[dict] = []
    for targets, detections in predict_batches(model, postprocess, loader, device, amp_dtype, progress):
        for target, det in zip(targets, detections_to_cpu(detections)):
            results += to_coco_results(int(target["image_id"]), det, label_to_category_id)
    return results


def category_map_by_name(model_class_names: list[str], splits: DataSplits,
                         model_category_ids: list[int] | None = None) -> dict[int, int | None]:
    """Model label -> the evaluated data's category id (:func:`multibox.data.categories.match_categories`: by
    (name, id), then by name; index 0 is background). ``model_category_ids``: the checkpoint's ``category_ids``
    (None: :func:`~multibox.data.categories.category_ids_of`'s fallback for the names).

    A model may have more classes than the data -- torchvision's 91 COCO slots with their "N/A" gaps, or a subset
    of categories being evaluated: those labels map to None and their detections are not scored. Every class of
    the data must be a class of the model (ValueError)."""
    model_ids = category_ids_of(model_class_names, model_category_ids)
    return match_categories(model_class_names, model_ids, splits.class_names, splits.label_to_category_id)


def evaluate_model(cfg: Config, model: nn.Module, splits: DataSplits, device: torch.device, progress: bool = False,
                   verbose: bool = False, return_detections: bool = False,
                   label_to_category_id: dict[int, int | None] | None = None):
    """COCO evaluation of ``model`` on ``splits.val``. Distributed: every rank predicts every N-th image, the
    detections are gathered, rank 0 scores them and all ranks return its result. With ``return_detections``,
    returns (result, COCO result dicts). ``label_to_category_id``: the model's labels -> the data's category
    ids when they are not the data's own (see :func:`category_map_by_name`)."""
    model = mbdist.unwrap(model)
    world, rank = mbdist.world_size(), mbdist.rank()
    val = splits.val if world == 1 else Subset(splits.val, range(rank, len(splits.val), world))
    loader = make_loader(val, cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                         seed=cfg.train.seed)
    results = collect_coco_results(model, build_postprocessor(cfg), loader, device,
                                   label_to_category_id or splits.label_to_category_id,
                                   inference_dtype(cfg), progress and rank == 0)
    if world > 1:
        results = [r for part in mbdist.all_gather_object(results) for r in part]
    result = None
    if rank == 0:
        result = evaluate_coco(splits.val_gt, results, backend=cfg.eval.backend, image_ids=splits.val_image_ids,
                               verbose=verbose)
        if splits.val_source_kind == "voc":
            voc = evaluate_voc(splits.val_gt, results, image_ids=splits.val_image_ids)
            result.voc = {"VOC07_mAP": voc["VOC07_mAP"], "VOC_mAP": voc["VOC_mAP"]}
    result = result if world == 1 else mbdist.broadcast_object(result)
    return (result, results) if return_detections else result
