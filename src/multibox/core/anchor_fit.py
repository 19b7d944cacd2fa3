"""How well default boxes can match a set of objects, and fitting their shapes to them.

SSD's default boxes (Liu et al. 2016, §2.2) were chosen for VOC and COCO. On other data -- long thin objects,
objects of a few pixels -- few of them reach the matching threshold, and an object no default box overlaps
enough trains only through its one forced match. Fitting the shapes to the data helps detectors with fixed
priors: +3 mAP for SSD with k-means boxes (Zhong et al., "Anchor box optimization for object detection",
arXiv 1808.05727); YOLOv2 chose its priors by k-means with an IoU distance (Redmon & Farhadi 2017, §2).

Everything here is geometry on objects already in network units: (N, 4) cxcywh boxes normalised to [0, 1] at
the model's input, as the matcher sees them. A box of a given shape overlaps an object best at the grid centre
nearest to the object's centre (intersection falls with each axis' offset), so the best IoU of an object with
each of the S shapes, over all positions, is one (N, S) matrix: no (N, A) matrix over all default boxes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from multibox.core.anchors import AnchorSpec


@dataclass(frozen=True)
class ShapeGrid:
    """The S distinct default-box shapes of an :class:`AnchorSpec` and the grid each is laid on.

    ``wh``: (S, 2) width and height in image units (clipped as the spec clips); ``level``: (S,) feature level;
    ``cells``: (S, 2) columns and rows of that level's map; ``density``: (S, 2) f_k on x and on y (centres at
    (j + 0.5) / f_k).
    """

    wh: Tensor
    level: Tensor
    cells: Tensor
    density: Tensor

    @staticmethod
    def of(spec: AnchorSpec) -> "ShapeGrid":
        """The shapes of ``spec`` on its grid."""
        wh, level, cells, density = [], [], [], []
        for k in range(len(spec.feature_sizes)):
            shapes = spec.location_sizes(k)
            (rows, cols), (f_y, f_x) = spec.grid_hw(k), spec.density_hw(k)
            wh += [list(s) for s in shapes]
            level += [k] * len(shapes)
            cells += [[cols, rows]] * len(shapes)
            density += [[f_x, f_y]] * len(shapes)
        wh = torch.tensor(wh, dtype=torch.float64)
        if spec.clip:
            wh = wh.clamp(0.0, 1.0)
        return ShapeGrid(wh, torch.tensor(level), torch.tensor(cells, dtype=torch.float64),
                         torch.tensor(density, dtype=torch.float64))

    def level_sizes(self, num_levels: int) -> list[list[list[float]]]:
        """Per level the [w, h] list of its shapes (``anchors.sizes``), in order."""
        return [[[float(w), float(h)] for (w, h), k in zip(self.wh.tolist(), self.level.tolist()) if k == level]
                for level in range(num_levels)]

    def with_wh(self, wh: Tensor) -> "ShapeGrid":
        return ShapeGrid(wh, self.level, self.cells, self.density)


def _nearest_centre(coord: Tensor, cells: Tensor, density: Tensor) -> Tensor:
    """(N,) coordinates -> (N, S) nearest grid centre of each shape's level."""
    index = torch.floor(coord[:, None] * density).clamp(min=0)
    return (torch.minimum(index, cells - 1) + 0.5) / density


def _paired_iou_cxcywh(cx: Tensor, cy: Tensor, w: Tensor, h: Tensor, gt_cxcywh: Tensor) -> Tensor:
    """IoU of each object (N,) with the box (cx, cy, w, h) in the same row; all (N, S) by broadcasting."""
    gcx, gcy, gw, gh = (gt_cxcywh[:, i:i + 1] for i in range(4))
    ix = (torch.minimum(cx + w / 2, gcx + gw / 2) - torch.maximum(cx - w / 2, gcx - gw / 2)).clamp(min=0)
    iy = (torch.minimum(cy + h / 2, gcy + gh / 2) - torch.maximum(cy - h / 2, gcy - gh / 2)).clamp(min=0)
    inter = ix * iy
    return inter / (w * h + gw * gh - inter)


