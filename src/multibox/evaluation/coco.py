"""COCO bbox evaluation with the official metrics.

Nothing here re-implements COCO's matching, accumulation or averaging: the numbers come
from ``faster_coco_eval`` (default backend, a C++ port that gives the same AP as the
reference in a fraction of the time) or from ``pycocotools`` (``backend="pycocotools"``,
the reference itself). This module only

* normalises and validates the inputs (so that a typo in an image or category id is an
  error rather than a silently lower AP),
* runs ``evaluate() / accumulate() / summarize()`` of the chosen backend,
* reads the 12 standard numbers, a per-category AP and the precision / recall arrays out
  of the evaluator, and formats / writes them (``eval.json``, SPEC §4).

Box format: COCO results use ``bbox = [x, y, w, h]`` in pixels, called "ltwh" here.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from multibox.io import atomic_write_text

__all__ = [
    "STAT_KEYS",
    "CocoEvalResult",
    "evaluate_coco",
    "format_summary",
    "format_per_class_table",
    "write_eval_json",
]

#: The 12 numbers of ``COCOeval.summarize()`` for bbox, in pycocotools' ``stats`` order.
STAT_KEYS: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)

# (ap?, iouThr, areaRng, maxDets) of each summary line, exactly as pycocotools'
# ``_summarizeDets`` calls ``_summarize`` -- used to rebuild its printed layout.
_SUMMARY_LINES: tuple[tuple[bool, float | None, str, int], ...] = (
    (True, None, "all", 100),
    (True, 0.5, "all", 100),
    (True, 0.75, "all", 100),
    (True, None, "small", 100),
    (True, None, "medium", 100),
    (True, None, "large", 100),
    (False, None, "all", 1),
    (False, None, "all", 10),
    (False, None, "all", 100),
    (False, None, "small", 100),
    (False, None, "medium", 100),
    (False, None, "large", 100),
)

_BACKENDS = ("faster", "pycocotools")


@dataclass
class CocoEvalResult:
    """Outcome of one COCO bbox evaluation.

    Attributes:
        stats: ``{key: value}`` for the 12 keys of :data:`STAT_KEYS`, fractions in [0, 1].
            As in pycocotools, a value is ``-1.0`` when the metric is undefined: no
            ground truth at all in that area range (e.g. ``APs`` on a set without small
            objects). It is kept as -1 rather than replaced, so it is never mistaken for 0.
        per_class: ``{category name: AP@[.5:.95]}`` (area "all", maxDets 100), in the order
            of increasing category id; ``-1.0`` for a category with no ground truth in the
            evaluated images. When every category has ground truth, the mean of these
            values equals ``stats["AP"]``.
        summary: the 12 lines of pycocotools' ``summarize()`` printout, same layout.
        precision: accumulated precision, shape (T, R, K, A, M) = (10 IoU thresholds,
            101 recall thresholds, K categories, 4 area ranges, 3 maxDets); -1 where undefined.
        recall: accumulated recall, shape (T, K, A, M); -1 where undefined.
        category_ids: the K category ids, in the order of the K axis.
        category_names: their names, same order.
        iou_thresholds: (T,) IoU thresholds (0.50 .. 0.95).
        recall_thresholds: (R,) recall thresholds (0.00 .. 1.00).
        num_images: number of images evaluated.
        num_detections: number of detections evaluated (after restricting to the images).
        backend: "faster" or "pycocotools".
    """

    stats: dict[str, float]
    per_class: dict[str, float]
    summary: str
    precision: np.ndarray
    recall: np.ndarray
    category_ids: list[int] = field(default_factory=list)
    category_names: list[str] = field(default_factory=list)
    iou_thresholds: np.ndarray = field(default_factory=lambda: np.empty(0))
    recall_thresholds: np.ndarray = field(default_factory=lambda: np.empty(0))
    num_images: int = 0
    num_detections: int = 0
    backend: str = "faster"
    voc: dict[str, float] = field(default_factory=dict)   # VOC07_mAP and VOC_mAP, for VOC data

    def to_json_dict(self) -> dict[str, Any]:
        """``{"AP": .., ..., "ARl": .., "per_class": {name: AP}}`` (the ``eval.json`` body), plus the VOC metrics
        when they were computed."""
        out: dict[str, Any] = {k: float(self.stats[k]) for k in STAT_KEYS}
        out.update({k: float(v) for k, v in self.voc.items()})
        out["per_class"] = {name: float(v) for name, v in self.per_class.items()}
        return out


# --------------------------------------------------------------------------- inputs


def _load_gt(gt: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Return a private, evaluator-ready copy of a COCO instances dataset.

    The copy matters: both backends write into the annotation dicts they are given
    (``ignore`` flags, ids, areas), and the caller's dataset must not change. Its annotation ids are
    1..n in order (the caller's must be distinct; 0 would never be matched, see the end).
    """
    if isinstance(gt, (str, os.PathLike)):
        with open(gt, encoding="utf-8") as f:
            data = json.load(f)
    elif isinstance(gt, Mapping):
        data = gt
    else:
        raise TypeError(f"gt must be a path or a COCO dict, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"ground truth is not a COCO instances dataset: missing {key!r}")

    images = [dict(img) for img in data["images"]]
    categories = [dict(cat) for cat in data["categories"]]
    anns = [dict(a) for a in data["annotations"]]

    if len({img["id"] for img in images}) != len(images):
        raise ValueError("ground truth has duplicate image ids")
    if len({c["id"] for c in categories}) != len(categories):
        raise ValueError("ground truth has duplicate category ids")
    # Annotation ids key the evaluators' index: a duplicate id silently drops a box (refused: the data is wrong).
    n_with_id = sum("id" in a for a in anns)
    if n_with_id == 0:
        for i, a in enumerate(anns, start=1):
            a["id"] = i
    elif n_with_id != len(anns):
        raise ValueError("ground truth annotations: some have an 'id', some do not")
    elif len({a["id"] for a in anns}) != len(anns):
        raise ValueError("ground truth has duplicate annotation ids")

    img_ids = {img["id"] for img in images}
    cat_ids = {c["id"] for c in categories}
    for a in anns:
        if a["image_id"] not in img_ids:
            raise ValueError(f"ground truth annotation {a['id']} names unknown image id {a['image_id']!r}")
        if a["category_id"] not in cat_ids:
            raise ValueError(
                f"ground truth annotation {a['id']} names unknown category id {a['category_id']!r}"
            )
        # COCO's area is the *segment* area; datasets with boxes only (VOC, synthetic)
        # may omit it, and the box area is then the only sensible stand-in.
        if "area" not in a:
            _, _, w, h = a["bbox"]
            a["area"] = float(w) * float(h)
        a.setdefault("iscrowd", 0)

    # Both evaluators mark an unmatched box with the id 0 (pycocotools' gtm / dtm arrays, faster-coco-eval alike), so
    # a ground-truth box with id 0 could never count as matched: the private copy numbers them 1..n (the caller's
    # ids, already checked distinct, are not used past this point).
    for i, a in enumerate(anns, start=1):
        a["id"] = i
    out = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    out.update(images=images, annotations=anns, categories=categories)
    return out


def _prepare_detections(
    detections: Iterable[Mapping[str, Any]],
    known_img_ids: set,
    eval_img_ids: set,
    known_cat_ids: set,
) -> list[dict[str, Any]]:
    """Validate COCO result dicts and return fresh copies restricted to ``eval_img_ids``.

    Fresh copies because ``loadRes`` adds keys (id, area, segmentation, iscrowd) to the
    dicts it receives. Only the four fields of a bbox result are kept.
    """
    out: list[dict[str, Any]] = []
    append = out.append
    unknown_imgs: set = set()
    unknown_cats: set = set()
    np_integer = np.integer
    # One pass, kept lean: this loop is the only per-detection Python work on top of the
    # backend, and evaluation sets reach 10^5..10^6 detections.
    for i, d in enumerate(detections):
        try:
            img_id, cat_id, bbox, score = d["image_id"], d["category_id"], d["bbox"], d["score"]
            x, y, w, h = bbox
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"detection #{i} is not a COCO bbox result (needs image_id, category_id, "
                f"bbox=[x, y, w, h], score): {d!r}"
            ) from exc
        # numpy integers hash like ints but the C++ backend wants plain Python ints.
        if isinstance(img_id, np_integer):
            img_id = int(img_id)
        if isinstance(cat_id, np_integer):
            cat_id = int(cat_id)
        if img_id not in known_img_ids:
            unknown_imgs.add(img_id)
            continue
        if cat_id not in known_cat_ids:
            unknown_cats.add(cat_id)
            continue
        if img_id not in eval_img_ids:
            continue  # a valid image outside the evaluated subset: not part of this evaluation
        append(
            {
                "image_id": img_id,
                "category_id": cat_id,
                "bbox": [float(x), float(y), float(w), float(h)],
                "score": float(score),
            }
        )
    if unknown_imgs or unknown_cats:
        parts = []
        if unknown_imgs:
            parts.append(f"unknown image ids {_preview(unknown_imgs)}")
        if unknown_cats:
            parts.append(f"unknown category ids {_preview(unknown_cats)}")
        raise ValueError("detections name " + " and ".join(parts) + " (not in the ground truth)")
    return out


