"""How well a model's default boxes fit a dataset (``multibox anchors``, and a training run's record of it).

Computed with the model's own matching rule (``loss.match_rule``, ``loss.iou_threshold``) on every default box
at the model's input size, per object: its best IoU with any default box, whether that reaches the matching
threshold (an object that does not trains only through its one forced match), and how many default boxes the
matcher makes positive for it, with the other objects of its image competing. Summaries by the level of the
best default box, COCO's size buckets (the annotation's area in image pixels) and the aspect ratio at network
scale (the resize stretches the image, so that is the shape the default boxes meet).
"""
from __future__ import annotations

import dataclasses
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from multibox.config import Config
from multibox.core.anchor_fit import ShapeGrid, reaches
from multibox.core.anchors import AnchorSpec, default_boxes_cxcywh
from multibox.core.boxes import box_iou_xyxy, cxcywh_to_xyxy
from multibox.core.matching import MATCHERS, PAD_LABEL
from multibox.data.anchor_fitting import AnchorFit, strict_matching
from multibox.data.objects import ObjectTable
from multibox.io import atomic_write_text
from multibox.models import model_anchor_spec

# COCO's size buckets: area in pixels of the image (its eval's areaRng).
SIZE_BUCKETS = (("small", 0.0, 32.0 ** 2), ("medium", 32.0 ** 2, 96.0 ** 2), ("large", 96.0 ** 2, math.inf))
# Width / height at network scale; the paper's boxes reach 3:1.
ASPECT_BUCKETS = (("<1:4", 0.0, 0.25), ("1:4-1:2", 0.25, 0.5), ("1:2-2:1", 0.5, 2.0), ("2:1-4:1", 2.0, 4.0),
                  (">=4:1", 4.0, math.inf))
# IoU entries held at once while matching (B x G x A floats): ~80 MB per tensor.
_MATCH_CHUNK = 20_000_000
# Unmatched objects kept in anchors.json (the count is always complete).
MAX_LISTED = 10_000
RECORD_FILE = "anchors.json"


@dataclass(frozen=True)
class ObjectMatch:
    """Per object (N,): ``best_iou`` with any default box, ``level`` of that box, ``positives`` the matcher gives."""

    best_iou: Tensor
    level: Tensor
    positives: Tensor


def _anchor_levels(spec: AnchorSpec) -> Tensor:
    """(A,) the feature level of each default box, in the boxes' order."""
    counts = [math.prod(spec.grid_hw(k)) * n for k, n in enumerate(spec.boxes_per_location())]
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def match_objects(table: ObjectTable, spec: AnchorSpec, threshold: float, rule: str) -> ObjectMatch:
    """Match every image's objects to the default boxes of ``spec`` with ``MATCHERS[rule]``, in chunks of images
    (padded to (B, G) objects, an IoU of (B, G, A) at most ``_MATCH_CHUNK`` entries). Returns (N,) per object."""
    anchors_xyxy = cxcywh_to_xyxy(default_boxes_cxcywh(spec, torch.float64)).float()
    levels = _anchor_levels(spec)
    _, counts = torch.unique_consecutive(table.image_index, return_counts=True)   # the rows come image by image
    starts = torch.cumsum(counts, 0) - counts
    best, level, positives = [], [], []
    first = 0
    while first < len(counts):
        width = int(counts[first])
        last = first + 1
        while last < len(counts) and (last + 1 - first) * max(width, int(counts[last])) * len(anchors_xyxy) \
                < _MATCH_CHUNK:
            width = max(width, int(counts[last]))
            last += 1
        b, lev, pos = _match_chunk(table, starts[first:last], counts[first:last], width, anchors_xyxy, threshold,
                                   rule)
        best.append(b)
        level.append(levels[lev])
        positives.append(pos)
        first = last
    if not best:
        empty = torch.zeros(0)
        return ObjectMatch(empty.double(), empty.long(), empty.long())
    return ObjectMatch(torch.cat(best), torch.cat(level), torch.cat(positives))


