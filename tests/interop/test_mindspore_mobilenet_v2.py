"""The MindSpore model zoo's ``ssd300`` (SSD300 on MobileNetV2) as the ``ssd300-mobilenet-v2`` preset: its
checkpoints import exactly (``multibox import-weights --from mindspore``), and the preset's default boxes are the
zoo's.

The end-to-end tests build the zoo network in real MindSpore (tests/interop/mindspore_mobilenet_v2_net.py, run in
the separate MindSpore environment: the ``mindspore_python`` fixture skips, saying why, where there is none), save
it with ``mindspore.save_checkpoint``, and compare the imported network's raw outputs with MindSpore's. The default
boxes are checked against the zoo's formula (box_utils.py ``GeneratDefaultBoxes``) written out below, and the
trunk's shapes against torchvision's MobileNetV2, without MindSpore.
"""
from __future__ import annotations

import argparse
import itertools as it
import json
import math
import os
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import multibox
from multibox.cli import import_weights as import_weights_command
from multibox.cli import main
from multibox.config import load_config
from multibox.core.anchors import anchor_spec
from multibox.interop import mindspore_mobilenet_v2 as zoo
from multibox.interop.mindspore import (
    TUTORIAL_CLASS_NAMES,
    WeightMappingError,
    import_mindspore_ckpt,
    read_mindspore_ckpt,
    swap_yx_offsets,
    write_mindspore_ckpt,
)
from multibox.models import build_model, count_parameters
from multibox.models.same_padding import Conv2dSame

HELPER = Path(__file__).with_name("mindspore_mobilenet_v2_net.py")
PRESET = "ssd300-mobilenet-v2"


def _import_weights(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="multibox")
    import_weights_command.add_parser(parser.add_subparsers(dest="command", required=True))
    return import_weights_command.run(parser.parse_args(["import-weights", *args]))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------------------------- real MindSpore

