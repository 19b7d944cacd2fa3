"""Tests for multibox.core.anchors.

References: values worked out by hand from SPEC §2's formulas, a literal port of the tutorial's
``GeneratDefaultBoxes`` (tests/conftest.py), and torchvision's ``DefaultBoxGenerator``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from multibox.core.anchors import AnchorSpec, default_boxes_cxcywh, level_sizes, tutorial_scales
from multibox.config import load_config
from multibox.core.anchors import anchor_spec

FEATURE_SIZES = [38, 19, 10, 5, 3, 1]
STEPS = [8, 16, 32, 64, 100, 300]
ASPECT_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]


@pytest.fixture(scope="module")
def seed_spec() -> AnchorSpec:
    cfg = load_config("ssd300-vgg16-seed")
    return anchor_spec(cfg.anchors, cfg.model.image_size)


@pytest.fixture(scope="module")
def seed_boxes(seed_spec) -> torch.Tensor:
    return default_boxes_cxcywh(seed_spec)


def test_seed_preset_has_8732_boxes(seed_spec, seed_boxes):
    # 38²·4 + 19²·6 + 10²·6 + 5²·6 + 3²·4 + 1²·4 = 5776 + 2166 + 600 + 150 + 36 + 4 = 8732
    assert seed_spec.boxes_per_location() == [4, 6, 6, 6, 4, 4]
    assert seed_spec.num_anchors() == 8732
    assert seed_boxes.shape == (8732, 4)
    assert seed_boxes.dtype == torch.float32


def test_tutorial_scales_hand_values():
    # s_k = 0.1 + (0.95 - 0.1)·k/5 = 0.1 + 0.17k, then 1.0
    assert tutorial_scales(6) == pytest.approx([0.1, 0.27, 0.44, 0.61, 0.78, 0.95, 1.0], abs=1e-12)


# First box index of each level: cumulative sums of f²·k = 0, 5776, 7942, 8542, 8692, 8728.
# Centre of the first location: (0 + 0.5)/f_k with f_k = 300/step = 37.5, 18.75, 9.375, 4.6875, 3, 1.
# Sizes at a location, in order: (s_k, s_k); per ratio r: (s_k·√r, s_k/√r), (s_k/√r, s_k·√r); (√(s_k·s_{k+1}),)·2.
GOLDEN_FIRST_LOCATION = {
    # level 0: c = 0.5/37.5 = 0.0133333; s = 0.1, s' = 0.27: 0.1·√2 = 0.1414214, 0.1/√2 = 0.0707107,
    # √(0.1·0.27) = √0.027 = 0.1643168
    0: (0, 0.0133333, [(0.1, 0.1), (0.1414214, 0.0707107), (0.0707107, 0.1414214), (0.1643168, 0.1643168)]),
    # level 1: c = 0.5/18.75 = 0.0266667; s = 0.27, s' = 0.44: 0.27·√2 = 0.3818377, 0.27/√2 = 0.1909188,
    # 0.27·√3 = 0.4676537, 0.27/√3 = 0.1558846, √(0.27·0.44) = √0.1188 = 0.3446738
    1: (5776, 0.0266667, [(0.27, 0.27), (0.3818377, 0.1909188), (0.1909188, 0.3818377),
                          (0.4676537, 0.1558846), (0.1558846, 0.4676537), (0.3446738, 0.3446738)]),
    # level 2: c = 0.5/9.375 = 0.0533333; s = 0.44, s' = 0.61: 0.44·√2 = 0.6222540, 0.44/√2 = 0.3111270,
    # 0.44·√3 = 0.7621024, 0.44/√3 = 0.2540341, √(0.44·0.61) = √0.2684 = 0.5180734
    2: (7942, 0.0533333, [(0.44, 0.44), (0.6222540, 0.3111270), (0.3111270, 0.6222540),
                          (0.7621024, 0.2540341), (0.2540341, 0.7621024), (0.5180734, 0.5180734)]),
    # level 3: c = 0.5/4.6875 = 0.1066667; s = 0.61, s' = 0.78: 0.61·√2 = 0.8626703, 0.61/√2 = 0.4313351,
    # 0.61·√3 = 1.0565510 (not clipped), 0.61/√3 = 0.3521837, √(0.61·0.78) = √0.4758 = 0.6897826
    3: (8542, 0.1066667, [(0.61, 0.61), (0.8626703, 0.4313351), (0.4313351, 0.8626703),
                          (1.0565510, 0.3521837), (0.3521837, 1.0565510), (0.6897826, 0.6897826)]),
    # level 4: c = 0.5/3 = 0.1666667; s = 0.78, s' = 0.95: 0.78·√2 = 1.1030866, 0.78/√2 = 0.5515433,
    # √(0.78·0.95) = √0.741 = 0.8608136
    4: (8692, 0.1666667, [(0.78, 0.78), (1.1030866, 0.5515433), (0.5515433, 1.1030866), (0.8608136, 0.8608136)]),
    # level 5: c = 0.5/1 = 0.5; s = 0.95, s' = 1.0: 0.95·√2 = 1.3435029, 0.95/√2 = 0.6717514,
    # √(0.95·1.0) = 0.9746794
    5: (8728, 0.5, [(0.95, 0.95), (1.3435029, 0.6717514), (0.6717514, 1.3435029), (0.9746794, 0.9746794)]),
}


@pytest.mark.parametrize("level", sorted(GOLDEN_FIRST_LOCATION))
def test_first_location_of_each_level_hand_values(seed_boxes, level):
    start, centre, sizes = GOLDEN_FIRST_LOCATION[level]
    expected = torch.tensor([[centre, centre, w, h] for w, h in sizes])
    torch.testing.assert_close(seed_boxes[start:start + len(sizes)], expected, rtol=0, atol=1e-6)


def test_second_location_and_row_order_hand_values(seed_boxes):
    # Level 0, location (i=0, j=1): cx = 1.5/37.5 = 0.04, cy = 0.5/37.5 = 0.0133333 (columns vary fastest).
    torch.testing.assert_close(seed_boxes[4], torch.tensor([0.04, 0.0133333, 0.1, 0.1]), rtol=0, atol=1e-6)
    # Level 0, location (i=1, j=0) is location 38: index 38·4 = 152; cx = 0.0133333, cy = 0.04.
    torch.testing.assert_close(seed_boxes[152], torch.tensor([0.0133333, 0.04, 0.1, 0.1]), rtol=0, atol=1e-6)
    # Last box of level 0: location (37, 37), index 5775 = extra box; c = 37.5/37.5 = 1.0
    torch.testing.assert_close(seed_boxes[5775], torch.tensor([1.0, 1.0, 0.1643168, 0.1643168]), rtol=0, atol=1e-6)


def test_last_box_hand_value(seed_boxes):
    # The only location of the 1x1 map: centre (0.5, 0.5); last size √(0.95·1.0) = 0.9746794
    torch.testing.assert_close(seed_boxes[-1], torch.tensor([0.5, 0.5, 0.9746794, 0.9746794]), rtol=0, atol=1e-6)


def test_seed_boxes_are_not_clipped(seed_boxes):
    assert seed_boxes[:, 2:].max() == pytest.approx(1.3435029, abs=1e-6)   # 0.95·√2 at the last level


def test_equals_literal_port_of_tutorial_generator(seed_boxes, tutorial_default_boxes):
    """All 8732 boxes, bit for bit, after reordering the tutorial's (cy, cx, h, w) to (cx, cy, w, h)."""
    default_boxes, default_boxes_tlbr = tutorial_default_boxes
    assert default_boxes.shape == (8732, 4)
    ref = torch.from_numpy(default_boxes[:, [1, 0, 3, 2]].copy())
    torch.testing.assert_close(seed_boxes, ref, rtol=0, atol=0)
    # and the float64 result agrees with the tutorial's float64 maths to rounding
    spec = anchor_spec(load_config("ssd300-vgg16-seed").anchors, 300)
    boxes64 = default_boxes_cxcywh(spec, dtype=torch.float64)
    torch.testing.assert_close(boxes64, ref.double(), rtol=0, atol=1e-7)


