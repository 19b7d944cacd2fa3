"""The training-time data policy in one place: the rule for each box, and the report of what a source's loading
dropped or will change.

:func:`classify_boxes` is the one rule for boxes: training (:func:`multibox.data.coco.training_target`), the load
report of every reader (:func:`policy_report`) and ``multibox check-data`` (:mod:`multibox.data.validate`) all ask
it, so that what check-data reports is what training does.

:class:`LoadReport` counts what a reader dropped or will change, per kind, with the first few ids of each kind;
:meth:`LoadReport.describe` words it for the one ``data policy (SOURCE): ...`` line per source file, e.g.
``3 boxes clipped (annotation ids 4, 9, 17), 1 degenerate box dropped (annotation id 5)``.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np

__all__ = ["BOX_KEPT", "BOX_CLIPPED", "BOX_OUTSIDE", "BOX_ZERO_SIZE", "BOX_NEGATIVE", "BOX_NONFINITE",
           "CONVERT_DROPS", "LoadReport", "MAX_EXAMPLES", "classify_boxes", "describe_count", "has_training_box",
           "policy_report", "trained_boxes"]

# What training does with a box, judged against an image size (0 = unknown: only the shape rules apply).
# BOX_KEPT and BOX_CLIPPED are trained on (clipped to the image); the others are dropped.
BOX_KEPT, BOX_CLIPPED, BOX_OUTSIDE, BOX_ZERO_SIZE, BOX_NEGATIVE, BOX_NONFINITE = range(6)

MAX_EXAMPLES = 3   # ids named per kind in a report line

_ANN, _IMAGE, _CATEGORY, _OBJECT = ("annotation id", "annotation ids"), ("image id", "image ids"), \
    ("category id", "category ids"), ("object", "objects")

# kind -> (one, many, the ids its examples are), in the order a report line lists them.
_KINDS: dict[str, tuple[str, str, tuple[str, str]]] = {
    # dropped when the source is loaded (and so missing from shards made of it)
    "duplicate_category_ids": ("duplicate category dropped", "duplicate categories dropped", _CATEGORY),
    "duplicate_image_ids": ("duplicate image dropped", "duplicate images dropped", _IMAGE),
    "annotations_unknown_image": ("annotation with an unknown image_id dropped",
                                  "annotations with an unknown image_id dropped", _ANN),
    "annotations_unknown_category": ("annotation with an unknown category_id dropped",
                                     "annotations with an unknown category_id dropped", _ANN),
    "annotations_bad_bbox": ("annotation with a non-finite bbox dropped",
                             "annotations with a non-finite bbox dropped", _ANN),
    "annotations_unknown_label": ("annotation with an unknown label dropped",
                                  "annotations with an unknown label dropped", _IMAGE),
    "bad_split_ids_dropped": ("split entry that is not a file name dropped",
                              "split entries that are not file names dropped", ("entry", "entries")),
    "unreadable_xml_images_dropped": ("image with an unreadable XML dropped", "images with an unreadable XML dropped",
                                      ("image", "images")),
    "objects_skipped": ("object without a usable box dropped", "objects without a usable box dropped", _OBJECT),
    "objects_unknown_class": ("object of an unknown class dropped", "objects of an unknown class dropped", _OBJECT),
    "empty_images_dropped": ("image without boxes dropped (data.keep_empty: false)",
                             "images without boxes dropped (data.keep_empty: false)", _IMAGE),
    "skipped_at_conversion": ("unreadable image left out at conversion", "unreadable images left out at conversion",
                              _IMAGE),
    # changed, or left out of the training targets
    "annotation_ids_renumbered": ("annotation id renumbered", "annotation ids renumbered", _ANN),
    "images_not_in_instances_json": ("image not in the instances JSON", "images not in the instances JSON", _IMAGE),
    "boxes_clipped": ("box clipped", "boxes clipped", _ANN),
    "degenerate_boxes_dropped": ("degenerate box dropped", "degenerate boxes dropped", _ANN),
    "outside_boxes_dropped": ("box outside its image dropped", "boxes outside their image dropped", _ANN),
    "nonfinite_boxes_dropped": ("non-finite box dropped", "non-finite boxes dropped", _ANN),
    "crowd_boxes_ignored": ("crowd box ignored", "crowd boxes ignored", _ANN),
    "images_without_boxes": ("image without boxes", "images without boxes", _IMAGE),
}

# Kinds whose items a source loses when loaded: `multibox convert` warns about them and reports them (exit status 3).
CONVERT_DROPS = ("duplicate_category_ids", "duplicate_image_ids", "annotations_unknown_image",
                 "annotations_unknown_category", "annotations_bad_bbox", "annotations_unknown_label",
                 "bad_split_ids_dropped", "unreadable_xml_images_dropped", "objects_skipped", "objects_unknown_class",
                 "empty_images_dropped")


def classify_boxes(ltwh: Any, width: Any = 0, height: Any = 0) -> np.ndarray:
    """What the training policy does with each COCO ``[left, top, width, height]`` box: an int8 code per box.

    ``width`` / ``height``: the image size, a number or one per box (0 = unknown: no clipping rule). Codes, first
    match wins: :data:`BOX_NONFINITE` (a NaN / inf value), :data:`BOX_ZERO_SIZE` (right == left or bottom == top),
    :data:`BOX_NEGATIVE` (right < left or bottom < top), :data:`BOX_OUTSIDE` (nothing left inside the image),
    :data:`BOX_CLIPPED` (partly outside: clipped to the image), else :data:`BOX_KEPT`. Edges are computed as
    training computes them (right = left + width, float64).
    """
    ltwh = np.asarray(ltwh, np.float64).reshape(-1, 4)
    with np.errstate(invalid="ignore", over="ignore"):
        x1, y1 = ltwh[:, 0], ltwh[:, 1]
        x2, y2 = x1 + ltwh[:, 2], y1 + ltwh[:, 3]
        w = np.broadcast_to(np.asarray(width, np.float64), x1.shape)
        h = np.broadcast_to(np.asarray(height, np.float64), x1.shape)
        known = (w > 0) & (h > 0)
        clipped = known & ((x1 < 0) | (y1 < 0) | (x2 > w) | (y2 > h))
        outside = known & ((x2 <= 0) | (y2 <= 0) | (x1 >= w) | (y1 >= h))
        degenerate = ~((x2 > x1) & (y2 > y1))
        zero = (x2 == x1) | (y2 == y1)
    codes = np.full(len(ltwh), BOX_KEPT, np.int8)
    codes[clipped] = BOX_CLIPPED
    codes[outside] = BOX_OUTSIDE
    codes[degenerate & ~zero] = BOX_NEGATIVE
    codes[degenerate & zero] = BOX_ZERO_SIZE
    codes[~np.isfinite(ltwh).all(axis=1)] = BOX_NONFINITE
    return codes


def trained_boxes(record: Any, width: Any, height: Any, keep_crowd: bool = False) -> np.ndarray:
    """Mask of ``record``'s boxes that training uses at image size (width, height): kept or clipped, not crowd
    (unless ``keep_crowd``)."""
    usable = classify_boxes(record.bbox_ltwh, width, height) <= BOX_CLIPPED
    return usable if keep_crowd else usable & ~np.asarray(record.crowd, bool)


def has_training_box(record: Any, keep_crowd: bool = False) -> bool:
    """Whether an image keeps a box in training (judged at its annotated size): ``data.keep_empty: false`` drops
    the images that do not."""
    return bool(trained_boxes(record, record.width, record.height, keep_crowd).any())


class LoadReport(Counter):
    """``kind -> count`` of what loading a source dropped or will change, plus ``examples`` (``kind -> the first``
    :data:`MAX_EXAMPLES` ``ids``) and ``labels`` (``kind -> (one, many)``: what those ids are, when not the kind's
    default). A plain ``dict(report)`` is the counts."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.examples: dict[str, list] = {}
        self.labels: dict[str, tuple[str, str]] = {}
        for other in args:
            if isinstance(other, LoadReport):
                self._take_examples(other)

    def __reduce__(self):   # pickled to DataLoader workers: keep the examples
        return (type(self), (dict(self),), {"examples": self.examples, "labels": self.labels})

    def note(self, kind: str, ids: Iterable = (), count: int | None = None, label: tuple[str, str] | None = None
             ) -> None:
        """Count ``count`` items of ``kind`` (default: one per id), keeping the first ids as examples."""
        ids = list(ids)
        count = len(ids) if count is None else int(count)
        if count == 0:
            return
        self[kind] += count
        _add_examples(self.examples.setdefault(kind, []), ids)
        if label is not None:
            self.labels[kind] = label

    def merge(self, other: "LoadReport") -> None:
        self.update(other)
        self._take_examples(other)

    def _take_examples(self, other: "LoadReport") -> None:
        for kind, ids in other.examples.items():
            _add_examples(self.examples.setdefault(kind, []), ids)
        self.labels.update(other.labels)

    def describe(self, kinds: Iterable[str] | None = None) -> list[str]:
        """One phrase per non-zero kind (of ``kinds``; default all), e.g. ``3 boxes clipped (annotation ids 4, 9,
        17)``, in the order of :data:`_KINDS` (unknown kinds last, sorted)."""
        chosen = [k for k in (self if kinds is None else kinds) if self.get(k)]
        order = {k: i for i, k in enumerate(_KINDS)}
        chosen.sort(key=lambda k: (order.get(k, len(order)), k))
        return [describe_count(k, self[k], self.examples.get(k, []), self.labels.get(k)) for k in chosen]


