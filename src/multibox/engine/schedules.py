"""Learning-rate schedules as pure functions of the global step, so a resumed run continues exactly."""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

from multibox.config import TrainConfig


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, lr_init: float, lr_peak: float,
                     lr_end: float) -> float:
    """The tutorial's schedule: linear from ``lr_init`` to ``lr_peak`` over the warm-up, then a cosine from
    ``lr_peak`` down to ``lr_end`` at ``total_steps``."""
    if step < warmup_steps:
        return lr_init + (lr_peak - lr_init) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr_end + (lr_peak - lr_end) * (1 + math.cos(math.pi * min(1.0, progress))) / 2


def warmup_multistep_lr(step: int, warmup_steps: int, lr_init: float, lr_peak: float, milestones: list[int],
                        gamma: float) -> float:
    """The paper's schedule: optional linear warm-up, then ``lr_peak`` times ``gamma`` per milestone passed."""
    if step < warmup_steps:
        return lr_init + (lr_peak - lr_init) * step / warmup_steps
    return lr_peak * gamma ** sum(step >= m for m in milestones)


def build_lr_schedule(train: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """global step -> learning rate of ``train.schedule``. No step exceeds ``train.lr``: ``lr_init`` and ``lr_end``
    are capped at it, so that a lower ``train.lr`` (fine-tuning) never warms up from above, and ``train.lr: 0``
    moves nothing (a way to evaluate where fine-tuning starts)."""
    if not isinstance(train.epochs, int):   # "auto" is settled by the run, once it knows its data
        raise ValueError(f"train.epochs must be settled to a number before the schedule is built, not {train.epochs!r}")
    warmup = round(train.warmup_epochs * steps_per_epoch)
    lr_init, lr_end = min(train.lr_init, train.lr), min(train.lr_end, train.lr)
    if train.schedule == "warmup_cosine":
        return partial(warmup_cosine_lr, total_steps=train.epochs * steps_per_epoch, warmup_steps=warmup,
                       lr_init=lr_init, lr_peak=train.lr, lr_end=lr_end)
    if train.schedule == "multistep":
        return partial(warmup_multistep_lr, warmup_steps=warmup, lr_init=lr_init, lr_peak=train.lr,
                       milestones=[m * steps_per_epoch for m in train.milestones], gamma=train.gamma)
    raise ValueError(f"unknown train.schedule {train.schedule!r}")
