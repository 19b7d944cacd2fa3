"""``multibox train``: the training run, top to bottom.

Writes into the run folder: ``config.yaml``, ``metrics.jsonl``, ``last.pt`` (every epoch, and every
``train.checkpoint_every_steps`` steps), ``epoch_N.pt`` (every ``train.checkpoint_every`` epochs), ``best.pt``
(highest AP), ``eval.json`` (evaluation of ``best.pt``) and ``curves.png``.

Reliability (a run lasts days):

* checkpoints are written atomically (:func:`multibox.checkpoint.save_checkpoint`): a crash, a kill or a full disk
  while writing leaves the previous one intact; weights that are not finite are never written;
* ``--resume DIR`` continues from ``DIR/last.pt`` exactly where it stopped, also in the middle of an epoch:
  model, optimizer, fp16 loss scaler, RNG states (every rank's), epoch, batch of the epoch, global step (the LR
  schedule is a function of it), the epoch's running sums, best metrics and the non-finite counter. The
  epoch's order is a function of (seed, epoch) (``EpochShuffleSampler``, which skips the batches done) and
  each sample's augmentation of (seed, epoch, index) (:func:`multibox.data.transforms.keyed_generator`);
  ``metrics.jsonl`` is rewound to the checkpoint. With ``train.deterministic`` on CPU the resumed run ends
  with bit-identical weights to an uninterrupted one (tests/test_resume.py);
* a step whose loss or gradient is not finite is skipped, logged, and after ``train.max_nonfinite_steps``
  consecutive ones training stops with :class:`NonFiniteTrainingError` (``last.pt`` keeps the last good state).

Data-parallel: ``torchrun --nproc_per_node=N -m multibox train ...`` (see :mod:`multibox.distributed`). Each rank
reads a disjoint part of every epoch (``EpochShuffleSampler``: global batch s holds the same images whatever N
is), ``train.batch_size`` is the per-rank batch (global batch = batch_size x N; the LR schedule
is not rescaled), gradients are synchronised by DistributedDataParallel, the loss is normalised by the global
number of positives, rank 0 alone logs and writes files, and evaluation runs on all ranks and is gathered.
With ``train.freeze_bn`` the N-process run computes the same updates as one process with the global batch; with
BatchNorm in training mode each rank normalises over its own images (``train.sync_bn`` on CUDA syncs them).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

from . import distributed as mbdist

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, save_config
from .data.build import DataSplits, EpochShuffleSampler, build_splits, make_loader
from .data.gpu_transforms import DeviceAugmentLoader, build_batch_augment
from .engine import EpochProgress, NonFiniteTrainingError, collect_coco_results, train_one_epoch
from .voc_eval import evaluate_voc
from .evaluation import evaluate_coco, format_per_class_table, write_eval_json
from .losses import build_loss
from .matching import TargetEncoder
from .anchors import default_boxes_cxcywh
from .models import anchor_spec, build_model, count_parameters
from .plots import plot_training_curves
from .inference import inference_dtype, training_amp_dtype
from .postprocess import PostProcessor
from .schedules import build_lr_schedule


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_grad_scaler(cfg: Config, device: torch.device) -> "torch.amp.GradScaler | None":
    """Loss scaling for fp16 autocast on CUDA (bf16 and fp32 need none)."""
    if training_amp_dtype(cfg, device) != torch.float16:
        return None
    return torch.amp.GradScaler("cuda")


@contextlib.contextmanager
def deterministic_mode(cfg: Config):
    """``train.deterministic``: deterministic kernels (an error where torch has none), no cuDNN autotuning, a
    fixed number of CPU threads (``train.threads``, default 1: reductions split over threads round
    differently). Restores the previous settings on exit (in-process callers, tests)."""
    if not cfg.train.deterministic:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS (read at CUDA init)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.set_num_threads(cfg.train.threads or 1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_num_threads(saved[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[3], saved[4]


def build_criterion(cfg: Config) -> nn.Module:
    if cfg.loss.kind == "focal":
        return build_loss("focal", alpha=cfg.loss.alpha, gamma=cfg.loss.gamma, beta=cfg.loss.smooth_l1_beta)
    return build_loss(cfg.loss.kind, neg_pos_ratio=cfg.loss.neg_pos_ratio, beta=cfg.loss.smooth_l1_beta)


def build_encoder(cfg: Config, device: torch.device) -> TargetEncoder:
    anchors = default_boxes_cxcywh(anchor_spec(cfg.anchors, cfg.model.image_size), torch.float64)
    return TargetEncoder(anchors, cfg.loss.iou_threshold, cfg.loss.center_variance, cfg.loss.size_variance,
                         cfg.loss.match_rule).to(device)


def build_postprocessor(cfg: Config) -> PostProcessor:
    return PostProcessor(
        score_activation="sigmoid" if cfg.loss.kind == "focal" else "softmax",
        score_threshold=cfg.eval.score_threshold, nms_threshold=cfg.eval.nms_threshold,
        max_per_class=cfg.eval.max_per_class, max_per_image=cfg.eval.max_per_image,
        pre_nms_top_k=cfg.eval.pre_nms_top_k, center_variance=cfg.loss.center_variance,
        size_variance=cfg.loss.size_variance)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Momentum SGD (the tutorial and the paper) or AdamW; BatchNorm's scale and shift get no weight decay (as
    MindSpore's default decay filter)."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for p in m.parameters()}
    decay = [p for p in model.parameters() if id(p) not in norm_params]
    no_decay = [p for p in model.parameters() if id(p) in norm_params]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr_init, momentum=cfg.train.momentum)
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.train.lr_init)
    raise ValueError(f"unknown train.optimizer {cfg.train.optimizer!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def category_map_by_name(model_class_names: list[str], splits: DataSplits) -> dict[int, int | None]:
    """Model label -> the evaluated data's category id, matched by class name (index 0 is background).

    Equal class lists give the data's own mapping. A model may have more classes than the data -- torchvision's
    91 COCO slots with their "N/A" gaps, or a subset of categories being evaluated: those labels map to None and
    their detections are not scored. Every class of the data must be a class of the model."""
    if list(model_class_names) == list(splits.class_names):
        return dict(splits.label_to_category_id)
    model_label = {name: label for label, name in enumerate(model_class_names) if label}
    missing = [name for name in splits.class_names[1:] if name not in model_label]
    if missing:
        raise ValueError(f"the data's classes {missing} are not classes of the model "
                         f"({', '.join(model_class_names[1:])})")
    category_of_name = {name: splits.label_to_category_id[label] for label, name in enumerate(splits.class_names)
                        if label}
    return {label: category_of_name.get(name) for label, name in enumerate(model_class_names) if label}


def evaluate_model(cfg: Config, model: nn.Module, splits: DataSplits, device: torch.device, progress: bool = False,
                   verbose: bool = False, return_detections: bool = False,
                   label_to_category_id: dict[int, int | None] | None = None):
    """COCO evaluation of ``model`` on ``splits.val``. Distributed: every rank predicts every N-th image, the
    detections are gathered, rank 0 scores them and all ranks return its result. With ``return_detections``,
    returns (result, COCO result dicts). ``label_to_category_id``: the model's labels -> the data's category
    ids when they are not the data's own (see :func:`category_map_by_name`)."""
    model = getattr(model, "module", model)   # DistributedDataParallel -> the SSD
    world, rank = mbdist.world_size(), mbdist.rank()
    val = splits.val if world == 1 else Subset(splits.val, range(rank, len(splits.val), world))
    loader = make_loader(val, cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                         seed=cfg.train.seed)
    results = collect_coco_results(model, build_postprocessor(cfg), loader, device,
                                   label_to_category_id or splits.label_to_category_id,
                                   inference_dtype(cfg, device), progress and rank == 0)
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