@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory, mindspore_python):
    out = tmp_path_factory.mktemp("mindspore_mobilenet_v2")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([mindspore_python, str(HELPER), "--out", str(out), "--seed", "0"], cwd=out, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def imported(zoo_run, tmp_path_factory):
    """The zoo checkpoint through the real command, loaded back as a detector."""
    out = tmp_path_factory.mktemp("imported") / "zoo.pt"
    assert _import_weights(["--from", "mindspore", str(zoo_run / "zoo_ssd300.ckpt"), "--out", str(out)]) == 0
    return multibox.load(out, device="cpu")


def _ms_outputs(zoo_run: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(np.load(zoo_run / f"{n}.npy")) for n in ("loc", "cls_logits", "scores"))


@pytest.mark.slow   # the zoo network built and run in MindSpore (module fixture: ~15 s once)
def test_zoo_checkpoint_imports_to_the_same_network(zoo_run, imported):
    """Same normalised input, same outputs: loc (after the zoo's (dy, dx, dh, dw) -> our (dx, dy, dw, dh)),
    class logits and the zoo's inference scores (sigmoid), to float32 rounding."""
    assert imported.cfg.model.arch == "ssd300_mobilenet_v2" and imported.class_names == TUTORIAL_CLASS_NAMES
    x = torch.from_numpy(np.load(zoo_run / "input.npy"))
    with torch.no_grad():
        loc, cls = imported.model(x)
    ms_loc, ms_logits, ms_scores = _ms_outputs(zoo_run)
    assert loc.shape == ms_loc.shape == (1, 1917, 4) and cls.shape == ms_logits.shape == (1, 1917, 81)
    assert ms_loc.std() > 0.1 and ms_logits.std() > 0.1          # random weights: nothing trivially zero
    errors = {"loc": _relative_error(loc, ms_loc[..., [1, 0, 3, 2]]), "cls": _relative_error(cls, ms_logits),
              "scores": _relative_error(cls.sigmoid(), ms_scores)}
    print("ssd300-mobilenet-v2 vs MindSpore, max rel error:", errors,
          "max abs loc", float((loc - ms_loc[..., [1, 0, 3, 2]]).abs().max()),
          "cls", float((cls - ms_logits).abs().max()))
    assert max(errors.values()) < 1e-4
    assert _relative_error(loc, ms_loc) > 1e-2                   # the swap is real, not a no-op


@pytest.mark.slow   # the zoo network built and run in MindSpore (module fixture: ~15 s once)
def test_feature_maps_match_mindspore(zoo_run, imported):
    """Each of the six feature maps (shapes as the zoo's config: 576x19x19 .. 128x1x1) equals MindSpore's."""
    x = torch.from_numpy(np.load(zoo_run / "input.npy"))
    with torch.no_grad():
        ours = imported.model.backbone(x)
    theirs = np.load(zoo_run / "features.npz")
    shapes = [(1, 576, 19, 19), (1, 1280, 10, 10), (1, 512, 5, 5), (1, 256, 3, 3), (1, 256, 2, 2), (1, 128, 1, 1)]
    assert [tuple(f.shape) for f in ours] == shapes
    for i, feature in enumerate(ours):
        assert _relative_error(feature, torch.from_numpy(theirs[f"f{i}"])) < 1e-4, f"feature map {i}"


@pytest.mark.slow   # the zoo network built and run in MindSpore (module fixture: ~15 s once)
def test_symmetric_padding_would_not_match(zoo_run, imported):
    """MindSpore's 'same' at stride 2 pads bottom / right only: with PyTorch's symmetric padding=1 at the
    strided convolutions instead, the network computes something else (so the parity above checks the padding)."""
    model = imported.model
    strided = [m for m in model.modules() if isinstance(m, Conv2dSame)]
    assert len(strided) == 1 + 4 + 4          # the stem, MobileNetV2's four stride-2 blocks, the four extras

    def symmetric(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, 1, self.dilation, self.groups)

    x = torch.from_numpy(np.load(zoo_run / "input.npy"))
    originals = [m.forward for m in strided]
    try:
        for m in strided:
            m.forward = types.MethodType(symmetric, m)
        with torch.no_grad():
            _, cls = model(x)
    finally:
        for m, forward in zip(strided, originals):
            m.forward = forward
    assert _relative_error(cls, _ms_outputs(zoo_run)[1]) > 1e-2


@pytest.mark.slow   # the zoo network built and run in MindSpore (module fixture: ~15 s once)
def test_zoo_training_checkpoint_imports_to_the_same_weights(zoo_run, imported, tmp_path):
    """The same weights saved from a MindSpore training network as the zoo's train.py saves it (``network.*``
    names, Momentum's moments and coefficient, the per-step learning rate, the step): its optimizer state is
    refused by default and dropped with --ignore-training-state, giving exactly the network imported above."""
    path = zoo_run / "zoo_ssd300_train.ckpt"
    with pytest.raises(WeightMappingError, match=r"map to nothing: global_step, learning_rate, moments\.network\."):
        import_mindspore_ckpt(path)
    out = tmp_path / "trained.pt"
    assert _import_weights(["--from", "mindspore", str(path), "--out", str(out), "--ignore-training-state"]) == 0
    state, expected = multibox.load(out, device="cpu").model.state_dict(), imported.model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.slow   # the zoo network built and run in MindSpore (module fixture: ~15 s once)
def test_recognised_and_every_parameter_mapped(zoo_run):
    """The file is recognised as this network (and not as another one), each of its entries is read with its
    shape and mapped, and our parameter count equals the MindSpore network's trainable parameter count."""
    names = dict(line.split(" ", 1) for line in (zoo_run / "names.txt").read_text().splitlines())
    source = read_mindspore_ckpt(zoo_run / "zoo_ssd300.ckpt")
    assert {k: str(tuple(v.shape)) for k, v in source.items()} == names
    assert {theirs for _, theirs in zoo.zoo_mobilenet_v2_pairs()} == set(names)
    assert zoo.recognise(source)
    from multibox.interop import mindspore as tutorial
    assert not tutorial.recognise(source)
    counts = dict(line.split() for line in (zoo_run / "counts.txt").read_text().splitlines())
    model = build_model(load_config(PRESET))
    assert count_parameters(model) == int(counts["trainable"]) == 4_393_461
    buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert count_parameters(model) + buffers == int(counts["all"])


# --------------------------------------------------------------------------------------------- without MindSpore

def zoo_default_boxes_cyxhw() -> np.ndarray:
    """The zoo's ``GeneratDefaultBoxes`` for ssd300_config.yaml, written out: (1917, 4) (cy, cx, h, w) float32."""
    feature_size, steps, num_default = [19, 10, 5, 3, 2, 1], [16, 32, 64, 100, 150, 300], [3, 6, 6, 6, 6, 6]
    aspect_ratios = [[], [2, 3], [2, 3], [2, 3], [2, 3], [2, 3]]
    fk = 300 / np.array(steps)
    rate = (0.95 - 0.2) / (len(num_default) - 1)
    scales = [0.2 + rate * i for i in range(len(num_default))] + [1.0]
    boxes = []
    for level, size in enumerate(feature_size):
        sk1, sk2 = scales[level], scales[level + 1]
        if level == 0:
            all_sizes = [(0.1, 0.1), (sk1 * math.sqrt(2), sk1 / math.sqrt(2)), (sk1 / math.sqrt(2), sk1 * math.sqrt(2))]
        else:
            all_sizes = [(sk1, sk1)]
            for r in aspect_ratios[level]:
                all_sizes += [(sk1 * math.sqrt(r), sk1 / math.sqrt(r)), (sk1 / math.sqrt(r), sk1 * math.sqrt(r))]
            all_sizes.append((math.sqrt(sk1 * sk2),) * 2)
        for i, j in it.product(range(size), repeat=2):
            for w, h in all_sizes:
                boxes.append([(i + 0.5) / fk[level], (j + 0.5) / fk[level], h, w])
    return np.array(boxes, dtype=np.float32)


def test_default_boxes_are_the_zoos():
    """1917 boxes = 19²·3 + 10²·6 + 5²·6 + 3²·6 + 2²·6 + 1·6, level by level, equal to the zoo's formula; a few
    by hand: the first (level 0's (0.1, 0.1) at centre 0.5 / 18.75), level 1's first and the very last."""
    cfg = load_config(PRESET)
    spec = anchor_spec(cfg.anchors, cfg.model.image_size)
    assert spec.boxes_per_location() == [3, 6, 6, 6, 6, 6]
    assert spec.num_anchors() == 1083 + 600 + 150 + 54 + 24 + 6 == 1917
    anchors = build_model(cfg).anchors_cxcywh                     # (A, 4) cx, cy, w, h
    expected = torch.from_numpy(zoo_default_boxes_cyxhw()[:, [1, 0, 3, 2]])
    torch.testing.assert_close(anchors, expected, rtol=0, atol=1e-7)
    c = 0.5 / 18.75
    torch.testing.assert_close(anchors[:3], torch.tensor([[c, c, 0.1, 0.1], [c, c, 0.2 * 2 ** 0.5, 0.2 / 2 ** 0.5],
                                                          [c, c, 0.2 / 2 ** 0.5, 0.2 * 2 ** 0.5]]))
    torch.testing.assert_close(anchors[1083], torch.tensor([0.5 / 9.375, 0.5 / 9.375, 0.35, 0.35]))
    torch.testing.assert_close(anchors[-1], torch.tensor([0.5, 0.5, 0.95 ** 0.5, 0.95 ** 0.5]))


def test_trunk_is_mobilenet_v2():
    """The trunk's parameters, in order, have the shapes of torchvision's MobileNetV2 ``features`` (2,223,872
    parameters), the zoo's ``expand_layer_conv_13`` is a layer of its own (96 -> 576) next to block 13's."""
    torchvision = pytest.importorskip("torchvision")
    ours = build_model(load_config(PRESET)).backbone
    reference = torchvision.models.mobilenet_v2().features
    assert [p.shape for p in ours.features.parameters()] == [p.shape for p in reference.parameters()]
    assert count_parameters(ours.features) == 2_223_872
    assert ours.expand_13[0].weight.shape == ours.features[14].conv[0][0].weight.shape == (576, 96, 1, 1)
    assert ours.expand_13[0].weight is not ours.features[14].conv[0][0].weight


def _as_zoo_checkpoint(prefix: str = "") -> tuple[dict, dict]:
    """A random preset model, and its tensors under the zoo's names (loc heads back in (dy, dx, dh, dw))."""
    torch.manual_seed(0)
    model = build_model(load_config(PRESET))
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    tensors = {}
    for ours, theirs in zoo.zoo_mobilenet_v2_pairs():
        value = state[ours]
        if ours.startswith("loc_heads.") and ours.split(".")[2] == "3":
            value = swap_yx_offsets(value)
        tensors[prefix + theirs] = value.numpy()
    return state, tensors


def test_round_trip_of_a_training_checkpoint(tmp_path):
    """A checkpoint as the zoo's train.py saves it (every name under ``network.``, optimizer moments, step and
    learning rate) imports with ``ignore_training_state`` to exactly the weights it was written from."""
    state, tensors = _as_zoo_checkpoint("network.")
    tensors.update({"moments.network.backbone.features_1.0.features.0.weight":
                    tensors["network.backbone.features_1.0.features.0.weight"],
                    "global_step": np.array(10, np.int32), "learning_rate": np.zeros(3, np.float32),
                    "momentum": np.array(0.9, np.float32)})
    write_mindspore_ckpt(tmp_path / "train.ckpt", tensors)
    leftovers = r"map to nothing: global_step, learning_rate, moments\.network\.[^ ]*, momentum$"
    with pytest.raises(WeightMappingError, match=leftovers):
        import_mindspore_ckpt(tmp_path / "train.ckpt")
    payload = import_mindspore_ckpt(tmp_path / "train.ckpt", ignore_training_state=True)
    assert payload["config"]["model"]["arch"] == "ssd300_mobilenet_v2"
    assert payload["imported_from"] == "mindspore:train.ckpt" and payload["class_names"] == TUTORIAL_CLASS_NAMES
    assert payload["model"].keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(payload["model"][name], value), name


def test_import_fails_loudly_on_missing_and_misshapen_entries(tmp_path):
    _, tensors = _as_zoo_checkpoint()
    missing = {k: v for k, v in tensors.items() if k != "multi_residual.2.conv.1.features.1.moving_variance"}
    write_mindspore_ckpt(tmp_path / "missing.ckpt", missing)
    with pytest.raises(WeightMappingError, match=r"missing from the file: multi_residual\.2\.conv\.1\.features\.1"):
        import_mindspore_ckpt(tmp_path / "missing.ckpt")
    wrong = dict(tensors, **{"backbone.expand_layer_conv_13.features.0.weight": np.zeros((576, 96, 3, 3), "f4")})
    write_mindspore_ckpt(tmp_path / "wrong.ckpt", wrong)
    with pytest.raises(WeightMappingError, match=r"shapes differ: backbone\.expand_layer_conv_13"):
        import_mindspore_ckpt(tmp_path / "wrong.ckpt")


def test_helper_script_is_valid_python():
    compile(HELPER.read_text(), str(HELPER), "exec")


@pytest.mark.slow
def test_preset_trains_on_cpu(tmp_path):
    """Three steps of ``multibox train --config ssd300-mobilenet-v2`` on the same two synthetic images (batch 2:
    BatchNorm on the 1x1 maps needs more than one value per channel), augmentation off: the loss goes down."""
    out = tmp_path / "run"
    overrides = [f"data.synth_root={tmp_path / 'synth'}", "data.synth_train_images=2", "data.synth_val_images=1",
                 "data.num_workers=0", "data.crop_rule=none", "data.flip_p=0", "data.jitter=[0,0,0]",
                 "train.epochs=3", "train.batch_size=2", "train.lr=0.01", "train.warmup_epochs=0",
                 "train.log_every=1", "train.checkpoint_every=0", "train.threads=1"]
    args = ["train", "--config", PRESET, "--data", "synth", "--out", str(out), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    print("ssd300-mobilenet-v2 losses:", losses)
    assert (out / "eval.json").is_file() and len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[2] < losses[1] < losses[0]
