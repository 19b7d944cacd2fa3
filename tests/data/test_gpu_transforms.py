"""The batched augmentation (multibox.data.gpu_transforms) against the per-image CPU transform.

References: :class:`multibox.data.transforms.TrainTransform` applied with the same parameters (boxes must be
bit-identical, images close: bilinear warp vs crop + resize, float vs uint8 intermediate), box masks pushed through
the warp (as tests/data/test_transforms_paper.py does for the CPU path), torchvision's ``adjust_hue`` and the CPU
photometric distortion for the batched colour ops. Runs on the CPU; the same code runs on CUDA.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from _data_builders import mask_extent, random_boxes_xyxy, scene_uint8
from multibox.config import load_config
from multibox.data.gpu_transforms import (
    AugmentBatch,
    BatchAugment,
    DeviceAugmentLoader,
    adjust_hue_batch,
    build_batch_augment,
    pad_replicate,
    photometric_distort_batch,
)
from multibox.data.transforms import TrainTransform, build_train_transform, photometric_distort, sample_photometric

S = 300
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), jitter=(0.0, 0.0, 0.0))
SIZES = [(240, 320), (375, 500), (180, 260), (420, 300)]   # (H, W): a batch of different sizes and aspects


pytestmark = pytest.mark.usefixtures("one_thread")


def _target(boxes: torch.Tensor, height: int, width: int, image_id: int = 0) -> dict:
    return {"boxes": boxes, "labels": torch.arange(1, boxes.shape[0] + 1), "image_id": image_id,
            "orig_size": (height, width)}


# --------------------------------------------------------------------------------------------- against the CPU path

@pytest.mark.parametrize("resize", ["torchvision", "antialias"])
def test_same_parameters_give_the_cpu_transforms_boxes_and_nearly_its_image(resize):
    """Full paper augmentation plus the tutorial's jitter, images of different sizes in one batch: boxes and labels
    are bit-identical to the CPU transform's, images differ by well under one grey level on average."""
    tr = TrainTransform(S, crop_rule="paper", zoom_out=4.0, zoom_out_p=0.5, photometric=True, seed=5,
                        resize=resize, jitter=(0.3, 0.3, 0.3))
    augment = BatchAugment(tr)
    g = torch.Generator().manual_seed(0)
    zoomed = flipped = hue = permuted = 0
    for round_ in range(4):
        images = [scene_uint8(h, w, 10 * round_ + i) for i, (h, w) in enumerate(SIZES)]
        targets = [_target(random_boxes_xyxy(w, h, 4, g), h, w, i) for i, (h, w) in enumerate(SIZES)]
        params = [tr.sample_params((h, w), t) for (h, w), t in zip(SIZES, targets)]
        out, out_targets = augment(images, targets, params)
        assert out.shape == (len(SIZES), 3, S, S) and out.dtype == torch.float32
        for i, (img, t, p) in enumerate(zip(images, targets, params)):
            ref, ref_t = tr.apply(img, t, p)
            assert torch.equal(out_targets[i]["boxes"], ref_t["boxes"])
            assert torch.equal(out_targets[i]["labels"], ref_t["labels"])
            assert out_targets[i]["image_id"] == i and out_targets[i]["orig_size"] == t["orig_size"]
            diff = ((out[i] - ref) * tr.std).abs()            # grey levels (0..255)
            assert diff.mean() < 1.0, (i, p, diff.mean())
            assert diff.flatten().kthvalue(int(0.99 * diff.numel())).values < 12.0, (i, p)
            zoomed += p["expand"] is not None
            flipped += p["flip"]
            hue += p["photometric"]["hue"] != 0
            permuted += p["photometric"]["permutation"] is not None
    assert zoomed >= 4 and flipped >= 4 and hue >= 4 and permuted >= 4


