"""Evaluation pictures and an HTML page, written next to ``eval.json``.

:func:`write_eval_report` writes into ``out_dir``:

- ``pr_curves.png``: precision-recall curves per class and overall, at IoU 0.5 and averaged over IoU 0.50:0.95,
  straight from the evaluator's accumulated ``precision`` array (area "all", maxDets 100), so the area under
  each curve is the AP that ``eval.json`` reports;
- ``confusion_matrix.png``: ground-truth class (rows) vs predicted class (columns), with a background row
  (detections that match no object) and a background column (objects that no detection matches);
- ``samples.png``: a grid of evaluation images, ground truth next to the most confident predictions (at most
  ``SAMPLE_MAX_BOXES`` with score >= ``SAMPLE_SCORE_THRESHOLD``), coloured by class, labels on a filled
  background; boxes clipped to the image, those with nothing left (negative or zero size) not drawn;
- ``curves.png``: the training curves (loss, learning rate, AP) when a ``metrics.jsonl`` is given;
- ``index.html``: what was evaluated (checkpoint, data, thresholds, evaluator: ``provenance``), the numbers and
  the pictures on one page (relative links: the folder can be moved or served).

Confusion matrix matching: per image, the detections scoring >= ``score_threshold`` and the non-crowd ground
truth boxes are paired greedily by descending IoU, class-agnostically, one to one, pairs below
``iou_threshold`` never; a pair counts in (true class, predicted class).

Drawn with matplotlib's object API on Agg canvases (no pyplot state, no display), like :mod:`multibox.evaluation.plots`.
"""
from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch

from multibox.core.boxes import ltwh_to_xyxy
from multibox.data.policy import BOX_CLIPPED, classify_boxes
from multibox.evaluation.coco import STAT_KEYS, CocoEvalResult
from multibox.io import atomic_write_text

__all__ = ["confusion_matrix", "dataset_image_loader", "detections_for_report", "plot_confusion_matrix",
           "plot_pr_curves", "plot_samples", "samples_figure", "write_eval_report"]

# The sample grid: predictions drawn (score at least, most per image); the confusion matrix counts from a lower
# score. A training run keeps only the detections the report uses (see detections_for_report).
SAMPLE_SCORE_THRESHOLD = 0.3
SAMPLE_MAX_BOXES = 15
CONFUSION_SCORE_THRESHOLD = 0.25


# --------------------------------------------------------------------------- helpers