def test_level_sizes_extra_box_position():
    last = level_sizes(0.2, 0.8, [2])
    second = level_sizes(0.2, 0.8, [2], extra_second=True)
    # √(0.2·0.8) = 0.4
    assert last[-1] == pytest.approx((0.4, 0.4))
    assert second[1] == pytest.approx((0.4, 0.4))
    assert sorted(last) == sorted(second)


# --------------------------------------------------------------------------- torchvision

TV_SCALES = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]


@pytest.fixture(scope="module")
def torchvision_spec() -> AnchorSpec:
    return AnchorSpec(FEATURE_SIZES, STEPS, TV_SCALES, ASPECT_RATIOS, 300, clip=True, extra_box_second=True)


@pytest.fixture(scope="module")
def torchvision_generator() -> DefaultBoxGenerator:
    return DefaultBoxGenerator(aspect_ratios=ASPECT_RATIOS, scales=TV_SCALES, steps=STEPS)


def test_matches_torchvision_grid_default_boxes(torchvision_spec, torchvision_generator):
    ref = torchvision_generator._grid_default_boxes([[f, f] for f in FEATURE_SIZES], [300, 300])  # cxcywh in [0, 1]
    ours = default_boxes_cxcywh(torchvision_spec)
    assert ref.shape == ours.shape == (8732, 4)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_matches_torchvision_forward_pixels(torchvision_spec, torchvision_generator):
    """torchvision's public path: per image, xyxy in pixels of the 300x300 input."""
    images = ImageList(torch.zeros(2, 3, 300, 300), [(300, 300), (300, 300)])
    features = [torch.zeros(2, 1, f, f) for f in FEATURE_SIZES]
    ref = torchvision_generator(images, features)
    assert len(ref) == 2
    ours = default_boxes_cxcywh(torchvision_spec, dtype=torch.float64)
    c, wh = ours[:, :2], ours[:, 2:]
    ours_xyxy_px = torch.cat((c - wh / 2, c + wh / 2), dim=1) * 300
    for per_image in ref:
        torch.testing.assert_close(ours_xyxy_px.float(), per_image, rtol=0, atol=1e-3)


