"""Importing MindSpore's SSD300-VGG16 checkpoints (``multibox import-weights --from mindspore``) without MindSpore:
the tutorial's ``SSD300Vgg16`` and the model zoo's ``SSD300VGG16``, with and without its ``ssd_vgg_bn`` option.

The end-to-end tests build each network in real MindSpore (tests/interop/mindspore_tutorial_net.py, run once for
all three layouts with the Python of a separate environment, because MindSpore needs numpy < 2), save a
checkpoint with ``mindspore.save_checkpoint`` and the network's outputs on a fixed input, import the checkpoint and
compare. That environment is found through ``MULTIBOX_MINDSPORE_PYTHON`` or at ``.venv-mindspore/bin/python`` in
the repository root (the ``mindspore_python`` fixture of tests/conftest.py); without it, or without mindspore in
it, those tests are skipped with that reason. The protobuf reader itself is also tested on bytes that MindSpore
2.10 wrote (embedded below), and every layout's name mapping on checkpoints written here, so CI checks them even
without MindSpore.
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MINDSPORE_HOW, REPO, find_mindspore_python
import multibox
from multibox.cli import import_weights as import_weights_command
import multibox.interop.mindspore as mindspore_interop
from multibox.interop.mindspore import (
    TUTORIAL_CLASS_NAMES,
    WeightMappingError,
    _checkpoint_message_class,
    import_mindspore_ckpt,
    mindspore_vgg16_pairs,
    read_mindspore_ckpt,
    swap_yx_offsets,
    vgg16_layout,
    write_mindspore_ckpt,
)
from multibox.config import Config, load_config
from multibox.models import build_model, count_parameters, model_from_state_dict

HELPER = Path(__file__).with_name("mindspore_tutorial_net.py")

# Written by MindSpore 2.10: ms.save_checkpoint([layer.weight (2, 3) float32 = arange(6)/4 - 0.5,
# layer.half float16 [1.5, -2.25, 65504], global_step int32 scalar 7, layer.bf16 bfloat16 [1, -0.5, 3]], path),
# the second with crc_check=True.
MS_SMALL_CKPT = (
    "CjcKDGxheWVyLndlaWdodBInCAIIAxIHRmxvYXQzMhoYAAAAvwAAgL4AAAAAAACAPgAAAD8AAEA/CiEKCmxheWVyLmhhbGYSEwgDEgdGbG9h"
    "dDE2GgYAPoDA/3sKHAoLZ2xvYmFsX3N0ZXASDRIFSW50MzIaBAcAAAAKIgoKbGF5ZXIuYmYxNhIUCAMSCEJGbG9hdDE2GgaAPwC/QEA=")
MS_SMALL_CRC_CKPT = (
    "CjcKDGxheWVyLndlaWdodBInCAIIAxIHRmxvYXQzMhoYAAAAvwAAgL4AAAAAAACAPgAAAD8AAEA/CiEKCmxheWVyLmhhbGYSEwgDEgdGbG9h"
    "dDE2GgYAPoDA/3sKHAoLZ2xvYmFsX3N0ZXASDRIFSW50MzIaBAcAAAAKIgoKbGF5ZXIuYmYxNhIUCAMSCEJGbG9hdDE2GgaAPwC/QEBjcmNf"
    "bnVtAAAAAAAAojJGRA==")


def _import_weights(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="multibox")
    import_weights_command.add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["import-weights", *args])
    return import_weights_command.run(ns)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------------------------- real MindSpore

# layout -> (preset, model.vgg_relu, model.vgg_bn, default boxes, MindSpore parameters and BN statistics)
LAYOUTS = {"tutorial": ("ssd300-vgg16-seed", False, False, 8732, 107),
           "zoo": ("ssd300-vgg16-zoo", True, False, 7308, 107),
           "zoo_bn": ("ssd300-vgg16-zoo", True, True, 7308, 159)}


@pytest.fixture(scope="module")
def mindspore_runs(tmp_path_factory, mindspore_python):
    """All three networks, built once each in MindSpore: DIR/LAYOUT/{net.ckpt, input.npy, loc.npy, ...}."""
    out = tmp_path_factory.mktemp("mindspore")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([mindspore_python, str(HELPER), "--out", str(out), "--seed", "0", "--layout", *LAYOUTS],
                          cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def imported(mindspore_runs, tmp_path_factory):
    """Each layout's checkpoint through ``multibox import-weights``, loaded, with its raw outputs on MindSpore's
    input: layout -> (detector, loc, cls logits)."""
    tmp = tmp_path_factory.mktemp("imported")
    out = {}
    for layout in LAYOUTS:
        assert _import_weights(["--from", "mindspore", str(mindspore_runs / layout / "net.ckpt"), "--out",
                                str(tmp / f"{layout}.pt")]) == 0
        detector = multibox.load(tmp / f"{layout}.pt", device="cpu")
        with torch.no_grad():
            loc, cls = detector.model(torch.from_numpy(np.load(mindspore_runs / layout / "input.npy")))
        out[layout] = detector, loc, cls
    return out


@pytest.mark.slow     # one MindSpore build of each network (~15 s of CPU, once for all four tests)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_checkpoint_imports_to_the_same_network(layout, mindspore_runs, imported):
    """Recognised as the right network, and the same outputs on the same normalised input: loc (after the
    documented (dy, dx, dh, dw) -> (dx, dy, dw, dh) reordering), class logits, and the inference scores (sigmoid)."""
    preset, relu, batch_norm, num_boxes, _ = LAYOUTS[layout]
    detector, loc, cls = imported[layout]
    model_cfg = detector.cfg.model
    assert (model_cfg.arch, model_cfg.vgg_relu, model_cfg.vgg_bn) == ("ssd300_vgg16_seed", relu, batch_norm)
    assert detector.cfg.anchors == load_config(preset).anchors and detector.class_names == TUTORIAL_CLASS_NAMES
    run = mindspore_runs / layout
    ms_loc = torch.from_numpy(np.load(run / "loc.npy"))
    ms_logits = torch.from_numpy(np.load(run / "cls_logits.npy"))
    ms_scores = torch.from_numpy(np.load(run / "scores.npy"))
    assert loc.shape == ms_loc.shape == (1, num_boxes, 4) and cls.shape == ms_logits.shape == (1, num_boxes, 81)
    assert ms_loc.std() > 0.1 and ms_logits.std() > 0.1          # random weights: nothing trivially zero
    errors = {"loc": (loc, ms_loc[..., [1, 0, 3, 2]]), "cls": (cls, ms_logits), "scores": (cls.sigmoid(), ms_scores)}
    for name, (ours, theirs) in errors.items():
        print(f"{layout} {name}: max abs {float((ours - theirs).abs().max()):.2e}, "
              f"max rel {_relative_error(ours, theirs):.2e}")
        assert _relative_error(ours, theirs) < 1e-4, name
    # Without the reordering the outputs differ: the swap is real, not a no-op.
    assert _relative_error(loc, ms_loc) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_default_boxes_are_the_sources(layout, mindspore_runs, imported):
    """The preset's anchors are the boxes the source's GeneratDefaultBoxes makes ([cy, cx, h, w], same order)."""
    theirs = torch.from_numpy(np.load(mindspore_runs / layout / "default_boxes.npy"))[:, [1, 0, 3, 2]]
    ours = imported[layout][0].model.anchors_cxcywh
    assert ours.shape == theirs.shape == (LAYOUTS[layout][3], 4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("vgg_relu_of", ["tutorial", "zoo"])
def test_the_vgg_relus_are_what_the_outputs_depend_on(vgg_relu_of, mindspore_runs, imported):
    """The same weights computed with the other ``model.vgg_relu`` miss MindSpore's outputs by far: the parity
    above tells a VGG16 with ReLUs from one without (today's bug, ReLUs in the tutorial's network, fails it)."""
    detector, _, cls = imported[vgg_relu_of]
    cfg = Config.from_dict(detector.cfg.to_dict())
    cfg.model.vgg_relu = not cfg.model.vgg_relu
    other = model_from_state_dict(cfg, detector.model.state_dict()).eval()
    with torch.no_grad():
        _, other_cls = other(torch.from_numpy(np.load(mindspore_runs / vgg_relu_of / "input.npy")))
    ms_logits = torch.from_numpy(np.load(mindspore_runs / vgg_relu_of / "cls_logits.npy"))
    assert _relative_error(cls, ms_logits) < 1e-4 and _relative_error(other_cls, ms_logits) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_mindspore_parameter_is_read_with_its_shape(layout, mindspore_runs, imported):
    """Names and shapes as MindSpore lists them, all mapped; our parameter count is MindSpore's (BN statistics
    are buffers here, parameters there)."""
    names = dict(line.split(" ", 1) for line in (mindspore_runs / layout / "names.txt").read_text().splitlines())
    source = read_mindspore_ckpt(mindspore_runs / layout / "net.ckpt")
    assert len(source) == len(names) == LAYOUTS[layout][4]
    assert {k: str(tuple(v.shape)) for k, v in source.items()} == names
    assert vgg16_layout(source) == layout
    assert {theirs for _, theirs in mindspore_vgg16_pairs(layout)} == set(names)
    trainable = sum(v.size for k, v in source.items() if ".moving_" not in k)
    print(f"{layout}: {count_parameters(imported[layout][0].model):,} parameters, MindSpore's {trainable:,}")
    assert count_parameters(imported[layout][0].model) == trainable


# --------------------------------------------------------------------------------------------- the reader

def _expected_small() -> dict[str, np.ndarray]:
    return {"layer.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 4 - 0.5,
            "layer.half": np.array([1.5, -2.25, 65504], dtype=np.float16),
            "global_step": np.array(7, dtype=np.int32),
            "layer.bf16": np.array([1.0, -0.5, 3.0], dtype=np.float32)}


@pytest.mark.parametrize("blob", [MS_SMALL_CKPT, MS_SMALL_CRC_CKPT], ids=["plain", "crc"])
def test_reader_on_bytes_written_by_mindspore(blob, tmp_path):
    path = tmp_path / "small.ckpt"
    path.write_bytes(base64.b64decode(blob))
    got = read_mindspore_ckpt(path)
    expected = _expected_small()
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value)


def test_reader_detects_damage_and_foreign_files(tmp_path):
    data = bytearray(base64.b64decode(MS_SMALL_CRC_CKPT))
    data[40] ^= 0x01                               # one bit of layer.weight's content
    (tmp_path / "damaged.ckpt").write_bytes(bytes(data))
    with pytest.raises(WeightMappingError, match="CRC check failed"):
        read_mindspore_ckpt(tmp_path / "damaged.ckpt")
    (tmp_path / "noise.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightMappingError, match="not a MindSpore checkpoint"):
        read_mindspore_ckpt(tmp_path / "noise.ckpt")


def test_reader_joins_slices_of_large_tensors(tmp_path):
    """MindSpore writes a tensor over 512 MiB as consecutive entries with the same tag and the full dims."""
    full = np.arange(24, dtype=np.float32).reshape(4, 6)
    message_class = _checkpoint_message_class()
    with open(tmp_path / "sliced.ckpt", "wb") as f:
        for part in np.array_split(full, 3):
            msg = message_class()
            entry = msg.value.add(tag="big")
            entry.tensor.dims.extend(full.shape)
            entry.tensor.tensor_type = "Float32"
            entry.tensor.tensor_content = part.tobytes()
            f.write(msg.SerializeToString())
    np.testing.assert_array_equal(read_mindspore_ckpt(tmp_path / "sliced.ckpt")["big"], full)
    write_mindspore_ckpt(tmp_path / "twice.ckpt", {"a": full, "b": full})
    data = (tmp_path / "twice.ckpt").read_bytes()
    (tmp_path / "twice.ckpt").write_bytes(data + data[: len(data) // 2])   # "a" again after "b"
    with pytest.raises(WeightMappingError, match="appears twice"):
        read_mindspore_ckpt(tmp_path / "twice.ckpt")


# --------------------------------------------------------------------------------------------- the mapping

def test_swap_yx_offsets_by_hand():
    bias = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0])      # two anchors: (dy, dx, dh, dw)
    assert swap_yx_offsets(bias).tolist() == [1.0, 0.0, 3.0, 2.0, 11.0, 10.0, 13.0, 12.0]
    weight = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 1, 1)
    assert swap_yx_offsets(weight)[:, 2, 0, 0].tolist() == [1.0, 0.0, 3.0, 2.0, 5.0, 4.0, 7.0, 6.0]


def _as_mindspore(cfg: Config, layout: str) -> tuple[dict, dict]:
    """A model of ``cfg`` (random BN statistics too) and its tensors under MindSpore's names of ``layout`` (loc
    heads back in (dy, dx, dh, dw))."""
    torch.manual_seed(0)
    model = build_model(cfg)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    tensors = {}
    for ours, theirs in mindspore_vgg16_pairs(layout, len(cfg.anchors.feature_sizes)):
        value = state[ours]
        if ours.startswith("loc_heads.") and ours.split(".")[2] == "3":      # the last 1x1 conv of a loc head
            value = swap_yx_offsets(value)
        tensors[theirs] = value.numpy()
    return state, tensors


@pytest.fixture(scope="module")
def seed_as_mindspore():
    """A seed-preset model written under the tutorial's parameter names."""
    return _as_mindspore(load_config("ssd300-vgg16-seed"), "tutorial")


