"""The ``ssdlite320-mobilenet-v3`` preset is torchvision's ``ssdlite320_mobilenet_v3_large`` (SPEC §1).

References: torchvision's own model with random weights (and random BatchNorm statistics, so that the norms are not
identities) — its parameter count, its ``DefaultBoxGenerator``, its raw head outputs through a forward hook and its
eval-mode detections — and torchvision's ``mobilenet_v3_large`` state-dict layout for ImageNet initialisation.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from multibox.config import load_config
from multibox.core.anchors import anchor_spec, default_boxes_cxcywh
from multibox.core.boxes import cxcywh_to_xyxy
from multibox.interop.torchvision import import_torchvision, torchvision_ssdlite_pairs
from multibox.models import build_model, count_parameters
from multibox.models.published import PUBLISHED, mobilenet_v3_reduced_tail, plan_initial_weights
from multibox.models.weights import WeightMappingError, load_mobilenet_v3_backbone
from test_interop import _assert_same_detections, _relative_error, convert_and_run

PRESET = "ssdlite320-mobilenet-v3"
IMAGE_SIZES = [(320, 320), (240, 320), (500, 375)]


def _randomise_norms(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, one_thread):
    """A random torchvision SSDLite (91 slots), converted by ``multibox import-weights --from torchvision``, and both
    systems' raw outputs and detections on three images of different sizes."""
    root = tmp_path_factory.mktemp("ssdlite")
    torch.manual_seed(0)
    tv = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    _randomise_norms(tv, 0)
    for m in tv.modules():
        # torchvision's N(0, 0.03²) initialisation shrinks the signal layer after layer: the outputs hardly depend on
        # the image, thousands of scores tie within float32 noise and NMS among ties keeps either box. A fan-in
        # scaled initialisation (gain 1.26) keeps the signal without letting it grow, so detections differ by image
        # and are comparable.
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0.5, mode="fan_in", nonlinearity="leaky_relu")
    return convert_and_run(tv.eval(), root, IMAGE_SIZES)


def test_preset_is_torchvisions_recipe():
    cfg = load_config(PRESET)
    assert (cfg.model.arch, cfg.model.image_size, cfg.model.head, cfg.model.init) == \
        ("ssdlite320_mobilenet_v3", 320, "separable", "normal")
    assert cfg.data.mean == cfg.data.std == [127.5] * 3 and cfg.data.resize == "torchvision"
    assert (cfg.data.crop_rule, cfg.data.flip_p, cfg.data.photometric, cfg.data.zoom_out) == ("paper", 0.5, False, 0)
    assert (cfg.loss.kind, cfg.loss.match_rule, cfg.loss.neg_pos_ratio) == ("hard_negative", "torchvision", 3)
    t = cfg.train
    assert (t.lr, t.batch_size, t.epochs, t.schedule, t.weight_decay, t.lr_end) == \
        (0.15, 192, 660, "warmup_cosine", 4e-5, 0.0)
    e = cfg.eval
    assert (e.score_threshold, e.nms_threshold, e.pre_nms_top_k, e.max_per_image) == (0.001, 0.55, 300, 300)


def test_parameter_count_and_feature_maps_equal_torchvision():
    """3,440,060 parameters with torchvision's 91 slots (its published count); the six maps at 320x320."""
    cfg = load_config(PRESET, ["model.num_classes=90"])
    with torch.device("meta"):
        model = build_model(cfg)
        maps = [tuple(f.shape) for f in model.backbone(torch.empty(2, 3, 320, 320))]
    assert count_parameters(model) == 3_440_060
    assert maps == [(2, 672, 20, 20), (2, 480, 10, 10), (2, 512, 5, 5), (2, 256, 3, 3), (2, 256, 2, 2),
                    (2, 128, 1, 1)]
    assert model.anchors_cxcywh.shape == (3234, 4)   # 6 boxes x (400 + 100 + 25 + 9 + 4 + 1)


def test_default_boxes_equal_torchvisions_generator():
    cfg = load_config(PRESET)
    ours = cxcywh_to_xyxy(default_boxes_cxcywh(anchor_spec(cfg.anchors, 320))) * 320
    gen = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    features = [torch.zeros(1, 1, s, s) for s in cfg.anchors.feature_sizes]
    ref = gen(ImageList(torch.zeros(1, 3, 320, 320), [(320, 320)]), features)[0]
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_raw_outputs_and_detections_equal_torchvision(converted):
    tv_raw, ours = converted["raw_tv"], converted["raw_ours"]
    assert ours["loc"].shape == tv_raw["bbox_regression"].shape == (3, 3234, 4)
    assert ours["cls"].shape == tv_raw["cls_logits"].shape == (3, 3234, 91)
    loc_err, cls_err = _relative_error(ours["loc"], tv_raw["bbox_regression"]), \
        _relative_error(ours["cls"], tv_raw["cls_logits"])
    print(f"SSDLite raw outputs vs torchvision: loc rel {loc_err:.2e}, cls rel {cls_err:.2e}")
    assert loc_err < 1e-4 and cls_err < 1e-4
    for (h, w), ref, det in zip(IMAGE_SIZES, converted["ref"], converted["ours"]):
        assert len(ref["boxes"]) == 300 and len(det["boxes"]) == 300   # a random model fills the per-image cap
        _assert_same_detections(det, ref)
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all()


