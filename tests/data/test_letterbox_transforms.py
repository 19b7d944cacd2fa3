"""Non-square inputs and the letterbox resize in the transforms (multibox.data.transforms, data.gpu_transforms).

References, independent of the code under test: torchvision's ``F.resize`` (stretch), a letterbox built by hand
(``F.resize`` to the hand-computed inner size pasted on a canvas of the data's uint8 mean colour), boxes computed by
hand, boxes drawn as filled rectangles and pushed through the same transform, the inverse map of
:mod:`multibox.core.resize` (round trip), and the per-image CPU transform for the batched (GPU) path, run here on the
CPU device.
"""
from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from _data_builders import check_boxes_as_masks, mask_extent, random_boxes_xyxy, scene_uint8
from multibox.config import IMAGENET_MEAN_255, IMAGENET_STD_255, load_config
from multibox.core.resize import boxes_to_image_xyxy
from multibox.data.gpu_transforms import BatchAugment
from multibox.data.transforms import (
    EvalTransform,
    TrainTransform,
    build_eval_transform,
    build_train_transform,
    zoom_out_paste_geometry,
)

HW = (320, 544)                                       # a 16:9-ish input, (H, W)
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), jitter=(0.0, 0.0, 0.0))
MEAN_U8 = [round(m) for m in IMAGENET_MEAN_255]       # the data's mean colour as uint8: [124, 116, 104]
SIZES = [(240, 320), (375, 500), (180, 260), (420, 300)]   # (h, w): different sizes and aspects in one batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _target(boxes: torch.Tensor) -> dict:
    return {"boxes": boxes, "labels": torch.arange(1, boxes.shape[0] + 1), "image_id": 5, "orig_size": (0, 0)}


def _normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN_255, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255, dtype=torch.float32).view(3, 1, 1)
    return (x_uint8.float() - mean) / std


def _hand_letterbox(height: int, width: int, big_h: int, big_w: int) -> tuple[int, int, int, int]:
    """(top, left, inner_h, inner_w): one scale min(H/h, W/w), rounded, centred (the reference's own arithmetic)."""
    ratio = min(big_h / height, big_w / width)
    inner_h, inner_w = int(height * ratio + 0.5), int(width * ratio + 0.5)
    return (big_h - inner_h) // 2, (big_w - inner_w) // 2, inner_h, inner_w


# --------------------------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("hw", [(480, 640), (333, 777)])
def test_eval_stretch_non_square_equals_torchvision_resize(hw):
    h, w = hw
    image = scene_uint8(h, w, 1)
    boxes = torch.tensor([[10.0, 20.0, 300.0, 200.0], [0.0, 0.0, w, h]])
    x, t = EvalTransform(HW)(image, _target(boxes))
    assert x.shape == (3, *HW)
    torch.testing.assert_close(x, _normalise(TF.resize(image, list(HW), antialias=True)), atol=1e-5, rtol=0)
    torch.testing.assert_close(t["boxes"], boxes / torch.tensor([w, h, w, h]), atol=1e-7, rtol=0)
    # torchvision mode: the float image normalised, then bilinear without antialiasing
    x_tv, _ = EvalTransform(HW, resize="torchvision")(image, _target(boxes))
    ref = TF.resize(_normalise(image), list(HW), antialias=False)
    torch.testing.assert_close(x_tv, ref, atol=1e-4, rtol=0)


def test_eval_letterbox_equals_a_hand_built_letterbox():
    """480 x 640 into 320 x 544: scale 2/3 -> inner 320 x 427 (426.67 rounded), left pad (544 - 427) // 2 = 58."""
    image = scene_uint8(480, 640, 2)
    boxes = torch.tensor([[0.0, 0.0, 640.0, 480.0], [64.0, 48.0, 320.0, 240.0]])
    x, t = EvalTransform(HW, resize="letterbox")(image, _target(boxes))
    canvas = torch.tensor(MEAN_U8, dtype=torch.uint8).view(3, 1, 1).repeat(1, *HW)
    canvas[:, :, 58:58 + 427] = TF.resize(image, [320, 427], antialias=True)
    assert x.shape == (3, *HW)
    torch.testing.assert_close(x, _normalise(canvas), atol=1e-5, rtol=0)
    sx, sy = 427 / 640, 320 / 480
    expected = torch.tensor([[58 / 544, 0.0, (58 + 427) / 544, 1.0],
                             [(58 + 64 * sx) / 544, 48 * sy / 320, (58 + 320 * sx) / 544, 240 * sy / 320]])
    torch.testing.assert_close(t["boxes"], expected, atol=1e-6, rtol=0)


