"""Importing the MindSpore tutorial's checkpoint (``multibox import-weights --from mindspore``) without MindSpore.

The end-to-end test builds the tutorial's ``SSD300Vgg16`` in real MindSpore (tests/interop/mindspore_tutorial_net.py, run
with the Python of a separate environment, because MindSpore needs numpy < 2), saves a checkpoint with
``mindspore.save_checkpoint`` and the network's outputs on a fixed input, imports the checkpoint and compares.
That environment is found through ``MULTIBOX_MINDSPORE_PYTHON`` or at ``.venv-mindspore/bin/python`` in the
repository root (the ``mindspore_python`` fixture of tests/conftest.py); without it, or without mindspore in it,
the test is skipped with that reason. The protobuf reader itself is also tested on
bytes that MindSpore 2.10 wrote (embedded below), so CI checks it even without MindSpore.
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MINDSPORE_HOW, REPO, find_mindspore_python
import multibox
from multibox.cli import import_weights as import_weights_command
from multibox.interop.mindspore import (
    TUTORIAL_CLASS_NAMES,
    WeightMappingError,
    _checkpoint_message_class,
    import_mindspore_ckpt,
    read_mindspore_ckpt,
    swap_yx_offsets,
    tutorial_mindspore_pairs,
    write_mindspore_ckpt,
)
from multibox.config import load_config
from multibox.models import build_model

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

@pytest.fixture(scope="module")
def tutorial_run(tmp_path_factory, mindspore_python):
    out = tmp_path_factory.mktemp("mindspore")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([mindspore_python, str(HELPER), "--out", str(out), "--seed", "0"], cwd=out, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_tutorial_checkpoint_imports_to_the_same_network(tutorial_run, tmp_path):
    """Same normalised input, same outputs: loc (after the documented (dy, dx, dh, dw) -> (dx, dy, dw, dh)
    reordering), class logits, and the tutorial's inference scores (sigmoid)."""
    assert _import_weights(["--from", "mindspore", str(tutorial_run / "tutorial.ckpt"), "--out",
                            str(tmp_path / "seed.pt")]) == 0
    detector = multibox.load(tmp_path / "seed.pt", device="cpu")
    assert detector.cfg.model.arch == "ssd300_vgg16_seed" and detector.class_names == TUTORIAL_CLASS_NAMES
    x = torch.from_numpy(np.load(tutorial_run / "input.npy"))
    with torch.no_grad():
        loc, cls = detector.model(x)
    ms_loc = torch.from_numpy(np.load(tutorial_run / "loc.npy"))
    ms_logits = torch.from_numpy(np.load(tutorial_run / "cls_logits.npy"))
    ms_scores = torch.from_numpy(np.load(tutorial_run / "scores.npy"))
    assert loc.shape == ms_loc.shape == (1, 8732, 4) and cls.shape == ms_logits.shape == (1, 8732, 81)
    assert ms_loc.std() > 0.1 and ms_logits.std() > 0.1          # random weights: nothing trivially zero
    assert _relative_error(loc, ms_loc[..., [1, 0, 3, 2]]) < 1e-4
    assert _relative_error(cls, ms_logits) < 1e-4
    assert _relative_error(cls.sigmoid(), ms_scores) < 1e-4
    # Without the reordering the outputs differ: the swap is real, not a no-op.
    assert _relative_error(loc, ms_loc) > 1e-2


def test_every_mindspore_parameter_is_read_with_its_shape(tutorial_run):
    names = dict(line.split(" ", 1) for line in (tutorial_run / "names.txt").read_text().splitlines())
    source = read_mindspore_ckpt(tutorial_run / "tutorial.ckpt")
    assert len(source) == len(names) == 107
    assert {k: str(tuple(v.shape)) for k, v in source.items()} == names
    assert {theirs for _, theirs in tutorial_mindspore_pairs()} == set(names)


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


@pytest.fixture(scope="module")
def seed_as_mindspore(tmp_path_factory):
    """A seed-preset model written under the tutorial's parameter names (loc heads back in (dy, dx, dh, dw))."""
    torch.manual_seed(0)
    model = build_model(load_config("ssd300-vgg16-seed"))
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    tensors = {}
    for ours, theirs in tutorial_mindspore_pairs():
        value = state[ours]
        if ours.startswith("loc_heads.") and ours.split(".")[2] == "3":      # the last 1x1 conv of a loc head
            value = swap_yx_offsets(value)
        tensors[theirs] = value.numpy()
    return state, tensors


def test_round_trip_through_tutorial_names(seed_as_mindspore, tmp_path):
    state, tensors = seed_as_mindspore
    write_mindspore_ckpt(tmp_path / "seed.ckpt", tensors)
    payload = import_mindspore_ckpt(tmp_path / "seed.ckpt")
    assert payload["config"]["model"]["arch"] == "ssd300_vgg16_seed" and payload["class_names"][0] == "background"
    assert payload["model"].keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(payload["model"][name], value), name


def test_import_fails_loudly_on_missing_and_leftover_entries(seed_as_mindspore, tmp_path):
    _, tensors = seed_as_mindspore
    missing = {k: v for k, v in tensors.items() if k != "multi_box.multi_cls_layers.2.1.moving_mean"}
    write_mindspore_ckpt(tmp_path / "missing.ckpt", missing)
    with pytest.raises(WeightMappingError, match=r"missing from the file: multi_box\.multi_cls_layers\.2\.1\.moving_mean"):
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
