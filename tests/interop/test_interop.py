"""Weight interop with torchvision (multibox.interop.torchvision): a converted ``ssd300_vgg16`` is the same function as
torchvision's, and ImageNet VGG16 files initialise the paper presets' trunk.

References: torchvision's own ``ssd300_vgg16`` (raw head outputs through a forward hook, and its eval-mode
detections), torchvision's ``vgg16`` state-dict layout, and hand-indexed fc6/fc7 sub-sampling.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vgg import cfgs as vgg_cfgs
from torchvision.models.vgg import make_layers
from torchvision.models.detection import ssd300_vgg16

import multibox
from multibox.config import load_config
from multibox.cli import import_weights as import_weights_command
from multibox.interop.torchvision import import_torchvision_ssd300, torchvision_ssd300_pairs
from multibox.models.weights import (WeightMappingError, load_vgg16_backbone, remap_state_dict, subsample_fc6_fc7,
                                     vgg16_feature_indices)
from multibox.models import build_model, count_parameters
from multibox.models.published import WeightsUnavailableError
from multibox.models.vgg import VGG16_BLOCKS, PaperVGG16Backbone, TutorialVGG16Backbone

IMAGE_SIZES = [(300, 300), (240, 320), (500, 375)]


def _import_weights(args: list[str]) -> int:
    """``multibox import-weights ...`` through the sub-command's own parser (multibox.cli.import_weights)."""
    parser = argparse.ArgumentParser(prog="multibox")
    import_weights_command.add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["import-weights", *args])
    return import_weights_command.run(ns)


def convert_and_run(tv: torch.nn.Module, root, image_sizes) -> dict:
    """``tv`` (a torchvision detector in eval mode) saved, converted by ``multibox import-weights --from
    torchvision`` and loaded with ``multibox.load``; both systems' raw head outputs (forward hooks) and detections
    on random images of ``image_sizes`` (one forward pass each)."""
    torch.save(tv.state_dict(), root / "tv.pth")
    assert _import_weights(["--from", "torchvision", str(root / "tv.pth"), "--out", str(root / "ckpt.pt")]) == 0
    detector = multibox.load(root / "ckpt.pt", device="cpu")
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in image_sizes]
    raw_tv, raw_ours = {}, {}
    hooks = [tv.head.register_forward_hook(lambda m, i, o: raw_tv.update(o)),
             detector.model.register_forward_hook(lambda m, i, o: raw_ours.update(loc=o[0], cls=o[1]))]
    try:
        with torch.no_grad():
            ref = tv([im.float() / 255 for im in images])
        ours = detector.predict(images)
    finally:
        for h in hooks:
            h.remove()
    return {"tv": tv, "state_dict": tv.state_dict(), "detector": detector, "images": images, "ref": ref,
            "ours": ours, "raw_tv": raw_tv, "raw_ours": raw_ours, "root": root}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, one_thread):
    """A randomly initialised torchvision ssd300_vgg16 (seed 0) through :func:`convert_and_run` on three images of
    different sizes. One thread: a random network scores many overlapping boxes alike, so float32 noise (NHWC vs
    NCHW, the threads' summation order) can change which of two near-tied boxes NMS keeps; one thread fixes that
    noise."""
    torch.manual_seed(0)
    tv = ssd300_vgg16(weights=None, weights_backbone=None).eval()
    return convert_and_run(tv, tmp_path_factory.mktemp("torchvision"), IMAGE_SIZES)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------------------------- torchvision SSD300

@pytest.mark.slow
def test_checkpoint_is_the_paper_preset_with_coco_slots(converted):
    det = converted["detector"]
    assert det.cfg.model.arch == "ssd300_vgg16" and det.cfg.model.num_classes == 90
    assert det.cfg.data.resize == "torchvision" and det.cfg.anchors.extra_box_second and det.cfg.anchors.clip
    assert (det.cfg.eval.score_threshold, det.cfg.eval.nms_threshold, det.cfg.eval.max_per_image) == (0.01, 0.45, 200)
    assert det.postprocess.score_activation == "softmax" and det.postprocess.pre_nms_top_k == 400
    names = det.class_names
    assert len(names) == 91 and names[0] == "background" and names[1] == "person" and names[90] == "toothbrush"
    assert names[12] == "N/A"     # torchvision's labels are COCO category ids, with the unused slots kept


