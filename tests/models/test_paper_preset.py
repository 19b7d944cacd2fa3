"""The paper presets ``ssd300-vgg16`` and ``ssd512-vgg16`` (SPEC §3): settings, layer geometry, default boxes,
parameter counts, and a few real training steps of ``multibox train`` on CPU.

References: SPEC §3 and the paper's tables, torchvision's ``DefaultBoxGenerator`` (an independent default-box
implementation), torchvision's published parameter count of ``ssd300_vgg16``, and counts worked out by hand from the
layer list. Shapes are checked with forward passes on the meta device (no arithmetic, no memory).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torchvision.models.detection import SSD300_VGG16_Weights
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from multibox.core.anchors import default_boxes_cxcywh
from multibox.core.boxes import cxcywh_to_xyxy
from multibox.cli import main
from multibox.config import load_config
from multibox.core.anchors import anchor_spec
from multibox.models import build_model, count_parameters
from multibox.models.vgg import L2Norm, PaperVGG16Backbone

SSD300_MAPS = [(512, 38), (1024, 19), (512, 10), (256, 5), (256, 3), (256, 1)]
SSD512_MAPS = [(512, 64), (1024, 32), (512, 16), (256, 8), (256, 4), (256, 2), (256, 1)]


def _meta_model(preset: str, overrides: list[str] = ()) -> nn.Module:
    with torch.device("meta"):
        return build_model(load_config(preset, list(overrides)), load_backbone_weights=False)


def _meta_features(preset: str) -> list[tuple[int, ...]]:
    model = _meta_model(preset)
    size = load_config(preset).model.image_size
    with torch.device("meta"):
        return [tuple(f.shape) for f in model.backbone(torch.empty(1, 3, size, size))]


# --------------------------------------------------------------------------------------------- settings

@pytest.mark.parametrize("preset", ["ssd300-vgg16", "ssd512-vgg16"])
def test_preset_settings_follow_spec_section_3(preset):
    cfg = load_config(preset)
    assert cfg.model.head == "conv" and cfg.model.init == "xavier"
    # ImageNet initialisation from torchvision's vgg16_features; random weights only when asked
    assert cfg.model.backbone_weights == "vgg16_features" and not cfg.model.from_scratch and cfg.model.weights is None
    assert (cfg.loss.kind, cfg.loss.neg_pos_ratio, cfg.loss.match_rule) == ("hard_negative", 3, "torchvision")
    assert (cfg.loss.center_variance, cfg.loss.size_variance, cfg.loss.iou_threshold) == (0.1, 0.2, 0.5)
    assert cfg.anchors.clip and cfg.anchors.extra_box_second
    assert cfg.data.mean == pytest.approx([0.48235 * 255, 0.45882 * 255, 0.40784 * 255], abs=1e-9)
    assert cfg.data.std == [1.0, 1.0, 1.0] and cfg.data.resize == "torchvision"
    assert cfg.data.photometric and cfg.data.zoom_out == 4.0 and cfg.data.crop_rule == "paper"
    assert cfg.data.flip_p == 0.5 and cfg.data.jitter == [0.0, 0.0, 0.0]
    t = cfg.train
    assert (t.schedule, t.epochs, t.milestones, t.gamma) == ("multistep", 120, [80, 110], 0.1)
    assert (t.lr, t.batch_size, t.momentum, t.weight_decay) == (0.002, 32, 0.9, 5e-4)
    e = cfg.eval
    assert (e.score_threshold, e.nms_threshold, e.pre_nms_top_k, e.max_per_image) == (0.01, 0.45, 400, 200)
    assert e.max_per_class >= e.max_per_image        # never binds before the per-image cap (torchvision has none)


def test_ssd300_scales_are_the_papers():
    assert load_config("ssd300-vgg16").anchors.scales == [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]


# --------------------------------------------------------------------------------------------- layers

def test_paper_backbone_layers():
    bb = PaperVGG16Backbone()
    convs = [m for m in bb.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 + 2 + 8 and all(c.bias is not None for c in convs)
    # one ReLU after every convolution: 13 in the VGG blocks, fc6, fc7 (shared module), 8 in the extras
    relus_in_blocks = sum(isinstance(m, nn.ReLU) for block in bb.blocks for m in block)
    relus_in_extras = sum(isinstance(m, nn.ReLU) for extra in bb.extras for m in extra)
    assert relus_in_blocks == 13 and relus_in_extras == 8 and isinstance(bb.relu, nn.ReLU)
    assert (bb.fc6.kernel_size, bb.fc6.dilation, bb.fc6.padding) == ((3, 3), (6, 6), (6, 6))
    assert bb.pool3.ceil_mode and not bb.pool.ceil_mode
    assert (bb.pool5.kernel_size, bb.pool5.stride, bb.pool5.padding) == (3, 1, 1)
    assert isinstance(bb.l2norm, L2Norm) and torch.equal(bb.l2norm.scale.detach(), torch.full((512,), 20.0))


def test_l2norm_by_hand():
    norm = L2Norm(2, initial_scale=20.0)
    with torch.no_grad():
        norm.scale.copy_(torch.tensor([1.0, 2.0]))
    x = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)          # |x| = 5 at the one location
    assert norm(x).flatten().tolist() == pytest.approx([3 / 5 * 1.0, 4 / 5 * 2.0])
    assert torch.equal(norm(torch.zeros(1, 2, 2, 2)), torch.zeros(1, 2, 2, 2))


@pytest.mark.parametrize("preset, maps", [("ssd300-vgg16", SSD300_MAPS), ("ssd512-vgg16", SSD512_MAPS)])
def test_feature_maps(preset, maps):
    assert _meta_features(preset) == [(1, c, s, s) for c, s in maps]
    assert load_config(preset).anchors.feature_sizes == [s for _, s in maps]


# --------------------------------------------------------------------------------------------- default boxes

def _torchvision_default_boxes(cfg) -> torch.Tensor:
    """torchvision's DefaultBoxGenerator with the preset's settings -> (A, 4) xyxy in pixels."""
    a = cfg.anchors
    gen = DefaultBoxGenerator(a.aspect_ratios, scales=a.scales, steps=a.steps, clip=a.clip)
    size = cfg.model.image_size
    images = ImageList(torch.zeros(1, 3, size, size), [(size, size)])
    features = [torch.zeros(1, 1, f, f) for f in a.feature_sizes]
    return gen(images, features)[0]


@pytest.mark.parametrize("preset, count", [("ssd300-vgg16", 8732), ("ssd512-vgg16", 24564)])
def test_default_boxes_equal_torchvisions_generator(preset, count):
    cfg = load_config(preset)
    ours = default_boxes_cxcywh(anchor_spec(cfg.anchors, cfg.model.image_size))
    assert ours.shape == (count, 4)
    size = cfg.model.image_size
    torch.testing.assert_close(cxcywh_to_xyxy(ours) * size, _torchvision_default_boxes(cfg), atol=1e-3, rtol=0)


def test_ssd512_default_boxes_by_hand():
    """24564 = 64²·4 + 32²·6 + 16²·6 + 8²·6 + 4²·6 + 2²·4 + 1²·4; sizes of the paper's SSD512 for COCO."""
    cfg = load_config("ssd512-vgg16")
    assert 64**2 * 4 + 32**2 * 6 + 16**2 * 6 + 8**2 * 6 + 4**2 * 6 + 2**2 * 4 + 4 == 24564
    boxes = default_boxes_cxcywh(anchor_spec(cfg.anchors, 512)).double()
    # first location of the 64x64 map: centre 4/512; (s, s) = 20.48 px, then sqrt(20.48·51.2) px, then ratio 2
    torch.testing.assert_close(boxes[0], torch.tensor([4 / 512, 4 / 512, 0.04, 0.04], dtype=torch.float64))
    torch.testing.assert_close(boxes[1, 2:], torch.full((2,), math.sqrt(0.04 * 0.1), dtype=torch.float64))
    torch.testing.assert_close(boxes[2, 2:], torch.tensor([0.04 * math.sqrt(2), 0.04 / math.sqrt(2)],
                                                          dtype=torch.float64))
    # the 1x1 map (last 4 boxes): centre 0.5; 0.9; sqrt(0.9·1.06); ratio 2 clipped to 1 in width/height
    last = boxes[-4:]
    assert last[:, :2].eq(0.5).all()
    torch.testing.assert_close(last[:, 2], torch.tensor([0.9, math.sqrt(0.9 * 1.06), 1.0, 0.9 / math.sqrt(2)],
                                                        dtype=torch.float64))
    # steps: the 4x4 map (level 4) has its first centre at 64/512
    level4_start = 64**2 * 4 + 32**2 * 6 + 16**2 * 6 + 8**2 * 6
    assert boxes[level4_start, 0].item() == pytest.approx(64 / 512)


