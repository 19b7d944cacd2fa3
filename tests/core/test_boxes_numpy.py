"""The numpy path of multibox.core.boxes' format converters: hand-computed values, dtype and kind kept, and the
same numbers as the tensor path (the data layer's float64 COCO maths runs through it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from multibox.core.boxes import cxcywh_to_xyxy, ltwh_to_xyxy, xyxy_to_cxcywh, xyxy_to_ltwh, xyxy_to_yxyx, yxyx_to_xyxy

# One box, by hand: left 10, top 20, width 30, height 40 -> corners (10, 20, 40, 60), centre (25, 40).
LTWH = [10.0, 20.0, 30.0, 40.0]
XYXY = [10.0, 20.0, 40.0, 60.0]
CXCYWH = [25.0, 40.0, 30.0, 40.0]
YXYX = [20.0, 10.0, 60.0, 40.0]

CASES = [(ltwh_to_xyxy, LTWH, XYXY), (xyxy_to_ltwh, XYXY, LTWH), (xyxy_to_cxcywh, XYXY, CXCYWH),
         (cxcywh_to_xyxy, CXCYWH, XYXY), (xyxy_to_yxyx, XYXY, YXYX), (yxyx_to_xyxy, YXYX, XYXY)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("convert, given, expected", CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_hand_computed_values_keep_kind_and_dtype(convert, given, expected, dtype):
    out = convert(np.asarray([given, [0.0, 0.0, 0.0, 0.0]], dtype))
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == (2, 4)
    assert out.tolist() == [expected, [0.0, 0.0, 0.0, 0.0]]


def test_fractional_ltwh_to_xyxy_is_exactly_x_plus_w():
    ltwh = np.array([[0.1, 0.2, 0.3, 0.7], [1e9, -5.5, 0.25, 1e-9]])
    xyxy = ltwh_to_xyxy(ltwh)
    assert xyxy.tolist() == [[0.1, 0.2, 0.1 + 0.3, 0.2 + 0.7], [1e9, -5.5, 1e9 + 0.25, -5.5 + 1e-9]]


def test_any_leading_shape_and_empty():
    boxes = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    assert ltwh_to_xyxy(boxes).shape == (2, 3, 4)
    assert xyxy_to_cxcywh(boxes).shape == (2, 3, 4)
    empty = np.zeros((0, 4))
    for convert, _, _ in CASES:
        assert convert(empty).shape == (0, 4)


@pytest.mark.parametrize("convert", [c for c, _, _ in CASES], ids=lambda c: c.__name__)
def test_numpy_and_tensor_paths_agree_bit_for_bit(convert):
    g = np.random.default_rng(0)
    boxes = g.uniform(-100, 500, size=(64, 4))
    ours = convert(boxes)
    ref = convert(torch.from_numpy(boxes))
    assert isinstance(ref, torch.Tensor) and np.array_equal(ours, ref.numpy())


def test_the_old_inline_concatenate_gives_the_same_bits():
    """data/coco.py's training targets used ``np.concatenate([l[:, :2], l[:, :2] + l[:, 2:]], axis=1)``."""
    ltwh = np.random.default_rng(1).uniform(0, 640, size=(100, 4))
    old = np.concatenate([ltwh[:, :2], ltwh[:, :2] + ltwh[:, 2:]], axis=1)
    assert ltwh_to_xyxy(ltwh).tobytes() == old.tobytes()