@pytest.mark.slow
def test_raw_head_outputs_equal(converted):
    """Same normalised input (the detector's preprocessing equals torchvision's), same loc and logits."""
    tv_raw, ours = converted["raw_tv"], converted["raw_ours"]
    assert ours["loc"].shape == tv_raw["bbox_regression"].shape == (3, 8732, 4)
    assert ours["cls"].shape == tv_raw["cls_logits"].shape == (3, 8732, 91)
    assert _relative_error(ours["loc"], tv_raw["bbox_regression"]) < 1e-4
    assert _relative_error(ours["cls"], tv_raw["cls_logits"]) < 1e-4


def _assert_same_detections(ours: dict, ref: dict, score_atol: float = 1e-5, box_atol: float = 3e-3) -> None:
    """Every detection of ``ref`` is in ``ours``, once: same label, score and box up to float32 noise (the Detector
    runs NHWC convolutions, another summation order than torchvision's NCHW), so scores that tie within the noise
    may come in either order; those tied with the lowest kept score may fall either side of the per-image cap."""
    torch.testing.assert_close(ours["scores"], ref["scores"], atol=score_atol, rtol=0)   # sorted: same values
    used = torch.zeros(len(ours["scores"]), dtype=torch.bool)
    cap_tie = float(ref["scores"].min()) + score_atol
    for box, score, label in zip(ref["boxes"], ref["scores"], ref["labels"]):
        same = (~used & (ours["labels"] == label) & ((ours["scores"] - score).abs() <= score_atol)
                & ((ours["boxes"] - box).abs().amax(dim=1) < box_atol))
        if same.any():
            used[same.nonzero()[0]] = True
        else:
            assert score <= cap_tie, f"no detection like label {int(label)}, score {float(score)}, box {box.tolist()}"


@pytest.mark.slow
def test_predict_equals_torchvision_detections(converted):
    assert len(converted["ours"]) == len(converted["ref"]) == len(IMAGE_SIZES)
    for size, ref, ours in zip(IMAGE_SIZES, converted["ref"], converted["ours"]):
        assert len(ref["boxes"]) > 50, "the random model should detect plenty at score 0.01"
        assert len(ours["boxes"]) == len(ref["boxes"]) <= 200
        _assert_same_detections(ours, ref)
        h, w = size
        assert (ours["boxes"][:, 0::2] <= w).all() and (ours["boxes"][:, 1::2] <= h).all()


