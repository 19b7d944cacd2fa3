"""Box-aware training / evaluation transforms (SPEC section 2, "Augmentation").

Input: ``(image, target)`` with image uint8 (3, H, W) and target["boxes"] float32 (n, 4)
xyxy pixels, target["labels"] int64 (n,). Output: float32 (3, S, S) normalised as
``(x - mean) / std`` (mean/std in 0..255 pixel units) and boxes xyxy normalised to [0, 1]
of the output image; labels filtered with the boxes; other keys (image_id, orig_size) kept.

Speed: the crop window is chosen from the boxes alone, then the image is cropped and
resized in one call (the crop is a view, so no full-size copy is made); flip and colour
jitter then work on the small S x S image.

Crop acceptance rules (``rule=``):

* ``"tutorial"``: the seed tutorial's test. With ``ious`` = IoU(box, window) of the boxes
  that touch the window (IoU > 0), a window is *rejected* when ``min(ious) < t`` **and**
  ``max(ious) > t + 0.2``. It therefore accepts windows that keep a box with IoU far below
  ``t`` as long as no box exceeds ``t + 0.2``, and rejects good windows because of a
  barely-touched box whose centre is outside (and which is dropped anyway). This is a known
  defect, kept only for the ``ssd300-vgg16-seed`` preset.
* ``"paper"``: the SSD paper's intent: accept only if every kept box (centre inside the
  window) has ``IoU(box, window) >= t``.

Both also need at least one kept box (centre strictly inside, as the tutorial tests).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import torch
from torchvision.transforms.v2 import functional as F

__all__ = [
    "TUTORIAL_MEAN",
    "TUTORIAL_STD",
    "CropSample",
    "crop_acceptable",
    "sample_crop_window",
    "random_sample_crop",
    "TrainTransform",
    "EvalTransform",
]

# The tutorial's normalisation, in 0..255 pixel units.
TUTORIAL_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
TUTORIAL_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
DEFAULT_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9)


class CropSample(NamedTuple):
    """Result of :func:`sample_crop_window`.

    window: (x1, y1, x2, y2) ints in image pixels, or None (use the whole image).
    boxes: kept boxes (k, 4) xyxy, clipped to the window, in window coordinates
        (all input boxes, unchanged, when window is None).
    labels: kept labels (k,).
    min_iou: the sampled threshold t (None = "use the whole image" was drawn).
    """

    window: tuple[int, int, int, int] | None
    boxes: torch.Tensor
    labels: torch.Tensor
    min_iou: float | None


def _iou_with_windows(boxes_xyxy: torch.Tensor, windows_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU of n boxes (n, 4) with T windows (T, 4) -> (T, n)."""
    lt = torch.maximum(windows_xyxy[:, None, :2], boxes_xyxy[None, :, :2])
    rb = torch.minimum(windows_xyxy[:, None, 2:], boxes_xyxy[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area_b = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
    area_w = (windows_xyxy[:, 2] - windows_xyxy[:, 0]) * (windows_xyxy[:, 3] - windows_xyxy[:, 1])
    return inter / (area_w[:, None] + area_b[None, :] - inter)


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
        ok = (ious >= t) | ~centre_inside
        return centre_inside.any(dim=1) & ok.all(dim=1)
    raise ValueError(f"unknown crop rule {rule!r} (expected 'tutorial' or 'paper')")


def sample_crop_window(
    boxes_xyxy: torch.Tensor,
    labels: torch.Tensor,
    width: int,
    height: int,
    generator: torch.Generator | None = None,
    rule: str = "tutorial",
    min_ious: Sequence[float | None] = DEFAULT_MIN_IOUS,
    max_trials: int = 50,
) -> CropSample:
    """Random IoU-constrained crop (SSD "random sample crop"), geometry only.

    A threshold t is drawn from ``min_ious`` (None = keep the whole image). Then up to
    ``max_trials`` windows with sides in [0.3, 1] of the image and h/w in [0.5, 2] are tried
    (all drawn at once and tested vectorised; the first acceptable one wins, which has the
    same distribution as trying them one after another). Window corners are truncated to
    ints, as in the tutorial. If no window passes, the whole image is kept (window None).

    Args:
        boxes_xyxy: (n, 4) float boxes in pixels.
        labels: (n,) labels.
        width, height: image size in pixels.
    """
    boxes_xyxy = boxes_xyxy.reshape(-1, 4).float()
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
    ious = _iou_with_windows(boxes_xyxy, windows_f)
    centres = (boxes_xyxy[:, :2] + boxes_xyxy[:, 2:]) / 2
    centre_inside = (
        (windows_f[:, None, 0] < centres[None, :, 0])
        & (windows_f[:, None, 1] < centres[None, :, 1])
        & (windows_f[:, None, 2] > centres[None, :, 0])
        & (windows_f[:, None, 3] > centres[None, :, 1])
    )
    ok = valid & crop_acceptable(ious, centre_inside, float(t), rule)
    if not bool(ok.any()):
        return CropSample(None, boxes_xyxy, labels, t)
    i = int(ok.to(torch.uint8).argmax())
    keep = centre_inside[i] if rule == "paper" else centre_inside[i] & (ious[i] > 0)
    win = windows_f[i]
    kept = boxes_xyxy[keep]
    kept = torch.minimum(torch.maximum(kept, win[:2].repeat(2)), win[2:].repeat(2)) - win[:2].repeat(2)
    window = tuple(int(v) for v in windows[i].tolist())
    return CropSample(window, kept, labels[keep], t)


def random_sample_crop(
    boxes_xyxy: torch.Tensor,
    labels: torch.Tensor,
    width: int,
    height: int,
    generator: torch.Generator | None = None,
    rule: str = "tutorial",
    min_ious: Sequence[float | None] = DEFAULT_MIN_IOUS,
    max_trials: int = 50,
) -> tuple[tuple[int, int, int, int] | None, torch.Tensor, torch.Tensor]:
    """:func:`sample_crop_window` without the sampled threshold: ``(window, boxes, labels)``."""
    s = sample_crop_window(boxes_xyxy, labels, width, height, generator, rule, min_ious, max_trials)
    return s.window, s.boxes, s.labels


def _normalise(image_f: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return image_f.sub_(mean).div_(std)


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


class TrainTransform(_SeededMixin):
    """Training augmentation: crop -> resize -> flip -> colour jitter -> normalise.

    Args:
        size: output side S.
        mean, std: per-channel normalisation in 0..255 pixel units.
        crop_rule: "tutorial" or "paper" acceptance rule of the random crop; None disables the crop.
        flip_p: probability of a horizontal flip.
        jitter: (brightness, contrast, saturation) strengths; factors ~ U[1-s, 1+s], applied
            in this fixed order (0 disables one).
        min_ious: crop thresholds to choose from (None = whole image).
        seed: see :class:`_SeededMixin`.

    ``last_params`` holds the parameters of the most recent call (for tests / debugging);
    :meth:`apply` replays given parameters.
    """

    def __init__(
        self,
        size: int = 300,
        mean: Sequence[float] = TUTORIAL_MEAN,
        std: Sequence[float] = TUTORIAL_STD,
        crop_rule: str | None = "tutorial",
        flip_p: float = 0.5,
        jitter: Sequence[float] = (0.4, 0.4, 0.4),
        min_ious: Sequence[float | None] = DEFAULT_MIN_IOUS,
        seed: int | None = None,
    ) -> None:
        if crop_rule not in ("tutorial", "paper", None):
            raise ValueError(f"unknown crop_rule {crop_rule!r}")
        self.size = int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.crop_rule = crop_rule
        self.flip_p = float(flip_p)
        self.jitter = tuple(float(j) for j in jitter)
        self.min_ious = tuple(min_ious)
        self.seed = seed
        self._gen = None
        self._gen_key = None
        self.last_params: dict | None = None

    def sample_params(self, image_size: tuple[int, int], target: dict) -> dict:
        """Draw the random parameters for one image of size (H, W)."""
        g = self._generator()
        height, width = image_size
        boxes, labels = target["boxes"], target["labels"]
        if self.crop_rule is not None and boxes.shape[0] > 0:
            crop = sample_crop_window(boxes, labels, width, height, g, self.crop_rule, self.min_ious)
        else:
            crop = CropSample(None, boxes.reshape(-1, 4).float(), labels, None)
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        b, c, s = self.jitter
        return {
            "window": crop.window,
            "min_iou": crop.min_iou,
            "boxes": crop.boxes,
            "labels": crop.labels,
            "flip": u[0] < self.flip_p,
            "brightness": 1.0 + b * (2.0 * u[1] - 1.0),
            "contrast": 1.0 + c * (2.0 * u[2] - 1.0),
            "saturation": 1.0 + s * (2.0 * u[3] - 1.0),
        }

    def apply(self, image: torch.Tensor, target: dict, params: dict) -> tuple[torch.Tensor, dict]:
        """Apply ``params`` (from :meth:`sample_params`) to ``image`` uint8 (3, H, W)."""
        height, width = int(image.shape[-2]), int(image.shape[-1])
        window = params["window"] or (0, 0, width, height)
        x1, y1, x2, y2 = window
        # One crop + resize: the crop is a strided view, so only the output is allocated.
        out = F.resized_crop(image, y1, x1, y2 - y1, x2 - x1, [self.size, self.size], antialias=True)
        boxes = params["boxes"].clone()
        boxes[:, 0::2] /= float(x2 - x1)
        boxes[:, 1::2] /= float(y2 - y1)
        if params["flip"]:
            out = out.flip(-1)
            boxes = torch.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], dim=1)
        boxes = boxes.clamp_(0.0, 1.0)
        labels = params["labels"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not bool(keep.all()):
            boxes, labels = boxes[keep], labels[keep]

        # Jitter in float [0, 1] (no re-quantisation between the three ops), then normalise.
        x = out.float().div_(255.0)
        if params["brightness"] != 1.0:
            x = F.adjust_brightness(x, params["brightness"])
        if params["contrast"] != 1.0:
            x = F.adjust_contrast(x, params["contrast"])
        if params["saturation"] != 1.0:
            x = F.adjust_saturation(x, params["saturation"])
        x = _normalise(x.mul_(255.0), self.mean, self.std)

        new_target = dict(target)
        new_target["boxes"] = boxes.to(torch.float32).reshape(-1, 4)
        new_target["labels"] = labels
        return x, new_target

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        params = self.sample_params((int(image.shape[-2]), int(image.shape[-1])), target)
        self.last_params = params
        return self.apply(image, target, params)


class EvalTransform:
    """Evaluation transform: resize to (size, size) and normalise; boxes normalised to [0, 1].

    Args:
        size: output side S.
        mean, std: per-channel normalisation in 0..255 pixel units.
    """

    def __init__(
        self, size: int = 300, mean: Sequence[float] = TUTORIAL_MEAN, std: Sequence[float] = TUTORIAL_STD
    ) -> None:
        self.size = int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: torch.Tensor, target: dict | None = None):
        height, width = int(image.shape[-2]), int(image.shape[-1])
        if (height, width) != (self.size, self.size):
            image = F.resize(image, [self.size, self.size], antialias=True)
        x = _normalise(image.float(), self.mean, self.std)
        if target is None:
            return x, None
        new_target = dict(target)
        boxes = target["boxes"].reshape(-1, 4).to(torch.float32)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        new_target["boxes"] = (boxes / scale).clamp_(0.0, 1.0)
        return x, new_target
