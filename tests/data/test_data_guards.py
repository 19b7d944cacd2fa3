"""The data layer's guards and reports (issue 13): no training on zero usable images, one ``data policy`` line per
source file with example ids, ``convert`` naming what it left out (exit status 3), and ``check-data`` reporting
on shards what the training reader does to their boxes (one rule: ``multibox.data.policy.classify_boxes``)."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _data_builders import make_clean_coco, make_voc, picture
from multibox.cli import main
from multibox.config import load_config
from multibox.data.build import build_splits
from multibox.data.coco import CocoDetection, ImageRecord, training_target
from multibox.data.policy import BOX_CLIPPED, LoadReport, classify_boxes
from multibox.data.shards import ShardDataset, convert_source
from multibox.data.validate import check_dataset
from multibox.errors import InputError

CATS = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]


def _coco(root: Path, boxes: dict[int, list[tuple]], missing: tuple[int, ...] = (), extra: dict | None = None
          ) -> Path:
    """``root/annotations.json`` + ``root/images``: image id -> [(annotation id, [l, t, w, h], category id)],
    60x40 images (those in ``missing`` not written)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for image_id, items in boxes.items():
        name = f"im{image_id}.jpg"
        images.append({"id": image_id, "file_name": name, "width": 60, "height": 40})
        if image_id not in missing:
            Image.fromarray(picture(40, 60, image_id, [(5, 5, 30, 30)])).save(root / "images" / name)
        anns += [{"id": a, "image_id": image_id, "category_id": c, "bbox": b, "area": 10.0, "iscrowd": 0}
                 for a, b, c in items]
    coco = {"images": images, "annotations": anns, "categories": CATS}
    for key, more in (extra or {}).items():
        coco[key] = coco[key] + more
    path = root / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def _cfg(path, *overrides: str):
    return load_config("tiny", [f"data.path={path}", "data.num_workers=0", *overrides])


def _policy_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("data policy")]


# --------------------------------------------------------------------------- 1. no training on zero usable images


def test_annotations_moved_away_from_their_images_is_one_error(tmp_path, caplog):
    ann = make_clean_coco(tmp_path / "set", num_images=6)
    moved = tmp_path / "elsewhere" / "annotations.json"
    moved.parent.mkdir()
    shutil.move(ann, moved)
    with caplog.at_level(logging.INFO, logger="multibox"), pytest.raises(InputError) as err:
        build_splits(_cfg(moved))
    message = str(err.value)
    assert "\n" not in message
    assert re.match(rf"{moved}: none of the 5 training images was found \(e.g. 'img_00\d.jpg', 'img_00\d.jpg', "
                    r"'img_00\d.jpg', \.\.\.; ", message), message
    assert f"looked under {moved.parent}, {moved.parent / 'images'}" in message and "data.image_root" in message
    assert not [r for r in caplog.records if "skipping" in r.getMessage()]   # no line per image


