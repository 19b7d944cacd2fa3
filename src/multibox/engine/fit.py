"""``multibox train``: the training run, top to bottom.

Writes into the run folder: ``config.yaml``, ``metrics.jsonl``, ``last.pt`` (every epoch, every
``train.checkpoint_every_minutes`` and every ``train.checkpoint_every_steps`` steps), ``epoch_N.pt`` (every
``train.checkpoint_every`` epochs), ``best.pt`` (highest AP), ``eval.json`` (evaluation of ``best.pt``, with what
was evaluated), ``curves.png``, ``anchors.json`` / ``anchors.png`` (how the default boxes fit the training data,
and ``anchors.fit``'s decision: :mod:`multibox.engine.anchors`) and at the end the report of ``best.pt``
(``pr_curves.png``, ``confusion_matrix.png``, ``samples.png``, ``index.html``).

How long: ``train.epochs`` (a number, or ``auto``: sized by the data, :func:`multibox.engine.budget.auto_epochs`),
or a time budget ``train.time`` (``--time 15m``) that settles the epochs once a minute of training is timed
(:func:`fit_budget`); either way the run's ``config.yaml`` then holds the number of epochs it trains.

Reliability (a run lasts days):

* a new run refuses a folder that holds files (``exist_ok`` starts over in it), a resume one without ``last.pt``;
  a run that fails before training (bad data, a dry run) leaves no folder behind;
* SIGINT (Ctrl-C) and SIGTERM stop the run at the end of the batch in progress, after writing a resumable
  ``last.pt`` (:class:`multibox.engine.interrupt.TrainingInterrupted` says how to continue); in the middle of an
  epoch ``last.pt`` is also written every ``train.checkpoint_every_minutes`` (5) minutes, so a crash loses less;
* checkpoints are written atomically (:func:`multibox.checkpoint.save_checkpoint`): a crash, a kill or a full disk
  while writing leaves the previous one intact; weights that are not finite are never written;
* ``--resume DIR`` continues from ``DIR/last.pt`` exactly where it stopped, also in the middle of an epoch:
  model, optimizer, fp16 loss scaler, RNG states (every rank's), epoch, batch of the epoch, global step (the LR
  schedule is a function of it), the epoch's running sums, best metrics and the non-finite counter. The
  epoch's order is a function of (seed, epoch) (``EpochShuffleSampler``, which skips the batches done) and
  each sample's augmentation of (seed, epoch, index) (:func:`multibox.data.transforms.keyed_generator`);
  ``metrics.jsonl`` is rewound to the checkpoint. With ``train.deterministic`` on CPU the resumed run ends
  with bit-identical weights to an uninterrupted one (tests/engine/test_resume.py);
* a step whose loss or gradient is not finite is skipped, logged, and after ``train.max_nonfinite_steps``
  consecutive ones training stops with :class:`NonFiniteTrainingError` (``last.pt`` keeps the last good state).

Data-parallel: ``torchrun --nproc_per_node=N -m multibox train ...`` (see :mod:`multibox.distributed`). Each rank
reads a disjoint part of every epoch (``EpochShuffleSampler``: global batch s holds the same images whatever N
is), ``train.batch_size`` is the global batch (each rank takes batch_size / N, which must divide; so the preset's
LR, set for its batch, and the steps per epoch are those of one process), gradients are synchronised by
DistributedDataParallel, the loss is normalised by the global
number of positives, rank 0 alone logs and writes files, and evaluation runs on all ranks and is gathered.
With ``train.freeze_bn`` the N-process run computes the same updates as one process with the global batch; with
BatchNorm in training mode each rank normalises over its own images (``train.sync_bn`` on CUDA syncs them).
"""
from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from multibox import distributed as mbdist
from multibox.checkpoint import load_checkpoint, save_checkpoint
from multibox.config import Config, save_config
from multibox.core.losses import build_criterion
from multibox.core.matching import build_encoder
from multibox.core.resize import as_hw
from multibox.data.build import DataSplits, EpochShuffleSampler, build_splits, make_loader
from multibox.data.gpu_transforms import DeviceAugmentLoader, build_batch_augment
from multibox.engine.anchors import fit_run_anchors
from multibox.engine.budget import BudgetFit, MEASURE_SECONDS, auto_epochs, fit_epochs_to_budget
from multibox.engine.interrupt import StopRequest, TrainingInterrupted
from multibox.engine.loop import EpochProgress, NonFiniteTrainingError, StepOptions, StepParts, train_one_epoch
from multibox.engine.optim import build_optimizer, make_grad_scaler
from multibox.engine.schedules import build_lr_schedule
from multibox.engine.state import (RunLog, check_finite_weights, checkpoint_payload, gather_rng, last_good_message,
                                   restore_training_state, rewind_log)
