"""ImageNet weights of the MindSpore model zoo's MobileNetV2 as the trunk of ``ssd300-mobilenet-v2``
(``--set model.backbone_weights=FILE.ckpt``; multibox.interop.mindspore_mobilenet_v2 ``load_trunk``).

The end-to-end test builds the zoo's ImageNet classifier in real MindSpore (official/cv/mobilenetv2, written out
in tests/interop/mindspore_mobilenet_v2_imagenet_net.py and run in the separate MindSpore environment: the
``mindspore_python`` fixture skips, saying why, where there is none), saves it with ``mindspore.save_checkpoint``,
and compares our trunk, loaded through ``multibox train``'s path (plan_initial_weights, load_initial_weights), with
the zoo SSD's trunk that MindSpore fills from the same file by the names of the SSD's init_params.py
``load_backbone_params``. The names' mapping is checked against names written out by hand from the zoo's source;
the refusals run without MindSpore, on files written with ``write_mindspore_ckpt``.
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
from multibox.interop import mindspore_mobilenet_v2 as zoo
from multibox.interop.mindspore import write_mindspore_ckpt
from multibox.interop.pretrained import load_initial_weights
from multibox.models import build_model
from multibox.models.published import plan_initial_weights
from multibox.models.weights import WeightMappingError

HELPER = Path(__file__).with_name("mindspore_mobilenet_v2_imagenet_net.py")
PRESET = "ssd300-mobilenet-v2"
CLASS_NAMES = ["background", "cat", "dog", "kite"]
TRUNK_ENTRIES = 260      # 52 BatchNorms x 4 + 52 convolutions (19 modules of MobileNetV2's features)


def _trunk_keys(model: torch.nn.Module) -> set[str]:
    return {k for k in model.state_dict() if k.startswith("backbone.features.") and "num_batches_tracked" not in k}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _load(path: Path, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A fresh model of the preset (3 classes) with ``model.backbone_weights=path`` loaded as ``multibox train``
    loads it; returns it and its state before loading."""
    cfg = load_config(PRESET, ["model.num_classes=3", f"model.backbone_weights={path}"])
    initial = plan_initial_weights(cfg)
    assert initial.detector is None and initial.backbone == path
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_initial_weights(model, cfg, initial, CLASS_NAMES)
    return model, before


# --------------------------------------------------------------------------------------------- without MindSpore

def test_mapping_names_the_zoo_entries():
    """Spot checks written from the zoo's source (ConvBNReLU ``.features.{0: conv, 1: BN}``, InvertedResidual
    ``.conv.{j}``; block 1 (t = 1) has no expansion), and the mapping covers exactly our trunk."""
    pairs = dict(zoo.imagenet_mobilenet_v2_pairs())
    assert pairs["backbone.features.0.0.weight"] == "features.0.features.0.weight"
    assert pairs["backbone.features.1.conv.0.0.weight"] == "features.1.conv.0.features.0.weight"
    assert pairs["backbone.features.1.conv.1.weight"] == "features.1.conv.1.weight"
    assert pairs["backbone.features.2.conv.1.1.running_mean"] == "features.2.conv.1.features.1.moving_mean"
    assert pairs["backbone.features.14.conv.3.running_var"] == "features.14.conv.3.moving_variance"
    assert pairs["backbone.features.18.1.weight"] == "features.18.features.1.gamma"
    assert dict(zoo.imagenet_mobilenet_v2_pairs("backbone."))["backbone.features.7.conv.2.weight"] == \
        "backbone.7.conv.2.weight"
    model = build_model(load_config(PRESET, ["model.num_classes=3", "model.from_scratch=true"]))
    assert set(pairs) == _trunk_keys(model) and len(pairs) == TRUNK_ENTRIES


def _imagenet_file(path: Path, prefix: str = "features.", drop: str | None = None, extra: dict | None = None) -> dict:
    """A classifier-shaped checkpoint (random values) with ``drop`` left out and ``extra`` added; returns it."""
    model = build_model(load_config(PRESET, ["model.num_classes=3", "model.from_scratch=true"]))
    target, rng = model.state_dict(), np.random.default_rng(1)
    tensors = {theirs: rng.standard_normal(tuple(target[ours].shape)).astype(np.float32)
               for ours, theirs in zoo.imagenet_mobilenet_v2_pairs(prefix) if theirs != drop}
    tensors.update({"head.1.weight": np.zeros((1000, 1280), np.float32), "head.1.bias": np.zeros(1000, np.float32),
                    **(extra or {})})
    write_mindspore_ckpt(path, tensors)
    return tensors


