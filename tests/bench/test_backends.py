"""``multibox bench --backends`` at toy sizes: a tiny checkpoint trained here on synthetic data, measured through
PyTorch and onnxruntime from the command line. References: ``multibox``'s own evaluation pass
(:func:`multibox.evaluation.evaluate.evaluate_model`, the DataLoader path of ``multibox eval``) for the AP that the
bench measures through ``predict``; the checkpoint's tensors for the PyTorch model's size; torchvision's own model
for the weight conversion of the twin arch. No timed assertion: speed belongs to the bench itself."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from multibox.bench import BACKENDS
from multibox.bench import backends as B
from multibox.checkpoint import load_checkpoint
from multibox.cli import main
from multibox.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["model.widths=[16, 32, 48, 64, 64, 64, 64, 64]", "train.epochs=6", "train.batch_size=8",
         "train.lr=0.006", "data.num_workers=0", "data.val_fraction=0.25", "train.threads=1",
         "train.checkpoint_every=0", "eval.batch_size=16"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(annotations, best checkpoint): the tiny preset trained a few epochs on 40 small synthetic images, one
    class."""
    from multibox.data.synth import generate_synthetic_coco

    root = tmp_path_factory.mktemp("backends")
    ann = generate_synthetic_coco(root / "synth", num_images=40, seed=0, min_side=128, max_side=160,
                                  num_classes=1, max_objects=2, size_range=(0.3, 0.6))
    args = ["train", "--data", str(ann), "--out", str(root / "run"), "--no-progress"]
    for item in TRAIN:
        args += ["--set", item]
    assert main(args) == 0
    return ann, root / "run" / "best.pt"


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    """The JSON report of ``multibox bench --backends torch,onnx`` with AP on the training data's held-out split."""
    pytest.importorskip("onnxruntime")
    ann, checkpoint = trained
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert main(["bench", "--backends", "torch,onnx", "--checkpoint", str(checkpoint), "--data", str(ann),
                 "--iters", "1", "--warmup", "0", "--workdir", str(out.parent), "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_backend_row_has_every_field(report, trained):
    table = report["backends"]
    ref, rows = table["reference"], table["rows"]
    assert [r["backend"] for r in rows] == ["torch", "onnx"] and ref["backend"] == "torchvision"
    assert report["rows"] == []   # --backends alone runs no other line
    weights = load_checkpoint(trained[1])["model"]
    for r in rows:
        assert set(r) == set(B.FIELDS) and r["skipped"] is None
        assert r["ms_b1"] > 0 and r["img_s_b8"] > 0 and r["size_mb"] > 0
        # ratios: torchvision's ms over ours at batch 1, our images/s over theirs at batch 8 (rounded in the JSON)
        assert r["ratio_b1"] == pytest.approx(ref["ms_b1"] / r["ms_b1"], rel=0.02, abs=0.01)
        assert r["ratio_b8"] == pytest.approx(r["img_s_b8"] / ref["img_s_b8"], rel=0.02, abs=0.01)
        assert set(r["stages_ms"]) == set(B.STAGES) and all(v >= 0 for v in r["stages_ms"].values())
        assert r["stages_ms"]["graph"] > 0
    float_bytes = sum(t.numel() * 4 for t in weights.values() if t.is_floating_point())
    assert rows[0]["size_mb"] == pytest.approx(float_bytes / 1e6, abs=0.05)
    assert ref["ap"] is None   # no twin for tiny: torchvision's reference has other weights, its AP says nothing
    text = B.format_backends_table(table)
    assert "torch eager fp32" in text and "onnxruntime fp32" in text and "where the time goes" in text


@pytest.mark.slow
def test_ap_through_every_backend_equals_the_evaluation_pass(report, trained):
    from multibox.config import Config
    from multibox.data.build import build_splits
    from multibox.evaluation.evaluate import evaluate_model
    from multibox.models import model_from_state_dict

    ann, checkpoint = trained
    payload = load_checkpoint(checkpoint)
    cfg = Config.from_dict(payload["config"])
    cfg.data.path, cfg.data.val_path = str(ann), None
    reference = evaluate_model(cfg, model_from_state_dict(cfg, payload["model"]), build_splits(cfg),
                               torch.device("cpu")).stats["AP"]
    assert reference > 0.02   # trained enough that a wrong pipeline would show (about 0.08 here)
    ap = {r["backend"]: r["ap"] for r in report["backends"]["rows"]}
    assert ap["torch"] == pytest.approx(reference, abs=1e-3)
    assert ap["onnx"] == pytest.approx(ap["torch"], abs=1e-3)


@pytest.mark.slow
def test_a_missing_runtime_gives_a_skipped_row_with_its_reason(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # import onnxruntime now raises ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    out = B.bench_backends(["onnx", "torch", "openvino-int8"], checkpoint=str(trained[1]), iters=1, warmup=0)
    onnx, torch_row, openvino = out["rows"]
    assert onnx["skipped"] == "onnxruntime is not installed (pip install 'multibox[export]')"
    assert openvino["skipped"] == "openvino is not installed (pip install 'multibox[export]')"
    assert all(onnx[k] is None for k in ("ms_b1", "img_s_b8", "size_mb", "ap", "stages_ms"))
    assert torch_row["skipped"] is None and torch_row["ms_b1"] > 0
    text = B.format_backends_table(out)
    assert "onnx           skipped: onnxruntime is not installed" in text
    assert "no onnxruntime" in out["title"]


def test_a_refused_int8_export_skips_both_int8_rows_with_the_gates_reason(monkeypatch, tmp_path):
    quantize = pytest.importorskip("multibox.export.quantize")
    calls = []

    def refuse(checkpoint, out, calib_data, **kwargs):
        calls.append((checkpoint, calib_data))
        raise quantize.AccuracyGateError("INT8 AP 0.1000 is more than 1% below float AP 0.2000")

    monkeypatch.setattr(quantize, "export_int8", refuse)
    monkeypatch.setattr(B, "skip_reason", lambda name: None)   # whatever is installed here
    subject = B.Subject(cfg=None, state_dict={}, class_names=[], category_ids=None, reference=None,
                        same_weights=False, checkpoint=tmp_path / "model.pt")
    files = B._ModelFiles(subject, tmp_path, [], "data.json")
    candidates, skipped = B.build_candidates(["onnx-int8", "openvino-int8"], subject, files, threads=1)
    reason = "int8 export refused: INT8 AP 0.1000 is more than 1% below float AP 0.2000"
    assert candidates == [] and skipped == {"onnx-int8": reason, "openvino-int8": reason}
    assert calls == [(tmp_path / "model.pt", "data.json")]   # made once, for both runtimes


def test_bf16_is_skipped_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert "no native bf16" in B.skip_reason("torch-bf16")
    assert B.skip_reason("torch") is None


def test_unknown_backends_and_data_without_checkpoint_are_refused(tmp_path, capsys):
    with pytest.raises(InputError, match="unknown --backends.*'tflite'"):
        B.parse_backends("torch,tflite")
    assert B.parse_backends("onnx, torch,onnx") == ["onnx", "torch"]
    assert set(BACKENDS) == {"torch", "torch-bf16", "onnx", "onnx-int8", "openvino", "openvino-int8"}
    with pytest.raises(InputError, match="needs a trained --checkpoint"):
        B.bench_backends("torch", arch="tiny", data="synth")
    assert main(["bench", "--backends", "torch", "--data", "x.json", "--out", str(tmp_path / "b.json")]) == 2
    assert "needs a trained --checkpoint" in capsys.readouterr().err and not (tmp_path / "b.json").exists()


@pytest.mark.slow   # two SSD300 initialisations
def test_twin_weights_round_trip_to_torchvision():
    """multibox's weights of a twin arch in torchvision's layout are torchvision's own tensors (the reference then
    computes the same function as the checkpoint)."""
    from multibox.bench.suite import torchvision_ssd, twin_weights

    theirs = torchvision_ssd(torch.device("cpu"), "ssd300_vgg16")
    ours = twin_weights("ssd300_vgg16", theirs)
    back = B._reference_state("ssd300_vgg16", ours, theirs)
    original = theirs.state_dict()
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