def _load_coco(coco_gt: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(coco_gt, Mapping):
        return dict(coco_gt)
    with open(coco_gt, encoding="utf-8") as f:
        return json.load(f)


def _save(fig, path: Path) -> Path:
    from multibox.evaluation.plots import save_figure_png   # matplotlib is imported only when drawing

    return save_figure_png(fig, path)


def _bboxes_ltwh_to_xyxy(bboxes_ltwh: Sequence[Sequence[float]]) -> np.ndarray:
    """COCO ``bbox`` fields (ltwh) -> float64 (n, 4) xyxy; (0, 4) for none."""
    return ltwh_to_xyxy(np.asarray(bboxes_ltwh, dtype=np.float64).reshape(-1, 4))


def _index_of(values: np.ndarray, target: float) -> int:
    hits = np.flatnonzero(np.isclose(values, target))
    if not hits.size:
        raise ValueError(f"{target} is not among the evaluated thresholds {values.tolist()}")
    return int(hits[0])


# --------------------------------------------------------------------------- PR curves


def _pr_slices(result: CocoEvalResult) -> tuple[np.ndarray, np.ndarray]:
    """(R, K) precision at IoU 0.5 and (R, K) precision averaged over the IoU thresholds; NaN where undefined.

    Area "all" (index 0) and the largest maxDets (100), pycocotools' default parameters."""
    precision = np.asarray(result.precision, dtype=np.float64)[:, :, :, 0, -1]       # (T, R, K)
    precision = np.where(precision < 0, np.nan, precision)
    at_50 = precision[_index_of(result.iou_thresholds, 0.5)]
    with np.errstate(invalid="ignore"), _quiet_nanmean():
        mean = np.nanmean(precision, axis=0)
    return at_50, mean


class _quiet_nanmean:
    """nanmean of an all-NaN slice warns; an undefined class is expected here."""

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def plot_pr_curves(result: CocoEvalResult, path: str | os.PathLike, names: Sequence[str] | None = None,
                   max_legend: int = 20) -> Path:
    """Two panels (IoU 0.5; mean over 0.50:0.95) with one line per class and a thick overall line."""
    from matplotlib.figure import Figure

    recall = np.asarray(result.recall_thresholds, dtype=np.float64)
    names = list(names or result.category_names)
    panels = _pr_slices(result)
    fig = Figure(figsize=(13, 5.5), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    cmap = _class_colours(len(names))
    for ax, prec, title in zip(axes, panels, ("IoU 0.50", "IoU 0.50:0.95 (mean)")):
        with _quiet_nanmean():
            ap = np.nanmean(prec, axis=0)                       # (K,) area under each curve
        for k, name in enumerate(names):
            if np.isnan(prec[:, k]).all():
                continue
            label = f"{name} ({ap[k]:.3f})" if len(names) <= max_legend else None
            ax.plot(recall, prec[:, k], color=cmap[k], linewidth=1.0, alpha=0.8, label=label)
        defined = ~np.isnan(prec).all(axis=0)
        if defined.any():
            with _quiet_nanmean():
                overall = np.nanmean(prec[:, defined], axis=1)
            ax.plot(recall, overall, color="black", linewidth=2.5,
                    label=f"all classes ({float(np.nanmean(ap[defined])):.3f})")
        else:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"precision-recall, {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="x-small", ncol=1 if len(names) <= 10 else 2)
    return _save(fig, Path(path))


def _class_colours(n: int) -> list:
    from matplotlib import colormaps
    cmap = colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


# --------------------------------------------------------------------------- confusion matrix


def _group_by_image(items: Iterable[Mapping[str, Any]]) -> dict[Any, list[Mapping[str, Any]]]:
    out: dict[Any, list] = {}
    for item in items:
        out.setdefault(item["image_id"], []).append(item)
    return out


def confusion_matrix(coco_gt: str | os.PathLike | Mapping[str, Any], detections: Sequence[Mapping[str, Any]],
                     image_ids: Iterable[Any] | None = None, score_threshold: float = 0.25,
                     iou_threshold: float = 0.5) -> tuple[np.ndarray, list[int]]:
    """Returns ``(matrix, category_ids)``: an int64 (K + 1, K + 1) matrix, rows = true class in the order of
    ``category_ids`` (sorted) then background, columns = predicted class then background.

    ``matrix[i, K]``: objects of class i that no detection matched; ``matrix[K, j]``: detections of class j that
    matched no object. Crowd ground truth is left out.
    """
    from torchvision.ops import box_iou

    gt = _load_coco(coco_gt)
    cat_ids = sorted(int(c["id"]) for c in gt["categories"])
    col = {c: i for i, c in enumerate(cat_ids)}
    k = len(cat_ids)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    ids = set(image_ids) if image_ids is not None else {img["id"] for img in gt["images"]}
    gts = _group_by_image(a for a in gt["annotations"] if a["image_id"] in ids and not a.get("iscrowd", 0))
    dets = _group_by_image(d for d in detections if d["image_id"] in ids and d["score"] >= score_threshold)
    for image_id in ids:
        g, d = gts.get(image_id, []), dets.get(image_id, [])
        g_cls = np.array([col[a["category_id"]] for a in g], dtype=np.int64)
        d_cls = np.array([col[x["category_id"]] for x in d], dtype=np.int64)
        matched_g = np.zeros(len(g), dtype=bool)
        matched_d = np.zeros(len(d), dtype=bool)
        if len(g) and len(d):
            iou = box_iou(torch.from_numpy(_bboxes_ltwh_to_xyxy([a["bbox"] for a in g])),
                          torch.from_numpy(_bboxes_ltwh_to_xyxy([x["bbox"] for x in d]))).numpy()
            gi, di = np.nonzero(iou >= iou_threshold)
            order = np.argsort(-iou[gi, di], kind="stable")
            for a, b in zip(gi[order], di[order]):     # greedy, one to one; only the candidate pairs are visited
                if not matched_g[a] and not matched_d[b]:
                    matched_g[a] = matched_d[b] = True
                    matrix[g_cls[a], d_cls[b]] += 1
        np.add.at(matrix, (g_cls[~matched_g], k), 1)
        np.add.at(matrix, (k, d_cls[~matched_d]), 1)
    return matrix, cat_ids


def plot_confusion_matrix(matrix: np.ndarray, names: Sequence[str], path: str | os.PathLike,
                          score_threshold: float = 0.25, iou_threshold: float = 0.5) -> Path:
    """Colour = share of each true class's row (the background row is normalised by its own total);
    counts are written in the cells when there are at most 25 classes."""
    from matplotlib.figure import Figure

    labels = list(names) + ["background"]
    n = len(labels)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, np.maximum(totals, 1), dtype=np.float64)
    side = min(4 + 0.35 * n, 30)
    fig = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the row")
    ax.set_xticks(range(n), labels, rotation=90, fontsize="small" if n <= 25 else "xx-small")
    ax.set_yticks(range(n), labels, fontsize="small" if n <= 25 else "xx-small")
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(f"confusion matrix (score >= {score_threshold:g}, IoU >= {iou_threshold:g})")
    if n <= 26:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize="small",
                        color="white" if share[i, j] > 0.5 else "black")
    return _save(fig, Path(path))


