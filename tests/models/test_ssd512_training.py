"""``multibox train --config ssd512-vgg16`` runs on CPU and its loss goes down (a separate file: an SSD512 step
takes seconds on two CPU cores, and each test file stays under a minute)."""
from __future__ import annotations

import math

import pytest
from test_paper_preset import train_steps

pytestmark = pytest.mark.slow   # SSD512 training steps on the CPU


def test_ssd512_trains_on_cpu(tmp_path):
    """Two steps of the real command on the same image (batch 1): the loss goes down."""
    losses = train_steps(tmp_path, "ssd512-vgg16", steps=2, lr=1e-4)
    print("ssd512-vgg16 losses:", losses)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert losses[1] < 0.9 * losses[0]
