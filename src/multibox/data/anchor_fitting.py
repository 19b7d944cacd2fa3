"""``anchors.fit``: fit a config's default boxes to a dataset's objects before training.

``auto`` (the presets' default) fits only when the boxes miss shapes they could match: among the objects the grid
can match -- a box of the object's own shape at the nearest centre of some level reaches the matching threshold,
and the object's long side is at least the smallest default box's side -- fewer than :data:`AUTO_FIT_MIN_RECALL`
reach the threshold with a default box. The others are limited by the feature maps' stride or lie below the
smallest boxes on purpose: on COCO ~40 % of the objects are smaller than the paper's smallest box at 300x300, and
the paper's boxes are what COCO's published numbers were measured with. With COCO-like statistics the paper's
boxes reach 89 % of the matchable objects (SSD300 and SSD512; SSDLite 92 %); long thin objects bring that to
40-75 %. ``auto`` also keeps boxes given explicitly (``anchors.sizes``: a model zoo's layout, boxes fitted before)
and those of a detector being fine-tuned (its box head regresses from them); ``true`` always fits. The number of
boxes per location is kept, so the network and its heads do not change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from multibox.config import Config, ConfigError
from multibox.core.anchor_fit import (FitScore, ShapeGrid, best_iou_per_shape, fit_shapes, own_shape_iou, reaches,
                                      sample_rows, score_shapes)
from multibox.core.anchors import AnchorSpec
from multibox.data.objects import ObjectTable
from multibox.models import model_anchor_spec

# auto fits when fewer of the objects the grid can match reach the matching threshold with a default box.
AUTO_FIT_MIN_RECALL = 0.8
# Objects the fit works on (drawn at random beyond that): the fit of 5,000 objects takes seconds.
MAX_FIT_OBJECTS = 5_000


@dataclass(frozen=True)
class AnchorFit:
    """What ``anchors.fit`` decided for a dataset.

    ``fitted``: whether the boxes were replaced; ``reason``: why, in a few words; ``before`` / ``after``: the
    :class:`FitScore` of the config's boxes and of the boxes used (equal when not fitted); ``matchable_recall``:
    recall among the objects the grid can match (see the module docstring); ``sizes``: per level the [w, h] lists
    of the boxes used (``anchors.sizes``)."""

    fitted: bool
    reason: str
    before: FitScore
    after: FitScore
    matchable_recall: float
    sizes: list[list[list[float]]]

    def spec(self, spec: AnchorSpec) -> AnchorSpec:
        return dataclasses.replace(spec, sizes=self.sizes)


def strict_matching(cfg: Config) -> bool:
    """The matcher's test at the threshold: > for the tutorial's rule, >= for torchvision's."""
    return cfg.loss.match_rule == "tutorial"


def matchable_recall(boxes_cxcywh: torch.Tensor, best_iou: torch.Tensor, grid: ShapeGrid, threshold: float,
                     strict: bool) -> float:
    """Recall among the (N, 4) objects the grid can match (1.0 when there are none), from their (N,) best IoUs
    with ``grid``'s shapes."""
    long_side = boxes_cxcywh[:, 2:].max(dim=1).values
    matchable = (long_side >= grid.wh.prod(dim=1).min().sqrt()) & reaches(own_shape_iou(boxes_cxcywh, grid),
                                                                           threshold, strict)
    if not matchable.any():
        return 1.0
    return float(reaches(best_iou[matchable], threshold, strict).double().mean())


def _kept(mode: bool | str, cfg: Config, matchable: float, fine_tuning: bool, empty: bool) -> str | None:
    """Why the boxes stay as they are, or None to fit."""
    if empty:
        return "no objects"
    if mode is True or mode == "auto" and cfg.anchors.fit_boxes is not None:
        return None
    if mode is False:
        return "anchors.fit is false"
    if cfg.anchors.sizes is not None:
        return "anchors.sizes are given"
    if fine_tuning:
        return "fine-tuning a detector, whose box head regresses from these boxes"
    if matchable >= AUTO_FIT_MIN_RECALL:
        return (f"{matchable:.1%} of the objects the grid can match reach IoU {cfg.loss.iou_threshold:g} "
                f"(auto fits below {AUTO_FIT_MIN_RECALL:.0%})")
    return None


