"""``multibox check-data SRC``: find every problem of a dataset, with its file and annotation id.

Sources: a COCO instances JSON (images next to it, under ``images/`` or under ``--image-root``), a Pascal VOC
folder, or a packed-shard folder (checksums and every row are verified, its boxes checked as COCO's are).

Problem kinds (``Problem.kind``) and what training does about them (the policy of :mod:`multibox.data.coco`; the
box kinds are decided by :func:`multibox.data.policy.classify_boxes`, the rule training applies, judged at the
annotated image size):

======================  ========  =================================================================
kind                    severity  training
======================  ========  =================================================================
missing_image           error     image skipped (``Batch.skipped``)
unreadable_image        error     image skipped (empty file, not an image, undecodable)
truncated_image         error     image skipped
oversized_image         error     image skipped: its header declares more than ``data.max_image_pixels``
                                  pixels (a decompression bomb?); refused before decoding
wrong_extension         warning   decoded by content (a PNG named .jpg)
bad_annotation_file     error     (VOC XML / shard / COCO JSON) image, shard or whole file unusable (invalid
                                  JSON with line and column, XML entity declarations, ...)
malformed_annotation    error     (COCO) the file is refused (``CocoFormatError``): an item of the wrong
                                  JSON type, named by its field, e.g. ``annotations[12].bbox``
duplicate_image_id      error     later image with the id ignored
duplicate_category_id   error     later category with the id ignored
duplicate_annotation_id warning   renumbered
unknown_image_id        error     annotation dropped
unknown_category_id     error     annotation dropped
nan_box                 error     annotation dropped (NaN / inf / malformed bbox)
zero_size_box           warning   box dropped (width or height 0)
negative_box            warning   box dropped (negative width or height)
out_of_image_box        warning   box clipped to the image (dropped if nothing is left)
size_mismatch           warning   boxes clipped to the decoded size
exif_rotated            warning   EXIF orientation applied before use
grayscale_image         warning   converted to RGB
palette_image           warning   converted to RGB
rgba_image              warning   alpha channel dropped
cmyk_image              warning   converted to RGB
16bit_image             warning   scaled to 8 bit (x / 256)
unknown_class_name      warning   (VOC) a name outside the 20 VOC classes in a set that uses them: the set
                                  is then read as a custom one (sorted names found): a typo?
no_usable_images        error     the whole set refused: it lists no images, or none of them can be read
dropped_at_conversion   warning   (shards) not in the shards: an image unreadable when ``multibox convert``
                                  packed them, or what loading the source dropped (unknown categories, ...)
======================  ========  =================================================================
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Not multibox.data.coco at import time (it imports torch): the image-checking worker processes import this module,
# and stay ~600 MB smaller without torch; check_coco imports it when it runs.
from multibox.config import DEFAULT_MAX_IMAGE_PIXELS
from multibox.data.imagecheck import image_check_pool, inspect_image_bytes, worker_count
from multibox.data.policy import (BOX_CLIPPED, BOX_KEPT, BOX_NEGATIVE, BOX_NONFINITE, BOX_OUTSIDE, BOX_ZERO_SIZE,
                                  classify_boxes)

__all__ = ["Problem", "Report", "check_dataset", "check_coco", "check_voc", "check_shards", "inspect_image_bytes"]

SEVERITY = {
    "missing_image": "error", "unreadable_image": "error", "truncated_image": "error",
    "oversized_image": "error", "wrong_extension": "warning", "malformed_annotation": "error",
    "bad_annotation_file": "error", "duplicate_image_id": "error", "duplicate_category_id": "error",
    "duplicate_annotation_id": "warning", "unknown_image_id": "error", "unknown_category_id": "error",
    "nan_box": "error", "zero_size_box": "warning", "negative_box": "warning", "out_of_image_box": "warning",
    "size_mismatch": "warning", "exif_rotated": "warning", "grayscale_image": "warning",
    "palette_image": "warning", "rgba_image": "warning", "cmyk_image": "warning", "16bit_image": "warning",
    "unknown_class_name": "warning", "dropped_at_conversion": "warning", "no_usable_images": "error",
}


@dataclass
class Problem:
    """One finding. ``file``: the image (or annotation/shard) file it concerns; ids where they apply."""

    kind: str
    file: str
    message: str
    image_id: Any = None
    ann_id: Any = None

    @property
    def severity(self) -> str:
        return SEVERITY.get(self.kind, "error")

    def __str__(self) -> str:
        where = self.file
        if self.ann_id is not None:
            where += f" [annotation {self.ann_id}]"
        elif self.image_id is not None:
            where += f" [image {self.image_id}]"
        return f"{self.severity}: {where}: {self.kind}: {self.message}"


@dataclass
class Report:
    source: str
    kind: str
    num_images: int = 0
    num_annotations: int = 0
    problems: list[Problem] = field(default_factory=list)

    def add(self, kind: str, file: str | os.PathLike, message: str, image_id=None, ann_id=None) -> None:
        self.problems.append(Problem(kind, str(file), message, image_id, ann_id))

    @property
    def counts(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    @property
    def num_errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    def by_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def summary(self) -> str:
        lines = [f"{self.source} ({self.kind}): {self.num_images} images, {self.num_annotations} annotations, "
                 f"{self.num_errors} errors, {len(self.problems) - self.num_errors} warnings"]
        for kind, n in sorted(self.counts.items()):
            lines.append(f"  {kind:<24} {SEVERITY.get(kind, 'error'):<8} {n}")
        if not self.problems:
            lines.append("  no problems found")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"source": self.source, "kind": self.kind, "num_images": self.num_images,
                "num_annotations": self.num_annotations, "counts": dict(self.counts),
                "problems": [{**asdict(p), "severity": p.severity} for p in self.problems]}


# --------------------------------------------------------------------------- images

# Which file name suffixes each PIL format is expected under (a PNG named .jpg is reported, and decoded anyway).
_FORMAT_SUFFIXES = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"}, "MPO": {".jpg", ".jpeg", ".mpo"}, "PNG": {".png"},
    "GIF": {".gif"}, "BMP": {".bmp", ".dib"}, "TIFF": {".tif", ".tiff"}, "WEBP": {".webp"}, "AVIF": {".avif"},
    "PPM": {".ppm", ".pgm", ".pbm", ".pnm"}, "JPEG2000": {".jp2", ".j2k", ".jpx"},
}
_IMAGE_SUFFIXES = set().union(*_FORMAT_SUFFIXES.values())


def _check_image_file(path: Path | None, name: str, image_id, expected_wh: tuple[int, int] | None,
                      read=None, file_name: str | None = None,
                      max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, full_decode: bool = False) -> list[Problem]:
    """Problems of one image (``read`` overrides how bytes are fetched, e.g. from a shard; ``file_name`` is the
    name whose suffix must match the content, default ``name``)."""
    if read is None:
        if path is None or not path.is_file():
            return [Problem("missing_image", name, "image file not found", image_id)]
        try:
            data = path.read_bytes()
        except OSError as err:
            return [Problem("unreadable_image", str(path), f"cannot read ({err})", image_id)]
        where = str(path)
    else:
        try:
            data, where = read()
        except Exception as err:
            return [Problem("unreadable_image", name, str(err), image_id)]
    info, found = inspect_image_bytes(data, max_pixels, full_decode)
    out = [Problem(kind, where, msg, image_id) for kind, msg in found]
    suffix = Path(file_name or name).suffix.lower()
    fmt = info.get("format")
    if fmt in _FORMAT_SUFFIXES and suffix in _IMAGE_SUFFIXES and suffix not in _FORMAT_SUFFIXES[fmt]:
        out.append(Problem("wrong_extension", where, f"the file is a {fmt} image named {suffix}; decoded by its "
                                                     "content", image_id))
    if "size" in info and expected_wh and all(expected_wh) and not any(
            k in ("unreadable_image", "truncated_image", "oversized_image") for k, _ in found):
        w, h = info["size"]
        if (w, h) != tuple(expected_wh):
            rotated = info["orientation"] != 1 and info["raw_size"] == tuple(expected_wh)
            hint = " (the annotation has the stored, un-rotated size: check the boxes' frame)" if rotated else ""
            out.append(Problem("size_mismatch", where, f"annotation says {expected_wh[0]}x{expected_wh[1]}, "
                                                       f"image is {w}x{h}{hint}", image_id))
    return out


# Images per task handed to a worker: large enough that the pickling round trip is noise next to ~2 ms of
# decoding per image, small enough that the progress bar moves and the cores finish together.
CHUNK = 64
Progress = Callable[[int, int], None]   # progress(done, total): images checked so far, images to check


def _check_chunk(jobs: list[tuple], max_pixels: int | None, full_decode: bool) -> list[list[Problem]]:
    """The problems of each job of ``jobs`` (runs in a worker process: top level, so it pickles)."""
    return [_check_image_file(*job, max_pixels=max_pixels, full_decode=full_decode) for job in jobs]


def _run_image_checks(jobs: list[tuple], workers: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                      progress: Progress | None = None, full_decode: bool = False) -> list[Problem]:
    """Check every image of ``jobs`` (``_check_image_file`` arguments) on ``workers`` cores (0: all of them);
    problems in the order of ``jobs`` whatever the number of workers. ``progress(done, total)`` after each chunk."""
    workers = worker_count(workers)
    chunks = [jobs[k: k + CHUNK] for k in range(0, len(jobs), CHUNK)]
    out: list[Problem] = []
    done = 0
    if progress is not None:
        progress(0, len(jobs))
    if workers <= 1 or len(chunks) <= 1:
        results = (_check_chunk(chunk, max_pixels, full_decode) for chunk in chunks)
        pool = None
    else:
        readers = any(len(job) > 4 and job[4] is not None for job in jobs)   # closures over an open shard
        pool = image_check_pool(min(workers, len(chunks)), picklable=not readers)
        results = pool.map(_check_chunk, chunks, [max_pixels] * len(chunks), [full_decode] * len(chunks))
    try:
        for chunk, found in zip(chunks, results):
            out += [p for ps in found for p in ps]
            done += len(chunk)
            if progress is not None:
                progress(done, len(jobs))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out


_BOX_KINDS = {BOX_CLIPPED: "out_of_image_box", BOX_OUTSIDE: "out_of_image_box", BOX_ZERO_SIZE: "zero_size_box",
              BOX_NEGATIVE: "negative_box", BOX_NONFINITE: "nan_box"}


def _box_problems(report: Report, boxes: list[tuple]) -> None:
    """Report what training does to each of ``boxes`` = ``[(file, image id, annotation id, ltwh, (w, h))]``: the
    rule is :func:`multibox.data.policy.classify_boxes` (the one training applies), judged at the annotated size."""
    if not boxes:
        return
    sizes = np.asarray([b[4] for b in boxes], np.float64).reshape(-1, 2)
    codes = classify_boxes([b[3] for b in boxes], sizes[:, 0], sizes[:, 1])
    for (file, image_id, ann_id, ltwh, (iw, ih)), code in zip(boxes, codes.tolist()):
        if code == BOX_KEPT:
            continue
        ltwh = [float(v) for v in ltwh]
        message = {BOX_ZERO_SIZE: f"bbox {ltwh} has zero width or height",
                   BOX_NEGATIVE: f"bbox {ltwh} has negative width or height",
                   BOX_NONFINITE: f"bbox {ltwh} is not four finite numbers",
                   BOX_OUTSIDE: f"bbox {ltwh} is entirely outside the {iw}x{ih} image",
                   BOX_CLIPPED: f"bbox {ltwh} is partly outside the {iw}x{ih} image"}[code]
        report.add(_BOX_KINDS[code], file, message, image_id, ann_id)


# --------------------------------------------------------------------------- COCO


def check_coco(ann_file: str | os.PathLike, image_root: str | os.PathLike | None = None, images: bool = True,
               workers: int = 0, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, progress: Progress | None = None,
               full_decode: bool = False) -> Report:
    """Every problem of a COCO-format dataset (annotations, and image files unless ``images=False``).

    ``workers``: processes checking images (0: every core); ``progress(done, total)``: images checked so far;
    ``full_decode``: decode JPEGs at full size too (see ``_DRAFT_FORMATS``; the report is the same)."""
    from multibox.data.coco import CocoFormatError, coco_image_roots, parse_coco_json

    ann_file = Path(ann_file)
    report = Report(str(ann_file), "coco")
    try:
        coco = parse_coco_json(ann_file.read_bytes(), str(ann_file))
    except (OSError, CocoFormatError) as err:
        report.add("bad_annotation_file", ann_file, str(err))
        return report
    roots = coco_image_roots(ann_file, image_root or None)
    src = str(ann_file)
    sections = _well_formed_sections(report, coco, src)
    cat_ids = _check_categories(report, sections["categories"], src)
    image_info = _check_images_section(report, sections["images"], src)
    report.num_annotations = len(coco.get("annotations", []))
    _check_annotations(report, sections["annotations"], image_info, cat_ids, src)
    if images:
        def locate(name: str) -> Path | None:
            for root in roots:
                if (root / name).is_file():
                    return root / name
            return None
        jobs = [(locate(str(img.get("file_name", ""))), str(img.get("file_name", "")), iid,
                 (int(img.get("width") or 0), int(img.get("height") or 0))) for iid, img in image_info.items()]
        report.problems += _run_image_checks(jobs, workers, max_pixels, progress, full_decode)
    _require_usable(report, images, ", ".join(str(r) for r in roots))
    return report


def _well_formed_sections(report: Report, coco: dict, src: str) -> dict[str, list[dict]]:
    """Items of the wrong JSON shape are reported by field (training refuses the file) and left out of the
    checks: ``{"categories" | "images" | "annotations": [the well-formed items]}``."""
    from multibox.data.coco import coco_structure_errors

    issues = coco_structure_errors(coco)
    for issue in issues:
        report.add("malformed_annotation", src, str(issue), issue.item_id if issue.section == "images" else None,
                   issue.item_id if issue.section == "annotations" else None)
    bad = {(issue.section, issue.index) for issue in issues}
    return {key: [item for k, item in enumerate(coco.get(key, [])) if (key, k) not in bad]
            for key in ("categories", "images", "annotations")}


def _check_categories(report: Report, categories: list[dict], src: str) -> set:
    """Report repeated category ids; returns the set of category ids."""
    cat_ids: set = set()
    for c in categories:
        if c.get("id") in cat_ids:
            report.add("duplicate_category_id", src, f"category id {c.get('id')} ({c.get('name')!r}) repeats")
        cat_ids.add(c.get("id"))
    return cat_ids


def _check_images_section(report: Report, images: list[dict], src: str) -> dict[Any, dict]:
    """Report repeated image ids (the first entry wins); returns image id -> entry and sets ``num_images``."""
    image_info: dict[Any, dict] = {}
    for img in images:
        iid = img.get("id")
        if iid in image_info:
            report.add("duplicate_image_id", img.get("file_name", src),
                       f"image id {iid} also used by {image_info[iid].get('file_name')!r}", iid)
            continue
        image_info[iid] = img
    report.num_images = len(image_info)
    return image_info


def _check_annotations(report: Report, annotations: list[dict], image_info: dict[Any, dict], cat_ids: set,
                       src: str) -> None:
    """Repeated annotation ids, then per annotation: unknown image / category, non-finite or bad boxes."""
    ann_ids: Counter = Counter(_hashable(a.get("id")) for a in annotations)
    for ann_id, n in ann_ids.items():
        if n > 1:
            report.add("duplicate_annotation_id", src, f"annotation id {ann_id} is used {n} times", None, ann_id)
    boxes = []
    for ann in annotations:
        aid, iid = _hashable(ann.get("id")), ann.get("image_id")
        img = image_info.get(iid)
        file = img.get("file_name", src) if img else src
        if img is None:
            report.add("unknown_image_id", src, f"image id {iid!r} is not in 'images'", iid, aid)
            continue
        if ann.get("category_id") not in cat_ids:
            report.add("unknown_category_id", file, f"category id {ann.get('category_id')!r} is not in 'categories'",
                       iid, aid)
        bbox = ann.get("bbox")
        try:
            values = [float(v) for v in bbox]
            ok = len(values) == 4 and all(math.isfinite(v) for v in values)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            report.add("nan_box", file, f"bbox {bbox!r} is not four finite numbers", iid, aid)
            continue
        boxes.append((file, iid, aid, values, (int(img.get("width") or 0), int(img.get("height") or 0))))
    _box_problems(report, boxes)


def _hashable(value: Any) -> Any:
    """An annotation id as given (any JSON value): lists / objects as their JSON text, so they can be counted."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