def _match_chunk(table: ObjectTable, starts: Tensor, counts: Tensor, width: int, anchors_xyxy: Tensor,
                 threshold: float, rule: str) -> tuple[Tensor, Tensor, Tensor]:
    """(n,) best IoU, best default box and positives of the n objects of the B = len(starts) images whose rows
    are [starts, starts + counts), padded to ``width`` objects per image."""
    num = len(starts)
    slot = torch.cat([torch.arange(int(c)) for c in counts])
    row = torch.repeat_interleave(torch.arange(num), counts)
    rows = torch.cat([torch.arange(int(s), int(s) + int(c)) for s, c in zip(starts, counts)])
    boxes = torch.zeros(num, width, 4)
    labels = torch.full((num, width), PAD_LABEL, dtype=torch.int64)
    boxes[row, slot] = cxcywh_to_xyxy(table.boxes_cxcywh[rows]).float()
    labels[row, slot] = 1
    iou = box_iou_xyxy(boxes, anchors_xyxy)                                   # (B, G, A)
    best_iou, best_anchor = iou[row, slot].max(dim=1)
    matches = MATCHERS[rule](boxes, labels, anchors_xyxy, threshold, iou)
    owner = (torch.arange(num)[:, None] * width + matches.gt_index)[matches.positive]
    per_slot = torch.bincount(owner, minlength=num * width).reshape(num, width)
    return best_iou.double(), best_anchor, per_slot[row, slot]


def _bucket_rows(name: str, values: Tensor, buckets: Sequence[tuple[str, float, float]], match: ObjectMatch,
                 threshold: float, strict: bool) -> list[dict[str, Any]]:
    return [_summary_row(name, label, (values >= low) & (values < high), match, threshold, strict)
            for label, low, high in buckets]


def _summary_row(name: str, label: str, mask: Tensor, match: ObjectMatch, threshold: float,
                 strict: bool) -> dict[str, Any]:
    n = int(mask.sum())
    if n == 0:
        return {name: label, "objects": 0, "recall": None, "mean_iou": None, "positives": None}
    iou = match.best_iou[mask]
    return {name: label, "objects": n, "recall": float(reaches(iou, threshold, strict).double().mean()),
            "mean_iou": float(iou.mean()), "positives": float(match.positives[mask].double().mean())}


@dataclass(frozen=True)
class AnchorAnalysis:
    """``report``: the JSON-ready analysis (``summary``, ``best_iou`` quantiles and histogram, ``by_level`` /
    ``by_size`` / ``by_aspect`` rows, ``boxes``: the default-box shapes in network pixels per level, ``unmatched``
    objects, worst first); ``matched``: (N,) whether each object of the table reaches the threshold."""

    report: dict[str, Any]
    matched: Tensor


def analyse_anchors(table: ObjectTable, cfg: Config, spec: AnchorSpec | None = None) -> AnchorAnalysis:
    """The analysis of ``cfg``'s default boxes (or ``spec``'s: fitted ones) on ``table``'s objects."""
    spec = spec or model_anchor_spec(cfg)
    threshold, rule = cfg.loss.iou_threshold, cfg.loss.match_rule
    strict = strict_matching(cfg)
    match = match_objects(table, spec, threshold, rule)
    n = len(table)
    wh = table.boxes_cxcywh[:, 2:]
    aspect = wh[:, 0] / wh[:, 1].clamp(min=1e-12)
    matched = reaches(match.best_iou, threshold, strict)
    size = spec.image_hw
    summary = {"objects": n, "images": int(torch.unique(table.image_index).numel()), "image_hw": list(size),
               "default_boxes": int(spec.num_anchors()), "matching": {"rule": rule, "iou_threshold": threshold},
               "recall": float(matched.double().mean()) if n else None,
               "mean_best_iou": float(match.best_iou.mean()) if n else None,
               "mean_positives": float(match.positives.double().mean()) if n else None,
               "only_forced_match": float((match.positives == 1).double().mean()) if n else None,
               "no_positive": float((match.positives == 0).double().mean()) if n else None}
    quantiles = (0.1, 0.25, 0.5, 0.75, 0.9)
    best = {"quantiles": {str(q): float(torch.quantile(match.best_iou, q)) for q in quantiles} if n else {},
            "histogram": torch.histc(match.best_iou.float(), 10, 0.0, 1.0).long().tolist() if n else [0] * 10}
    levels = [_summary_row("level", str(k), match.level == k, match, threshold, strict)
              for k in range(len(spec.feature_sizes))]
    report = {"summary": summary, "best_iou": best, "by_level": levels,
              "by_size": _bucket_rows("size", table.area_px, SIZE_BUCKETS, match, threshold, strict),
              "by_aspect": _bucket_rows("aspect", aspect, ASPECT_BUCKETS, match, threshold, strict),
              "boxes": _shapes_px(spec), "unmatched": _unmatched(table, match, matched, size)}
    return AnchorAnalysis(report, matched)