@pytest.mark.slow
def test_eval_on_coco_categories_scores_torchvision_detections(converted, tmp_path, capsys):
    """``multibox eval`` of the 91-slot import on a COCO-format set with 3 of COCO's categories (ids 1, 3, 18):
    labels are matched by name, and the scored detections are torchvision's own, restricted to those ids."""
    from PIL import Image

    from multibox.cli import main
    from multibox.data.build import build_splits
    from multibox.runtime import prepare_for_inference
    from multibox.evaluation.evaluate import category_map_by_name, evaluate_model

    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i, image in enumerate(converted["images"]):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "images" / f"{i}.png")   # lossless
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": image.shape[1], "width": image.shape[2]})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 20, 60, 80],
                            "area": 4800, "iscrowd": 0})
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                               "categories": categories}))
    detector = converted["detector"]
    cfg = copy.deepcopy(detector.cfg)
    cfg.data.path = cfg.data.val_path = str(root / "ann.json")
    splits = build_splits(cfg)
    category_map = category_map_by_name(detector.class_names, splits)
    assert {k: v for k, v in category_map.items() if v is not None} == {1: 1, 3: 3, 18: 18}
    _, results = evaluate_model(cfg, prepare_for_inference(detector.model, cfg, torch.device("cpu")), splits,
                                torch.device("cpu"), return_detections=True, label_to_category_id=category_map)
    for image_id, ref in enumerate(converted["ref"], start=1):
        keep = torch.isin(ref["labels"], torch.tensor([1, 3, 18]))
        ours = sorted((r for r in results if r["image_id"] == image_id), key=lambda r: -r["score"])
        assert len(ours) == int(keep.sum()) > 0
        assert [r["category_id"] for r in ours] == ref["labels"][keep].tolist()
        torch.testing.assert_close(torch.tensor([r["score"] for r in ours]), ref["scores"][keep], atol=2e-5, rtol=0)
        ltwh = torch.tensor([r["bbox"] for r in ours])
        torch.testing.assert_close(ltwh[:, :2] + ltwh[:, 2:], ref["boxes"][keep][:, 2:], atol=5e-3, rtol=0)
    assert main(["eval", "--checkpoint", str(converted["root"] / "ckpt.pt"), "--data", str(root / "ann.json"),
                 "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert set(json.loads((tmp_path / "eval" / "eval.json").read_text())["per_class"]) == {"person", "car", "dog"}
    categories.append({"id": 200, "name": "unicorn"})
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                               "categories": categories}))
    assert main(["eval", "--checkpoint", str(converted["root"] / "ckpt.pt"), "--data", str(root / "ann.json"),
                 "--out", str(tmp_path / "eval2"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unicorn" in err and err.count("\n") == 1


@pytest.mark.slow
def test_parameter_count_equals_torchvision(converted):
    n = count_parameters(converted["detector"].model)
    print(f"ssd300-vgg16 (91 classes): {n:,} parameters; torchvision ssd300_vgg16: "
          f"{count_parameters(converted['tv']):,}")
    assert n == count_parameters(converted["tv"]) == 35_641_826


@pytest.mark.slow
def test_mapping_covers_every_parameter_once(converted):
    sd = converted["state_dict"]
    pairs = torchvision_ssd300_pairs()
    assert sorted(t for _, t in pairs) == sorted(sd)
    assert sorted(o for o, _ in pairs) == sorted(converted["detector"].model.state_dict())


@pytest.mark.slow
def test_import_fails_loudly_on_missing_extra_or_misshapen_entries(converted, tmp_path):
    sd, target = converted["state_dict"], converted["detector"].model.state_dict()
    pairs = torchvision_ssd300_pairs()
    missing = {k: v for k, v in sd.items() if k != "backbone.extra.0.7.1.weight"}
    with pytest.raises(WeightMappingError, match=r"missing from the file: backbone\.extra\.0\.7\.1\.weight"):
        remap_state_dict(missing, pairs, target, "test")
    extra = dict(sd, **{"backbone.extra.5.0.weight": torch.zeros(1)})
    with pytest.raises(WeightMappingError, match=r"map to nothing: backbone\.extra\.5\.0\.weight"):
        remap_state_dict(extra, pairs, target, "test")
    misshapen = dict(sd, **{"backbone.scale_weight": torch.ones(256)})
    with pytest.raises(WeightMappingError, match=r"shapes differ: backbone\.scale_weight \(256,\)"):
        remap_state_dict(misshapen, pairs, target, "test")
    # End to end through the file: a state dict of another model is refused.
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(WeightMappingError, match="not a torchvision ssd300_vgg16"):
        import_torchvision_ssd300(tmp_path / "other.pth")


# --------------------------------------------------------------------------------------------- ImageNet VGG16

def test_fc6_fc7_subsampling_by_hand():
    """fc6[o, c, i, j] = classifier.0[4o, c·49 + 3i·7 + 3j]; fc7[o, i] = classifier.3[4o, 4i]; biases every 4th.
    Functionally: on a 7x7 pool5 map that is zero except at rows/columns 0, 3, 6, the sub-sampled 3x3 kernel with
    dilation 3 gives VGG's fc6 outputs 0, 4, 8, ... (the paper's dilation 6 is the same taps on a stride-16 map)."""
    g = torch.Generator().manual_seed(0)
    w6, b6 = torch.empty(4096, 25088).uniform_(-1, 1, generator=g), torch.randn(4096, generator=g)
    w7, b7 = torch.empty(4096, 4096).uniform_(-1, 1, generator=g), torch.randn(4096, generator=g)
    f6, c6, f7, c7 = subsample_fc6_fc7(w6, b6, w7, b7)
    assert f6.shape == (1024, 512, 3, 3) and f7.shape == (1024, 1024, 1, 1) and c6.shape == c7.shape == (1024,)
    for o, c, i, j in [(0, 0, 0, 0), (1, 5, 1, 2), (1023, 511, 2, 2), (300, 17, 2, 0)]:
        assert f6[o, c, i, j] == w6[4 * o, c * 49 + 3 * i * 7 + 3 * j]
    for o, i in [(0, 0), (7, 1000), (1023, 1023)]:
        assert f7[o, i, 0, 0] == w7[4 * o, 4 * i]
    assert torch.equal(c6, b6[0::4]) and torch.equal(c7, b7[0::4])
    pool5 = torch.zeros(512, 7, 7)
    pool5[:, 0::3, 0::3] = torch.randn(512, 3, 3, generator=g)
    vgg_fc6 = w6[0::4] @ pool5.flatten() + b6[0::4]
    ours = F.conv2d(pool5[None], f6, c6, dilation=3)[0, :, 0, 0]
    torch.testing.assert_close(ours, vgg_fc6, rtol=1e-4, atol=1e-4)


def _fake_vgg16_state_dict(nan_classifier: bool = False) -> dict[str, torch.Tensor]:
    """A torchvision vgg16 state dict (the layout of ``torchvision.models.vgg16().state_dict()``) with random values;
    the big classifier matrices are stride-0 views of one random row (cheap to save, still the real shapes)."""
    g = torch.Generator().manual_seed(3)
    sd, in_channels = {}, 3
    widths = [w for block in VGG16_BLOCKS for w in block]
    for index, width in zip(vgg16_feature_indices(), widths, strict=True):
        sd[f"features.{index}.weight"] = torch.randn(width, in_channels, 3, 3, generator=g) * 0.05
        sd[f"features.{index}.bias"] = torch.randn(width, generator=g)
        in_channels = width
    for name, (rows, cols) in (("classifier.0", (4096, 25088)), ("classifier.3", (4096, 4096)),
                               ("classifier.6", (1000, 4096))):
        if nan_classifier:
            sd[f"{name}.weight"], sd[f"{name}.bias"] = torch.full((1, cols), float("nan")).expand(rows, cols), \
                torch.full((rows,), float("nan"))
        else:
            sd[f"{name}.weight"] = torch.randn(1, cols, generator=g).expand(rows, cols)
            sd[f"{name}.bias"] = torch.randn(rows, generator=g)
    return sd


def test_fake_vgg16_layout_is_torchvisions():
    """Names and shapes as torchvision's vgg16: its feature layers built by torchvision itself (the classifier's
    Linear layers are 512·7·7 -> 4096 -> 4096 -> 1000)."""
    features = make_layers(vgg_cfgs["D"], batch_norm=False).state_dict()
    expected = {f"features.{k}": tuple(v.shape) for k, v in features.items()}
    expected.update({"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
                     "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
                     "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)})
    assert {k: tuple(v.shape) for k, v in _fake_vgg16_state_dict().items()} == expected


@pytest.mark.slow
def test_backbone_weights_from_torchvision_vgg16(tmp_path):
    sd = _fake_vgg16_state_dict()
    torch.save(sd, tmp_path / "vgg16.pth")
    model = build_model(load_config("ssd300-vgg16", [f"model.backbone_weights={tmp_path / 'vgg16.pth'}"]),
                        load_backbone_weights=True)
    convs = model.backbone.trunk_convolutions()
    for conv, index in zip(convs, vgg16_feature_indices(), strict=True):
        assert torch.equal(conv.weight, sd[f"features.{index}.weight"])
        assert torch.equal(conv.bias, sd[f"features.{index}.bias"])
    f6, c6, f7, c7 = subsample_fc6_fc7(sd["classifier.0.weight"], sd["classifier.0.bias"], sd["classifier.3.weight"],
                                       sd["classifier.3.bias"])
    assert torch.equal(model.backbone.fc6.weight, f6) and torch.equal(model.backbone.fc6.bias, c6)
    assert torch.equal(model.backbone.fc7.weight, f7) and torch.equal(model.backbone.fc7.bias, c7)
    assert torch.equal(model.backbone.l2norm.scale, torch.full((512,), 20.0))
    # A checkpoint reload (the default) does not need (or read) the file; asked to load it, a missing file is an error.
    cfg512 = load_config("ssd512-vgg16", ["model.backbone_weights=/nonexistent/vgg16.pth"])
    build_model(cfg512)
    with pytest.raises(WeightsUnavailableError, match="/nonexistent/vgg16.pth is neither a file nor a published"):
        build_model(cfg512, load_backbone_weights=True)


def test_backbone_weights_from_vgg16_features_file_keeps_fc6_fc7(tmp_path, caplog):
    """torchvision's vgg16_features file has no classifier values (NaN): fc6/fc7 keep their initialisation (logged:
    it is what the default preset always loads, not a problem to warn about)."""
    sd = _fake_vgg16_state_dict(nan_classifier=True)
    torch.save(sd, tmp_path / "vgg16_features.pth")
    cfg = load_config("ssd300-vgg16", [f"model.backbone_weights={tmp_path / 'vgg16_features.pth'}"])
    with caplog.at_level(logging.INFO, logger="multibox.models"):
        model = build_model(cfg, load_backbone_weights=True)
    assert "fc6/fc7 keep their initialisation" in caplog.text
    # Xavier-uniform: |w| <= sqrt(6 / (fan_in + fan_out)), std = sqrt(2 / (fan_in + fan_out)); fan = 9·512, 9·1024
    fc6 = model.backbone.fc6.weight.detach()
    assert torch.isfinite(fc6).all() and fc6.abs().max() <= (6 / 13824) ** 0.5
    assert float(fc6.std()) == pytest.approx((2 / 13824) ** 0.5, rel=0.02)
    assert torch.isfinite(model.backbone.fc7.weight).all() and (model.backbone.fc7.bias == 0).all()
    assert torch.equal(model.backbone.blocks[4][4].weight, sd["features.28.weight"])       # conv5_3


def test_backbone_weights_from_ssd_pytorch_reducedfc(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {k.split(".", 1)[1]: v for k, v in _fake_vgg16_state_dict().items() if k.startswith("features.")}
    sd.update({"31.weight": torch.randn(1024, 512, 3, 3, generator=g), "31.bias": torch.randn(1024, generator=g),
               "33.weight": torch.randn(1024, 1024, 1, 1, generator=g), "33.bias": torch.randn(1024, generator=g)})
    torch.save(sd, tmp_path / "vgg16_reducedfc.pth")
    backbone = PaperVGG16Backbone()
    report = load_vgg16_backbone(backbone, tmp_path / "vgg16_reducedfc.pth")
    assert report["fc6_fc7"] == "copied" and report["tensors"] == 30
    assert torch.equal(backbone.fc6.weight, sd["31.weight"]) and torch.equal(backbone.fc7.bias, sd["33.bias"])
    assert torch.equal(backbone.blocks[0][0].weight, sd["0.weight"])
    assert torch.equal(backbone.blocks[4][4].weight, sd["28.weight"])


def test_backbone_weights_refused_for_other_files_and_archs(tmp_path):
    sd = _fake_vgg16_state_dict()
    sd["features.31.weight"] = torch.zeros(3)            # not a VGG16 layer
    torch.save(sd, tmp_path / "vgg_plus.pth")
    model = PaperVGG16Backbone()
    with pytest.raises(WeightMappingError, match=r"map to nothing: features\.31\.weight"):
        load_vgg16_backbone(model, tmp_path / "vgg_plus.pth")
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "resnet.pth")
    with pytest.raises(WeightMappingError, match="neither a torchvision vgg16"):
        load_vgg16_backbone(model, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="paper VGG16 arch"):
        load_vgg16_backbone(TutorialVGG16Backbone(), tmp_path / "resnet.pth")


def test_default_preset_starts_from_cached_vgg16_features(tmp_path, monkeypatch):
    """The paper preset's default: torchvision's vgg16_features file found in torch hub's cache (TORCH_HOME; the
    downloader would fail) initialises conv1_1 .. conv5_3, and conv1_x is frozen; ``--weights`` with a VGG16 file
    initialises the trunk the same way."""
    from multibox.interop.pretrained import load_detector_weights, plan_initial_weights, prepare_for_training

    def no_network(*args, **kwargs):
        raise AssertionError("no download expected")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    sd = _fake_vgg16_state_dict(nan_classifier=True)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16_features-amdegroot-88682ab5.pth"
    cached.parent.mkdir(parents=True)
    torch.save(sd, cached)
    cfg = load_config("ssd300-vgg16", ["model.num_classes=2"])
    names = ["background", "a", "b"]
    initial = plan_initial_weights(cfg)
    assert initial.backbone == cached
    model = build_model(cfg)
    prepare_for_training(model, cfg, initial, names)         # what a new run does
    conv1 = {f"backbone.blocks.0.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == conv1
    given = build_model(cfg)
    load_detector_weights(given, cfg, cached, names, "vgg16.pth")   # --weights vgg16.pth
    for net in (model, given):
        for conv, index in zip(net.backbone.trunk_convolutions(), vgg16_feature_indices(), strict=True):
            assert torch.equal(conv.weight, sd[f"features.{index}.weight"]), index
            assert torch.equal(conv.bias, sd[f"features.{index}.bias"]), index