def test_classifier_of_the_other_naming_is_ignored(tmp_path):
    """The zoo file's ``MobileNetV2`` class names the trunk ``backbone.{i}``: loaded the same way, the classifier
    ignored, values as in the file."""
    tensors = _imagenet_file(tmp_path / "mobilenetv2.ckpt", prefix="backbone.")
    model, _ = _load(tmp_path / "mobilenetv2.ckpt")
    state = model.state_dict()
    for ours, theirs in zoo.imagenet_mobilenet_v2_pairs("backbone."):
        assert torch.equal(state[ours], torch.from_numpy(tensors[theirs])), ours


def test_truncated_trunk_file_is_refused(tmp_path):
    """A file without one trunk entry: the error names it, and nothing is loaded half-way."""
    _imagenet_file(tmp_path / "cut.ckpt", drop="features.17.conv.2.weight")
    with pytest.raises(WeightMappingError, match=r"1 parameters missing.*features\.17\.conv\.2\.weight"):
        _load(tmp_path / "cut.ckpt")


def test_unknown_entries_and_the_whole_ssd_are_refused(tmp_path):
    """An entry that is neither trunk nor classifier is named; the zoo's whole ssd300 checkpoint is pointed to
    import-weights; a file without MobileNetV2's stem says so."""
    _imagenet_file(tmp_path / "more.ckpt", extra={"features.19.features.0.weight": np.zeros((8, 8, 1, 1), np.float32)})
    with pytest.raises(WeightMappingError, match=r"map to nothing: features\.19\.features\.0\.weight"):
        _load(tmp_path / "more.ckpt")
    write_mindspore_ckpt(tmp_path / "ssd.ckpt", {n: np.zeros(1, np.float32) for n in (
        "backbone.features_1.0.features.0.weight", "backbone.expand_layer_conv_13.features.0.weight")})
    with pytest.raises(WeightMappingError, match="import-weights --from mindspore"):
        _load(tmp_path / "ssd.ckpt")
    write_mindspore_ckpt(tmp_path / "other.ckpt", {"conv1.weight": np.zeros((8, 3, 3, 3), np.float32)})
    with pytest.raises(WeightMappingError, match="not an ImageNet checkpoint of the MindSpore model zoo's MobileNetV2"):
        _load(tmp_path / "other.ckpt")


# --------------------------------------------------------------------------------------------- real MindSpore

@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory, mindspore_python):
    out = tmp_path_factory.mktemp("mindspore_mobilenet_v2_imagenet")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([mindspore_python, str(HELPER), "--out", str(out), "--seed", "0"], cwd=out, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow   # the zoo's classifier and SSD trunk built and run in MindSpore (module fixture: ~5 s once)
@pytest.mark.parametrize("file", ["mobilenetv2_imagenet.ckpt", "mobilenetv2_imagenet_train.ckpt"])
def test_imagenet_checkpoint_gives_the_zoo_ssds_trunk(imagenet_run, file, caplog):
    """Through ``multibox train``'s path: the trunk's two outputs (after ``features[:14]``: 96x19x19, and the
    end: 1280x10x10) equal the zoo SSD trunk's in MindSpore to float32 rounding, from the plain checkpoint and
    from the training network's (optimizer state beside the weights); every trunk tensor is the file's, the rest
    (expand_13, extras, heads) keeps its initialisation. The classifier's own features (symmetric padding, BN eps
    1e-5) are another function: the parity is the SSD's, not any MobileNetV2's."""
    with caplog.at_level(logging.INFO, logger="multibox.models"):
        model, before = _load(imagenet_run / file)
    assert f"{TRUNK_ENTRIES} trunk tensors" in caplog.text
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == _trunk_keys(model)
    names = (imagenet_run / "names.txt").read_text().split("\n")
    assert sum(n.startswith("features.") for n in names) == TRUNK_ENTRIES

    x = torch.from_numpy(np.load(imagenet_run / "input.npy"))
    reference = np.load(imagenet_run / "trunk.npz")
    with torch.no_grad():
        split = model.backbone.features[:zoo.SPLIT](x)
        last = model.backbone.features[zoo.SPLIT:](split)
    for name, ours in (("split", split), ("last", last)):
        theirs = torch.from_numpy(reference[name])
        assert ours.shape == theirs.shape and theirs.std() > 0.1, name
        error = _relative_error(ours, theirs)
        print(f"{file} {name} {tuple(ours.shape)}: max abs {float((ours - theirs).abs().max()):.3g}, "
              f"max rel {error:.3g}")
        assert error < 1e-4, name
    assert _relative_error(last, torch.from_numpy(reference["classifier_last"])) > 1e-2
