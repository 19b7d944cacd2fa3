"""COCO evaluation of exported models: ``evaluate_onnx`` and ``multibox eval --checkpoint model.onnx``.

References: the checkpoint's own evaluation (``evaluate_model`` / ``multibox eval`` of the .pt, PyTorch
preprocessing and postprocessing), and pycocotools' COCOeval run here on the ONNX model's detections against the
ground-truth file.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")

from multibox.checkpoint import load_checkpoint  # noqa: E402
from multibox.cli import main  # noqa: E402
from multibox.config import Config  # noqa: E402
from multibox.data.build import build_splits  # noqa: E402
from multibox.evaluation.evaluate import evaluate_model  # noqa: E402
from multibox.export.onnx import export_checkpoint  # noqa: E402
from multibox.inference.onnx import OnnxDetector  # noqa: E402
from multibox.inference.onnx_eval import evaluate_onnx  # noqa: E402
from multibox.models import model_from_state_dict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def trained(quick_tiny, tmp_path_factory):
    ann, checkpoint = quick_tiny
    model = export_checkpoint(checkpoint, tmp_path_factory.mktemp("onnx-eval") / "model.onnx", exporter="torchscript")
    return ann, checkpoint, model


def _pycocotools_ap(ann: Path, detections: list[dict]) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        ev.params.imgIds = sorted({d["image_id"] for d in detections} | set(ev.params.imgIds))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_float_export_scores_as_the_checkpoint(trained):
    """The float export's AP through evaluate_onnx = the checkpoint's AP through evaluate_model (same split),
    and = pycocotools' own COCOeval of the ONNX detections."""
    ann, checkpoint, model = trained
    payload = load_checkpoint(checkpoint)
    cfg = Config.from_dict(payload["config"])
    splits = build_splits(cfg)
    reference = evaluate_model(cfg, model_from_state_dict(cfg, payload["model"]), splits, torch.device("cpu"))
    assert reference.stats["AP50"] > 0.2, reference.stats   # a model that finds objects: the check means something
    result, detections = evaluate_onnx(OnnxDetector(model), splits, return_detections=True)
    assert result.stats["AP"] == pytest.approx(reference.stats["AP"], abs=2e-4)
    assert result.stats["AP50"] == pytest.approx(reference.stats["AP50"], abs=2e-4)
    assert result.num_images == len(splits.val) == 6
    # pycocotools on the ground-truth file, restricted to the evaluated images
    pytest.importorskip("pycocotools")
    gt = json.loads(ann.read_text())
    held_out = set(splits.val_image_ids)
    sub = {**gt, "images": [im for im in gt["images"] if im["id"] in held_out],
           "annotations": [a for a in gt["annotations"] if a["image_id"] in held_out]}
    sub_path = ann.parent / "held_out.json"
    sub_path.write_text(json.dumps(sub))
    assert _pycocotools_ap(sub_path, detections) == pytest.approx(result.stats["AP"], abs=1e-6)


def test_eval_command_on_an_onnx_file(trained, tmp_path):
    """``multibox eval --checkpoint model.onnx``: the checkpoint's evaluation split by default (the config in
    the model's metadata), eval.json and the report as for the .pt, the same AP."""
    _, checkpoint, model = trained
    assert main(["eval", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "pt"), "--device", "cpu",
                 "--no-progress"]) == 0
    assert main(["eval", "--checkpoint", str(model), "--out", str(tmp_path / "onnx"), "--no-progress",
                 "--runtime", "onnxruntime"]) == 0
    pt = json.loads((tmp_path / "pt" / "eval.json").read_text())
    onnx_eval = json.loads((tmp_path / "onnx" / "eval.json").read_text())
    assert onnx_eval["AP"] == pytest.approx(pt["AP"], abs=2e-4)
    assert onnx_eval["per_class"].keys() == pt["per_class"].keys()
    assert onnx_eval["checkpoint"]["path"] == str(model.resolve())
    assert onnx_eval["data"] == pt["data"]
    assert (tmp_path / "onnx" / "index.html").is_file()


@pytest.mark.slow
def test_eval_of_an_onnx_file_on_other_data_and_openvino(trained, tmp_path):
    """``--data`` evaluates every image of another set; OpenVINO (f32) scores the float graph as onnxruntime."""
    pytest.importorskip("openvino")
    ann, _, model = trained
    aps = {}
    for runtime in ("onnxruntime", "openvino"):
        out = tmp_path / runtime
        assert main(["eval", "--checkpoint", str(model), "--data", str(ann), "--out", str(out), "--no-progress",
                     "--runtime", runtime]) == 0
        evaluated = json.loads((out / "eval.json").read_text())
        assert evaluated["data"]["images"] == 24 and evaluated["data"]["split"] == "every image"
        aps[runtime] = evaluated["AP"]
    assert aps["openvino"] == pytest.approx(aps["onnxruntime"], abs=2e-3)