def test_torchvision_order_differs_from_tutorial(torchvision_spec):
    """The two layouts hold the same sizes per location, only the extra box moves."""
    tutorial_layout = AnchorSpec(FEATURE_SIZES, STEPS, TV_SCALES, ASPECT_RATIOS, 300, clip=True)
    a = default_boxes_cxcywh(torchvision_spec)[:4]
    b = default_boxes_cxcywh(tutorial_layout)[:4]
    assert torch.equal(a[[0, 2, 3, 1]], b)


def test_clip_clamps_sizes_not_centres():
    """torchvision clips the (w, h) pairs in centre form; centres are left alone. On the 10x10 map
    (step 32, f_k = 300/32 = 9.375) the last column's centre is 9.5/9.375 = 1.0133333 and must stay so."""
    spec = AnchorSpec(FEATURE_SIZES, STEPS, TV_SCALES, ASPECT_RATIOS, 300, clip=True)
    boxes = default_boxes_cxcywh(spec)
    unclipped = default_boxes_cxcywh(AnchorSpec(FEATURE_SIZES, STEPS, TV_SCALES, ASPECT_RATIOS, 300))
    assert unclipped[:, 2:].max() > 1
    torch.testing.assert_close(boxes[:, 2:], unclipped[:, 2:].clamp(0, 1))
    torch.testing.assert_close(boxes[:, :2], unclipped[:, :2])
    # level 2 starts at 5776 + 2166 = 7942; location (i=0, j=9) is 9·6 = 54 boxes further
    assert float(boxes[7942 + 54, 0]) == pytest.approx(1.0133333, abs=1e-6)


def test_non_square_steps_other_image_size():
    """SSD512's layout (7 maps) through the same code: count and a hand value."""
    spec = AnchorSpec([64, 32, 16, 8, 4, 2, 1], [8, 16, 32, 64, 128, 256, 512],
                      [0.04, 0.1, 0.26, 0.42, 0.58, 0.74, 0.9, 1.06],
                      [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]], 512)
    # 64²·4 + 32²·6 + 16²·6 + 8²·6 + 4²·6 + 2²·4 + 1²·4 = 16384 + 6144 + 1536 + 384 + 96 + 16 + 4 = 24564
    assert spec.num_anchors() == 24564
    boxes = default_boxes_cxcywh(spec)
    assert boxes.shape == (24564, 4)
    # first box: centre 0.5/(512/8) = 0.0078125, size 0.04
    torch.testing.assert_close(boxes[0], torch.tensor([0.0078125, 0.0078125, 0.04, 0.04]))
    assert np.isclose(float(boxes[-1, 2]), (0.9 * 1.06) ** 0.5, atol=1e-6)


def test_explicit_sizes_and_feature_size_centres_by_hand():
    """``anchors.sizes`` replaces one level's (w, h) list; ``steps: null`` puts centres at (j + 0.5) / f."""
    spec = AnchorSpec([2, 1], None, [0.2, 0.5, 0.9], [[2], []], 300,
                      sizes=[[[0.1, 0.1], [0.3, 0.05]], None])
    assert spec.boxes_per_location() == [2, 2] and spec.num_anchors() == 2 * 2 * 2 + 2
    boxes = default_boxes_cxcywh(spec, torch.float64)
    expected_level0 = [[cx, cy, w, h] for cy in (0.25, 0.75) for cx in (0.25, 0.75)
                       for w, h in ((0.1, 0.1), (0.3, 0.05))]
    torch.testing.assert_close(boxes[:8], torch.tensor(expected_level0, dtype=torch.float64))
    root = math.sqrt(0.5 * 0.9)   # level 1 from its scale: (s, s), then the extra box (no aspect ratios)
    torch.testing.assert_close(boxes[8:], torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, root, root]],
                                                       dtype=torch.float64))


