"""Shared test fixtures.

``tutorial_default_boxes`` is a literal port of the MindSpore tutorial's ``GeneratDefaultBoxes`` (numpy, Python
floats, (cy, cx, h, w) order, float32 at the end): the independent reference for the default boxes
(tests/test_anchors.py) and the anchors of the tutorial's matcher (tests/test_matching.py).
"""
from __future__ import annotations

import itertools as it
import math

import numpy as np
import pytest
import torch


def generate_tutorial_default_boxes() -> tuple[np.ndarray, np.ndarray]:
    """Returns (default_boxes (8732, 4) as (cy, cx, h, w), default_boxes_tlbr (8732, 4) as (y1, x1, y2, x2)),
    both float32, computed exactly as the tutorial does (Python float64 maths, cast at the end)."""
    feature_sizes = [38, 19, 10, 5, 3, 1]
    num_default = [4, 6, 6, 6, 4, 4]
    aspect_ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
    fk = 300 / np.array([8, 16, 32, 64, 100, 300])
    scale_rate = (0.95 - 0.1) / (len(num_default) - 1)
    scales = [0.1 + scale_rate * i for i in range(len(num_default))] + [1.0]
    default_boxes = []
    for idex, feature_size in enumerate(feature_sizes):
        sk1 = scales[idex]
        sk2 = scales[idex + 1]
        sk3 = math.sqrt(sk1 * sk2)
        all_sizes = [(sk1, sk1)]
        for aspect_ratio in aspect_ratios[idex]:
            w, h = sk1 * math.sqrt(aspect_ratio), sk1 / math.sqrt(aspect_ratio)
            all_sizes.append((w, h))
            all_sizes.append((h, w))
        all_sizes.append((sk3, sk3))
        assert len(all_sizes) == num_default[idex]
        for i, j in it.product(range(feature_size), repeat=2):
            for w, h in all_sizes:
                cx, cy = (j + 0.5) / fk[idex], (i + 0.5) / fk[idex]
                default_boxes.append([cy, cx, h, w])

    def to_tlbr(cy, cx, h, w):
        return cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2

    default_boxes_tlbr = np.array(tuple(to_tlbr(*i) for i in default_boxes), dtype="float32")
    return np.array(default_boxes, dtype="float32"), default_boxes_tlbr


@pytest.fixture(scope="session")
def tutorial_default_boxes() -> tuple[np.ndarray, np.ndarray]:
    return generate_tutorial_default_boxes()


@pytest.fixture(scope="module")
def one_thread():
    """Per-image transforms run single-threaded (as in DataLoader workers); intra-op threads only add contention
    on small images, badly so on a shared machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
