"""One training epoch and one evaluation pass, as plain functions."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .boxes import xyxy_to_ltwh
from .matching import TargetEncoder, pad_targets
from .postprocess import PostProcessor


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, lr_init: float, lr_peak: float,
                     lr_end: float) -> float:
    """The tutorial's schedule, per step: linear from ``lr_init`` to ``lr_peak`` over the warm-up, then a cosine
    from ``lr_peak`` down to ``lr_end`` at ``total_steps``."""
    if step < warmup_steps:
        return lr_init + (lr_peak - lr_init) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr_end + (lr_peak - lr_end) * (1 + math.cos(math.pi * min(1.0, progress))) / 2


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on CUDA; plain fp32 elsewhere (CPU autocast is slower than fp32 for these convs)."""
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def train_one_epoch(model: nn.Module, criterion: nn.Module, encoder: TargetEncoder, loader: Iterable,
                    optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float], device: torch.device,
                    start_step: int, amp_dtype: torch.dtype | None = None, grad_clip: float | None = None,
                    log: Callable[[dict], None] | None = None, log_every: int = 10,
                    progress: bool = True, desc: str = "train") -> dict[str, float]:
    """Train over ``loader`` once; returns the epoch's mean losses and the next global step.

    The learning rate is set from the global step before every update, so a resumed run continues the schedule.
    Steps whose loss is not finite are skipped (no update) and counted.
    """
    model.train()
    step, totals, count, skipped = start_step, {"loss": 0.0, "loss_cls": 0.0, "loss_loc": 0.0}, 0, 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        gt_boxes, gt_labels = pad_targets([t["boxes"] for t in targets], [t["labels"] for t in targets], device)
        loc_targets, labels = encoder(gt_boxes, gt_labels)
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, amp_dtype):
            loc, cls = model(images)
        losses = criterion(loc, cls, loc_targets, labels)
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(losses["loss"]):
            skipped += 1
            step += 1
            continue
        losses["loss"].backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        values = {k: float(losses[k].detach()) for k in totals}
        for k in totals:
            totals[k] += values[k]
        count += 1
        if log is not None and step % log_every == 0:
            log({"kind": "train", "step": step, "lr": lr, **values, "num_pos": float(losses["num_pos"])})
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}")
        step += 1
    means = {k: v / max(1, count) for k, v in totals.items()}
    return {**means, "next_step": step, "skipped_steps": skipped}


@torch.no_grad()
def predict_batches(model: nn.Module, postprocess: PostProcessor, loader: Iterable, device: torch.device,
                    amp_dtype: torch.dtype | None = None, progress: bool = False, desc: str = "eval"):
    """Yield (targets, detections) per batch; detections are in original-image pixels."""
    model.eval()
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        with autocast(device, amp_dtype):
            loc, cls = model(images.to(device, non_blocking=True))
        sizes = [t["orig_size"] for t in targets]
        yield targets, postprocess(loc, cls, model.anchors_cxcywh, sizes)


def to_coco_results(image_id: int, detections: dict[str, Tensor], label_to_category_id: dict[int, int]) -> list[dict]:
    """One image's detections (xyxy pixels) -> COCO result dicts (bbox = [left, top, width, height])."""
    boxes = xyxy_to_ltwh(detections["boxes"]).cpu().tolist()
    scores = detections["scores"].cpu().tolist()
    labels = detections["labels"].cpu().tolist()
    return [{"image_id": image_id, "category_id": label_to_category_id[lab], "bbox": [round(v, 3) for v in box],
             "score": round(score, 5)} for box, score, lab in zip(boxes, scores, labels)]


def collect_coco_results(model: nn.Module, postprocess: PostProcessor, loader: Iterable, device: torch.device,
                         label_to_category_id: dict[int, int], amp_dtype: torch.dtype | None = None,
                         progress: bool = False) -> list[dict]:
    results: list[dict] = []
    for targets, detections in predict_batches(model, postprocess, loader, device, amp_dtype, progress):
        for target, det in zip(targets, detections):
            results += to_coco_results(int(target["image_id"]), det, label_to_category_id)
    return results
