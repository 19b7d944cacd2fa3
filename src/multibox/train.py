"""``multibox train``: the training run, top to bottom.

Writes into the run folder: ``config.yaml``, ``metrics.jsonl``, ``last.pt`` (every epoch), ``epoch_N.pt`` (every
``train.checkpoint_every`` epochs), ``best.pt`` (highest AP), ``eval.json`` (evaluation of ``best.pt``) and
``curves.png``.
"""
from __future__ import annotations

import json
import math
import random
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, save_config
from .data.build import DataSplits, build_splits, make_loader
from .engine import collect_coco_results, train_one_epoch, warmup_cosine_lr
from .evaluation import evaluate_coco, format_per_class_table, write_eval_json
from .losses import build_loss
from .matching import TargetEncoder
from .anchors import default_boxes_cxcywh
from .models import anchor_spec, build_model, count_parameters
from .plots import plot_training_curves
from .postprocess import PostProcessor


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if not cfg.train.amp or device.type != "cuda":
        return None
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.train.amp_dtype]


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


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.SGD:
    """Momentum SGD; BatchNorm's scale and shift get no weight decay (as MindSpore's default decay filter)."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for p in m.parameters()}
    decay = [p for p in model.parameters() if id(p) not in norm_params]
    no_decay = [p for p in model.parameters() if id(p) in norm_params]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=cfg.train.lr_init, momentum=cfg.train.momentum)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def evaluate_model(cfg: Config, model: nn.Module, splits: DataSplits, device: torch.device, progress: bool = False,
                   verbose: bool = False):
    loader = make_loader(splits.val, cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                         seed=cfg.train.seed)
    results = collect_coco_results(model, build_postprocessor(cfg), loader, device, splits.label_to_category_id,
                                   amp_dtype(cfg, device), progress)
    return evaluate_coco(splits.val_gt, results, backend=cfg.eval.backend, image_ids=splits.val_image_ids,
                         verbose=verbose)


def checkpoint_payload(cfg: Config, model: nn.Module, class_names: list[str], **state) -> dict:
    return {"model": model.state_dict(), "config": cfg.to_dict(), "class_names": class_names, **state}


class RunLog:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def fit(cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True, dry_run: bool = False) -> dict:
    """Train ``cfg`` into ``out_dir``; with ``resume`` continue from ``out_dir/last.pt``. Returns the final eval."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)

    splits = build_splits(cfg)
    if cfg.model.num_classes != len(splits.class_names) - 1:
        print(f"model.num_classes = {len(splits.class_names) - 1} (from the data's categories)")
        cfg.model.num_classes = len(splits.class_names) - 1
    model = build_model(cfg).to(device)
    print(f"{cfg.model.arch}: {count_parameters(model):,} parameters, {model.anchors_cxcywh.shape[0]} default boxes, "
          f"{len(splits.train)} training / {len(splits.val)} evaluation images, device {device}")
    criterion, encoder = build_criterion(cfg), build_encoder(cfg, device)
    optimizer = build_optimizer(cfg, model)
    loader = make_loader(splits.train, cfg.train.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
                         seed=cfg.train.seed, drop_last=len(splits.train) >= cfg.train.batch_size)
    steps_per_epoch = len(loader)
    lr_at = partial(warmup_cosine_lr, total_steps=cfg.train.epochs * steps_per_epoch,
                    warmup_steps=round(cfg.train.warmup_epochs * steps_per_epoch), lr_init=cfg.train.lr_init,
                    lr_peak=cfg.train.lr, lr_end=cfg.train.lr_end)
    if dry_run:
        return dry_run_step(cfg, model, criterion, encoder, optimizer, loader, lr_at, device)

    start_epoch, step, best = 0, 0, {"AP": -1.0}
    if resume:
        state = load_checkpoint(out / "last.pt", map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, best = state["epoch"], state["step"], state["best"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        print(f"resumed from {out / 'last.pt'} at epoch {start_epoch}")
    else:
        save_config(cfg, out / "config.yaml")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    log = RunLog(out / "metrics.jsonl")

    for epoch in range(start_epoch, cfg.train.epochs):
        loader.generator.manual_seed(cfg.train.seed + epoch)   # the shuffle of epoch e does not depend on history
        t0 = time.time()
        stats = train_one_epoch(model, criterion, encoder, loader, optimizer, lr_at, device, step,
                                amp_dtype(cfg, device), cfg.train.grad_clip, log, cfg.train.log_every, progress,
                                desc=f"epoch {epoch + 1}/{cfg.train.epochs}")
        step = stats.pop("next_step")
        log({"kind": "epoch", "epoch": epoch + 1, "step": step, "seconds": round(time.time() - t0, 2), **stats})
        print(f"epoch {epoch + 1}/{cfg.train.epochs}: loss {stats['loss']:.4f} (cls {stats['loss_cls']:.4f}, "
              f"loc {stats['loss_loc']:.4f}), {time.time() - t0:.1f}s")
        last_epoch = epoch + 1 == cfg.train.epochs
        if last_epoch or (cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0):
            result = evaluate_model(cfg, model, splits, device)
            log({"kind": "eval", "epoch": epoch + 1, "step": step, **result.stats})
            print(f"  eval: AP {result.stats['AP']:.4f}  AP50 {result.stats['AP50']:.4f}")
            if result.stats["AP"] > best["AP"]:
                best = {**result.stats, "epoch": epoch + 1}
                save_checkpoint(checkpoint_payload(cfg, model, splits.class_names, epoch=epoch + 1, metrics=best),
                                out / "best.pt")
                write_eval_json(out / "eval.json", result, extra={"epoch": epoch + 1, "checkpoint": "best.pt"})
                best_result = result
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        state = checkpoint_payload(cfg, model, splits.class_names, optimizer=optimizer.state_dict(), epoch=epoch + 1,
                                   step=step, best=best, rng=rng)
        save_checkpoint(state, out / "last.pt")
        if cfg.train.checkpoint_every and (epoch + 1) % cfg.train.checkpoint_every == 0:
            save_checkpoint(state, out / f"epoch_{epoch + 1}.pt")
        plot_training_curves(out / "metrics.jsonl", out / "curves.png")

    final = json.loads((out / "eval.json").read_text())
    if "best_result" in locals():
        print(best_result.summary)
        print(format_per_class_table(best_result.per_class))
    print(f"best AP {final['AP']:.4f} (AP50 {final['AP50']:.4f}) at epoch {final['epoch']}; run folder {out}")
    return final


def dry_run_step(cfg, model, criterion, encoder, optimizer, loader, lr_at, device) -> dict:
    """One training step on one batch: proves the preset builds and trains, reports sizes."""
    t0 = time.time()
    stats = train_one_epoch(model, criterion, encoder, _first(loader), optimizer, lr_at, device, 0,
                            amp_dtype(cfg, device), progress=False)
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