def _preview(values: set, n: int = 10) -> str:
    vals = sorted(values, key=repr)
    more = f" ... (+{len(vals) - n} more)" if len(vals) > n else ""
    return "[" + ", ".join(repr(v) for v in vals[:n]) + "]" + more


# --------------------------------------------------------------------------- backends


def _run_backend(
    backend: str,
    gt_data: dict[str, Any],
    dets: list[dict[str, Any]],
    img_ids: list,
    verbose: bool,
):
    """Run evaluate/accumulate/summarize; return the evaluator object."""
    if backend == "faster":
        from faster_coco_eval import COCO, COCOeval_faster as COCOeval

        # faster_coco_eval reports through a print function (default: logging), not stdout.
        printer = print if verbose else (lambda *a, **k: None)
        coco_gt = COCO(print_function=printer)
        coco_kwargs: dict[str, Any] = {"print_function": printer}
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        coco_gt = COCO()
        coco_kwargs = {}

    coco_gt.dataset = gt_data
    coco_gt.createIndex()
    if dets:
        coco_dt = coco_gt.loadRes(dets)
    else:
        # pycocotools' loadRes indexes anns[0] and crashes on an empty list; an empty
        # result set is still a valid input to COCOeval, which then scores 0 for every
        # category with ground truth. Build that result set directly.
        coco_dt = COCO(**({"print_function": coco_kwargs["print_function"]} if coco_kwargs else {}))
        coco_dt.dataset = {
            "images": list(gt_data["images"]),
            "categories": [dict(c) for c in gt_data["categories"]],
            "annotations": [],
        }
        coco_dt.createIndex()

    ev = COCOeval(coco_gt, coco_dt, iouType="bbox", **coco_kwargs)
    ev.params.imgIds = list(img_ids)
    ev.evaluate()
    ev.accumulate()
    # summarize() prints its own lines (faster_coco_eval: 14 of them); the result carries
    # the pycocotools-layout summary instead, printed once by the caller when verbose.
    if backend == "faster":
        ev.print_function = lambda *a, **k: None
        ev.summarize()
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            ev.summarize()
    return ev


