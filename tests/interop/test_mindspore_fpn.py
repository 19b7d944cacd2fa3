"""The MindSpore model zoo's SSD-MobileNetV1-FPN and SSD-ResNet50-FPN: presets ``ssd640-mobilenet-v1-fpn`` /
``ssd640-resnet50-fpn`` and ``import-weights --from mindspore`` of their checkpoints
(multibox/interop/mindspore_fpn.py).

The end-to-end tests build both zoo networks in real MindSpore (tests/interop/mindspore_fpn_nets.py, run with the
MindSpore environment's Python; skipped with the reason where there is none), save random-weight checkpoints with
``mindspore.save_checkpoint`` and the raw outputs of a fixed 640x640 input, import the checkpoints and compare.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import multibox
from multibox.cli import import_weights as import_weights_command
from multibox.config import load_config
from multibox.core.anchors import anchor_spec, default_boxes_cxcywh
from multibox.interop import mindspore_fpn
from multibox.interop.mindspore import import_mindspore_ckpt, read_mindspore_ckpt, recognise as recognise_tutorial
from multibox.interop.mindspore import without_training_prefix, write_mindspore_ckpt
from multibox.models import build_model, count_parameters, model_skeleton
from multibox.models.fpn import resize_bilinear_legacy
from multibox.models.weights import WeightMappingError, class_row_layers

HELPER = Path(__file__).with_name("mindspore_fpn_nets.py")
NETS = {"mobilenet_v1_fpn": "ssd640-mobilenet-v1-fpn", "resnet50_fpn": "ssd640-resnet50-fpn"}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory, mindspore_python):
    out = tmp_path_factory.mktemp("mindspore_fpn")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([mindspore_python, str(HELPER), "--out", str(out), "--seed", "0"], cwd=out, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _import_weights(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="multibox")
    import_weights_command.add_parser(parser.add_subparsers(dest="command", required=True))
    return import_weights_command.run(parser.parse_args(["import-weights", *args]))


@pytest.mark.slow
@pytest.mark.parametrize("net", list(NETS))
def test_zoo_checkpoint_imports_to_the_same_network(zoo_run, net, tmp_path):
    """Same normalised input, same raw outputs: loc after (dy, dx, dh, dw) -> (dx, dy, dw, dh), class logits."""
    assert _import_weights(["--from", "mindspore", str(zoo_run / f"{net}.ckpt"), "--out", str(tmp_path / "m.pt")]) == 0
    detector = multibox.load(tmp_path / "m.pt", device="cpu")
    assert detector.cfg.model.arch == load_config(NETS[net]).model.arch
    x = torch.from_numpy(np.load(zoo_run / "input.npy"))
    with torch.no_grad():
        loc, cls = detector.model(x)
    ms_loc = torch.from_numpy(np.load(zoo_run / f"{net}.loc.npy"))
    ms_cls = torch.from_numpy(np.load(zoo_run / f"{net}.cls.npy"))
    assert loc.shape == ms_loc.shape == (1, 51150, 4) and cls.shape == ms_cls.shape == (1, 51150, 81)
    assert ms_loc.std() > 0.1 and ms_cls.std() > 0.1         # random weights: nothing trivially zero
    assert _relative_error(loc, ms_loc[..., [1, 0, 3, 2]]) < 1e-4
    assert _relative_error(cls, ms_cls) < 1e-4
    assert _relative_error(loc, ms_loc) > 1e-2                # the swap is real, not a no-op


@pytest.mark.slow
@pytest.mark.parametrize("net", list(NETS))
def test_every_zoo_parameter_is_mapped_and_counts_agree(zoo_run, net):
    names = dict(line.split(" ", 1) for line in (zoo_run / f"{net}.names.txt").read_text().splitlines())
    source = read_mindspore_ckpt(zoo_run / f"{net}.ckpt")
    assert {k: str(tuple(v.shape)) for k, v in source.items()} == names
    model = model_skeleton(load_config(NETS[net]))
    trunk = mindspore_fpn.NETWORKS[NETS[net]][0]
    assert {theirs for _, theirs in mindspore_fpn.zoo_fpn_pairs(model, trunk)} == set(names)
    # Shared tower convolutions are one MindSpore Parameter each, counted once, as ours.
    assert count_parameters(model) == int((zoo_run / f"{net}.count.txt").read_text())


@pytest.mark.slow
def test_zoo_default_boxes_in_the_zoo_order(zoo_run):
    """The preset's anchors equal the zoo's GridAnchorGenerator output ((cy, cx, h, w) -> cxcywh), box for box."""
    theirs = torch.from_numpy(np.load(zoo_run / "anchors.npy"))[:, [1, 0, 3, 2]]
    for preset in NETS.values():
        ours = default_boxes_cxcywh(anchor_spec(load_config(preset).anchors, 640))
        assert ours.shape == theirs.shape == (51150, 4)
        assert float((ours - theirs).abs().max()) < 1e-6


def test_default_boxes_by_hand():
    spec = anchor_spec(load_config("ssd640-mobilenet-v1-fpn").anchors, 640)
    assert spec.boxes_per_location() == [6] * 5
    assert spec.num_anchors() == 6 * (80 ** 2 + 40 ** 2 + 20 ** 2 + 10 ** 2 + 5 ** 2) == 51150
    boxes = default_boxes_cxcywh(spec, torch.float64)
    r = math.sqrt(2)
    # Level 0 (step 8, base 4·8/640 = 0.05), location (0, 0), centre 4/640: ratio 1 (octaves 1, √2), 2, then 0.5.
    expected = [(0.05, 0.05), (0.05 * r, 0.05 * r), (0.05 * r, 0.05 / r), (0.1, 0.05), (0.05 / r, 0.05 * r),
                (0.05, 0.1)]
    for k, (w, h) in enumerate(expected):
        assert boxes[k].tolist() == pytest.approx([0.00625, 0.00625, w, h])
    assert boxes[6].tolist()[:2] == pytest.approx([12 / 640, 4 / 640])          # next column, same row
    assert boxes[6 * 80].tolist()[:2] == pytest.approx([4 / 640, 12 / 640])     # next row
    assert boxes[6 * 6400].tolist() == pytest.approx([8 / 640, 8 / 640, 0.1, 0.1])   # level 1 starts
    assert boxes[-1].tolist() == pytest.approx([576 / 640, 576 / 640, 0.8, 1.6])  # level 4's last: (0.8, 1.6)


def test_legacy_bilinear_resize_by_hand():
    """MindSpore's ResizeBilinear (no half-pixel centres): output i samples input i·in/out, clamped at the end."""
    x = torch.tensor([[[[0.0, 1.0, 4.0]]]])
    assert resize_bilinear_legacy(x, (1, 6)).flatten().tolist() == [0.0, 0.5, 1.0, 2.5, 4.0, 4.0]
    assert resize_bilinear_legacy(x.transpose(2, 3), (6, 1)).flatten().tolist() == [0.0, 0.5, 1.0, 2.5, 4.0, 4.0]