# --------------------------------------------------------------------------- VOC


def check_voc(root: str | os.PathLike, split: str | None = None, images: bool = True, workers: int = 0,
              max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, progress: Progress | None = None,
              full_decode: bool = False) -> Report:
    """Every problem of a VOC-style folder (all XMLs of ``Annotations/``, or those of one split)."""
    import glob

    from multibox.data.voc import VOC_CLASSES, find_voc_root, read_split_ids

    found = find_voc_root(root)
    report = Report(str(root), "voc")
    if found is None:
        report.add("bad_annotation_file", root, "not a VOC folder (no Annotations/)")
        return report
    try:
        stems = read_split_ids(found, split) if split else sorted(p.stem for p in (found / "Annotations").glob("*.xml"))
    except OSError as err:
        report.add("bad_annotation_file", found / "ImageSets" / "Main" / f"{split}.txt", str(err))
        return report
    parsed = _parse_voc_xmls(report, found, stems, split)
    names = {o.name for _, _, _, objs in parsed for o in objs}
    # Names outside the VOC classes in a set that otherwise uses them are likely typos ("persn").
    known = set(VOC_CLASSES) if names & set(VOC_CLASSES) else names
    jobs, boxes = [], []
    for stem, xml, info, objects in parsed:
        report.num_images += 1
        wh = (info["width"], info["height"])
        for k, o in enumerate(objects):
            report.num_annotations += 1
            if o.name not in known:
                report.add("unknown_class_name", xml, f"class {o.name!r} is not a VOC class; with it the set "
                           "is read as a custom one (classes = sorted names found)", stem, f"{stem}#{k}")
            _, xmin, ymin, xmax, ymax, _ = o
            boxes.append((str(xml), stem, f"{stem}#{k}", [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1], wh))
        image = found / "JPEGImages" / f"{stem}.jpg"
        if not image.is_file():
            image = next(iter(sorted((found / "JPEGImages").glob(f"{glob.escape(stem)}.*"))), image)
        jobs.append((image, str(image), stem, wh))
    _box_problems(report, boxes)
    if images:
        report.problems += _run_image_checks(jobs, workers, max_pixels, progress, full_decode)
    _require_usable(report, images, str(found / "JPEGImages"))
    return report


