"""What the report draws and says (multibox.evaluation.report, .plots): any box the data may hold is drawn
clipped or left out, never a crash; sample labels that can be read; a page that names the checkpoint, the data
and the thresholds; epoch axes that make sense after one epoch."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.patches import Rectangle

from multibox.evaluation.coco import evaluate_coco
from multibox.evaluation.plots import build_training_figure
from multibox.evaluation.report import samples_figure, write_eval_report

CATEGORIES = [{"id": 4, "name": "cat"}, {"id": 9, "name": "dog"}]
W, H = 120, 80


def _gt(bboxes_ltwh: list[list[float]]) -> dict:
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": W, "height": H}], "categories": CATEGORIES,
            "annotations": [{"id": k + 1, "image_id": 1, "category_id": 4 + 5 * (k % 2), "bbox": b,
                             "area": abs(b[2] * b[3]), "iscrowd": 0} for k, b in enumerate(bboxes_ltwh)]}


def _image() -> torch.Tensor:
    return torch.full((3, H, W), 90, dtype=torch.uint8)


def _rectangles(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _luminance(colour) -> float:
    r, g, b = to_rgb(colour)
    return 0.299 * r + 0.587 * g + 0.114 * b


DEGENERATE = [[10, 10, -5, 20],     # negative width (check-data: a warning; the dataset drops it for training)
              [30, 20, 15, -4],     # negative height
              [40, 40, 0, 10],      # zero width
              [100, 60, 50, 50],    # partly outside the image: drawn clipped to it
              [300, 300, 10, 10],   # wholly outside: nothing left to draw
              [20, 20, 30, 30]]     # an ordinary box


def test_degenerate_boxes_are_clipped_or_left_out_not_a_crash(tmp_path):
    gt = _gt(DEGENERATE)
    dets = [{"image_id": 1, "category_id": 4, "bbox": b, "score": 0.9} for b in DEGENERATE]
    fig = samples_figure(gt, dets, {1: _image()})
    ax_gt, ax_pred = fig.axes[:2]
    for ax in (ax_gt, ax_pred):
        boxes = [r.get_bbox().bounds for r in _rectangles(ax)]
        assert len(boxes) == 2                      # the partly-outside box (clipped) and the ordinary one
        for x, y, w, h in boxes:
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= W and y + h <= H
        assert "4 not drawable" in ax.get_title()
    assert sorted(r.get_bbox().bounds for r in _rectangles(ax_gt)) == [(20, 20, 30, 30), (100, 60, 20, 20)]
    # The whole report, images read through a function: written, with its sample grid.
    result = evaluate_coco(gt, dets, backend="pycocotools", verbose=False)
    files = write_eval_report(tmp_path, result, gt, dets, images=lambda image_id: _image())
    assert {"samples", "index"} <= set(files) and (tmp_path / "samples.png").stat().st_size > 1000


def test_sample_predictions_are_few_confident_and_labelled_readably():
    gt = _gt([[5 + 2 * k, 5 + k, 30, 20] for k in range(20)])
    scores = np.linspace(0.99, 0.05, 60)
    dets = [{"image_id": 1, "category_id": 4 + 5 * (k % 2), "bbox": [k % 90, k % 50, 25, 20], "score": float(s)}
            for k, s in enumerate(scores)]
    fig = samples_figure(gt, dets, {1: _image()}, score_threshold=0.3, max_boxes=15)
    ax_gt, ax_pred = fig.axes[:2]
    assert len(_rectangles(ax_pred)) == 15          # the 15 highest of the 44 scoring >= 0.3
    labels = [t for t in ax_pred.texts if t.get_bbox_patch() is not None]
    shown = sorted((float(t.get_text().split()[-1]) for t in labels), reverse=True)
    assert shown == pytest.approx([round(float(s), 2) for s in scores[:15]], abs=0.006)
    assert "15 of" in ax_pred.get_title() and ">= 0.3" in ax_pred.get_title()
    for ax in (ax_gt, ax_pred):
        texts = [t for t in ax.texts if t.get_bbox_patch() is not None]
        assert texts
        for text in texts:
            background = text.get_bbox_patch().get_facecolor()
            assert background[3] > 0.6                  # a filled label background
            assert abs(_luminance(text.get_color()) - _luminance(background)) > 0.4   # contrasting text
            assert text.get_fontsize() >= 8
        # each label has the colour of a box of its panel: class colours, not one green for everything
        edge = {to_rgb(r.get_edgecolor()) for r in _rectangles(ax)}
        assert {to_rgb(t.get_bbox_patch().get_facecolor()) for t in texts} <= edge
    assert len({to_rgb(r.get_edgecolor()) for r in _rectangles(ax_gt)}) == 2


PROVENANCE = {"checkpoint": {"path": "/runs/x/best.pt", "sha256": "ab12" * 16, "epoch": 7},
              "data": {"source": "/data/val.json", "kind": "coco", "split": "every image", "images": 1,
                       "id": "0123abcd"},
              "thresholds": {"score_threshold": 0.02, "nms_threshold": 0.45, "max_per_class": 100,
                             "max_per_image": 200, "iou_thresholds": [0.5, 0.55], "max_detections": [1, 10, 100]},
              "evaluator": "pycocotools"}


def test_page_names_checkpoint_data_and_thresholds(tmp_path):
    gt = _gt([[20, 20, 30, 30]])
    dets = [{"image_id": 1, "category_id": 4, "bbox": [20, 20, 30, 30], "score": 0.9}]
    result = evaluate_coco(gt, dets, backend="pycocotools", verbose=False)
    write_eval_report(tmp_path, result, gt, dets, provenance=PROVENANCE)
    page = (tmp_path / "index.html").read_text()
    for text in ("<th>checkpoint</th><td>/runs/x/best.pt</td>", f"<th>sha256</th><td>{'ab12' * 16}</td>",
                 "<th>epoch</th><td>7</td>", "<th>data</th><td>/data/val.json</td>", "<td>every image</td>",
                 "<th>images</th><td>1</td>", "<th>score threshold</th><td>0.02</td>",
                 "<th>NMS IoU threshold</th><td>0.45</td>", "<th>max detections per image</th><td>200</td>",
                 "<th>COCO IoU thresholds</th><td>0.5, 0.55</td>", "<th>evaluator</th><td>pycocotools</td>",
                 "<h1>multibox evaluation: best.pt on val.json</h1>"):
        assert text in page, text


def _metrics(evals: list[int], steps: int = 1) -> tuple[list[dict], list[dict]]:
    train = [{"kind": "train", "step": s, "loss": 2.0, "lr": 0.01} for s in range(1, steps + 1)]
    return train, [{"kind": "eval", "epoch": e, "AP": 0.1 * e, "AP50": 0.2 * e} for e in evals]


def _visible_ticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def test_epoch_axis_after_one_epoch_is_zero_to_one_with_integer_ticks():
    fig = build_training_figure(*_metrics([1]))
    ax_loss, ax_ap = fig.axes[:2]
    lo, hi = ax_ap.get_xlim()
    assert lo <= 0 and 1 <= hi < 1.5, (lo, hi)
    assert _visible_ticks(ax_ap) == [0, 1]
    for line in ax_ap.get_lines():
        assert line.get_marker() not in (None, "", "None")     # a single point is visible
    # one training record: a visible marker too, and an axis from step 0
    assert ax_loss.get_lines()[0].get_marker() not in (None, "", "None")
    assert ax_loss.get_xlim()[0] <= 0 and all(float(t).is_integer() for t in _visible_ticks(ax_loss))


def test_epoch_axis_ticks_are_whole_epochs_for_sparse_evaluations():
    fig = build_training_figure(*_metrics([5, 10, 15, 20, 25, 30], steps=40))   # train.eval_every = 5
    ax_ap = fig.axes[1]
    ticks = _visible_ticks(ax_ap)
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax_ap.get_xlim()[0] <= 0 and ax_ap.get_xlim()[1] >= 30
    assert list(ax_ap.get_lines()[0].get_xdata()) == [5, 10, 15, 20, 25, 30]
