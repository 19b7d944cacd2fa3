"""The paper's augmentation (multibox.data.transforms): zoom-out composed with the IoU crop, photometric distortion,
and torchvision's preprocessing mode.

References: box IoU from torchvision.ops, torchvision's RandomPhotometricDistort and its functional colour ops, a
zoom-out that materialises the canvas (as ssd.pytorch's Expand does), torchvision's GeneralizedRCNNTransform, and
masks drawn from the boxes and pushed through the same transform. The crop's statistics against torchvision's
RandomIoUCrop are in tests/data/test_crop_reference.py.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from _data_builders import check_boxes_as_masks, mask_extent, random_boxes_xyxy
from multibox.config import load_config
from multibox.data.transforms import (
    PAPER_MIN_IOUS,
    PHOTOMETRIC_RANGES,
    EvalTransform,
    TrainTransform,
    build_eval_transform,
    build_train_transform,
    photometric_distort,
    sample_photometric,
    sample_zoom_out,
    zoom_out_paste_geometry,
)

S = 300
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), jitter=(0.0, 0.0, 0.0))
NEUTRAL = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "contrast_first": True,
           "permutation": None}


pytestmark = pytest.mark.usefixtures("one_thread")


def _target(boxes: torch.Tensor) -> dict:
    return {"boxes": boxes, "labels": torch.arange(1, boxes.shape[0] + 1), "image_id": 3, "orig_size": (0, 0)}


def _source_rect_in_output(params: dict, width: int, height: int) -> torch.Tensor:
    """Where the source image should land in the output, in [0, 1] units, computed from the parameters alone."""
    cw, ch, left, top = params["expand"] or (width, height, 0, 0)
    x1, y1, x2, y2 = params["window"] or (0, 0, cw, ch)
    rx1, ry1, rx2, ry2 = max(left, x1), max(top, y1), min(left + width, x2), min(top + height, y2)
    w, h = x2 - x1, y2 - y1
    rect = torch.tensor([(rx1 - x1) / w, (ry1 - y1) / h, (rx2 - x1) / w, (ry2 - y1) / h])
    if params["flip"]:
        rect = torch.stack([1 - rect[2], rect[1], 1 - rect[0], rect[3]])
    return rect


# --------------------------------------------------------------------------------------------- zoom-out sampling

def test_zoom_out_sampling_ranges_and_probability():
    g = torch.Generator().manual_seed(0)
    width, height, applied = 200, 120, 0
    for _ in range(2000):
        e = sample_zoom_out(width, height, 4.0, 0.5, g)
        if e is None:
            continue
        applied += 1
        cw, ch, left, top = e
        assert width <= cw <= 4 * width and height <= ch <= 4 * height
        # one ratio for both sides (int() truncation aside)
        assert abs(cw / width - ch / height) <= 1.0 / min(width, height) + 1e-9
        assert 0 <= left and left + width <= cw and 0 <= top and top + height <= ch
    assert 900 <= applied <= 1100
    # Disabled: None, and nothing is drawn from the generator.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert sample_zoom_out(width, height, 1.0, 1.0, g1) is None and sample_zoom_out(width, height, 0.0, 1.0, g1) is None
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


# --------------------------------------------------------------------------------------------- crop on the canvas

def test_a_kept_box_meets_the_sampled_iou_on_the_zoomed_canvas():
    """The reference rule on the zoom-out canvas: at least one kept box (centre inside the window) has IoU >= t with
    the window, in canvas coordinates (not necessarily every one: the old, wrong reading of the paper); t is one of
    the reference thresholds; kept boxes are exactly the canvas boxes clipped to the window; and the transformed
    boxes stay valid inside [0, 1]."""
    g = torch.Generator().manual_seed(1)
    tr = TrainTransform(S, crop_rule="paper", zoom_out=4.0, zoom_out_p=0.5, photometric=True, seed=2, **IDENTITY)
    checked, zoomed, some_below = 0, 0, 0
    for _ in range(250):
        width, height = int(torch.randint(60, 400, (1,), generator=g)), int(torch.randint(60, 400, (1,), generator=g))
        boxes = random_boxes_xyxy(width, height, int(torch.randint(1, 6, (1,), generator=g)), g)
        target = _target(boxes)
        params = tr.sample_params((height, width), target)
        cw, ch, left, top = params["expand"] or (width, height, 0, 0)
        zoomed += params["expand"] is not None
        canvas_boxes = boxes + torch.tensor([left, top, left, top], dtype=torch.float32)
        if params["window"] is not None:
            x1, y1, x2, y2 = params["window"]
            assert 0 <= x1 < x2 <= cw and 0 <= y1 < y2 <= ch
            centres = (canvas_boxes[:, :2] + canvas_boxes[:, 2:]) / 2
            kept = (centres[:, 0] > x1) & (centres[:, 0] < x2) & (centres[:, 1] > y1) & (centres[:, 1] < y2)
            assert kept.any() and params["labels"].tolist() == target["labels"][kept].tolist()
            ious = box_iou(canvas_boxes[kept], torch.tensor([params["window"]], dtype=torch.float32))[:, 0]
            assert params["min_iou"] in PAPER_MIN_IOUS and ious.max() >= params["min_iou"] - 1e-6, (ious, params)
            some_below += bool((ious < params["min_iou"]).any())
            expected = canvas_boxes[kept].clone()
            expected[:, 0::2] = expected[:, 0::2].clamp(x1, x2) - x1
            expected[:, 1::2] = expected[:, 1::2].clamp(y1, y2) - y1
            torch.testing.assert_close(params["boxes"], expected)
            checked += 1
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
        x, out = tr.apply(image, target, params)
        assert x.shape == (3, S, S) and torch.isfinite(x).all()
        b = out["boxes"]
        assert ((b >= 0) & (b <= 1)).all() and ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        assert b.shape == (len(out["labels"]), 4)
    # Failed thresholds are redrawn, so most images are cropped even on a zoomed-out canvas (only "keep the
    # whole image", 1/7 per round, ends a round uncropped); and windows keeping a box below t do occur.
    assert checked >= 150 and 90 < zoomed < 160 and some_below > 0


# --------------------------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("resize", ["antialias", "torchvision"])
def test_boxes_image_and_fill_stay_consistent(resize):
    """Each box drawn as a mask, pushed through the same parameters, gives back the output box (within 2 output
    pixels); an all-white source lands exactly where the parameters say, and everything else is the mean fill."""
    g = torch.Generator().manual_seed(7)
    tr = TrainTransform(S, crop_rule="paper", zoom_out=4.0, zoom_out_p=0.7, photometric=True, seed=11,
                        resize=resize, **IDENTITY)
    width, height = 320, 240
    checked = zoomed = 0
    for _ in range(24):
        boxes = random_boxes_xyxy(width, height, 4, g)
        target = _target(boxes)
        params = tr.sample_params((height, width), target)
        geometry_only = dict(params, photometric=None)
        zoomed += params["expand"] is not None
        _, out = tr.apply(torch.zeros(3, height, width, dtype=torch.uint8), target, params)

        white, _ = tr.apply(torch.full((3, height, width), 255, dtype=torch.uint8), target, geometry_only)
        # The source is resized on its own and pasted: it stays pure white, and the rest is exactly the mean fill
        # (0 once normalised), with no blur between them.
        assert ((white == 0) | (white == 255)).all()
        source = white[0] == 255
        torch.testing.assert_close(mask_extent(source), _source_rect_in_output(params, width, height),
                                   atol=1.0 / S + 1e-6, rtol=0)

        checked += check_boxes_as_masks(tr, boxes, target, out, geometry_only, (height, width), 2.0 / S)
    assert checked >= 20 and zoomed >= 8


def test_zoom_out_equals_cropping_the_materialised_canvas():
    """Reference: build the canvas r times the image filled with the mean (as ssd.pytorch's Expand), paste the image,
    crop the window, resize once. On a smooth image ours differs only by the sub-pixel rounding of the paste."""
    mean = (104.0, 117.0, 123.0)
    tr = TrainTransform(S, mean=mean, std=(1.0, 1.0, 1.0), jitter=(0, 0, 0), crop_rule="paper", flip_p=0.0,
                        zoom_out=4.0, zoom_out_p=1.0, seed=3)
    height, width = 180, 260
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)]).to(torch.uint8)
    boxes = torch.tensor([[30.0, 40.0, 120.0, 150.0], [150.0, 20.0, 250.0, 100.0]])
    compared = 0
    for _ in range(6):
        params = tr.sample_params((height, width), _target(boxes))
        cw, ch, left, top = params["expand"]
        x1, y1, x2, y2 = params["window"] or (0, 0, cw, ch)
        canvas = torch.tensor(mean).round().to(torch.uint8).view(3, 1, 1).expand(3, ch, cw).clone()
        canvas[:, top:top + height, left:left + width] = image
        ref = TF.resized_crop(canvas, y1, x1, y2 - y1, x2 - x1, [S, S], antialias=True).float()
        ours, _ = tr.apply(image, _target(boxes), params)
        ours = ours + torch.tensor(mean).view(3, 1, 1)
        diff = (ours - ref).abs()
        # The pasted edges may move by half an output pixel: compare away from them, and on average everywhere.
        assert diff.mean() < 2.0, diff.mean()
        assert diff.flatten().kthvalue(int(0.95 * diff.numel())).values < 4.0
        compared += 1
    assert compared == 6


def test_paste_geometry_hand_case():
    # canvas 400x300, image 100x50 at (150, 100); window (100, 50, 300, 250) -> scale 1.5 to a 300x300 output
    src, dst = zoom_out_paste_geometry((100, 50, 300, 250), (150, 100, 250, 150), 300)
    assert src == (0, 0, 100, 50) and dst == (75, 75, 225, 150)
    # the window sees the image's right part only
    src, dst = zoom_out_paste_geometry((200, 0, 400, 300), (150, 100, 250, 150), 300)
    assert src == (50, 0, 100, 50) and dst == (0, 100, 75, 150)     # x scale 1.5, y scale 1
    assert zoom_out_paste_geometry((0, 0, 100, 100), (150, 100, 250, 150), 300) is None


# --------------------------------------------------------------------------------------------- photometric

def _torchvision_photometric(x01: torch.Tensor, p: dict) -> torch.Tensor:
    """torchvision's own RandomPhotometricDistort.transform with our parameters, on a [0, 1] float image."""
    tv_params = {
        "brightness_factor": None if p["brightness"] == 1.0 else p["brightness"],
        "contrast_factor": None if p["contrast"] == 1.0 else p["contrast"],
        "saturation_factor": None if p["saturation"] == 1.0 else p["saturation"],
        "hue_factor": None if p["hue"] == 0.0 else p["hue"],
        "contrast_before": p["contrast_first"],
        "channel_permutation": None if p["permutation"] is None else torch.tensor(p["permutation"]),
    }
    return v2.RandomPhotometricDistort().transform(x01, tv_params)


def _functional_chain(x01: torch.Tensor, p: dict) -> torch.Tensor:
    """The same steps written out with torchvision.transforms.v2.functional, in RandomPhotometricDistort's order."""
    x = TF.adjust_brightness(x01, p["brightness"])
    if p["contrast_first"]:
        x = TF.adjust_contrast(x, p["contrast"])
    x = TF.adjust_hue(TF.adjust_saturation(x, p["saturation"]), p["hue"])
    if not p["contrast_first"]:
        x = TF.adjust_contrast(x, p["contrast"])
    return x if p["permutation"] is None else TF.permute_channels(x, list(p["permutation"]))


PHOTOMETRIC_CASES = [   # (parameters, whether some values reach the clamps)
    ({"brightness": 1.12, "contrast": 1.4, "saturation": 1.45, "hue": 0.04, "contrast_first": True,
      "permutation": (2, 0, 1)}, True),
    ({"brightness": 0.88, "contrast": 0.55, "saturation": 0.6, "hue": -0.045, "contrast_first": False,
      "permutation": None}, False),
    ({"brightness": 1.1, "contrast": 1.5, "saturation": 1.5, "hue": 0.05, "contrast_first": False,
      "permutation": (1, 0, 2)}, True),
]


@pytest.mark.parametrize("params, clamps", PHOTOMETRIC_CASES)
def test_photometric_distortion_equals_torchvision(params, clamps):
    """For fixed parameters: torchvision's functional ops on the [0, 1] image (and RandomPhotometricDistort's own
    transform with the same parameters), times 255, to float tolerance, clamping included."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (3, 13, 17), generator=g).float()
    x[:, 0, 0] = 128.0                                   # grey
    x[:, 0, 1] = torch.tensor([255.0, 250.0, 0.0])       # brightness > 1 and saturation push it past 255
    x[:, 0, 2] = torch.tensor([3.0, 0.0, 1.0])           # contrast / saturation < 1 ... or > 1 push it below 0
    ours = photometric_distort(x.clone(), params)
    ref = _torchvision_photometric(x / 255.0, params) * 255.0
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)
    torch.testing.assert_close(ours, _functional_chain(x / 255.0, params) * 255.0, atol=2e-3, rtol=0)
    assert ours.min() >= 0.0 and ours.max() <= 255.0
    assert bool(((ref == 0.0) | (ref == 255.0)).any()) == clamps   # the clamps were exercised where expected


def test_photometric_skipped_steps_are_skipped():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (3, 9, 11), generator=g).float()
    assert photometric_distort(x.clone(), NEUTRAL).equal(x)
    only_perm = dict(NEUTRAL, permutation=(2, 1, 0))
    assert photometric_distort(x.clone(), only_perm).equal(x.flip(0))
    # Contrast first or last is a real choice: with saturation in between, the results differ.
    first = dict(NEUTRAL, contrast=1.4, saturation=0.6, contrast_first=True)
    last = dict(first, contrast_first=False)
    assert not torch.allclose(photometric_distort(x.clone(), first), photometric_distort(x.clone(), last), atol=1e-2)


def test_train_transform_applies_torchvisions_photometric_distortion():
    """Wired into TrainTransform (no crop, no flip, no resize, identity normalisation): the output is torchvision's
    RandomPhotometricDistort of the image with the drawn parameters."""
    g = torch.Generator().manual_seed(6)
    image = torch.randint(0, 256, (3, S, S), dtype=torch.uint8, generator=g)
    tr = TrainTransform(S, crop_rule=None, flip_p=0.0, photometric=True, seed=3, resize="torchvision", **IDENTITY)
    applied = 0
    for _ in range(6):
        x, _ = tr(image, _target(torch.zeros(0, 4)))
        p = tr.last_params["photometric"]
        ref = _torchvision_photometric(image.float() / 255.0, p) * 255.0
        torch.testing.assert_close(x, ref, atol=2e-3, rtol=0)
        applied += p != NEUTRAL
    assert applied >= 4


def test_photometric_sampling_matches_torchvisions_ranges_and_probabilities():
    """Ranges are RandomPhotometricDistort's defaults; over 4000 draws each step is applied with frequency 0.5
    (+- 4 SE), its factors cover the range, contrast comes first half the time, and the permutation (p = 0.5) is
    uniform over the 6 orders (as ``torch.randperm``); torchvision's own make_params gives the same frequencies."""
    ref = v2.RandomPhotometricDistort()
    assert PHOTOMETRIC_RANGES == {"brightness": ref.brightness, "contrast": ref.contrast,
                                  "saturation": ref.saturation, "hue": ref.hue} and ref.p == 0.5
    n = 4000
    tol = 4 * math.sqrt(0.25 / n)
    g = torch.Generator().manual_seed(0)
    draws = [sample_photometric(g) for _ in range(n)]
    torch.manual_seed(0)
    image = torch.zeros(3, 2, 2)
    tv_draws = [ref.make_params([image]) for _ in range(n)]
    for key, neutral in (("brightness", 1.0), ("contrast", 1.0), ("saturation", 1.0), ("hue", 0.0)):
        lo, hi = PHOTOMETRIC_RANGES[key]
        values = torch.tensor([d[key] for d in draws], dtype=torch.float64)
        active = values != neutral
        assert abs(float(active.double().mean()) - 0.5) < tol, key
        tv_active = sum(d[f"{key}_factor"] is not None for d in tv_draws) / n
        assert abs(tv_active - 0.5) < tol, key
        used = values[active]
        assert lo <= used.min() < lo + 0.01 * (hi - lo) and hi - 0.01 * (hi - lo) < used.max() <= hi, key
        assert abs(float(used.mean()) - (lo + hi) / 2) < 4 * (hi - lo) / math.sqrt(12 * len(used)), key
    assert abs(sum(d["contrast_first"] for d in draws) / n - 0.5) < tol
    perms = [d["permutation"] for d in draws if d["permutation"] is not None]
    assert abs(len(perms) / n - 0.5) < tol
    assert abs(sum(d["channel_permutation"] is not None for d in tv_draws) / n - 0.5) < tol
    counts = torch.tensor([perms.count(q) for q in itertools.permutations(range(3))], dtype=torch.float64)
    expected = len(perms) / 6
    assert float(((counts - expected) ** 2 / expected).sum()) < 20.5   # chi-square, 5 dof, p = 0.001


def test_photometric_draws_do_not_change_the_geometry():
    """Photometric numbers are drawn last in a call: the same seed gives the same zoom-out, window, boxes and flip
    with it on or off."""
    g = torch.Generator().manual_seed(2)
    boxes = random_boxes_xyxy(300, 200, 5, g)
    for seed in range(20):
        common = dict(crop_rule="paper", zoom_out=4.0, seed=seed)
        on, off = TrainTransform(S, photometric=True, **common), TrainTransform(S, photometric=False, **common)
        a, b = on.sample_params((200, 300), _target(boxes)), off.sample_params((200, 300), _target(boxes))
        assert a["expand"] == b["expand"] and a["window"] == b["window"] and a["flip"] == b["flip"]
        assert torch.equal(a["boxes"], b["boxes"]) and a["photometric"] is not None and b["photometric"] is None


# --------------------------------------------------------------------------------------------- presets

def test_paper_preset_builds_the_paper_transforms():
    cfg = load_config("ssd300-vgg16")
    tr, ev = build_train_transform(cfg, seed=0), build_eval_transform(cfg)
    assert tr.photometric and tr.zoom_out == 4.0 and tr.zoom_out_p == 0.5 and tr.crop_rule == "paper"
    assert tr.jitter == (0.0, 0.0, 0.0) and tr.flip_p == 0.5 and tr.resize == "torchvision"
    assert torch.equal(tr.fill_normalised, torch.zeros(3, 1, 1))      # the canvas is the mean
    assert ev.resize == "torchvision" and ev.size == 300
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        image = torch.randint(0, 256, (3, 200, 270), dtype=torch.uint8, generator=g)
        x, out = tr(image, _target(random_boxes_xyxy(270, 200, 3, g)))
        assert x.shape == (3, 300, 300) and torch.isfinite(x).all()
    seed_cfg = load_config("ssd300-vgg16-seed")
    seed_tr = build_train_transform(seed_cfg)
    assert not seed_tr.photometric and seed_tr.zoom_out == 0 and build_eval_transform(seed_cfg).resize == "antialias"


@pytest.mark.parametrize("size", [(300, 300), (240, 320), (481, 375)])
def test_torchvision_resize_mode_equals_generalized_rcnn_transform(size):
    """``resize: torchvision`` gives bit for bit the tensor torchvision's SSD feeds its backbone."""
    cfg = load_config("ssd300-vgg16")
    ref_transform = GeneralizedRCNNTransform(300, 300, [0.48235, 0.45882, 0.40784], [1 / 255] * 3, size_divisible=1,
                                             fixed_size=(300, 300))
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ref = ref_transform([image.float() / 255])[0].tensors[0]
    ours, _ = build_eval_transform(cfg)(image)
    assert torch.equal(ours, ref)
    # The default mode still resizes the uint8 image with antialiasing.
    default, _ = EvalTransform(300, cfg.data.mean, cfg.data.std)(image)
    if size != (300, 300):
        assert not torch.equal(default, ref)
