"""Tests for multibox.evaluation.coco.

References are independent of the module under test: pycocotools run directly (its
printed summary and its ``stats``), and AP values worked out by hand for tiny cases.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest

from multibox.evaluation.coco import (
    STAT_KEYS,
    CocoEvalResult,
    evaluate_coco,
    format_per_class_table,
    format_summary,
    write_eval_json,
)

BACKENDS = ("faster", "pycocotools")
# Non-contiguous category ids, on purpose: the K axis must not be confused with the id.
CATS = [{"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "zebra"}]


def _ann(aid, img, cat, x, y, w, h, **extra):
    return {"id": aid, "image_id": img, "category_id": cat, "bbox": [x, y, w, h],
            "area": float(w * h), "iscrowd": 0, **extra}


@pytest.fixture(scope="module")
def gt():
    """5 images, 3 categories, boxes in every COCO area range.

    small < 32^2 = 1024 px^2 <= medium < 96^2 = 9216 px^2 <= large.
    """
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in (1, 2, 3, 4, 7)]
    anns = [
        _ann(1, 1, 2, 10, 10, 20, 20),      # small cat
        _ann(2, 1, 5, 100, 100, 50, 60),    # medium dog
        _ann(3, 1, 9, 300, 200, 200, 150),  # large zebra
        _ann(4, 2, 2, 50, 40, 120, 110),    # large cat
        _ann(5, 2, 2, 400, 300, 25, 30),    # small cat
        _ann(6, 3, 5, 0, 0, 300, 250),      # large dog
        _ann(7, 3, 9, 500, 50, 60, 70),     # medium zebra
        _ann(8, 3, 9, 520, 400, 15, 12),    # small zebra
        _ann(9, 4, 5, 200, 220, 80, 90),    # medium dog
        _ann(10, 7, 2, 330, 30, 70, 40),    # medium cat
    ]
    return {"images": images, "annotations": anns, "categories": CATS}


def _perfect(gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
             "score": 0.9 - 0.01 * a["id"]} for a in gt["annotations"]]


def _randomish(gt, seed=0):
    """Shifted / rescaled true boxes, some missing, some false positives, some wrong class."""
    rng = np.random.default_rng(seed)
    dets = []
    for a in gt["annotations"]:
        if rng.random() < 0.2:
            continue  # missed
        x, y, w, h = a["bbox"]
        jx, jy, jw, jh = rng.normal(0.0, 0.12, 4)
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [x + jx * w, y + jy * h, w * (1 + jw), h * (1 + jh)],
                     "score": float(rng.uniform(0.3, 1.0))})
    img_ids = [im["id"] for im in gt["images"]]
    for _ in range(25):  # false positives, incl. duplicates and wrong classes
        w, h = rng.uniform(8, 250, 2)
        dets.append({"image_id": int(rng.choice(img_ids)), "category_id": int(rng.choice([2, 5, 9])),
                     "bbox": [float(rng.uniform(0, 400)), float(rng.uniform(0, 300)), float(w), float(h)],
                     "score": float(rng.uniform(0.0, 0.8))})
    return dets


def _pycocotools_reference(gt, dets, img_ids=None):
    """Run pycocotools directly; return (stats array, printed summary lines, COCOeval)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        start = len(buf.getvalue())
        ev.summarize()
    printed = buf.getvalue()[start:].splitlines()
    return np.asarray(ev.stats), printed, ev


# --------------------------------------------------------------------------- core numbers


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_give_ap_one(gt, backend):
    r = evaluate_coco(gt, _perfect(gt), backend=backend, verbose=False)
    assert isinstance(r, CocoEvalResult)
    assert list(r.stats) == list(STAT_KEYS)
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert r.stats[k] == pytest.approx(1.0, abs=1e-12), k
    # Image 2 holds two cats: with one detection per image and class, recall is 1/2 there.
    assert r.stats["AR1"] < 1.0
    assert r.per_class == pytest.approx({"cat": 1.0, "dog": 1.0, "zebra": 1.0})
    assert r.category_ids == [2, 5, 9]
    assert r.precision.shape == (10, 101, 3, 4, 3)
    assert r.recall.shape == (10, 3, 4, 3)
    assert r.num_images == 5 and r.num_detections == 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backends_agree_with_each_other_and_with_pycocotools(gt, seed):
    dets = _randomish(gt, seed)
    fast = evaluate_coco(gt, dets, backend="faster", verbose=False)
    ref = evaluate_coco(gt, dets, backend="pycocotools", verbose=False)
    direct, _, _ = _pycocotools_reference(gt, dets)
    assert 0.0 < fast.stats["AP"] < 1.0  # a non-trivial case
    for i, k in enumerate(STAT_KEYS):
        assert fast.stats[k] == pytest.approx(ref.stats[k], abs=1e-9), k
        assert ref.stats[k] == pytest.approx(float(direct[i]), abs=1e-12), k
    np.testing.assert_allclose(fast.precision, ref.precision, atol=1e-9)
    np.testing.assert_allclose(fast.recall, ref.recall, atol=1e-9)
    assert fast.per_class == pytest.approx(ref.per_class, abs=1e-9)


