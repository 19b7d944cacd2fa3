"""Pascal VOC detection data (``VOCdevkit/VOC2007`` layout), read into the common :class:`DetectionDataset` API.

Layout::

    ROOT/Annotations/<id>.xml       one XML per image (parsed with defusedxml: DTDs and entities refused)
    ROOT/JPEGImages/<id>.jpg
    ROOT/ImageSets/Main/<split>.txt image ids of a split (trainval, test, train, val)

``ROOT`` may also be a ``VOCdevkit`` folder holding exactly one ``VOC20xx`` folder.

Conventions:

* Boxes: VOC gives 1-based, inclusive pixel indices ``xmin..xmax``; the object covers the continuous interval
  ``[xmin - 1, xmax]`` in 0-based pixel coordinates, so ``bbox_ltwh = [xmin - 1, ymin - 1, xmax - xmin + 1,
  ymax - ymin + 1]``. Areas computed on these boxes equal the devkit's ``(x2 - x1 + 1)(y2 - y1 + 1)``.
* ``difficult`` objects are kept as crowd-like boxes: left out of the training targets (unless
  ``keep_difficult``), ``iscrowd=1`` and ``difficult=1`` in :meth:`coco_gt` so COCO evaluation ignores them, and
  ignored by the VOC protocol in :mod:`multibox.evaluation.voc`.
* Classes: the 20 VOC classes in their standard order (category id = label = 1..20) when every object name is
  one of them; otherwise the sorted names found (a custom VOC-style set), unless ``class_names`` is given.
* Image ids: the numeric VOC id (``2008_000123`` -> 2008000123) when all ids of the set are numeric and
  distinct that way; otherwise the position in the split list (1-based).
"""
from __future__ import annotations

import glob
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from multibox.data.coco import DetectionDataset, ImageRecord
from multibox.errors import MultiboxError

