"""ImageNet trunk weights of the model-zoo SSD-FPN presets (``ssd640-mobilenet-v1-fpn``, ``ssd640-resnet50-fpn``)
from a MindSpore checkpoint of the zoo's classification MobileNetV1 / ResNet50: ``model.backbone_weights=FILE.ckpt``
(multibox/interop/mindspore_fpn.py ``load_trunk``), as the zoo's train.py loads ``feature_extractor_base_param``.

The end-to-end test builds both classification networks in real MindSpore (tests/interop/mindspore_fpn_imagenet_nets.py,
run with the MindSpore environment's Python; skipped with the reason where there is none), saves their random-weight
training checkpoints, loads each into the zoo SSD-FPN's trunk by train.py's rule and saves that trunk's feature maps
for a fixed image; here the same file goes through ``multibox train``'s path and our trunk must give the same maps.
"""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from multibox.config import load_config
from multibox.interop import mindspore_fpn
from multibox.interop.mindspore import BATCHNORM_LEAVES, MINDSPORE_BACKBONES, read_mindspore_ckpt
from multibox.interop.mindspore import write_mindspore_ckpt
from multibox.interop.pretrained import plan_initial_weights, prepare_for_training
from multibox.models import build_model, count_parameters
from multibox.models.weights import WeightMappingError

HELPER = Path(__file__).with_name("mindspore_fpn_imagenet_nets.py")
NETS = {"mobilenet_v1": "ssd640-mobilenet-v1-fpn", "resnet50": "ssd640-resnet50-fpn"}
CLASSIFIER = {"mobilenet_v1": "fc", "resnet50": "end_point"}
CLASS_NAMES = ["background", *(f"class{i}" for i in range(1, 81))]


