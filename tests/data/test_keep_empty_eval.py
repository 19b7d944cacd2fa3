"""``data.keep_empty: false`` leaves the images without boxes out of training only: the evaluation split keeps them,
so a false positive on an empty image still costs AP (hand-computed, and pycocotools on the whole ground-truth
file), and a held-out split holds the same images whatever keep_empty is."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from multibox.config import load_config
from multibox.data.build import build_splits
from multibox.evaluation.coco import evaluate_coco

BOX = [10.0, 12.0, 30.0, 20.0]   # ltwh


def _coco(root, boxes_per_image: dict[int, list]) -> str:
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for image_id, boxes in boxes_per_image.items():
        Image.fromarray(np.full((48, 64, 3), 40 * image_id % 256, np.uint8)).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 48})
        for box in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return str(path)


def _pycocotools_ap(ann: str, detections: list[dict]) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann)
        ev = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


@pytest.mark.parametrize("keep_empty", ["true", "false"])
def test_the_evaluation_split_keeps_its_empty_images(tmp_path, keep_empty):
    ann = _coco(tmp_path, {1: [BOX], 2: [], 3: [BOX]})   # image 2 has no object
    cfg = load_config("tiny", [f"data.path={ann}", f"data.val_path={ann}", f"data.keep_empty={keep_empty}"])
    splits = build_splits(cfg)
    assert len(splits.train) == (3 if keep_empty == "true" else 2)
    assert len(splits.val) == 3 and splits.val_image_ids == [1, 2, 3]
    assert [img["id"] for img in splits.val_gt["images"]] == [1, 2, 3]
    # Both objects found exactly, and a false positive on the empty image ranked first: precision 0, 1/2, 2/3 at
    # recall 0, 1/2, 1, whose interpolated envelope is 2/3 at every recall and IoU threshold -> AP = 2/3 (it would
    # be 1.0 if the empty image were not evaluated).
    detections = [{"image_id": 2, "category_id": 1, "bbox": BOX, "score": 0.95},
                  {"image_id": 1, "category_id": 1, "bbox": BOX, "score": 0.9},
                  {"image_id": 3, "category_id": 1, "bbox": BOX, "score": 0.8}]
    result = evaluate_coco(splits.val_gt, detections, image_ids=splits.val_image_ids, verbose=False)
    assert result.stats["AP"] == pytest.approx(2 / 3, abs=1e-12)
    assert result.stats["AP"] == pytest.approx(_pycocotools_ap(ann, detections), abs=1e-12)


def test_a_held_out_split_is_the_same_whatever_keep_empty_is(tmp_path):
    ann = _coco(tmp_path, {i: ([BOX] if i % 3 else []) for i in range(1, 13)})   # 4 of 12 images empty
    held = [f"data.path={ann}", "data.val_fraction=0.5"]
    kept = build_splits(load_config("tiny", held))
    dropped = build_splits(load_config("tiny", held + ["data.keep_empty=false"]))
    assert dropped.val_image_ids == kept.val_image_ids and len(kept.val_image_ids) == 6
    assert any(i % 3 == 0 for i in dropped.val_image_ids), "degenerate split: no empty image held out"
    def boxes(split):   # annotated boxes of each training image (the samples themselves are augmented)
        return {split.train.dataset.image_ids[i]: split.train.dataset.records[i].num_boxes for i in split.train.indices}

    empty_in_train = [i for i, n in boxes(kept).items() if n == 0]
    assert empty_in_train and boxes(dropped) == {i: n for i, n in boxes(kept).items() if n}
    assert dropped.load_report["train"]["empty_images_dropped"] == len(empty_in_train)
