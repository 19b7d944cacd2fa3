"""How long a run trains: epochs sized by the data (``train.epochs: auto``) or fitted to a time budget
(``train.time``, ``multibox train --time 15m``, as Ultralytics' ``time``).

Both settle ``train.epochs`` to a whole number, so that the learning-rate schedule stays a pure function of the
global step (an exact resume) and the run's config says how long it trained.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from multibox.errors import InputError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|min|h)?\s*$")
_SECONDS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, None: 60.0}

# A time budget is fitted once the run has trained this long (or at the end of its first epoch, if sooner): long
# enough to measure the step time with the data loading in it, short enough to leave most of the budget to fit.
MEASURE_SECONDS = 60.0
# The evaluation after training is not measured before it happens; it is estimated from the training step time
# (forward only, no backward, about a third of a training step per image, plus decoding and NMS) and the
# report's fixed cost (COCO evaluation, figures, checkpoint).
EVAL_SECONDS_PER_TRAIN_SECOND = 0.5
EVAL_FIXED_SECONDS = 20.0


def parse_minutes(text: str) -> float:
    """``"15m"``, ``"90s"``, ``"1.5h"`` or a bare number of minutes -> minutes (> 0). :class:`InputError` else."""
    match = _DURATION.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"--time expects a duration such as 15m, 90s or 1.5h, got {text!r}")
    return float(match.group(1)) * _SECONDS[match.group(2)] / 60.0


def auto_epochs(train_images: int, target_images: int, max_epochs: int) -> int:
    """``train.epochs: auto``: enough epochs to show the network about ``target_images`` training images (a small
    set is seen more often, a large one at least once), at most ``max_epochs``."""
    return max(1, min(max_epochs, math.ceil(target_images / max(1, train_images))))


@dataclass(frozen=True)
class BudgetFit:
    """The outcome of fitting a run to its time budget: ``epochs`` to train in all, from the measured
    ``step_seconds`` (per global step, data loading and per-epoch checkpoints included) and the estimated
    ``eval_seconds`` of one evaluation."""

    epochs: int
    step_seconds: float
    eval_seconds: float

    def record(self, minutes: float) -> dict:
        return {"kind": "budget", "minutes": minutes, "epochs": self.epochs,
                "step_seconds": round(self.step_seconds, 4), "eval_seconds": round(self.eval_seconds, 1)}


def fit_epochs_to_budget(budget_s: float, elapsed_s: float, train_s: float, steps_done: int, next_step: int,
                         steps_per_epoch: int, batch_size: int, val_images: int, eval_every: int) -> BudgetFit:
    """Epochs that end the run within ``budget_s`` seconds.

    Args:
        budget_s: the whole run's time, from its start.
        elapsed_s: time since the run's start (data indexing, model building and the training so far).
        train_s: of that, the time spent in the ``steps_done`` training steps measured (this process's).
        next_step: the run's global step (a resumed run has done more steps than it timed).
        steps_per_epoch: global steps per epoch; ``batch_size``: images per global step.
        val_images: images of each evaluation; ``eval_every``: epochs between evaluations (0: only the last).
    Returns:
        A :class:`BudgetFit`; at least the epoch in progress is finished (a budget shorter than that is overrun).
    """
    step_s = train_s / max(1, steps_done)
    eval_s = val_images * step_s / batch_size * EVAL_SECONDS_PER_TRAIN_SECOND + EVAL_FIXED_SECONDS
    epoch_s = step_s * steps_per_epoch + (eval_s / eval_every if eval_every else 0.0)
    remaining = budget_s - elapsed_s - eval_s
    epochs_done = next_step / steps_per_epoch
    epochs = math.floor(epochs_done + max(0.0, remaining) / epoch_s)
    return BudgetFit(max(math.ceil(epochs_done), epochs, 1), step_s, eval_s)