@pytest.fixture(scope="module")
def mobilenet_fpn_as_zoo():
    """A random ssd640-mobilenet-v1-fpn model written under the zoo's names (loc predictor back in (dy, dx, dh, dw))."""
    torch.manual_seed(0)
    model = build_model(load_config("ssd640-mobilenet-v1-fpn"))
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    tensors = {}
    for ours, theirs in mindspore_fpn.zoo_fpn_pairs(model, "mobilenet_v1"):
        value = state[ours]
        if ours.startswith("head.loc_predictor."):
            value = value.reshape(6, 4, *value.shape[1:])[:, [1, 0, 3, 2]].reshape(value.shape)
        tensors["network." + theirs] = value.numpy()          # as a training wrapper saves them
    return state, tensors


def test_round_trip_through_zoo_names(mobilenet_fpn_as_zoo, tmp_path):
    state, tensors = mobilenet_fpn_as_zoo
    write_mindspore_ckpt(tmp_path / "zoo.ckpt", tensors)
    source = without_training_prefix(read_mindspore_ckpt(tmp_path / "zoo.ckpt"))   # as the dispatcher hands it on
    assert mindspore_fpn.recognise(source) and not recognise_tutorial(source)
    payload = import_mindspore_ckpt(tmp_path / "zoo.ckpt")
    assert payload["config"]["model"]["arch"] == "ssd640_mobilenet_v1_fpn" and len(payload["class_names"]) == 81
    for name, value in state.items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(payload["model"][name], value), name