def test_sampling_follows_the_cpu_transforms_random_stream():
    """Without given parameters the batch draws them from the transform's sampler, image after image: the same
    seed gives the CPU transform's boxes for every image."""
    cfg = load_config("ssd300-vgg16")
    cpu, batched = build_train_transform(cfg, seed=3), build_batch_augment(cfg, seed=3)
    g = torch.Generator().manual_seed(1)
    images = [torch.zeros(3, h, w, dtype=torch.uint8) for h, w in SIZES * 2]
    targets = [_target(random_boxes_xyxy(w, h, 3, g), h, w) for h, w in SIZES * 2]
    prepared = batched.prepare(images, targets)
    for img, t, got in zip(images, targets, prepared.targets):
        _, expected = cpu(img, t)
        assert torch.equal(got["boxes"], expected["boxes"]) and torch.equal(got["labels"], expected["labels"])


# --------------------------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("resize", ["torchvision", "antialias"])
def test_box_masks_and_fill_stay_consistent(resize):
    """Each box drawn as a filled rectangle and warped with the same parameters gives back the output box (within
    2 output pixels); an all-white source lands where the parameters say, the rest is exactly the fill colour."""
    tr = TrainTransform(S, crop_rule="paper", zoom_out=4.0, zoom_out_p=0.7, photometric=True, seed=11,
                        resize=resize, **IDENTITY)
    augment = BatchAugment(tr)
    g = torch.Generator().manual_seed(7)
    checked = zoomed = 0
    for _ in range(6):
        targets = [_target(random_boxes_xyxy(w, h, 4, g), h, w) for h, w in SIZES]
        params = [dict(tr.sample_params((h, w), t), photometric=None) for (h, w), t in zip(SIZES, targets)]
        white, _ = augment([torch.full((3, h, w), 255, dtype=torch.uint8) for h, w in SIZES], targets, params)
        for i, ((h, w), t, p) in enumerate(zip(SIZES, targets, params)):
            zoomed += p["expand"] is not None
            # source rectangle in output units, from the parameters alone
            cw, ch, left, top = p["expand"] or (w, h, 0, 0)
            x1, y1, x2, y2 = p["window"] or (0, 0, cw, ch)
            rect = torch.tensor([(max(left, x1) - x1) / (x2 - x1), (max(top, y1) - y1) / (y2 - y1),
                                 (min(left + w, x2) - x1) / (x2 - x1), (min(top + h, y2) - y1) / (y2 - y1)])
            if p["flip"]:
                rect = torch.stack([1 - rect[2], rect[1], 1 - rect[0], rect[3]])
            # hard paste: no blur into the fill (bilinear weights sum to 1 only up to float rounding)
            assert ((white[i] == 0) | ((white[i] - 255).abs() < 1e-3)).all()
            torch.testing.assert_close(mask_extent(white[i, 0] > 254), rect, atol=1.0 / S + 1e-6, rtol=0)
        masks = []
        for (h, w), t in zip(SIZES, targets):
            stack = []
            for box in t["boxes"].int().tolist():
                m = torch.zeros(3, h, w, dtype=torch.uint8)
                m[:, box[1]:box[3], box[0]:box[2]] = 255
                stack.append(m)
            masks.append(stack)
        for k in range(4):   # the k-th box of every image, one batch
            warped, out_targets = augment([m[k] for m in masks], targets, params)
            for i, t_out in enumerate(out_targets):
                labels = t_out["labels"].tolist()
                if k + 1 not in labels:
                    continue
                box = t_out["boxes"][labels.index(k + 1)]
                assert (mask_extent(warped[i, 0] > 127.5) - box).abs().max() <= 2.0 / S, (params[i], box * S)
                checked += 1
    assert checked >= 30 and zoomed >= 6


