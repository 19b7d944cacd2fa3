"""Box-aware training / evaluation transforms (SPEC sections 2 and 3, "Augmentation").

Input: ``(image, target)`` with image uint8 (3, h, w) and target["boxes"] float32 (n, 4)
xyxy pixels, target["labels"] int64 (n,). Output: float32 (3, H, W) (``size``: S for S x S, or (H, W)) normalised
as ``(x - mean) / std`` (mean/std in 0..255 pixel units) and boxes xyxy normalised to [0, 1] of the output image,
per axis; labels filtered with the boxes; other keys (image_id, orig_size) kept.

Training steps (:class:`TrainTransform`), in the order they are applied: [zoom-out] -> crop -> resize ->
[photometric distortion] -> colour jitter -> normalise -> flip. Speed: the crop window is chosen from the boxes
alone, then the image is cropped and resized in one call (the crop is a view, so no full-size copy is made); the
colour steps then work on the small H x W image (they commute with the flip, which is last).

Crop acceptance rules (``rule=``):

* ``"tutorial"``: the seed tutorial's test. Thresholds from {whole image, 0.1, 0.3, 0.5, 0.7, 0.9}, one round of
  50 trials. With ``ious`` = IoU(box, window) of the boxes that touch the window (IoU > 0), a window is
  *rejected* when ``min(ious) < t`` **and** ``max(ious) > t + 0.2``. It therefore accepts windows that keep a box
  with IoU far below ``t`` as long as no box exceeds ``t + 0.2``, and rejects good windows because of a
  barely-touched box whose centre is outside (and which is dropped anyway). This is a known defect (SPEC §2),
  kept only for the ``ssd300-vgg16-seed`` preset; it also needs a kept box (centre strictly inside).
* ``"paper"``: the reference rule of Caffe's SSD, ssd.pytorch and torchvision's
  ``torchvision.transforms.v2.RandomIoUCrop`` (whose sampling it reproduces): thresholds from {0 (any patch),
  0.1, 0.3, 0.5, 0.7, 0.9, whole image}; a window is accepted when **at least one** box whose centre lies strictly
  inside has ``IoU(box, window) >= t``; 40 trials per threshold (torchvision's default); when they all fail a new
  threshold is drawn. torchvision redraws forever; here at most :data:`PAPER_MAX_ROUNDS` rounds, then the whole
  image is kept (see :func:`sample_crop_window`).

Kept boxes, both rules: centre strictly inside the window (tutorial: and IoU > 0), clipped to it.

The paper's augmentation (``ssd300-vgg16`` / ``ssd512-vgg16``; Liu et al. 2016, §2.2 "Data augmentation" and §3.6,
with torchvision's parameters) adds to that:

* photometric distortion (:func:`sample_photometric`, :func:`photometric_distort`): torchvision's
  ``RandomPhotometricDistort`` with its defaults: brightness ×U[0.875, 1.125], contrast ×U[0.5, 1.5] (first or
  last), saturation ×U[0.5, 1.5], hue shift U[-0.05, 0.05] turns, each with p = 0.5, then a random channel
  permutation with p = 0.5; the same functional ops and clamps as torchvision's. One difference of place:
  torchvision's pipeline distorts the full image before zoom-out and crop; here the distortion runs on the H x W
  output, so the contrast pivot (the mean grey level) is that of the visible crop, not of the whole image;
* zoom-out ("expand", p = 0.5): the image is placed at a random position on a canvas ``r`` times its size,
  ``r ~ U[1, zoom_out]``, filled with the mean; the IoU crop is then drawn on that canvas. The canvas is never
  built: the final window is known in canvas coordinates, so only the H x W output is allocated, filled with the
  mean, and the visible part of the source is resized once and pasted into it.

Resizing (``resize=``, :data:`multibox.config.RESIZE_MODES`): ``"antialias"`` resizes the uint8 image with
antialiasing; ``"torchvision"`` reproduces torchvision's detection preprocessing (GeneralizedRCNNTransform): [0, 1]
pixels normalised first, then a bilinear resize of the float image without antialiasing (``align_corners=False``).
Resizing and normalising commute up to float rounding; the order is torchvision's so converted torchvision weights
see bit-identical inputs. ``"letterbox"`` keeps the aspect ratio (:mod:`multibox.core.resize`): evaluation
letterboxes the whole image (:func:`~multibox.core.resize.letterbox_uint8`, padded with the data's uint8 mean
colour); training letterboxes the crop window (after the zoom-out) into (H, W): antialiased resize to its
:func:`~multibox.core.resize.placement`, the rest the normalised fill colour, as the zoom-out canvas.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F

# Defaults: the tutorial's normalisation, ImageNet's statistics in 0..255 pixel units.
from multibox.config import IMAGENET_MEAN_255, IMAGENET_STD_255, RESIZE_MODES
from multibox.core.boxes import box_iou_xyxy
from multibox.core.resize import as_hw, boxes_to_input_xyxy, letterbox_fill, letterbox_uint8, placement

if TYPE_CHECKING:
    from multibox.config import Config

__all__ = [
    "CropSample",
    "crop_acceptable",
    "sample_crop_window",
    "TrainTransform",
    "EvalTransform",
    "RESIZE_MODES",
    "sample_zoom_out",
    "sample_photometric",
    "photometric_distort",
    "grey_level",
    "PAPER_MIN_IOUS",
    "TUTORIAL_MIN_IOUS",
    "PHOTOMETRIC_RANGES",
    "zoom_out_paste_geometry",
    "build_train_transform",
    "build_eval_transform",
    "keyed_generator",
]

# The tutorial's thresholds (None = keep the whole image) and trials.
TUTORIAL_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9)
TUTORIAL_MAX_TRIALS = 50
# The reference rule's (torchvision RandomIoUCrop's [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0], 1.0 = keep as is).
PAPER_MIN_IOUS: tuple[float | None, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, None)
PAPER_MAX_TRIALS = 40
# torchvision redraws thresholds until one succeeds. "Keep the whole image" has probability 1/7 per round, so it
# needs more than R rounds with probability <= (6/7)^R: 2e-7 for R = 100, where our bound then keeps the whole image
# (which is also what torchvision ends with when no threshold is feasible). A round costs one (40, n) IoU.
PAPER_MAX_ROUNDS = 100


class CropSample(NamedTuple):
    """Result of :func:`sample_crop_window`.

    window: (x1, y1, x2, y2) ints in image pixels, or None (use the whole image).
    boxes: kept boxes (k, 4) xyxy, clipped to the window, in window coordinates
        (all input boxes, unchanged, when window is None).
    labels: kept labels (k,).
    min_iou: the threshold t of the accepted window; for the tutorial rule the sampled t even when no window
        passed; None when "use the whole image" was drawn (or, paper rule, the round bound was reached).
    """

    window: tuple[int, int, int, int] | None
    boxes: torch.Tensor
    labels: torch.Tensor
    min_iou: float | None


def crop_acceptable(ious: torch.Tensor, centre_inside: torch.Tensor, t: float, rule: str = "tutorial") -> torch.Tensor:
    """Whether candidate windows pass the acceptance test.

    Args:
        ious: (T, n) IoU of each box with each candidate window.
        centre_inside: (T, n) bool, box centre strictly inside the window.
        t: the sampled minimum-IoU threshold.
        rule: "tutorial" or "paper" (see module docstring).
    Returns:
        (T,) bool.
    """
    if rule == "tutorial":
        touching = ious > 0
        inf = torch.tensor(float("inf"), dtype=ious.dtype)
        min_iou = torch.where(touching, ious, inf).amin(dim=1)
        max_iou = torch.where(touching, ious, -inf).amax(dim=1)
        rejected = (min_iou < t) & (max_iou > t + 0.2)
        kept = centre_inside & touching
        return touching.any(dim=1) & ~rejected & kept.any(dim=1)
    if rule == "paper":
        # torchvision: some box centre inside, and max IoU over those boxes >= t (t = 0: any such window).
        return (centre_inside & (ious >= t)).any(dim=1)
    raise ValueError(f"unknown crop rule {rule!r} (expected 'tutorial' or 'paper')")


def _centres_inside(windows: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(T, 4) xyxy windows, (n, 2) box centres -> (T, n) bool, centre strictly inside."""
    return (
        (windows[:, None, 0] < centres[None, :, 0])
        & (windows[:, None, 1] < centres[None, :, 1])
        & (windows[:, None, 2] > centres[None, :, 0])
        & (windows[:, None, 3] > centres[None, :, 1])
    )