def _one_gt_case(det_boxes_scores):
    """One 100x100 gt box at the origin; detections given as (ltwh, score)."""
    gt = {"images": [{"id": 1, "width": 200, "height": 200}],
          "annotations": [_ann(1, 1, 2, 0, 0, 100, 100)],
          "categories": CATS[:1]}
    dets = [{"image_id": 1, "category_id": 2, "bbox": b, "score": s} for b, s in det_boxes_scores]
    return gt, dets


# IoU of [0, 0, 100, h] with [0, 0, 100, 100] is h / 100. Thresholds are
# 0.50, 0.55, ..., 0.95; a match needs IoU >= threshold. With a single true positive,
# precision is 1 at every recall, so AP@[.5:.95] = (thresholds met) / 10:
#   IoU 0.40 -> none met -> 0.0
#   IoU 0.52 -> 0.50 only -> 0.1
#   IoU 0.73 -> 0.50, 0.55, 0.60, 0.65, 0.70 -> 0.5
#   IoU 0.97 -> all ten -> 1.0
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("height, expected_ap, expected_ap50, expected_ap75",
                         [(40, 0.0, 0.0, 0.0), (52, 0.1, 1.0, 0.0), (73, 0.5, 1.0, 0.0), (97, 1.0, 1.0, 1.0)])
def test_golden_single_gt(backend, height, expected_ap, expected_ap50, expected_ap75):
    gt, dets = _one_gt_case([([0, 0, 100, height], 0.9)])
    r = evaluate_coco(gt, dets, backend=backend, verbose=False)
    assert r.stats["AP"] == pytest.approx(expected_ap, abs=1e-12)
    assert r.stats["AP50"] == pytest.approx(expected_ap50, abs=1e-12)
    assert r.stats["AP75"] == pytest.approx(expected_ap75, abs=1e-12)
    # Recall follows the same count (1 gt, matched or not at each threshold).
    assert r.stats["AR100"] == pytest.approx(expected_ap, abs=1e-12)
    # 100x100 = 10000 px^2 >= 96^2: a large object; no small / medium gt -> -1 (undefined).
    assert r.stats["APl"] == pytest.approx(expected_ap, abs=1e-12)
    assert r.stats["APs"] == -1.0 and r.stats["APm"] == -1.0
    assert r.stats["ARs"] == -1.0 and r.stats["ARm"] == -1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_false_positive_ranked_first(backend):
    # A higher-scored false positive (IoU 0.30) then a true positive at IoU 0.83.
    # At each threshold the TP is the 2nd detection: precision 1/2 at recall 1, and the
    # interpolated precision is 1/2 at every recall threshold. IoU 0.83 meets the 7
    # thresholds 0.50 .. 0.80, so AP@[.5:.95] = 7 * 0.5 / 10 = 0.35, AP50 = 0.5, AP75 = 0.5.
    gt, dets = _one_gt_case([([0, 0, 100, 30], 0.9), ([0, 0, 100, 83], 0.8)])
    r = evaluate_coco(gt, dets, backend=backend, verbose=False)
    assert r.stats["AP"] == pytest.approx(0.35, abs=1e-12)
    assert r.stats["AP50"] == pytest.approx(0.5, abs=1e-12)
    assert r.stats["AP75"] == pytest.approx(0.5, abs=1e-12)
    assert r.stats["AR1"] == pytest.approx(0.0, abs=1e-12)  # the top-1 detection is the FP
    assert r.stats["AR10"] == pytest.approx(0.7, abs=1e-12)


# --------------------------------------------------------------------------- per class


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_class_mean_equals_ap_when_all_classes_present(gt, backend):
    r = evaluate_coco(gt, _randomish(gt, 3), backend=backend, verbose=False)
    assert list(r.per_class) == ["cat", "dog", "zebra"]
    values = list(r.per_class.values())
    assert all(0.0 <= v <= 1.0 for v in values)
    assert len(set(values)) > 1  # the classes really differ, so the check below is not trivial
    assert np.mean(values) == pytest.approx(r.stats["AP"], abs=1e-12)


