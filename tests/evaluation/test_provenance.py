"""What eval.json records about an evaluation (multibox.evaluation.provenance): the data actually evaluated, and
the names that keep one evaluation from replacing another."""
from __future__ import annotations

import json

import pytest

from multibox.config import load_config
from multibox.data.build import build_splits
from multibox.data.synth import generate_synthetic_coco
from multibox.errors import InputError
from multibox.evaluation.provenance import (check_replaceable, data_record, eval_destination,
                                            evaluation_data_key)


@pytest.fixture(scope="module")
def ann(tmp_path_factory):
    return generate_synthetic_coco(tmp_path_factory.mktemp("prov") / "data", num_images=10, seed=6, max_side=256)


def test_a_held_out_split_is_recorded_as_such(ann):
    cfg = load_config("tiny", [f"data.path={ann}", "data.val_fraction=0.3", "train.seed=4"])
    record = data_record(cfg, build_splits(cfg))
    assert record["source"] == str(ann.resolve()) and record["kind"] == "coco"
    assert record["images"] == 3 and record["split"] == "held out: 0.3 of the images (seed 4)"
    whole = load_config("tiny", [f"data.path={ann}", f"data.val_path={ann}"])
    other = data_record(whole, build_splits(whole))
    assert other["images"] == 10 and other["split"] == "every image"
    assert other["id"] != record["id"]      # the same file, other images: another evaluation


def test_the_data_key_follows_what_is_evaluated_only(ann, monkeypatch):
    base = evaluation_data_key(load_config("tiny", ["data.path=x.json", f"data.val_path={ann}"]))
    # with a validation source the training source does not matter; the path's spelling neither
    monkeypatch.chdir(ann.parent)
    assert evaluation_data_key(load_config("tiny", ["data.path=y.json", f"data.val_path={ann.name}"])) == base
    assert evaluation_data_key(load_config("tiny", ["data.path=y.json", f"data.val_path={ann.name}",
                                                    "data.keep_difficult=true"])) != base
    # data.keep_empty filters the training split only: the same images are evaluated
    assert evaluation_data_key(load_config("tiny", ["data.path=y.json", f"data.val_path={ann.name}",
                                                    "data.keep_empty=false"])) == base
    held = [f"data.path={ann}", "data.val_fraction=0.2"]
    assert evaluation_data_key(load_config("tiny", held)) != evaluation_data_key(load_config("tiny", held + [
        "train.seed=9"]))                    # another seed holds out other images


def _body(checkpoint: str, data_id: str) -> dict:
    return {"AP": 0.5, "checkpoint": {"path": checkpoint}, "data": {"id": data_id, "source": "/d.json",
                                                                   "split": "every image"}}


def test_replacing_is_for_the_same_checkpoint_and_data_only(tmp_path):
    path = tmp_path / "eval.json"
    check_replaceable(path, _body("/a.pt", "1"))                 # nothing there
    path.write_text(json.dumps({"AP": 0.5, "checkpoint": "best.pt"}))
    check_replaceable(path, _body("/a.pt", "1"))                 # written before eval.json said what it evaluated
    path.write_text(json.dumps(_body("best.pt", "1")))           # a run's own record: relative to its folder
    check_replaceable(path, _body(str(tmp_path / "best.pt"), "1"))
    with pytest.raises(InputError, match="holds the evaluation of .*best.pt on /d.json \\(every image\\)"):
        check_replaceable(path, _body(str(tmp_path / "best.pt"), "2"))
    with pytest.raises(InputError):
        check_replaceable(path, _body(str(tmp_path / "epoch_3.pt"), "1"))


def test_names_beside_the_checkpoint(tmp_path):
    record = {"source": "/data/coco/instances_val2017.json", "kind": "coco", "id": "89abcdef"}
    best = tmp_path / "best.pt"
    assert eval_destination(tmp_path, best, True, record) == (tmp_path / "eval.json", tmp_path)
    other = tmp_path / "eval-instances_val2017-89abcdef"
    assert eval_destination(tmp_path, best, False, record) == (other.with_suffix(".json"), other)
    voc = {"source": "/data/VOCdevkit/VOC2007", "kind": "voc", "voc_split": "test", "id": "01234567"}
    assert eval_destination(tmp_path, best, False, voc)[0].name == "eval-VOC2007-test-01234567.json"
    (tmp_path / "eval.json").write_text(json.dumps(_body("best.pt", "1")))
    assert eval_destination(tmp_path, best, True, record)[0] == tmp_path / "eval.json"
    second = tmp_path / "epoch_2.pt"
    assert eval_destination(tmp_path, second, True, record) == (tmp_path / "eval-epoch_2.json",
                                                                tmp_path / "eval-epoch_2")