def _parse_voc_xmls(report: Report, found: Path, stems: list[str], split: str | None) -> list[tuple]:
    """Parse each listed annotation XML, reporting refused ids, missing / unreadable files and bad boxes;
    returns ``[(stem, xml path, info, objects)]`` of the readable ones."""
    from multibox.data.voc import VocXmlError, is_plain_id, parse_voc_xml

    parsed = []
    for stem in stems:
        if not is_plain_id(stem):
            where = found / "ImageSets" / "Main" / f"{split}.txt" if split else found / "Annotations"
            report.add("bad_annotation_file", where,
                       f"image id {stem!r} is not a plain file name (refused: it could point outside the VOC folder)")
            continue
        xml = found / "Annotations" / f"{stem}.xml"
        if not xml.is_file():
            report.add("bad_annotation_file", xml, "annotation XML listed in the split is missing", stem)
            continue
        try:
            info, objects, problems = parse_voc_xml(xml)
        except VocXmlError as err:
            report.add("bad_annotation_file", xml, str(err), stem)
            continue
        for msg in problems:
            report.add("nan_box", xml, msg, stem)
        parsed.append((stem, xml, info, objects))
    return parsed


# --------------------------------------------------------------------------- shards


def check_shards(root: str | os.PathLike, images: bool = True, workers: int = 0,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, progress: Progress | None = None,
                 full_decode: bool = False) -> Report:
    """Verify a packed-shard folder: manifest, every shard's checksum, every row's CRC and image."""
    from multibox.data.shards import ShardDataset, ShardError

    report = Report(str(root), "shards")
    try:
        ds = ShardDataset(root, verify="none")
    except (ShardError, OSError, ValueError) as err:
        report.add("bad_annotation_file", root, str(err))
        return report
    report.num_images = len(ds)
    report.num_annotations = sum(r.num_boxes for r in ds.records)
    _box_problems(report, [(ds.describe(i), r.image_id, int(r.ann_ids[k]), r.bbox_ltwh[k], (r.width, r.height))
                           for i, r in enumerate(ds.records) for k in range(r.num_boxes)])
    _conversion_problems(report, ds)
    bad = set()
    for k in range(ds.num_shards):
        try:
            ds.verify_shard(k)
        except ShardError as err:
            report.add("bad_annotation_file", ds.shard_path(k), str(err))
            bad.add(k)
    if images:
        jobs = []
        for i in range(len(ds)):
            if ds.locate(i)[0] in bad:
                continue
            jobs.append((None, ds.describe(i), ds.image_ids[i], (ds.records[i].width, ds.records[i].height),
                         (lambda i=i: (ds.read_bytes(i), ds.describe(i))), ds.records[i].file_name))
        report.problems += _run_image_checks(jobs, workers, max_pixels, progress, full_decode)
    _require_usable(report, images and not bad, str(root))
    return report