# --------------------------------------------------------------------------- sample grid


ImageSource = Union[Mapping[Any, Union[str, os.PathLike]], Callable[[Any], torch.Tensor], Any]


def dataset_image_loader(dataset: Any) -> Callable[[Any], torch.Tensor] | None:
    """image id -> uint8 (3, H, W) image, read through a multibox dataset (COCO, VOC, packed shards: anything with
    ``image_ids`` and ``load_image(index)``), also when wrapped in subsets that keep it as ``.dataset``."""
    while not hasattr(dataset, "load_image") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if not (hasattr(dataset, "load_image") and hasattr(dataset, "image_ids")):
        return None
    index_of = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    return lambda image_id: dataset.load_image(index_of[image_id])


def _image_loader(gt: Mapping[str, Any], coco_gt, images: ImageSource | None,
                  image_root: str | os.PathLike | None) -> Callable[[Any], torch.Tensor] | None:
    """A function image id -> uint8 (3, H, W) image (raising when it cannot), or None when there is no source.

    ``images``: {id: file} | a function | a dataset (see :func:`dataset_image_loader`); default: ``file_name``
    under ``image_root``, else next to a ``coco_gt`` JSON or in its ``images/`` (as
    :class:`multibox.data.coco.CocoDetection` resolves it)."""
    from multibox.data.coco import read_image_rgb

    if images is not None:
        if isinstance(images, Mapping):
            return lambda image_id: read_image_rgb(images[image_id])
        if callable(images) and not hasattr(images, "__getitem__"):
            return images
        return dataset_image_loader(images)
    if image_root is not None:
        roots = [Path(image_root)]
    elif isinstance(coco_gt, (str, os.PathLike)):
        roots = [Path(coco_gt).parent, Path(coco_gt).parent / "images"]
    else:
        return None
    names = {img["id"]: img["file_name"] for img in gt["images"]}

    def load(image_id):
        for root in roots:
            path = root / names[image_id]
            if path.is_file():
                return read_image_rgb(path)
        raise FileNotFoundError(f"image {names[image_id]!r} not under " + ", ".join(map(str, roots)))
    return load


def _load_samples(load: Callable[[Any], torch.Tensor], ids: Sequence[Any], count: int) -> dict[Any, torch.Tensor]:
    """Up to ``count`` images spread evenly over ``ids``; an image that cannot be read is replaced by the next
    readable one."""
    picks = pick_samples(ids, count)
    chosen = set(picks)
    images: dict[Any, torch.Tensor] = {}
    for image_id in picks + [i for i in pick_samples(ids, len(ids)) if i not in chosen]:
        if len(images) == count:
            break
        try:
            images[image_id] = load(image_id)
        except (OSError, KeyError, RuntimeError, ValueError):
            continue
    return dict(sorted(images.items(), key=lambda item: _sort_key(item[0])))


def plot_samples(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], images: Mapping[Any, torch.Tensor],
                 path: str | os.PathLike, score_threshold: float = SAMPLE_SCORE_THRESHOLD,
                 max_boxes: int = SAMPLE_MAX_BOXES, pairs_per_row: int = 2) -> Path:
    """Write :func:`samples_figure` to ``path`` (PNG); returns ``path``."""
    return _save(samples_figure(gt, detections, images, score_threshold, max_boxes, pairs_per_row), Path(path))