def _shapes_px(spec: AnchorSpec) -> list[dict[str, Any]]:
    grid = ShapeGrid.of(spec)
    height, width = spec.image_hw
    return [{"level": k, "feature_hw": list(spec.grid_hw(k)),
             "sizes_px": [[round(w * width, 2), round(h * height, 2)] for w, h in grid.wh[grid.level == k].tolist()]}
            for k in range(len(spec.feature_sizes))]


def _unmatched(table: ObjectTable, match: ObjectMatch, matched: Tensor, size_hw: tuple[int, int]) -> dict[str, Any]:
    index = torch.nonzero(~matched).flatten()
    index = index[torch.argsort(match.best_iou[index], stable=True)][:MAX_LISTED]
    items = [{"file": table.files[int(table.image_index[i])], "ann_id": int(table.ann_id[i]),
              "label": int(table.labels[i]), "bbox_ltwh": [round(float(v), 2) for v in table.bbox_ltwh[i]],
              "wh_net_px": [round(float(v) * s, 1) for v, s in zip(table.boxes_cxcywh[i, 2:], size_hw[::-1])],
              "best_iou": round(float(match.best_iou[i]), 4)} for i in index.tolist()]
    return {"count": int((~matched).sum()), "listed": items}


def summary_line(analysis: dict[str, Any]) -> str:
    """One line: recall at the threshold, mean best IoU and positives per object."""
    s = analysis["summary"]
    if not s["objects"]:
        return "no objects"
    return (f"{s['recall']:.1%} of {s['objects']} objects reach IoU {s['matching']['iou_threshold']:g} with a "
            f"default box; mean best IoU {s['mean_best_iou']:.3f}; {s['mean_positives']:.1f} positives per object")


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def html_section(analysis: dict[str, Any], picture: str | None = "anchors.png",
                 fitted: dict[str, Any] | None = None) -> str:
    """The analysis as an HTML section (the run's index.html, ``multibox anchors``'s page): summary, the three
    breakdowns (with the fitted boxes' numbers beside them when given) and the picture."""
    parts = [f"<h2>Default boxes</h2><p>{html.escape(summary_line(analysis))}"]
    if fitted is not None:
        parts.append(f"<br>fitted: {html.escape(summary_line(fitted))}")
    parts.append("</p><div class=tables>")
    for key, name in (("by_level", "level"), ("by_size", "size"), ("by_aspect", "aspect")):
        head = "".join(f"<th>{h}</th>" for h in (name, "objects", "recall", "mean IoU", "positives"))
        if fitted is not None:
            head += "<th>recall (fitted)</th><th>mean IoU (fitted)</th><th>positives (fitted)</th>"
        body = ""
        for i, row in enumerate(analysis[key]):
            cells = [row[name], row["objects"], row["recall"], row["mean_iou"], row["positives"]]
            if fitted is not None:
                cells += [fitted[key][i]["recall"], fitted[key][i]["mean_iou"], fitted[key][i]["positives"]]
            body += "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in cells) + "</tr>"
        parts.append(f"<table><caption>by {name}</caption><tr>{head}</tr>{body}</table>")
    parts.append("</div>")
    if picture:
        parts.append(f'<figure><img src="{html.escape(picture)}" alt="default boxes"><figcaption>Objects at network '
                     f"scale (width, height) and the default-box shapes; best IoU per object</figcaption></figure>")
    return "".join(parts)


def html_page(title: str, analysis: dict[str, Any], fitted: dict[str, Any] | None = None) -> str:
    """A page of its own for :func:`html_section` (``multibox anchors``'s ``index.html``)."""
    from multibox.evaluation.report import PAGE_STYLE

    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{PAGE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"{html_section(analysis, 'anchors.png', fitted)}</body></html>")


