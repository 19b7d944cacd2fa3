"""OpenVINO as the second runtime of exported models: the same detections as onnxruntime (float32, not the bf16
that OpenVINO's CPU plugin would choose by itself), batch 1 and 8 in one compiled model, ``detector.runtime``, the
one-line error when openvino is asked for and missing, auto's fallback, and ``multibox predict --runtime``.

The model is a trained tiny network (tests/fixtures/tiny_checkpoint_v1, 4 epochs on synthetic shapes), so the
detections are the confident, well-separated ones of a real model, not random logits.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
openvino = pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino)")

from multibox.cli import main  # noqa: E402
from multibox.errors import InputError, MultiboxError  # noqa: E402
from multibox.export.onnx import export_checkpoint  # noqa: E402
from multibox.inference.onnx import OnnxDetector, OpenVinoSession, load_onnx  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_checkpoint_v1"
SCORE = 0.05
# float32 tolerances: both runtimes compute the same float32 graph with differently ordered sums (observed
# differences: 4e-7 in scores, 6e-5 px in boxes); bf16 moves scores by ~1e-3 and boxes by pixels.
SCORE_TOL, BOX_TOL_PX, RAW_TOL = 1e-5, 1e-3, 1e-4


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """The trained tiny checkpoint exported with NMS inside ("nms") and without ("raw")."""
    root = tmp_path_factory.mktemp("onnx_runtime")
    checkpoint = FIXTURE / "best.pt"
    return {"nms": export_checkpoint(checkpoint, root / "tiny.onnx"),
            "raw": export_checkpoint(checkpoint, root / "tiny_raw.onnx", postprocess=False)}


def sample_images() -> list[torch.Tensor]:
    """The fixture's validation image at three sizes and aspect ratios (the boxes are scaled back to each)."""
    from multibox.data.coco import read_image_rgb
    image = read_image_rgb(FIXTURE / "image.png")
    resized = [torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear")[0].round().byte()
               for size in [(240, 320), (200, 150)]]
    return [image, *resized]


def assert_same_detections(expected: list[dict], actual: list[dict]) -> None:
    """Equal detections per image within float32 tolerances. Detections are matched by label, score and box rather
    than by position: two scores a float32 rounding apart may come out in either order."""
    assert len(expected) == len(actual)
    for i, (e, a) in enumerate(zip(expected, actual)):
        assert len(e["scores"]) == len(a["scores"]), f"image {i}: {len(e['scores'])} vs {len(a['scores'])} boxes"
        torch.testing.assert_close(a["scores"], e["scores"], rtol=0, atol=SCORE_TOL)
        for box, score, label in zip(e["boxes"], e["scores"], e["labels"]):
            same = ((a["labels"] == label) & ((a["scores"] - score).abs() <= SCORE_TOL)
                    & ((a["boxes"] - box).abs().amax(1) <= BOX_TOL_PX))
            assert same.any(), f"image {i}: detection {label.item()} {score.item():.6f} {box.tolist()} not found"


def both(path: Path) -> tuple[OnnxDetector, OnnxDetector]:
    return OnnxDetector(path, runtime="onnxruntime"), OnnxDetector(path, runtime="openvino")


@pytest.mark.parametrize("graph", ["nms", "raw"])
def test_openvino_detections_equal_onnxruntime(exports, graph):
    ort, ov = both(exports[graph])
    assert (ort.runtime, ov.runtime) == ("onnxruntime", "openvino")
    images = sample_images()
    expected = ort.predict(images, SCORE)
    assert sum(len(d["scores"]) for d in expected) >= 6, "degenerate test: too few detections"
    assert_same_detections(expected, ov.predict(images, SCORE))


def test_batch_1_and_8_in_one_openvino_session(exports):
    """The dynamic batch axis: one compiled model serves N = 1, 8, 1 (raw outputs, image by image as onnxruntime)."""
    ort, ov = both(exports["raw"])
    size = ov.image_size
    batch = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for n in (1, 8, 1):
        got, want = ov.run(batch[:n]), ort.run(batch[:n])
        assert [o.shape for o in got] == [o.shape for o in want]
        assert got[0].shape[0] == n
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=RAW_TOL)


def test_openvino_outputs_follow_the_graphs_output_order(exports):
    ov = OnnxDetector(exports["nms"], runtime="openvino")
    assert ov.session.output_names == ["boxes", "scores", "labels", "num_detections"]
    boxes, scores, labels, counts = ov.run(torch.zeros(2, 3, ov.image_size, ov.image_size, dtype=torch.uint8))
    assert boxes.shape == (2, ov.max_detections, 4) and scores.shape == (2, ov.max_detections)
    assert labels.dtype == np.int64 and counts.shape == (2,)


