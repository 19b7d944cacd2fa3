"""Pascal VOC reader: box convention, difficult handling, class lists, safe XML, splits through build_splits."""
from __future__ import annotations

import pytest
import torch

from _data_builders import make_voc
from multibox.config import load_config
from multibox.data.build import build_splits, source_kind
from multibox.data.voc import VOC_CLASSES, VOCDetection, VocXmlError, parse_voc_xml
from multibox.evaluation.coco import evaluate_coco
from multibox.evaluation.voc import evaluate_voc

OBJECTS = {
    "000005": [("dog", 2, 3, 20, 30, 0), ("person", 25, 5, 50, 25, 1)],
    "000007": [("car", 5, 5, 30, 20, 0)],
    "000009": [],
    "000012": [("dog", 10, 10, 40, 35, 0), ("car", 1, 1, 10, 10, 0)],
}
SPLITS = {"trainval": ["000005", "000007", "000009"], "test": ["000012"]}


@pytest.fixture()
def voc(tmp_path):
    return make_voc(tmp_path, OBJECTS, SPLITS)


def test_boxes_labels_difficult_and_ids(voc):
    ds = VOCDetection(voc.parent.parent / "VOCdevkit", split="trainval")   # a VOCdevkit with one year works too
    assert ds.class_names == ["background", *VOC_CLASSES] and ds.source_kind == "voc"
    assert ds.image_ids == [5, 7, 9]
    r = ds.records[0]
    # 1-based inclusive [2, 20] -> continuous [1, 20]: left 1, width 19
    assert r.bbox_ltwh.tolist() == [[1.0, 2.0, 19.0, 28.0], [24.0, 4.0, 26.0, 21.0]]
    assert r.crowd.tolist() == [False, True]
    image, target = ds[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.uint8
    assert target["boxes"].tolist() == [[1.0, 2.0, 20.0, 30.0]]   # difficult left out of training
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog") + 1]
    keep = VOCDetection(voc, split="trainval", keep_difficult=True)
    assert keep[0][1]["labels"].tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1]
    gt = ds.coco_gt()
    assert [(a["iscrowd"], a["difficult"]) for a in gt["annotations"]] == [(0, 0), (1, 1), (0, 0)]
    assert gt["annotations"][0]["area"] == 19 * 28 == (20 - 2 + 1) * (30 - 3 + 1)   # devkit area
    assert ds[2][1]["boxes"].shape == (0, 4)   # image without objects kept as background
    assert len(VOCDetection(voc, split="trainval", keep_empty=False)) == 2


def test_custom_classes_and_unsafe_xml(voc, tmp_path):
    custom = make_voc(tmp_path / "custom", {"a_1": [("widget", 1, 1, 9, 9, 0)], "a_2": [("gadget", 3, 3, 9, 9, 0)]},
                      {"trainval": ["a_1", "a_2"]})
    ds = VOCDetection(custom, split="trainval")
    assert ds.class_names == ["background", "gadget", "widget"]
    assert ds.image_ids == [1, 2]   # non-numeric VOC ids: position in the split
    bomb = voc / "Annotations" / "bomb.xml"
    bomb.write_text('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
                    "<annotation><filename>&lol2;</filename></annotation>")
    with pytest.raises(VocXmlError, match="bomb.xml"):
        parse_voc_xml(bomb)
    (voc / "ImageSets" / "Main" / "withbomb.txt").write_text("000005\nbomb\n")
    ds = VOCDetection(voc, split="withbomb")
    assert len(ds) == 1 and ds.load_report["unreadable_xml_images_dropped"] == 1


def test_build_splits_uses_voc_splits_and_evaluates_both_ways(voc):
    cfg = load_config("tiny", ["data.num_workers=0"])
    cfg.data.path = str(voc)
    assert source_kind(cfg.data.path) == "voc"
    splits = build_splits(cfg)
    assert len(splits.train) == 3 and len(splits.val) == 1 and splits.val_image_ids == [12]
    assert splits.val_source_kind == "voc"
    # perfect detections (in the dataset's continuous frame) score 1.0 under both protocols
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in splits.val_gt["annotations"]]
    coco = evaluate_coco(splits.val_gt, dets, image_ids=splits.val_image_ids, verbose=False)
    voc_metrics = evaluate_voc(splits.val_gt, dets, image_ids=splits.val_image_ids)
    assert coco.stats["AP50"] == pytest.approx(1.0) and voc_metrics["VOC_mAP"] == pytest.approx(1.0)
    # no test split: a held-out part of trainval
    cfg.data.val_split = "nonexistent"
    splits = build_splits(cfg)
    assert len(splits.train) + len(splits.val) == 3
