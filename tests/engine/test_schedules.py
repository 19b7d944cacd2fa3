from __future__ import annotations

import math

import pytest

from multibox.config import TrainConfig
from multibox.engine.schedules import build_lr_schedule


def tutorial_get_lr(lr_init, lr_end, lr_max, warmup_epochs, total_epochs, steps_per_epoch):
    """The tutorial's get_lr, literally (a list of per-step values)."""
    out = []
    total_steps = steps_per_epoch * total_epochs
    warmup_steps = steps_per_epoch * warmup_epochs
    for i in range(total_steps):
        if i < warmup_steps:
            lr = lr_init + (lr_max - lr_init) * i / warmup_steps
        else:
            lr = lr_end + (lr_max - lr_end) * (1. + math.cos(math.pi * (i - warmup_steps) / (total_steps - warmup_steps))) / 2.
        out.append(max(lr, 0.0))
    return out


def test_warmup_cosine_equals_tutorial():
    train = TrainConfig(epochs=60, lr=0.05, lr_init=0.001, lr_end=0.001 * 0.05, warmup_epochs=2)
    schedule = build_lr_schedule(train, steps_per_epoch=9)
    expected = tutorial_get_lr(0.001, 0.001 * 0.05, 0.05, 2, 60, 9)
    assert [schedule(i) for i in range(len(expected))] == pytest.approx(expected, rel=1e-12)
    assert schedule(0) == 0.001 and schedule(18) == pytest.approx(0.05)


def test_multistep_golden():
    train = TrainConfig(schedule="multistep", lr=0.002, lr_init=0.0002, warmup_epochs=1, milestones=[3, 5], gamma=0.1)
    schedule = build_lr_schedule(train, steps_per_epoch=10)
    assert schedule(0) == pytest.approx(0.0002)
    assert schedule(5) == pytest.approx(0.0011)
    assert schedule(10) == pytest.approx(0.002) and schedule(29) == pytest.approx(0.002)
    assert schedule(30) == pytest.approx(0.0002) and schedule(50) == pytest.approx(0.00002)