def test_import_fails_loudly(mobilenet_fpn_as_zoo, tmp_path):
    _, tensors = mobilenet_fpn_as_zoo
    missing = {k: v for k, v in tensors.items() if k != "network.multi_box.addition_layer_cls.3.2.features.1.beta"}
    write_mindspore_ckpt(tmp_path / "missing.ckpt", missing)
    with pytest.raises(WeightMappingError, match="addition_layer_cls.3.2.features.1.beta"):
        import_mindspore_ckpt(tmp_path / "missing.ckpt")
    voc = dict(tensors, **{"network.multi_box.cls_layers.0.weight": np.zeros((6 * 21, 256, 3, 3), np.float32)})
    write_mindspore_ckpt(tmp_path / "voc.ckpt", voc)
    with pytest.raises(WeightMappingError, match="126 outputs"):
        import_mindspore_ckpt(tmp_path / "voc.ckpt")


def test_resnet_fpn_is_told_apart_by_names():
    model = model_skeleton(load_config("ssd640-resnet50-fpn"))
    names = {theirs: None for _, theirs in mindspore_fpn.zoo_fpn_pairs(model, "resnet")}
    assert mindspore_fpn._preset_of(names) == "ssd640-resnet50-fpn"
    assert "feature_extractor.resnet.layer1.0.down_sample_layer.1.moving_mean" in names


def test_shared_head_shares_its_towers_and_class_rows():
    """One tower conv serves every level: changing it moves the outputs of all 5 levels; BatchNorms are per level.
    The class prior and fine-tuning's class rows use the one shared predictor."""
    cfg = load_config("ssd640-mobilenet-v1-fpn")
    cfg.model.num_classes = 2
    cfg.model.class_prior = 0.01
    model = build_model(cfg).eval()
    head = model.head
    assert len(head.loc_tower) == 4 and len(head.loc_norms) == 5 and head.loc_norms[0][0] is not head.loc_norms[1][0]
    assert not any(k.startswith(("loc_heads", "cls_heads")) for k in model.state_dict())
    assert class_row_layers(model) == {"head.cls_predictor": 6}
    bias = head.cls_predictor.bias.view(6, 3)
    assert torch.allclose(bias[:, 0], torch.full((6,), math.log(99))) and torch.allclose(bias[:, 1:], -bias[:, :1])
    x = torch.randn(1, 3, 256, 256)                        # fully convolutional: 32, 16, 8, 4, 2
    with torch.no_grad():
        before, _ = model(x)
        head.loc_tower[0].weight.mul_(1.5)
        after, _ = model(x)
    sizes = [32, 16, 8, 4, 2]
    starts = np.cumsum([0] + [6 * s * s for s in sizes])
    for a, b in zip(starts[:-1], starts[1:]):
        level = before[0, a:b]
        assert float((level - after[0, a:b]).abs().max()) > 1e-3 * float(level.abs().max()) > 0


def test_per_level_heads_keep_their_names():
    model = build_model(load_config("tiny"))
    keys = model.state_dict().keys()
    assert "loc_heads.0.weight" in keys and "cls_heads.5.bias" in keys
    assert model.head is None and not any(k.startswith("head.") for k in keys)
