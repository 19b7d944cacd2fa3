"""The MindSpore tutorial's MindRecord files as a :class:`DetectionDataset` source for ``multibox convert``.

Tutorial layout (one row per image): ``img_id`` int32 (the COCO image id), ``image`` bytes (the encoded JPEG),
``annotation`` int32 (n, 5) rows ``[ymin, xmin, ymax, xmax, label]`` in pixels, label 1..80 in the tutorial's
class order (= COCO categories sorted by id). The matching COCO instances JSON gives class names, category
ids, file names and sizes (images missing from it keep ``<img_id>.jpg`` and an unknown size).

MindRecord has no crowd flag and no segment area: annotations are stored as plain boxes with area = w*h and
ids numbered in file order.

Reading needs MindSpore (``pip install 'multibox[mindspore]'``: ``mindspore`` and ``numpy<2``, which recent
MindSpore releases require; multibox itself works with numpy 1.x and 2.x). ``reader_factory`` lets tests and
other tools supply rows without it.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from multibox.data.coco import DetectionDataset, ImageRecord
from multibox.data.policy import LoadReport

__all__ = ["MindRecordSource", "mindspore_reader", "mindrecord_available"]

ReaderFactory = Callable[[str, Sequence[str]], Iterable[dict]]


def mindrecord_available() -> bool:
    try:
        import mindspore.mindrecord  # noqa: F401
    except Exception:
        return False
    return True


def mindspore_reader(path: str, columns: Sequence[str]) -> Iterator[dict]:
    """Rows of a MindRecord file (all files of its set) through ``mindspore.mindrecord.FileReader``."""
    try:
        from mindspore.mindrecord import FileReader
    except ImportError as err:
        raise ImportError("reading MindRecord files needs MindSpore: pip install 'multibox[mindspore]' "
                          f"({err})") from None
    reader = FileReader(file_name=str(path), num_consumer=1, columns=list(columns))
    try:
        for item in reader.get_next():
            yield item
    finally:
        reader.close()


def _bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return np.asarray(value, dtype=np.uint8).tobytes()


class MindRecordSource(DetectionDataset):
    """Tutorial MindRecord rows + the instances JSON, indexed like any multibox dataset.

    Random access (:meth:`read_bytes`) re-scans the file; :meth:`iter_bytes` is the sequential path that
    :func:`multibox.data.shards.convert_dataset` uses.
    """

    source_kind = "coco"

    def __init__(self, path: str | os.PathLike, instances_json: str | os.PathLike,
                 reader_factory: ReaderFactory | None = None) -> None:
        self.path = self.source_name = str(path)
        self._reader = reader_factory or mindspore_reader
        with open(instances_json, "rb") as f:
            coco = json.load(f)
        categories = sorted(({"id": int(c["id"]), "name": str(c["name"]),
                              **({"supercategory": c["supercategory"]} if "supercategory" in c else {})}
                             for c in coco.get("categories", [])), key=lambda c: c["id"])
        images = {int(img["id"]): img for img in coco.get("images", [])}
        report = LoadReport()
        records: list[ImageRecord] = []
        next_ann = 1
        for row in self._reader(self.path, ["img_id", "annotation"]):
            image_id = int(np.asarray(row["img_id"]).reshape(-1)[0])
            ann = np.asarray(row["annotation"], dtype=np.float64).reshape(-1, 5)
            labels = ann[:, 4].astype(np.int64)
            valid = (labels >= 1) & (labels <= len(categories))
            if not valid.all():
                report.note("annotations_unknown_label", [image_id], count=int((~valid).sum()))
            ann, labels = ann[valid], labels[valid]
            ymin, xmin, ymax, xmax = ann[:, 0], ann[:, 1], ann[:, 2], ann[:, 3]
            ltwh = np.stack([xmin, ymin, xmax - xmin, ymax - ymin], axis=1)
            n = len(ann)
            info = images.get(image_id)
            if info is None:
                report.note("images_not_in_instances_json", [image_id])
            records.append(ImageRecord(
                image_id, str(info["file_name"]) if info else f"{image_id:012d}.jpg",
                int(info.get("width") or 0) if info else 0, int(info.get("height") or 0) if info else 0,
                np.arange(next_ann, next_ann + n, dtype=np.int64), ltwh, ltwh[:, 2] * ltwh[:, 3],
                np.asarray([categories[k - 1]["id"] for k in labels], np.int64), np.zeros(n, bool)))
            next_ann += n
        self._init_index(categories, records, None, report)

    def iter_bytes(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """Encoded images of rows ``start..stop`` in file order (one sequential pass)."""
        stop = len(self) if stop is None else stop
        for i, row in enumerate(self._reader(self.path, ["img_id", "image"])):
            if i >= stop:
                return
            if i >= start:
                if int(np.asarray(row["img_id"]).reshape(-1)[0]) != self.image_ids[i]:
                    raise RuntimeError(f"{self.path}: row {i} changed between passes")
                yield _bytes(row["image"])

    def read_bytes(self, index: int) -> bytes:
        return next(self.iter_bytes(index, index + 1))

    def describe(self, index: int) -> str:
        return f"{self.path}#{index} (image id {self.image_ids[index]})"
