"""The accelerator code paths against the CPU: matching, losses, postprocessing, the batched augmentation,
the Detector (fp32, bf16, compiled) and training steps (bf16 and fp16 autocast, batched pipeline, prefetch).

Runs on CUDA when a GPU is present, or on the device named by ``MULTIBOX_TEST_DEVICE`` (``cpu`` runs every test
here against itself, which checks the tests' own code). The reference is always the CPU result.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from multibox.inference.detector import Detector
from multibox.config import load_config
from multibox.data.gpu_transforms import BatchAugment
from multibox.data.synth import generate_synthetic_coco
from multibox.data.transforms import TrainTransform
from multibox.core.matching import pad_targets
from multibox.models import build_model
from multibox.core.losses import build_criterion
from multibox.core.matching import build_encoder
from multibox.engine.fit import fit

_NAME = os.environ.get("MULTIBOX_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(not _NAME, reason="no accelerator (set MULTIBOX_TEST_DEVICE to run these on one)")
DEVICE = torch.device(_NAME or "cpu")
CPU = torch.device("cpu")
NAMES = ["bg", "a", "b", "c"]


def _targets(batch: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for i in range(batch):
        n = 1 + i % 4
        xy = torch.rand(n, 2, generator=g) * 0.7
        boxes.append(torch.cat((xy, xy + 0.05 + torch.rand(n, 2, generator=g) * 0.25), 1))
        labels.append(torch.randint(1, 4, (n,), generator=g))
    return boxes, labels


@pytest.mark.parametrize("preset", ["tiny", "ssd300-vgg16"])
def test_matching_and_loss_equal_cpu(preset):
    cfg = load_config(preset, ["model.num_classes=3"])
    boxes, labels = _targets(6, seed=1)
    g = torch.Generator().manual_seed(2)
    loc = torch.randn(6, 8732, 4, generator=g)
    cls = torch.randn(6, 8732, 4, generator=g)
    out = []
    for device in (CPU, DEVICE):
        gt_boxes, gt_labels = pad_targets(boxes, labels, device)
        loc_t, lab_t = build_encoder(cfg, device)(gt_boxes, gt_labels)
        losses = build_criterion(cfg)(loc.to(device), cls.to(device), loc_t, lab_t)
        out.append((loc_t.cpu(), lab_t.cpu(), {k: float(v) for k, v in losses.items()}))
    (ref_loc, ref_lab, ref_loss), (dev_loc, dev_lab, dev_loss) = out
    assert torch.equal(dev_lab, ref_lab) and int((ref_lab > 0).sum()) > 0
    torch.testing.assert_close(dev_loc, ref_loc, rtol=1e-5, atol=1e-5)
    for key, value in ref_loss.items():
        assert dev_loss[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_batched_augmentation_equals_cpu():
    tr = TrainTransform(300, crop_rule="paper", zoom_out=4.0, zoom_out_p=0.5, photometric=True, seed=5,
                        resize="torchvision", jitter=(0.3, 0.3, 0.3))
    augment = BatchAugment(tr)
    g = torch.Generator().manual_seed(0)
    sizes = [(240, 320), (375, 500), (300, 300), (480, 360)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    boxes, labels = _targets(len(sizes), seed=3)
    targets = [{"boxes": b * torch.tensor([w, h, w, h]), "labels": lab, "image_id": i, "orig_size": (h, w)}
               for i, ((h, w), b, lab) in enumerate(zip(sizes, boxes, labels))]
    params = [tr.sample_params((h, w), t) for (h, w), t in zip(sizes, targets)]
    ref, ref_targets = augment(images, targets, params, CPU)
    out, out_targets = augment(images, targets, params, DEVICE)
    assert out.device.type == DEVICE.type
    for t, r in zip(out_targets, ref_targets):
        assert torch.equal(t["boxes"].cpu(), r["boxes"]) and torch.equal(t["labels"].cpu(), r["labels"])
    diff = (out.cpu() - ref).abs() * tr.std   # grey levels
    assert diff.mean() < 0.05 and diff.max() < 2.0


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.num_classes=3", "eval.score_threshold=0.6", "eval.max_per_image=30"])
    model = build_model(cfg, load_backbone_weights=False).eval()
    with torch.no_grad():   # random weights: spread the class logits so that some boxes score above 0.6
        for head in model.cls_heads:
            head.weight.mul_(3.0)
            head.bias.view(-1, 4)[:, 1:] = -2.0
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
              for h, w in [(240, 320), (240, 320), (300, 300), (97, 211)]]
    cpu_cfg = copy.deepcopy(cfg)
    cpu_cfg.eval.precision = "fp32"
    expected = Detector(copy.deepcopy(model), cpu_cfg, NAMES, CPU).predict(images)
    assert sum(len(e["scores"]) for e in expected) >= 8
    return cfg, model, images, expected


def _detections_on_device(cfg, model, images, **eval_keys) -> list[dict]:
    cfg = copy.deepcopy(cfg)
    for key, value in eval_keys.items():
        setattr(cfg.eval, key, value)
    detector = Detector(copy.deepcopy(model), cfg, NAMES, DEVICE)
    detector.predict(images)   # compiled: the first call compiles (and records the CUDA graph)
    return detector.predict(images)


def _assert_found(expected: list[dict], actual: list[dict], top: int, box_tol: float, score_tol: float) -> None:
    """The ``top`` best expected detections of each image are in ``actual`` with the same class, box and score
    within tolerance (lower-ranked ones may swap places with near-equal neighbours)."""
    for e, a in zip(expected, actual):
        for box, score, label in zip(e["boxes"][:top], e["scores"][:top], e["labels"][:top]):
            same = (a["labels"] == label) & ((a["boxes"] - box).abs().amax(1) < box_tol) \
                & ((a["scores"] - score).abs() < score_tol)
            assert same.any(), f"{label.item()} {score.item():.4f} {box.tolist()} not found"


def test_detector_fp32_on_device_equals_cpu(tiny):
    cfg, model, images, expected = tiny
    actual = _detections_on_device(cfg, model, images, precision="fp32")
    assert [len(a["scores"]) for a in actual] == [len(e["scores"]) for e in expected]
    _assert_found(expected, actual, top=30, box_tol=1e-2, score_tol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_detector_half_precision_on_device_is_close_to_cpu(tiny, precision):
    if DEVICE.type == "cpu" and precision == "fp16":
        pytest.skip("fp16 autocast is a GPU mode")
    cfg, model, images, expected = tiny
    _assert_found(expected, _detections_on_device(cfg, model, images, precision=precision), top=10, box_tol=1.0,
                  score_tol=1e-2)


def test_compiled_detector_on_device_equals_eager(tiny):
    cfg, model, images, _ = tiny
    eager = _detections_on_device(cfg, model, images, precision="fp32")
    compiled = _detections_on_device(cfg, model, images, precision="fp32", compile=True)
    assert [len(a["scores"]) for a in compiled] == [len(e["scores"]) for e in eager]
    _assert_found(eager, compiled, top=30, box_tol=1e-2, score_tol=1e-4)


@pytest.mark.parametrize("amp_dtype,pipeline", [("bfloat16", "batched"), ("float16", "cpu")])
def test_training_on_device_runs_and_learns(tmp_path, amp_dtype, pipeline):
    ann = generate_synthetic_coco(tmp_path / "data", num_images=16, seed=4)
    cfg = load_config("tiny", [f"data.path={ann}", f"data.val_path={ann}", f"train.device={DEVICE}",
                               f"train.amp_dtype={amp_dtype}", f"data.pipeline={pipeline}", "data.num_workers=1",
                               "train.epochs=3", "train.batch_size=4", "train.log_every=1", "train.warmup_epochs=0",
                               "train.checkpoint_every=0"])
    fit(cfg, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 12 and all(map(lambda v: v == v and abs(v) < 1e4, losses))
    assert sum(losses[-4:]) < sum(losses[:4])   # 3 epochs on 16 images: the loss goes down
