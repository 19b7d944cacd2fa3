"""Deterministic synthetic detection dataset in COCO format (the built-in demo).

Each image has a textured, muted background (gradient, smooth noise, stripes or a
checkerboard, plus grain) and 1-10 saturated objects from six classes. Every class
has its own shape *and* its own colour family, so a tiny SSD can learn it in minutes,
while varied sizes (3-80 % of the shorter image side), aspect ratios, rotations,
partial overlaps and image sizes keep it from being trivial.

Shapes are rasterised at 2-4x supersampling and box-filtered down, which gives
anti-aliased edges; the ground-truth box is the exact extent of the supersampled
raster (a multiple of 1/ss pixel), i.e. the tight box of the drawn shape.

Output layout (``generate_synthetic_coco``)::

    out_dir/images/synth_000000.jpg ...
    out_dir/annotations.json        # COCO instances (bbox = [left, top, width, height], floats)
    out_dir/synth_manifest.json     # generation parameters, written last (marks completeness)

Same parameters => byte-identical files: every image draws from its own
``numpy.random.Generator`` seeded by ``(seed, image index)``, so image *i* does not
depend on how many images are generated.

Importing this module has no side effects.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from multibox.io import atomic_write_text

__all__ = [
    "SYNTH_CATEGORIES",
    "SYNTH_CLASS_NAMES",
    "DEFAULT_SIZE_RANGE",
    "DEFAULT_SMALL_FRACTION",
    "GENERATOR_VERSION",
    "generate_synthetic_coco",
    "generate_demo_splits",
    "is_complete_dataset",
    "SynthSplits",
]

# Bump whenever the generated pixels or annotations change, so cached demo data is rebuilt.
GENERATOR_VERSION = 1

# (name, base hue in degrees). Hues are >= 40 degrees apart (hue jitter is +-8), and the
# shapes differ too, so either cue alone identifies the class.
_CLASS_SPECS: tuple[tuple[str, float], ...] = (
    ("ellipse", 0.0),  # red
    ("rectangle", 225.0),  # blue
    ("triangle", 120.0),  # green
    ("star", 52.0),  # yellow
    ("ring", 300.0),  # magenta
    ("cross", 182.0),  # cyan
)

SYNTH_CATEGORIES: list[dict] = [
    {"id": i + 1, "name": name, "supercategory": "shape"} for i, (name, _) in enumerate(_CLASS_SPECS)
]
SYNTH_CLASS_NAMES: list[str] = [name for name, _ in _CLASS_SPECS]
MAX_CLASSES = 24
# Beyond six classes, each shape comes again in other colour families (hue offsets from its own), so that neither
# the shape nor the colour alone names the class.
_HUE_OFFSETS = (0.0, 180.0, 90.0, 270.0)
# Unannotated distractors (`multibox synth --clutter`): shapes no class has, in any colour.
_CLUTTER_SHAPES = ("hexagon", "diamond")


class ShapeClass(NamedTuple):
    """One synthetic class: its COCO name, the shape drawn and its colour family (hue in degrees)."""

    name: str
    shape: str
    hue: float


def synth_classes(num_classes: int = len(_CLASS_SPECS)) -> list[ShapeClass]:
    """The first ``num_classes`` classes (1..24): the demo's six, then each shape in a second, third and fourth
    colour family (``ellipse_2`` is a cyan ellipse: the red ellipse's hue + 180 degrees)."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    classes = []
    for k in range(num_classes):
        shape, hue = _CLASS_SPECS[k % len(_CLASS_SPECS)]
        family = k // len(_CLASS_SPECS)
        name = shape if family == 0 else f"{shape}_{family + 1}"
        classes.append(ShapeClass(name, shape, (hue + _HUE_OFFSETS[family]) % 360.0))
    return classes

_MANIFEST = "synth_manifest.json"
_ANNOTATIONS = "annotations.json"
_IMAGE_NAME = "synth_{:06d}.jpg"
_IMAGE_RE = re.compile(r"^synth_\d{6}\.jpg$")

# Object size = long side of its box as a fraction of the image's shorter side, drawn
# log-uniformly from a "small" band [lo, 0.08] with probability small_fraction, else from
# the main band [0.08, hi] (most objects medium-sized, as a tiny SSD can learn them).
DEFAULT_SIZE_RANGE = (0.03, 0.80)
DEFAULT_SMALL_FRACTION = 0.15
_SMALL_SPLIT = 0.08
_ASPECT_RANGE = (0.6, 1.6)  # width / height for ellipses, rectangles, rings, crosses
_MAX_BOX_IOU = 0.35  # reject placements overlapping an earlier box more than this
_MIN_VISIBLE = 0.5  # an earlier object must keep at least half of its pixels visible


class SynthSplits(NamedTuple):
    """Annotation files of the demo splits (``train, val = generate_demo_splits(...)`` works)."""

    train: Path
    val: Path


# --------------------------------------------------------------------------- rendering


def _hsv_to_rgb255(h_deg: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation background colour, float32 (3,) in 0..255."""
    h = rng.uniform(0.0, 360.0)
    s = rng.uniform(0.0, 0.3)
    v = rng.uniform(0.2, 0.75)
    return np.asarray(_hsv_to_rgb255(h, s, v), dtype=np.float32)


def _object_colour(rng: np.random.Generator, base_hue: float) -> tuple[int, int, int]:
    """A saturated, bright colour from one class's hue family (mild per-instance variation)."""
    return _hsv_to_rgb255(base_hue + rng.uniform(-8.0, 8.0), rng.uniform(0.65, 1.0), rng.uniform(0.72, 1.0))


def _background(rng: np.random.Generator, width: int, height: int, grain: tuple[float, float] = (2.0, 8.0)
                ) -> np.ndarray:
    """Textured background, uint8 (H, W, 3), with luminance grain of a standard deviation drawn in ``grain``."""
    kind = int(rng.integers(0, 4))
    c1, c2 = _muted_colour(rng), _muted_colour(rng)
    if kind == 1:
        # Smooth colour noise: a coarse grid of muted colours, bilinearly upsampled.
        gw, gh = int(rng.integers(3, 13)), int(rng.integers(3, 13))
        grid = np.stack([_muted_colour(rng) for _ in range(gw * gh)]).reshape(gh, gw, 3)
        img = np.asarray(
            Image.fromarray(grid.astype(np.uint8)).resize((width, height), Image.BILINEAR), dtype=np.float32
        )
    else:
        ys = np.arange(height, dtype=np.float32)[:, None]
        xs = np.arange(width, dtype=np.float32)[None, :]
        if kind == 0:
            # Linear gradient at a random angle.
            phi = rng.uniform(0.0, 2.0 * math.pi)
            t = xs * math.cos(phi) + ys * math.sin(phi)
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        elif kind == 2:
            # Stripes (soft or hard) at a random angle and period.
            phi = rng.uniform(0.0, math.pi)
            period = rng.uniform(8.0, 48.0)
            t = np.sin((xs * math.cos(phi) + ys * math.sin(phi)) * (2.0 * math.pi / period))
            t = (t > 0).astype(np.float32) if rng.random() < 0.5 else 0.5 + 0.5 * t
        else:
            # Axis-aligned checkerboard with a random cell size and phase.
            cell = int(rng.integers(8, 49))
            ox, oy = int(rng.integers(0, cell)), int(rng.integers(0, cell))
            t = (((xs.astype(np.int64) + ox) // cell + (ys.astype(np.int64) + oy) // cell) % 2).astype(np.float32)
        img = c1 + t[..., None] * (c2 - c1)
    # Grain, shared by the three channels (cheaper, and looks like sensor luminance noise).
    sigma = rng.uniform(*grain)
    img = img + rng.normal(0.0, sigma, size=(height, width, 1)).astype(np.float32)
    return np.clip(img, 0.0, 255.0).astype(np.uint8)


def _regular_polygon(num: int, angle: float, inner_ratio: float | None = None) -> np.ndarray:
    """Vertices (k, 2) of a regular polygon / star of outer radius 1 centred at 0."""
    if inner_ratio is None:
        theta = angle + np.arange(num) * (2.0 * math.pi / num)
        radii = np.ones(num)
    else:
        theta = angle + np.arange(2 * num) * (math.pi / num)
        radii = np.where(np.arange(2 * num) % 2 == 0, 1.0, inner_ratio)
    # -sin so that angle 0 points "up" in image coordinates.
    return np.stack([radii * np.cos(theta - math.pi / 2), radii * np.sin(theta - math.pi / 2)], axis=1)


def _draw_aspect(rng: np.random.Generator, aspect_range: tuple[float, float], log_aspect: bool,
                 mirror_aspect: bool) -> float:
    """A shape's width / height (see :class:`Variety`)."""
    aspect = math.exp(rng.uniform(*np.log(aspect_range))) if log_aspect else rng.uniform(*aspect_range)
    if mirror_aspect and rng.random() < 0.5:   # drawn only when asked, so other sets stay byte-identical
        aspect = 1.0 / aspect
    return aspect


def _render_shape(
    rng: np.random.Generator, kind: str, long_side: float, aspect_range: tuple[float, float] = _ASPECT_RANGE,
    log_aspect: bool = False, mirror_aspect: bool = False,
) -> tuple[Image.Image, np.ndarray, tuple[float, float, float, float], float]:
    """Rasterise one shape on its own small canvas.

    Returns ``(mask, mask_u8, box, area)``: ``mask`` is an 'L' image (ch, cw) of coverage
    0..255 (anti-aliased), ``mask_u8`` the same as a numpy array, ``box`` the tight
    xyxy extent of the shape in canvas pixel coordinates (multiples of 1/ss) and ``area``
    the shape's area in pixels (exact count of supersampled pixels / ss^2).
    """
    ss = 4 if long_side < 100 else 2  # supersampling factor; big shapes need less
    aspect = _draw_aspect(rng, aspect_range, log_aspect, mirror_aspect)  # w / h
    if kind in ("triangle", "star", "hexagon", "diamond"):
        if kind == "triangle":
            verts = _regular_polygon(3, rng.uniform(0.0, 2.0 * math.pi / 3))
        elif kind == "star":
            verts = _regular_polygon(5, rng.uniform(0.0, 2.0 * math.pi / 5), inner_ratio=rng.uniform(0.4, 0.5))
        else:
            verts = _regular_polygon(6 if kind == "hexagon" else 4, rng.uniform(0.0, math.pi / 2))
        verts = verts - verts.min(axis=0)
        verts = verts * (long_side * ss / float(verts.max()))
        w_ss, h_ss = float(np.ceil(verts[:, 0].max())), float(np.ceil(verts[:, 1].max()))
    else:
        if aspect >= 1.0:
            w_ss, h_ss = long_side * ss, long_side * ss / aspect
        else:
            w_ss, h_ss = long_side * ss * aspect, long_side * ss
        w_ss, h_ss = float(max(round(w_ss), 2)), float(max(round(h_ss), 2))
        verts = None
    # Random sub-pixel phase, so box edges are not always on pixel boundaries.
    ox, oy = int(rng.integers(0, ss)), int(rng.integers(0, ss))
    cw = int(math.ceil((w_ss + ox) / ss)) + 1
    ch = int(math.ceil((h_ss + oy) / ss)) + 1
    canvas = Image.new("L", (cw * ss, ch * ss), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = ox, oy, ox + w_ss - 1, oy + h_ss - 1  # PIL's shape coordinates are inclusive
    if kind == "ellipse":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif kind == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif kind == "ring":
        draw.ellipse((x0, y0, x1, y1), fill=255)
        r = rng.uniform(0.45, 0.6)  # hole size relative to the outer ellipse
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * r / 2, (y1 - y0) * r / 2
        if hw >= 1 and hh >= 1:
            draw.ellipse((cx - hw, cy - hh, cx + hw, cy + hh), fill=0)
    elif kind == "cross":
        t = rng.uniform(0.28, 0.4)  # arm thickness relative to the box side
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        tx, ty = max((x1 - x0) * t / 2, 1.0), max((y1 - y0) * t / 2, 1.0)
        draw.rectangle((x0, cy - ty, x1, cy + ty), fill=255)
        draw.rectangle((cx - tx, y0, cx + tx, y1), fill=255)
    else:
        draw.polygon([(float(x) + ox, float(y) + oy) for x, y in verts], fill=255)
    left, top, right, bottom = canvas.getbbox()
    box = (left / ss, top / ss, right / ss, bottom / ss)
    area = canvas.histogram()[255] / float(ss * ss)  # only 0 and 255 are ever drawn
    mask = canvas.reduce(ss)  # box filter = exact area coverage -> anti-aliased edges
    return mask, np.asarray(mask), box, area


def _sample_long_side(
    rng: np.random.Generator, short_side: int, size_range: tuple[float, float], small_fraction: float
) -> float:
    lo, hi = size_range
    split = min(max(_SMALL_SPLIT, lo), hi)
    if rng.random() < small_fraction:
        hi = split
    else:
        lo = split
    frac = math.exp(rng.uniform(math.log(lo), math.log(hi)))  # log-uniform
    return max(frac * short_side, 5.0)


def _box_iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box (4,) with many (n, 4)."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=1)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


class _Canvas:
    """One image being filled: the picture, and what is placed on it so far (in placement order)."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        # owner[y, x] = index of the top-most object covering the pixel (coverage >= 50 %), -1 if none.
        self.owner = np.full((image.height, image.width), -1, dtype=np.int16)
        self.boxes_xyxy = np.zeros((0, 4), dtype=np.float64)
        self.visible: list[int] = []     # per object, its pixels not covered by a later object
        self.full_area: list[int] = []   # per object, its pixels when placed
        self.objects: list[dict] = []

    def hidden_by(self, box_xyxy: np.ndarray, px: int, py: int, cover: np.ndarray) -> np.ndarray | None:
        """Pixels of each earlier object that a shape with coverage ``cover`` (ch, cw) at (px, py) would hide,
        (n_objects,); None when the placement is refused (box overlap, or an earlier object hidden too much)."""
        if len(self.boxes_xyxy) and _box_iou_one_to_many(box_xyxy, self.boxes_xyxy).max() > _MAX_BOX_IOU:
            return None
        ch, cw = cover.shape
        region = self.owner[py : py + ch, px : px + cw]
        hidden = np.bincount(region[cover].astype(np.int64) + 1, minlength=len(self.objects) + 1)[1:]
        if len(self.objects) and np.any(
            np.asarray(self.visible) - hidden < _MIN_VISIBLE * np.asarray(self.full_area)
        ):
            return None
        return hidden

    def add(self, box_xyxy: np.ndarray, px: int, py: int, cover: np.ndarray, hidden: np.ndarray,
            mask: Image.Image, colour: tuple[int, int, int], category_id: int, area: float) -> None:
        """Draw the accepted shape on top of everything placed so far and record it."""
        ch, cw = cover.shape
        for j in np.nonzero(hidden)[0]:
            self.visible[j] -= int(hidden[j])
        self.owner[py : py + ch, px : px + cw][cover] = len(self.objects)
        n_cover = int(cover.sum())
        self.visible.append(n_cover)
        self.full_area.append(n_cover)
        self.boxes_xyxy = np.concatenate([self.boxes_xyxy, box_xyxy[None]], axis=0)
        self.image.paste(colour, (px, py, px + cw, py + ch), mask)
        # Drawn (amodal) shape area, as COCO uses the segment area, not the box area.
        self.objects.append({"category_id": category_id, "box_xyxy": [float(v) for v in box_xyxy], "area": area})


class Variety(NamedTuple):
    """What varies between images beyond the demo's defaults (the arguments of :func:`generate_synthetic_coco`).

    Fields:
        min_objects, max_objects: objects per image are drawn from min_objects..max_objects (a few fewer when a
            crowded image has no room left for a non-overlapping placement).
        size_range: (lo, hi) of an object's long side as a fraction of the image's shorter side.
        small_fraction: probability that an object is drawn from the small band [lo, 0.08]
            (log-uniform there; otherwise log-uniform in [0.08, hi]).
        aspect_range: width / height of ellipses, rectangles, rings and crosses.
        log_aspect: draw that ratio log-uniformly (as many tall shapes as wide ones) instead of uniformly.
        clutter: mean number of unannotated distractor shapes per image (Poisson).
        empty_fraction: share of images drawn without objects (clutter only).
        grain: range of the background's noise standard deviation (0..255 units).
        image_aspect: (lo, hi) of width / height ((1.7, 1.8): 16:9 frames), the height from the width; None: both
            sides drawn on their own.
        mirror_aspect: half the shapes take the reciprocal of their drawn ratio, so ``aspect_range`` (4, 12)
            gives 4:1 to 12:1 and 1:4 to 1:12 shapes, none in between.
    """

    classes: tuple[ShapeClass, ...]
    min_objects: int = 1
    max_objects: int = 10
    size_range: tuple[float, float] = DEFAULT_SIZE_RANGE
    small_fraction: float = DEFAULT_SMALL_FRACTION
    aspect_range: tuple[float, float] = _ASPECT_RANGE
    log_aspect: bool = False
    clutter: float = 0.0
    empty_fraction: float = 0.0
    grain: tuple[float, float] = (2.0, 8.0)
    image_aspect: tuple[float, float] | None = None
    mirror_aspect: bool = False


def _try_shape(rng: np.random.Generator, canvas: _Canvas, variety: Variety) -> bool:
    """Draw one random shape and try up to 8 random positions for it; True when it was placed."""
    width, height = canvas.image.size
    cls = int(rng.integers(0, len(variety.classes)))
    long_side = _sample_long_side(rng, min(width, height), variety.size_range, variety.small_fraction)
    mask, mask_u8, (bx0, by0, bx1, by1), area = _render_shape(rng, variety.classes[cls].shape, long_side,
                                                               variety.aspect_range, variety.log_aspect,
                                                               variety.mirror_aspect)
    ch, cw = mask_u8.shape
    if cw > width or ch > height:
        return False
    cover = mask_u8 >= 128
    if int(cover.sum()) == 0:
        return False
    for _pos_try in range(8):
        px = int(rng.integers(0, width - cw + 1))
        py = int(rng.integers(0, height - ch + 1))
        box_xyxy = np.array([bx0 + px, by0 + py, bx1 + px, by1 + py])
        hidden = canvas.hidden_by(box_xyxy, px, py, cover)
        if hidden is not None:
            colour = _object_colour(rng, variety.classes[cls].hue)
            canvas.add(box_xyxy, px, py, cover, hidden, mask, colour, cls + 1, area)
            return True
    return False


def _draw_clutter(rng: np.random.Generator, image: Image.Image, variety: Variety) -> None:
    """Unannotated distractors (Poisson, mean ``variety.clutter``): hexagons and diamonds of any colour, drawn on
    the background before the objects, so a detector must tell the classes' shapes from other saturated blobs."""
    for _ in range(int(rng.poisson(variety.clutter))):
        shape = _CLUTTER_SHAPES[int(rng.integers(0, len(_CLUTTER_SHAPES)))]
        long_side = _sample_long_side(rng, min(image.size), variety.size_range, variety.small_fraction)
        mask, mask_u8, _, _ = _render_shape(rng, shape, long_side, variety.aspect_range, variety.log_aspect,
                                            variety.mirror_aspect)
        ch, cw = mask_u8.shape
        if cw <= image.width and ch <= image.height:
            px, py = int(rng.integers(0, image.width - cw + 1)), int(rng.integers(0, image.height - ch + 1))
            image.paste(_object_colour(rng, rng.uniform(0.0, 360.0)), (px, py, px + cw, py + ch), mask)


def _make_image(rng: np.random.Generator, min_side: int, max_side: int, variety: Variety
                ) -> tuple[Image.Image, list[dict]]:
    """One image and its objects: dicts with ``category_id``, ``box_xyxy`` (floats) and ``area``."""
    width = int(rng.integers(min_side, max_side + 1))
    if variety.image_aspect is None:
        height = int(rng.integers(min_side, max_side + 1))
    else:
        height = max(16, round(width / rng.uniform(*variety.image_aspect)))
    canvas = _Canvas(Image.fromarray(_background(rng, width, height, variety.grain)))
    # The demo's defaults draw no clutter and no empty images: its random stream (and files) stay as they were.
    if variety.clutter > 0:
        _draw_clutter(rng, canvas.image, variety)
    empty = variety.empty_fraction > 0 and rng.random() < variety.empty_fraction
    target = 0 if empty else int(rng.integers(variety.min_objects, variety.max_objects + 1))
    for _ in range(target):
        for _shape_try in range(6):
            if _try_shape(rng, canvas, variety):
                break
    return canvas.image, canvas.objects


# --------------------------------------------------------------------------- dataset files


def _params(num_images: int, seed: int, min_side: int, max_side: int, variety: Variety, jpeg_quality: int) -> dict:
    """The manifest's record of what was generated. Variety beyond the demo's is recorded only where it is used,
    so the demo's cached data stays complete."""
    params = {
        "generator_version": GENERATOR_VERSION,
        "num_images": int(num_images),
        "seed": int(seed),
        "min_side": int(min_side),
        "max_side": int(max_side),
        "max_objects": int(variety.max_objects),
        "size_range": [float(variety.size_range[0]), float(variety.size_range[1])],
        "small_fraction": float(variety.small_fraction),
        "jpeg_quality": int(jpeg_quality),
    }
    demo = Variety(tuple(synth_classes()))
    for key in ("min_objects", "log_aspect", "clutter", "empty_fraction", "mirror_aspect"):
        if getattr(variety, key) != getattr(demo, key):
            params[key] = getattr(variety, key)
    if variety.image_aspect is not None:
        params["image_aspect"] = [float(v) for v in variety.image_aspect]
    for key in ("aspect_range", "grain"):
        if getattr(variety, key) != getattr(demo, key):
            params[key] = [float(v) for v in getattr(variety, key)]
    if variety.classes != demo.classes:
        params["num_classes"] = len(variety.classes)
    return params


def is_complete_dataset(out_dir: str | os.PathLike, params: dict) -> bool:
    """True when ``out_dir`` holds a finished dataset generated with exactly ``params``."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("params") != params or not (out_dir / _ANNOTATIONS).is_file():
        return False
    images_dir = out_dir / "images"
    present = set(os.listdir(images_dir)) if images_dir.is_dir() else set()
    return all(_IMAGE_NAME.format(i) in present for i in range(params["num_images"]))


def _check_params(num_images: int, min_side: int, max_side: int, variety: Variety) -> None:
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not (16 <= min_side <= max_side):
        raise ValueError(f"need 16 <= min_side <= max_side, got {min_side}, {max_side}")
    if not (0 <= variety.min_objects <= variety.max_objects and variety.max_objects >= 1):
        raise ValueError(f"need 0 <= min_objects <= max_objects and max_objects >= 1, got "
                         f"{variety.min_objects}, {variety.max_objects}")
    lo, hi = variety.size_range
    if not (0.0 < lo <= hi <= 0.95):
        raise ValueError(f"need 0 < size_range[0] <= size_range[1] <= 0.95, got {variety.size_range}")
    if not (0.0 <= variety.small_fraction <= 1.0):
        raise ValueError(f"small_fraction must be in [0, 1], got {variety.small_fraction}")
    if not (0.0 < variety.aspect_range[0] <= variety.aspect_range[1]):
        raise ValueError(f"need 0 < aspect_range[0] <= aspect_range[1], got {variety.aspect_range}")
    if variety.image_aspect is not None and not 0.0 < variety.image_aspect[0] <= variety.image_aspect[1]:
        raise ValueError(f"need 0 < image_aspect[0] <= image_aspect[1], got {variety.image_aspect}")
    if not 0.0 <= variety.grain[0] <= variety.grain[1]:
        raise ValueError(f"need 0 <= grain[0] <= grain[1], got {variety.grain}")
    if variety.clutter < 0 or not (0.0 <= variety.empty_fraction < 1.0):
        raise ValueError(f"need clutter >= 0 and 0 <= empty_fraction < 1, got {variety.clutter}, "
                         f"{variety.empty_fraction}")


def _save_image(image: Image.Image, index: int, images_dir: Path, jpeg_quality: int) -> dict:
    """Write image ``index`` (id ``index + 1``) as JPEG (4:4:4); returns its COCO ``images`` entry."""
    file_name = _IMAGE_NAME.format(index)
    image.save(images_dir / file_name, format="JPEG", quality=jpeg_quality, subsampling=0)
    return {"id": index + 1, "file_name": file_name, "width": image.width, "height": image.height}


def _annotations(objects: list[dict], image_id: int, first_id: int) -> list[dict]:
    """COCO ``annotations`` entries of one image's objects, ids counting from ``first_id``."""
    annotations = []
    for k, obj in enumerate(objects):
        x0, y0, x1, y1 = obj["box_xyxy"]
        annotations.append(
            {
                "id": first_id + k,
                "image_id": image_id,
                "category_id": obj["category_id"],
                "bbox": [x0, y0, x1 - x0, y1 - y0],  # COCO ltwh
                "area": round(obj["area"], 2),
                "iscrowd": 0,
            }
        )
    return annotations


def _remove_stale_images(images_dir: Path, wanted: set[str]) -> None:
    """Remove images left over from an earlier, larger run (only files with our own naming pattern)."""
    for name in os.listdir(images_dir):
        if _IMAGE_RE.match(name) and name not in wanted:
            (images_dir / name).unlink()


def _write_annotations(out_dir: Path, params: dict, images: list[dict], annotations: list[dict],
                       classes: list[ShapeClass]) -> None:
    """``annotations.json``, then the manifest: written last, its presence marks the dataset complete."""
    coco = {
        "info": {"description": "multibox synthetic shapes", **params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c.name, "supercategory": "shape"} for i, c in enumerate(classes)],
    }
    atomic_write_text(out_dir / _ANNOTATIONS, json.dumps(coco))
    atomic_write_text(out_dir / _MANIFEST, json.dumps({"params": params}, indent=1, sort_keys=True))


def generate_synthetic_coco(
    out_dir: str | os.PathLike,
    num_images: int = 1000,
    seed: int = 0,
    *,
    min_side: int = 256,
    max_side: int = 416,
    max_objects: int = 10,
    size_range: tuple[float, float] = DEFAULT_SIZE_RANGE,
    small_fraction: float = DEFAULT_SMALL_FRACTION,
    num_classes: int = len(_CLASS_SPECS),
    min_objects: int = 1,
    aspect_range: tuple[float, float] = _ASPECT_RANGE,
    log_aspect: bool = False,
    clutter: float = 0.0,
    empty_fraction: float = 0.0,
    grain: tuple[float, float] = (2.0, 8.0),
    image_aspect: tuple[float, float] | None = None,
    mirror_aspect: bool = False,
    jpeg_quality: int = 90,
    skip_if_complete: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a synthetic COCO detection dataset and return the path of its ``annotations.json``.

    Args:
        out_dir: folder to create; images go to ``out_dir/images``.
        num_images: number of images (ids 1..num_images).
        seed: base seed; the same parameters give byte-identical files.
        min_side, max_side: image width and height are each drawn uniformly from [min_side, max_side].
        num_classes: 1..24 classes (:func:`synth_classes`; the demo's six by default).
        max_objects .. mirror_aspect: what varies between images, the fields of :class:`Variety`.
        jpeg_quality: JPEG quality (4:4:4 chroma, so small objects keep their colour).
        skip_if_complete: return at once when ``out_dir`` already holds a complete dataset made
            with the same parameters (see ``synth_manifest.json``).
        progress: optional callback ``progress(done, total)`` called after each image.
    """
    classes = synth_classes(num_classes)
    variety = Variety(tuple(classes), min_objects, max_objects, tuple(size_range), small_fraction, tuple(aspect_range),
                      log_aspect, clutter, empty_fraction, tuple(grain), image_aspect and tuple(image_aspect),
                      mirror_aspect)
    _check_params(num_images, min_side, max_side, variety)
    out_dir = Path(out_dir)
    params = _params(num_images, seed, min_side, max_side, variety, jpeg_quality)
    ann_path = out_dir / _ANNOTATIONS
    if skip_if_complete and is_complete_dataset(out_dir, params):
        return ann_path

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / _MANIFEST).unlink(missing_ok=True)  # incomplete until the manifest is rewritten
    images, annotations = _write_images(out_dir / "images", params, variety, progress)
    _write_annotations(out_dir, params, images, annotations, classes)
    return ann_path


def _write_images(images_dir: Path, params: dict, variety: Variety,
                  progress: Callable[[int, int], None] | None) -> tuple[list[dict], list[dict]]:
    """Draw and save every image of ``params``; returns the COCO ``images`` and ``annotations`` entries."""
    images, annotations = [], []
    total = params["num_images"]
    for i in range(total):
        rng = np.random.default_rng([params["seed"], i])
        image, objects = _make_image(rng, params["min_side"], params["max_side"], variety)
        images.append(_save_image(image, i, images_dir, params["jpeg_quality"]))
        annotations += _annotations(objects, images[-1]["id"], first_id=len(annotations) + 1)
        if progress is not None:
            progress(i + 1, total)
    _remove_stale_images(images_dir, {im["file_name"] for im in images})
    return images, annotations


def generate_demo_splits(
    root: str | os.PathLike,
    num_train: int = 1000,
    num_val: int = 200,
    seed: int = 0,
    *,
    progress: Callable[[int, int], None] | None = None,
    **kwargs,
) -> SynthSplits:
    """Create (or reuse) ``root/train`` and ``root/val`` and return their annotation files.

    The splits use different seeds (``2*seed`` and ``2*seed + 1``, so no two ``seed`` values
    share a split). A split that is already complete with the same parameters is not
    regenerated. Extra keyword arguments go to :func:`generate_synthetic_coco`.
    """
    root = Path(root)
    train = generate_synthetic_coco(
        root / "train", num_train, 2 * seed, skip_if_complete=True, progress=progress, **kwargs
    )
    val = generate_synthetic_coco(
        root / "val", num_val, 2 * seed + 1, skip_if_complete=True, progress=progress, **kwargs
    )
    return SynthSplits(train, val)