@pytest.fixture(scope="module")
def zoo_bn_as_mindspore():
    """A zoo-preset model with ``vgg_bn`` written under the zoo's ``ssd_vgg_bn`` names (bN.0/3/6, BN at 1/4/7)."""
    return _as_mindspore(load_config("ssd300-vgg16-zoo", ["model.vgg_bn=true"]), "zoo_bn")


def _assert_round_trip(payload, state):
    assert payload["model"].keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(payload["model"][name], value), name


def test_round_trip_through_tutorial_names(seed_as_mindspore, tmp_path):
    state, tensors = seed_as_mindspore
    assert {k for k in tensors if k.startswith("backbone.b1.")} == {"backbone.b1.0.weight", "backbone.b1.1.weight"}
    write_mindspore_ckpt(tmp_path / "seed.ckpt", tensors)
    payload = import_mindspore_ckpt(tmp_path / "seed.ckpt")
    assert payload["config"]["model"]["arch"] == "ssd300_vgg16_seed" and payload["class_names"][0] == "background"
    assert payload["config"]["model"]["vgg_relu"] is False and payload["config"]["model"]["vgg_bn"] is False
    _assert_round_trip(payload, state)


def test_round_trip_through_zoo_bn_names(zoo_bn_as_mindspore, tmp_path):
    """Every BatchNorm of the VGG stages lands where it belongs (gamma -> weight, moving_mean -> running_mean...)."""
    state, tensors = zoo_bn_as_mindspore
    assert {k for k in tensors if k.startswith("backbone.b1.")} == {
        "backbone.b1.0.weight", "backbone.b1.3.weight",
        *(f"backbone.b1.{i}.{p}" for i in (1, 4) for p in ("gamma", "beta", "moving_mean", "moving_variance"))}
    write_mindspore_ckpt(tmp_path / "zoo_bn.ckpt", tensors)
    payload = import_mindspore_ckpt(tmp_path / "zoo_bn.ckpt")
    assert payload["config"]["model"]["vgg_relu"] is True and payload["config"]["model"]["vgg_bn"] is True
    assert payload["config"]["anchors"] == load_config("ssd300-vgg16-zoo").anchors.__dict__
    _assert_round_trip(payload, state)