def _nearest_centres(gt: Tensor, grid: ShapeGrid) -> tuple[Tensor, Tensor]:
    """(N, 4) objects -> (N, S) x and (N, S) y of the grid centre of each shape nearest to each object."""
    return (_nearest_centre(gt[:, 0], grid.cells[:, 0], grid.density[:, 0]),
            _nearest_centre(gt[:, 1], grid.cells[:, 1], grid.density[:, 1]))


def best_iou_per_shape(gt_cxcywh: Tensor, grid: ShapeGrid) -> Tensor:
    """(N, 4) objects -> (N, S): each object's best IoU with each shape over all of that shape's positions
    (its max over the default boxes of the shape, computed at the grid centre nearest to the object)."""
    gt = gt_cxcywh.to(torch.float64)
    cx, cy = _nearest_centres(gt, grid)
    return _paired_iou_cxcywh(cx, cy, grid.wh[:, 0], grid.wh[:, 1], gt)


def own_shape_iou(gt_cxcywh: Tensor, grid: ShapeGrid) -> Tensor:
    """(N, 4) objects -> (N,): the best IoU that a box of each object's own shape reaches on the grid (at the
    nearest centre of the best level). Below the matching threshold, no shape could match the object: its grid
    is too coarse for it, whatever the default boxes are."""
    gt = gt_cxcywh.to(torch.float64)
    cx, cy = _nearest_centres(gt, grid)
    return _paired_iou_cxcywh(cx, cy, gt[:, 2:3], gt[:, 3:4], gt).max(dim=1).values


def reaches(iou: Tensor, threshold: float, strict: bool) -> Tensor:
    """The matcher's test: IoU > threshold (the tutorial's rule) or >= (torchvision's)."""
    return iou > threshold if strict else iou >= threshold


@dataclass(frozen=True)
class FitScore:
    """How well a set of shapes matches the objects: ``recall`` = share whose best IoU reaches the matching
    threshold, ``mean_iou`` = mean best IoU; ``value`` = their sum. (The search maximises :func:`search_value`,
    which also counts the positives beyond an object's best box.)"""

    recall: float
    mean_iou: float

    @property
    def value(self) -> float:
        return self.recall + self.mean_iou

    @staticmethod
    def of(best_iou: Tensor, threshold: float, strict: bool) -> "FitScore":
        """The score of (N,) objects' best IoUs."""
        return FitScore(float(reaches(best_iou, threshold, strict).double().mean()), float(best_iou.mean()))


def score_shapes(gt_cxcywh: Tensor, grid: ShapeGrid, threshold: float, strict: bool) -> FitScore:
    return FitScore.of(best_iou_per_shape(gt_cxcywh, grid).max(dim=1).values, threshold, strict)


def kmeans_iou_wh(wh: Tensor, k: int, iterations: int = 30, seed: int = 0) -> Tensor:
    """k-means of (N, 2) box shapes with the distance 1 − IoU of centred boxes (YOLOv2 §2), seeded with
    k-means++; cluster centres are the median shapes of their members. Returns (k, 2), sorted by area."""
    g = torch.Generator().manual_seed(seed)
    wh = wh.to(torch.float64)
    centres = wh[torch.randint(len(wh), (1,), generator=g)]
    while len(centres) < k:   # k-means++: the next centre far (in 1 - IoU) from those chosen
        far = (1 - _centred_iou(wh, centres)).min(dim=1).values.square()
        pick = torch.multinomial(far + 1e-12, 1, generator=g) if far.sum() > 0 else \
            torch.randint(len(wh), (1,), generator=g)
        centres = torch.cat((centres, wh[pick]))
    for _ in range(iterations):
        assign = _centred_iou(wh, centres).argmax(dim=1)
        moved = torch.stack([wh[assign == j].median(dim=0).values if (assign == j).any() else centres[j]
                             for j in range(k)])
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres[torch.argsort(centres.prod(dim=1))]


