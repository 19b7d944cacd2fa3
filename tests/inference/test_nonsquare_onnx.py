"""Exported models with a non-square input (``model.image_size = [H, W]``) and the letterbox resize: the ONNX
preprocessing (:func:`resize_for_model`, :func:`resize_batch`) against hand-built references, the mapping of the
graph's boxes back to image pixels (:func:`split_fixed_outputs`), and onnxruntime's detections against the PyTorch
:class:`~multibox.inference.detector.Detector`'s on a wide image, letterboxed and stretched, with NMS in the graph
and without.

The network is the trained tiny fixture (tests/fixtures/tiny_checkpoint_v1): it is fully convolutional, so its
weights run at any input size (only the default boxes change), and its detections on the fixture's shapes are the
confident, well-separated ones of a real model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from multibox.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from multibox.cli import main  # noqa: E402
from multibox.config import Config  # noqa: E402
from multibox.core.resize import boxes_to_image_xyxy, letterbox_fill  # noqa: E402
from multibox.data.coco import read_image_rgb  # noqa: E402
from multibox.errors import InputError  # noqa: E402
from multibox.export.onnx import export_onnx  # noqa: E402
from multibox.inference.detector import Detector  # noqa: E402
from multibox.inference.onnx import (OnnxDetector, OnnxModelError, resize_batch, resize_for_model,  # noqa: E402
                                     split_fixed_outputs)
from multibox.inference.tiling import TiledDetector  # noqa: E402
from multibox.models import model_from_state_dict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_checkpoint_v1"
INPUT_HW = (288, 448)          # wider than high, not a multiple of 300's grid
LOW_SCORE = 0.2                # the threshold of a comparison is put in a gap of the scores above it
BOX_TOL_PX, SCORE_TOL = 0.05, 1e-4
MEAN = [123.675, 116.28, 103.53]   # the fixture's data.mean


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth random (3, h, w) uint8 picture (upsampled noise: resizing it is not an average of white noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, h // 16), max(2, w // 16), generator=g) * 255
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").round().byte()[0]


# ------------------------------------------------------------------------------------ preprocessing


def test_letterbox_resize_equals_the_hand_built_canvas():
    """480 x 640 into (320, 544): one scale 320 / 480, so 320 x 427 (640 * 2/3 = 426.7), centred at column
    (544 - 427) // 2 = 58, the rest the mean colour."""
    image = _image(480, 640)
    fill = [124, 116, 104]   # the fixture's mean colour, rounded to uint8
    expected = torch.empty(3, 320, 544, dtype=torch.uint8)
    for c in range(3):
        expected[c] = fill[c]
    expected[:, :, 58:58 + 427] = F.resize(image, [320, 427], antialias=True)
    got = resize_for_model(image, (320, 544), "letterbox", fill)
    assert got.dtype == torch.uint8 and got.is_contiguous()
    assert torch.equal(got, expected)
    assert torch.equal(resize_batch([image, image], [320, 544], "letterbox", fill), torch.stack([expected] * 2))
    with pytest.raises(InputError, match="fill"):
        resize_for_model(image, (320, 544), "letterbox")


def test_stretching_resizes_at_h_w_and_square_sizes_unchanged():
    image = _image(240, 500, seed=1)
    got = resize_for_model(image, (96, 160), "antialias")
    assert torch.equal(got, F.resize(image, [96, 160], antialias=True))
    tv = resize_for_model(image, (96, 160), "torchvision")
    want = torch.nn.functional.interpolate(image[None].float(), size=(96, 160), mode="bilinear",
                                           align_corners=False)[0]
    torch.testing.assert_close(tv, want, rtol=0, atol=1e-4)
    assert resize_batch([image], (96, 160), "torchvision").shape == (1, 3, 96, 160)
    # An int is S x S, as before.
    assert torch.equal(resize_for_model(image, 120), F.resize(image, [120, 120], antialias=True))
    assert torch.equal(resize_batch([image], 120), resize_batch([image], (120, 120)))
    with pytest.raises(InputError, match="unknown resize"):
        resize_for_model(image, 120, "nearest")


# ------------------------------------------------------------------------------------ boxes back to pixels