def test_a_training_network_checkpoint_imports(seed_as_mindspore, tmp_path):
    """The zoo's train.py saves TrainingWrapper(SSDWithLossCell(net)): weights ``network.*``, the optimizer's
    ``moments.network.*``, and nn.Momentum's ``momentum``, next to ``global_step`` and ``learning_rate`` (the names
    MindSpore 2.10 gives such a network)."""
    state, tensors = seed_as_mindspore
    trained = {f"network.{k}": v for k, v in tensors.items()}
    trained.update({"global_step": np.array([7], np.int32), "learning_rate": np.array(0.05, np.float32),
                    "momentum": np.array(0.9, np.float32), "moments.network.b6_1.weight": tensors["b6_1.weight"]})
    write_mindspore_ckpt(tmp_path / "trained.ckpt", trained)
    with pytest.raises(WeightMappingError, match=r"map to nothing: global_step, learning_rate, "
                                                 r"moments\.network\.b6_1\.weight, momentum"):
        import_mindspore_ckpt(tmp_path / "trained.ckpt")
    _assert_round_trip(import_mindspore_ckpt(tmp_path / "trained.ckpt", ignore_training_state=True), state)


def test_import_fails_loudly_on_missing_and_leftover_entries(seed_as_mindspore, tmp_path):
    _, tensors = seed_as_mindspore
    missing = {k: v for k, v in tensors.items() if k != "multi_box.multi_cls_layers.2.1.moving_mean"}
    write_mindspore_ckpt(tmp_path / "missing.ckpt", missing)
    with pytest.raises(WeightMappingError,
                       match=r"missing from the file: multi_box\.multi_cls_layers\.2\.1\.moving_mean"):
        import_mindspore_ckpt(tmp_path / "missing.ckpt")

    trained = dict(tensors, **{"moments.b6_1.weight": tensors["b6_1.weight"], "global_step": np.array(5, np.int32)})
    write_mindspore_ckpt(tmp_path / "trained.ckpt", trained)
    with pytest.raises(WeightMappingError, match=r"map to nothing: global_step, moments\.b6_1\.weight"):
        import_mindspore_ckpt(tmp_path / "trained.ckpt")
    assert import_mindspore_ckpt(tmp_path / "trained.ckpt", ignore_training_state=True)["model"]

    wrong = dict(tensors, **{"b7_1.weight": np.zeros((1024, 1024, 3, 3), np.float32)})
    write_mindspore_ckpt(tmp_path / "wrong.ckpt", wrong)
    with pytest.raises(WeightMappingError, match=r"shapes differ: b7_1\.weight \(1024, 1024, 3, 3\)"):
        import_mindspore_ckpt(tmp_path / "wrong.ckpt")