# --------------------------------------------------------------------------------------------- parameter counts

def _conv(k: int, c_in: int, c_out: int) -> int:
    return k * k * c_in * c_out + c_out


def _hand_count(highres: bool, num_classes: int, boxes_per_location: list[int]) -> int:
    """Worked out from the layer list (SPEC §3 / the paper), independent of the module structure."""
    # conv1_1 3->64, conv1_2 64->64, conv2_1 64->128, ..., conv5_3 512->512: 13 3x3 convolutions with bias
    widths = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    n = sum(_conv(3, a, b) for a, b in zip(widths[:-1], widths[1:]))
    n += 512                                                      # L2Norm scale
    n += _conv(3, 512, 1024) + _conv(1, 1024, 1024)               # fc6, fc7
    n += _conv(1, 1024, 256) + _conv(3, 256, 512) + _conv(1, 512, 128) + _conv(3, 128, 256)
    n += 2 * (_conv(1, 256, 128) + _conv(3, 128, 256))            # conv10, conv11
    if highres:
        n += _conv(1, 256, 128) + _conv(4, 128, 256)              # conv12
    channels = [512, 1024, 512, 256, 256, 256] + ([256] if highres else [])
    n += sum(_conv(3, c, 4 * k) + _conv(3, c, (num_classes + 1) * k) for c, k in zip(channels, boxes_per_location))
    return n