def test_train_on_moved_annotations_stops_before_training(tmp_path, capsys):
    ann = make_clean_coco(tmp_path / "set", num_images=4)
    moved = tmp_path / "moved.json"
    shutil.move(ann, moved)
    out = tmp_path / "run"
    assert main(["train", "--data", str(moved), "--out", str(out), "--no-progress", "--set", "data.num_workers=0",
                 "--set", "train.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {moved}: none of the ") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("num_images, fraction", [(1, 0.1), (2, 0.75)])
def test_a_held_out_split_that_takes_every_image_is_refused(tmp_path, num_images, fraction):
    ann = make_clean_coco(tmp_path / "set", num_images=num_images)
    with pytest.raises(InputError, match=rf"^{ann}: no images for training: all {num_images} of its images went to "
                                         rf"the held-out evaluation split \(data.val_fraction = {fraction:g}, "):
        build_splits(_cfg(ann, f"data.val_fraction={fraction}"))


def test_an_evaluation_set_without_usable_images_is_refused(tmp_path):
    train = _coco(tmp_path / "train", {1: [(1, [5, 5, 10, 10], 1)], 2: []})
    val = _coco(tmp_path / "val", {1: [(1, [5, 5, 10, 10], 1)], 2: []}, missing=(1, 2))
    with pytest.raises(InputError, match=rf"^{val}: none of the 2 evaluation images was found \(e.g. 'im1.jpg', "
                                         r"'im2.jpg'; looked under "):
        build_splits(_cfg(train, f"data.val_path={val}"))
    (tmp_path / "none").mkdir()
    nothing = tmp_path / "none" / "annotations.json"
    nothing.write_text(json.dumps({"images": [], "annotations": [], "categories": CATS}))
    with pytest.raises(InputError, match=rf"^{nothing}: no images for evaluation: the source lists none$"):
        build_splits(_cfg(train, f"data.val_path={nothing}"))


def test_empty_images_train_but_keep_empty_false_can_leave_none(tmp_path):
    ann = _coco(tmp_path, {1: [], 2: [], 3: [(1, [5, 5, 0, 10], 1)]})   # no box, no box, a zero-width box
    splits = build_splits(_cfg(ann, f"data.val_path={ann}"))   # background images are training data
    assert len(splits.train) == 3 and splits.train[0] is not None
    with pytest.raises(InputError, match=r"no images for training: all 3 of its images have no usable box and "
                                         r"data.keep_empty is false"):
        build_splits(_cfg(ann, f"data.val_path={ann}", "data.keep_empty=false"))


def test_some_missing_images_are_one_summary_warning(tmp_path, caplog):
    ann = _coco(tmp_path, {i: [(i, [5, 5, 20, 20], 1)] for i in range(1, 9)}, missing=(3, 5, 6, 8))
    with caplog.at_level(logging.INFO, logger="multibox"):
        splits = build_splits(_cfg(ann, f"data.val_path={ann}"))
        samples = [splits.train[i] for i in range(len(splits.train))]
    assert [s is None for s in samples] == [i in (3, 5, 6, 8) for i in range(1, 9)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{ann}: 4 of its 8 images not found (e.g. 'im3.jpg', 'im5.jpg', 'im6.jpg', ...; looked "
                        f"under {ann.parent}, {ann.parent / 'images'}): skipped in training and evaluation; "
                        f"`multibox check-data {ann}` lists every problem"]


# --------------------------------------------------------------------------- 2. one report per source file


def _policy_set(root: Path) -> Path:
    return _coco(root, {1: [(4, [50, 5, 20, 10], 1), (5, [10, 10, 0, 5], 2), (6, [5, 5, 10, 10], 1)],
                        2: [(9, [-3, 2, 10, 10], 2), (17, [1, 30, 10, 20], 1)], 3: [(20, [2, 2, 9, 9], 2)]})


def test_data_policy_is_one_line_per_source_file_with_ids(tmp_path, caplog):
    ann = _policy_set(tmp_path / "train")
    expected = f"data policy ({ann}): 3 boxes clipped (annotation ids 4, 9, 17), 1 degenerate box dropped (annotation id 5)"
    for setting in ([], [f"data.val_path={ann}"]):   # a held-out split, or the same file evaluated
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="multibox"):
            splits = build_splits(_cfg(ann, *setting))
        assert _policy_lines(caplog) == [expected]
        assert splits.load_report == {"train": {"boxes_clipped": 3, "degenerate_boxes_dropped": 1}}
    val = _coco(tmp_path / "val", {7: [(30, [55, 1, 9, 9], 1)], 8: []})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="multibox"):
        splits = build_splits(_cfg(ann, f"data.val_path={val}"))
    assert _policy_lines(caplog) == [expected, f"data policy ({val}): 1 box clipped (annotation id 30), "
                                               "1 image without boxes (image id 8)"]
    assert splits.load_report["val"] == {"boxes_clipped": 1, "images_without_boxes": 1}
    assert all(type(v) is int for counts in splits.load_report.values() for v in counts.values())