__all__ = ["VOC_CLASSES", "VOCDetection", "VocObject", "VocXmlError", "find_voc_root", "is_plain_id", "is_voc_root",
           "parse_voc_xml", "voc_class_names", "read_split_ids"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


class VocXmlError(MultiboxError, ValueError):
    """An annotation XML that cannot be parsed or lacks required fields."""


class VocObject(tuple):
    """(name, xmin, ymin, xmax, ymax, difficult) of one ``<object>``, VOC's 1-based inclusive pixel indices."""

    __slots__ = ()

    def __new__(cls, name: str, xmin: float, ymin: float, xmax: float, ymax: float, difficult: bool):
        return super().__new__(cls, (name, xmin, ymin, xmax, ymax, difficult))

    name = property(lambda self: self[0])
    difficult = property(lambda self: self[5])


def is_voc_root(path: str | os.PathLike) -> bool:
    return find_voc_root(path) is not None


def find_voc_root(path: str | os.PathLike) -> Path | None:
    """The year folder (holding ``Annotations/``) for ``path`` = that folder or a VOCdevkit with exactly one."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "Annotations").is_dir():
        return path
    years = [p for p in sorted(path.iterdir()) if p.is_dir() and (p / "Annotations").is_dir()]
    return years[0] if len(years) == 1 else None


def read_split_ids(root: Path, split: str) -> list[str]:
    """Image ids listed in ``ImageSets/Main/<split>.txt`` (first column; blank lines ignored)."""
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such VOC split (data.voc_split / data.val_split)")
    # errors="replace": a binary split file gives ids whose XML is missing (reported), not a crash
    return [line.split()[0] for line in path.read_text(errors="replace").splitlines() if line.split()]


def is_plain_id(stem: str) -> bool:
    """An image id usable as a file name in ``Annotations/`` and ``JPEGImages/``: no folder separators, no
    ``..``, no NUL (a split file must not reach files outside the VOC folder)."""
    return bool(stem) and stem not in (".", "..") and not any(c in stem for c in "/\\\0")


def _text(node, tag: str, xml_path: Path, required: bool = True) -> str | None:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise VocXmlError(f"{xml_path}: missing <{tag}>")
        return None
    return child.text.strip()


def parse_voc_xml(xml_path: str | os.PathLike) -> tuple[dict, list[VocObject], list[str]]:
    """Parse one annotation file safely.

    Returns ``(info, objects, problems)``: info = ``{"filename", "width", "height"}`` (0 when absent or not a
    sane size), objects with a readable box, and a message for each object that had to be skipped (missing name
    or bndbox, non-numeric coordinates). Raises :class:`VocXmlError` naming the file if it is not parseable XML,
    and refuses (never expands) entity declarations: "billion laughs" entity expansion and external entities
    (``<!ENTITY x SYSTEM "file:///etc/passwd">``) are hostile inputs, not annotations.
    """
    from defusedxml import ElementTree as ET
    from defusedxml.common import DefusedXmlException

    xml_path = Path(xml_path)
    try:
        # forbid_dtd: VOC annotations have no DOCTYPE; refusing every DTD also refuses every entity declaration.
        root = ET.parse(str(xml_path), forbid_dtd=True, forbid_entities=True, forbid_external=True).getroot()
    except DefusedXmlException as err:
        raise VocXmlError(f"{xml_path}: refused: the XML has a DTD or declares entities or external references "
                          f"({type(err).__name__}: {err}); annotation files need none, and expanding them is an "
                          "attack (billion laughs, external entities)") from None
    except (ET.ParseError, OSError, ValueError) as err:   # ValueError: e.g. a NUL byte in a split-file id
        raise VocXmlError(f"{xml_path}: unreadable annotation XML ({type(err).__name__}: {err})") from None
    size = root.find("size")

    def _int(tag: str) -> int:
        try:
            value = int(float(_text(size, tag, xml_path, required=False) or 0)) if size is not None else 0
        except (ValueError, OverflowError):   # "abc", "nan", "inf", "1e999"
            return 0
        return value if 0 <= value < 2**31 else 0

    info = {"filename": _text(root, "filename", xml_path, required=False), "width": _int("width"),
            "height": _int("height")}
    objects, problems = [], []
    for k, obj in enumerate(root.iter("object")):
        name = _text(obj, "name", xml_path, required=False)
        box = obj.find("bndbox")
        if name is None or box is None:
            problems.append(f"object #{k}: missing <name> or <bndbox>")
            continue
        try:
            coords = [float(_text(box, t, xml_path)) for t in ("xmin", "ymin", "xmax", "ymax")]
        except (VocXmlError, ValueError, TypeError) as err:
            problems.append(f"object #{k} ({name}): bad <bndbox> ({err})")
            continue
        difficult = _text(obj, "difficult", xml_path, required=False)
        objects.append(VocObject(name, *coords, difficult not in (None, "0", "false", "False")))
    return info, objects, problems


def voc_class_names(objects: Iterable[VocObject]) -> list[str]:
    """The 20 VOC classes (standard order) if every name is one of them, else the sorted names found."""
    names = {o.name for o in objects}
    return list(VOC_CLASSES) if names <= set(VOC_CLASSES) else sorted(names)


def _image_ids(stems: Sequence[str]) -> list[int]:
    digits = [s.replace("_", "") for s in stems]
    if all(d.isdigit() for d in digits):
        ids = [int(d) for d in digits]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(1, len(stems) + 1))


class VOCDetection(DetectionDataset):
    """Pascal VOC (or a VOC-style custom set) as a :class:`DetectionDataset`.

    Args:
        root: ``VOCdevkit/VOC2007``-style folder (or a VOCdevkit with one year in it).
        split: name of the ``ImageSets/Main`` list; None: every XML in ``Annotations/``.
        class_names: object classes in label order (default: see the module docstring).
        keep_difficult: also train on ``difficult`` boxes (default: no, as the usual SSD recipes).
        keep_empty: keep images without a usable box.
        transform: optional ``(image, target) -> (image, target)``.

    ``load_report`` counts unreadable XMLs (image dropped), skipped objects, unknown class names.
    ``xml_problems`` lists ``(xml path, message)`` for each of them.
    """

    source_kind = "voc"

    def __init__(self, root: str | os.PathLike, split: str | None = "trainval",
                 class_names: Sequence[str] | None = None, keep_difficult: bool = False, keep_empty: bool = True,
                 transform: Callable | None = None) -> None:
        found = find_voc_root(root)
        if found is None:
            raise FileNotFoundError(f"{root}: not a VOC folder (expected Annotations/, JPEGImages/, ImageSets/Main/)")
        self.root, self.split = found, split
        self.keep_crowd = bool(keep_difficult)
        if split is None:
            stems = sorted(p.stem for p in (found / "Annotations").glob("*.xml"))
        else:
            stems = read_split_ids(found, split)
        report: Counter = Counter()
        self.xml_problems: list[tuple[str, str]] = []
        parsed: list[tuple[str, dict, list[VocObject]]] = []
        for stem in stems:
            if not is_plain_id(stem):
                report["bad_split_ids_dropped"] += 1
                self.xml_problems.append((str(found / "ImageSets" / "Main" / f"{split}.txt"),
                                          f"image id {stem!r} is not a plain file name"))
                continue
            xml_path = found / "Annotations" / f"{stem}.xml"
            try:
                info, objects, problems = parse_voc_xml(xml_path)
            except VocXmlError as err:
                report["unreadable_xml_images_dropped"] += 1
                self.xml_problems.append((str(xml_path), str(err)))
                continue
            report["objects_skipped"] += len(problems)
            self.xml_problems += [(str(xml_path), p) for p in problems]
            parsed.append((stem, info, objects))
        if class_names is None:
            class_names = voc_class_names(o for _, _, objs in parsed for o in objs)
        label_of = {name: i + 1 for i, name in enumerate(class_names)}
        categories = [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(class_names)]

        ids = _image_ids([stem for stem, _, _ in parsed])
        records: list[ImageRecord] = []
        self.stems: list[str] = []
        next_ann = 1
        for image_id, (stem, info, objects) in zip(ids, parsed):
            rows = []
            for o in objects:
                if o.name not in label_of:
                    report["objects_unknown_class"] += 1
                    continue
                _, xmin, ymin, xmax, ymax, difficult = o
                w, h = xmax - xmin + 1.0, ymax - ymin + 1.0
                rows.append((next_ann, xmin - 1.0, ymin - 1.0, w, h, w * h, label_of[o.name], difficult))
                next_ann += 1
            arrays = ImageRecord.arrays_from_rows(rows)
            record = ImageRecord(image_id, f"JPEGImages/{stem}.jpg", info["width"], info["height"], **arrays)
            if not keep_empty and not (~record.crowd if not self.keep_crowd else np.ones(record.num_boxes, bool)).any():
                report["empty_images_dropped"] += 1
                continue
            records.append(record)
            self.stems.append(stem)
        self._init_index(categories, records, transform, report)

    def image_path(self, index: int) -> Path:
        path = self.root / self.records[index].file_name
        if not path.is_file():  # some VOC-style exports use .png / .jpeg
            for alt in sorted((self.root / "JPEGImages").glob(f"{glob.escape(self.stems[index])}.*")):
                return alt
        return path

    def read_bytes(self, index: int) -> bytes:
        with open(self.image_path(index), "rb") as f:
            return f.read()

    def describe(self, index: int) -> str:
        return str(self.image_path(index))