def test_flip_only_is_an_exact_mirror():
    """No crop, no zoom-out, no resize (source already S x S), flip: bilinear sampling at pixel centres
    reads single pixels (up to float32 rounding of the grid)."""
    tr = TrainTransform(S, crop_rule=None, flip_p=1.0, seed=0, resize="torchvision", **IDENTITY)
    img = torch.randint(0, 256, (3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    target = _target(torch.tensor([[10.0, 20.0, 110.0, 220.0]]), S, S)
    out, out_t = BatchAugment(tr)([img], [target])
    torch.testing.assert_close(out[0], img.flip(-1).float(), atol=0.02, rtol=0)   # float32 grid rounding
    torch.testing.assert_close(out_t[0]["boxes"], torch.tensor([[190.0, 20.0, 290.0, 220.0]]) / S)


def test_pad_replicate_repeats_each_images_edges():
    a = torch.arange(6, dtype=torch.uint8).view(1, 2, 3).expand(3, 2, 3)
    b = torch.full((3, 3, 2), 9, dtype=torch.uint8)
    batch, sizes = pad_replicate([a, b], multiple=4)
    assert batch.shape == (2, 3, 4, 4) and sizes.tolist() == [[2, 3], [3, 2]]
    assert batch[0, 0].tolist() == [[0, 1, 2, 2], [3, 4, 5, 5], [3, 4, 5, 5], [3, 4, 5, 5]]
    assert (batch[1] == 9).all()


# --------------------------------------------------------------------------------------------- colour

def _batch_inputs(params: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [{"photometric": p, "brightness": 1.0, "contrast": 1.0, "saturation": 1.0} for p in params]
    colour = torch.tensor([BatchAugment._colour(r) for r in rows])
    permutation = torch.tensor([BatchAugment._permutation(r) for r in rows])
    return colour, permutation


def test_batched_photometric_equals_the_per_image_one():
    """Per-image parameters over a batch (torchvision's RandomPhotometricDistort steps, channel permutation
    included) give each image the CPU photometric_distort's result; a neutral image passes unchanged."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (8, 3, 9, 11), generator=g).float()
    params = [sample_photometric(g) for _ in range(8)]
    params[0] = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "contrast_first": True,
                 "permutation": None}                                  # neutral: passes through unchanged
    params[1] = {"brightness": 1.1, "contrast": 1.3, "saturation": 0.7, "hue": 0.03, "contrast_first": False,
                 "permutation": (2, 0, 1)}                              # every step, contrast last
    colour, permutation = _batch_inputs(params)
    got = photometric_distort_batch(x.clone(), colour, permutation=permutation)
    for i, p in enumerate(params):
        torch.testing.assert_close(got[i], photometric_distort(x[i].clone(), p), atol=2e-3, rtol=0)
    assert torch.equal(got[0], x[0])
    assert sum(p["permutation"] is not None for p in params) >= 3


def test_batched_contrast_pivot_is_the_mean_of_the_images_own_pixels():
    """With an ``inside`` mask (the zoom-out fill excluded), the contrast pivot is the mean grey level of the inside
    pixels: the per-image op applied to the inside rectangle alone gives the same pixels there."""
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, 256, (2, 3, 12, 10), generator=g).float()
    x[:, :, :, 7:] = 255.0                                             # "fill" columns, very bright
    inside = torch.zeros(2, 12, 10, dtype=torch.bool)
    inside[:, 2:11, 1:7] = True
    params = [dict(sample_photometric(g), contrast=c, contrast_first=first) for c, first in ((1.4, True), (0.6, False))]
    colour, permutation = _batch_inputs(params)
    got = photometric_distort_batch(x.clone(), colour, inside=inside, permutation=permutation)
    for i, p in enumerate(params):
        ref = photometric_distort(x[i, :, 2:11, 1:7].clone(), p)
        torch.testing.assert_close(got[i, :, 2:11, 1:7], ref, atol=2e-3, rtol=0)
    unmasked = photometric_distort_batch(x.clone(), colour, permutation=permutation)
    assert not torch.allclose(unmasked[:, :, 2:11, 1:7], got[:, :, 2:11, 1:7], atol=1.0)   # the mask matters


def test_hue_rotation_matches_torchvision():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(4, 3, 7, 5, generator=g)
    x[0, :, 0, 0] = 0.5                                                # grey
    x[1, :, 0, 0] = torch.tensor([0.9, 0.9, 0.1])                      # red/green tie
    shifts = torch.tensor([0.05, -0.03, 0.5, 0.0])
    got = adjust_hue_batch(x, shifts)
    for i, s in enumerate(shifts.tolist()):
        torch.testing.assert_close(got[i], TF.adjust_hue(x[i], s), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- loader

class _RawSet(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        if i == 3:
            return None                                                # an unreadable image
        h, w = SIZES[i % len(SIZES)]
        g = torch.Generator().manual_seed(i)
        return scene_uint8(h, w, i), _target(random_boxes_xyxy(w, h, 2, g), h, w, i)


def test_collate_and_device_loader():
    """DataLoader over raw samples with BatchAugment.collate (unreadable samples dropped and counted), wrapped by
    DeviceAugmentLoader: Batch objects of augmented images, the wrapped loader's attributes still reachable."""
    cfg = load_config("ssd300-vgg16")
    augment = build_batch_augment(cfg, seed=0)
    loader = DataLoader(_RawSet(), batch_size=4, collate_fn=augment.collate)
    raw = list(loader)
    assert isinstance(raw[0], AugmentBatch) and raw[0].images.dtype == torch.uint8
    assert len(raw[0]) == 3 and raw[0].skipped == 1 and len(raw[1]) == 1
    wrapped = DeviceAugmentLoader(loader, augment, "cpu")
    assert len(wrapped) == 2 and wrapped.batch_size == 4
    batches = list(wrapped)
    (images, targets), (images2, targets2) = batches
    assert images.shape == (3, 3, S, S) and images2.shape == (1, 3, S, S) and torch.isfinite(images).all()
    assert batches[0].skipped == 1 and batches[1].skipped == 0
    assert [t["image_id"] for t in targets + targets2] == [0, 1, 2, 4]
    for t in targets + targets2:
        b = t["boxes"]
        assert ((b >= 0) & (b <= 1)).all() and b.shape == (len(t["labels"]), 4)


def test_batched_pipeline_reproduces_the_cpu_pipelines_batches(tmp_path):
    """``data.pipeline: batched`` through build_splits / make_loader / DeviceAugmentLoader, keyed sampler: the same
    (seed, epoch, index) draws the same augmentation as ``data.pipeline: cpu`` (identical boxes, close images)."""
    from multibox.data.build import EpochShuffleSampler, build_splits, make_loader
    from multibox.data.synth import generate_synthetic_coco

    ann = generate_synthetic_coco(tmp_path / "data", num_images=6, seed=2)
    batches = {}
    for pipeline in ("cpu", "batched"):
        cfg = load_config("ssd300-vgg16", [f"data.path={ann}", f"data.val_path={ann}", f"data.pipeline={pipeline}",
                                           "data.jitter=[0.2, 0.2, 0.2]"])
        splits = build_splits(cfg)
        sampler = EpochShuffleSampler(len(splits.train), seed=4, keyed=True)
        sampler.set_epoch(1)
        augment = build_batch_augment(cfg) if pipeline == "batched" else None
        loader = make_loader(splits.train, 3, shuffle=True, num_workers=0, seed=0, sampler=sampler,
                             collate_fn=None if augment is None else augment.collate)
        if augment is not None:
            loader = DeviceAugmentLoader(loader, augment, "cpu")
        batches[pipeline] = list(loader)
    assert len(batches["cpu"]) == len(batches["batched"]) == 2
    for (cpu_images, cpu_targets), (images, targets) in zip(batches["cpu"], batches["batched"]):
        assert [t["image_id"] for t in targets] == [t["image_id"] for t in cpu_targets]
        for t, ref in zip(targets, cpu_targets):
            assert torch.equal(t["boxes"], ref["boxes"]) and torch.equal(t["labels"], ref["labels"])
            assert "augment_params" not in t
        diff = (images - cpu_images).abs()          # std 1 in this preset: grey levels
        assert diff.mean() < 1.5, diff.mean()


def test_unknown_pipeline_is_rejected(tmp_path):
    from multibox.data.build import train_sample_transform

    with pytest.raises(ValueError, match="data.pipeline"):
        train_sample_transform(load_config("tiny", ["data.pipeline=gpu"]))