from multibox.evaluation.anchors import AnchorReport, anchors_html
from multibox.evaluation.coco import CocoEvalResult, format_per_class_table, write_eval_json
from multibox.evaluation.evaluate import evaluate_model
from multibox.evaluation.plots import plot_training_curves
from multibox.evaluation.provenance import eval_provenance, run_checkpoint_record
from multibox.evaluation.report import detections_for_report, write_eval_report
from multibox.errors import InputError, MultiboxError
from multibox.interop.pretrained import plan_initial_weights, prepare_for_training
from multibox.io import remove_leftover_temporaries
from multibox.models import build_model, count_parameters
from multibox.models.published import InitialWeights, settle_backbone_stages
from multibox.runtime import cpu_threads, deterministic_mode, resolve_device, seed_everything

logger = logging.getLogger("multibox.train")


@dataclass
class Run:
    """One training run: what :func:`build_run` made, and where training stands.

    ``model``: the SSD (evaluation, checkpoints); ``parts.model``: what trains (DistributedDataParallel around
    it when data-parallel). ``epoch``: epochs completed; ``step``: the next global step; ``progress``: the epoch
    in progress (mid-epoch after a resume); ``best``: the best evaluation so far (``{"AP": -1.0}``: none);
    ``best_result``: its full result when this process evaluated it (the final summary and report).
    """

    cfg: Config
    out: Path
    env: mbdist.DistEnv
    splits: DataSplits
    model: nn.Module
    parts: StepParts
    sampler: EpochShuffleSampler
    loader: Iterable
    steps_per_epoch: int
    data_report: dict[str, int]
    log: RunLog | None
    stop: StopRequest = field(default_factory=StopRequest)
    last_saved: float = field(default_factory=time.monotonic)   # when last.pt was last written (monotonic s)
    epoch: int = 0
    step: int = 0
    progress: EpochProgress = field(default_factory=EpochProgress)
    best: dict = field(default_factory=lambda: {"AP": -1.0})
    best_result: CocoEvalResult | None = None
    best_detections: list[dict] | None = None   # rank 0: best_result's detections that its report draws
    started: float = field(default_factory=time.monotonic)     # when the run began (train.time counts from it)
    training: tuple[float, int] | None = None    # (monotonic s, global step) when this process's first step began
    anchors: AnchorReport | None = None          # rank 0 of a new run: anchors.json / anchors.png to write

    @property
    def device(self) -> torch.device:
        return self.parts.device

    @property
    def geometry(self) -> dict:
        """What decides the batches of an epoch (a mid-epoch resume needs the same); ``batch_size`` is the global
        batch."""
        return {"steps_per_epoch": self.steps_per_epoch, "world_size": self.env.world_size,
                "batch_size": self.cfg.train.batch_size}

    @property
    def rank_batch(self) -> int:
        """This rank's share of the global batch ``train.batch_size`` (:func:`multibox.distributed.per_rank_batch`)."""
        return mbdist.per_rank_batch(self.cfg.train.batch_size, self.env.world_size)