# --------------------------------------------------------------------------- public API


def evaluate_coco(
    gt: str | os.PathLike | Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    backend: str = "faster",
    image_ids: Iterable[int] | None = None,
    verbose: bool = True,
) -> CocoEvalResult:
    """COCO bbox evaluation of ``detections`` against ``gt``.

    Args:
        gt: path to a COCO instances JSON, or the loaded dict. Not modified.
            Annotations without ``area`` get the box area w*h, without ``iscrowd`` 0.
        detections: COCO result dicts ``{"image_id", "category_id", "bbox": [x, y, w, h]
            (ltwh pixels), "score"}``. Not modified. May be empty.
        backend: ``"faster"`` (faster_coco_eval, default) or ``"pycocotools"`` (reference).
        image_ids: evaluate only these gt images (e.g. a held-out split); default all.
            Detections on other (known) images are ignored.
        verbose: print the evaluator's progress and the 12-line summary. When False,
            nothing is printed (stdout is redirected only around the evaluator calls).

    Returns:
        :class:`CocoEvalResult`.

    Raises:
        ValueError: a detection names an image or category id absent from ``gt``,
            ``image_ids`` names an unknown image, malformed inputs, unknown backend.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {_BACKENDS}")
    gt_data = _load_gt(gt)
    known_img_ids = {img["id"] for img in gt_data["images"]}
    cats = sorted(gt_data["categories"], key=lambda c: c["id"])
    eval_img_ids = _eval_image_ids(image_ids, known_img_ids)
    dets = _prepare_detections(detections, known_img_ids, set(eval_img_ids), {c["id"] for c in cats})

    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        ev = _run_backend(backend, gt_data, dets, eval_img_ids, verbose)
    result = _result_of(ev, cats, backend, num_images=len(eval_img_ids), num_detections=len(dets))
    if verbose:
        print(result.summary)
    return result


def _eval_image_ids(image_ids: Iterable[int] | None, known_img_ids: set) -> list:
    """The evaluated image ids, sorted: all of the ground truth's, or ``image_ids`` (which must be known)."""
    if image_ids is None:
        return sorted(known_img_ids)
    eval_img_ids = sorted(set(image_ids))
    missing = set(eval_img_ids) - known_img_ids
    if missing:
        raise ValueError(f"image_ids name images absent from the ground truth: {_preview(missing)}")
    return eval_img_ids