def checkpoint_payload(cfg: Config, model: nn.Module, class_names: list[str], **state) -> dict:
    model = getattr(model, "module", model)   # DistributedDataParallel -> the SSD
    return {"model": model.state_dict(), "config": cfg.to_dict(), "class_names": class_names, **state}


def check_finite_weights(model: nn.Module) -> None:
    """Raise :class:`NonFiniteTrainingError` if a parameter or floating buffer holds NaN / inf (such weights are
    never written over a good checkpoint)."""
    model = getattr(model, "module", model)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteTrainingError(f"the weights became non-finite ({name}); the checkpoint was not written")


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _gather_rng(device: torch.device) -> dict:
    """This process's RNG states; distributed: rank 0's, with every rank's under ``per_rank`` (a collective)."""
    mine = _rng_state(device)
    if not mbdist.is_distributed():
        return mine
    per_rank = mbdist.all_gather_object(mine)
    return {**per_rank[0], "per_rank": per_rank}


def _restore_rng(rng: dict, device: torch.device, rank: int) -> None:
    per_rank = rng.get("per_rank")
    if per_rank is not None:
        if rank >= len(per_rank):   # resumed with more processes (at an epoch boundary): keep the seeded state
            return
        rng = per_rank[rank]
    torch.set_rng_state(rng["torch"].cpu())
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