def fit(cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True, dry_run: bool = False,
        exist_ok: bool = False) -> dict:
    """Train ``cfg`` into ``out_dir``; with ``resume`` continue from ``out_dir/last.pt``. Returns the final eval
    (rank 0; the other ranks: the best metrics), with ``dry_run`` the report of :func:`dry_run_step` (no files
    written). A new run needs ``out_dir`` absent or empty, unless ``exist_ok`` (see :func:`check_run_folder`).
    :class:`TrainingInterrupted` after SIGINT / SIGTERM, once ``last.pt`` is saved.

    ``progress``: a progress bar per epoch (rank 0, on a terminal). Under torchrun (``WORLD_SIZE`` > 1) joins the
    process group, trains data-parallel and leaves the group at the end (see the module docstring).
    """
    device = resolve_device(cfg.train.device)
    with deterministic_mode(cfg.train.deterministic, cfg.train.threads), cpu_threads(cfg.train.threads):
        env = mbdist.init_distributed(device.type, cfg.train.dist_backend)
        try:
            mbdist.per_rank_batch(cfg.train.batch_size, env.world_size)   # an indivisible batch: before any work
            if env.distributed and device.type == "cuda":
                device = torch.device("cuda", env.local_rank)
            return _fit(cfg, Path(out_dir), resume, progress, dry_run, exist_ok, device, env)
        finally:
            if env.distributed:
                mbdist.cleanup()


def _fit(cfg: Config, out: Path, resume: bool, progress: bool, dry_run: bool, exist_ok: bool, device: torch.device,
         env: mbdist.DistEnv) -> dict:
    """The run, top to bottom: build, restore or start, then per epoch train, evaluate, checkpoint; finish."""
    if not dry_run:
        check_run_folder(out, resume, exist_ok)
    _prepare_process(cfg, device)
    settle_backbone_stages(cfg, resumed=resume)
    # A new run's weights files are resolved (fetched once, or one line saying how to get them) before any data is
    # read; a resumed run's last.pt holds its weights, and a dry run's step does not need them.
    initial = None if resume else InitialWeights() if dry_run else plan_weights(cfg, env)
    started = time.monotonic()
    # A dry run fits the boxes too: anchors.fit_boxes sets the box head's width, and a fit the run would refuse
    # (fit_boxes with --weights) is refused here.
    run = build_run(cfg, out, device, env, progress=progress and env.is_main, initial=initial,
                    fit_anchors=not resume)
    run.started = started
    if dry_run:
        return dry_run_step(run)
    if resume:
        restore_run(run)
    else:
        start_run(run)
    try:
        with run.stop:
            while run.epoch < cfg.train.epochs:
                train_epoch(run)
                if run.cfg.train.time:   # a budget not yet fitted: at the latest when the first epoch ends
                    fit_budget(run, run.step)
                if env.distributed:
                    mbdist.broadcast_buffers(run.model)   # rank 0's BatchNorm statistics everywhere (eval, checkpoints)
                if _evaluation_due(cfg, run.epoch):
                    evaluate(run)
                checkpoint_epoch(run)
                if _stop_requested(run) and run.epoch < cfg.train.epochs:
                    raise _interrupted(run, run.progress, run.step)
    except NonFiniteTrainingError as err:
        if run.log is not None:
            run.log({"kind": "stopped", "reason": "nonfinite", "message": str(err)})
        raise NonFiniteTrainingError(f"{err}. {last_good_message(out)}") from None
    return finish(run)


def _info(message: str) -> None:
    """An INFO record of the training logger, on rank 0 only."""
    if mbdist.is_main():
        logger.info(message)


def check_run_folder(out: Path, resume: bool, exist_ok: bool = False) -> None:
    """Refuse, with one line that says what to do, a resume from a folder without ``last.pt`` and a new run in a
    folder that holds files (its checkpoints and metrics would be overwritten), unless ``exist_ok``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a run folder")
    if resume:
        if not (out / "last.pt").is_file():
            found = sorted(p.name for p in out.iterdir())[:8] if out.is_dir() else []
            raise InputError(f"cannot resume {out}: it has no last.pt (" + (f"it holds {', '.join(found)}"
                             if found else "no such run folder" if not out.is_dir() else "it is empty")
                             + "); a run writes last.pt at every epoch end, every train.checkpoint_every_minutes "
                             "and on Ctrl-C")
        return
    if out.is_dir() and any(out.iterdir()) and not exist_ok:
        names = sorted(p.name for p in out.iterdir())
        raise InputError(f"{out} already holds a run ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}): "
                         f"continue it with --resume {out}, choose another --out, or pass --exist-ok to start over "
                         "in it")


def plan_weights(cfg: Config, env: mbdist.DistEnv) -> InitialWeights:
    """:func:`plan_initial_weights` of a new run, on rank 0 first (a missing file is downloaded once, not by every
    process at the same time); the other ranks then find it in the cache, or raise rank 0's error."""
    if not env.distributed:
        return plan_initial_weights(cfg)
    planned, failure = None, None
    if env.is_main:
        try:
            planned = plan_initial_weights(cfg)
        except MultiboxError as err:
            failure = err
    failure = mbdist.broadcast_object(failure)
    if failure is not None:
        raise failure
    return planned if env.is_main else plan_initial_weights(cfg)


