"""Detection datasets: the shared base class, image decoding, the training-time data policy, and the COCO reader.

Sample convention (shared across multibox): ``(image, target)`` with
``image`` uint8 (3, H, W) RGB and ``target`` a dict with
``boxes`` float32 (n, 4) xyxy pixels, ``labels`` int64 (n,) in 1..C (0 = background),
``image_id`` int and ``orig_size`` (H, W).

Every source (COCO JSON, Pascal VOC, packed shards) is a :class:`DetectionDataset`: an in-memory index of
:class:`ImageRecord` (the annotations as the source states them) plus a way to fetch an image's encoded bytes.
The same code then decodes, applies the data policy and builds the ground truth for evaluation (``coco_gt()``).

Training-time data policy (what happens to imperfect data; ``multibox check-data`` reports all of it):

* colour modes: grayscale, palette, RGBA/LA (alpha dropped, not composited), CMYK and 16-bit images are
  converted to 8-bit RGB (16-bit values are scaled by 1/256, not clipped);
* EXIF orientation is applied (the image is used as a viewer shows it; boxes are taken to be in that frame);
* boxes: ``[left, top, w, h]`` -> xyxy; crowd (``iscrowd=1``) / VOC ``difficult`` boxes are left out of the
  training targets (evaluation ignores them the COCO way); boxes with a NaN/inf coordinate are dropped when the
  annotations are loaded; the rest are clipped to the decoded image and dropped if empty after clipping
  (zero-size, negative-size or fully outside): the rule is :func:`multibox.data.policy.classify_boxes`, which
  ``check-data`` applies too;
* annotations naming an unknown category or image are dropped when loaded; duplicate image ids keep the first
  image; duplicate annotation ids are renumbered;
* an image that cannot be read (missing, empty, truncated, not an image, or whose header declares more than
  ``max_image_pixels`` pixels: a decompression bomb, refused before decoding) makes ``__getitem__`` return
  ``None`` (with one warning per image and process); :func:`collate_detection` drops it and counts it in
  ``Batch.skipped``.

Hostile annotation files: a COCO JSON that is not valid JSON (the error gives line and column), is not UTF-8, is
nested absurdly deep, or whose structure is wrong (wrong top-level type, an image without an integer ``id``, an
annotation whose ``bbox`` is not 4 numbers, ...) raises :class:`CocoFormatError` naming the file, the field and
the item (``annotations[12].bbox: expected 4 numbers, got "abc"``). Values that are well-formed but wrong
(NaN / inf coordinates, unknown ids, duplicates) follow the policy above.

The counts of what was dropped when loading are in ``dataset.load_report``, with a few example ids of each kind
(:class:`multibox.data.policy.LoadReport`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from multibox.config import DEFAULT_MAX_IMAGE_PIXELS
from multibox.core.boxes import ltwh_to_xyxy
from multibox.data.categories import label_to_category_id
from multibox.data.policy import LoadReport, has_training_box, policy_report, trained_boxes
from multibox.errors import MultiboxError

try:  # torchvision's decoders are deprecated since 0.29 (TorchCodec); PIL is the fallback
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - depends on the torchvision build
    decode_image = None

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "Batch",
    "CocoDetection",
    "CocoFormatError",
    "ImageTooLargeError",
    "DetectionDataset",
    "ImageDecodeError",
    "ImageRecord",
    "collate_detection",
    "coco_structure_errors",
    "decode_image_rgb",
    "parse_coco_json",
    "pil_to_uint8_chw",
    "read_image_rgb",
    "training_target",
]

log = logging.getLogger("multibox.data")


# Decoded by torchvision (faster); every other format by PIL, which decodes only the first frame of an animation.
# Not PNG: torchvision 0.29's PNG decoder kills the process (SIGSEGV after "libpng error: bad adaptive filter value")
# on some corrupted PNGs, found by tests/test_fuzz.py; PIL refuses them with an exception.
_TORCHVISION_FORMATS = ("JPEG",)


class ImageDecodeError(OSError):
    """An image file that cannot be decoded (missing, empty, truncated, not an image)."""


class ImageTooLargeError(ImageDecodeError):
    """An image whose header declares more pixels than allowed (a decompression bomb or an absurd size)."""


# --------------------------------------------------------------------------- decoding


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """16-bit (or wider) samples -> 8 bit by scaling (x / 256), so bright images are not clipped to white."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.uint16:
        return (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.is_floating_point():
        return image.clamp(0, 255).round().to(torch.uint8)
    wide = image.to(torch.int64)
    if int(wide.max()) > 255:
        wide = wide >> 8
    return wide.clamp(0, 255).to(torch.uint8)


def _decode_with_pil(data: bytes) -> torch.Tensor:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return pil_to_uint8_chw(im)


def pil_to_uint8_chw(image) -> torch.Tensor:
    """A PIL image in any mode -> uint8 (3, H, W) RGB, as files are decoded: EXIF orientation applied; 16-bit and
    float samples scaled to 8 bit and repeated over three channels; every other mode converted by PIL (alpha
    dropped)."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        wide = _to_uint8(torch.from_numpy(np.asarray(image).astype(np.int64 if image.mode != "F" else np.float32)))
        return wide.unsqueeze(0).expand(3, -1, -1).contiguous()
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def probe_image_header(data: bytes | bytearray | memoryview, name: str = "<bytes>",
                       max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[str, int, int]:
    """Read only the header of an encoded image: ``(format, width, height)`` (PIL's format name, stored size).

    Raises :class:`ImageDecodeError` when the bytes are not an image PIL recognises, and
    :class:`ImageTooLargeError` when ``width * height > max_pixels`` (None: no limit; PIL's own decompression-bomb
    limit, twice ``PIL.Image.MAX_IMAGE_PIXELS``, still applies), before anything is decoded.
    """
    import io

    from PIL import Image

    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our own limit decides
            with Image.open(io.BytesIO(data)) as im:
                fmt, (width, height) = str(im.format), im.size
    except Image.DecompressionBombError as err:   # PIL's own limit (2 x PIL.Image.MAX_IMAGE_PIXELS) came first
        raise ImageTooLargeError(f"{name}: refused before decoding: {err} (a decompression bomb?)") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image (no known image format starts this way)") from None
    except Exception as err:   # assorted errors from broken headers
        raise ImageDecodeError(f"{name}: not an image ({type(err).__name__}: {err})") from None
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"{name}: refused: the header declares {width}x{height} = "
                                 f"{width * height / 1e6:.1f} Mpx, above data.max_image_pixels = "
                                 f"{max_pixels / 1e6:.1f} Mpx (a decompression bomb?); raise the limit if it is real")
    return fmt, width, height


def decode_image_rgb(data: bytes | bytearray | memoryview, name: str = "<bytes>",
                     max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode encoded image bytes to uint8 (3, H, W) RGB, honouring the EXIF orientation.

    The header is read first (:func:`probe_image_header`): more than ``max_pixels`` pixels is refused with
    :class:`ImageTooLargeError` before decoding. JPEG goes to torchvision's native decoder (fast), the rest (and
    what it fails on) to PIL (first frame of an animation; PNG too, see ``_TORCHVISION_FORMATS``). 16-bit images
    are scaled to 8 bit. Raises
    :class:`ImageDecodeError` naming ``name`` when the bytes cannot be decoded.
    """
    fmt, _, _ = probe_image_header(data, name, max_pixels)
    if decode_image is not None and fmt in _TORCHVISION_FORMATS:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # see the import above
                return _to_uint8(decode_image(buf, mode=ImageReadMode.RGB, apply_exif_orientation=True))
        except (TypeError, RuntimeError, ValueError):  # old signature / unsupported format / broken file
            pass
    try:
        return _decode_with_pil(bytes(data))
    except Exception as err:  # PIL raises OSError, UnidentifiedImageError, ValueError, SyntaxError, ...
        raise ImageDecodeError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None


def read_image_rgb(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode an image file to uint8 (3, H, W) RGB, honouring its EXIF orientation (see :func:`decode_image_rgb`)."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_image_rgb(data, str(path), max_pixels)


# --------------------------------------------------------------------------- records and policy


@dataclass
class ImageRecord:
    """One image and its annotations as the source states them (after load-time cleaning).

    ``bbox_ltwh`` is COCO's ``[left, top, width, height]`` in pixels (float64, (n, 4)); ``crowd`` marks boxes
    that training leaves out and evaluation ignores (COCO ``iscrowd``, VOC ``difficult``).
    ``width``/``height`` are the annotation's image size (0 when unknown); the decoded size rules in training.
    """

    image_id: int
    file_name: str
    width: int
    height: int
    ann_ids: np.ndarray          # (n,) int64
    bbox_ltwh: np.ndarray        # (n, 4) float64
    areas: np.ndarray            # (n,) float64
    category_ids: np.ndarray     # (n,) int64
    crowd: np.ndarray            # (n,) bool

    @property
    def num_boxes(self) -> int:
        return int(self.ann_ids.shape[0])

    @staticmethod
    def empty_arrays() -> dict[str, np.ndarray]:
        return {"ann_ids": np.zeros(0, np.int64), "bbox_ltwh": np.zeros((0, 4), np.float64),
                "areas": np.zeros(0, np.float64), "category_ids": np.zeros(0, np.int64),
                "crowd": np.zeros(0, bool)}

    @staticmethod
    def arrays_from_rows(rows: list[tuple]) -> dict[str, np.ndarray]:
        """Rows of (ann_id, left, top, width, height, area, category_id, crowd) -> the record's arrays."""
        if not rows:
            return ImageRecord.empty_arrays()
        cols = list(zip(*rows))
        return {"ann_ids": np.asarray(cols[0], np.int64), "bbox_ltwh": np.asarray(cols[1:5], np.float64).T.copy(),
                "areas": np.asarray(cols[5], np.float64), "category_ids": np.asarray(cols[6], np.int64),
                "crowd": np.asarray(cols[7], bool)}


def trained_rows(record: ImageRecord, category_id_to_label: dict[int, int], width: int, height: int,
                 keep_crowd: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The policy for boxes: ltwh -> xyxy, crowd left out, the boxes :func:`~multibox.data.policy.classify_boxes`
    drops at (width, height) dropped, the rest clipped to the image.

    Returns the (n,) mask of the record's boxes kept, their float64 (k, 4) xyxy pixels and int64 (k,) labels.
    """
    keep = trained_boxes(record, width, height, keep_crowd)
    xyxy = ltwh_to_xyxy(record.bbox_ltwh[keep])  # numpy float64, as COCO's own maths
    xyxy[:, 0::2] = xyxy[:, 0::2].clip(0.0, float(width))
    xyxy[:, 1::2] = xyxy[:, 1::2].clip(0.0, float(height))
    labels = np.asarray([category_id_to_label[int(c)] for c in record.category_ids[keep]], np.int64)
    return keep, xyxy.reshape(-1, 4), labels


def training_target(record: ImageRecord, category_id_to_label: dict[int, int], width: int, height: int,
                    keep_crowd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`trained_rows` as training takes them: ``boxes`` float32 (k, 4) xyxy pixels, ``labels`` int64 (k,)."""
    _, xyxy, labels = trained_rows(record, category_id_to_label, width, height, keep_crowd)
    return torch.from_numpy(xyxy.astype(np.float32)), torch.from_numpy(labels)


# --------------------------------------------------------------------------- base dataset


class DetectionDataset(Dataset):
    """Base class of every multibox detection dataset (COCO, VOC, packed shards).

    Subclasses fill ``records``, ``categories`` and implement :meth:`read_bytes` / :meth:`describe`.

    Attributes:
        class_names: ``["background", name_1, ..., name_C]`` (contiguous label order).
        categories: the source's categories as COCO dicts (``id``, ``name``, ...), label order.
        label_to_category_id: contiguous label (1..C) -> category id; ``category_id_to_label`` the inverse.
        image_ids: image ids in dataset order.
        load_report: a :class:`~multibox.data.policy.LoadReport`: counts of what loading dropped or will change
            (see the module docstring), with example ids.
        source_kind: ``"coco"``, ``"voc"`` or ``"shards"`` (``"voc"``: VOC metrics apply).
        source_name: the source file or folder, for messages.
    """

    source_kind = "coco"
    source_name = "<dataset>"
    keep_crowd = False
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS   # data.max_image_pixels (set by data.build)
    box_label: tuple[str, str] | None = None   # what _box_name's names are (None: annotation ids)

    def _init_index(self, categories: Sequence[dict], records: list[ImageRecord], transform: Callable | None,
                    report: Counter | None = None) -> None:
        """Set the index; ``load_report`` = ``report`` (what loading dropped) + :func:`policy_report` of
        ``records`` (what training will do to their boxes)."""
        self.categories = [dict(c) for c in categories]
        self.label_to_category_id: dict[int, int] = label_to_category_id([int(c["id"]) for c in self.categories])
        self.category_id_to_label: dict[int, int] = {v: k for k, v in self.label_to_category_id.items()}
        self.class_names: list[str] = ["background"] + [str(c["name"]) for c in self.categories]
        self.records = records
        self.image_ids: list[int] = [r.image_id for r in records]
        self.transform = transform
        self.load_report = LoadReport(report or {})
        self.load_report.merge(policy_report(records, self.keep_crowd, self._box_name, self.box_label))
        self._warned: set[int] = set()

    # -- to implement
    def read_bytes(self, index: int) -> bytes:
        """The encoded image of sample ``index`` (raises OSError when it cannot be read)."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for messages (a file path, a shard row)."""
        return self.records[index].file_name

    def missing_images(self, indices: Iterable[int]) -> list[int]:
        """The ``indices`` whose image file is not there (without reading any); none for packed sources."""
        return []

    def image_locations(self) -> str:
        """Where the image files are looked for, for messages."""
        return self.source_name

    def _box_name(self, record: ImageRecord, k: int) -> Any:
        """How reports name box ``k`` of ``record`` (its annotation id)."""
        return int(record.ann_ids[k])

    def mark_reported(self, indices: Iterable[int]) -> None:
        """Images already reported as unreadable (in a summary): ``__getitem__`` skips them without a warning."""
        self._warned.update(int(i) for i in indices)

    # -- shared API
    @property
    def num_classes(self) -> int:
        """Number of object classes C (background excluded)."""
        return len(self.class_names) - 1

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> torch.Tensor:
        """Decoded uint8 (3, H, W) RGB image; raises :class:`ImageDecodeError` / OSError."""
        return decode_image_rgb(self.read_bytes(index), self.describe(index), self.max_image_pixels)

    def target(self, index: int, width: int, height: int) -> dict:
        boxes, labels = training_target(self.records[index], self.category_id_to_label, width, height,
                                        self.keep_crowd)
        return {"boxes": boxes, "labels": labels, "image_id": self.image_ids[index], "orig_size": (height, width)}

    def __getitem__(self, index: int):
        try:
            image = self.load_image(index)
        except OSError as err:  # includes ImageDecodeError and FileNotFoundError
            if index not in self._warned:
                self._warned.add(index)
                log.warning("skipping unreadable image %s (image id %s): %s", self.describe(index),
                            self.image_ids[index], err)
            return None
        height, width = int(image.shape[-2]), int(image.shape[-1])
        target = self.target(index, width, height)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def coco_gt(self) -> dict[str, Any]:
        """The evaluation ground truth as a COCO instances dict (valid for pycocotools / faster-coco-eval).

        Holds every loaded annotation (crowd / difficult ones with ``iscrowd=1``), boxes as the source states
        them (not clipped), so evaluating against it equals evaluating against the (cleaned) source.
        """
        images, annotations = [], []
        for r in self.records:
            images.append({"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height})
            for k in range(r.num_boxes):
                ann = {"id": int(r.ann_ids[k]), "image_id": r.image_id, "category_id": int(r.category_ids[k]),
                       "bbox": [float(v) for v in r.bbox_ltwh[k]], "area": float(r.areas[k]),
                       "iscrowd": int(r.crowd[k])}
                if self.source_kind == "voc":
                    ann["difficult"] = int(r.crowd[k])
                annotations.append(ann)
        return {"images": images, "annotations": annotations, "categories": [dict(c) for c in self.categories]}

    def content_digest(self, index: int) -> str:
        """A short digest of record ``index`` (id, file name, annotations): detects a changed source on resume."""
        r = self.records[index]
        h = zlib.crc32(f"{r.image_id}|{r.file_name}|{r.width}|{r.height}".encode())
        for arr in (r.ann_ids, r.bbox_ltwh, r.areas, r.category_ids, r.crowd):
            h = zlib.crc32(np.ascontiguousarray(arr).tobytes(), h)
        return f"{h:08x}"


# --------------------------------------------------------------------------- COCO


class CocoFormatError(MultiboxError, ValueError):
    """A COCO annotation file that cannot be read: not JSON (line and column given), not UTF-8, or a structure
    that is not COCO's (the message names the field and the item)."""


@dataclass(frozen=True)
class CocoIssue:
    """One structural problem: ``where`` like ``annotations[12].bbox``, the section and item index it concerns."""

    where: str
    message: str
    section: str
    index: int | None
    item_id: Any = None

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


_INT64 = 2**63


def _show(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value: Any) -> bool:
    """A JSON number that converts to a float (NaN / inf included: values, not structure)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, float) or (isinstance(value, int) and abs(value) < 2**1023)


def _is_int(value: Any) -> bool:
    """A JSON integer (``3`` or ``3.0``) that fits int64."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return False
    return -_INT64 <= value < _INT64


def parse_coco_json(data: bytes, source: str = "<json>") -> dict:
    """Decode a COCO instances file's bytes: a dict with an ``images`` list, or :class:`CocoFormatError`.

    Only the JSON syntax and the top level are checked here; :func:`coco_structure_errors` checks the items.
    """
    try:
        text = bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CocoFormatError(f"{source}: not a COCO JSON file: not UTF-8 text (byte {err.start})") from None
    try:
        coco = json.loads(text)
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{source}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise CocoFormatError(f"{source}: invalid COCO JSON: nested too deeply") from None
    if not isinstance(coco, dict):
        raise CocoFormatError(f"{source}: top level: expected a JSON object with 'images', 'annotations' and "
                              f"'categories', got {type(coco).__name__}")
    if "images" not in coco:
        raise CocoFormatError(f"{source}: images: missing (not a COCO instances file)")
    for key in ("images", "annotations", "categories"):
        if key in coco and not isinstance(coco[key], list):
            raise CocoFormatError(f"{source}: {key}: expected a list, got {_show(coco[key])}")
    return coco


def coco_structure_errors(coco: dict, limit: int | None = None) -> list[CocoIssue]:
    """Every structural problem of a parsed COCO dict (see :func:`parse_coco_json`), at most ``limit``.

    Checked: each category is an object with an integer ``id`` (``name`` a string or number); each image an object
    with an integer ``id``, a string ``file_name``, ``width``/``height`` absent, null or non-negative integers;
    each annotation an object with integer ``image_id`` and ``category_id``, a ``bbox`` of 4 numbers (NaN / inf
    are values, left to the data policy), ``area`` absent, null or a number, ``iscrowd`` absent, 0/1 or a boolean.
    """
    issues: list[CocoIssue] = []

    def add(where, message, section, index, item_id=None) -> bool:
        issues.append(CocoIssue(where, message, section, index, item_id))
        return limit is not None and len(issues) >= limit

    for section in ("categories", "images", "annotations"):
        items = coco.get(section, [])
        if not isinstance(items, list):
            if add(section, f"expected a list, got {_show(items)}", section, None):
                return issues
            continue
        for i, item in enumerate(items):
            where = f"{section}[{i}]"
            if not isinstance(item, dict):
                if add(where, f"expected an object, got {_show(item)}", section, i):
                    return issues
                continue
            problems: list[tuple[str, str]] = []
            if section == "categories":
                if not _is_int(item.get("id")):
                    problems.append(("id", _expected("an integer", item, "id")))
                if "name" in item and not (isinstance(item["name"], str) or _is_number(item["name"])):
                    problems.append(("name", f"expected a string, got {_show(item['name'])}"))
            elif section == "images":
                if not _is_int(item.get("id")):
                    problems.append(("id", _expected("an integer", item, "id")))
                if not isinstance(item.get("file_name"), str):
                    problems.append(("file_name", _expected("a string", item, "file_name")))
                for key in ("width", "height"):
                    value = item.get(key)
                    if value is not None and not (_is_int(value) and 0 <= value < 2**31):
                        problems.append((key, f"expected a non-negative integer, got {_show(value)}"))
            else:
                for key in ("image_id", "category_id"):
                    if not _is_int(item.get(key)):
                        problems.append((key, _expected("an integer", item, key)))
                bbox = item.get("bbox")
                if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                    problems.append(("bbox", _expected("4 numbers [left, top, width, height]", item, "bbox")))
                area = item.get("area")
                if area is not None and not _is_number(area):
                    problems.append(("area", f"expected a number, got {_show(area)}"))
                crowd = item.get("iscrowd")
                if crowd is not None and crowd not in (0, 1):
                    problems.append(("iscrowd", f"expected 0 or 1, got {_show(crowd)}"))
            item_id = item.get("id")
            for key, message in problems:
                if add(f"{where}.{key}", message, section, i, item_id if _is_int(item_id) else None):
                    return issues
    return issues


def _expected(what: str, item: dict, key: str) -> str:
    return f"expected {what}, got {_show(item[key])}" if key in item else f"missing (expected {what})"


def _raise_structure(issues: list[CocoIssue], source: str) -> None:
    if issues:
        more = f" (and more: `multibox check-data {source}` lists every problem)" if len(issues) > 1 else ""
        raise CocoFormatError(f"{source}: malformed COCO JSON: {issues[0]}{more}")


def _finite_bbox(bbox: Any) -> list[float] | None:
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return None
    return values


def index_coco(coco: dict, report: Counter) -> tuple[list[dict], list[ImageRecord]]:
    """Clean a loaded COCO instances dict into (categories sorted by id, records in file order).

    Dropped and counted in ``report``: duplicate category / image ids (first wins), annotations with an
    unknown image or category id, or a malformed / non-finite bbox. Duplicate or missing annotation ids are
    renumbered (after the largest id), counted too. A :class:`~multibox.data.policy.LoadReport` also gets
    example ids of each (the annotation ids as the file gives them; ``annotations[i]`` for one without).
    """
    notes = report if isinstance(report, LoadReport) else LoadReport()
    categories = _unique_categories(coco.get("categories", []), notes)
    images = _unique_images(coco.get("images", []), notes)
    per_image = _annotation_rows(coco.get("annotations", []), {int(img["id"]) for img in images},
                                 {c["id"] for c in categories}, notes)
    if notes is not report:
        report.update(notes)
    records: list[ImageRecord] = []
    for img in images:
        arrays = ImageRecord.arrays_from_rows(per_image.get(int(img["id"]), []))
        records.append(ImageRecord(int(img["id"]), str(img.get("file_name", "")), int(img.get("width") or 0),
                                   int(img.get("height") or 0), **arrays))
    return categories, records


def _unique_categories(raw: list[dict], report: LoadReport) -> list[dict]:
    """Categories sorted by id, a repeated id dropped (the first wins), as ``{"id", "name"[, "supercategory"]}``."""
    categories: list[dict] = []
    seen_cats: set[int] = set()
    for c in sorted(raw, key=lambda c: int(c["id"])):
        if int(c["id"]) in seen_cats:
            report.note("duplicate_category_ids", [int(c["id"])])
            continue
        seen_cats.add(int(c["id"]))
        categories.append({"id": int(c["id"]), "name": str(c.get("name", c["id"])),
                           **({"supercategory": c["supercategory"]} if "supercategory" in c else {})})
    return categories


def _unique_images(raw: list[dict], report: LoadReport) -> list[dict]:
    """Image entries in file order, a repeated id dropped (the first wins)."""
    images: list[dict] = []
    seen_imgs: set[int] = set()
    for img in raw:
        image_id = int(img["id"])
        if image_id in seen_imgs:
            report.note("duplicate_image_ids", [f"{image_id} {str(img.get('file_name', ''))!r}"])
            continue
        seen_imgs.add(image_id)
        images.append(img)
    return images


def _annotation_rows(anns: list[dict], image_ids: set[int], category_ids: set[int], report: LoadReport
                     ) -> dict[int, list[tuple]]:
    """image id -> ``ImageRecord.arrays_from_rows`` rows ``(ann id, left, top, width, height, area, category id,
    crowd)`` of its usable annotations, ids renumbered where missing or repeated."""
    good_ids = {a.get("id") for a in anns if isinstance(a.get("id"), int) and _is_int(a.get("id"))}
    next_id = int(max(good_ids, default=0)) + 1
    if next_id >= _INT64 - len(anns):   # renumbering after the largest id would overflow int64
        next_id = 1
    used_ids: set[int] = set()
    per_image: dict[int, list[tuple]] = {}
    for i, ann in enumerate(anns):
        ann_id = ann.get("id")
        given = int(ann_id) if _is_int(ann_id) else f"annotations[{i}]"   # how messages name it
        if not (isinstance(ann_id, int) and _is_int(ann_id)) or ann_id in used_ids:
            report.note("annotation_ids_renumbered", [given])
            while next_id in good_ids or next_id in used_ids:
                next_id += 1
            ann_id, next_id = next_id, next_id + 1
        used_ids.add(ann_id)
        image_id = ann.get("image_id")
        if image_id not in image_ids:
            report.note("annotations_unknown_image", [given])
            continue
        if ann.get("category_id") not in category_ids:
            report.note("annotations_unknown_category", [given])
            continue
        bbox = _finite_bbox(ann.get("bbox"))
        if bbox is None:
            report.note("annotations_bad_bbox", [given])
            continue
        area = ann.get("area")
        area = float(area) if isinstance(area, (int, float)) and math.isfinite(area) else bbox[2] * bbox[3]
        per_image.setdefault(int(image_id), []).append(
            (ann_id, *bbox, area, int(ann["category_id"]), bool(ann.get("iscrowd", 0))))
    return per_image


def coco_image_roots(ann_file: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched, in order, for the ``file_name`` entries of a COCO JSON.

    ``image_root`` when given, else the JSON's folder and its ``images/``. For a JSON named like COCO's own
    (``instances_<split>.json``) the split's folder comes next: ``<image_root>/<split>``, or, without
    ``image_root``, ``<split>/`` and ``images/<split>/`` beside the JSON's folder -- the official layout
    (``annotations/instances_val2017.json`` with ``val2017/``) works as unpacked, and one ``image_root`` serves
    both the train and the val JSON."""
    ann_file = Path(ann_file)
    roots = [Path(image_root)] if image_root is not None else [ann_file.parent, ann_file.parent / "images"]
    match = re.fullmatch(r"instances_(\w+)\.json", ann_file.name)
    if match is not None:
        split = match.group(1)
        roots += [Path(image_root) / split] if image_root is not None else \
            [ann_file.parent.parent / split, ann_file.parent.parent / "images" / split]
    return roots


class CocoDetection(DetectionDataset):
    """A torch ``Dataset`` over a COCO instances annotation file (COCO 2017 or any COCO-format export).

    Args:
        ann_file: path of the COCO JSON.
        image_root: folder the ``file_name`` entries are relative to. Default: the JSON's
            folder, then ``<JSON folder>/images``; see :func:`coco_image_roots`.
        keep_empty: keep images that have no box (background samples for training).
        transform: optional callable ``(image, target) -> (image, target)``.

    Category ids may be non-contiguous; labels follow the sorted ids, names are kept. See the module
    docstring for what happens to crowd, broken and out-of-image boxes and to unreadable images.
    """

    source_kind = "coco"

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        keep_empty: bool = True,
        transform: Callable | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        with open(self.ann_file, "rb") as f:
            coco = parse_coco_json(f.read(), str(self.ann_file))
        _raise_structure(coco_structure_errors(coco, limit=2), str(self.ann_file))
        self._roots = coco_image_roots(self.ann_file, image_root)
        self.source_name = str(self.ann_file)
        report = LoadReport()
        categories, records = index_coco(coco, report)
        if not keep_empty:
            usable = [has_training_box(r) for r in records]
            report.note("empty_images_dropped", [r.image_id for r, u in zip(records, usable) if not u])
            records = [r for r, u in zip(records, usable) if u]
        self._init_index(categories, records, transform, report)
        self._root_hint: Path | None = None

    @property
    def _file_names(self) -> list[str]:
        return [r.file_name for r in self.records]

    def _find(self, index: int) -> Path | None:
        """The image file of sample ``index`` under the first root holding it, or None."""
        name = self.records[index].file_name
        roots = self._roots if self._root_hint is None else [self._root_hint, *self._roots]
        for root in roots:
            path = root / name
            if path.is_file():
                self._root_hint = root
                return path
        return None

    def image_path(self, index: int) -> Path:
        """Path of the image file of sample ``index`` (first candidate root where it exists)."""
        path = self._find(index)
        if path is None:
            raise FileNotFoundError(f"image {self.records[index].file_name!r} (id {self.image_ids[index]}) not found "
                                    f"under {self.image_locations()}")
        return path

    def missing_images(self, indices: Iterable[int]) -> list[int]:
        return [i for i in indices if self._find(i) is None]

    def image_locations(self) -> str:
        return ", ".join(str(r) for r in self._roots)

    def read_bytes(self, index: int) -> bytes:
        with open(self.image_path(index), "rb") as f:
            return f.read()

    def describe(self, index: int) -> str:
        try:
            return str(self.image_path(index))
        except FileNotFoundError:
            return self.records[index].file_name


# --------------------------------------------------------------------------- batching


class Batch(tuple):
    """``(images, targets)`` from :func:`collate_detection`, plus ``skipped``: samples dropped as unreadable.

    Unpacks like a 2-tuple; survives DataLoader worker pickling and pinning (``pin_memory`` keeps ``skipped``).
    """

    skipped: int

    def __new__(cls, images: torch.Tensor, targets: list[dict], skipped: int = 0):
        self = super().__new__(cls, (images, targets))
        self.skipped = int(skipped)
        return self

    def __reduce__(self):
        return (Batch, (self[0], self[1], self.skipped))

    def pin_memory(self) -> "Batch":
        return Batch(self[0].pin_memory(), self[1], self.skipped)


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict] | None]) -> Batch:
    """Stack same-sized images to (B, 3, S, S); keep targets as a list of dicts; drop ``None`` samples.

    Returns a :class:`Batch` (``images, targets = batch``; ``batch.skipped`` = dropped samples). A batch whose
    samples were all dropped has images of shape (0, 3, 0, 0).
    """
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return Batch(torch.zeros(0, 3, 0, 0), [], skipped)
    images = [b[0] for b in kept]
    targets = [b[1] for b in kept]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"collate_detection needs equal image shapes (apply a resize transform); got {sorted(shapes)}")
    return Batch(torch.stack(images, 0), targets, skipped)