def fit_anchors(cfg: Config, table: ObjectTable, mode: bool | str | None = None,
                fine_tuning: bool = False) -> AnchorFit:
    """Decide per ``mode`` (default ``cfg.anchors.fit``) and fit ``cfg``'s default boxes to ``table``'s objects
    (at most :data:`MAX_FIT_OBJECTS` of them, drawn with ``train.seed``). ``fine_tuning``: the run starts from a
    detector's weights (``auto`` keeps its boxes). ``cfg``'s boxes are not changed (its feature sizes are resolved:
    :func:`multibox.models.resolve_feature_sizes`)."""
    mode = cfg.anchors.fit if mode is None else mode
    spec = model_anchor_spec(cfg)
    grid = ShapeGrid.of(spec)
    boxes = table.boxes_cxcywh[sample_rows(len(table), MAX_FIT_OBJECTS, cfg.train.seed)]
    threshold, strict = cfg.loss.iou_threshold, strict_matching(cfg)
    best = best_iou_per_shape(boxes, grid).max(dim=1).values
    before = FitScore.of(best, threshold, strict) if len(boxes) else FitScore(1.0, 1.0)
    matchable = matchable_recall(boxes, best, grid, threshold, strict) if len(boxes) else 1.0
    kept = _kept(mode, cfg, matchable, fine_tuning, not len(boxes))
    if kept is not None:
        sizes = [[list(wh) for wh in spec.location_sizes(k)] for k in range(len(spec.feature_sizes))]
        return AnchorFit(False, kept, before, before, matchable, sizes)
    reference = None
    if cfg.anchors.fit_boxes is not None:
        if fine_tuning:
            raise ConfigError("anchors.fit_boxes changes the box head, so it cannot fine-tune a detector's "
                              "(--weights): leave it unset")
        grid, reference = ShapeGrid.of(dataclasses.replace(spec, sizes=_layout(spec, cfg.anchors.fit_boxes))), grid
    fitted = fit_shapes(boxes, grid, threshold, strict, seed=cfg.train.seed, reference=reference)
    after = score_shapes(boxes, fitted, threshold, strict)
    reason = "anchors.fit is true" if mode is True else (
        f"anchors.fit_boxes is {cfg.anchors.fit_boxes}" if cfg.anchors.fit_boxes is not None else
        f"only {matchable:.1%} of the objects the grid can match reach IoU {threshold:g}")
    return AnchorFit(True, reason, before, after, matchable, fitted.level_sizes(len(spec.feature_sizes)))


def _layout(spec: AnchorSpec, per_location: int) -> list[list[list[float]]]:
    """Starting shapes for ``per_location`` boxes on every level (the k-means replaces them where the level has
    enough objects): the level's shapes by area, every other one dropped evenly when fewer, or repeated 1.5x
    larger each round when more."""
    layout = []
    for k in range(len(spec.feature_sizes)):
        # by area, rounded (a box and its ratio pairs have one area up to float noise), the squarest first
        shapes = sorted(spec.location_sizes(k), key=lambda wh: (round(wh[0] * wh[1], 9), max(wh) / min(wh)))
        m = len(shapes)
        if per_location <= m:
            picked = [shapes[round(i * (m - 1) / max(per_location - 1, 1))] for i in range(per_location)]
        else:
            picked = [(w * 1.5 ** (i // m), h * 1.5 ** (i // m)) for i, (w, h) in
                      ((i, shapes[i % m]) for i in range(per_location))]
        layout.append([[float(w), float(h)] for w, h in picked])
    return layout


def describe_fit(result: AnchorFit) -> str:
    """One line for the log: what was decided, and the recall / mean best IoU before and after."""
    b, a = result.before, result.after
    if not result.fitted:
        return f"default boxes kept ({result.reason}): recall {b.recall:.3f}, mean best IoU {b.mean_iou:.3f}"
    return (f"default boxes fitted to the data ({result.reason}): recall at the matching threshold {b.recall:.3f} "
            f"-> {a.recall:.3f}, mean best IoU {b.mean_iou:.3f} -> {a.mean_iou:.3f}")