def test_split_fixed_outputs_letterbox_equals_boxes_to_image_xyxy():
    g = torch.Generator().manual_seed(0)
    sizes = [(480, 640), (300, 1000), (500, 200)]
    k = 5
    xy = torch.rand(len(sizes), k, 2, generator=g) * 0.6
    boxes = torch.cat((xy, xy + 0.05 + torch.rand(len(sizes), k, 2, generator=g) * 0.3), -1)
    counts = np.array([5, 3, 0])
    scores = torch.rand(len(sizes), k, generator=g).numpy()
    labels = np.ones((len(sizes), k), dtype=np.int64)
    out = split_fixed_outputs(boxes.numpy(), scores, labels, counts, sizes, (320, 544), True)
    for i, (det, size) in enumerate(zip(out, sizes)):
        n = int(counts[i])
        h, w = size   # clipped to the image: a letterboxed box may reach into the padding; wholly there: dropped
        want = boxes_to_image_xyxy(boxes[i, :n].double(), size, (320, 544), letterbox=True)
        want = torch.minimum(want.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float64))
        inside = (want[:, 2] > want[:, 0]) & (want[:, 3] > want[:, 1])
        torch.testing.assert_close(det["boxes"].double(), want[inside], rtol=0, atol=1e-3)
        assert det["boxes"].dtype == torch.float32 and len(det["scores"]) == int(inside.sum())
        torch.testing.assert_close(det["scores"], torch.from_numpy(scores[i, :n])[inside])
    assert (out[1]["boxes"][:, 1] == 0).any(), "no box reaches into the padding: the clipping is untested"
    # By hand: 480 x 640 lies at rows 0..320, columns 58..485 of the 320 x 544 input.
    region = np.array([[[58 / 544, 0, 485 / 544, 1]]], dtype=np.float32)
    (det,) = split_fixed_outputs(region, np.ones((1, 1), np.float32), np.ones((1, 1), np.int64), np.array([1]),
                                 [(480, 640)], (320, 544), True)
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 640.0, 480.0]]), rtol=0, atol=1e-3)
    # Stretched: exactly times (w, h, w, h), whatever the input.
    stretched = split_fixed_outputs(boxes.numpy(), scores, labels, counts, sizes, (320, 544), False)
    for i, (det, (h, w)) in enumerate(zip(stretched, sizes)):
        assert torch.equal(det["boxes"], boxes[i, :int(counts[i])] * torch.tensor([w, h, w, h], dtype=torch.float32))
    with pytest.raises(InputError, match="input"):
        split_fixed_outputs(boxes.numpy(), scores, labels, counts, sizes, None, True)


# ------------------------------------------------------------------------------------ exported models


def _config(resize: str) -> tuple[Config, dict]:
    payload = load_checkpoint(FIXTURE / "best.pt")
    raw = payload["config"]
    raw["model"]["image_size"] = list(INPUT_HW)
    raw["anchors"]["feature_sizes"] = None   # the network's at [H, W]
    raw["data"]["resize"] = resize
    return Config.from_dict(raw), payload


@pytest.fixture(scope="module", params=["letterbox", "antialias"])
def models(request, tmp_path_factory):
    """The fixture's weights at INPUT_HW with ``data.resize`` letterbox or antialias (stretched): the torch
    Detector, the checkpoint, and its exports with NMS inside ("nms") and without ("raw")."""
    cfg, payload = _config(request.param)
    model = model_from_state_dict(cfg, payload["model"]).eval()
    names = payload["class_names"]
    root = tmp_path_factory.mktemp(f"nonsquare_{request.param}")
    checkpoint = root / "model.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "class_names": names}, checkpoint)
    exports = {graph: export_onnx(model, cfg, names, root / f"{graph}.onnx", postprocess=graph == "nms",
                                  exporter="torchscript")
               for graph in ("nms", "raw")}
    return dict(resize=request.param, cfg=cfg, torch=Detector(model, cfg, names, torch.device("cpu")),
                checkpoint=checkpoint, exports=exports)


def wide_image() -> torch.Tensor:
    """The fixture's picture beside its mirror image: 338 x 664, about twice as wide as high (letterboxed into
    288 x 448 it is scaled by 448 / 664 to 228 x 448, with 30 rows of padding above and below)."""
    image = read_image_rgb(FIXTURE / "image.png")
    return torch.cat((image, image.flip(-1)), dim=-1)


def threshold_in_gap(detector, image: torch.Tensor, at_least: int = 4) -> float:
    """A score threshold in the widest gap between the image's detection scores above LOW_SCORE that keeps
    ``at_least`` of them: float32 noise (1e-6) cannot move a score across it."""
    scores = detector.predict(image, LOW_SCORE)[0]["scores"].sort(descending=True).values
    assert len(scores) > at_least, "degenerate test: too few detections"
    gaps = scores[at_least - 1:-1] - scores[at_least:]
    i = int(gaps.argmax())
    assert gaps[i] > 2e-3, "no clear gap between the scores"
    return float(scores[at_least - 1 + i] + scores[at_least + i]) / 2


def assert_same_detections(expected: dict, actual: dict) -> None:
    """Equal detections of one image: the same count, and each expected one found with its label, its score and
    its box within BOX_TOL_PX (matched rather than by position: near-equal scores may come out in either order)."""
    assert len(expected["scores"]) == len(actual["scores"]), (len(expected["scores"]), len(actual["scores"]))
    for box, score, label in zip(expected["boxes"], expected["scores"], expected["labels"]):
        same = ((actual["labels"] == label) & ((actual["scores"] - score).abs() <= SCORE_TOL)
                & ((actual["boxes"] - box).abs().amax(1) <= BOX_TOL_PX))
        assert same.any(), f"detection {label.item()} {score.item():.5f} {box.tolist()} not found"


