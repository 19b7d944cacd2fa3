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
from pathlib import Path
from typing import Callable, Iterable, Sequence

from multibox.data.coco import DetectionDataset, ImageRecord
from multibox.data.policy import LoadReport, has_training_box
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
    box_label = ("object", "objects")   # reports name boxes "<image id>#<k>", as check-data does

    def __init__(self, root: str | os.PathLike, split: str | None = "trainval",
                 class_names: Sequence[str] | None = None, keep_difficult: bool = False, keep_empty: bool = True,
                 transform: Callable | None = None) -> None:
        found = find_voc_root(root)
        if found is None:
            raise FileNotFoundError(f"{root}: not a VOC folder (expected Annotations/, JPEGImages/, ImageSets/Main/)")
        self.root, self.split = found, split
        self.source_name = f"{found} ({split} split)" if split else str(found)
        self.keep_crowd = bool(keep_difficult)
        if split is None:
            stems = sorted(p.stem for p in (found / "Annotations").glob("*.xml"))
        else:
            stems = read_split_ids(found, split)
        report = LoadReport()
        parsed = self._parse(stems, report)
        if class_names is None:
            class_names = voc_class_names(o for _, _, objs in parsed for o in objs)
        categories = [{"id": i + 1, "name": n, "supercategory": "none"} for i, n in enumerate(class_names)]
        records = self._records(parsed, {name: i + 1 for i, name in enumerate(class_names)}, keep_empty, report)
        self._init_index(categories, records, transform, report)

    def _parse(self, stems: list[str], report: LoadReport) -> list[tuple[str, dict, list[VocObject]]]:
        """``(stem, info, objects)`` of each readable XML; what is refused goes to ``report`` / ``xml_problems``."""
        self.xml_problems: list[tuple[str, str]] = []
        parsed: list[tuple[str, dict, list[VocObject]]] = []
        for stem in stems:
            if not is_plain_id(stem):
                report.note("bad_split_ids_dropped", [repr(stem)])
                self.xml_problems.append((str(self.root / "ImageSets" / "Main" / f"{self.split}.txt"),
                                          f"image id {stem!r} is not a plain file name"))
                continue
            xml_path = self.root / "Annotations" / f"{stem}.xml"
            try:
                info, objects, problems = parse_voc_xml(xml_path)
            except VocXmlError as err:
                report.note("unreadable_xml_images_dropped", [stem])
                self.xml_problems.append((str(xml_path), str(err)))
                continue
            report.note("objects_skipped", [f"{stem}.xml"] * len(problems), label=("in", "in"))
            self.xml_problems += [(str(xml_path), p) for p in problems]
            parsed.append((stem, info, objects))
        return parsed

    def _records(self, parsed: list[tuple[str, dict, list[VocObject]]], label_of: dict[str, int], keep_empty: bool,
                 report: LoadReport) -> list[ImageRecord]:
        """One record per parsed image (annotation ids numbered from 1; ``stem#k`` names object k in reports)."""
        records: list[ImageRecord] = []
        self.stems: list[str] = []
        self._object_names: list[str] = []   # annotation id - 1 -> "stem#k"
        for image_id, (stem, info, objects) in zip(_image_ids([stem for stem, _, _ in parsed]), parsed):
            rows = []
            for k, o in enumerate(objects):
                if o.name not in label_of:
                    report.note("objects_unknown_class", [f"{stem}#{k}"])
                    continue
                _, xmin, ymin, xmax, ymax, difficult = o
                w, h = xmax - xmin + 1.0, ymax - ymin + 1.0
                self._object_names.append(f"{stem}#{k}")
                rows.append((len(self._object_names), xmin - 1.0, ymin - 1.0, w, h, w * h, label_of[o.name],
                             difficult))
            record = ImageRecord(image_id, f"JPEGImages/{stem}.jpg", info["width"], info["height"],
                                 **ImageRecord.arrays_from_rows(rows))
            if not keep_empty and not has_training_box(record, self.keep_crowd):
                report.note("empty_images_dropped", [stem], label=("image", "images"))
                continue
            records.append(record)
            self.stems.append(stem)
        return records

    def _box_name(self, record: ImageRecord, k: int) -> str:
        return self._object_names[int(record.ann_ids[k]) - 1]

    def missing_images(self, indices: Iterable[int]) -> list[int]:
        return [i for i in indices if not self.image_path(i).is_file()]

    def image_locations(self) -> str:
        return str(self.root / "JPEGImages")

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