def _prepare_process(cfg: Config, device: torch.device) -> None:
    if device.type == "cuda" and not cfg.train.deterministic:
        torch.backends.cudnn.benchmark = True   # every batch is S x S: autotune the convolutions once
    seed_everything(cfg.train.seed)   # same on every rank: identical initial weights (DDP also broadcasts them)


def build_run(cfg: Config, out: Path, device: torch.device, env: mbdist.DistEnv, progress: bool,
              initial: InitialWeights | None = None, fit_anchors: bool = False) -> Run:
    """The data, the model, the optimizer and this rank's training loader, in an order that fixes the RNG draws
    (initial weights from the common seed, then each rank its own stream). ``fit_anchors``: a new run applies
    ``anchors.fit`` before the model is built (a resumed one has its boxes in its config)."""
    splits = build_splits(cfg)
    if cfg.train.epochs == "auto":
        cfg.train.epochs = auto_epochs(len(splits.train), cfg.train.auto_images, cfg.train.auto_max_epochs)
        _info(f"train.epochs = {cfg.train.epochs} (auto: about {cfg.train.auto_images:,} training images seen, "
              f"{len(splits.train):,} per epoch)")
    anchors = fit_run_anchors(cfg, splits, env, fine_tuning=initial is not None and initial.detector is not None) \
        if fit_anchors else None
    model = _build_model(cfg, splits, device, env, initial)
    data_report = _flat_counts(splits.load_report)   # build_splits has logged it; metrics.jsonl records it
    if env.rank:
        torch.manual_seed(cfg.train.seed + env.rank)   # each rank its own stream (augmentation is keyed anyway)
        random.seed(cfg.train.seed + env.rank)
    criterion, encoder = build_criterion(cfg), build_encoder(cfg, device)
    if env.distributed and cfg.train.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model)
    train_model = _data_parallel(model, env, device)
    sampler, loader = build_train_loader(cfg, splits, env, device)
    steps_per_epoch = len(loader)
    parts = StepParts(train_model, criterion, encoder, optimizer, build_lr_schedule(cfg.train, steps_per_epoch),
                      device, make_grad_scaler(cfg, device), StepOptions.from_config(cfg, device, progress))
    log = RunLog(out / "metrics.jsonl") if env.is_main else None
    return Run(cfg, out, env, splits, model, parts, sampler, loader, steps_per_epoch, data_report, log,
               anchors=anchors)


def _build_model(cfg: Config, splits: DataSplits, device: torch.device, env: mbdist.DistEnv,
                 initial: InitialWeights | None = None) -> nn.Module:
    """The SSD for the data's classes (``model.num_classes`` follows the data), on ``device``, starting from
    ``initial`` (a new run: :func:`multibox.interop.pretrained.prepare_for_training`), its frozen stages frozen."""
    if cfg.model.num_classes != len(splits.class_names) - 1:
        _info(f"model.num_classes = {len(splits.class_names) - 1} (from the data's categories)")
        cfg.model.num_classes = len(splits.class_names) - 1
    model = build_model(cfg)
    check_batch_statistics(cfg, model, min(mbdist.per_rank_batch(cfg.train.batch_size, env.world_size),
                                           len(splits.train)))
    prepare_for_training(model, cfg, initial, splits.class_names)
    model = model.to(device)
    if cfg.train.channels_last:   # ~10% faster CPU steps; the convolutions then pick NHWC for the input too
        model = model.to(memory_format=torch.channels_last)
    _info(f"{cfg.model.arch}: {count_parameters(model):,} parameters, {model.anchors_cxcywh.shape[0]} default boxes, "
          f"{len(splits.train)} training / {len(splits.val)} evaluation images, device {device}"
          + (f", {env.world_size} processes x batch {mbdist.per_rank_batch(cfg.train.batch_size, env.world_size)} "
             f"(global batch {cfg.train.batch_size})" if env.distributed else ""))
    return model