def _clip_to_window(boxes_xyxy: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """(k, 4) xyxy boxes clipped to a (4,) xyxy window, in window coordinates."""
    return torch.minimum(torch.maximum(boxes_xyxy, window[:2].repeat(2)), window[2:].repeat(2)) - window[:2].repeat(2)


def sample_crop_window(
    boxes_xyxy: torch.Tensor,
    labels: torch.Tensor,
    width: int,
    height: int,
    generator: torch.Generator | None = None,
    rule: str = "tutorial",
    min_ious: Sequence[float | None] | None = None,
    max_trials: int | None = None,
    max_rounds: int = PAPER_MAX_ROUNDS,
) -> CropSample:
    """Random IoU-constrained crop (SSD "random sample crop"), geometry only; all numbers from ``generator``.

    A threshold t is drawn uniformly from ``min_ious`` (None = keep the whole image; default: the rule's,
    :data:`TUTORIAL_MIN_IOUS` or :data:`PAPER_MIN_IOUS`). Then ``max_trials`` windows (default 50 tutorial, 40
    paper) with sides in [0.3, 1] of the image and aspect ratio in [0.5, 2] are drawn at once and tested
    vectorised; the first acceptable one wins, which has the same distribution as trying them one after another.
    ``"tutorial"``: one round; if no window passes, the whole image is kept. ``"paper"``: if no window passes, a new
    threshold is drawn, as torchvision's ``RandomIoUCrop`` does, for at most ``max_rounds`` rounds, then the whole
    image is kept. The rules differ in their acceptance test (:func:`crop_acceptable`) and window geometry (each
    its reference's, see :func:`_tutorial_crop` and :func:`_paper_crop`).

    Args:
        boxes_xyxy: (n, 4) float boxes in pixels.
        labels: (n,) labels.
        width, height: image size in pixels.
    """
    boxes_xyxy = boxes_xyxy.reshape(-1, 4).float()
    if rule == "tutorial":
        return _tutorial_crop(boxes_xyxy, labels, width, height, generator,
                              TUTORIAL_MIN_IOUS if min_ious is None else tuple(min_ious),
                              TUTORIAL_MAX_TRIALS if max_trials is None else max_trials)
    if rule == "paper":
        return _paper_crop(boxes_xyxy, labels, width, height, generator,
                           PAPER_MIN_IOUS if min_ious is None else tuple(min_ious),
                           PAPER_MAX_TRIALS if max_trials is None else max_trials, max_rounds)
    raise ValueError(f"unknown crop rule {rule!r} (expected 'tutorial' or 'paper')")


def _tutorial_crop(boxes_xyxy: torch.Tensor, labels: torch.Tensor, width: int, height: int,
                   generator: torch.Generator | None, min_ious: Sequence[float | None], max_trials: int) -> CropSample:
    """The tutorial's crop: one threshold, one round. Window sides ``U[0.3, 1]`` of the image and a
    ``U[0, free]`` offset as floats, h/w in [0.5, 2], then corners truncated to ints, as the tutorial does."""
    t_index = int(torch.randint(len(min_ious), (1,), generator=generator))
    t = min_ious[t_index]
    # Always draw the trial numbers, so the random stream advances the same way whatever t is.
    u = torch.rand(max_trials, 4, generator=generator, dtype=torch.float64)
    if t is None or boxes_xyxy.shape[0] == 0:
        return CropSample(None, boxes_xyxy, labels, t)
    w = (0.3 + 0.7 * u[:, 0]) * width
    h = (0.3 + 0.7 * u[:, 1]) * height
    left = u[:, 2] * (width - w)
    top = u[:, 3] * (height - h)
    windows = torch.stack([left, top, left + w, top + h], dim=1).floor()  # int() of positives
    aspect = h / w
    valid = (aspect >= 0.5) & (aspect <= 2.0)
    valid &= (windows[:, 2] > windows[:, 0]) & (windows[:, 3] > windows[:, 1])

    windows_f = windows.float()
    ious = box_iou_xyxy(windows_f, boxes_xyxy)   # (T, n)
    centre_inside = _centres_inside(windows_f, (boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2)
    ok = valid & crop_acceptable(ious, centre_inside, float(t), "tutorial")
    if not bool(ok.any()):
        return CropSample(None, boxes_xyxy, labels, t)
    i = int(ok.to(torch.uint8).argmax())
    keep = centre_inside[i] & (ious[i] > 0)
    kept = _clip_to_window(boxes_xyxy[keep], windows_f[i])
    window = tuple(int(v) for v in windows[i].tolist())
    return CropSample(window, kept, labels[keep], t)


def _paper_windows(width: int, height: int, trials: int, generator: torch.Generator | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``trials`` candidate windows drawn as torchvision's ``RandomIoUCrop`` draws them: integer sides
    ``int(side · U[0.3, 1])`` (independently), integer aspect ``new_w / new_h`` in [0.5, 2], integer offsets
    ``int(U[0, 1] · free)``. Returns (T, 4) float64 xyxy windows and (T,) bool valid."""
    u = torch.rand(trials, 4, generator=generator, dtype=torch.float64)
    new_w = (width * (0.3 + 0.7 * u[:, 0])).floor()
    new_h = (height * (0.3 + 0.7 * u[:, 1])).floor()
    aspect = new_w / new_h.clamp(min=1.0)
    valid = (aspect >= 0.5) & (aspect <= 2.0) & (new_w > 0) & (new_h > 0)
    left = ((width - new_w) * u[:, 2]).floor()
    top = ((height - new_h) * u[:, 3]).floor()
    return torch.stack([left, top, left + new_w, top + new_h], dim=1), valid


def _paper_crop(boxes_xyxy: torch.Tensor, labels: torch.Tensor, width: int, height: int,
                generator: torch.Generator | None, min_ious: Sequence[float | None], max_trials: int,
                max_rounds: int) -> CropSample:
    """The reference crop (torchvision ``RandomIoUCrop.make_params``): rounds of (threshold, ``max_trials``
    windows), vectorised within a round; at least one kept box with IoU >= t accepts a window."""
    if boxes_xyxy.shape[0] == 0:   # no box centre can ever be inside: torchvision ends on "keep as is"
        return CropSample(None, boxes_xyxy, labels, None)
    centres = (boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2
    for _ in range(max_rounds):
        t = min_ious[int(torch.randint(len(min_ious), (1,), generator=generator))]
        if t is None:
            break
        windows, valid = _paper_windows(width, height, max_trials, generator)
        windows_f = windows.float()
        ious = box_iou_xyxy(windows_f, boxes_xyxy)   # (T, n)
        centre_inside = _centres_inside(windows_f, centres)
        ok = valid & crop_acceptable(ious, centre_inside, float(t), "paper")
        if bool(ok.any()):
            i = int(ok.to(torch.uint8).argmax())
            keep = centre_inside[i]
            kept = _clip_to_window(boxes_xyxy[keep], windows_f[i])
            return CropSample(tuple(int(v) for v in windows[i].tolist()), kept, labels[keep], t)
    return CropSample(None, boxes_xyxy, labels, None)


# ---------------------------------------------------------------------------------------------- paper augmentation

def sample_zoom_out(
    width: int, height: int, max_ratio: float, p: float = 0.5, generator: torch.Generator | None = None
) -> tuple[int, int, int, int] | None:
    """Draw the paper's zoom-out ("expand"): with probability ``p`` a canvas ``r`` times the image, ``r ~ U[1,
    max_ratio]``, and the image's top-left corner on it, as ssd.pytorch's ``Expand``.

    Returns:
        ``(canvas_width, canvas_height, left, top)`` ints (canvas = ``int(side·r)``, offsets ``int(U[0, side·r -
        side])``, so the image always fits), or None (no zoom-out, also when ``max_ratio <= 1``).
        Four numbers are drawn from ``generator`` whenever ``max_ratio > 1``.
    """
    if max_ratio <= 1:
        return None
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    if u[0] >= p:
        return None
    ratio = 1.0 + (max_ratio - 1.0) * u[1]
    left = int(u[2] * (width * ratio - width))
    top = int(u[3] * (height * ratio - height))
    return int(width * ratio), int(height * ratio), left, top


# torchvision.transforms.v2.RandomPhotometricDistort's defaults: factor ranges (hue: a shift in turns).
PHOTOMETRIC_RANGES = {"brightness": (0.875, 1.125), "contrast": (0.5, 1.5), "saturation": (0.5, 1.5),
                      "hue": (-0.05, 0.05)}
PHOTOMETRIC_NEUTRAL = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}


def sample_photometric(generator: torch.Generator | None = None, p: float = 0.5) -> dict:
    """Parameters of torchvision's ``RandomPhotometricDistort`` (defaults; its ``make_params``): each of brightness,
    contrast, saturation (factors) and hue (shift in turns) is drawn uniformly from :data:`PHOTOMETRIC_RANGES`
    with probability ``p``, else neutral (:data:`PHOTOMETRIC_NEUTRAL`: the step is skipped); ``contrast_first``
    with probability 0.5; ``permutation``: a uniformly random permutation of the 3 channels (identity included,
    as ``torch.randperm``) with probability ``p``, else None.

    Always draws 10 uniforms and one ``randperm(3)`` from ``generator``, whatever is applied.
    """
    u = torch.rand(10, generator=generator, dtype=torch.float64).tolist()
    permutation = tuple(torch.randperm(3, generator=generator).tolist())
    params: dict = {}
    for k, key in enumerate(("brightness", "contrast", "saturation", "hue")):
        lo, hi = PHOTOMETRIC_RANGES[key]
        params[key] = lo + (hi - lo) * u[2 * k + 1] if u[2 * k] < p else PHOTOMETRIC_NEUTRAL[key]
    params["contrast_first"] = u[8] < 0.5
    params["permutation"] = permutation if u[9] < p else None
    return params


def grey_level(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB -> (..., 1, H, W) grey level, torchvision's ``rgb_to_grayscale`` weights and op order."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend_255(x: torch.Tensor, other: torch.Tensor, ratio: float) -> torch.Tensor:
    """torchvision's ``_blend`` (``ratio·x + (1 - ratio)·other``, clamped to the range) in 0..255 units."""
    return x.mul(ratio).add_(other, alpha=1.0 - ratio).clamp_(0.0, 255.0)


def photometric_distort(x: torch.Tensor, params: dict) -> torch.Tensor:
    """Apply :func:`sample_photometric`'s parameters to a (3, H, W) float image in 0..255 units (in place where
    possible), as ``RandomPhotometricDistort.transform`` does: brightness, [contrast], saturation, hue, [contrast],
    channel permutation, each step torchvision's functional op (``adjust_brightness / contrast / saturation / hue``,
    ``permute_channels``) on [0, 1] floats, here scaled by 255, with its clamp to the range after every step.

    Contrast blends with the mean grey level of ``x`` itself (the visible crop in :class:`TrainTransform`, see the
    module docstring); saturation with each pixel's grey level. Returns (3, H, W)."""
    if params["brightness"] != 1.0:
        x = x.mul_(params["brightness"]).clamp_(0.0, 255.0)
    if params["contrast_first"] and params["contrast"] != 1.0:
        x = _blend_255(x, grey_level(x).mean(dim=(-3, -2, -1), keepdim=True), params["contrast"])
    if params["saturation"] != 1.0:
        x = _blend_255(x, grey_level(x), params["saturation"])
    if params["hue"] != 0.0:
        x = F.adjust_hue(x.div_(255.0), params["hue"]).mul_(255.0)
    if not params["contrast_first"] and params["contrast"] != 1.0:
        x = _blend_255(x, grey_level(x).mean(dim=(-3, -2, -1), keepdim=True), params["contrast"])
    if params["permutation"] is not None:
        x = x[list(params["permutation"])]
    return x


def zoom_out_paste_geometry(
    window: tuple[int, int, int, int], image_rect: tuple[int, int, int, int], size: int | Sequence[int],
    letterbox: bool = False,
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]] | None:
    """Where the source image lands in the (H, W) output when ``window`` (canvas coordinates) is resized to the
    window's :func:`~multibox.core.resize.placement` in it: the whole output (stretch), or the centred rectangle of
    one scale (``letterbox``).

    Args:
        window: crop window (x1, y1, x2, y2) on the canvas.
        image_rect: the source image's rectangle (left, top, left + w, top + h) on the canvas.
        size: output size, S (S x S) or (H, W).
        letterbox: place the window as a letterbox (aspect kept) rather than stretched.
    Returns:
        ``(source_xyxy, output_xyxy)``: the visible part of the source in source pixels, and the output rectangle
        it is resized to (corners rounded to whole output pixels, so at most half a pixel off per edge); None when
        nothing of the source is visible.
    """
    wx1, wy1, wx2, wy2 = window
    ix1, iy1, ix2, iy2 = image_rect
    vx1, vy1, vx2, vy2 = max(wx1, ix1), max(wy1, iy1), min(wx2, ix2), min(wy2, iy2)
    if vx2 <= vx1 or vy2 <= vy1:
        return None
    p = placement((wy2 - wy1, wx2 - wx1), as_hw(size), letterbox)
    sx, sy = p.width / (wx2 - wx1), p.height / (wy2 - wy1)
    ox1, ox2 = p.left + round((vx1 - wx1) * sx), p.left + round((vx2 - wx1) * sx)
    oy1, oy2 = p.top + round((vy1 - wy1) * sy), p.top + round((vy2 - wy1) * sy)
    if ox2 <= ox1 or oy2 <= oy1:
        return None
    return (vx1 - ix1, vy1 - iy1, vx2 - ix1, vy2 - iy1), (ox1, oy1, ox2, oy2)


def _resize_to(image: torch.Tensor, top: int, left: int, height: int, width: int, out_hw: list[int],
               mode: str) -> torch.Tensor:
    """Crop (a view) and resize a uint8 image once; "torchvision" mode: bilinear without antialiasing
    ("letterbox" resizes as "antialias", to the placement's size)."""
    if top == 0 and left == 0 and (height, width) == tuple(image.shape[-2:]) and list(out_hw) == [height, width]:
        return image
    return F.resized_crop(image, top, left, height, width, out_hw, antialias=(mode != "torchvision"))


def _normalise(image_f: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return image_f.sub_(mean).div_(std)


def keyed_generator(*key: int) -> torch.Generator:
    """A fresh generator seeded by a stable hash of integers (e.g. ``(seed, epoch, sample index)``).

    Training draws each sample's augmentation from ``keyed_generator(seed, epoch, index)``: the augmentation is
    then a pure function of those numbers, whatever the process, the DataLoader worker, the world size or the
    history (a run resumed in the middle of an epoch sees exactly the crops of an uninterrupted one).
    """
    packed = struct.pack(f"<{len(key)}Q", *(int(k) % 2**64 for k in key))
    digest = hashlib.blake2b(packed, digest_size=8, person=b"multibox-aug").digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)


class _SeededMixin:
    """Per-process torch.Generator, (re)seeded lazily so DataLoader workers differ.

    Without a seed, each process uses ``torch.initial_seed()`` (which DataLoader sets to
    ``base_seed + worker_id`` in workers, and which ``torch.manual_seed`` controls in the
    main process). With a seed, the main process uses it as is and workers mix it with
    their ``torch.initial_seed()`` so they differ from each other and from epoch to epoch.
    """

    seed: int | None
    _gen: torch.Generator | None
    _gen_key: tuple | None

    def _generator(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        key = (os.getpid(), None if info is None else info.id)
        if self._gen is None or self._gen_key != key:
            if info is None:
                s = torch.initial_seed() if self.seed is None else int(self.seed)
            else:
                s = info.seed if self.seed is None else hash((int(self.seed), info.seed))
            self._gen = torch.Generator().manual_seed(s % (2**63))
            self._gen_key = key
        return self._gen

    def __getstate__(self):  # a pickled copy (e.g. spawned worker) must reseed itself
        state = self.__dict__.copy()
        state["_gen"] = None
        state["_gen_key"] = None
        return state


def window_target(target: dict, params: dict, window: tuple[int, int, int, int],
                  letterbox_hw: Sequence[int] | None = None) -> dict:
    """The target after the sampled geometry: kept boxes (in window pixels) scaled to [0, 1] of the window
    (stretch), or, with ``letterbox_hw`` (H, W), mapped to where the window is letterboxed in that output
    (:func:`~multibox.core.resize.boxes_to_input_xyxy` of the window), flipped if sampled, clipped; degenerate
    boxes dropped with their labels. Shared by the CPU and the batched pipelines so both produce bit-identical
    boxes."""
    x1, y1, x2, y2 = window
    if letterbox_hw is not None:
        boxes = boxes_to_input_xyxy(params["boxes"].reshape(-1, 4), (y2 - y1, x2 - x1), letterbox_hw, True)
    else:
        boxes = params["boxes"].clone()
        boxes[:, 0::2] /= float(x2 - x1)
        boxes[:, 1::2] /= float(y2 - y1)
    if params["flip"]:
        boxes = torch.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], dim=1)
    boxes = boxes.clamp_(0.0, 1.0)
    labels = params["labels"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not bool(keep.all()):
        boxes, labels = boxes[keep], labels[keep]
    new_target = dict(target)
    new_target["boxes"] = boxes.to(torch.float32).reshape(-1, 4)
    new_target["labels"] = labels
    return new_target


class TrainTransform(_SeededMixin):
    """Training augmentation: [zoom-out] -> crop -> resize -> [photometric distortion] -> colour jitter -> normalise
    -> flip (see the module docstring).

    Args:
        size: output size: S (S x S) or (H, W).
        mean, std: per-channel normalisation in 0..255 pixel units.
        crop_rule: "tutorial" or "paper" acceptance rule of the random crop; None disables the crop.
        flip_p: probability of a horizontal flip.
        jitter: (brightness, contrast, saturation) strengths; factors ~ U[1-s, 1+s], applied
            in this fixed order (0 disables one).
        min_ious: crop thresholds to choose from (an entry None = whole image); None: the crop rule's own
            (:data:`TUTORIAL_MIN_IOUS` or :data:`PAPER_MIN_IOUS`).
        seed: see :class:`_SeededMixin`.
        photometric: the paper's photometric distortion, torchvision's ``RandomPhotometricDistort``
            (:func:`sample_photometric`, :func:`photometric_distort`).
        zoom_out: largest zoom-out ratio (the paper: 4); <= 1 disables it (:func:`sample_zoom_out`).
        zoom_out_p: probability of a zoom-out.
        fill: the zoom-out canvas (and letterbox padding) colour in 0..255 units (default: ``mean``, which
            normalises to 0).
        resize: one of :data:`multibox.config.RESIZE_MODES` (see the module docstring).

    Random numbers are drawn in this order: zoom-out (only if enabled), crop, flip and jitter, photometric (only if
    enabled); with both disabled the stream, and so every output, is the same as without these options. (The paper
    crop draws a variable amount: one threshold per round, and 40 windows per round that draws one.)
    ``last_params`` holds the parameters of the most recent call (for tests / debugging);
    :meth:`apply` replays given parameters.

    Called with ``key=(seed, epoch, index)`` (as training does, see :class:`multibox.data.build.SampleIndex`), the
    numbers come from :func:`keyed_generator` of ``key`` (and of ``seed`` when one was given) instead of the
    transform's running stream: a pure function of the key.
    """

    keyed = True   # accepts ``key=``: TransformedSubset passes (seed, epoch, index) when the sampler provides them

    def __init__(
        self,
        size: int | Sequence[int] = 300,
        mean: Sequence[float] = IMAGENET_MEAN_255,
        std: Sequence[float] = IMAGENET_STD_255,
        crop_rule: str | None = "tutorial",
        flip_p: float = 0.5,
        jitter: Sequence[float] = (0.4, 0.4, 0.4),
        min_ious: Sequence[float | None] | None = None,
        seed: int | None = None,
        photometric: bool = False,
        zoom_out: float = 0.0,
        zoom_out_p: float = 0.5,
        fill: Sequence[float] | None = None,
        resize: str = "antialias",
    ) -> None:
        if crop_rule not in ("tutorial", "paper", None):
            raise ValueError(f"unknown crop_rule {crop_rule!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; choose one of {RESIZE_MODES}")
        self.input_hw = as_hw(size)
        self.size = size if isinstance(size, int) else self.input_hw   # as given: S, or (H, W)
        self.letterbox = resize == "letterbox"
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.crop_rule = crop_rule
        self.flip_p = float(flip_p)
        self.jitter = tuple(float(j) for j in jitter)
        self.min_ious = None if min_ious is None else tuple(min_ious)
        self.seed = seed
        self.photometric = bool(photometric)
        self.zoom_out = float(zoom_out or 0.0)
        self.zoom_out_p = float(zoom_out_p)
        fill_255 = torch.tensor(mean if fill is None else fill, dtype=torch.float32).view(3, 1, 1)
        self.fill_normalised = (fill_255 - self.mean) / self.std
        self.resize = resize
        self._gen = None
        self._gen_key = None
        self.last_params: dict | None = None

    def sample_params(self, image_size: tuple[int, int], target: dict,
                      generator: torch.Generator | None = None) -> dict:
        """Draw the random parameters for one image of size (H, W) (from ``generator`` if given, else from the
        transform's own stream).

        ``window`` and ``boxes`` are in the coordinates of the zoom-out canvas when ``expand`` (``(canvas_width,
        canvas_height, left, top)``) is set, of the image otherwise.
        """
        g = generator if generator is not None else self._generator()
        height, width = image_size
        boxes, labels = target["boxes"].reshape(-1, 4).float(), target["labels"]
        expand = sample_zoom_out(width, height, self.zoom_out, self.zoom_out_p, g)
        if expand is not None:
            width, height, left, top = expand
            boxes = boxes + torch.tensor([left, top, left, top], dtype=boxes.dtype)
        if self.crop_rule is not None and boxes.shape[0] > 0:
            crop = sample_crop_window(boxes, labels, width, height, g, self.crop_rule, self.min_ious)
        else:
            crop = CropSample(None, boxes, labels, None)
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        b, c, s = self.jitter
        return {
            "expand": expand,
            "window": crop.window,
            "min_iou": crop.min_iou,
            "boxes": crop.boxes,
            "labels": crop.labels,
            "flip": u[0] < self.flip_p,
            "brightness": 1.0 + b * (2.0 * u[1] - 1.0),
            "contrast": 1.0 + c * (2.0 * u[2] - 1.0),
            "saturation": 1.0 + s * (2.0 * u[3] - 1.0),
            "photometric": sample_photometric(g) if self.photometric else None,
        }

    def _colour(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """uint8-valued float (3, h, w) in 0..255 -> photometric distortion, jitter, normalisation."""
        if params.get("photometric") is not None:
            x = photometric_distort(x, params["photometric"])
        # Jitter in float [0, 1] (no re-quantisation between the three ops), then normalise.
        x = x.div_(255.0)
        if params["brightness"] != 1.0:
            x = F.adjust_brightness(x, params["brightness"])
        if params["contrast"] != 1.0:
            x = F.adjust_contrast(x, params["contrast"])
        if params["saturation"] != 1.0:
            x = F.adjust_saturation(x, params["saturation"])
        return _normalise(x.mul_(255.0), self.mean, self.std)

    def apply(self, image: torch.Tensor, target: dict, params: dict) -> tuple[torch.Tensor, dict]:
        """Apply ``params`` (from :meth:`sample_params`) to ``image`` uint8 (3, h, w) -> float32 (3, H, W) and the
        target with boxes normalised to it."""
        height, width = int(image.shape[-2]), int(image.shape[-1])
        canvas_w, canvas_h, left, top = params.get("expand") or (width, height, 0, 0)
        window = params["window"] or (0, 0, canvas_w, canvas_h)
        if params.get("expand") is None and not self.letterbox:
            x1, y1, x2, y2 = window
            # One crop + resize: the crop is a strided view, so only the output is allocated.
            out = _resize_to(image, y1, x1, y2 - y1, x2 - x1, list(self.input_hw), self.resize)
            x = self._colour(out.float(), params)
        else:
            # The canvas is never built: the output starts as the (normalised) fill and receives the visible part
            # of the source, resized once to where it lands (a letterbox pads with the same fill).
            x = self.fill_normalised.expand(3, *self.input_hw).clone()
            placed = zoom_out_paste_geometry(window, (left, top, left + width, top + height), self.input_hw,
                                             self.letterbox)
            if placed is not None:
                (sx1, sy1, sx2, sy2), (ox1, oy1, ox2, oy2) = placed
                patch = _resize_to(image, sy1, sx1, sy2 - sy1, sx2 - sx1, [oy2 - oy1, ox2 - ox1], self.resize)
                x[:, oy1:oy2, ox1:ox2] = self._colour(patch.float(), params)
        if params["flip"]:
            x = x.flip(-1)
        return x, window_target(target, params, window, self.input_hw if self.letterbox else None)

    def __call__(self, image: torch.Tensor, target: dict,
                 key: Sequence[int] | None = None) -> tuple[torch.Tensor, dict]:
        generator = None
        if key is not None:
            generator = keyed_generator(*(() if self.seed is None else (int(self.seed),)), *key)
        params = self.sample_params((int(image.shape[-2]), int(image.shape[-1])), target, generator)
        self.last_params = params
        return self.apply(image, target, params)


class EvalTransform:
    """Evaluation transform: resize to (H, W) and normalise; boxes normalised per axis to [0, 1] of the input.

    Args:
        size: output size: S (S x S) or (H, W).
        mean, std: per-channel normalisation in 0..255 pixel units.
        resize: "antialias" (uint8 resize with antialiasing, then normalise), "torchvision" (torchvision's SSD
            preprocessing, exactly: ``(x/255 - mean/255) / (std/255)``, then bilinear interpolation of the float
            image, ``align_corners=False``, no antialiasing) or "letterbox" (:func:`multibox.core.resize
            .letterbox_uint8` padded with :func:`~multibox.core.resize.letterbox_fill` of ``mean``, then normalised
            as "antialias"; boxes through :func:`~multibox.core.resize.boxes_to_input_xyxy`, padding included).
    """

    def __init__(
        self, size: int | Sequence[int] = 300, mean: Sequence[float] = IMAGENET_MEAN_255,
        std: Sequence[float] = IMAGENET_STD_255, resize: str = "antialias",
    ) -> None:
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; choose one of {RESIZE_MODES}")
        self.input_hw = as_hw(size)
        self.size = size if isinstance(size, int) else self.input_hw   # as given: S, or (H, W)
        self.resize = resize
        self.letterbox = resize == "letterbox"
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # torchvision's constants in [0, 1] units, rounded to float32 from float64 as torchvision's are.
        self.mean_01 = torch.tensor([m / 255.0 for m in mean], dtype=torch.float32).view(3, 1, 1)
        self.std_01 = torch.tensor([v / 255.0 for v in std], dtype=torch.float32).view(3, 1, 1)
        self.fill_uint8 = letterbox_fill(mean) if self.letterbox else None

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, h, w) -> float32 (N, 3, H, W), on the images' device."""
        height, width = int(images.shape[-2]), int(images.shape[-1])
        resize = (height, width) != self.input_hw
        if self.resize == "torchvision":
            mean, std = self.mean_01.to(images.device), self.std_01.to(images.device)
            x = (images.float() / 255.0 - mean) / std
            return nnf.interpolate(x, size=self.input_hw, mode="bilinear", align_corners=False) \
                if resize else x
        if self.letterbox:
            images = letterbox_uint8(images, self.input_hw, self.fill_uint8)
        elif resize:
            images = F.resize(images, list(self.input_hw), antialias=True)
        return _normalise(images.float(), self.mean.to(images.device), self.std.to(images.device))

    def batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 (3, h_i, w_i) images, all on one device -> float32 (N, 3, H, W) there.

        Images of the same size are resized in one call, so on a GPU a batch of video frames or same-sized photos
        costs one kernel launch per step instead of a CPU resize per image."""
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(i)
        out = torch.empty(len(images), 3, *self.input_hw, device=images[0].device)
        for indices in by_size.values():
            out[indices] = self._images(torch.stack([images[i] for i in indices]))
        return out

    def __call__(self, image: torch.Tensor, target: dict | None = None):
        height, width = int(image.shape[-2]), int(image.shape[-1])
        x = self._images(image[None])[0]
        if target is None:
            return x, None
        new_target = dict(target)
        boxes = target["boxes"].reshape(-1, 4).to(torch.float32)
        if self.letterbox:
            boxes = boxes_to_input_xyxy(boxes, (height, width), self.input_hw, True)
        else:
            boxes = boxes / torch.tensor([width, height, width, height], dtype=torch.float32)
        new_target["boxes"] = boxes.clamp_(0.0, 1.0)
        return x, new_target


def build_train_transform(cfg: "Config", seed: int | None = None) -> TrainTransform:
    """The training transform that ``cfg.data`` describes (crop rule "none" disables the crop)."""
    d = cfg.data
    return TrainTransform(
        size=cfg.model.image_size, mean=d.mean, std=d.std, crop_rule=None if d.crop_rule == "none" else d.crop_rule,
        flip_p=d.flip_p, jitter=tuple(d.jitter), seed=seed, photometric=d.photometric, zoom_out=d.zoom_out,
        zoom_out_p=d.zoom_out_p, resize=d.resize)


def build_eval_transform(cfg: "Config") -> EvalTransform:
    """The evaluation / inference transform that ``cfg`` describes (``data.resize`` included)."""
    return EvalTransform(cfg.model.image_size, cfg.data.mean, cfg.data.std, resize=cfg.data.resize)