def _first_stage(convs, batch_norm_at=()):
    """Names and shapes of a first VGG stage with convolutions at ``convs`` and BatchNorms at ``batch_norm_at``."""
    source = {f"backbone.b1.{i}.weight": np.zeros((64, 3 if n == 0 else 64, 3, 3), np.float32)
              for n, i in enumerate(convs)}
    for i in batch_norm_at:
        source.update({f"backbone.b1.{i}.{p}": np.zeros(64, np.float32)
                       for p in ("gamma", "beta", "moving_mean", "moving_variance")})
    return source


def test_vgg16_layout_from_names_and_shapes():
    assert vgg16_layout(_first_stage((0, 1))) == "tutorial"
    assert vgg16_layout(_first_stage((0, 2))) == "zoo"
    assert vgg16_layout(_first_stage((0, 3), batch_norm_at=(1, 4))) == "zoo_bn"
    for convs, bn in (((0, 4), ()), ((0, 2), (1,)), ((0, 3), ()), ((0,), ())):
        with pytest.raises(WeightMappingError, match=r"x\.ckpt: backbone\.b1 holds convolutions at .*: neither the "
                                                     r"MindSpore tutorial's VGG16 \(0, 1\), the model zoo's \(0, 2\)"):
            vgg16_layout(_first_stage(convs, bn), "x.ckpt")