def check_batch_statistics(cfg: Config, model: nn.Module, images_per_step: int) -> None:
    """Refuse, before the first step, a run whose BatchNorm layers would normalise a single value per channel: one
    image per step (per process) and a 1x1 feature map, where BatchNorm in training mode has no statistics to
    compute (PyTorch raises in the middle of the first step)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    single = any(as_hw(f) == (1, 1) for f in cfg.anchors.feature_sizes)
    if images_per_step == 1 and has_bn and single and not cfg.train.freeze_bn:
        raise InputError(f"{cfg.model.arch} normalises its 1x1 feature map with BatchNorm, which needs at least 2 "
                         f"images per step; this run has 1 per process: raise train.batch_size, or set "
                         f"train.freeze_bn=true (BatchNorm then uses its running statistics)")


def _data_parallel(model: nn.Module, env: mbdist.DistEnv, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when the run is distributed (``model`` itself otherwise)."""
    if not env.distributed:
        return model
    # Buffers (BN running statistics) are not broadcast every step (that would make an empty local batch stall
    # the others); rank 0's are copied to all ranks before evaluation and checkpoints instead.
    return nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if device.type == "cuda" else None,
                                               broadcast_buffers=False)


def build_train_loader(cfg: Config, splits: DataSplits, env: mbdist.DistEnv,
                       device: torch.device) -> tuple[EpochShuffleSampler, Iterable]:
    """This rank's sampler and loader of the training set (call ``sampler.set_epoch`` every epoch): batches of
    ``train.batch_size / world_size`` images, so that global batch s holds the same images, and an epoch the same
    number of steps, for every world size (``EpochShuffleSampler``)."""
    # keyed: every sample's augmentation is drawn from (seed, epoch, index), whatever worker or rank loads it.
    sampler = EpochShuffleSampler(len(splits.train), env.world_size, env.rank, seed=cfg.train.seed, keyed=True)
    # data.pipeline: batched: workers decode and draw parameters, the batch is augmented on `device` (prefetched)
    augment = build_batch_augment(cfg) if cfg.data.pipeline == "batched" else None
    # An incomplete last global batch is dropped (as one process drops it), unless it would be the only one.
    loader = make_loader(splits.train, mbdist.per_rank_batch(cfg.train.batch_size, env.world_size), shuffle=True,
                         num_workers=cfg.data.num_workers, seed=cfg.train.seed + 1000 * env.rank,
                         drop_last=len(splits.train) >= cfg.train.batch_size, sampler=sampler,
                         collate_fn=None if augment is None else augment.collate)
    if augment is not None:
        loader = DeviceAugmentLoader(loader, augment, device)
    return sampler, loader


def _flat_counts(report: dict[str, dict[str, int]]) -> dict[str, int]:
    return {f"{split}_{key}": int(value) for split, counts in report.items() for key, value in sorted(counts.items())
            if value}


def start_run(run: Run) -> None:
    """A new run: the folder, ``config.yaml``, a fresh ``metrics.jsonl`` opened by a ``data`` record (rank 0)."""
    if run.log is None:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    save_config(run.cfg, run.out / "config.yaml")
    if run.anchors is not None:
        run.anchors.write(run.out)
    # Starting over in a folder (exist_ok): an earlier run's last.pt must not be resumed under this config.
    for name in ("metrics.jsonl", "last.pt"):
        (run.out / name).unlink(missing_ok=True)
    run.log({"kind": "data", "train_images": len(run.splits.train), "val_images": len(run.splits.val),
             "world_size": run.env.world_size, "global_batch": run.cfg.train.batch_size,
             **run.data_report})


def restore_run(run: Run) -> None:
    """Continue from ``last.pt`` (every rank): weights, optimizer, scaler, RNGs and where training stood;
    ``metrics.jsonl`` rewound to it and cut-short checkpoint writes removed (rank 0)."""
    last = run.out / "last.pt"
    state, run.progress = restore_training_state(last, run.model, run.parts.optimizer, run.parts.scaler, run.device,
                                                 run.env.rank, run.geometry)
    run.epoch, run.step, run.best = state["epoch"], state["step"], state["best"]
    if run.env.is_main:
        rewind_log(run.out / "metrics.jsonl", run.epoch, run.step)
        remove_leftover_temporaries(run.out, "*.pt")
    _info(f"resumed from {last} at epoch {run.epoch + 1}, batch {run.progress.batch}, step {run.step}")


