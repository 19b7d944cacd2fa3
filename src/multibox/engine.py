"""One training epoch and one evaluation pass, as plain functions."""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .boxes import xyxy_to_ltwh
from .matching import TargetEncoder, pad_targets
from .postprocess import PostProcessor, detections_to_cpu


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; None: plain fp32. Training asks for it on CUDA only; inference also on
    the CPU when ``eval.precision`` says so (bf16 convolutions are ~2x faster on CPUs with native bf16)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (running statistics; scale and shift still train).

    Used with ``train.freeze_bn``: the loss of an image then does not depend on the other images of its batch,
    so N processes with batch B/N compute exactly the gradient of one process with batch B.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: too many consecutive steps had a non-finite loss or gradient (``train.max_nonfinite_steps``),
    or the weights themselves became non-finite. The last good checkpoint is left as it was."""


@dataclass
class EpochProgress:
    """Where training stands inside an epoch; saved in mid-epoch checkpoints so a resumed run continues exactly.

    ``batch``: batches of the epoch done (updates and skipped steps alike); ``totals`` / ``count``: sums of the
    logged losses over the updates and their number (the epoch's means); ``skipped``: steps skipped (empty batch
    or non-finite); ``skipped_images``: unreadable images dropped (global); ``nonfinite_streak``: consecutive
    non-finite steps so far (carries over epochs).
    """

    batch: int = 0
    totals: dict = field(default_factory=lambda: {"loss": 0.0, "loss_cls": 0.0, "loss_loc": 0.0})
    count: int = 0
    skipped: int = 0
    skipped_images: int = 0
    nonfinite_streak: int = 0

    def to_dict(self) -> dict:
        return {"batch": self.batch, "totals": dict(self.totals), "count": self.count, "skipped": self.skipped,
                "skipped_images": self.skipped_images, "nonfinite_streak": self.nonfinite_streak}

    @classmethod
    def from_dict(cls, raw: dict) -> "EpochProgress":
        return cls(int(raw["batch"]), {k: float(v) for k, v in raw["totals"].items()}, int(raw["count"]),
                   int(raw["skipped"]), int(raw["skipped_images"]), int(raw["nonfinite_streak"]))


def grad_total_norm(parameters: Iterable[Tensor]) -> Tensor:
    """L2 norm of all gradients (as ``clip_grad_norm_`` computes it, without clipping); 0 when there are none.
    Non-finite when any gradient entry is (or when the sum of squares overflows)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))