def _centred_iou(wh: Tensor, centres: Tensor) -> Tensor:
    """(N, 2) and (K, 2) shapes -> (N, K) IoU of the boxes placed on one centre."""
    inter = torch.minimum(wh[:, None, 0], centres[None, :, 0]) * torch.minimum(wh[:, None, 1], centres[None, :, 1])
    return inter / (wh[:, None].prod(-1) + centres[None].prod(-1) - inter)


def level_of_objects(gt_wh: Tensor, grid: ShapeGrid, num_levels: int) -> Tensor:
    """(N,) the level each object belongs to: the one whose shapes' mean log size is nearest its log size
    (SSD's levels each cover a band of scales, and a shape must sit on a grid dense enough for it)."""
    log_size = 0.5 * grid.wh.log().sum(dim=1)
    level_size = torch.stack([log_size[grid.level == k].mean() for k in range(num_levels)])
    return (0.5 * gt_wh.log().sum(dim=1)[:, None] - level_size[None]).abs().argmin(dim=1)


def kmeans_shapes(gt_cxcywh: Tensor, grid: ShapeGrid, seed: int = 0) -> ShapeGrid:
    """Per level, as many k-means shapes of its objects as it has boxes per location (a level with fewer
    objects than that keeps its shapes). The order inside a level follows the old shapes' areas."""
    num_levels = int(grid.level.max()) + 1
    gt_wh = gt_cxcywh[:, 2:].to(torch.float64)
    owner = level_of_objects(gt_wh, grid, num_levels)
    wh = grid.wh.clone()
    for k in range(num_levels):
        slots = torch.nonzero(grid.level == k).flatten()
        members = gt_wh[owner == k]
        if len(members) >= 4 * len(slots):
            by_area = slots[torch.argsort(grid.wh[slots].prod(dim=1))]
            wh[by_area] = kmeans_iou_wh(members, len(slots), seed=seed + k)
    return grid.with_wh(wh)


# The search counts an object's positives up to this many: beyond one (its forced match, which every object gets),
# each default box that reaches the threshold is another positive that trains it.
POSITIVES_CAP = 4
# Grid positions either side of the nearest centre where a box of a shape may still reach the threshold.
_REACH = 2


def _shape_column(gt: Tensor, grid: ShapeGrid, s: int, wh: Tensor, threshold: float,
                  strict: bool) -> tuple[Tensor, Tensor]:
    """(N,) best IoU of each object with shape ``s`` resized to ``wh`` (w, h), and (N,) how many of that shape's
    default boxes reach the threshold with it (those within ``_REACH`` positions of the nearest centre)."""
    offsets = torch.arange(-_REACH, _REACH + 1, dtype=gt.dtype)
    overlaps, valid = [], []
    for axis, size in ((0, wh[0]), (1, wh[1])):
        index = torch.floor(gt[:, axis:axis + 1] * grid.density[s, axis]) + offsets      # (N, 2R + 1)
        valid.append((index >= 0) & (index < grid.cells[s, axis]))
        centre = (index + 0.5) / grid.density[s, axis]
        lo, hi = gt[:, axis:axis + 1] - gt[:, axis + 2:axis + 3] / 2, gt[:, axis:axis + 1] + gt[:, axis + 2:axis + 3] / 2
        overlaps.append((torch.minimum(centre + size / 2, hi) - torch.maximum(centre - size / 2, lo)).clamp(min=0))
    inter = overlaps[0][:, :, None] * overlaps[1][:, None, :]                              # (N, 2R + 1, 2R + 1)
    iou = inter / (wh[0] * wh[1] + (gt[:, 2] * gt[:, 3])[:, None, None] - inter)
    iou = iou.masked_fill(~(valid[0][:, :, None] & valid[1][:, None, :]), 0.0)
    return iou.flatten(1).max(dim=1).values, reaches(iou, threshold, strict).flatten(1).sum(dim=1)