def train_epoch(run: Run) -> None:
    """Train epoch ``run.epoch + 1`` from ``run.progress`` (``last.pt`` inside it as :func:`checkpoint_in_epoch`
    decides), log it, and advance ``run`` to its end."""
    cfg, epoch = run.cfg, run.epoch
    run.loader.generator.manual_seed(cfg.train.seed + 1000 * run.env.rank + epoch)   # worker seeds: history-free
    # The shuffle of epoch e does not depend on history (nor on the world size); a resumed epoch skips the batches
    # already done.
    run.sampler.set_epoch(epoch, start=run.progress.batch * run.rank_batch)
    t0 = time.time()
    if run.training is None:
        run.training = (time.monotonic(), run.step)
    stats = train_one_epoch(run.parts, run.loader, run.step, state=run.progress, log=run.log,
                            after_batch=partial(after_batch, run), desc=f"epoch {epoch + 1}/{cfg.train.epochs}")
    run.step, streak = stats.pop("next_step"), stats.pop("nonfinite_streak")
    run.epoch, run.progress = epoch + 1, EpochProgress(nonfinite_streak=streak)
    if run.log is not None:
        run.log({"kind": "epoch", "epoch": run.epoch, "step": run.step, "seconds": round(time.time() - t0, 2),
                 **stats})
    _info(f"epoch {run.epoch}/{cfg.train.epochs}: loss {stats['loss']:.4f} (cls {stats['loss_cls']:.4f}, "
          f"loc {stats['loss_loc']:.4f}), {time.time() - t0:.1f}s"
          + (f", {stats['skipped_images']} unreadable images skipped" if stats["skipped_images"] else ""))


def after_batch(run: Run, progress: EpochProgress, next_step: int) -> None:
    """After every batch: fit the time budget once it has been measured, then :func:`checkpoint_in_epoch`."""
    if run.cfg.train.time:
        measured = time.monotonic() - run.training[0] >= MEASURE_SECONDS
        if _joint(run, measured)[0]:
            fit_budget(run, next_step)
    checkpoint_in_epoch(run, progress, next_step)


def fit_budget(run: Run, next_step: int) -> BudgetFit:
    """Settle ``train.epochs`` to end the run within ``train.time`` minutes of its start, from the steps timed so
    far (rank 0's measurement, on every rank): the LR schedule is rebuilt for the new length (``multistep``
    milestones scaled with it), ``train.time`` cleared (a resume trains the settled epochs), ``config.yaml``
    rewritten and a ``budget`` record logged."""
    train = run.cfg.train
    now = time.monotonic()
    fitted = fit_epochs_to_budget(60 * train.time, now - run.started, now - run.training[0],
                                  next_step - run.training[1], next_step, run.steps_per_epoch,
                                  train.batch_size, len(run.splits.val), train.eval_every)
    if run.env.distributed:
        fitted = mbdist.broadcast_object(fitted)
    if train.schedule == "multistep":
        train.milestones = [max(1, round(m * fitted.epochs / train.epochs)) for m in train.milestones]
    minutes, train.epochs, train.time = train.time, fitted.epochs, None
    run.parts.lr_at = build_lr_schedule(train, run.steps_per_epoch)
    if run.log is not None:
        save_config(run.cfg, run.out / "config.yaml")
        run.log(fitted.record(minutes))
    _info(f"train.epochs = {fitted.epochs} to finish within {minutes:g} min (a step takes "
          f"{fitted.step_seconds:.3f} s, the evaluation about {fitted.eval_seconds:.0f} s)")
    return fitted


