"""INT8 export (``multibox export --int8``): what is quantized, that onnxruntime runs it with int8 kernels, that a
trained model's INT8 detections match its float ones, and that the accuracy gate refuses a wrecked calibration.

References: the PyTorch model's own layers (how many convolutions, which are heads), onnxruntime's optimized graph
(``SessionOptions.optimized_model_filepath``: which kernels really run), the float export's detections and
``evaluate_onnx`` of the written files (pycocotools-checked in tests/inference/test_onnx_eval.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from multibox.checkpoint import load_checkpoint  # noqa: E402
from multibox.cli import main  # noqa: E402
from multibox.config import Config, load_config  # noqa: E402
from multibox.data.build import build_splits  # noqa: E402
from multibox.export import quantize as q  # noqa: E402
from multibox.export.onnx import export_checkpoint, export_onnx  # noqa: E402
from multibox.inference.onnx import OnnxDetector, load_onnx  # noqa: E402
from multibox.inference.onnx_eval import evaluate_onnx, raw_evaluation_images  # noqa: E402
from multibox.models import build_model, model_from_state_dict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TORCHSCRIPT = {"exporter": "torchscript"}   # the faster exporter keeps these tests short; graphs alike
@pytest.fixture(scope="module")
def trained(quick_tiny, tmp_path_factory):
    """(annotations.json, best.pt, float export) of conftest's quick tiny model."""
    ann, checkpoint = quick_tiny
    return ann, checkpoint, export_checkpoint(checkpoint, tmp_path_factory.mktemp("int8") / "float.onnx",
                                              **TORCHSCRIPT)


def _batches(checkpoint: Path, float_path: Path, count: int = 8) -> list[np.ndarray]:
    cfg = Config.from_dict(load_checkpoint(checkpoint)["config"])
    images = [image for image, _ in raw_evaluation_images(build_splits(cfg))][:count]
    return q.calibration_batches(images, OnnxDetector(float_path))


def _descendants(model, tensors: set[str]) -> list:
    """Nodes fed, directly or not, by ``tensors``."""
    reached, found = set(tensors), []
    for node in model.graph.node:   # topological order
        if any(t in reached for t in node.input):
            found.append(node)
            reached.update(node.output)
    return found


def _ancestors(model, node) -> list:
    """Nodes that feed ``node``, directly or not."""
    producer = {out: n for n in model.graph.node for out in n.output}
    found, todo = {}, [node]
    while todo:
        for t in todo.pop().input:
            parent = producer.get(t)
            if parent is not None and parent.name not in found:
                found[parent.name] = parent
                todo.append(parent)
    return list(found.values())


