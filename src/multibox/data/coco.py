"""COCO-format detection dataset (instances JSON + image folder).

Sample convention (shared across multibox): ``(image, target)`` with
``image`` uint8 (3, H, W) RGB and ``target`` a dict with
``boxes`` float32 (n, 4) xyxy pixels, ``labels`` int64 (n,) in 1..C (0 = background),
``image_id`` int and ``orig_size`` (H, W).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

try:  # torchvision's decoders are deprecated since 0.29 (TorchCodec); PIL is the fallback
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - depends on the torchvision build
    decode_image = None

__all__ = ["CocoDetection", "collate_detection", "read_image_rgb"]


def _read_with_pil(path: str | os.PathLike) -> torch.Tensor:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        arr = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_image_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to uint8 (3, H, W) RGB, honouring its EXIF orientation.

    Uses torchvision's native decoder (fast, no PIL round trip); falls back to PIL for
    formats it cannot decode (BMP, TIFF, ...) or torchvision builds without it.
    """
    if decode_image is not None:
        with open(path, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # see the import above
                return decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except (TypeError, RuntimeError):  # old signature / unsupported format / no image ops
            pass
    return _read_with_pil(path)


class CocoDetection(Dataset):
    """A torch ``Dataset`` over a COCO instances annotation file.

    Args:
        ann_file: path of the COCO JSON.
        image_root: folder the ``file_name`` entries are relative to. Default: the JSON's
            folder, then ``<JSON folder>/images``.
        keep_empty: keep images that have no usable box (they are negatives for training).
        transform: optional callable ``(image, target) -> (image, target)``.

    Attributes:
        class_names: ``["background", name_1, ..., name_C]`` (contiguous label order).
        label_to_category_id: contiguous label (1..C) -> COCO category id.
        category_id_to_label: the inverse map.
        image_ids: COCO image ids in dataset order.

    Category ids may be non-contiguous; labels follow the sorted ids. Crowd annotations
    (``iscrowd=1``) and boxes with non-positive width/height are ignored; boxes are clipped
    to the decoded image.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        keep_empty: bool = True,
        transform: Callable | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        with open(self.ann_file, "rb") as f:
            coco = json.load(f)
        self.transform = transform
        if image_root is not None:
            self._roots = [Path(image_root)]
        else:
            self._roots = [self.ann_file.parent, self.ann_file.parent / "images"]

        categories = sorted(coco.get("categories", []), key=lambda c: c["id"])
        self.label_to_category_id: dict[int, int] = {i + 1: int(c["id"]) for i, c in enumerate(categories)}
        self.category_id_to_label: dict[int, int] = {v: k for k, v in self.label_to_category_id.items()}
        self.class_names: list[str] = ["background"] + [str(c["name"]) for c in categories]

        # Gather usable boxes per image once, as compact arrays (fast __getitem__, small memory).
        per_image: dict[int, list[tuple[float, float, float, float, int]]] = {}
        for ann in coco.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            left, top, w, h = (float(v) for v in ann["bbox"])
            if not (w > 0 and h > 0):  # also rejects NaN
                continue
            label = self.category_id_to_label.get(int(ann["category_id"]))
            if label is None:
                continue  # unknown category: nothing sensible to learn from it
            per_image.setdefault(int(ann["image_id"]), []).append((left, top, left + w, top + h, label))

        self.image_ids: list[int] = []
        self._file_names: list[str] = []
        self._boxes_xyxy: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        for img in coco.get("images", []):
            image_id = int(img["id"])
            rows = per_image.get(image_id, [])
            if not rows and not keep_empty:
                continue
            arr = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
            self.image_ids.append(image_id)
            self._file_names.append(str(img["file_name"]))
            self._boxes_xyxy.append(arr[:, :4].astype(np.float32))
            self._labels.append(arr[:, 4].astype(np.int64))
        self._root_hint: Path | None = None

    @property
    def num_classes(self) -> int:
        """Number of object classes C (background excluded)."""
        return len(self.class_names) - 1

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        """Path of the image file of sample ``index`` (first candidate root where it exists)."""
        name = self._file_names[index]
        roots = self._roots if self._root_hint is None else [self._root_hint, *self._roots]
        for root in roots:
            path = root / name
            if path.is_file():
                self._root_hint = root
                return path
        raise FileNotFoundError(
            f"image {name!r} (id {self.image_ids[index]}) not found under " + ", ".join(str(r) for r in self._roots)
        )

    def __getitem__(self, index: int):
        image = read_image_rgb(self.image_path(index))
        height, width = int(image.shape[-2]), int(image.shape[-1])
        boxes = torch.from_numpy(self._boxes_xyxy[index].copy())
        labels = torch.from_numpy(self._labels[index].copy())
        if boxes.numel():
            boxes[:, 0::2].clamp_(0.0, float(width))
            boxes[:, 1::2].clamp_(0.0, float(height))
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = boxes[keep], labels[keep]
        target = {
            "boxes": boxes.reshape(-1, 4),
            "labels": labels,
            "image_id": self.image_ids[index],
            "orig_size": (height, width),
        }
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Stack same-sized images to (B, 3, S, S); keep targets as a list of dicts."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"collate_detection needs equal image shapes (apply a resize transform); got {sorted(shapes)}")
    return torch.stack(images, 0), targets