def test_voc_reports_name_objects_as_check_data_does(tmp_path, caplog):
    voc = make_voc(tmp_path, {"000001": [("dog", 1, 1, 20, 20, 0), ("cat", 30, 5, 80, 30, 0)],   # 60x40: clipped
                              "000002": [("dog", 5, 5, 30, 20, 0)]}, {"trainval": ["000001", "000002"]})
    with caplog.at_level(logging.INFO, logger="multibox"):
        build_splits(_cfg(voc, f"data.val_path={voc}"))
    assert _policy_lines(caplog) == [f"data policy ({voc} (trainval split)): 1 box clipped (object 000001#1)"]
    (hit,) = check_dataset(voc, workers=1).by_kind("out_of_image_box")
    assert hit.ann_id == "000001#1"
    for stem in ("000001", "000002"):
        (voc / "JPEGImages" / f"{stem}.jpg").unlink()
    with pytest.raises(InputError, match=rf"none of the 2 training images was found \(e.g. 'JPEGImages/000001.jpg', "
                                         rf"'JPEGImages/000002.jpg'; looked under {voc / 'JPEGImages'}\)$"):
        build_splits(_cfg(voc, f"data.val_path={voc}"))


def test_load_report_examples_are_capped_and_survive_pickling():
    import pickle

    report = LoadReport()
    report.note("annotations_unknown_category", [7, 8, 9, 10, 11])
    report.note("duplicate_image_ids", ["4 'a.jpg'"])
    assert report.describe() == ["1 duplicate image dropped (image id 4 'a.jpg')",
                                 "5 annotations with an unknown category_id dropped (annotation ids 7, 8, 9, ...)"]
    again = pickle.loads(pickle.dumps(report))
    assert again.describe() == report.describe() and dict(again) == dict(report)


# --------------------------------------------------------------------------- 3. convert names what it leaves out


def _dropping_set(root: Path) -> Path:
    return _coco(root, {1: [(1, [5, 5, 20, 20], 1), (7, [5, 5, 9, 9], 99)], 2: [(8, [1, 1, 9, 9], 42)]},
                 extra={"images": [{"id": 2, "file_name": "again.jpg", "width": 60, "height": 40}]})


def test_convert_warns_about_unknown_categories_and_duplicate_images(tmp_path, caplog):
    ann = _dropping_set(tmp_path / "src")
    with caplog.at_level(logging.INFO, logger="multibox"):
        manifest = convert_source(str(ann), str(tmp_path / "shards"), workers=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{ann}: 1 duplicate image dropped (image id 2 'again.jpg')",
                        f"{ann}: 2 annotations with an unknown category_id dropped (annotation ids 7, 8)"]
    assert [(d["kind"], d["count"], d["examples"]) for d in manifest["dropped"]] == [
        ("duplicate_image_ids", 1, ["2 'again.jpg'"]), ("annotations_unknown_category", 2, [7, 8])]


def test_convert_exit_status_and_summary(tmp_path, capsys):
    ann = _dropping_set(tmp_path / "src")
    assert main(["convert", str(ann), "--out", str(tmp_path / "a"), "--workers", "1"]) == 3
    out = capsys.readouterr().out
    assert "  left out: 1 duplicate image dropped (image id 2 'again.jpg')\n" in out
    assert "  left out: 2 annotations with an unknown category_id dropped (annotation ids 7, 8)\n" in out
    assert main(["convert", str(ann), "--out", str(tmp_path / "a"), "--workers", "1"]) == 3   # a rerun too
    assert "1 shards (0 written, 1 already done)" in capsys.readouterr().out
    clean = make_clean_coco(tmp_path / "clean", num_images=3)
    assert main(["convert", str(clean), "--out", str(tmp_path / "b"), "--workers", "1"]) == 0
    assert "left out" not in capsys.readouterr().out