# Objects are grouped by size (octaves of sqrt(w h)) and shape (tall, compact or wide, 2:1 apart). Shapes fitted to
# a dataset's many long thin objects can take away the boxes of its few small compact ones: the search value rises
# while those train from far-off forced matches (measured: -0.1 AP50 from fitting on such a set). So no group of at
# least _GROUP_MIN_SHARE of the objects may end with a mean best IoU more than _GROUP_TOLERANCE below its own with
# the given boxes.
_GROUP_MIN_SHARE = 0.01
_GROUP_TOLERANCE = 0.02
_OCTAVES = 12


def shape_groups(gt_cxcywh: Tensor) -> Tensor:
    """(N,) group of each of (N, 4) objects: size octave (of sqrt(w h) in image units) x tall / compact / wide."""
    w, h = gt_cxcywh[:, 2].clamp(min=1e-9), gt_cxcywh[:, 3].clamp(min=1e-9)
    octave = torch.floor(torch.log2((w * h).sqrt())).clamp(-_OCTAVES + 1, 0).long() + _OCTAVES - 1
    ratio = w / h
    shape = torch.where(ratio <= 0.5, 0, torch.where(ratio >= 2.0, 2, 1))
    return octave * 3 + shape


@dataclass(frozen=True)
class GroupFloor:
    """The least mean best IoU each group of objects (:func:`shape_groups`) may end with; -inf for groups under
    ``_GROUP_MIN_SHARE`` of the objects."""

    groups: Tensor
    floor: Tensor

    @staticmethod
    def of(gt_cxcywh: Tensor, *best: Tensor) -> "GroupFloor":
        """The floor under (N,) best IoUs with each of one or more grids (the lowest of their group means)."""
        groups = shape_groups(gt_cxcywh)
        count = torch.bincount(groups, minlength=3 * _OCTAVES).double()
        means = torch.stack([_group_means(groups, b) for b in best]).min(dim=0).values
        floor = (means - _GROUP_TOLERANCE).masked_fill(count < max(_GROUP_MIN_SHARE * len(groups), 1), -torch.inf)
        return GroupFloor(groups, floor)

    def holds(self, best: Tensor) -> bool:
        """Whether (N,) best IoUs keep every group at or above its floor."""
        return bool((_group_means(self.groups, best) >= self.floor - 1e-6).all())


def _group_means(groups: Tensor, best: Tensor) -> Tensor:
    total = torch.bincount(groups, weights=best.double(), minlength=3 * _OCTAVES)
    return total / torch.bincount(groups, minlength=3 * _OCTAVES).clamp(min=1)


def _search_value(best: Tensor, positives: Tensor) -> float:
    """What the search maximises: positives per object up to :data:`POSITIVES_CAP` (as a fraction of it; at cap 1
    this is the recall at the threshold), plus the mean best IoU."""
    return float(positives.clamp(max=POSITIVES_CAP).double().mean() / POSITIVES_CAP + best.mean())


def _columns(gt: Tensor, grid: ShapeGrid, threshold: float, strict: bool) -> tuple[Tensor, Tensor]:
    """(N, S) best IoU and (N, S) positives of every object with every shape."""
    cols = [_shape_column(gt, grid, s, grid.wh[s], threshold, strict) for s in range(len(grid.wh))]
    return torch.stack([c[0] for c in cols], 1), torch.stack([c[1] for c in cols], 1)


def _best(gt_cxcywh: Tensor, grid: ShapeGrid, threshold: float, strict: bool) -> Tensor:
    return _columns(gt_cxcywh.to(torch.float64), grid, threshold, strict)[0].max(dim=1).values


def search_value(gt_cxcywh: Tensor, grid: ShapeGrid, threshold: float, strict: bool) -> float:
    """What :func:`local_search` maximises for (N, 4) objects and ``grid``'s shapes (see :func:`_search_value`)."""
    ious, counts = _columns(gt_cxcywh.to(torch.float64), grid, threshold, strict)
    return _search_value(ious.max(dim=1).values, counts.sum(dim=1))