def test_parameter_counts():
    """ssd300-vgg16 with torchvision's 91 COCO slots has exactly torchvision's published 35,641,826."""
    table = {
        ("ssd300-vgg16", 90): _hand_count(False, 90, [4, 6, 6, 6, 4, 4]),
        ("ssd300-vgg16", 80): _hand_count(False, 80, [4, 6, 6, 6, 4, 4]),
        ("ssd512-vgg16", 80): _hand_count(True, 80, [4, 6, 6, 6, 6, 4, 4]),
        ("ssd512-vgg16", 90): _hand_count(True, 90, [4, 6, 6, 6, 6, 4, 4]),
        ("ssd300-vgg16-seed", 80): 24_261_814,      # tests/test_models.py works this one out from SPEC §2
    }
    for (preset, classes), expected in table.items():
        n = count_parameters(_meta_model(preset, [f"model.num_classes={classes}"]))
        print(f"{preset} ({classes} classes + background): {n:,} parameters")
        assert n == expected, preset
    assert table[("ssd300-vgg16", 90)] == SSD300_VGG16_Weights.COCO_V1.meta["num_params"] == 35_641_826


# --------------------------------------------------------------------------------------------- training on CPU

def train_steps(tmp_path, preset: str, steps: int, lr: float) -> list[float]:
    """``multibox train --config PRESET --data synth`` on one synthetic image, one step per epoch, augmentation
    off so that every step sees the same batch; returns the logged loss of each step."""
    out = tmp_path / "run"
    overrides = [f"data.synth_root={tmp_path / 'synth'}", "data.synth_train_images=1", "data.synth_val_images=1",
                 "data.num_workers=0", "data.crop_rule=none", "data.flip_p=0", "data.photometric=false",
                 "data.zoom_out=0", f"train.epochs={steps}", "train.batch_size=1", f"train.lr={lr}",
                 "train.warmup_epochs=0", "train.log_every=1", "train.checkpoint_every=0", "train.threads=2",
                 "model.from_scratch=true"]   # no vgg16_features file here (and no network)
    args = ["train", "--config", preset, "--data", "synth", "--out", str(out), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "last.pt").is_file() and (out / "eval.json").is_file()
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.slow
def test_ssd300_trains_on_cpu(tmp_path):
    """Three steps of the real command on the same image: the loss goes down at every step.
    (SSD512's run is in tests/models/test_ssd512_training.py, to keep each file short on two CPU cores.)"""
    losses = train_steps(tmp_path, "ssd300-vgg16", steps=3, lr=1e-4)
    print("ssd300-vgg16 losses:", losses)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[2] < losses[1] < losses[0]
