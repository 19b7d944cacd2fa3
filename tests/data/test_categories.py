"""The label -> category-id map (multibox.data.categories): COCO's 80 ids against torchvision's own table and the
MindSpore tutorial's class list, the stored ids checked, the fallback for models saved without them, and the
matching of a model's classes to the evaluated data's."""
from __future__ import annotations

import json

import pytest

from multibox.data.categories import (COCO_CATEGORIES, CategoryIdsError, category_ids_of, label_to_category_id,
                                      match_categories)
from multibox.data.coco import CocoDetection


def test_coco_table_is_torchvisions_and_the_tutorials():
    meta = pytest.importorskip("torchvision.models._meta")
    from multibox.interop.mindspore import TUTORIAL_CLASS_NAMES

    used = [(i, name) for i, name in enumerate(meta._COCO_CATEGORIES) if i and name != "N/A"]
    assert list(COCO_CATEGORIES) == used and len(used) == 80
    assert [name for _, name in COCO_CATEGORIES] == TUTORIAL_CLASS_NAMES[1:]


def test_stored_ids_are_checked_against_the_class_names():
    names = ["background", "a", "b", "c"]
    assert category_ids_of(names, [16, 10, 13]) == [16, 10, 13]
    for bad, match in [([1, 2], "2 category_ids for 3 classes"), ([1, 2, 2], "repeat an id"),
                       ([1, 2, "3"], "must be a list of integers"), ([1, 2, True], "must be a list of integers"),
                       ("123", "must be a list of integers")]:
        with pytest.raises(CategoryIdsError, match=rf"^ckpt.pt: .*{match}"):
            category_ids_of(names, bad, source="ckpt.pt")


def test_fallback_for_models_saved_without_ids():
    coco = ["background"] + [name for _, name in COCO_CATEGORIES]
    ids = category_ids_of(coco)
    assert label_to_category_id(ids)[12] == 13 and coco[12] == "stop sign"   # COCO 2017: "stop sign" is id 13
    assert ids[-1] == 90 and len(ids) == 80
    assert category_ids_of(["background", "x", "y"]) == [1, 2]
    tv_slots = ["background"] + [dict(COCO_CATEGORIES).get(i, "N/A") for i in range(1, 91)]
    assert category_ids_of(tv_slots) == list(range(1, 91))   # torchvision's 91 slots: label = COCO id


def test_dataset_labels_follow_sorted_ids(tmp_path):
    cats = [{"id": 16, "name": "blue"}, {"id": 10, "name": "red"}, {"id": 13, "name": "green"}]
    (tmp_path / "a.json").write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    ds = CocoDetection(tmp_path / "a.json")
    assert ds.class_names == ["background", "red", "green", "blue"]
    assert ds.label_to_category_id == {1: 10, 2: 13, 3: 16} == label_to_category_id([10, 13, 16])


def test_match_categories():
    data_names, data_map = ["background", "red", "green", "blue"], {1: 10, 2: 13, 3: 16}
    # the model of that data: its own map
    assert match_categories(data_names, [10, 13, 16], data_names, data_map) == data_map
    # the same classes trained under other ids (1, 2, 3), in another order: by name
    assert match_categories(["background", "blue", "red", "green"], [1, 2, 3], data_names, data_map) == \
        {1: 16, 2: 10, 3: 13}
    # more classes than the data: the others are not scored
    assert match_categories(["background", "red", "cat", "green", "blue"], [1, 2, 3, 4], data_names, data_map) == \
        {1: 10, 2: None, 3: 13, 4: 16}
    # a duplicated name is told apart by its id
    dup_names, dup_map = ["background", "car", "car"], {1: 3, 2: 7}
    assert match_categories(["background", "car", "car"], [7, 3], dup_names, dup_map) == {1: 7, 2: 3}
    with pytest.raises(ValueError, match=r"the data's classes \['blue'\] are not classes of the model"):
        match_categories(["background", "red", "green"], [10, 13], data_names, data_map)