def _add_examples(kept: list, ids: Iterable) -> None:
    """Append the ids not yet in ``kept`` while it holds fewer than :data:`MAX_EXAMPLES`."""
    for i in ids:
        if len(kept) >= MAX_EXAMPLES:
            return
        if i not in kept:
            kept.append(i)


def describe_count(kind: str, count: int, examples: Iterable = (), label: tuple[str, str] | None = None) -> str:
    """``3 boxes clipped (annotation ids 4, 9, 17)``: the count, what, and the examples (``, ...`` after
    :data:`MAX_EXAMPLES` of them when there are more)."""
    one, many, ids = _KINDS.get(kind, (kind.replace("_", " "), kind.replace("_", " "), ("id", "ids")))
    ids = label or ids
    text = f"{count} {one if count == 1 else many}"
    examples = [str(e) for e in examples]
    if examples:
        more = ", ..." if len(examples) >= MAX_EXAMPLES and count > len(examples) else ""
        text += f" ({ids[0] if len(examples) == 1 and not more else ids[1]} {', '.join(examples)}{more})"
    return text


def policy_report(records: Iterable[Any], keep_crowd: bool = False,
                  box_name: Callable[[Any, int], Any] | None = None, box_label: tuple[str, str] | None = None
                  ) -> LoadReport:
    """What the box policy will do to ``records``, judged against their annotated sizes (decoded sizes rule in
    training): boxes clipped / dropped, crowd boxes ignored, images without boxes, with example ids.

    ``box_name(record, k)`` names box ``k`` in the examples (default: its annotation id); ``box_label`` says what
    those names are (default: annotation ids).
    """
    report = LoadReport()
    kinds = {BOX_CLIPPED: "boxes_clipped", BOX_OUTSIDE: "outside_boxes_dropped",
             BOX_ZERO_SIZE: "degenerate_boxes_dropped", BOX_NEGATIVE: "degenerate_boxes_dropped",
             BOX_NONFINITE: "nonfinite_boxes_dropped"}
    name = box_name or (lambda r, k: int(r.ann_ids[k]))
    for r in records:
        if r.num_boxes == 0:
            report.note("images_without_boxes", [r.image_id])
            continue
        crowd = np.asarray(r.crowd, bool)
        if crowd.any() and not keep_crowd:
            report.note("crowd_boxes_ignored", [name(r, int(k)) for k in np.flatnonzero(crowd)], label=box_label)
        codes = classify_boxes(r.bbox_ltwh, r.width, r.height)
        if not keep_crowd:
            codes[crowd] = BOX_KEPT
        for k in np.flatnonzero(codes != BOX_KEPT):
            report.note(kinds[int(codes[k])], [name(r, int(k))], label=box_label)
    return report