def _batchnorm_buffers(model: nn.Module) -> list[Tensor]:
    """Running statistics that a training-mode forward pass updates (restored when the step is skipped)."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


def _finite_repr(value: float) -> float | str:
    """A float for JSON: non-finite values as strings ("nan", "inf"), so metrics.jsonl stays strict JSON."""
    return value if math.isfinite(value) else str(value)


def train_one_epoch(model: nn.Module, criterion: nn.Module, encoder: TargetEncoder, loader: Iterable,
                    optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float], device: torch.device,
                    start_step: int, amp_dtype: torch.dtype | None = None, grad_clip: float | None = None,
                    log: Callable[[dict], None] | None = None, log_every: int = 10,
                    progress: bool = True, desc: str = "train", freeze_bn: bool = False,
                    scaler: "torch.amp.GradScaler | None" = None, max_nonfinite: int = 0,
                    state: EpochProgress | None = None,
                    after_batch: Callable[[EpochProgress, int], None] | None = None) -> dict[str, float]:
    """Train over ``loader`` once; returns the epoch's mean losses and the next global step.

    The learning rate is set from the global step before every update, so a resumed run continues the schedule.
    Images the loader dropped as unreadable (``Batch.skipped``) are counted in ``skipped_images``.

    Skipped steps (no update; ``skipped_steps``): a batch with no readable image, a non-finite loss, or a finite
    loss whose gradient is not finite (checked after backward, from the total gradient norm; with an fp16
    ``scaler`` after unscaling, and the scaler backs off). A skipped step changes nothing: BatchNorm running
    statistics updated by its forward pass are restored. Every non-finite step is logged (``{"kind":
    "nonfinite", ...}``); after ``max_nonfinite`` consecutive ones (0: no limit) :class:`NonFiniteTrainingError`
    is raised.

    ``state`` continues an epoch from a mid-epoch checkpoint (``loader`` then yields only the batches after
    ``state.batch``); ``after_batch(state, next_step)`` is called after every batch (checkpoints).

    Data-parallel (``model`` wrapped in DistributedDataParallel, process group initialised): the loss is
    normalised by the number of positive anchors of the *global* batch (summed over ranks), and each rank's
    loss is scaled by the world size to undo DDP's gradient averaging, so the update equals the one of a single
    process on the global batch. Logged losses are global; every skip decision is taken jointly by all ranks
    (from all-reduced values), so the ranks stay in step and stop together.
    """
    from . import distributed as mbdist

    model.train()
    if freeze_bn:
        freeze_batchnorm(model)
    world = mbdist.world_size()
    st = state if state is not None else EpochProgress()
    step = start_step
    params = [p for p in model.parameters() if p.requires_grad]
    bn_buffers = _batchnorm_buffers(model)
    say = logging.getLogger("multibox.train").warning if mbdist.is_main() else (lambda *a: None)
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for batch in bar:
        images, targets = batch
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        saved_bn = [b.clone() for b in bn_buffers]
        # [positives, summed cls loss, summed loc loss, empty batch, unreadable images]: one all-reduce gives the
        # global values.
        stats = torch.zeros(5, dtype=torch.float64, device=device)
        stats[4] = int(getattr(batch, "skipped", 0))
        losses = None
        if len(targets):
            images = images.to(device, non_blocking=True)
            gt_boxes, gt_labels = pad_targets([t["boxes"] for t in targets], [t["labels"] for t in targets], device)
            loc_targets, labels = encoder(gt_boxes, gt_labels)
            with autocast(device, amp_dtype):
                loc, cls = model(images)
            losses = criterion(loc, cls, loc_targets, labels)
            local_pos = losses["num_pos"].detach().double()          # clamped to >= 1 by the criterion
            stats[0] = (labels > 0).sum()
            stats[1] = losses["loss_cls"].detach().double() * local_pos
            stats[2] = losses["loss_loc"].detach().double() * local_pos
        else:
            stats[3] = 1
        mbdist.all_reduce_sum(stats)
        st.skipped_images += int(stats[4].item())
        optimizer.zero_grad(set_to_none=True)
        global_pos = stats[0].clamp(min=1)
        reason, grad_norm = None, None
        if stats[3] > 0:
            reason = "empty"
        elif not torch.isfinite(stats[1] + stats[2]):
            reason = "loss"
        else:
            scale = (local_pos / global_pos * world).float()
            loss = losses["loss"] * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            norm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip else grad_total_norm(params))
            # DDP has already averaged the gradients, so every rank holds the same norm; reduced anyway so that
            # the decision is joint by construction.
            bad = (~torch.isfinite(norm)).to(device=device, dtype=torch.float64).reshape(1)
            if float(mbdist.all_reduce_sum(bad)) > 0:
                reason, grad_norm = "grad", float(norm)
                if scaler is not None:
                    scaler.update()   # the scaler saw the inf in unscale_ and lowers its scale
            else:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
        if reason is not None:
            for buf, saved in zip(bn_buffers, saved_bn):
                buf.copy_(saved)
            optimizer.zero_grad(set_to_none=True)
            st.skipped += 1
            if reason != "empty":
                st.nonfinite_streak += 1
                loss_value = float((stats[1] + stats[2]) / global_pos)
                record = {"kind": "nonfinite", "step": step, "reason": reason, "loss": _finite_repr(loss_value),
                          "consecutive": st.nonfinite_streak, "lr": lr}
                if grad_norm is not None:
                    record["grad_norm"] = _finite_repr(grad_norm)
                if log is not None:
                    log(record)
                say("step %d skipped: non-finite %s (loss %s, %d in a row)", step,
                    "gradient" if reason == "grad" else "loss", loss_value, st.nonfinite_streak)
                if max_nonfinite and st.nonfinite_streak >= max_nonfinite:
                    raise NonFiniteTrainingError(
                        f"stopped at step {step}: {st.nonfinite_streak} consecutive steps had a non-finite "
                        f"{'gradient' if reason == 'grad' else 'loss'} (train.max_nonfinite_steps = {max_nonfinite}). "
                        "Lower train.lr, set train.grad_clip, check the data with `multibox check-data`, or raise "
                        "train.max_nonfinite_steps")
        else:
            st.nonfinite_streak = 0
            values = {"loss": float((stats[1] + stats[2]) / global_pos), "loss_cls": float(stats[1] / global_pos),
                      "loss_loc": float(stats[2] / global_pos)}
            for k in st.totals:
                st.totals[k] += values[k]
            st.count += 1
            if log is not None and step % log_every == 0:
                log({"kind": "train", "step": step, "lr": lr, **values, "num_pos": float(global_pos)})
            bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}")
        step += 1
        st.batch += 1
        if after_batch is not None:
            after_batch(st, step)
    means = {k: v / max(1, st.count) for k, v in st.totals.items()}
    return {**means, "next_step": step, "skipped_steps": st.skipped, "skipped_images": st.skipped_images,
            "nonfinite_streak": st.nonfinite_streak}


@torch.no_grad()
def predict_batches(model: nn.Module, postprocess: PostProcessor, loader: Iterable, device: torch.device,
                    amp_dtype: torch.dtype | None = None, progress: bool = False, desc: str = "eval"):
    """Yield (targets, detections) per batch; detections are in original-image pixels."""
    model.eval()
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        if not targets:   # every image of the batch was unreadable (and skipped)
            continue
        with autocast(device, amp_dtype):
            loc, cls = model(images.to(device, non_blocking=True))
        sizes = [t["orig_size"] for t in targets]
        yield targets, postprocess(loc, cls, model.anchors_cxcywh, sizes)


def to_coco_results(image_id: int, detections: dict[str, Tensor],
                    label_to_category_id: dict[int, int | None]) -> list[dict]:
    """One image's detections (xyxy pixels) -> COCO result dicts (bbox = [left, top, width, height]). Labels mapped
    to None (classes of the model that the evaluated data does not have) are left out."""
    boxes = xyxy_to_ltwh(detections["boxes"]).cpu().tolist()
    scores = detections["scores"].cpu().tolist()
    labels = detections["labels"].cpu().tolist()
    return [{"image_id": image_id, "category_id": label_to_category_id[lab], "bbox": [round(v, 3) for v in box],
             "score": round(score, 5)} for box, score, lab in zip(boxes, scores, labels)
            if label_to_category_id[lab] is not None]


def collect_coco_results(model: nn.Module, postprocess: PostProcessor, loader: Iterable, device: torch.device,
                         label_to_category_id: dict[int, int | None], amp_dtype: torch.dtype | None = None,
                         progress: bool = False) -> list[dict]:
    results: list[dict] = []
    for targets, detections in predict_batches(model, postprocess, loader, device, amp_dtype, progress):
        for target, det in zip(targets, detections_to_cpu(detections)):
            results += to_coco_results(int(target["image_id"]), det, label_to_category_id)
    return results