def local_search(gt_cxcywh: Tensor, grid: ShapeGrid, threshold: float, strict: bool,
                 steps: tuple[float, ...] = (0.5, 0.2, 0.08), max_passes: int = 4, min_side: float = 1e-3,
                 max_side: float = 1.0, floor: GroupFloor | None = None) -> ShapeGrid:
    """Coordinate ascent of :func:`search_value`: each shape in turn tries scaling its width, its height, both, or
    its aspect by 1 + step (and the inverse), and keeps the best move that raises the value (and keeps every group
    of objects above ``floor``, when given); passes repeat at one step until none improves (at most
    ``max_passes``), then the step shrinks. Searched in float32 (twice as fast; the shapes move by steps of several
    per cent)."""
    gt = gt_cxcywh.to(torch.float32)
    search = ShapeGrid(grid.wh.float(), grid.level, grid.cells.float(), grid.density.float())
    wh = search.wh.clone()
    ious, counts = _columns(gt, search, threshold, strict)
    total = counts.sum(dim=1)
    current = _search_value(ious.max(dim=1).values, total)
    for step in steps:
        up = 1 + step
        moves = torch.tensor([(up, 1), (1 / up, 1), (1, up), (1, 1 / up), (up, up), (1 / up, 1 / up), (up, 1 / up),
                              (1 / up, up)], dtype=wh.dtype)
        for _ in range(max_passes):
            before = current
            for s in range(len(wh)):
                others = torch.cat((ious[:, :s], ious[:, s + 1:]), dim=1).max(dim=1).values if len(wh) > 1 \
                    else torch.zeros(len(gt), dtype=gt.dtype)
                rest = total - counts[:, s]
                for cand in (wh[s] * moves).clamp(min_side, max_side):
                    column, count = _shape_column(gt, search, s, cand, threshold, strict)
                    best = torch.maximum(others, column)
                    value = _search_value(best, rest + count)
                    if value > current + 1e-9 and (floor is None or floor.holds(best)):
                        current = value
                        wh[s], ious[:, s], counts[:, s] = cand, column, count
                        total = rest + count
            if current <= before + 1e-9:
                break
    return grid.with_wh(wh.double())


def fit_shapes(gt_cxcywh: Tensor, grid: ShapeGrid, threshold: float, strict: bool, seed: int = 0,
               reference: ShapeGrid | None = None) -> ShapeGrid:
    """The fitted shapes: IoU k-means per level, then :func:`local_search` from whichever of the k-means shapes
    and the given ones has the higher :func:`search_value` (so the result never scores below the given shapes).
    No group of objects (:func:`shape_groups`) may end matched worse than with both ``grid`` and ``reference``
    (:class:`GroupFloor`); k-means shapes that would leave one so are not a start.

    Args:
        gt_cxcywh: (N, 4) objects in network units. grid: the current shapes (their count per level is kept).
        threshold, strict: the matcher's IoU threshold and test (see :func:`reaches`).
        reference: the model's own boxes when ``grid`` is another layout (``anchors.fit_boxes``); None: ``grid``.
    """
    given = [_best(gt_cxcywh, g, threshold, strict) for g in (grid, reference) if g is not None]
    floor = GroupFloor.of(gt_cxcywh, *given)
    clustered = kmeans_shapes(gt_cxcywh, grid, seed)
    starts = [grid] + ([clustered] if floor.holds(_best(gt_cxcywh, clustered, threshold, strict)) else [])
    start = max(starts, key=lambda g: search_value(gt_cxcywh, g, threshold, strict))
    return local_search(gt_cxcywh, start, threshold, strict, floor=floor)


def sample_rows(num: int, limit: int, seed: int = 0) -> Tensor:
    """Indices of at most ``limit`` of ``num`` rows, drawn without replacement (all of them, in order, if fewer)."""
    if num <= limit:
        return torch.arange(num)
    return torch.randperm(num, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


__all__ = ["FitScore", "GroupFloor", "ShapeGrid", "best_iou_per_shape", "fit_shapes", "kmeans_iou_wh", "kmeans_shapes",
           "level_of_objects", "local_search", "own_shape_iou", "reaches", "sample_rows", "score_shapes",
           "search_value", "shape_groups"]
