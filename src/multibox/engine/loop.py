"""One training epoch: a loop over :func:`train_step` (one batch), with what carries from step to step
(:class:`EpochProgress`) and what stops a run (:class:`NonFiniteTrainingError`)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from multibox import distributed as mbdist
from multibox.config import Config
from multibox.core.matching import TargetEncoder, pad_targets
from multibox.errors import MultiboxError
from multibox.io import progress_bar
from multibox.runtime import autocast, training_amp_dtype

logger = logging.getLogger("multibox.train")


class NonFiniteTrainingError(MultiboxError, RuntimeError):
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


@dataclass(frozen=True)
class StepOptions:
    """How a training step runs. ``amp_dtype``: autocast dtype of the forward pass (None: fp32); ``grad_clip``:
    maximum total gradient norm (None or 0: no clipping); ``freeze_bn``: BatchNorm layers in eval mode (see
    :func:`freeze_batchnorm`); ``max_nonfinite``: consecutive non-finite steps that stop training (0: no limit);
    ``log_every``: a ``train`` record every that many steps; ``progress``: a progress bar (drawn only when stderr
    is a terminal)."""

    amp_dtype: torch.dtype | None = None
    grad_clip: float | None = None
    freeze_bn: bool = False
    max_nonfinite: int = 0
    log_every: int = 10
    progress: bool = False

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device, progress: bool) -> "StepOptions":
        return cls(training_amp_dtype(cfg, device), cfg.train.grad_clip, cfg.train.freeze_bn,
                   cfg.train.max_nonfinite_steps, cfg.train.log_every, progress)


@dataclass
class StepParts:
    """What a training step works with. ``model``: the SSD, or DistributedDataParallel around it, images
    (B, 3, S, S) -> (loc (B, A, 4), cls (B, A, C)); ``encoder``: padded ground truth (B, G, 4), (B, G) -> (loc
    targets (B, A, 4), anchor labels (B, A)); ``criterion``: -> {"loss", "loss_cls", "loss_loc", "num_pos"};
    ``lr_at``: global step -> learning rate; ``scaler``: fp16 loss scaling (None: none)."""

    model: nn.Module
    criterion: nn.Module
    encoder: TargetEncoder
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]
    device: torch.device
    scaler: "torch.amp.GradScaler | None" = None
    options: StepOptions = field(default_factory=StepOptions)


@dataclass(frozen=True)
class StepOutcome:
    """What one step did, in global values (the same on every rank). ``losses``: loss, loss_cls, loss_loc summed
    over the global batch / ``num_pos`` (its positive anchors, at least 1); ``skipped_images``: unreadable images
    dropped from the global batch; ``reason``: why the step was skipped ("empty", "loss" or "grad": non-finite),
    None when the weights were updated; ``grad_norm``: the non-finite gradient norm of a "grad" skip."""

    step: int
    lr: float
    losses: dict[str, float]
    num_pos: float
    skipped_images: int
    reason: str | None = None
    grad_norm: float | None = None


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (running statistics; scale and shift still train).

    Used with ``train.freeze_bn``: the loss of an image then does not depend on the other images of its batch,
    so N processes with batch B/N compute exactly the gradient of one process with batch B.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


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


def train_one_epoch(parts: StepParts, loader: Iterable, start_step: int, state: EpochProgress | None = None,
                    log: Callable[[dict], None] | None = None,
                    after_batch: Callable[[EpochProgress, int], None] | None = None,
                    desc: str = "train") -> dict[str, float]:
    """Train over ``loader`` once from global step ``start_step``; returns the epoch's mean losses, the next global
    step (``next_step``), ``skipped_steps``, ``skipped_images`` and ``nonfinite_streak``.

    Every batch is one :func:`train_step`; its outcome is counted into ``state`` and logged (``log``: a
    ``metrics.jsonl`` writer). ``state`` continues an epoch from a mid-epoch checkpoint (``loader`` then yields
    only the batches after ``state.batch``); ``after_batch(state, next_step)`` is called after every batch
    (checkpoints). :class:`NonFiniteTrainingError` after ``max_nonfinite`` consecutive non-finite steps.
    """
    parts.model.train()
    if parts.options.freeze_bn:
        freeze_batchnorm(parts.model)
    st = state if state is not None else EpochProgress()
    step = start_step
    bar = progress_bar(loader, parts.options.progress, desc=desc, leave=False)
    for batch in bar:
        outcome = train_step(parts, batch, step)
        _count(st, outcome, parts.options, log)
        if outcome.reason is None:
            bar.set_postfix(loss=f"{outcome.losses['loss']:.3f}", lr=f"{outcome.lr:.2e}")
        step += 1
        st.batch += 1
        if after_batch is not None:
            after_batch(st, step)
    means = {k: v / max(1, st.count) for k, v in st.totals.items()}
    return {**means, "next_step": step, "skipped_steps": st.skipped, "skipped_images": st.skipped_images,
            "nonfinite_streak": st.nonfinite_streak}


def train_step(parts: StepParts, batch, step: int) -> StepOutcome:
    """One batch (images, targets) at global step ``step``: the learning rate from the schedule, targets, forward,
    loss, the global reduction, backward, the non-finite decision and the optimizer step.

    Skipped (no update): a batch with no readable image (or one, where BatchNorm is in training mode), a
    non-finite loss, or a finite loss whose gradient is not finite (checked after backward, from the total
    gradient norm; with an fp16 ``scaler`` after unscaling, and the scaler backs off). A skipped step changes nothing: BatchNorm running statistics updated
    by its forward pass are restored.

    Data-parallel (``parts.model`` wrapped in DistributedDataParallel): the loss is normalised by the number of
    positive anchors of the *global* batch (summed over ranks), and each rank's loss is scaled by the world size
    to undo DDP's gradient averaging, so the update equals the one of a single process on the global batch.
    Every skip decision is taken from all-reduced values, so the ranks stay in step and stop together.
    """
    lr = parts.lr_at(step)
    for group in parts.optimizer.param_groups:
        group["lr"] = lr
    bn_buffers = _batchnorm_buffers(parts.model)
    saved_bn = [b.clone() for b in bn_buffers]
    stats, losses = _forward(parts, batch, min_images=2 if bn_buffers else 1)
    mbdist.all_reduce_sum(stats)
    parts.optimizer.zero_grad(set_to_none=True)
    global_pos = stats[0].clamp(min=1)
    reason, grad_norm = _backward_and_update(parts, stats, losses, global_pos)
    if reason is not None:
        for buf, saved in zip(bn_buffers, saved_bn):
            buf.copy_(saved)
        parts.optimizer.zero_grad(set_to_none=True)
    means = {"loss": float((stats[1] + stats[2]) / global_pos), "loss_cls": float(stats[1] / global_pos),
             "loss_loc": float(stats[2] / global_pos)}
    return StepOutcome(step, lr, means, float(global_pos), int(stats[4].item()), reason, grad_norm)


def _forward(parts: StepParts, batch, min_images: int = 1) -> tuple[Tensor, dict | None]:
    """This rank's part of the step's statistics, (5,) float64: [positives, summed cls loss, summed loc loss,
    empty batch, unreadable images] (one all-reduce then gives the global values), and the criterion's losses
    (None for a batch with fewer than ``min_images`` readable images: 2 where BatchNorm computes batch statistics,
    which one image cannot give on a 1 x 1 feature map)."""
    images, targets = batch
    stats = torch.zeros(5, dtype=torch.float64, device=parts.device)
    stats[4] = int(getattr(batch, "skipped", 0))
    if len(targets) < min_images:
        stats[3] = 1
        return stats, None
    images = images.to(parts.device, non_blocking=True)
    gt_boxes, gt_labels = pad_targets([t["boxes"] for t in targets], [t["labels"] for t in targets], parts.device)
    loc_targets, labels = parts.encoder(gt_boxes, gt_labels)
    with autocast(parts.device, parts.options.amp_dtype):
        loc, cls = parts.model(images)
    losses = parts.criterion(loc, cls, loc_targets, labels)
    local_pos = losses["num_pos"].detach().double()          # clamped to >= 1 by the criterion
    stats[0] = (labels > 0).sum()
    stats[1] = losses["loss_cls"].detach().double() * local_pos
    stats[2] = losses["loss_loc"].detach().double() * local_pos
    return stats, losses


def _backward_and_update(parts: StepParts, stats: Tensor, losses: dict | None,
                         global_pos: Tensor) -> tuple[str | None, float | None]:
    """Backward and the optimizer step, unless the global ``stats`` or the gradient say skip; returns (reason,
    non-finite gradient norm), (None, None) after an update."""
    if stats[3] > 0:
        return "empty", None
    if not torch.isfinite(stats[1] + stats[2]):
        return "loss", None
    scaler, optimizer = parts.scaler, parts.optimizer
    local_pos = losses["num_pos"].detach().double()
    loss = losses["loss"] * (local_pos / global_pos * mbdist.world_size()).float()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in parts.model.parameters() if p.requires_grad]
    clip = parts.options.grad_clip
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else grad_total_norm(params)
    # DDP has already averaged the gradients, so every rank holds the same norm; reduced anyway so that the
    # decision is joint by construction.
    bad = (~torch.isfinite(norm)).to(device=parts.device, dtype=torch.float64).reshape(1)
    if float(mbdist.all_reduce_sum(bad)) > 0:
        if scaler is not None:
            scaler.update()   # the scaler saw the inf in unscale_ and lowers its scale
        return "grad", float(norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return None, None


def _count(st: EpochProgress, outcome: StepOutcome, options: StepOptions,
           log: Callable[[dict], None] | None) -> None:
    """Add a step's outcome to the epoch's progress and log it."""
    st.skipped_images += outcome.skipped_images
    if outcome.reason is None:
        _count_update(st, outcome, options.log_every, log)
    else:
        _count_skip(st, outcome, options.max_nonfinite, log)


def _count_update(st: EpochProgress, outcome: StepOutcome, log_every: int,
                  log: Callable[[dict], None] | None) -> None:
    st.nonfinite_streak = 0
    for k in st.totals:
        st.totals[k] += outcome.losses[k]
    st.count += 1
    if log is not None and outcome.step % log_every == 0:
        log({"kind": "train", "step": outcome.step, "lr": outcome.lr, **outcome.losses, "num_pos": outcome.num_pos})


def _count_skip(st: EpochProgress, outcome: StepOutcome, max_nonfinite: int,
                log: Callable[[dict], None] | None) -> None:
    """Count a skipped step; a non-finite one is logged (``{"kind": "nonfinite", ...}``) and, the
    ``max_nonfinite``-th in a row (0: no limit), raises :class:`NonFiniteTrainingError`."""
    st.skipped += 1
    if outcome.reason == "empty":
        return
    st.nonfinite_streak += 1
    what = "gradient" if outcome.reason == "grad" else "loss"
    record = {"kind": "nonfinite", "step": outcome.step, "reason": outcome.reason,
              "loss": _finite_repr(outcome.losses["loss"]), "consecutive": st.nonfinite_streak, "lr": outcome.lr}
    if outcome.grad_norm is not None:
        record["grad_norm"] = _finite_repr(outcome.grad_norm)
    if log is not None:
        log(record)
    if mbdist.is_main():
        logger.warning("step %d skipped: non-finite %s (loss %s, %d in a row)", outcome.step, what,
                       outcome.losses["loss"], st.nonfinite_streak)
    if max_nonfinite and st.nonfinite_streak >= max_nonfinite:
        raise NonFiniteTrainingError(
            f"stopped at step {outcome.step}: {st.nonfinite_streak} consecutive steps had a non-finite {what} "
            f"(train.max_nonfinite_steps = {max_nonfinite}). Lower train.lr, set train.grad_clip, check the data "
            "with `multibox check-data`, or raise train.max_nonfinite_steps")
