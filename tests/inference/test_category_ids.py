"""Category ids round trip: a model predicts labels 1..C, every COCO results file names the data's own
``category_id`` (SPEC §4), which the checkpoint and the ONNX export store.

References: the ground truth's own ids and names, pycocotools scoring ``detections.json`` against the ground-truth
file (which must give ``multibox eval``'s AP), torchvision's labels (its COCO detector's labels are COCO ids), and
the COCO 2017 id of a class name ("stop sign" is id 13).
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import multibox
from multibox.checkpoint import load_checkpoint, save_checkpoint
from multibox.cli import main
from multibox.config import load_config
from multibox.data.categories import CategoryIdsError
from multibox.models import build_model

# Non-contiguous ids, unsorted in the file: labels follow the sorted ids (10 -> 1, 13 -> 2, 16 -> 3).
CATEGORIES = [{"id": 16, "name": "blue"}, {"id": 10, "name": "red"}, {"id": 13, "name": "green"}]
COLOURS = {10: (230, 30, 30), 13: (30, 220, 30), 16: (30, 30, 230)}
TRAIN = ["model.widths=[16, 32, 48, 64, 64, 64, 64, 64]", "data.crop_rule=none", "data.flip_p=0",
         "data.jitter=[0, 0, 0]", "data.num_workers=0", "train.epochs=20", "train.batch_size=3", "train.lr=0.005",
         "train.lr_init=0.0005", "train.warmup_epochs=3", "train.weight_decay=0", "train.log_every=10",
         "train.checkpoint_every=0", "train.threads=1", "eval.score_threshold=0.05", "eval.batch_size=16"]


def _coco_with_ids(root: Path, num_images: int = 6, size: int = 96) -> Path:
    """``num_images`` PNGs with one or two solid rectangles each on a dark noisy background; the rectangle's colour
    is its class. Every class appears."""
    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    ids = [c["id"] for c in CATEGORIES]
    for i in range(num_images):
        pixels = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
        for k in range(1 + i % 2):
            cid = ids[(i + k) % 3]
            w, h = int(rng.integers(28, 44)), int(rng.integers(28, 44))
            x, y = (4, 4) if k == 0 else (size - w - 4, size - h - 4)
            pixels[y:y + h, x:x + w] = COLOURS[cid]
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": cid,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        Image.fromarray(pixels).save(root / "images" / f"img_{i}.png")
        images.append({"id": 100 + i, "file_name": f"img_{i}.png", "width": size, "height": size})
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ids")
    ann = _coco_with_ids(root / "data")
    args = ["train", "--data", str(ann), "--val-data", str(ann), "--out", str(root / "run"), "--no-progress"]
    for item in TRAIN:
        args += ["--set", item]
    assert main(args) == 0
    return ann, root / "run"


def _pycocotools_ap(ann: Path, detections: list[dict]) -> float:
    """stats[0] of pycocotools' own COCOeval of ``detections`` (image_id: the file name) against the file ``ann``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        id_of = {img["file_name"]: img["id"] for img in gt.dataset["images"]}
        dt = gt.loadRes([{**d, "image_id": id_of[d["image_id"]]} for d in detections])
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def _predict(checkpoint: Path, images: Path, out: Path, score: float) -> list[dict]:
    assert main(["predict", "--checkpoint", str(checkpoint), str(images), "--out", str(out), "--score", str(score),
                 "--batch-size", "16", "--no-draw", "--no-progress", "--device", "cpu"]) == 0
    return json.loads((out / "detections.json").read_text())


@pytest.mark.slow
def test_training_stores_the_datas_category_ids(trained):
    _, run = trained
    for name in ("best.pt", "last.pt"):
        payload = load_checkpoint(run / name)
        assert payload["class_names"] == ["background", "red", "green", "blue"]
        assert payload["category_ids"] == [10, 13, 16]


@pytest.mark.slow
def test_predict_writes_the_datas_ids_and_scores_as_multibox_eval(trained, tmp_path):
    """detections.json names only the data's ids, each with its own name; scored by pycocotools against the
    ground-truth file it gives the AP of ``multibox eval`` (same threshold, same batches)."""
    ann, run = trained
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "eval"), "--device", "cpu",
                 "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    score = load_checkpoint(run / "best.pt")["config"]["eval"]["score_threshold"]
    detections = _predict(run / "best.pt", ann.parent / "images", tmp_path / "pred", score)
    name_of = {c["id"]: c["name"] for c in CATEGORIES}
    assert {d["category_id"] for d in detections} <= set(name_of)
    assert len({d["category_id"] for d in detections}) >= 2
    assert all(name_of[d["category_id"]] == d["category_name"] for d in detections)
    assert evaluated["AP50"] > 0.1, evaluated   # a model that finds the rectangles: the ids matter to its AP
    assert _pycocotools_ap(ann, detections) == pytest.approx(evaluated["AP"], abs=1e-6)