def test_unknown_default_boxes_or_classes_are_named(seed_as_mindspore, tmp_path):
    _, tensors = seed_as_mindspore
    five = dict(tensors, **{"multi_box.multi_loc_layers.0.3.weight": np.zeros((20, 512, 1, 1), np.float32)})
    write_mindspore_ckpt(tmp_path / "five.ckpt", five)
    with pytest.raises(WeightMappingError, match=r"predict \[5, 6, 6, 6, 4, 4\] boxes per location.*"
                                                 r"\[4, 6, 6, 6, 4, 4\] \(ssd300-vgg16-seed\); "
                                                 r"\[3, 6, 6, 6, 6, 6\] \(ssd300-vgg16-zoo\)"):
        import_mindspore_ckpt(tmp_path / "five.ckpt")
    voc = dict(tensors, **{"multi_box.multi_cls_layers.0.3.weight": np.zeros((4 * 21, 512, 1, 1), np.float32)})
    write_mindspore_ckpt(tmp_path / "voc.ckpt", voc)
    with pytest.raises(WeightMappingError, match=r"predict 21 classes per box"):
        import_mindspore_ckpt(tmp_path / "voc.ckpt")


def test_dispatch_to_the_network_that_recognises_the_file(tmp_path, monkeypatch):
    """import_mindspore_ckpt asks each module of MINDSPORE_NETWORKS in turn; nothing recognised: a one-line error
    naming the file, some of its names and the networks known."""
    write_mindspore_ckpt(tmp_path / "other.ckpt", {"stem.conv.weight": np.zeros((8, 3, 3, 3), np.float32),
                                                    "global_step": np.array(3, np.int32)})
    with pytest.raises(WeightMappingError) as err:
        import_mindspore_ckpt(tmp_path / "other.ckpt")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "other.ckpt") in message and "stem.conv.weight" in message
    assert "known: multibox.interop.mindspore" in message

    fake = types.ModuleType("fake_mindspore_network")
    fake.recognise = lambda source: "stem.conv.weight" in source
    fake.convert = lambda source, path: {"names": sorted(source), "path": path}
    monkeypatch.setitem(sys.modules, "fake_mindspore_network", fake)
    monkeypatch.setattr(mindspore_interop, "MINDSPORE_NETWORKS",
                        [*mindspore_interop.MINDSPORE_NETWORKS, "fake_mindspore_network"])
    got = import_mindspore_ckpt(tmp_path / "other.ckpt", ignore_training_state=True)
    assert got == {"names": ["stem.conv.weight"], "path": tmp_path / "other.ckpt"}


def test_mindspore_environment_is_configurable_and_checked(tmp_path):
    """MULTIBOX_MINDSPORE_PYTHON names the environment; one that is missing, or cannot import mindspore (this
    project's own Python, whose numpy is 2), is no environment, and the skip reason says which and how to fix it."""
    python, why_not = find_mindspore_python(str(tmp_path / "no-such-python"))
    assert python is None and f"MULTIBOX_MINDSPORE_PYTHON={tmp_path / 'no-such-python'} is not an executable" in why_not
    assert "MULTIBOX_MINDSPORE_PYTHON to a Python with mindspore" in why_not and ".ci/run" in why_not
    if importlib.util.find_spec("mindspore") is None:
        python, why_not = find_mindspore_python(sys.executable)
        assert python is None and why_not.endswith(MINDSPORE_HOW) and "cannot import mindspore" in why_not
    default, _ = find_mindspore_python(None)
    assert default in (None, str(REPO / ".venv-mindspore" / "bin" / "python"))


def test_helper_script_is_valid_python():
    """The helper runs only under MindSpore; at least it must compile here."""
    compile(HELPER.read_text(), str(HELPER), "exec")
    assert sys.version_info >= (3, 10)