@pytest.mark.slow
def test_import_recognises_ssdlite_and_maps_every_entry_once(converted):
    det = converted["detector"]
    assert det.cfg.model.arch == "ssdlite320_mobilenet_v3" and det.cfg.model.num_classes == 90
    assert det.cfg.model.reduced_tail is True
    tv_names = sorted(converted["tv"].state_dict())
    pairs = torchvision_ssdlite_pairs(list(det.model.state_dict()))
    assert sorted(t for _, t in pairs) == tv_names
    assert sorted(o for o, _ in pairs) == sorted(det.model.state_dict())
    assert count_parameters(det.model) == count_parameters(converted["tv"]) == 3_440_060


def test_import_refuses_a_damaged_ssdlite_state_dict(tmp_path):
    torch.manual_seed(0)
    sd = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4).state_dict()
    sd.pop("backbone.extra.3.2.1.running_var")
    torch.save(sd, tmp_path / "damaged.pth")
    with pytest.raises(WeightMappingError, match=r"missing from the file: backbone\.extra\.3\.2\.1\.running_var"):
        import_torchvision(tmp_path / "damaged.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightMappingError, match="neither torchvision's ssd300_vgg16 nor its ssdlite"):
        import_torchvision(tmp_path / "other.pth")


def _cache_file(torch_home, name: str, state: dict) -> None:
    path = torch_home / "hub" / "checkpoints" / PUBLISHED[name].file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def test_imagenet_backbone_from_the_cache_takes_the_full_tail(tmp_path, monkeypatch):
    """``--weights mobilenet_v3_large`` (a file already in torch hub's cache, used offline): the trunk holds
    torchvision's ImageNet tensors, with the full tail as torchvision builds it then; extras and heads keep their
    initialisation. Without those weights the tail is reduced (the COCO model's)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(3)
    imagenet = mobilenet_v3_large(weights=None).state_dict()
    _cache_file(tmp_path, "mobilenet_v3_large", imagenet)
    cfg = load_config(PRESET, ["model.num_classes=3", "model.weights=mobilenet_v3_large"])
    assert not mobilenet_v3_reduced_tail(cfg) and mobilenet_v3_reduced_tail(load_config(PRESET))
    initial = plan_initial_weights(cfg)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_mobilenet_v3_backbone(model, initial.backbone)
    after = model.state_dict()
    assert model.backbone.out_channels[1] == 960
    torch.testing.assert_close(after["backbone.features.0.0.0.weight"], imagenet["features.0.0.weight"])
    torch.testing.assert_close(after["backbone.features.0.13.0.weight"], imagenet["features.13.block.0.0.weight"])
    torch.testing.assert_close(after["backbone.features.1.0.1.0.weight"], imagenet["features.13.block.1.0.weight"])
    torch.testing.assert_close(after["backbone.features.1.3.0.weight"], imagenet["features.16.0.weight"])
    assert torch.equal(after["backbone.extra.0.0.0.weight"], before["backbone.extra.0.0.0.weight"])
    with pytest.raises(WeightMappingError, match="full tail"):
        load_mobilenet_v3_backbone(build_model(load_config(PRESET, ["model.num_classes=3"])), initial.backbone)


def test_fine_tuning_from_the_cached_coco_ssdlite(tmp_path, monkeypatch):
    """``--weights ssdlite320_mobilenet_v3_large_coco`` onto (person, car, a new class): the backbone and box head
    are torchvision's, the matched class rows too, the new row fresh."""
    from multibox.interop.pretrained import load_detector_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(4)
    tv = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    _cache_file(tmp_path, "ssdlite320_mobilenet_v3_large_coco", tv.state_dict())
    cfg = load_config(PRESET, ["model.num_classes=3", "model.weights=ssdlite320_mobilenet_v3_large_coco"])
    initial = plan_initial_weights(cfg)
    model = build_model(cfg)
    fresh = model.state_dict()["cls_heads.0.3.weight"].clone()
    report = load_detector_weights(model, cfg, initial.detector, ["background", "person", "car", "gizmo"])
    assert report == {"kept": ["person", "car"], "new": ["gizmo"]}
    sd, ref = model.state_dict(), tv.state_dict()
    torch.testing.assert_close(sd["backbone.extra.2.1.0.weight"], ref["backbone.extra.2.1.0.weight"])
    torch.testing.assert_close(sd["loc_heads.4.3.weight"], ref["head.regression_head.module_list.4.1.weight"])
    rows = sd["cls_heads.0.3.weight"].view(6, 4, -1)
    tv_rows = ref["head.classification_head.module_list.0.1.weight"].view(6, 91, -1)
    torch.testing.assert_close(rows[:, :3], tv_rows[:, [0, 1, 3]])   # background, person (1), car (3)
    torch.testing.assert_close(rows[:, 3], fresh.view(6, 4, -1)[:, 3])