@pytest.mark.slow
def test_onnx_export_carries_the_category_ids(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    ann, run = trained
    model = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--format", "onnx", "--out", str(model)]) == 0
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert json.loads(meta["multibox.category_ids"]) == [10, 13, 16]
    assert multibox.load(model).category_ids == [10, 13, 16]
    detections = _predict(model, ann.parent / "images", tmp_path / "pred", 0.3)
    name_of = {c["id"]: c["name"] for c in CATEGORIES}
    assert detections and {d["category_id"] for d in detections} <= set(name_of)
    assert all(name_of[d["category_id"]] == d["category_name"] for d in detections)


def _one_class_model(num_classes: int, label: int):
    """A tiny SSD whose every default box scores ``label`` (and nothing else) with certainty."""
    cfg = load_config("tiny", [f"model.num_classes={num_classes}", "eval.score_threshold=0.5",
                               "eval.max_per_image=5"])
    torch.manual_seed(0)
    model = build_model(cfg, load_backbone_weights=False).eval()
    with torch.no_grad():
        for head in model.cls_heads:
            head.weight.zero_()
            head.bias.fill_(-12.0)
            head.bias.view(-1, num_classes + 1)[:, label] = 12.0
    return cfg, model


def _image(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((64, 80, 3), 90, np.uint8)).save(folder / "a.png")
    return folder


def test_a_checkpoint_without_ids_with_cocos_80_classes_writes_coco_ids(tmp_path):
    """A checkpoint written before ids were stored, with COCO's 80 names in id order (the MindSpore tutorial's
    import, a COCO 2017 run): label 12 is "stop sign", COCO id 13."""
    from multibox.interop.mindspore import TUTORIAL_CLASS_NAMES

    cfg, model = _one_class_model(80, 12)
    path = tmp_path / "old.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "class_names": TUTORIAL_CLASS_NAMES}, path)
    detections = _predict(path, _image(tmp_path), tmp_path / "out", 0.5)
    assert detections and {(d["category_id"], d["category_name"]) for d in detections} == {(13, "stop sign")}


def test_a_checkpoint_without_ids_of_other_classes_writes_its_labels(tmp_path):
    cfg, model = _one_class_model(3, 2)
    path = tmp_path / "old.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(),
                     "class_names": ["background", "a", "b", "c"]}, path)
    detections = _predict(path, _image(tmp_path), tmp_path / "out", 0.5)
    assert detections and {(d["category_id"], d["category_name"]) for d in detections} == {(2, "b")}


def test_stored_ids_are_written_and_checked(tmp_path, capsys):
    cfg, model = _one_class_model(3, 2)
    path = tmp_path / "model.pt"
    payload = {"model": model.state_dict(), "config": cfg.to_dict(), "class_names": ["background", "a", "b", "c"],
               "category_ids": [7, 70, 700]}
    save_checkpoint(payload, path)
    detections = _predict(path, _image(tmp_path), tmp_path / "out", 0.5)
    assert detections and {(d["category_id"], d["category_name"]) for d in detections} == {(70, "b")}
    save_checkpoint({**payload, "category_ids": [7, 70]}, path)
    with pytest.raises(CategoryIdsError, match=rf"^{path}: 2 category_ids for 3 classes$"):
        multibox.load(path, device="cpu")
    assert main(["predict", "--checkpoint", str(path), str(tmp_path / "in"), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: 2 category_ids")


@pytest.mark.slow
def test_an_imported_torchvision_detector_writes_torchvisions_coco_ids(tmp_path):
    """torchvision's COCO detector labels are COCO category ids (91 slots): the import's detections.json has
    exactly torchvision's labels as category ids, in score order."""
    from torchvision.models.detection import ssd300_vgg16

    torch.manual_seed(0)
    tv = ssd300_vgg16(weights=None, weights_backbone=None).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    assert main(["import-weights", "--from", "torchvision", str(tmp_path / "tv.pth"), "--out",
                 str(tmp_path / "ckpt.pt")]) == 0
    assert load_checkpoint(tmp_path / "ckpt.pt")["category_ids"] == list(range(1, 91))
    g = torch.Generator().manual_seed(3)
    coarse = torch.rand(1, 3, 12, 16, generator=g) * 255
    image = torch.nn.functional.interpolate(coarse, size=(120, 160), mode="bilinear").round().byte()[0]
    (tmp_path / "in").mkdir()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "in" / "a.png")
    with torch.no_grad():
        ref = tv([image.float() / 255])[0]
    assert len(ref["labels"]) > 20
    detections = _predict(tmp_path / "ckpt.pt", tmp_path / "in", tmp_path / "out", 0.01)
    assert len(detections) == len(ref["labels"])
    ids = torch.tensor([d["category_id"] for d in detections])
    scores = torch.tensor([d["score"] for d in detections])
    ltwh = torch.tensor([d["bbox"] for d in detections])
    boxes = torch.cat([ltwh[:, :2], ltwh[:, :2] + ltwh[:, 2:]], 1)
    used = torch.zeros(len(detections), dtype=torch.bool)
    cap_tie = float(ref["scores"].min()) + 3e-5   # near-equal scores at the per-image cap may fall either way
    for box, score, label in zip(ref["boxes"], ref["scores"], ref["labels"]):
        same = ~used & (ids == label) & ((scores - score).abs() < 3e-5) & ((boxes - box).abs().amax(1) < 5e-3)
        if same.any():
            used[same.nonzero()[0]] = True
        else:
            assert score <= cap_tie, f"torchvision's label {int(label)} (score {float(score)}) not written"
    assert int(used.sum()) > 20
    names = load_checkpoint(tmp_path / "ckpt.pt")["class_names"]
    assert all(names[d["category_id"]] == d["category_name"] for d in detections)


def test_predict_classes_take_the_category_ids_detections_json_writes():
    from multibox.errors import InputError
    from multibox.inference.predict import parse_classes

    names = ["background", "square", "circle", "star"]
    assert parse_classes(["13", "star"], names, [10, 13, 16]) == {2, 3}
    assert parse_classes(["2"], names, None) == {2}                  # no stored ids: the labels themselves
    with pytest.raises(InputError, match="circle \\(13\\)"):
        parse_classes(["2"], names, [10, 13, 16])                     # 2 is a label, not one of the data's ids