def test_per_class_matches_pycocotools_single_category_eval(gt):
    """Per-class AP == pycocotools' stats[0] with params.catIds restricted to that class."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = _randomish(gt, 4)
    r = evaluate_coco(gt, dets, verbose=False)
    for cat in CATS:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = copy.deepcopy(gt)
            coco_gt.createIndex()
            ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), iouType="bbox")
            ev.params.catIds = [cat["id"]]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert r.per_class[cat["name"]] == pytest.approx(ev.stats[0], abs=1e-12), cat["name"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_subset_equals_filtered_dataset(gt, backend):
    dets = _randomish(gt, 5)
    subset = [1, 3, 4]  # no "cat" in images 3 and 4, one in image 1
    r = evaluate_coco(gt, dets, backend=backend, image_ids=subset, verbose=False)
    # Independent reference: a dataset that only has those images, and their detections.
    sub_gt = {"images": [im for im in gt["images"] if im["id"] in subset],
              "annotations": [a for a in gt["annotations"] if a["image_id"] in subset],
              "categories": gt["categories"]}
    sub_dets = [d for d in dets if d["image_id"] in subset]
    direct, _, _ = _pycocotools_reference(sub_gt, sub_dets)
    np.testing.assert_allclose([r.stats[k] for k in STAT_KEYS], direct, atol=1e-9)
    assert r.num_images == 3
    assert r.num_detections == len(sub_dets)
    full = evaluate_coco(gt, dets, backend=backend, verbose=False)
    assert full.stats["AP"] != pytest.approx(r.stats["AP"])  # the restriction did something


@pytest.mark.parametrize("backend", BACKENDS)
def test_category_without_gt_in_subset_is_minus_one(gt, backend):
    dets = _perfect(gt)
    r = evaluate_coco(gt, dets, backend=backend, image_ids=[4], verbose=False)  # image 4: one dog
    assert r.per_class["cat"] == -1.0 and r.per_class["zebra"] == -1.0
    assert r.per_class["dog"] == pytest.approx(1.0)
    assert r.stats["AP"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_detections_give_zeros(gt, backend):
    r = evaluate_coco(gt, [], backend=backend, verbose=False)
    assert list(r.stats) == list(STAT_KEYS)
    assert r.stats == {k: 0.0 for k in STAT_KEYS}  # every area range has gt in this fixture
    assert r.per_class == {"cat": 0.0, "dog": 0.0, "zebra": 0.0}
    assert r.precision.shape == (10, 101, 3, 4, 3)
    assert r.num_detections == 0
    assert r.to_json_dict()["AP"] == 0.0


def test_detections_only_outside_subset_count_as_empty(gt):
    dets = [d for d in _perfect(gt) if d["image_id"] == 1]
    r = evaluate_coco(gt, dets, backend="pycocotools", image_ids=[2, 3], verbose=False)
    assert r.num_detections == 0
    assert r.stats["AP"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_image_or_category_raises(gt, backend):
    good = _perfect(gt)
    with pytest.raises(ValueError, match="unknown image ids \\[999\\]"):
        evaluate_coco(gt, good + [{"image_id": 999, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 0.5}],
                      backend=backend, verbose=False)
    with pytest.raises(ValueError, match="unknown category ids \\[3\\]"):
        evaluate_coco(gt, good + [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}],
                      backend=backend, verbose=False)
    with pytest.raises(ValueError, match="absent from the ground truth"):
        evaluate_coco(gt, good, backend=backend, image_ids=[1, 12345], verbose=False)
    with pytest.raises(ValueError, match="not a COCO bbox result"):
        evaluate_coco(gt, [{"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}], backend=backend, verbose=False)


def test_unknown_backend_raises(gt):
    with pytest.raises(ValueError, match="backend"):
        evaluate_coco(gt, [], backend="detectron", verbose=False)


def test_inputs_not_mutated_and_numpy_ids_accepted(gt):
    gt_before = copy.deepcopy(gt)
    dets = _randomish(gt, 6)
    dets_np = [dict(d, image_id=np.int64(d["image_id"]), category_id=np.int32(d["category_id"]),
                    bbox=np.asarray(d["bbox"], dtype=np.float32), score=np.float32(d["score"]))
               for d in dets]
    keys_before = [set(d) for d in dets_np]
    for backend in BACKENDS:
        r_np = evaluate_coco(gt, dets_np, backend=backend, verbose=False)
        r = evaluate_coco(gt, dets, backend=backend, verbose=False)
        assert r_np.stats["AP"] == pytest.approx(r.stats["AP"], abs=1e-5)  # float32 boxes
    assert gt == gt_before
    assert [set(d) for d in dets_np] == keys_before  # loadRes adds keys to what it gets


def test_gt_from_path_and_missing_area(tmp_path, gt):
    no_area = copy.deepcopy(gt)
    for a in no_area["annotations"]:
        del a["area"], a["iscrowd"]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(no_area))
    dets = _randomish(gt, 7)
    from_file = evaluate_coco(path, dets, verbose=False)
    from_dict = evaluate_coco(gt, dets, verbose=False)
    assert from_file.stats == from_dict.stats  # fixture areas are w*h, the documented default


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ground_truth_box_with_id_0_is_matched(tmp_path, backend):
    """Both evaluators mark an unmatched box with id 0, so a ground-truth box whose id is 0 could never be matched;
    multibox numbers its private copy's boxes 1..n. Two objects (ids 0 and 7), each detected exactly: AP is 1.0
    (one true positive per object, no false positive), and the user's file is not changed."""
    gt = {"images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
          "annotations": [_ann(0, 1, 2, 10, 10, 100, 100), _ann(7, 2, 2, 20, 30, 50, 60)],
          "categories": CATS[:1]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    before = path.read_bytes()
    dets = [{"image_id": a["image_id"], "category_id": 2, "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    for source in (gt, path):
        r = evaluate_coco(source, dets, backend=backend, verbose=False)
        assert r.stats["AP"] == pytest.approx(1.0, abs=1e-12) and r.stats["AR100"] == pytest.approx(1.0, abs=1e-12)
    assert path.read_bytes() == before and [a["id"] for a in gt["annotations"]] == [0, 7]
    # the defect itself, in pycocotools run directly: the box with id 0 never counts as found
    raw, _, _ = _pycocotools_reference(gt, dets)
    assert raw[8] == pytest.approx(0.5, abs=1e-12)   # AR100: one of the two objects


def test_duplicate_annotation_ids_rejected(gt):
    bad = copy.deepcopy(gt)
    bad["annotations"][1]["id"] = bad["annotations"][0]["id"]
    with pytest.raises(ValueError, match="duplicate annotation ids"):
        evaluate_coco(bad, [], verbose=False)


# --------------------------------------------------------------------------- text and files


@pytest.mark.parametrize("backend", BACKENDS)
def test_summary_matches_pycocotools_printout_line_for_line(gt, backend):
    for dets in (_randomish(gt, 8), _perfect(gt)):
        r = evaluate_coco(gt, dets, backend=backend, verbose=False)
        _, printed, _ = _pycocotools_reference(gt, dets)
        assert len(printed) == 12
        assert r.summary.splitlines() == printed


def test_summary_minus_one_layout_matches_pycocotools():
    gt, dets = _one_gt_case([([0, 0, 100, 73], 0.9)])  # no small / medium gt -> -1.000 lines
    r = evaluate_coco(gt, dets, verbose=False)
    _, printed, _ = _pycocotools_reference(gt, dets)
    assert r.summary.splitlines() == printed
    assert "-1.000" in r.summary
    assert format_summary(r.stats) == r.summary


def test_verbose_prints_summary_and_quiet_prints_nothing(gt, capsys):
    dets = _randomish(gt, 9)
    for backend in BACKENDS:
        r = evaluate_coco(gt, dets, backend=backend, verbose=False)
        out = capsys.readouterr()
        assert out.out == "" and out.err == ""
        evaluate_coco(gt, dets, backend=backend, verbose=True)
        out = capsys.readouterr().out
        assert r.summary in out
        assert out.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 1


def test_write_eval_json(tmp_path, gt):
    r = evaluate_coco(gt, _randomish(gt, 10), verbose=False)
    path = write_eval_json(tmp_path / "sub" / "eval.json", r, extra={"VOC07_mAP": 0.5})
    data = json.loads(path.read_text())
    assert list(data) == [*STAT_KEYS, "per_class", "VOC07_mAP"]
    assert data["AP"] == r.stats["AP"]
    assert data["per_class"] == r.per_class
    assert data["VOC07_mAP"] == 0.5
    assert all(0.0 <= data[k] <= 1.0 for k in STAT_KEYS)
    assert not list((tmp_path / "sub").glob("*.tmp"))
    with pytest.raises(ValueError, match="clash"):
        write_eval_json(tmp_path / "eval2.json", r, extra={"AP": 1.0})


def test_format_per_class_table():
    table = format_per_class_table({"cat": 0.51234, "traffic light": 0.0, "zebra": -1.0})
    lines = table.splitlines()
    assert len(lines) == 5  # header, rule, 3 rows
    assert lines[2].startswith("cat ") and lines[2].endswith("0.512")
    assert lines[3].startswith("traffic light") and lines[3].endswith("0.000")
    assert lines[4].startswith("zebra") and lines[4].endswith("n/a")
    assert len({line.index("|") for line in lines if "|" in line}) == 1  # columns aligned