_UNUSABLE = ("missing_image", "unreadable_image", "truncated_image", "oversized_image")


def _require_usable(report: Report, images_checked: bool, where: str) -> None:
    """``no_usable_images`` (training refuses the set, see :func:`multibox.data.build.build_splits`) when the set
    lists no image, or when every image was checked and none can be read."""
    if report.num_images == 0:
        report.add("no_usable_images", report.source, "the set has no images (none listed, or none left after the "
                   "errors above): training refuses it")
        return
    unusable = {_hashable(p.image_id) for p in report.problems if p.kind in _UNUSABLE}
    if images_checked and len(unusable) >= report.num_images:
        report.add("no_usable_images", report.source, f"none of its {report.num_images} images can be read (looked "
                   f"under {where}): training refuses it")


def _conversion_problems(report: Report, ds) -> None:
    """What ``multibox convert`` left out of the shards (the manifest lists it): unreadable images, and what
    loading the source dropped (unknown categories, duplicate images, ...)."""
    manifest = ds.root / "manifest.json"
    for k, entry in enumerate(ds.shards):
        for item in entry.get("skipped", []):
            if isinstance(item, dict):
                report.add("dropped_at_conversion", ds.shard_path(k), f"image {item.get('file_name')!r} left out: "
                           f"{item.get('reason')}", item.get("image_id"))
    dropped = ds.manifest.get("dropped", [])
    for item in dropped if isinstance(dropped, list) else []:
        if isinstance(item, dict):
            report.add("dropped_at_conversion", manifest, f"the source's {item.get('message')}")


# --------------------------------------------------------------------------- entry points


def check_dataset(src: str | os.PathLike, image_root: str | os.PathLike | None = None, split: str | None = None,
                  images: bool = True, workers: int = 0, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                  progress: Progress | None = None, full_decode: bool = False) -> Report:
    """Dispatch on the kind of ``src``: COCO JSON, VOC folder or shard folder (arguments: see :func:`check_coco`)."""
    from multibox.data.voc import is_voc_root

    path = Path(src)
    if path.is_dir() and (path / "manifest.json").is_file():
        return check_shards(path, images, workers, max_pixels, progress, full_decode)
    if path.is_dir() and is_voc_root(path):
        return check_voc(path, split, images, workers, max_pixels, progress, full_decode)
    if path.is_file():
        return check_coco(path, image_root, images, workers, max_pixels, progress, full_decode)
    report = Report(str(src), "unknown")
    report.add("bad_annotation_file", src, "not a COCO JSON, a VOC folder or a shard folder")
    return report