def samples_figure(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]],
                   images: Mapping[Any, torch.Tensor], score_threshold: float = SAMPLE_SCORE_THRESHOLD,
                   max_boxes: int = SAMPLE_MAX_BOXES, pairs_per_row: int = 2):
    """For each ``{image id: uint8 (3, H, W) image}`` two panels: its ground truth (non-crowd) and its
    ``max_boxes`` highest-scoring predictions with score >= ``score_threshold``. Boxes are coloured by class and
    labelled on a filled background of that colour (class name; with the score for predictions).

    Boxes are clipped to the image; one with nothing left (a zero, negative or non-finite size, or wholly outside
    the image, as ``multibox check-data`` warns about) is not drawn, and counted in its panel's title."""
    from matplotlib.figure import Figure

    from multibox.evaluation.visualize import PALETTE

    cats = sorted(gt["categories"], key=lambda c: c["id"])
    name = {c["id"]: str(c["name"]) for c in cats}
    colour = {c["id"]: PALETTE[i % len(PALETTE)] for i, c in enumerate(cats)}
    gts = _group_by_image(a for a in gt["annotations"] if not a.get("iscrowd", 0))
    dets = _group_by_image(d for d in detections if d["score"] >= score_threshold)
    rows = math.ceil(len(images) / pairs_per_row)
    fig = Figure(figsize=(8.4 * pairs_per_row, 4.4 * rows), dpi=100, layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, 2 * pairs_per_row, squeeze=False))
    for ax in axes.flat:
        ax.axis("off")
    for n, (image_id, image) in enumerate(images.items()):
        g = gts.get(image_id, [])
        d = sorted(dets.get(image_id, []), key=lambda x: -x["score"])
        shown = d[:max_boxes]
        panels = [([(a["bbox"], name[a["category_id"]], colour[a["category_id"]]) for a in g],
                   f"#{image_id}: ground truth ({len(g)})"),
                  ([(x["bbox"], f"{name[x['category_id']]} {x['score']:.2f}", colour[x["category_id"]]) for x in shown],
                   f"#{image_id}: predictions, top {len(shown)} of {len(d)} with score >= {score_threshold:g}")]
        for p, (items, title) in enumerate(panels):
            ax = axes[n // pairs_per_row, 2 * (n % pairs_per_row) + p]
            ax.imshow(image.permute(1, 2, 0).numpy())
            hidden = _draw_labelled_boxes(ax, items, image.shape[-1], image.shape[-2])
            ax.set_title(title + (f", {hidden} not drawable" if hidden else ""), fontsize="medium")
    return fig


def _drawable_xyxy(bboxes_ltwh: Sequence[Sequence[float]], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """COCO boxes (ltwh) -> float64 (n, 4) xyxy clipped to the image, and the (n,) mask of those with an area
    left: the boxes training keeps (:func:`multibox.data.policy.classify_boxes`; a negative or zero size, NaN, or
    a box wholly outside the image has none)."""
    keep = classify_boxes(bboxes_ltwh, width, height) <= BOX_CLIPPED
    with np.errstate(invalid="ignore"):
        clipped = np.clip(_bboxes_ltwh_to_xyxy(bboxes_ltwh), 0, [width, height, width, height])
    return clipped, keep


def _text_colour(background: str) -> str:
    """Black or white on the matplotlib colour ``background``, as predict's pictures choose it."""
    from matplotlib.colors import to_rgb

    from multibox.evaluation.visualize import text_colour

    rgb = tuple(round(255 * c) for c in to_rgb(background))
    return "black" if text_colour(rgb) == (0, 0, 0) else "white"


def _draw_labelled_boxes(ax, items: Sequence[tuple[Sequence[float], str, str]], width: int, height: int) -> int:
    """Draw ``(bbox ltwh, label, colour)`` items on ``ax`` over an image of ``width`` x ``height`` pixels; returns
    how many could not be drawn (see :func:`_drawable_xyxy`)."""
    from matplotlib.patches import Rectangle

    if not items:
        return 0
    xyxy, keep = _drawable_xyxy([bbox for bbox, _, _ in items], width, height)
    for (x1, y1, x2, y2), (_, label, colour) in zip(xyxy[keep], (it for it, k in zip(items, keep) if k)):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2))
        # Above the box's top-left corner; inside it when that would leave the image.
        above = y1 > 0.06 * height
        ax.text(x1, y1, label, fontsize=9, color=_text_colour(colour), va="bottom" if above else "top",
                ha="left", clip_on=True,
                bbox={"boxstyle": "square,pad=0.15", "facecolor": colour, "edgecolor": "none", "alpha": 0.9})
    return int((~keep).sum())


def _sort_key(image_id: Any) -> tuple:
    return (0, image_id, "") if isinstance(image_id, int) else (1, 0, repr(image_id))