# --------------------------------------------------------------------------- 4. check-data on shards = training


def test_check_data_on_shards_reports_the_boxes_training_drops(tmp_path):
    ann = _policy_set(tmp_path / "src")
    shards = tmp_path / "shards"
    convert_source(str(ann), str(shards), workers=1)
    box_kinds = ("zero_size_box", "negative_box", "out_of_image_box", "nan_box")

    def found(src):
        return sorted((p.kind, p.image_id, p.ann_id) for p in check_dataset(src, workers=1).problems
                      if p.kind in box_kinds)
    expected = [("out_of_image_box", 1, 4), ("out_of_image_box", 2, 9), ("out_of_image_box", 2, 17),
                ("zero_size_box", 1, 5)]
    assert found(ann) == expected
    assert found(shards) == expected
    ds = ShardDataset(shards)
    assert ds.load_report == CocoDetection(ann).load_report
    _, target = ds[0]
    assert target["boxes"].tolist() == [[50.0, 5.0, 60.0, 15.0], [5.0, 5.0, 15.0, 15.0]]   # 5 dropped, 4 clipped


def test_check_data_on_shards_lists_what_conversion_left_out(tmp_path, capsys):
    ann = _dropping_set(tmp_path / "src")
    (ann.parent / "images" / "im1.jpg").write_bytes(b"not an image")
    convert_source(str(ann), str(tmp_path / "shards"), workers=1)
    report = check_dataset(tmp_path / "shards", workers=1)
    left = [str(p) for p in report.by_kind("dropped_at_conversion")]
    assert len(left) == 3 and "[image 1]" in left[0] and "'im1.jpg' left out" in left[0]
    assert left[1].endswith("the source's 1 duplicate image dropped (image id 2 'again.jpg')")
    assert main(["check-data", str(tmp_path / "shards"), "--workers", "1"]) == 0   # warnings only
    out = capsys.readouterr().out
    assert "dropped_at_conversion    warning  3" in out and "no problems found" not in out


def test_training_and_check_data_share_one_box_rule():
    """Random boxes around a 30x20 image: training keeps exactly the boxes the rule keeps, clipped."""
    rng = np.random.default_rng(0)
    ltwh = np.round(rng.uniform(-15, 40, size=(400, 4)), 0)
    ltwh[::7, 2] = 0
    ltwh[::11, 3] *= -1
    ltwh[5, 0] = np.nan
    ltwh[6, 2] = np.inf
    n = len(ltwh)
    record = ImageRecord(1, "x.jpg", 30, 20, np.arange(n), ltwh, np.ones(n), np.ones(n, np.int64), np.zeros(n, bool))
    boxes, _ = training_target(record, {1: 1}, 30, 20)
    keep = classify_boxes(ltwh, 30, 20) <= BOX_CLIPPED
    assert 50 < keep.sum() < n - 50
    x1y1 = np.clip(ltwh[keep, :2], 0, [30, 20])
    x2y2 = np.clip(ltwh[keep, :2] + ltwh[keep, 2:], 0, [30, 20])
    assert torch.equal(boxes, torch.from_numpy(np.concatenate([x1y1, x2y2], 1).astype(np.float32)))
    assert ((boxes[:, 2:] > boxes[:, :2]).all())


# --------------------------------------------------------------------------- 5. check-data's verdict = training's


def test_check_data_refuses_what_training_refuses(tmp_path, capsys):
    ann = make_clean_coco(tmp_path / "set", num_images=3)
    moved = tmp_path / "moved.json"
    shutil.move(ann, moved)
    assert main(["check-data", str(moved), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"error: {moved}: no_usable_images: none of its 3 images can be read (looked under {tmp_path}, " in out
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": CATS}))
    assert main(["check-data", str(empty)]) == 1
    out = capsys.readouterr().out
    assert f"error: {empty}: no_usable_images: the set has no images (none listed, " in out and "1 errors" in out