@pytest.fixture(scope="module")
def zoo_imagenet(tmp_path_factory, mindspore_python):
    out = tmp_path_factory.mktemp("mindspore_fpn_imagenet")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([mindspore_python, str(HELPER), "--out", str(out), "--seed", "0", "--size", "256"],
                          cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _start_training_run(preset: str, ckpt: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model a new ``multibox train --config PRESET --set model.backbone_weights=CKPT`` starts from, and the
    state it had before the weights were loaded."""
    cfg = load_config(preset, [f"model.backbone_weights={ckpt}"])
    initial = plan_initial_weights(cfg)
    assert initial.backbone == ckpt and initial.detector is None
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_for_training(model, cfg, initial, CLASS_NAMES)
    return model, before


@pytest.mark.slow
@pytest.mark.parametrize("net", list(NETS))
def test_imagenet_trunk_gives_the_zoo_trunks_features(zoo_imagenet, net, caplog):
    """Same image, same c3 / c4 / c5 as the zoo's SSD trunk after train.py loaded the classification checkpoint;
    the classifier and the optimizer state in the file are not used; FPN, bottom-up levels and head unchanged."""
    ckpt = zoo_imagenet / f"{net}.ckpt"
    assert (zoo_imagenet / f"{net}.not_loaded.txt").read_text() == ""      # the zoo's rule loaded every entry
    source = read_mindspore_ckpt(ckpt)
    assert f"{CLASSIFIER[net]}.weight" in source and any(k.startswith("moments.") for k in source)
    with caplog.at_level(logging.INFO, logger="multibox"):
        model, before = _start_training_run(NETS[net], ckpt)
    assert any("ImageNet weights from" in r.getMessage() for r in caplog.records)
    body = model.backbone.body
    assert count_parameters(body) == int((zoo_imagenet / f"{net}.count.txt").read_text())
    for name, value in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        changed = not torch.equal(value, before[name])
        assert changed == name.startswith("backbone.body."), name
    x = torch.from_numpy(np.load(zoo_imagenet / "input.npy"))
    theirs = np.load(zoo_imagenet / f"{net}.features.npz")
    with torch.no_grad():
        ours = model.eval().backbone.body(x)
    for level, feature in zip(("c3", "c4", "c5"), ours):
        reference = torch.from_numpy(theirs[level])
        assert feature.shape == reference.shape
        assert reference.std() > 0.1                               # random weights: nothing trivially zero
        error = float((feature - reference).abs().max() / reference.abs().max())
        assert error < 1e-4, (level, error)


def _as_zoo_imagenet_file(net: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """A random trunk of ours, written under the zoo classification network's names with a classifier and an
    optimizer entry, as its train.py's checkpoint holds them: (our trunk state, file entries)."""
    torch.manual_seed(seed)
    model = build_model(load_config(NETS[net]))
    body = model.backbone.body
    for bn in (m for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    tensors = {theirs: state[ours].numpy() for ours, theirs in mindspore_fpn.imagenet_trunk_pairs(body)}
    width = 1024 if net == "mobilenet_v1" else 2048
    tensors[f"{CLASSIFIER[net]}.weight"] = np.zeros((1001, width), np.float32)
    tensors[f"{CLASSIFIER[net]}.bias"] = np.zeros(1001, np.float32)
    tensors["learning_rate"] = np.float32(0.1)
    return state, tensors


def test_both_fpn_archs_take_mindspore_trunks():
    assert {arch: MINDSPORE_BACKBONES[arch] for arch in ("ssd640_mobilenet_v1_fpn", "ssd640_resnet50_fpn")} == \
        {"ssd640_mobilenet_v1_fpn": "multibox.interop.mindspore_fpn",
         "ssd640_resnet50_fpn": "multibox.interop.mindspore_fpn"}


def test_trunk_names_are_the_classification_networks():
    """The names the zoo's checkpoints carry (official/cv/mobilenetv1, official/cv/resnet), by hand."""
    pairs = dict(mindspore_fpn.imagenet_trunk_pairs(build_model(load_config(NETS["mobilenet_v1"])).backbone.body))
    assert pairs["network.0.0.weight"] == "network.0.0.weight"
    assert pairs["network.26.1.running_var"] == "network.26.1.moving_variance"
    assert len(pairs) == 27 * 5                     # 27 conv-BN cells: conv weight and 4 BatchNorm entries each
    model = build_model(load_config(NETS["resnet50"]))
    pairs = dict(mindspore_fpn.imagenet_trunk_pairs(model.backbone.body))
    assert pairs["layer1.0.down_sample_layer.1.weight"] == "layer1.0.down_sample_layer.1.gamma"
    assert pairs["layer4.2.conv3.weight"] == "layer4.2.conv3.weight" and pairs["bn1.bias"] == "bn1.beta"
    assert len(pairs) == 53 * 5                     # 53 convolutions (49 + 4 shortcuts), each with a BatchNorm
    assert set(BATCHNORM_LEAVES.values()) <= {p.rsplit(".", 1)[1] for p in pairs.values()}


def test_mobilenet_trunk_round_trip_and_headless_file(tmp_path):
    """Every trunk entry arrives unchanged; a file without the classifier (whose every name then starts with
    ``network.``, which the reader strips as a training wrapper's) reads the same."""
    state, tensors = _as_zoo_imagenet_file("mobilenet_v1")
    for name, entries in (("full", tensors), ("headless", {k: v for k, v in tensors.items()
                                                           if k.startswith("network.")})):
        write_mindspore_ckpt(tmp_path / f"{name}.ckpt", entries)
        model, before = _start_training_run(NETS["mobilenet_v1"], tmp_path / f"{name}.ckpt")
        loaded = model.backbone.body.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), name
        assert torch.equal(model.state_dict()["head.cls_predictor.weight"], before["head.cls_predictor.weight"])


def test_truncated_trunk_file_is_refused(tmp_path):
    _, tensors = _as_zoo_imagenet_file("resnet50")
    del tensors["layer3.5.bn2.moving_mean"]
    write_mindspore_ckpt(tmp_path / "truncated.ckpt", tensors)
    with pytest.raises(WeightMappingError, match=r"missing.*layer3\.5\.bn2\.moving_mean"):
        _start_training_run(NETS["resnet50"], tmp_path / "truncated.ckpt")


def test_other_files_are_refused(tmp_path):
    _, tensors = _as_zoo_imagenet_file("mobilenet_v1")
    write_mindspore_ckpt(tmp_path / "extra.ckpt", dict(tensors, **{"network.27.0.weight": np.zeros(3, np.float32)}))
    with pytest.raises(WeightMappingError, match=r"map to nothing: network\.27\.0\.weight"):
        _start_training_run(NETS["mobilenet_v1"], tmp_path / "extra.ckpt")
    # A MobileNetV1 file for the ResNet50 preset: not that network's checkpoint, said in one line.
    write_mindspore_ckpt(tmp_path / "mobilenet.ckpt", tensors)
    with pytest.raises(WeightMappingError, match=r"not an ImageNet checkpoint of the model zoo's ResNet50"):
        _start_training_run(NETS["resnet50"], tmp_path / "mobilenet.ckpt")