TRAINING_FIELDS = {"model": dict, "optimizer": dict, "epoch": int, "step": int, "best": dict, "rng": dict}


def restore_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: "torch.amp.GradScaler | None", device: torch.device, rank: int,
                           geometry: dict) -> tuple[dict, EpochProgress]:
    """Load ``path`` (a ``last.pt``) into model, optimizer, scaler and the RNGs; returns (state, progress).

    Raises :class:`CheckpointError` naming the field for a checkpoint that is not a training state, whose weights
    do not fit the model of ``config.yaml``, or that stopped inside an epoch whose batches no longer match
    (``geometry``: steps_per_epoch, world_size, batch_size).
    """
    state = load_checkpoint(path, map_location="cpu")   # load_state_dict copies onto the model's device
    for key, kind in TRAINING_FIELDS.items():
        if not isinstance(state.get(key), kind) or (kind is int and isinstance(state.get(key), bool)):
            raise CheckpointError(f"{path}: not a training checkpoint: field {key!r} missing or not "
                                  f"{kind.__name__} (use it with `multibox eval` / `predict`, or start a new run)")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and isinstance(state.get("scaler"), dict):
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        raise CheckpointError(f"{path}: does not fit the model / optimizer of this run's config.yaml "
                              f"({str(err).strip().splitlines()[0]})") from None
    progress = EpochProgress()
    if isinstance(state.get("progress"), dict):
        try:
            progress = EpochProgress.from_dict(state["progress"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{path}: field 'progress' is malformed ({err!r})") from None
    if progress.batch:
        saved = {k: state.get(k) for k in geometry}
        if saved != geometry:
            raise CheckpointError(f"{path} stopped inside epoch {state['epoch'] + 1} (batch {progress.batch}) with "
                                  f"{saved}; this run has {geometry}: the rest of that epoch is not the same batches. "
                                  "Resume with the same data, batch size and number of processes")
    try:
        _restore_rng(state["rng"], device, rank)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: field 'rng' is malformed ({err!r})") from None
    return state, progress


def rewind_log(path: Path, completed_epochs: int, step: int) -> None:
    """Drop the ``metrics.jsonl`` records written after the checkpoint a run resumes from (they will be written
    again), atomically; unparsable lines (a record cut by a kill) go too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if record.get("kind") in ("epoch", "eval") and "epoch" in record:
            keep = record["epoch"] <= completed_epochs
        else:
            keep = "step" not in record or record["step"] < step
        if keep:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class RunLog:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _say(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if mbdist.is_main():
        print(*args, **kwargs)


def _flat_counts(report: dict[str, dict[str, int]]) -> dict[str, int]:
    return {f"{split}_{key}": int(value) for split, counts in report.items() for key, value in sorted(counts.items())
            if value}


def fit(cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True, dry_run: bool = False) -> dict:
    """Train ``cfg`` into ``out_dir``; with ``resume`` continue from ``out_dir/last.pt``. Returns the final eval.

    Under torchrun (``WORLD_SIZE`` > 1) joins the process group, trains data-parallel and leaves the group at
    the end (see the module docstring).
    """
    device = resolve_device(cfg.train.device)
    with deterministic_mode(cfg):
        env = mbdist.init_distributed(device.type, cfg.train.dist_backend)
        try:
            if env.distributed and device.type == "cuda":
                device = torch.device("cuda", env.local_rank)
            return _fit(cfg, Path(out_dir), resume, progress, dry_run, device, env)
        finally:
            if env.distributed:
                mbdist.cleanup()


def _fit(cfg: Config, out: Path, resume: bool, progress: bool, dry_run: bool, device: torch.device,
         env: mbdist.DistEnv) -> dict:
    main = env.is_main
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda" and not cfg.train.deterministic:
        torch.backends.cudnn.benchmark = True   # every batch is S x S: autotune the convolutions once
    seed_everything(cfg.train.seed)   # same on every rank: identical initial weights (DDP also broadcasts them)

    splits = build_splits(cfg)
    if cfg.model.num_classes != len(splits.class_names) - 1:
        _say(f"model.num_classes = {len(splits.class_names) - 1} (from the data's categories)")
        cfg.model.num_classes = len(splits.class_names) - 1
    model = build_model(cfg).to(device)
    if cfg.train.channels_last:   # ~10% faster CPU steps; the convolutions then pick NHWC for the input too
        model = model.to(memory_format=torch.channels_last)
    _say(f"{cfg.model.arch}: {count_parameters(model):,} parameters, {model.anchors_cxcywh.shape[0]} default boxes, "
         f"{len(splits.train)} training / {len(splits.val)} evaluation images, device {device}"
         + (f", {env.world_size} processes x batch {cfg.train.batch_size}" if env.distributed else ""))
    policy = _flat_counts(splits.load_report)
    if policy:
        _say("data policy: " + ", ".join(f"{k}={v}" for k, v in policy.items()))
    if env.rank:
        torch.manual_seed(cfg.train.seed + env.rank)   # each rank its own stream (augmentation is keyed anyway)
        random.seed(cfg.train.seed + env.rank)
    criterion, encoder = build_criterion(cfg), build_encoder(cfg, device)
    if env.distributed and cfg.train.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model)
    train_model: nn.Module = model
    if env.distributed:
        # Buffers (BN running statistics) are not broadcast every step (that would make an empty local batch
        # stall the others); rank 0's are copied to all ranks before evaluation and checkpoints instead.
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
    # keyed: every sample's augmentation is drawn from (seed, epoch, index), whatever worker or rank loads it.
    sampler = EpochShuffleSampler(len(splits.train), env.world_size, env.rank, seed=cfg.train.seed, keyed=True)
    # data.pipeline: batched: workers decode and draw parameters, the batch is augmented on `device` (prefetched)
    augment = build_batch_augment(cfg) if cfg.data.pipeline == "batched" else None
    loader = make_loader(splits.train, cfg.train.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
                         seed=cfg.train.seed + 1000 * env.rank,
                         drop_last=len(splits.train) >= cfg.train.batch_size * env.world_size, sampler=sampler,
                         collate_fn=None if augment is None else augment.collate)
    if augment is not None:
        loader = DeviceAugmentLoader(loader, augment, device)
    steps_per_epoch = len(loader)
    lr_at = build_lr_schedule(cfg.train, steps_per_epoch)
    if dry_run:
        return dry_run_step(cfg, train_model, criterion, encoder, optimizer, loader, lr_at, device)

    scaler = make_grad_scaler(cfg, device)
    geometry = {"steps_per_epoch": steps_per_epoch, "world_size": env.world_size,
                "batch_size": cfg.train.batch_size}
    start_epoch, step, best, resumed = 0, 0, {"AP": -1.0}, EpochProgress()
    if resume:
        state, resumed = restore_training_state(out / "last.pt", model, optimizer, scaler, device, env.rank, geometry)
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
        if main:
            rewind_log(out / "metrics.jsonl", start_epoch, step)
            for stale in out.glob(".*.pt.*.tmp"):   # a write cut short by a kill (never the renamed file)
                stale.unlink(missing_ok=True)
        _say(f"resumed from {out / 'last.pt'} at epoch {start_epoch + 1}, batch {resumed.batch}, step {step}")
        del state
    elif main:
        save_config(cfg, out / "config.yaml")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    log = RunLog(out / "metrics.jsonl") if main else None
    if log is not None and not resume:
        log({"kind": "data", "train_images": len(splits.train), "val_images": len(splits.val),
             "world_size": env.world_size, "global_batch": cfg.train.batch_size * env.world_size, **policy})

    def save_last(epoch_done: int, progress_now: EpochProgress, next_step: int) -> dict:
        """Write last.pt (all ranks call it: RNG states are gathered, BatchNorm statistics made rank 0's)."""
        if env.distributed:
            mbdist.broadcast_buffers(model)
        check_finite_weights(model)   # on every rank: all stop together
        rng = _gather_rng(device)
        state = checkpoint_payload(cfg, model, splits.class_names, optimizer=optimizer.state_dict(),
                                   scaler=None if scaler is None else scaler.state_dict(), epoch=epoch_done,
                                   step=next_step, best=best, rng=rng, progress=progress_now.to_dict(), **geometry)
        if main:
            save_checkpoint(state, out / "last.pt")
        return state

    every = cfg.train.checkpoint_every_steps
    streak = resumed.nonfinite_streak
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            epoch_state = resumed if epoch == start_epoch else EpochProgress(nonfinite_streak=streak)
            loader.generator.manual_seed(cfg.train.seed + 1000 * env.rank + epoch)   # worker seeds: history-free
            # The shuffle of epoch e does not depend on history (nor on the world size); a resumed epoch skips the
            # batches already done.
            sampler.set_epoch(epoch, start=epoch_state.batch * cfg.train.batch_size)

            def after_batch(progress_now: EpochProgress, next_step: int, epoch: int = epoch) -> None:
                # Epoch in progress (its last batch: the epoch end saves). None during a run of non-finite steps:
                # last.pt stays the state right after the last good step.
                if every and progress_now.batch % every == 0 and progress_now.batch < steps_per_epoch \
                        and not progress_now.nonfinite_streak:
                    save_last(epoch, progress_now, next_step)

            t0 = time.time()
            stats = train_one_epoch(train_model, criterion, encoder, loader, optimizer, lr_at, device, step,
                                    training_amp_dtype(cfg, device), cfg.train.grad_clip, log, cfg.train.log_every,
                                    progress and main, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                                    freeze_bn=cfg.train.freeze_bn, scaler=scaler,
                                    max_nonfinite=cfg.train.max_nonfinite_steps, state=epoch_state,
                                    after_batch=after_batch)
            step, streak = stats.pop("next_step"), stats.pop("nonfinite_streak")
            if log is not None:
                log({"kind": "epoch", "epoch": epoch + 1, "step": step, "seconds": round(time.time() - t0, 2),
                     **stats})
            _say(f"epoch {epoch + 1}/{cfg.train.epochs}: loss {stats['loss']:.4f} (cls {stats['loss_cls']:.4f}, "
                 f"loc {stats['loss_loc']:.4f}), {time.time() - t0:.1f}s"
                 + (f", {stats['skipped_images']} unreadable images skipped" if stats["skipped_images"] else ""))
            if env.distributed:
                mbdist.broadcast_buffers(model)   # rank 0's BatchNorm statistics everywhere (eval, checkpoints)
            last_epoch = epoch + 1 == cfg.train.epochs
            if last_epoch or (cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0):
                result = evaluate_model(cfg, model, splits, device)
                if log is not None:
                    log({"kind": "eval", "epoch": epoch + 1, "step": step, **result.stats})
                _say(f"  eval: AP {result.stats['AP']:.4f}  AP50 {result.stats['AP50']:.4f}")
                if result.stats["AP"] > best["AP"]:
                    best = {**result.stats, "epoch": epoch + 1}
                    check_finite_weights(model)
                    if main:
                        save_checkpoint(checkpoint_payload(cfg, model, splits.class_names, epoch=epoch + 1,
                                                           metrics=best), out / "best.pt")
                        write_eval_json(out / "eval.json", result, extra={"epoch": epoch + 1, "checkpoint": "best.pt"})
                    best_result = result
            state = save_last(epoch + 1, EpochProgress(nonfinite_streak=streak), step)
            if main:
                if cfg.train.checkpoint_every and (epoch + 1) % cfg.train.checkpoint_every == 0:
                    save_checkpoint(state, out / f"epoch_{epoch + 1}.pt")
                plot_training_curves(out / "metrics.jsonl", out / "curves.png")
            mbdist.barrier()   # no rank runs ahead of rank 0's files (a resume reads them)
    except NonFiniteTrainingError as err:
        if log is not None:
            log({"kind": "stopped", "reason": "nonfinite", "message": str(err)})
        raise NonFiniteTrainingError(f"{err}. {_last_good(out)}") from None

    if not main:
        return best
    final = json.loads((out / "eval.json").read_text())
    if "best_result" in locals():
        print(best_result.summary)
        print(format_per_class_table(best_result.per_class))
    print(f"best AP {final['AP']:.4f} (AP50 {final['AP50']:.4f}) at epoch {final['epoch']}; run folder {out}")
    return final


def _last_good(out: Path) -> str:
    """Where the last good state is, for the message of a stopped run."""
    try:
        state = load_checkpoint(out / "last.pt")
    except CheckpointError:
        return "No checkpoint had been written yet"
    return (f"{out / 'last.pt'} holds the last good state (epoch {state.get('epoch', 0) + 1}, step "
            f"{state.get('step')}): fix the cause, then continue with `multibox train --resume {out}`")


def dry_run_step(cfg, model, criterion, encoder, optimizer, loader, lr_at, device) -> dict:
    """One training step on one batch: proves the preset builds and trains, reports sizes."""
    t0 = time.time()
    stats = train_one_epoch(model, criterion, encoder, _first(loader), optimizer, lr_at, device, 0,
                            training_amp_dtype(cfg, device), progress=False)
    model = getattr(model, "module", model)   # DistributedDataParallel -> the SSD
    report = {"arch": cfg.model.arch, "parameters": count_parameters(model),
              "default_boxes": int(model.anchors_cxcywh.shape[0]), "loss": stats["loss"],
              "step_seconds": round(time.time() - t0, 2)}
    print(json.dumps(report))
    if not math.isfinite(report["loss"]):
        raise RuntimeError("dry run produced a non-finite loss")
    return report


def _first(loader):
    for batch in loader:
        return [batch]
    raise RuntimeError("the training set is empty")