@pytest.mark.parametrize("graph", ["nms", "raw"])
def test_onnxruntime_equals_torch_on_a_wide_image(models, graph):
    image = wide_image()
    score = threshold_in_gap(models["torch"], image)
    expected = models["torch"].predict(image, score)[0]
    assert len(expected["scores"]) >= 4, "degenerate test: too few detections"
    onnx_detector = OnnxDetector(models["exports"][graph], runtime="onnxruntime", threads=1, spin=False)
    assert onnx_detector.image_hw == INPUT_HW and onnx_detector.image_size == INPUT_HW
    assert onnx_detector.resize == models["resize"]
    assert_same_detections(expected, onnx_detector.predict(image, score)[0])


def test_graph_input_and_metadata_say_h_w(models):
    import onnx
    proto = onnx.load(str(models["exports"]["nms"]), load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, *INPUT_HW]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert f"(N, 3, {INPUT_HW[0]}, {INPUT_HW[1]})" in meta["multibox.input"]
    assert f"resized to {INPUT_HW[0]}x{INPUT_HW[1]} ({models['resize']} resize)" in meta["multibox.input"]
    if models["resize"] == "letterbox":
        assert json.loads(meta["multibox.letterbox_fill"]) == letterbox_fill(MEAN) == [124, 116, 104]
        assert OnnxDetector(models["exports"]["nms"], runtime="onnxruntime").letterbox_fill == [124, 116, 104]
    else:
        assert "multibox.letterbox_fill" not in meta
        assert OnnxDetector(models["exports"]["nms"], runtime="onnxruntime").letterbox_fill is None


def test_tiled_onnx_equals_tiled_torch(models):
    """Tiles of a wide image through a non-square model: each tile has the input's shape (165 x 256 px for 288 x
    448) and is resized and mapped back by the detector's own predict, so ONNX and torch tile alike."""
    image = wide_image()
    onnx_detector = OnnxDetector(models["exports"]["nms"], runtime="onnxruntime", threads=1, spin=False)
    tiles_hw = [TiledDetector(detector, tile=256).tile_hw for detector in (models["torch"], onnx_detector)]
    assert tiles_hw == [(165, 256), (165, 256)]
    score = threshold_in_gap(TiledDetector(models["torch"], tile=256), image)
    expected = TiledDetector(models["torch"], tile=256).predict(image, score)[0]
    assert len(expected["scores"]) >= 4
    assert_same_detections(expected, TiledDetector(onnx_detector, tile=256).predict(image, score)[0])


def test_calibration_batches_are_the_letterboxed_inputs(models):
    from multibox.export.quantize import calibration_batches
    onnx_detector = OnnxDetector(models["exports"]["nms"], runtime="onnxruntime")
    images = [wide_image(), _image(120, 90)]
    batches = calibration_batches(images, onnx_detector)
    assert [b.shape for b in batches] == [(1, 3, *INPUT_HW)] * 2
    fill = letterbox_fill(MEAN) if models["resize"] == "letterbox" else None
    for batch, image in zip(batches, images):
        np.testing.assert_array_equal(batch[0], resize_for_model(image, INPUT_HW, models["resize"], fill).numpy())


def test_bad_letterbox_fill_metadata_is_refused(models, tmp_path):
    import onnx
    if models["resize"] != "letterbox":
        pytest.skip("the fill is metadata of letterbox exports")
    proto = onnx.load(str(models["exports"]["raw"]))
    for entry in proto.metadata_props:
        if entry.key == "multibox.letterbox_fill":
            entry.value = "[124, 116]"
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(OnnxModelError, match="letterbox_fill"):
        OnnxDetector(tmp_path / "bad.onnx", runtime="onnxruntime")


def test_export_cli_prints_h_x_w(models, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert main(["export", "--checkpoint", str(models["checkpoint"]), "--out", str(out),
                 "--exporter", "torchscript"]) == 0
    printed = capsys.readouterr().out
    h, w = INPUT_HW
    assert f"images (N, 3, {h}, {w})" in printed and f"resized to {h}x{w} ({models['resize']})" in printed


def test_bench_random_batch_is_h_by_w():
    from multibox.bench.suite import random_batch
    images, boxes, labels = random_batch(2, (24, 40), 3, seed=0)
    assert images.shape == (2, 3, 24, 40) and len(boxes) == len(labels) == 2
    square, square_boxes, _ = random_batch(2, 24, 3, seed=0)
    again, again_boxes, _ = random_batch(2, (24, 24), 3, seed=0)
    assert square.shape == (2, 3, 24, 24) and torch.equal(square, again)
    assert all(torch.equal(a, b) for a, b in zip(square_boxes, again_boxes))


def test_bench_stages_run_the_non_square_export(models, tmp_path):
    """``bench --backends``'s staged ONNX predict (decode, resize_batch at (H, W), graph, boxes back) on a file."""
    from PIL import Image

    from multibox.bench.backends import STAGES, _staged_onnx
    path = tmp_path / "wide.png"
    Image.fromarray(wide_image().permute(1, 2, 0).numpy()).save(path)
    for graph in ("nms", "raw"):
        detector = OnnxDetector(models["exports"][graph], runtime="onnxruntime", threads=1, spin=False)
        seconds = _staged_onnx(detector)([str(path)])
        assert set(seconds) == set(STAGES) and all(t >= 0 for t in seconds.values())
