"""End to end on CPU: overfit a few synthetic images, then evaluate, predict and reload through the public API."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import multibox
from multibox.cli import main
from multibox.data.synth import generate_synthetic_coco

pytestmark = pytest.mark.slow   # trains the tiny preset to overfit (about a minute)

OVERFIT = [
    "model.widths=[16, 32, 48, 64, 64, 64, 64, 64]",
    "data.crop_rule=none", "data.flip_p=0", "data.jitter=[0, 0, 0]", "data.num_workers=0",
    "train.epochs=60", "train.batch_size=4", "train.lr=0.005", "train.lr_init=0.0005", "train.warmup_epochs=5",
    "train.weight_decay=0", "train.log_every=1", "train.checkpoint_every=30", "train.threads=2",
    "eval.score_threshold=0.05",
]


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("overfit")
    ann = generate_synthetic_coco(root / "data", num_images=4, seed=3)
    out = root / "run"
    args = ["train", "--data", str(ann), "--val-data", str(ann), "--out", str(out), "--no-progress"]
    for item in OVERFIT:
        args += ["--set", item]
    assert main(args) == 0
    return ann, out


def test_overfits_four_images(overfit_run):
    _, out = overfit_run
    result = json.loads((out / "eval.json").read_text())
    assert result["AP50"] >= 0.9, result
    assert result["AP"] >= 0.5, result
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < 0.2 * losses[0]
    for name in ("config.yaml", "last.pt", "best.pt", "epoch_30.pt", "curves.png"):
        assert (out / name).is_file(), name


def test_eval_command_reproduces_training_ap(overfit_run, tmp_path):
    _, out = overfit_run
    assert main(["eval", "--checkpoint", str(out / "best.pt"), "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    trained = json.loads((out / "eval.json").read_text())
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert again[key] == pytest.approx(trained[key], abs=1e-6)
    assert set(again["per_class"]) == set(trained["per_class"])


def test_predict_writes_detections_and_images(overfit_run, tmp_path):
    ann, out = overfit_run
    images = ann.parent / "images"
    assert main(["predict", "--checkpoint", str(out / "best.pt"), str(images), "--out", str(tmp_path),
                 "--no-progress"]) == 0
    detections = json.loads((tmp_path / "detections.json").read_text())
    names = {p.name for p in images.iterdir()}   # image_id: the path relative to the folder given
    assert {d["image_id"] for d in detections} <= names and all(d["file"] for d in detections)
    assert {p.name for p in (tmp_path / "images").iterdir()} == {f"{Path(name).stem}.png" for name in names}
    gt = json.loads(ann.read_text())
    categories = {c["id"]: c["name"] for c in gt["categories"]}
    for d in detections:
        assert len(d["bbox"]) == 4 and d["bbox"][2] >= 0 and d["bbox"][3] >= 0
        assert categories[d["category_id"]] == d["category_name"]


def test_load_predict_matches_ground_truth(overfit_run):
    ann, out = overfit_run
    detector = multibox.load(out / "best.pt", device="cpu")
    gt = json.loads(ann.read_text())
    first = gt["images"][0]
    result = detector.predict(ann.parent / "images" / first["file_name"])[0]
    boxes = [a["bbox"] for a in gt["annotations"] if a["image_id"] == first["id"]]
    gt_xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes])
    top = result["boxes"][result["scores"] > 0.5]
    from torchvision.ops import box_iou
    assert len(top) > 0
    # every ground-truth object is found by a confident detection
    assert (box_iou(gt_xyxy, top).max(dim=1).values > 0.5).all()


def test_dry_run_seed_preset_reports_parameters(tmp_path, capsys):
    ann = generate_synthetic_coco(tmp_path / "data", num_images=2, seed=5)
    # Batch 2: the tutorial's BatchNorm heads cannot train on a single 1x1 feature map.
    assert main(["train", "--config", "ssd300-vgg16-seed", "--data", str(ann), "--val-data", str(ann),
                 "--out", str(tmp_path / "run"), "--dry-run", "--set", "train.batch_size=2",
                 "--set", "data.num_workers=0"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["default_boxes"] == 8732
    assert report["parameters"] > 20_000_000