def test_eval_letterbox_tall_image_and_batches_of_mixed_sizes():
    """A tall 600 x 300 image: inner 320 x 160, left pad 192. ``batch`` (same-sized images grouped) gives every
    image its single-image result."""
    tall = scene_uint8(600, 300, 3)
    ev = EvalTransform(HW, resize="letterbox")
    x, _ = ev(tall)
    canvas = torch.tensor(MEAN_U8, dtype=torch.uint8).view(3, 1, 1).repeat(1, *HW)
    canvas[:, :, 192:352] = TF.resize(tall, [320, 160], antialias=True)
    torch.testing.assert_close(x, _normalise(canvas), atol=1e-5, rtol=0)
    images = [scene_uint8(480, 640, 4), tall, scene_uint8(480, 640, 5), scene_uint8(480, 640, 6)]
    batch = ev.batch(images)
    assert batch.shape == (4, 3, *HW)
    for i, image in enumerate(images):
        assert torch.equal(batch[i], ev(image)[0]), i


def test_builders_pass_the_configured_size_and_mode():
    cfg = load_config("tiny", ["model.image_size=[320, 544]", "data.resize=letterbox"])
    ev, tr = build_eval_transform(cfg), build_train_transform(cfg, seed=0)
    assert ev.input_hw == tr.input_hw == HW and ev.letterbox and tr.letterbox
    x, t = tr(scene_uint8(200, 300, 0), _target(torch.tensor([[10.0, 10.0, 100.0, 100.0]])))
    assert x.shape == (3, *HW) and ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()


# --------------------------------------------------------------------------------------------- training