def pick_samples(image_ids: Sequence[Any], count: int) -> list[Any]:
    """``count`` ids spread evenly over the sorted ids (deterministic: the same pictures on every run)."""
    ids = sorted(image_ids, key=_sort_key)
    if len(ids) <= count:
        return ids
    return [ids[i] for i in np.linspace(0, len(ids) - 1, count).round().astype(int)]


# --------------------------------------------------------------------------- the page


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) or value < 0 else f"{value:.3f}"


_PROVENANCE_ROWS = (   # (section, key, label) of eval_provenance's record, in the page's order
    ("checkpoint", "path", "checkpoint"), ("checkpoint", "sha256", "sha256"), ("checkpoint", "epoch", "epoch"),
    ("data", "source", "data"), ("data", "split", "images used"), ("data", "images", "images"),
    ("thresholds", "score_threshold", "score threshold"), ("thresholds", "nms_threshold", "NMS IoU threshold"),
    ("thresholds", "max_per_class", "max detections per class"),
    ("thresholds", "max_per_image", "max detections per image"), ("thresholds", "pre_nms_top_k", "pre-NMS top k"),
    ("thresholds", "iou_thresholds", "COCO IoU thresholds"), ("thresholds", "max_detections", "COCO max detections"),
)


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_cell, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _entry(provenance: Mapping[str, Any], section: str, key: str) -> Any:
    entries = provenance.get(section)
    return entries.get(key) if isinstance(entries, Mapping) else None   # an older eval.json: a bare path