def _per_class_ap(ev, precision: np.ndarray, names: list[str]) -> dict[str, float]:
    """Per-category AP@[.5:.95]: pycocotools' stats[0] is the mean of the valid (> -1) entries of
    precision[:, :, :, area=all, maxDets=100]; here the same mean is taken for each category slice k separately."""
    area_all = list(ev.params.areaRngLbl).index("all")
    max_det_100 = list(ev.params.maxDets).index(100)
    per_class: dict[str, float] = {}
    for k, name in enumerate(names):
        s = precision[:, :, k, area_all, max_det_100]
        valid = s[s > -1]
        per_class[name] = float(valid.mean()) if valid.size else -1.0
    return per_class


def _result_of(ev, cats: list[dict], backend: str, num_images: int, num_detections: int) -> CocoEvalResult:
    """A finished evaluator (evaluate + accumulate + summarize done) -> :class:`CocoEvalResult`."""
    raw = np.asarray(ev.stats, dtype=np.float64)[: len(STAT_KEYS)]
    stats = {k: float(v) for k, v in zip(STAT_KEYS, raw)}
    precision = np.asarray(ev.eval["precision"], dtype=np.float64)
    cat_ids = [int(c) for c in ev.params.catIds]
    name_of = {c["id"]: str(c.get("name", c["id"])) for c in cats}
    names = _unique_names([name_of[c] for c in cat_ids], cat_ids)
    return CocoEvalResult(
        stats=stats,
        per_class=_per_class_ap(ev, precision, names),
        summary=format_summary(stats),
        precision=precision,
        recall=np.asarray(ev.eval["recall"], dtype=np.float64),
        category_ids=cat_ids,
        category_names=names,
        iou_thresholds=np.asarray(ev.params.iouThrs, dtype=np.float64).copy(),
        recall_thresholds=np.asarray(ev.params.recThrs, dtype=np.float64).copy(),
        num_images=num_images,
        num_detections=num_detections,
        backend=backend,
    )


def _unique_names(names: list[str], ids: list[int]) -> list[str]:
    """Category names as dict keys; a duplicated name gets its id appended so no AP is lost."""
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [n if counts[n] == 1 else f"{n} (id {i})" for n, i in zip(names, ids)]


def format_summary(stats: Mapping[str, float]) -> str:
    """The 12 lines of pycocotools' bbox ``summarize()`` printout, built from ``stats``.

    Same format string as pycocotools (``' {:<18} {} @[ IoU={:<9} | area={:>6s} |
    maxDets={:>3d} ] = {:0.3f}'``), same line order, no trailing newline.
    """
    line = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"
    out = []
    for key, (is_ap, iou, area, max_dets) in zip(STAT_KEYS, _SUMMARY_LINES):
        title = "Average Precision" if is_ap else "Average Recall"
        kind = "(AP)" if is_ap else "(AR)"
        iou_str = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        out.append(line.format(title, kind, iou_str, area, max_dets, stats[key]))
    return "\n".join(out)


def format_per_class_table(per_class: Mapping[str, float]) -> str:
    """A plain-text table ``category | AP@[.5:.95]``, one row per category, in the given order.

    Undefined entries (-1: no ground truth for that category) show as ``n/a``.
    """
    names = [str(n) for n in per_class]
    width = max([len("category")] + [len(n) for n in names])
    header = f"{'category':<{width}} | AP@[.5:.95]"
    rows = [header, "-" * len(header)]
    for name, ap in zip(names, per_class.values()):
        value = "n/a" if ap is None or (isinstance(ap, float) and math.isnan(ap)) or ap < 0 else f"{ap:0.3f}"
        rows.append(f"{name:<{width}} | {value:>11}")
    return "\n".join(rows)


def write_eval_json(
    path: str | os.PathLike, result: CocoEvalResult, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``eval.json``: the 12 stats, ``per_class``, and ``extra`` keys (e.g. ``VOC07_mAP``).

    ``extra`` may not overwrite a metric key (ValueError): a silently replaced AP would
    defeat the file's purpose. Parent folders are created. Returns the path written.
    """
    body = result.to_json_dict()
    if extra:
        clash = set(body) & set(extra)
        if clash:
            raise ValueError(f"extra keys clash with evaluation keys: {sorted(clash)}")
        body.update(extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic, so a reader never sees a half-written eval.json.
    return atomic_write_text(path, json.dumps(body, indent=2) + "\n")
