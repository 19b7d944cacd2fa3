"""Batched training augmentation: the paper's augmentation as one affine warp per image, for a whole batch at once,
on any device (the point is the GPU; the CPU works too, which keeps it testable).

The CPU :class:`~multibox.data.transforms.TrainTransform` crops, zooms out, flips and resizes one image at a time.
All four are one axis-aligned affine map from output pixels to source pixels, so here a batch is warped by a single
``affine_grid`` + ``grid_sample``, then the colour steps (the paper's photometric distortion, the tutorial's
jitter, the normalisation) run as tensor ops over the batch with per-image parameters.

The photometric distortion is torchvision's ``RandomPhotometricDistort`` (as the CPU
:func:`~multibox.data.transforms.photometric_distort`): brightness, contrast first or last, saturation, hue, channel
permutation, with torchvision's formulas and clamps; its contrast pivot is the mean grey level of the image's own
pixels in the output (not the zoom-out fill), as the CPU transform computes it on the pasted patch.

The work is split in two halves so that everything per image stays in DataLoader workers:

* in the workers, per sample, :class:`SampleParams` (the dataset's transform) draws the image's parameters with the
  CPU transform's own sampler (:meth:`TrainTransform.sample_params`: zoom-out, IoU crop, flip, jitter, photometric;
  same distributions, same keyed random stream, so the same (seed, epoch, index) gets the same augmentation in both
  pipelines); then :meth:`BatchAugment.collate` (the DataLoader's ``collate_fn``, :meth:`BatchAugment.prepare`)
  transforms the boxes exactly as the CPU transform does, turns the geometry into per-image affine coefficients,
  and pads the decoded uint8 images into one (B, 3, Hp, Wp) tensor (edges replicated, see below);
* :meth:`BatchAugment.warp` (main process, on the device): one copy of the uint8 batch (pinned, non-blocking),
  one ``grid_sample`` per pre-filter group (one in total with ``resize: torchvision``), batched colour ops.

Sampling and fill. ``grid_sample`` needs one input tensor, so images of different sizes are padded to the largest;
each image's own size is folded into its affine map. The padding replicates each image's last row / column, so
``padding_mode="border"`` gives every image clamp-to-edge interpolation at its own border (as resizing a crop does),
and output pixels whose centre falls outside the source (zoom-out canvas) are set to the fill colour by a mask
computed from the same affine map, i.e. the source is pasted with a hard edge, as the CPU path pastes it.

Resize modes. ``resize: torchvision`` (the paper preset) is bilinear without antialiasing, exactly what
``grid_sample`` does. ``resize: antialias`` pre-filters every image by an integer box filter of
``floor(source px per output px)`` per axis (at most ``max_prefilter``) before the bilinear warp: an approximation
of the antialiased resize (close on natural images, see ``tests/data/test_gpu_transforms.py``), grouped by factor so the
batch needs one ``grid_sample`` per distinct factor pair. ``resize: letterbox`` resizes as ``antialias``, but the
crop window maps to its :func:`~multibox.core.resize.placement` in the output (one scale for both axes, centred),
not to the whole output; output pixels outside the placement (or outside the source) get the fill colour, as on
the CPU path.

Output: float32 (B, 3, H, W) normalised (``size``: S or (H, W)), and targets with boxes xyxy normalised per axis to
[0, 1] (bit-identical to the CPU transform's boxes for the same parameters).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor

from multibox.core.resize import placement
from multibox.data.coco import Batch
from multibox.data.transforms import TrainTransform, build_train_transform, grey_level, keyed_generator, window_target

if TYPE_CHECKING:
    from multibox.config import Config

__all__ = ["AugmentBatch", "BatchAugment", "DeviceAugmentLoader", "PARAMS_KEY", "PIPELINES", "SampleParams",
           "build_batch_augment", "build_sample_params", "pad_replicate", "photometric_distort_batch",
           "adjust_hue_batch"]

PIPELINES = ("cpu", "batched")   # data.pipeline values

# Colour parameter columns of AugmentBatch.colour.
_BRIGHT, _C_FIRST, _C_LAST, _SAT, _HUE, _J_BRIGHT, _J_CONTRAST, _J_SAT = range(8)
_IDENTITY = (0, 1, 2)   # channel order of images without a permutation


PARAMS_KEY = "augment_params"   # target key carrying a sample's drawn parameters from the worker to the collate


class SampleParams:
    """The per-sample "transform" of the batched pipeline: draws the sample's augmentation parameters where the CPU
    transform would apply them (in the DataLoader worker, from the same random stream: keyed by (seed, epoch, index)
    when the sampler provides keys), and returns the decoded uint8 image untouched with the parameters in
    ``target[PARAMS_KEY]``. For the same key, the batched pipeline therefore draws exactly the CPU pipeline's
    augmentation."""

    keyed = True   # TransformedSubset passes key=(seed, epoch, index) (see multibox.data.build.SampleIndex)

    def __init__(self, transform: TrainTransform):
        self.transform = transform

    def __call__(self, image: Tensor, target: dict, key: Sequence[int] | None = None) -> tuple[Tensor, dict]:
        generator = None
        if key is not None:   # as TrainTransform.__call__
            seed = self.transform.seed
            generator = keyed_generator(*(() if seed is None else (int(seed),)), *key)
        params = self.transform.sample_params((int(image.shape[-2]), int(image.shape[-1])), target, generator)
        return image, {**target, PARAMS_KEY: params}


def pad_replicate(images: Sequence[Tensor], multiple: int = 1) -> tuple[Tensor, Tensor]:
    """(3, H_i, W_i) images -> (B, 3, Hp, Wp) batch (Hp, Wp: the largest sides, rounded up to ``multiple``) and
    (B, 2) int64 sizes (H_i, W_i). Each image sits at the top-left; its last column and row are replicated into the
    padding, so that bilinear sampling clamped to the tensor border also clamps to the image's own border."""
    heights = [int(im.shape[-2]) for im in images]
    widths = [int(im.shape[-1]) for im in images]
    hp = -(-max(heights) // multiple) * multiple
    wp = -(-max(widths) // multiple) * multiple
    out = torch.empty(len(images), 3, hp, wp, dtype=images[0].dtype, device=images[0].device)
    for i, (im, h, w) in enumerate(zip(images, heights, widths)):
        out[i, :, :h, :w] = im
        if w < wp:
            out[i, :, :h, w:] = im[:, :, w - 1:w]
        if h < hp:
            out[i, :, h:, :] = out[i, :, h - 1:h, :]
    return out, torch.tensor([heights, widths], dtype=torch.int64).T.contiguous()


@dataclass
class AugmentBatch:
    """A prepared batch (what the workers send): pad the images once, everything else is small per-image numbers.

    images: uint8 (B, 3, Hp, Wp), replicate-padded (:func:`pad_replicate`); sizes: int64 (B, 2) (h, w).
    affine: float64 (B, 4) ``(ax, bx, ay, by)``: an output pixel at normalised position (ox, oy) in [-1, 1]
        (``align_corners=False`` convention) samples source pixel coordinates ``(ax·ox + bx, ay·oy + by)``
        (continuous: pixel i spans [i, i + 1)); a flip is a negative ``ax``.
    bounds: float64 (B, 4) ``(x1, y1, x2, y2)`` source pixel rectangle whose samples are kept, the rest gets the
        fill: the whole image (stretch), the crop window within it (letterbox). None: ``(0, 0, w, h)``.
    prefilter: int64 (B, 2) box pre-filter (fy, fx), 1 = none.
    colour: float32 (B, 8): photometric brightness factor, contrast factor applied first, contrast applied last,
        saturation factor, hue shift (turns), jitter brightness, jitter contrast, jitter saturation (neutral values
        when unused).
    permutation: int64 (B, 3): the photometric channel permutation of each image (identity when none).
    use_*: whether any image needs that colour step (decided here, on the CPU, so the device never synchronises).
    targets: the transformed targets (boxes normalised xyxy, labels filtered), one dict per image.
    skipped: samples dropped as unreadable (as :class:`multibox.data.coco.Batch`).
    """

    images: Tensor
    sizes: Tensor
    affine: Tensor
    prefilter: Tensor
    colour: Tensor
    targets: list[dict]
    permutation: Tensor | None = None
    bounds: Tensor | None = None
    use_photometric: bool = False
    use_saturation: bool = False
    use_hue: bool = False
    use_permutation: bool = False
    use_jitter: bool = False
    skipped: int = 0

    def pin_memory(self) -> "AugmentBatch":
        return replace(self, images=self.images.pin_memory(), sizes=self.sizes.pin_memory(),
                       affine=self.affine.pin_memory(), colour=self.colour.pin_memory(),
                       permutation=None if self.permutation is None else self.permutation.pin_memory(),
                       bounds=None if self.bounds is None else self.bounds.pin_memory())

    def __len__(self) -> int:
        return len(self.targets)


def _rgb_to_hue_chroma(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 3, H, W) RGB -> hue in sixths of a turn [0, 6), value (max) and chroma (max - min), each (B, H, W).

    Ties resolve as torchvision's ``_rgb_to_hsv``: red wins, then green."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(maxc == r, torch.remainder((g - b) / safe, 6.0),
                      torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return torch.where(chroma > 0, hue, torch.zeros_like(hue)), maxc, chroma


def adjust_hue_batch(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue of (B, 3, H, W) images by ``shift`` (B,) turns, keeping S and V (any non-negative range).

    HSV -> RGB as ``c_n = V - C·clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6·hue) mod 6``, n = 5, 3, 1 for
    R, G, B (C = V·S, the chroma): the closed form of the usual six-sector table, no per-sector stacking."""
    hue, value, chroma = _rgb_to_hue_chroma(x)
    hue = torch.remainder(hue + 6.0 * shift.view(-1, 1, 1), 6.0)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(hue + n, 6.0)
        channels.append(value - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, 1)


def _masked_mean_grey(x: Tensor, inside: Tensor | None) -> Tensor:
    """(B, 3, H, W) -> (B, 1, 1, 1) mean grey level over each image's ``inside`` (B, H, W) pixels (all if None)."""
    grey = grey_level(x)
    if inside is None:
        return grey.mean(dim=(1, 2, 3), keepdim=True)
    weights = inside[:, None].to(x.dtype)
    return (grey * weights).sum((1, 2, 3), keepdim=True) / weights.sum((1, 2, 3), keepdim=True).clamp(min=1)


def _blend(x: Tensor, other: Tensor, ratio: Tensor, bound: float) -> Tensor:
    """torchvision's ``_blend`` with a per-image ratio (B, 1, 1, 1): ``ratio·x + (1 - ratio)·other``, clamped."""
    return (x * ratio + other * (1.0 - ratio)).clamp_(0.0, bound)


def photometric_distort_batch(x: Tensor, colour: Tensor, use_saturation: bool = True, use_hue: bool = True,
                              inside: Tensor | None = None, permutation: Tensor | None = None) -> Tensor:
    """The paper's photometric distortion (:func:`multibox.data.transforms.photometric_distort`, torchvision's
    ``RandomPhotometricDistort``) over a batch: x (B, 3, H, W) float in 0..255, per-image parameters in ``colour``
    (B, 8) (see :class:`AugmentBatch`), ``inside`` (B, H, W) bool: the pixels whose mean grey level is the contrast
    pivot (None: all), ``permutation`` (B, 3) int64 channel orders (None: none). Returns (B, 3, H, W).

    Neutral factors (1) are exact identities of these formulas, and a contrast "applied first" / "applied last"
    column holds 1 for images whose contrast is on the other side, so each image gets exactly its own steps."""
    view = (-1, 1, 1, 1)
    x = (x * colour[:, _BRIGHT].view(view)).clamp_(0.0, 255.0)
    x = _blend(x, _masked_mean_grey(x, inside), colour[:, _C_FIRST].view(view), 255.0)
    if use_saturation:
        x = _blend(x, grey_level(x), colour[:, _SAT].view(view), 255.0)
    if use_hue:
        hue = colour[:, _HUE]
        x = torch.where((hue != 0.0).view(view), adjust_hue_batch(x / 255.0, hue) * 255.0, x)
    x = _blend(x, _masked_mean_grey(x, inside), colour[:, _C_LAST].view(view), 255.0)
    if permutation is not None:
        x = x.gather(1, permutation.to(x.device).view(-1, 3, 1, 1).expand_as(x))
    return x


def _jitter_batch(x: Tensor, colour: Tensor, inside: Tensor) -> Tensor:
    """The tutorial's brightness, contrast, saturation jitter (torchvision's float formulas) on x in [0, 1].

    Contrast blends with the mean grey level of the image's own pixels (``inside``: not the zoom-out fill), as the
    CPU transform computes it on the pasted patch only."""
    view = (-1, 1, 1, 1)
    x = (x * colour[:, _J_BRIGHT].view(view)).clamp_(0.0, 1.0)
    x = _blend(x, _masked_mean_grey(x, inside), colour[:, _J_CONTRAST].view(view), 1.0)
    return _blend(x, grey_level(x), colour[:, _J_SAT].view(view), 1.0)


class BatchAugment:
    """The training augmentation of ``transform`` (a :class:`TrainTransform`), applied to whole batches.

    ``transform`` provides the parameter sampler (and its per-worker random stream), sizes, normalisation, fill
    colour and resize mode. Use :meth:`collate` as a DataLoader ``collate_fn`` over raw samples (uint8 image, raw
    target with its parameters: :class:`SampleParams`) and :meth:`warp` on the device, or call the object on a list
    of images.
    """

    def __init__(self, transform: TrainTransform, max_prefilter: int = 4, pad_multiple: int = 8):
        self.transform = transform
        self.input_hw = transform.input_hw
        self.max_prefilter = int(max_prefilter)
        self.pad_multiple = int(pad_multiple)
        self._device_constants: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    # ------------------------------------------------------------------------------------------- CPU half
    def _geometry(self, params: dict, height: int, width: int) -> tuple[list[float], list[int], list[float]]:
        """(ax, bx, ay, by), the pre-filter (fy, fx) and the kept source bounds (x1, y1, x2, y2) of one (height,
        width) image (see :class:`AugmentBatch`)."""
        canvas_w, canvas_h, left, top = params.get("expand") or (width, height, 0, 0)
        x1, y1, x2, y2 = params["window"] or (0, 0, canvas_w, canvas_h)
        out_h, out_w = self.input_hw
        if self.transform.letterbox:
            # The window maps onto its placement [p.left, p.left + p.width) of the output, not the whole of it:
            # output x in normalised units o in [2·p.left / W - 1, 2·(p.left + p.width) / W - 1] -> [x1, x2].
            p = placement((y2 - y1, x2 - x1), self.input_hw, letterbox=True)
            ax, ay = (x2 - x1) * out_w / (2.0 * p.width), (y2 - y1) * out_h / (2.0 * p.height)
            bx = x1 - left - ax * (2.0 * p.left / out_w - 1.0)
            by = y1 - top - ay * (2.0 * p.top / out_h - 1.0)
            affine = [-ax if params["flip"] else ax, bx, ay, by]
            bounds = [max(x1 - left, 0), max(y1 - top, 0), min(x2 - left, width), min(y2 - top, height)]
            out_h, out_w = p.height, p.width
        else:
            ax, ay = (x2 - x1) / 2.0, (y2 - y1) / 2.0
            affine = [-ax if params["flip"] else ax, (x1 + x2) / 2.0 - left, ay, (y1 + y2) / 2.0 - top]
            bounds = [0, 0, width, height]
        if self.transform.resize != "torchvision":   # antialias, letterbox: box pre-filter
            pre = [min(self.max_prefilter, max(1, int((y2 - y1) / out_h))),
                   min(self.max_prefilter, max(1, int((x2 - x1) / out_w)))]
        else:
            pre = [1, 1]
        return affine, pre, [float(b) for b in bounds]

    @staticmethod
    def _colour(params: dict) -> list[float]:
        p = params.get("photometric")
        row = [1.0, 1.0, 1.0, 1.0, 0.0]
        if p is not None:
            row = [p["brightness"], p["contrast"] if p["contrast_first"] else 1.0,
                   1.0 if p["contrast_first"] else p["contrast"], p["saturation"], p["hue"]]
        return row + [params["brightness"], params["contrast"], params["saturation"]]

    @staticmethod
    def _permutation(params: dict) -> list[int]:
        p = params.get("photometric")
        return list(_IDENTITY if p is None or p["permutation"] is None else p["permutation"])

    def transform_boxes(self, target: dict, params: dict, height: int, width: int) -> dict:
        """The target of an (h, w) image after ``params``: :meth:`TrainTransform.apply`'s box arithmetic, the same
        float operations in the same order (so the boxes are bit-identical)."""
        canvas_w, canvas_h, _, _ = params.get("expand") or (width, height, 0, 0)
        return window_target(target, params, params["window"] or (0, 0, canvas_w, canvas_h),
                             self.input_hw if self.transform.letterbox else None)

    def prepare(self, images: Sequence[Tensor], targets: Sequence[dict],
                params: Sequence[dict] | None = None, skipped: int = 0) -> AugmentBatch:
        """Pad ``images`` (uint8 (3, H_i, W_i), any device) and transform the boxes with ``params``: given, else
        ``target[PARAMS_KEY]`` (drawn by :class:`SampleParams`), else drawn here from the transform's stream."""
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        if params is None:   # drawn in the workers (SampleParams) if the dataset did, else here
            params = [t[PARAMS_KEY] if PARAMS_KEY in t else self.transform.sample_params(hw, t)
                      for hw, t in zip(sizes, targets)]
        targets = [{k: v for k, v in t.items() if k != PARAMS_KEY} for t in targets]
        affine, prefilter, bounds, colour, new_targets = [], [], [], [], []
        for (h, w), target, p in zip(sizes, targets, params):
            a, pre, kept = self._geometry(p, h, w)
            affine.append(a)
            prefilter.append(pre)
            bounds.append(kept)
            colour.append(self._colour(p))
            new_targets.append(self.transform_boxes(target, p, h, w))
        padded, size_t = pad_replicate(images, self.pad_multiple)
        colour_t = torch.tensor(colour, dtype=torch.float32).reshape(-1, 8)
        photometric = [p.get("photometric") for p in params]
        return AugmentBatch(
            images=padded, sizes=size_t, affine=torch.tensor(affine, dtype=torch.float64).reshape(-1, 4),
            prefilter=torch.tensor(prefilter, dtype=torch.int64).reshape(-1, 2), colour=colour_t,
            bounds=torch.tensor(bounds, dtype=torch.float64).reshape(-1, 4),
            targets=new_targets, use_photometric=any(p is not None for p in photometric),
            use_saturation=any(p is not None and p["saturation"] != 1.0 for p in photometric),
            use_hue=any(p is not None and p["hue"] != 0.0 for p in photometric),
            permutation=torch.tensor([self._permutation(p) for p in params], dtype=torch.int64).reshape(-1, 3),
            use_permutation=any(p is not None and p["permutation"] is not None for p in photometric),
            use_jitter=bool((colour_t[:, _J_BRIGHT:] != 1.0).any()), skipped=skipped)

    def collate(self, samples: Sequence[tuple[Tensor, dict] | None]) -> AugmentBatch | Batch:
        """DataLoader ``collate_fn`` over raw samples; unreadable ones (None) are dropped and counted."""
        kept = [s for s in samples if s is not None]
        if not kept:
            return Batch(torch.zeros(0, 3, 0, 0), [], len(samples))
        return self.prepare([s[0] for s in kept], [s[1] for s in kept], skipped=len(samples) - len(kept))

    # ------------------------------------------------------------------------------------------- device half
    def _constants(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if device not in self._device_constants:
            t = self.transform
            self._device_constants[device] = (t.mean.to(device).view(1, 3, 1, 1), t.std.to(device).view(1, 3, 1, 1),
                                              t.fill_normalised.to(device).view(1, 3, 1, 1))
        return self._device_constants[device]

    def _sample(self, x: Tensor, batch: AugmentBatch, affine: Tensor) -> Tensor:
        """Bilinear warp of the (float) padded batch to (B, 3, H, W), one ``grid_sample`` per pre-filter group."""
        big_h, big_w = self.input_hw
        groups = torch.unique(batch.prefilter, dim=0).tolist()
        out = None
        for fy, fx in groups:
            if len(groups) == 1:
                index, src, aff = None, x, affine
            else:
                index = torch.nonzero((batch.prefilter == torch.tensor([fy, fx])).all(1)).flatten()
                index_dev = index.to(x.device)
                src, aff = x.index_select(0, index_dev), affine.index_select(0, index_dev)
            if fy > 1 or fx > 1:   # box pre-filter: pooled pixel j covers source [j·f, (j + 1)·f)
                src = nnf.avg_pool2d(src, (fy, fx), stride=(fy, fx), ceil_mode=True)
            hp, wp = src.shape[-2:]
            # source pixel coordinate x -> grid coordinate 2·(x / f) / Wp - 1 (align_corners=False)
            theta = torch.zeros(aff.shape[0], 2, 3, dtype=torch.float32, device=x.device)
            theta[:, 0, 0] = aff[:, 0] * (2.0 / (fx * wp))
            theta[:, 0, 2] = aff[:, 1] * (2.0 / (fx * wp)) - 1.0
            theta[:, 1, 1] = aff[:, 2] * (2.0 / (fy * hp))
            theta[:, 1, 2] = aff[:, 3] * (2.0 / (fy * hp)) - 1.0
            grid = nnf.affine_grid(theta, [aff.shape[0], 3, big_h, big_w], align_corners=False)
            warped = nnf.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
            if index is None:
                return warped
            if out is None:
                out = torch.empty(x.shape[0], 3, big_h, big_w, dtype=warped.dtype, device=x.device)
            out.index_copy_(0, index_dev, warped)
        return out

    def _inside(self, affine: Tensor, bounds: Tensor) -> Tensor:
        """(B, H, W) bool: the output pixel's centre samples the kept source rectangle ``bounds`` (B, 4) xyxy (the
        image, or the letterboxed window), not the zoom-out / letterbox fill."""
        big_h, big_w = self.input_hw
        ox = (torch.arange(big_w, device=affine.device, dtype=affine.dtype) * 2.0 + 1.0) / big_w - 1.0
        oy = (torch.arange(big_h, device=affine.device, dtype=affine.dtype) * 2.0 + 1.0) / big_h - 1.0
        xs = affine[:, 0:1] * ox + affine[:, 1:2]                              # (B, W) source x per column
        ys = affine[:, 2:3] * oy + affine[:, 3:4]                              # (B, H) source y per row
        in_x = (xs >= bounds[:, 0:1]) & (xs <= bounds[:, 2:3])
        in_y = (ys >= bounds[:, 1:2]) & (ys <= bounds[:, 3:4])
        return in_y[:, :, None] & in_x[:, None, :]

    def warp(self, batch: AugmentBatch, device: torch.device | str | None = None,
             non_blocking: bool = True) -> tuple[Tensor, list[dict]]:
        """The device half: (B, 3, H, W) float32 normalised images on ``device`` and the (CPU) targets."""
        device = torch.device(device) if device is not None else batch.images.device
        mean, std, fill = self._constants(device)
        x = batch.images.to(device, non_blocking=non_blocking).float()
        affine = batch.affine.to(device, non_blocking=non_blocking).float()
        colour = batch.colour.to(device, non_blocking=non_blocking)
        if batch.bounds is not None:
            bounds = batch.bounds.to(device, non_blocking=non_blocking).float()
        else:   # the whole image: (0, 0, w, h)
            sizes_hw = batch.sizes.to(device, non_blocking=non_blocking).float()
            bounds = torch.cat([torch.zeros_like(sizes_hw), sizes_hw.flip(1)], dim=1)
        x = self._sample(x, batch, affine)
        inside = self._inside(affine, bounds)
        if batch.use_photometric:
            permutation = None
            if batch.use_permutation and batch.permutation is not None:
                permutation = batch.permutation.to(device, non_blocking=non_blocking)
            x = photometric_distort_batch(x, colour, batch.use_saturation, batch.use_hue, inside, permutation)
        x = x / 255.0
        if batch.use_jitter:
            x = _jitter_batch(x, colour, inside)
        x = (x * 255.0 - mean) / std
        return torch.where(inside[:, None], x, fill), batch.targets

    def __call__(self, images: Sequence[Tensor], targets: Sequence[dict], params: Sequence[dict] | None = None,
                 device: torch.device | str | None = None) -> tuple[Tensor, list[dict]]:
        """Augment a list of uint8 (3, H_i, W_i) images with their raw targets: :meth:`prepare` then :meth:`warp`."""
        return self.warp(self.prepare(images, targets, params), device)


def build_batch_augment(cfg: "Config", seed: int | None = None) -> BatchAugment:
    """The batched form of ``cfg``'s training augmentation (same parameters as :func:`build_train_transform`)."""
    return BatchAugment(build_train_transform(cfg, seed))


def build_sample_params(cfg: "Config", seed: int | None = None) -> SampleParams:
    """The per-sample part of ``data.pipeline: batched`` (the dataset's transform, see :class:`SampleParams`)."""
    return SampleParams(build_train_transform(cfg, seed))


class DeviceAugmentLoader:
    """Wraps a DataLoader whose ``collate_fn`` is :meth:`BatchAugment.collate`: yields :class:`Batch` objects of
    augmented images already on ``device`` (targets stay on the CPU, as the CPU pipeline leaves them).

    On CUDA with ``prefetch``, batch k + 1 is copied and warped on a side stream while the caller trains on batch
    k (the caller's stream waits for it before using it), so the copy and the augmentation overlap the step.
    Other attributes (``generator``, ``sampler``, ``dataset``, ...) are the wrapped loader's.
    """

    def __init__(self, loader, augment: BatchAugment, device: torch.device | str, prefetch: bool = True):
        self.loader, self.augment, self.device = loader, augment, torch.device(device)
        self.prefetch = prefetch and self.device.type == "cuda"

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name == "loader":   # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _apply(self, batch) -> Batch:
        if not isinstance(batch, AugmentBatch):   # every sample unreadable: an empty Batch
            return batch
        images, targets = self.augment.warp(batch, self.device)
        return Batch(images, targets, batch.skipped)

    def __iter__(self) -> Iterator[Batch]:
        if not self.prefetch:
            for batch in self.loader:
                yield self._apply(batch)
            return
        stream = torch.cuda.Stream(self.device)
        iterator = iter(self.loader)

        def stage():
            try:
                batch = next(iterator)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                return self._apply(batch)

        upcoming = stage()
        while upcoming is not None:
            current_stream = torch.cuda.current_stream(self.device)
            current_stream.wait_stream(stream)
            current = upcoming
            if current[0].is_cuda:
                current[0].record_stream(current_stream)   # allocated on the side stream, used on this one
            upcoming = stage()
            yield current