@dataclass(frozen=True)
class AnchorReport:
    """An ``anchors.fit`` decision with the analysis of the boxes before and after it on ``table``: what
    ``anchors.json`` and ``anchors.png`` hold. ``record`` is ``anchors.json``: the config's ``anchors`` section as
    given (before fitting), the decision (``sizes``: the boxes used) and both analyses (``after`` None: not
    fitted)."""

    record: dict[str, Any]
    table: ObjectTable
    before: AnchorAnalysis
    after: AnchorAnalysis | None

    @staticmethod
    def of(cfg: Config, table: ObjectTable, decision: AnchorFit) -> "AnchorReport":
        """Analyse ``cfg``'s boxes (as given, before any fitting) and the fitted ones on ``table``."""
        spec = model_anchor_spec(cfg)
        before = analyse_anchors(table, cfg, spec)
        after = analyse_anchors(table, cfg, decision.spec(spec)) if decision.fitted else None
        record = {"anchors": dataclasses.asdict(cfg.anchors), "fitted": decision.fitted, "reason": decision.reason,
                  "matchable_recall": decision.matchable_recall, "sizes": decision.sizes,
                  "before": before.report, "after": after.report if after else None}
        return AnchorReport(record, table, before, after)

    def write(self, out: Path) -> list[Path]:
        """Write ``anchors.json`` and ``anchors.png`` into ``out``; returns their paths."""
        out.mkdir(parents=True, exist_ok=True)
        return [atomic_write_text(out / RECORD_FILE, json.dumps(self.record, indent=1)),
                plot_anchors(self.table, self.before, out / "anchors.png", self.after)]


def anchors_html(folder: Path) -> list[str]:
    """The default-box section of the ``anchors.json`` in ``folder`` (a run's) for its ``index.html``; none
    when there is no such file (a run from before it existed)."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    picture = "anchors.png" if (Path(folder) / "anchors.png").is_file() else None
    return [html_section(record["before"], picture, record["after"])]


def plot_anchors(table: ObjectTable, analysis: AnchorAnalysis, path, fitted: AnchorAnalysis | None = None,
                 max_points: int = 20_000):
    """``anchors.png``: objects' (w, h) in network pixels (log axes; red: no default box reaches the
    threshold), the default-box shapes per level on top (and the fitted ones), and the best-IoU histogram."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from multibox.evaluation.plots import save_figure_png

    report = analysis.report
    height, width = report["summary"]["image_hw"]
    fig = Figure(figsize=(12, 5.2), dpi=100)
    FigureCanvasAgg(fig)
    ax, hist = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    wh = table.boxes_cxcywh[:, 2:].numpy() * np.array([width, height])
    pick = np.random.default_rng(0).permutation(len(wh))[:max_points]
    unmatched = ~analysis.matched.numpy()
    for mask, colour, label in ((~unmatched[pick], "#999999", "objects"),
                                (unmatched[pick], "#d62728", "objects no box reaches")):
        ax.scatter(wh[pick][mask, 0], wh[pick][mask, 1], s=4, c=colour, alpha=0.4, linewidths=0, label=label)
    _draw_shapes(ax, report["boxes"], "o", "default boxes")
    if fitted is not None:
        _draw_shapes(ax, fitted.report["boxes"], "*", "fitted boxes")
    ax.set(xscale="log", yscale="log", xlabel="width (network px)", ylabel="height (network px)",
           title=f"objects and default boxes at {height}x{width}")
    ax.legend(fontsize=7, loc="upper left")
    _draw_histogram(hist, report, None if fitted is None else fitted.report)
    fig.tight_layout()
    return save_figure_png(fig, path)


def _draw_shapes(ax, boxes: list[dict[str, Any]], marker: str, label: str) -> None:
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    for level in boxes:
        wh = np.asarray(level["sizes_px"])
        ax.scatter(wh[:, 0], wh[:, 1], marker=marker, s=60 if marker == "*" else 36,
                   facecolors=colours[level["level"] % len(colours)] if marker == "*" else "none",
                   edgecolors=colours[level["level"] % len(colours)], linewidths=1.5,
                   label=f"{label}, level {level['level']} ({'x'.join(map(str, level['feature_hw']))})")


def _draw_histogram(ax, analysis: dict[str, Any], fitted: dict[str, Any] | None) -> None:
    edges = np.linspace(0, 1, 11)
    ax.bar(edges[:-1], analysis["best_iou"]["histogram"], width=0.1, align="edge", alpha=0.6, label="default boxes")
    if fitted is not None:
        ax.step(edges, [fitted["best_iou"]["histogram"][0]] + fitted["best_iou"]["histogram"], color="k",
                label="fitted boxes")
    ax.axvline(analysis["summary"]["matching"]["iou_threshold"], color="#d62728", linestyle="--",
               label="matching threshold")
    ax.set(xlabel="best IoU of an object with any default box", ylabel="objects", title="best IoU per object")
    ax.legend(fontsize=8)
