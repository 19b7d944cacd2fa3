"""A non-square, letterboxed training end to end (``model.image_size: [H, W]``, ``data.resize: letterbox``).

References: the network's own feature maps (a real forward pass), predictions on a hand-padded input that
needs no resize, onnxruntime, and ground truth carried through the transform, the box encoding and the
postprocessor back to the image's pixels.
"""
from __future__ import annotations

import json

import pytest
import torch

from _data_builders import QUICK_TINY_TRAIN
from multibox.config import load_config
from multibox.core.matching import build_encoder
from multibox.core.postprocess import build_postprocessor
from multibox.core.resize import letterbox_fill
from multibox.data.transforms import build_eval_transform
from multibox.models import model_anchor_spec, resolve_feature_sizes


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """Six epochs of tiny at a 16:9 input, letterboxed, on 16:9 images; its data."""
    from multibox.cli import main

    root = tmp_path_factory.mktemp("wide-run")
    ann = root / "data" / "annotations.json"
    assert main(["synth", "--out", str(ann.parent), "--num-images", "16", "--seed", "5", "--classes", "2",
                 "--objects", "2-4", "--sizes", "0.2-0.6", "--side", "320-400", "--image-aspect", "1.7-1.8"]) == 0
    args = ["train", "--data", str(ann), "--out", str(root / "run"), "--no-progress"]
    for item in QUICK_TINY_TRAIN + ["train.epochs=6", "model.image_size=[320, 544]", "data.resize=letterbox",
                                    "data.crop_rule=tutorial", "data.flip_p=0.5"]:
        args += ["--set", item]
    assert main(args) == 0
    return ann, root / "run"


def test_the_run_carries_its_input_shape_and_the_networks_maps(wide_run):
    import multibox
    from multibox.checkpoint import load_checkpoint
    from multibox.config import Config

    _, run = wide_run
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.model.image_size == [320, 544] and cfg.data.resize == "letterbox"
    # tiny's maps at 320x544 (a forward pass of the trained network below agrees)
    assert cfg.anchors.feature_sizes == [[40, 68], [20, 34], [10, 17], [5, 9], [3, 7], [1, 5]]
    assert Config.from_dict(load_checkpoint(run / "best.pt")["config"]).anchors.feature_sizes == \
        cfg.anchors.feature_sizes
    detector = multibox.load(run / "best.pt", device="cpu")
    maps = detector.model.backbone(torch.zeros(1, 3, 320, 544))
    assert [list(m.shape[-2:]) for m in maps] == cfg.anchors.feature_sizes
    assert detector.model.anchors_cxcywh.shape[0] == model_anchor_spec(cfg).num_anchors()
    assert detector.preprocess([torch.zeros(3, 360, 640, dtype=torch.uint8)]).shape == (1, 3, 320, 544)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("AP50" in json.dumps(m) for m in metrics)


def test_letterboxed_predictions_equal_those_on_a_hand_padded_input(wide_run):
    # A 160x544 image fits 320x544 at scale 1: the letterbox only pads 80 rows above and below. The same image
    # padded by hand is the network's input itself, so its detections are in input pixels; the letterboxed
    # detections must be those moved up by 80 rows.
    import multibox

    _, run = wide_run
    detector = multibox.load(run / "best.pt", device="cpu")
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 160, 544), dtype=torch.uint8, generator=g)
    image[:, 40:120, 100:260] = torch.tensor([220, 40, 40], dtype=torch.uint8)[:, None, None]
    padded = torch.tensor(letterbox_fill(detector.cfg.data.mean), dtype=torch.uint8)[:, None, None].repeat(1, 320, 544)
    padded[:, 80:240] = image
    ours, reference = detector.predict([image, padded], score=0.01)
    moved = (reference["boxes"] - torch.tensor([0.0, 80.0, 0.0, 80.0])).clamp(min=0).minimum(
        torch.tensor([544.0, 160.0] * 2))
    inside = (moved[:, 3] > moved[:, 1]) & (moved[:, 2] > moved[:, 0])   # detections wholly in the padding go
    assert 0 < int(inside.sum()) < len(moved)
    torch.testing.assert_close(ours["scores"], reference["scores"][inside], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["boxes"], moved[inside], atol=1e-3, rtol=0)


def test_predict_eval_and_export_on_wide_images(wide_run, tmp_path):
    import multibox
    from multibox.cli import main
    from multibox.data.coco import read_image_rgb

    ann, run = wide_run
    images = sorted((ann.parent / "images").glob("*.jpg"))[:3]
    assert main(["predict", "--checkpoint", str(run / "best.pt"), *map(str, images), "--out", str(tmp_path / "p"),
                 "--score", "0.05", "--no-progress"]) == 0
    detections = json.loads((tmp_path / "p" / "detections.json").read_text())
    assert detections
    sizes = {p.name: tuple(read_image_rgb(p).shape[-2:]) for p in images}
    for d in detections:
        x, y, w, h = d["bbox"]
        assert x >= -1e-3 and y >= -1e-3 and w > 0 and h > 0
    assert min(w / h for h, w in sizes.values()) > 1.6
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--data", str(ann), "--out", str(tmp_path / "e"),
                 "--no-progress"]) == 0
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--out", str(out), "--exporter", "torchscript"]) == 0
    pixels = [read_image_rgb(p) for p in images]
    ours = multibox.load(run / "best.pt", device="cpu").predict(pixels, score=0.05)
    exported = multibox.load(out, runtime="onnxruntime").predict(pixels, score=0.05)
    assert sum(len(d["boxes"]) for d in ours) > 0
    for a, b in zip(ours, exported):
        torch.testing.assert_close(b["boxes"], a["boxes"], atol=0.05, rtol=0)
        assert torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("resize, image_hw", [("letterbox", (480, 640)), ("letterbox", (700, 300)),
                                              ("antialias", (480, 640))])
def test_ground_truth_round_trips_through_encoding_and_postprocessing(resize, image_hw):
    """Boxes in an image's pixels -> the eval transform's input units -> regression targets against the
    default boxes -> decoded and mapped back by the postprocessor: the same pixels."""
    cfg = resolve_feature_sizes(load_config("tiny", ["model.image_size=[320, 544]", f"data.resize={resize}"]))
    h, w = image_hw
    boxes_px = torch.tensor([[10.0, 20.0, 0.5 * w, 0.4 * h], [0.3 * w, 0.5 * h, 0.9 * w, 0.95 * h]])
    _, target = build_eval_transform(cfg)(torch.zeros(3, h, w, dtype=torch.uint8),
                                          {"boxes": boxes_px, "labels": torch.tensor([1, 2])})
    encoder = build_encoder(cfg, torch.device("cpu"))
    offsets, labels = encoder(target["boxes"][None], target["labels"][None])
    logits = torch.full((1, labels.shape[1], cfg.model.num_classes + 1), -20.0)
    logits[0, torch.arange(labels.shape[1]), labels[0]] = 20.0     # background where unmatched
    out = build_postprocessor(cfg)(offsets, logits, encoder.anchors_cxcywh, [image_hw])[0]
    order = torch.argsort(out["labels"])
    assert out["labels"][order].tolist() == [1, 2]
    torch.testing.assert_close(out["boxes"][order], boxes_px, atol=2e-3, rtol=0)