def _provenance_html(provenance: Mapping[str, Any] | None) -> tuple[str, str]:
    """(``": <checkpoint> on <data>"`` for the heading, the table of what was evaluated); empty without them."""
    if not provenance:
        return "", ""
    rows = []
    for section, key, label in _PROVENANCE_ROWS:
        value = _entry(provenance, section, key)
        if value is not None:
            rows.append(f"<tr><th>{html.escape(label)}</th><td>{html.escape(_cell(value))}</td></tr>")
    if provenance.get("evaluator"):
        rows.append(f"<tr><th>evaluator</th><td>{html.escape(str(provenance['evaluator']))}</td></tr>")
    ckpt, data = _entry(provenance, "checkpoint", "path"), _entry(provenance, "data", "source")
    heading = f": {Path(ckpt).name} on {Path(data).name}" if ckpt and data else ""
    table = f"<table><caption>evaluated</caption>{''.join(rows)}</table>" if rows else ""
    return html.escape(heading), table


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0 2em 1em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.tables { display: flex; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #666; }
"""


def _html(title: str, result: CocoEvalResult, names: Sequence[str], pictures: Sequence[tuple[str, str]],
          notes: Sequence[str], provenance: Mapping[str, Any] | None, sections: Sequence[str] = ()) -> str:
    heading, evaluated = _provenance_html(provenance)
    at_50, _ = _pr_slices(result)
    with _quiet_nanmean():
        ap50 = np.nanmean(at_50, axis=0)
    stats = "".join(f"<tr><th>{k}</th><td>{_fmt(result.stats[k])}</td></tr>" for k in STAT_KEYS)
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{_fmt(ap)}</td><td>{_fmt(float(a50))}</td></tr>"
        for n, ap, a50 in zip(names, result.per_class.values(), ap50))
    figures = "".join(
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}'
        f"</figcaption></figure>" for src, caption in pictures)
    note_html = "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes)
    # The inline script records on <body> how many pictures loaded (tests read it from headless Chromium).
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}{heading}</title>
<style>{PAGE_STYLE}</style></head>
<body data-images-loaded="pending">
<h1>{html.escape(title)}{heading}</h1>
<p>{result.num_images} images, {result.num_detections} detections, evaluated with {html.escape(result.backend)}.</p>
<div class="tables">
{evaluated}
<table><caption>COCO metrics</caption>{stats}</table>
<table><caption>per class</caption><tr><th>class</th><th>AP@[.5:.95]</th><th>AP50</th></tr>{rows}</table>
</div>
{note_html}
{figures}
{"".join(sections)}
<script>
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) {{ return im.complete && im.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""


def write_eval_report(out_dir: str | os.PathLike, result: CocoEvalResult,
                      coco_gt: str | os.PathLike | Mapping[str, Any], detections: Sequence[Mapping[str, Any]],
                      class_names: Sequence[str] | None = None, metrics_jsonl: str | os.PathLike | None = None,
                      images: ImageSource | None = None, image_root: str | os.PathLike | None = None,
                      image_ids: Iterable[Any] | None = None,
                      score_threshold: float = CONFUSION_SCORE_THRESHOLD, iou_threshold: float = 0.5,
                      num_samples: int = 8, title: str = "multibox evaluation",
                      provenance: Mapping[str, Any] | None = None, sections: Sequence[str] = ()) -> dict[str, Path]:
    """Write the pictures and ``index.html`` (see the module docstring); returns ``{name: path}`` of the files.

    Args:
        result: the evaluation (its precision array gives the curves).
        coco_gt: the ground truth (COCO JSON path or dict) that ``result`` was computed against.
        detections: the COCO results that were evaluated (``bbox`` = [x, y, w, h] pixels).
        class_names: ``["background", name_1, ...]`` in category-id order (default: the ground truth's names).
        metrics_jsonl: a run's ``metrics.jsonl``; gives ``curves.png`` when it exists.
        images: where the sample grid's pictures come from: ``{image id: file}``, a function image id -> uint8
            (3, H, W) tensor, or the evaluation dataset (e.g. ``splits.val``: read with its ``load_image``, so COCO,
            VOC and packed shards all work); default: ``coco_gt``'s ``file_name`` under ``image_root`` (default:
            the JSON's folder, then its ``images/``).
        image_ids: the evaluated images (e.g. a held-out split); default: every ground-truth image.
        score_threshold: detections counted in the confusion matrix (samples: see :func:`samples_figure`).
        num_samples: images in the sample grid. sections: HTML for the end of the page (a run's default boxes).
        provenance: what was evaluated, shown at the top of the page: the record of
            :func:`multibox.evaluation.provenance.eval_provenance` (checkpoint, data, thresholds, evaluator).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gt = _load_coco(coco_gt)
    ids = list(image_ids) if image_ids is not None else [img["id"] for img in gt["images"]]
    names = _display_names(gt, class_names)
    written: dict[str, Path] = {}
    pictures: list[tuple[str, str]] = []
    notes: list[str] = []

    written["pr_curves"] = plot_pr_curves(result, out / "pr_curves.png", names)
    pictures.append(("pr_curves.png", "Precision-recall per class (legend: AP) and over all classes (black)"))

    matrix, _ = confusion_matrix(gt, detections, ids, score_threshold, iou_threshold)
    written["confusion_matrix"] = plot_confusion_matrix(matrix, names, out / "confusion_matrix.png",
                                                        score_threshold, iou_threshold)
    pictures.append(("confusion_matrix.png", "Confusion matrix: ground truth (rows) vs prediction (columns)"))

    load = _image_loader(gt, coco_gt, images, image_root)
    samples = _load_samples(load, ids, num_samples) if load is not None and num_samples > 0 else {}
    if samples:
        written["samples"] = plot_samples(gt, detections, samples, out / "samples.png")
        pictures.append(("samples.png", f"Ground truth (left) and the {SAMPLE_MAX_BOXES} highest-scoring "
                                        f"predictions with score >= {SAMPLE_SCORE_THRESHOLD:g} (right), by class"))
    else:
        notes.append("No sample grid: the evaluation images could not be read.")

    if metrics_jsonl is not None and Path(metrics_jsonl).is_file():
        from multibox.evaluation.plots import plot_training_curves
        written["curves"] = plot_training_curves(metrics_jsonl, out / "curves.png")
        pictures.append(("curves.png", "Training: loss and learning rate per step, AP per evaluation"))

    page = _html(title, result, names, pictures, notes, provenance, sections)
    written["index"] = atomic_write_text(out / "index.html", page)
    return written


def detections_for_report(detections: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The detections :func:`write_eval_report` uses with its default thresholds (the confusion matrix's and the
    sample grid's): what a training run keeps of its best evaluation until the report is written. The
    precision-recall curves come from the result, not from the detections."""
    floor = min(CONFUSION_SCORE_THRESHOLD, SAMPLE_SCORE_THRESHOLD)
    return [d for d in detections if d["score"] >= floor]


def _display_names(gt: Mapping[str, Any], class_names: Sequence[str] | None) -> list[str]:
    """Class names in category-id order: ``class_names`` without its background entry when it has one name per
    ground-truth category, else the ground truth's own names."""
    gt_names = [str(c["name"]) for c in sorted(gt["categories"], key=lambda c: c["id"])]
    if class_names is not None and len(class_names) == len(gt_names) + 1:
        return list(class_names[1:])
    return gt_names
