"""The fast inference path (device-side batched preprocessing, NHWC, bf16, torch.compile) against the plain one.

The reference is written out here: each image through ``EvalTransform.__call__`` on its own, the network in its
default NCHW layout in fp32, then the PostProcessor -- what evaluation did before any of the speed work.
"""
from __future__ import annotations

import copy

import pytest
import torch

from multibox.inference.detector import Detector, load
from multibox.checkpoint import save_checkpoint
from multibox.config import load_config
from multibox.data.transforms import EvalTransform, build_eval_transform
from multibox.runtime import inference_dtype, training_amp_dtype
from multibox.models import build_model
from multibox.core.postprocess import build_postprocessor

SIZES = [(120, 160), (300, 300), (120, 160), (97, 211)]   # two alike: one resize call serves both
SCORE = 0.6


def images_of(sizes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        coarse = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g) * 255
        out.append(torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").round().byte()[0])
    return out


@pytest.mark.parametrize("resize", ["antialias", "torchvision"])
def test_batched_preprocessing_equals_per_image_transform(resize):
    transform = EvalTransform(300, resize=resize)
    images = images_of(SIZES)
    batch = transform.batch(images)
    assert batch.shape == (len(images), 3, 300, 300) and batch.dtype == torch.float32
    for image, row in zip(images, batch):
        torch.testing.assert_close(row, transform(image)[0], rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.num_classes=3", f"eval.score_threshold={SCORE}", "eval.max_per_image=30"])
    model = build_model(cfg, load_backbone_weights=False).eval()
    with torch.no_grad():   # random weights: spread the class logits so that some boxes score above SCORE
        for head in model.cls_heads:
            head.weight.mul_(3.0)
            head.bias.view(-1, 4)[:, 1:] = -2.0
    return cfg, model


def plain_predict(cfg, model, images) -> list[dict]:
    transform, postprocess = build_eval_transform(cfg), build_postprocessor(cfg)
    with torch.no_grad():
        loc, cls = model(torch.stack([transform(img)[0] for img in images]))
    return postprocess(loc, cls, model.anchors_cxcywh, [tuple(img.shape[-2:]) for img in images])


def assert_same(expected: list[dict], actual: list[dict], box_tol: float, score_tol: float) -> None:
    """Same detections per image in the same (descending score) order, within tolerances."""
    assert len(expected) == len(actual)
    for i, (e, a) in enumerate(zip(expected, actual)):
        assert len(e["scores"]) == len(a["scores"]), f"image {i}: {len(e['scores'])} vs {len(a['scores'])}"
        assert torch.equal(e["labels"], a["labels"]), f"image {i}"
        torch.testing.assert_close(a["scores"], e["scores"], rtol=0, atol=score_tol)
        torch.testing.assert_close(a["boxes"], e["boxes"], rtol=0, atol=box_tol)


def test_detector_fast_path_equals_plain_path(tiny):
    cfg, model = tiny
    images = images_of(SIZES, seed=1)
    expected = plain_predict(cfg, model, images)
    assert sum(len(e["scores"]) for e in expected) >= 8, "degenerate test: too few detections"
    detector = Detector(copy.deepcopy(model), cfg, ["bg", "a", "b", "c"], torch.device("cpu"))
    first_conv = next(m for m in detector.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same(expected, detector.predict(images, batch_size=3), box_tol=1e-3, score_tol=1e-5)


def test_bf16_inference_on_cpu_is_close_to_fp32(tiny):
    cfg, model = tiny
    cfg = copy.deepcopy(cfg)
    cfg.eval.precision = "bf16"
    images = images_of(SIZES, seed=1)
    expected = plain_predict(cfg, model, images)
    detector = Detector(copy.deepcopy(model), cfg, ["bg", "a", "b", "c"], torch.device("cpu"))
    dtypes = []
    detector.model.cls_heads[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    actual = detector.predict(images)
    assert dtypes == [torch.bfloat16]
    # bf16 keeps 8 bits of mantissa: scores move by ~1e-3 here, so detections near the score threshold or the
    # per-image cap may come or go, and NMS may keep the other one of two near-equal boxes. The ten best fp32
    # detections of each image must be found again with the same class, nearly the same box and score.
    for e, a in zip(expected, actual):
        for box, score, label in zip(e["boxes"][:10], e["scores"][:10], e["labels"][:10]):
            same = (a["labels"] == label) & ((a["boxes"] - box).abs().amax(1) < 1.0) & ((a["scores"] - score).abs() < 0.01)
            assert same.any(), f"fp32 detection {label.item()} {score.item():.3f} {box.tolist()} lost in bf16"


@pytest.mark.slow
def test_compiled_detector_equals_plain_path(tiny):
    pytest.importorskip("torch._inductor")
    cfg, model = tiny
    cfg = copy.deepcopy(cfg)
    cfg.eval.compile = True
    images = images_of(SIZES[:2], seed=1)
    expected = plain_predict(cfg, model, images)
    detector = Detector(copy.deepcopy(model), cfg, ["bg", "a", "b", "c"], torch.device("cpu"))
    assert_same(expected, detector.predict(images, batch_size=2), box_tol=1e-3, score_tol=1e-5)


def test_inference_precision_rules():
    """``auto`` is fp32 for evaluation and prediction on every device, even where training autocasts to bf16;
    half precision only when asked for."""
    cfg = load_config("tiny")
    cuda = torch.device("cuda")
    assert cfg.eval.precision == "auto" and cfg.train.amp and cfg.train.amp_dtype == "bfloat16"
    assert training_amp_dtype(cfg, cuda) is torch.bfloat16    # training does autocast on CUDA ...
    assert inference_dtype(cfg) is None                       # ... evaluation and predict do not
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None)):
        cfg.eval.precision = precision
        assert inference_dtype(cfg) is dtype
    cfg.eval.precision = "int8"
    with pytest.raises(ValueError, match="eval.precision"):
        inference_dtype(cfg)


def test_load_overrides_precision_and_keeps_checkpoint_weights(tiny, tmp_path):
    cfg, model = tiny
    path = tmp_path / "model.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "class_names": ["bg", "a", "b", "c"]},
                    path)
    detector = load(path, device="cpu", precision="bf16")
    assert detector.cfg.eval.precision == "bf16" and detector.dtype is torch.bfloat16
    assert load(path, device="cpu").dtype is None
    for name, tensor in model.state_dict().items():
        assert torch.equal(detector.model.state_dict()[name], tensor), name