def checkpoint_in_epoch(run: Run, progress: EpochProgress, next_step: int) -> None:
    """After every batch of an epoch in progress (its last batch: the epoch end saves): ``last.pt`` every
    ``train.checkpoint_every_steps`` batches, when ``train.checkpoint_every_minutes`` have passed since the last
    one, and on a stop request (then :class:`TrainingInterrupted`). None during a run of non-finite steps:
    ``last.pt`` stays the state right after the last good step."""
    if progress.batch >= run.steps_per_epoch:
        return
    every, minutes = run.cfg.train.checkpoint_every_steps, run.cfg.train.checkpoint_every_minutes
    time_due = bool(minutes) and time.monotonic() - run.last_saved >= 60 * minutes
    time_due, stop = _joint(run, time_due, run.stop.requested)
    if (stop or time_due or (every and progress.batch % every == 0)) and not progress.nonfinite_streak:
        save_last(run, progress, next_step)
    if stop:
        raise _interrupted(run, progress, next_step)


def _joint(run: Run, *flags: bool) -> list[bool]:
    """Each flag true on any rank, on every rank (a checkpoint is a collective: the ranks must decide together)."""
    if not run.env.distributed:
        return list(flags)
    votes = mbdist.all_reduce_sum(torch.tensor([float(f) for f in flags], device=run.device))
    return [bool(v > 0) for v in votes.tolist()]


def _stop_requested(run: Run) -> bool:
    return _joint(run, run.stop.requested)[0]


def _interrupted(run: Run, progress: EpochProgress, next_step: int) -> TrainingInterrupted:
    """The error that ends an interrupted run: where it stopped and how to continue (``last.pt`` is saved)."""
    signum = run.stop.signum or signal.SIGINT   # another rank's signal: report it as Ctrl-C
    where = (f"epoch {run.epoch + 1}, batch {progress.batch}/{run.steps_per_epoch}" if progress.batch
             else f"the end of epoch {run.epoch}")
    if run.log is not None:
        run.log({"kind": "stopped", "reason": "signal", "signal": signum, "epoch": run.epoch, "step": next_step})
    return TrainingInterrupted(f"interrupted at {where}; {run.out / 'last.pt'} holds the state to continue from: "
                               f"multibox train --resume {run.out}", signum)


def save_last(run: Run, progress: EpochProgress, next_step: int) -> dict:
    """Write ``last.pt``: ``run.epoch`` epochs done, ``progress`` into the next, ``next_step``; returns its
    payload. All ranks call it: RNG states are gathered, BatchNorm statistics made rank 0's."""
    if run.env.distributed:
        mbdist.broadcast_buffers(run.model)
    check_finite_weights(run.model)   # on every rank: all stop together
    rng = gather_rng(run.device)
    scaler = run.parts.scaler
    state = checkpoint_payload(run.cfg, run.model, run.splits.class_names, run.splits.category_ids,
                               optimizer=run.parts.optimizer.state_dict(),
                               scaler=None if scaler is None else scaler.state_dict(), epoch=run.epoch,
                               step=next_step, best=run.best, rng=rng, progress=progress.to_dict(), **run.geometry)
    if run.env.is_main:
        save_checkpoint(state, run.out / "last.pt")
    run.last_saved = time.monotonic()
    return state


def _evaluation_due(cfg: Config, epochs_done: int) -> bool:
    every = cfg.train.eval_every
    return epochs_done == cfg.train.epochs or bool(every and epochs_done % every == 0)


def evaluate(run: Run) -> None:
    """COCO evaluation after ``run.epoch`` epochs (all ranks); a new best AP writes ``best.pt`` and ``eval.json``."""
    result, detections = evaluate_model(run.cfg, run.model, run.splits, run.device, return_detections=True)
    if run.log is not None:
        run.log({"kind": "eval", "epoch": run.epoch, "step": run.step, **result.stats})
    _info(f"  eval: AP {result.stats['AP']:.4f}  AP50 {result.stats['AP50']:.4f}")
    if result.stats["AP"] > run.best["AP"]:
        save_best(run, result, detections)


def save_best(run: Run, result: CocoEvalResult, detections: list[dict]) -> None:
    """A new best evaluation: ``best.pt`` (weights and metrics) and ``eval.json`` with what was evaluated (rank 0,
    which keeps the detections the report of :func:`finish` draws)."""
    run.best = {**result.stats, "epoch": run.epoch}
    check_finite_weights(run.model)
    if run.env.is_main:
        best = run.out / "best.pt"
        save_checkpoint(checkpoint_payload(run.cfg, run.model, run.splits.class_names, run.splits.category_ids,
                                           epoch=run.epoch, metrics=run.best), best)
        checkpoint = run_checkpoint_record(best.name, run.epoch)
        write_eval_json(run.out / "eval.json", result, extra=eval_provenance(run.cfg, run.splits, result, checkpoint))
        run.best_detections = detections_for_report(detections)
    run.best_result = result