def test_int8_graph_quantizes_the_network_only(trained, tmp_path):
    """Every convolution of the network but the first and the heads reads DequantizeLinear weights and inputs;
    the kept ones read float weights; no Q/DQ node after the heads (decoding, NMS) or before the first conv."""
    _, checkpoint, float_path = trained
    cfg = Config.from_dict(load_checkpoint(checkpoint)["config"])
    model = model_from_state_dict(cfg, load_checkpoint(checkpoint)["model"])
    torch_convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    num_heads = len(model.loc_heads) + len(model.cls_heads)
    int8_path = q.quantize_onnx(float_path, tmp_path / "int8.onnx", _batches(checkpoint, float_path))
    int8 = onnx.load(str(int8_path))
    producer = {out: node for node in int8.graph.node for out in node.output}
    convs = [n for n in int8.graph.node if n.op_type == "Conv"]
    assert len(convs) == len(torch_convs)
    quantized = [c for c in convs if all(producer.get(t) is not None and producer[t].op_type == "DequantizeLinear"
                                         for t in c.input[:2])]
    floating = [c for c in convs if c not in quantized]
    assert len(floating) == 1 + num_heads and len(quantized) == len(torch_convs) - 1 - num_heads
    initializers = {i.name for i in int8.graph.initializer}
    assert all(c.input[1] in initializers for c in floating)   # float weights, as exported
    heads = {c.output[0] for c in floating[1:]}
    after = _descendants(int8, heads)
    assert any(n.op_type == "NonMaxSuppression" for n in after)
    assert not [n.name for n in after if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    before = _ancestors(int8, floating[0])   # the normalisation
    assert before and not [n.name for n in before if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    meta = {p.key: p.value for p in int8.metadata_props}
    float_meta = {p.key: p.value for p in onnx.load(str(float_path)).metadata_props}
    assert all(meta[key] == value for key, value in float_meta.items())
    assert "multibox.quantization" in meta


def test_onnxruntime_runs_int8_convolutions(trained, tmp_path):
    """onnxruntime's own optimized graph has an int8 kernel for every quantized convolution (QDQ fused), float
    ones only for the first conv and the heads."""
    _, checkpoint, float_path = trained
    int8_path = q.quantize_onnx(float_path, tmp_path / "int8.onnx", _batches(checkpoint, float_path, 2))
    graph = q.network_graph(onnx.load(str(int8_path)))
    counts = q.optimized_op_counts(int8_path)
    int8_kernels = counts["QLinearConv"] + counts["ConvInteger"]
    assert int8_kernels == len(graph.convs) - len(graph.default_keep_float) > 0, counts
    assert sum(counts[t] for t in q.FLOAT_CONV_TYPES) == len(graph.default_keep_float), counts
    float_counts = q.optimized_op_counts(float_path)
    assert float_counts["QLinearConv"] == 0 and float_counts["NonMaxSuppression"] == counts["NonMaxSuppression"] == 1
    heads_too = q.optimized_op_counts(q.quantize_onnx(float_path, tmp_path / "heads.onnx", _batches(
        checkpoint, float_path, 2), quantize_heads=True))
    assert heads_too["QLinearConv"] + heads_too["ConvInteger"] == len(graph.convs) - len(graph.first), heads_too


def test_int8_detections_match_float(trained, tmp_path):
    """A trained model's INT8 export passes the gate, and its detections are the float model's: nearly every
    confident float detection has an INT8 one with the same label, IoU > 0.8 and a score within 0.1 (quantization
    noise may flip an NMS decision between two overlapping boxes, so not every one)."""
    ann, checkpoint, float_path = trained
    report = q.export_int8(checkpoint, tmp_path / "int8.onnx", str(ann), calib_images=16, runtime="onnxruntime",
                           **TORCHSCRIPT)
    assert report.gated and report.path.is_file() and report.rounds <= 2   # heads int8, else heads float
    assert report.ap_float > 0.2 and report.ap_int8 >= report.ap_float * (1 - q.MAX_RELATIVE_AP_DROP)
    cfg = Config.from_dict(load_checkpoint(checkpoint)["config"])
    splits = build_splits(cfg)
    assert evaluate_onnx(load_onnx(report.path, runtime="onnxruntime"), splits).stats["AP"] == \
        pytest.approx(report.ap_int8, abs=1e-9)
    cfg.data.val_path = str(ann)   # detections compared on every image: more of them
    images = [image for image, _ in raw_evaluation_images(build_splits(cfg))]
    ref = OnnxDetector(float_path).predict(images, score=0.3)
    got = OnnxDetector(report.path).predict(images, score=0.3)
    matched = total = 0
    for a, b in zip(ref, got):
        confident = a["scores"] > 0.5   # compared where the threshold cannot cut between the two
        total += int(confident.sum())
        if not confident.any() or not len(b["scores"]):
            continue
        iou = box_iou(a["boxes"][confident], b["boxes"])
        same = (a["labels"][confident, None] == b["labels"][None]) & \
            ((a["scores"][confident, None] - b["scores"][None]).abs() < 0.1)
        matched += int(((iou > 0.8) & same).any(dim=1).sum())
    assert total >= 20 and matched >= 0.9 * total, (matched, total)


def _constant_images(folder: Path, colour, count: int = 8) -> Path:
    """``count`` PNGs of one colour. In the normalisation's mean colour the network's input is 0 everywhere: the
    calibrated ranges then hold the biases' response only, far narrower than any real image's (black images, by
    contrast, give wide ranges here and quantize fine)."""
    folder.mkdir()
    pixels = np.empty((200, 240, 3), np.uint8)
    pixels[:] = [round(c) for c in colour]
    for i in range(count):
        Image.fromarray(pixels).save(folder / f"constant_{i}.png")
    return folder


@pytest.mark.slow
def test_constant_calibration_is_refused(trained, tmp_path, capsys):
    """Ranges calibrated on constant images clip real activations: the gate (on --val-data) refuses through the
    command line after its fallback tries: non-zero exit, one line with both APs, no file; --force writes it."""
    ann, checkpoint, _ = trained
    mean = Config.from_dict(load_checkpoint(checkpoint)["config"]).data.mean
    black = _constant_images(tmp_path / "constant", mean)
    out = tmp_path / "int8.onnx"
    command = ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--int8", "--calib-data", str(black),
               "--val-data", str(ann), "--exporter", "torchscript"]
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    numbers = re.search(r"AP ([0-9.]+) \(float\) -> ([0-9.]+) \(INT8\), ([-+0-9.]+)% relative", err)
    assert err.startswith("error: INT8 model refused") and numbers and "--force" in err, err
    assert f"after {q.FALLBACK_ROUNDS + 2} tries" in err   # the fallback kept more layers in float first
    ap_float, ap_int8 = float(numbers.group(1)), float(numbers.group(2))
    assert ap_float > 0.2 and ap_int8 < ap_float * (1 - q.MAX_RELATIVE_AP_DROP)
    assert not out.exists() and not list(tmp_path.glob(".int8.onnx*"))
    assert main(command + ["--force"]) == 0
    assert out.is_file() and "gate skipped (--force)" in capsys.readouterr().out


def test_unannotated_calibration_writes_without_gate(trained, tmp_path, caplog):
    _, checkpoint, _ = trained
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(
            folder / f"{i}.jpg")
    report = q.export_int8(checkpoint, tmp_path / "int8.onnx", str(folder), calib_images=2, **TORCHSCRIPT)
    assert not report.gated and report.ap_int8 is None and report.calib_images == 2 and report.path.is_file()
    assert "without the accuracy gate" in caplog.text


@pytest.mark.slow
# One preset per kind of graph (every shipped preset was checked once the same way; the others add minutes):
# depthwise + hard-swish + squeeze-excite, inverted residuals (Add, Clip), FPN (Resize, shared heads).
@pytest.mark.parametrize("preset", ["ssdlite320-mobilenet-v3", "ssd300-mobilenet-v2", "ssd640-mobilenet-v1-fpn"])
def test_every_preset_quantizes(preset, tmp_path):
    """Random weights of a shipped preset: the graph analysis finds one first conv and the head convs, and every
    other convolution becomes an int8 kernel in onnxruntime."""
    cfg = load_config(preset)
    model = build_model(cfg).eval()
    names = ["background"] + [f"c{i}" for i in range(cfg.model.num_classes)]
    float_path = export_onnx(model, cfg, names, tmp_path / "float.onnx", exporter="torchscript")
    detector = OnnxDetector(float_path)
    image = torch.randint(0, 256, (3, *detector.image_hw), dtype=torch.uint8)
    int8_path = q.quantize_onnx(float_path, tmp_path / "int8.onnx", q.calibration_batches([image], detector))
    graph = q.network_graph(onnx.load(str(int8_path)))
    assert len(graph.first) == 1
    assert len(graph.heads) >= 2 * len(cfg.anchors.feature_sizes) or len(graph.heads) == 2   # per map, or shared
    counts = q.optimized_op_counts(int8_path)
    assert counts["QLinearConv"] + counts["ConvInteger"] == len(graph.convs) - len(graph.default_keep_float), counts
