"""Default-box geometry against objects (multibox.core.anchor_fit), checked against torchvision's box_iou over
every default box and against hand-computed overlaps."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torchvision.ops import box_iou

from multibox.config import load_config
from multibox.core.anchor_fit import (ShapeGrid, best_iou_per_shape, fit_shapes, kmeans_iou_wh, kmeans_shapes,
                                      local_search, score_shapes, search_value, shape_groups)
from multibox.core.anchors import anchor_spec, default_boxes_cxcywh
from multibox.core.boxes import cxcywh_to_xyxy
from multibox.models import model_anchor_spec


def _objects(n: int, seed: int, log_side=(-4.0, 0.0), log_aspect=(-1.0, 1.0)) -> torch.Tensor:
    """(n, 4) cxcywh objects: log-uniform sizes and aspect ratios, centres anywhere."""
    g = torch.Generator().manual_seed(seed)
    side = torch.empty(n, dtype=torch.float64).uniform_(*log_side, generator=g).exp()
    aspect = torch.empty(n, dtype=torch.float64).uniform_(*log_aspect, generator=g).exp()
    wh = torch.stack((side * aspect.sqrt(), side / aspect.sqrt()), 1).clamp(max=1.0)
    return torch.cat((torch.rand(n, 2, generator=g, dtype=torch.float64), wh), 1)


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", []), ("ssd300-vgg16", []), ("ssdlite320-mobilenet-v3", []), ("ssd300-mobilenet-v2", []),
    ("tiny", ["model.image_size=[320, 544]"]), ("ssd300-mobilenet-v2", ["model.image_size=[288, 512]"])])
def test_best_iou_per_shape_is_the_max_over_every_default_box(preset, overrides):
    # Steps that do not divide the input (300/8), clipped sizes (torchvision), no steps (SSDLite), explicit
    # per-level sizes (the zoo's MobileNetV2) and non-square grids all go through the nearest-centre shortcut.
    spec = model_anchor_spec(load_config(preset, overrides))
    gt = _objects(600, seed=1)
    grid = ShapeGrid.of(spec)
    per_shape = best_iou_per_shape(gt, grid)
    reference = box_iou(cxcywh_to_xyxy(gt), cxcywh_to_xyxy(default_boxes_cxcywh(spec, torch.float64)))
    assert per_shape.shape == (600, len(grid.wh))
    torch.testing.assert_close(per_shape.max(dim=1).values, reference.max(dim=1).values, rtol=0, atol=1e-12)
    # and shape by shape: each column is the max over that shape's positions
    flat_shape = torch.cat([torch.arange(int((grid.level < k).sum()), int((grid.level <= k).sum()))
                            .repeat(math.prod(spec.grid_hw(k))) for k in range(len(spec.feature_sizes))])
    for s in (0, len(grid.wh) // 2, len(grid.wh) - 1):
        torch.testing.assert_close(per_shape[:, s], reference[:, flat_shape == s].max(dim=1).values, rtol=0,
                                   atol=1e-12)


def test_best_iou_by_hand():
    # One level of 4x4 cells (f = 4, centres at 0.125 + k/4), one 0.25 x 0.25 shape.
    cfg = load_config("tiny", ["anchors.feature_sizes=[4]", "anchors.steps=null", "anchors.scales=[0.25, 0.25]",
                               "anchors.aspect_ratios=[[]]"])
    spec = dataclasses.replace(anchor_spec(cfg.anchors, 300), sizes=[[(0.25, 0.25)]])
    grid = ShapeGrid.of(spec)
    gt = torch.tensor([[0.375, 0.625, 0.25, 0.25],     # exactly on a default box
                       [0.25, 0.125, 0.25, 0.25],      # half a cell off in x: 1/2 overlap -> IoU 1/3
                       [0.125, 0.125, 0.125, 0.5],     # centred, 1/2 x 2 the size: inter 1/32, union 1/16 + 1/32
                       [0.99, 0.99, 0.25, 0.25]],      # past the last centre: the corner box, 0.135 off each way
                      dtype=torch.float64)
    iou = best_iou_per_shape(gt, grid)[:, 0]
    corner = (0.25 - 0.115) ** 2 / (2 * 0.0625 - (0.25 - 0.115) ** 2)
    torch.testing.assert_close(iou, torch.tensor([1.0, 1 / 3, (1 / 32) / (1 / 16 + 1 / 32), corner],
                                                 dtype=torch.float64))


def test_kmeans_finds_well_separated_shape_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.02, 0.16], [0.1, 0.1], [0.4, 0.05]], dtype=torch.float64)
    wh = torch.cat([c * torch.empty(300, 2, dtype=torch.float64).uniform_(0.9, 1.1, generator=g).clamp(min=0)
                    for c in centres])
    found = kmeans_iou_wh(wh, 3)
    ordered = centres[torch.argsort(centres.prod(1))]
    torch.testing.assert_close(found, ordered, rtol=0.05, atol=0)


def test_fitting_long_thin_objects_matches_them_and_never_scores_below_the_given_boxes():
    cfg = load_config("ssd300-vgg16")
    spec = anchor_spec(cfg.anchors, cfg.model.image_size)
    grid = ShapeGrid.of(spec)
    # 8:1 and 1:8 objects of 0.2-0.6 of the image: no box of the paper's (3:1 at most) reaches IoU 0.5
    long_side = _objects(1500, seed=3, log_side=(math.log(0.2), math.log(0.6)), log_aspect=(0, 0))[:, 2]
    thin = torch.cat((torch.rand(1500, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
                      torch.stack((long_side, long_side / 8), 1)), 1)
    gt = torch.cat((thin, thin[:, [0, 1, 3, 2]]))
    stock = score_shapes(gt, grid, 0.5, strict=False)
    fitted = score_shapes(gt, fit_shapes(gt, grid, 0.5, strict=False), 0.5, strict=False)
    assert stock.recall < 0.3 and fitted.recall > 0.9
    assert fitted.mean_iou > stock.mean_iou + 0.2
    # Boxes that already fit: the search keeps what it is given or improves it, nothing worse
    square = _objects(1000, seed=5, log_side=(math.log(0.1), math.log(0.8)), log_aspect=(-0.3, 0.3))
    before = score_shapes(square, grid, 0.5, strict=False)
    searched = local_search(square, grid, 0.5, strict=False)
    after = score_shapes(square, searched, 0.5, strict=False)
    assert after.value >= before.value
    assert search_value(square, searched, 0.5, strict=False) >= search_value(square, grid, 0.5, strict=False)


def test_fit_keeps_the_number_of_boxes_per_level():
    cfg = load_config("tiny")
    spec = anchor_spec(cfg.anchors, cfg.model.image_size)
    grid = ShapeGrid.of(spec)
    fitted = fit_shapes(_objects(800, seed=6), grid, 0.5, strict=True)
    assert [len(level) for level in fitted.level_sizes(6)] == spec.boxes_per_location()
    assert torch.equal(fitted.level, grid.level)


def test_one_shape_grid():
    cfg = load_config("tiny", ["anchors.feature_sizes=[4]", "anchors.steps=null"])
    spec = dataclasses.replace(anchor_spec(cfg.anchors, 300), sizes=[[(0.1, 0.1)]])
    gt = torch.tensor([[0.375, 0.625, 0.25, 0.25]], dtype=torch.float64).repeat(10, 1)   # on a centre
    grown = local_search(gt, ShapeGrid.of(spec), 0.5, strict=False)
    assert score_shapes(gt, grown, 0.5, strict=False).recall == 1.0   # 0.1 grew towards 0.25


def test_shape_groups_by_hand():
    # sqrt(w h) = 0.1 -> octave floor(log2 0.1) = -4; 0.3 -> -2; ratios 1/8, 1, 8 -> tall, compact, wide
    gt = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1 / 8 ** 0.5, 0.1 * 8 ** 0.5],
                       [0.5, 0.5, 0.3 * 8 ** 0.5, 0.3 / 8 ** 0.5], [0.5, 0.5, 0.15, 0.1]], dtype=torch.float64)
    octave = torch.tensor([-4, -4, -2, -4]) + 11
    torch.testing.assert_close(shape_groups(gt), octave * 3 + torch.tensor([1, 0, 2, 1]))


def _best_per_group(gt, grid):
    best = best_iou_per_shape(gt, grid).max(dim=1).values
    groups = shape_groups(gt)
    return {int(g): float(best[groups == g].mean()) for g in groups.unique() if (groups == g).sum() >= 0.01 * len(gt)}


def test_fitting_for_many_long_thin_objects_keeps_the_few_small_compact_ones_matched():
    # Set C of the README: 1:4 to 1:12 shapes either way, and 4% compact objects of 8-14 px at 300x300.
    # The search value alone gives the tiny preset's smallest boxes to the long thin objects.
    grid = ShapeGrid.of(anchor_spec(load_config("tiny").anchors, 300))
    g = torch.Generator().manual_seed(7)
    n = 3000
    long_side = torch.empty(n, dtype=torch.float64).uniform_(math.log(0.08), math.log(0.8), generator=g).exp()
    ratio = torch.empty(n, dtype=torch.float64).uniform_(math.log(4), math.log(12), generator=g).exp()
    wide = torch.rand(n, generator=g) < 0.5
    wh = torch.stack((long_side, long_side / ratio), 1)
    wh[wide] = wh[wide].flip(1)
    small = torch.empty(120, 1, dtype=torch.float64).uniform_(8 / 300, 14 / 300, generator=g).repeat(1, 2)
    gt = torch.cat((torch.rand(n + 120, 2, generator=g, dtype=torch.float64), torch.cat((wh, small))), 1)
    compact_small = int(shape_groups(gt[-1:])[0])
    stock = _best_per_group(gt, grid)

    unguarded = local_search(gt, max((grid, kmeans_shapes(gt, grid)),
                                     key=lambda s: search_value(gt, s, 0.5, strict=False)), 0.5, strict=False)
    assert _best_per_group(gt, unguarded)[compact_small] < stock[compact_small] - 0.1   # what the floor prevents

    fitted = fit_shapes(gt, grid, 0.5, strict=False)
    after = _best_per_group(gt, fitted)
    assert all(after[k] >= stock[k] - 0.02 - 1e-6 for k in stock)
    assert score_shapes(gt[:n], fitted, 0.5, strict=False).mean_iou > \
        score_shapes(gt[:n], grid, 0.5, strict=False).mean_iou + 0.05