def test_train_stretch_non_square_no_crop():
    """No crop, no flip, no jitter: the stretched training output is torchvision's resize; boxes per axis."""
    h, w = 375, 500
    image = scene_uint8(h, w, 7)
    boxes = torch.tensor([[10.0, 20.0, 300.0, 200.0], [100.0, 150.0, 480.0, 370.0]])
    tr = TrainTransform(HW, crop_rule=None, flip_p=0.0, jitter=(0.0, 0.0, 0.0))
    x, t = tr(image, _target(boxes))
    assert x.shape == (3, *HW)
    torch.testing.assert_close(x, _normalise(TF.resize(image, list(HW), antialias=True)), atol=1e-4, rtol=0)
    torch.testing.assert_close(t["boxes"], boxes / torch.tensor([w, h, w, h]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("hw", [(375, 500), (600, 300)])
def test_train_letterbox_no_crop_places_the_image_and_its_boxes(hw):
    """No crop, no flip: the image is letterboxed (hand-computed placement), padded with the fill (mean: 0 once
    normalised); a box drawn as a filled rectangle lands where the mapped box says (within one output pixel)."""
    h, w = hw
    top, left, ih, iw = _hand_letterbox(h, w, *HW)
    tr = TrainTransform(HW, crop_rule=None, flip_p=0.0, resize="letterbox", **IDENTITY)
    boxes = torch.tensor([[30.0, 40.0, 200.0, 180.0], [w - 90.0, h - 120.0, w - 10.0, h - 5.0]])
    image = torch.full((3, h, w), 100, dtype=torch.uint8)
    x, t = tr(image, _target(boxes))
    assert x.shape == (3, *HW)
    inner = torch.zeros(HW, dtype=torch.bool)
    inner[top:top + ih, left:left + iw] = True
    assert (x[:, ~inner] == 0).all() and (x[:, inner] == 100).all()
    scale = torch.tensor([iw / w, ih / h, iw / w, ih / h])
    offset = torch.tensor([left, top, left, top])
    expected = (boxes * scale + offset) / torch.tensor([HW[1], HW[0], HW[1], HW[0]])
    torch.testing.assert_close(t["boxes"], expected, atol=1e-6, rtol=0)
    for box, out_box in zip(boxes.int().tolist(), t["boxes"]):
        drawn = image.clone()
        drawn[:, box[1]:box[3], box[0]:box[2]] = 255
        m, _ = tr(drawn, _target(boxes))
        assert (mask_extent(m[0] > 177.5) - out_box).abs().max() <= 1.0 / min(HW), (box, out_box)


@pytest.mark.parametrize("hw", [(320, 544), (300, 300), (400, 240)])
def test_train_letterbox_with_crop_zoom_and_flip_keeps_boxes_on_their_pixels(hw):
    """Paper crop, zoom-out and flip, letterboxed: each box drawn as a mask lands on its output box (within two
    output pixels); pixels outside where the window is letterboxed are exactly the fill (0)."""
    tr = TrainTransform(hw, crop_rule="paper", zoom_out=3.0, zoom_out_p=0.5, seed=4, resize="letterbox", **IDENTITY)
    g = torch.Generator().manual_seed(9)
    height, width = 240, 320
    checked = flipped = 0
    for _ in range(10):
        boxes = random_boxes_xyxy(width, height, 3, g)
        target = _target(boxes)
        params = tr.sample_params((height, width), target)
        cw, ch, _, _ = params["expand"] or (width, height, 0, 0)
        x1, y1, x2, y2 = params["window"] or (0, 0, cw, ch)
        top, left, ih, iw = _hand_letterbox(y2 - y1, x2 - x1, *hw)
        white, out = tr.apply(torch.full((3, height, width), 255, dtype=torch.uint8), target, params)
        outside = torch.ones(hw, dtype=torch.bool)
        outside[top:top + ih, left:left + iw] = False
        if params["flip"]:
            outside = outside.flip(-1)
        assert (white[:, outside] == 0).all()
        flipped += params["flip"]
        checked += check_boxes_as_masks(tr, boxes, target, out, params, (height, width), 2.0 / min(hw))
    assert checked >= 12 and flipped >= 2


def test_paste_geometry_letterbox_hand_case():
    # window 200 x 100 on the canvas, image at x 50..250: letterbox into 320 x 544 -> scale 2.72, 544 x 272, top 24
    src, dst = zoom_out_paste_geometry((0, 0, 200, 100), (50, 0, 250, 100), HW, letterbox=True)
    assert src == (0, 0, 150, 100) and dst == (136, 24, 544, 296)
    # stretched to 320 x 544 instead: x scale 2.72, y scale 3.2
    src, dst = zoom_out_paste_geometry((0, 0, 200, 100), (50, 0, 250, 100), HW)
    assert src == (0, 0, 150, 100) and dst == (136, 0, 544, 320)


# --------------------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("hw", [(480, 640), (600, 300), (333, 777)])
def test_letterbox_boxes_map_back_to_the_originals(hw):
    h, w = hw
    g = torch.Generator().manual_seed(h)
    boxes = random_boxes_xyxy(w, h, 5, g)
    for transform in (EvalTransform(HW, resize="letterbox"),
                      TrainTransform(HW, crop_rule=None, flip_p=0.0, resize="letterbox", jitter=(0.0, 0.0, 0.0))):
        _, t = transform(torch.zeros(3, h, w, dtype=torch.uint8), _target(boxes))
        back = boxes_to_image_xyxy(t["boxes"], (h, w), HW, True)
        torch.testing.assert_close(back.double(), boxes.double(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------- batched (GPU) path

@pytest.mark.parametrize("resize", ["antialias", "torchvision", "letterbox"])
def test_batched_path_agrees_with_the_cpu_transform_non_square(resize):
    """The batched augmentation at (320, 544), full paper augmentation: boxes bit-identical to the CPU
    transform's, images within the tolerance of the square tests (tests/data/test_gpu_transforms.py)."""
    tr = TrainTransform(HW, crop_rule="paper", zoom_out=4.0, zoom_out_p=0.5, photometric=True, seed=5,
                        resize=resize, jitter=(0.3, 0.3, 0.3))
    augment = BatchAugment(tr)
    g = torch.Generator().manual_seed(0)
    for round_ in range(2):
        images = [scene_uint8(h, w, 10 * round_ + i) for i, (h, w) in enumerate(SIZES)]
        targets = [_target(random_boxes_xyxy(w, h, 4, g)) for h, w in SIZES]
        params = [tr.sample_params((h, w), t) for (h, w), t in zip(SIZES, targets)]
        out, out_targets = augment(images, targets, params)
        assert out.shape == (len(SIZES), 3, *HW)
        for i, (img, t, p) in enumerate(zip(images, targets, params)):
            ref, ref_t = tr.apply(img, t, p)
            assert torch.equal(out_targets[i]["boxes"], ref_t["boxes"])
            assert torch.equal(out_targets[i]["labels"], ref_t["labels"])
            diff = ((out[i] - ref) * tr.std).abs()            # grey levels (0..255)
            assert diff.mean() < 1.0, (i, p, diff.mean())
            assert diff.flatten().kthvalue(int(0.99 * diff.numel())).values < 12.0, (i, p)


def test_batched_letterbox_fills_outside_the_placement():
    """No crop, no flip: a white image lands exactly on the hand-computed letterbox rectangle, the rest is the
    fill (0); with a flip the rectangle is mirrored."""
    for flip_p in (0.0, 1.0):
        tr = TrainTransform(HW, crop_rule=None, flip_p=flip_p, resize="letterbox", seed=0, **IDENTITY)
        images = [torch.full((3, h, w), 255, dtype=torch.uint8) for h, w in SIZES]
        targets = [_target(torch.tensor([[1.0, 2.0, 30.0, 40.0]])) for _ in SIZES]
        out, _ = BatchAugment(tr)(images, targets)
        for i, (h, w) in enumerate(SIZES):
            top, left, ih, iw = _hand_letterbox(h, w, *HW)
            inner = torch.zeros(HW, dtype=torch.bool)
            inner[top:top + ih, left:left + iw] = True
            if flip_p:
                inner = inner.flip(-1)
            assert (out[i][:, ~inner] == 0).all(), (h, w)
            assert ((out[i][:, inner] - 255).abs() < 1e-3).all(), (h, w)