def test_non_square_grid_against_torchvision():
    """A 320x544 input (16:9 video) on VGG16's maps there: torchvision's centres on the feature grid (steps
    null), and the paper's scales as fractions of the shorter side, so the aspect-1 boxes are square in pixels
    (torchvision's normalised pairs stretch them to the input's aspect: 0.07 of 320 tall, 0.07 of 544 wide)."""
    grid = [(40, 68), (20, 34), (10, 17), (5, 9), (3, 7), (1, 5)]
    spec = AnchorSpec(grid, STEPS, TV_SCALES, ASPECT_RATIOS, (320, 544), clip=False, extra_box_second=True)
    ref = DefaultBoxGenerator(aspect_ratios=ASPECT_RATIOS, scales=TV_SCALES, clip=False)._grid_default_boxes(
        grid, [320, 544])
    ours = default_boxes_cxcywh(spec, torch.float64)
    assert spec.num_anchors() == ours.shape[0] == ref.shape[0] == sum(h * w * k for (h, w), k in
                                                                      zip(grid, [4, 6, 6, 6, 4, 4]))
    torch.testing.assert_close(ours[:, :2], ref[:, :2].double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:, 2:] * torch.tensor([544.0, 320.0], dtype=torch.float64),
                               ref[:, 2:].double() * 320, rtol=0, atol=1e-4)
    first = ours[0] * torch.tensor([544, 320, 544, 320], dtype=torch.float64)   # (0.5/68 * 544, 0.5/40 * 320)
    torch.testing.assert_close(first, torch.tensor([4.0, 4.0, 0.07 * 320, 0.07 * 320], dtype=torch.float64))


def test_network_feature_sizes_are_the_maps_the_model_computes():
    from multibox.models import build_model, network_feature_sizes
    cfg = load_config("tiny", ["model.image_size=[320, 544]"])
    sizes = network_feature_sizes(cfg)
    model = build_model(cfg)
    maps = model.backbone(torch.zeros(1, 3, 320, 544))
    assert sizes == [tuple(m.shape[-2:]) for m in maps]
    assert cfg.anchors.feature_sizes == [s[0] if s[0] == s[1] else list(s) for s in sizes]   # resolved in place
    loc, cls = model(torch.zeros(1, 3, 320, 544))
    assert loc.shape[1] == cls.shape[1] == model.anchors_cxcywh.shape[0]


def test_feature_sizes_for_another_input_are_replaced(caplog):
    from multibox.models import resolve_feature_sizes
    cfg = load_config("ssd300-vgg16", ["model.image_size=[320, 544]"])   # the preset lists 300x300's maps
    with caplog.at_level("INFO"):
        resolve_feature_sizes(cfg)
    assert cfg.anchors.feature_sizes == [[40, 68], [20, 34], [10, 17], [5, 9], [3, 7], [1, 5]]
    assert "ssd300_vgg16's maps at 320x544 are [[40, 68]" in caplog.text
    assert cfg.anchors.steps is None            # written for 300x300 too
    square = resolve_feature_sizes(load_config("ssd300-vgg16", ["model.image_size=416"]))
    # 416 / 300 = 1.39, yet the last map has 3 cells: the steps would put centres past the image
    assert square.anchors.feature_sizes == [52, 26, 13, 7, 5, 3] and square.anchors.steps is None
    native = resolve_feature_sizes(load_config("ssd300-vgg16"))
    assert native.anchors.steps == [8, 16, 32, 64, 100, 300]
    # sizes given that equal the network's keep the steps written with them (a checkpoint's boxes stay its own)
    stated = resolve_feature_sizes(load_config("tiny", ["model.image_size=320",
                                                        "anchors.feature_sizes=[40, 20, 10, 5, 3, 1]"]))
    assert stated.anchors.steps == [8, 16, 32, 64, 100, 300]
    # the zoo's explicit boxes, written for 300x300, keep their shape in pixels at 320x544
    zoo = load_config("ssd300-vgg16-zoo")
    moved = resolve_feature_sizes(load_config("ssd300-vgg16-zoo", ["model.image_size=[320, 544]"]))
    assert moved.anchors.sizes[1:] == zoo.anchors.sizes[1:] == [None] * 5      # those come from the scale rule
    for (w, h), (w0, h0) in zip(moved.anchors.sizes[0], zoo.anchors.sizes[0]):
        assert w * 544 == pytest.approx(w0 * 320) and h * 320 == pytest.approx(h0 * 320)


def test_image_size_too_small_for_the_network_is_a_config_error():
    from multibox.config import ConfigError
    from multibox.models import network_feature_sizes
    with pytest.raises(ConfigError, match="model.image_size .* too small for ssd300_vgg16"):
        network_feature_sizes(load_config("ssd300-vgg16", ["model.image_size=[64, 300]"]))