def test_bf16_would_be_caught(exports):
    """The comparison above detects reduced precision: OpenVINO's own CPU default (bf16 where the processor has
    it) fails it. Where the CPU has no bf16 there is nothing to catch."""
    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16: OpenVINO runs float32 anyway")
    ort = OnnxDetector(exports["raw"], runtime="onnxruntime")
    bf16 = OpenVinoSession(exports["raw"], precision="bf16")
    batch = np.random.default_rng(0).integers(0, 256, (2, 3, ort.image_size, ort.image_size), dtype=np.uint8)
    loc, cls_logits = bf16.run(batch)[:2]
    want_loc, want_cls = ort.run(torch.from_numpy(batch))[:2]
    assert np.abs(cls_logits - want_cls).max() > 100 * RAW_TOL
    assert np.abs(loc - want_loc).max() > 10 * RAW_TOL


def test_runtime_choice(exports):
    assert OnnxDetector(exports["nms"]).runtime == "openvino"
    assert load_onnx(exports["nms"], "cpu", runtime="onnxruntime").runtime == "onnxruntime"
    assert load_onnx(exports["nms"], "cpu", runtime="openvino").runtime == "openvino"
    ov1 = OnnxDetector(exports["nms"], threads=1, runtime="openvino").session.compiled
    assert int(ov1.get_property("INFERENCE_NUM_THREADS")) == 1
    assert ov1.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    ort1 = OnnxDetector(exports["nms"], threads=1, runtime="onnxruntime").session.session
    assert ort1.get_session_options().intra_op_num_threads == 1
    with pytest.raises(InputError, match="unknown runtime 'tensorrt'"):
        OnnxDetector(exports["nms"], runtime="tensorrt")
    with pytest.raises(InputError, match="CPU"):
        load_onnx(exports["nms"], "cuda", runtime="openvino")


def test_missing_openvino(exports, monkeypatch, caplog):
    """Asked for explicitly: a one-line error saying how to install it; auto: onnxruntime, said at debug level."""
    monkeypatch.setitem(sys.modules, "openvino", None)   # `import openvino` now raises ImportError
    with pytest.raises(MultiboxError) as err:
        OnnxDetector(exports["nms"], runtime="openvino")
    assert "pip install" in str(err.value) and "openvino" in str(err.value) and "\n" not in str(err.value)
    with caplog.at_level(logging.DEBUG, logger="multibox.inference.onnx"):
        detector = OnnxDetector(exports["nms"])
    assert detector.runtime == "onnxruntime"
    assert any("openvino is not importable" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


def test_predict_cli_runtime(exports, tmp_path, capsys):
    image = FIXTURE / "image.png"
    results = {}
    for runtime in ("onnxruntime", "openvino"):
        out = tmp_path / runtime
        assert main(["predict", "--checkpoint", str(exports["nms"]), str(image), "--runtime", runtime,
                     "--out", str(out), "--no-draw", "--no-progress", "--score", "0.2"]) == 0
        results[runtime] = json.loads((out / "detections.json").read_text())
    assert len(results["openvino"]) == len(results["onnxruntime"]) >= 1
    for a, b in zip(results["onnxruntime"], results["openvino"]):
        assert a["category_id"] == b["category_id"]
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=BOX_TOL_PX)
    assert main(["predict", "--checkpoint", str(FIXTURE / "best.pt"), str(image), "--runtime", "openvino",
                 "--out", str(tmp_path / "pt"), "--no-progress"]) == 2
    assert "applies to exported ONNX models" in capsys.readouterr().err


def test_qdq_graph_runs_int8_and_float_graph_fp32_in_openvino(exports, tmp_path):
    """The f32 precision hint keeps float layers in float32 (not bf16) and leaves a QDQ graph's quantized
    convolutions in int8; auto picks OpenVINO for both kinds of graph."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    size = OnnxDetector(exports["raw"], runtime="onnxruntime").image_size
    rng = np.random.default_rng(0)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": rng.integers(0, 256, (1, 3, size, size), dtype=np.uint8)}] * 2)

        def get_next(self):
            return next(self.batches, None)

    qdq = tmp_path / "tiny_qdq.onnx"
    quantize_static(str(exports["raw"]), str(qdq), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["Conv"], weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    int8 = OnnxDetector(qdq)
    assert int8.runtime == "openvino"
    quantized = int8.session.layer_precisions()
    assert quantized["u8"] + quantized["i8"] >= 1, quantized
    assert set(OpenVinoSession(exports["raw"]).layer_precisions()) == {"f32"}