def checkpoint_epoch(run: Run) -> None:
    """The end of an epoch: ``last.pt`` (all ranks), ``epoch_N.pt`` every ``train.checkpoint_every`` epochs and
    ``curves.png`` (rank 0); then every rank waits for rank 0's files (a resume reads them)."""
    state = save_last(run, run.progress, run.step)
    if run.env.is_main:
        every = run.cfg.train.checkpoint_every
        if every and run.epoch % every == 0:
            save_checkpoint(state, run.out / f"epoch_{run.epoch}.pt")
        plot_training_curves(run.out / "metrics.jsonl", run.out / "curves.png")
    mbdist.barrier()


def finish(run: Run) -> dict:
    """Rank 0: log the best evaluation, write its report beside ``eval.json`` (what ``multibox eval`` writes:
    :func:`multibox.evaluation.report.write_eval_report`) and return ``eval.json`` (plus ``skipped_images`` when
    training skipped unreadable images); the other ranks return the best metrics. A run resumed after its best
    evaluation evaluates ``best.pt`` again for the report (all ranks)."""
    if run.best_result is None and "epoch" in run.best:   # every rank knows run.best: all take part, or none
        _evaluate_best_again(run)
    if not run.env.is_main:
        return run.best
    final = json.loads((run.out / "eval.json").read_text())
    if run.best_result is not None:
        logger.info(run.best_result.summary)
        logger.info(format_per_class_table(run.best_result.per_class))
        write_eval_report(run.out, run.best_result, run.splits.val_gt, run.best_detections or [],
                          run.splits.class_names, metrics_jsonl=run.out / "metrics.jsonl", images=run.splits.val,
                          image_ids=run.splits.val_image_ids, provenance=final, sections=anchors_html(run.out))
    logger.info(f"best AP {final['AP']:.4f} (AP50 {final['AP50']:.4f}) at epoch {run.best.get('epoch')}; "
                f"run folder {run.out}")
    skipped = _skipped_images(run.out / "metrics.jsonl")
    if skipped:
        logger.warning(f"{skipped} unreadable or missing images were skipped while training (counted per epoch "
                       f"in metrics.jsonl; `multibox check-data` names them)")
        final = {**final, "skipped_images": skipped}
    return final


def _skipped_images(metrics_jsonl: Path) -> int:
    """Images skipped over the whole run, resumed parts included: the sum of the epoch records' counts."""
    records = (json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip())
    return sum(int(r.get("skipped_images", 0)) for r in records if r.get("kind") == "epoch")


def _evaluate_best_again(run: Run) -> None:
    """``best.pt``'s result and (rank 0) its report's detections, evaluated again by every rank: for a process that
    did not evaluate it itself (resumed after it). ``eval.json`` stays as written."""
    model = build_model(run.cfg).to(run.device)
    model.load_state_dict(load_checkpoint(run.out / "best.pt", map_location=run.device)["model"])
    run.best_result, detections = evaluate_model(run.cfg, model, run.splits, run.device, return_detections=True)
    if run.env.is_main:
        run.best_detections = detections_for_report(detections)


def dry_run_step(run: Run) -> dict:
    """One training step on one batch (no loss scaling, clipping, frozen BatchNorm or logging): proves the preset
    builds and trains. Returns the report: arch, parameters, default_boxes, loss, step_seconds."""
    t0 = time.time()
    parts = replace(run.parts, scaler=None, options=StepOptions(amp_dtype=run.parts.options.amp_dtype))
    stats = train_one_epoch(parts, _first(run.loader), 0)
    report = {"arch": run.cfg.model.arch, "parameters": count_parameters(run.model),
              "default_boxes": int(run.model.anchors_cxcywh.shape[0]), "loss": stats["loss"],
              "step_seconds": round(time.time() - t0, 2)}
    if not math.isfinite(report["loss"]):
        raise RuntimeError("dry run produced a non-finite loss")
    return report


def _first(loader: Iterable) -> list:
    for batch in loader:
        return [batch]
    raise RuntimeError("the training set is empty")
