"""Packed shards: a dataset as a few large Arrow IPC files, read by random access through memory maps.

Layout of a shard folder::

    DIR/manifest.json          class names, categories, counts, per-shard rows / bytes / sha256, "complete"
    DIR/shard-00000.arrow      Arrow IPC file, one record batch, one row per image (schema below)
    DIR/shard-00001.arrow ...

Row schema (``SCHEMA``): ``image_id`` int64, ``file_name`` string, ``width``/``height`` int32 (annotated size,
0 = unknown), ``image`` large_binary (the original encoded bytes, untouched), ``image_crc32`` uint32, and per
annotation (lists, all annotations of the source including crowd / difficult / degenerate ones):
``ann_ids`` int64, ``boxes`` float64 flattened xyxy (n*4), ``bbox_ltwh`` float64 flattened COCO bbox (n*4, kept
bit-exact for the evaluation ground truth), ``areas`` float64, ``category_ids`` int64, ``labels`` int64 (1..C),
``crowd`` bool (COCO ``iscrowd``, VOC ``difficult``).

Conversion (:func:`convert_dataset`) is deterministic and idempotent: shard *k* holds the source's images
``[k*n, (k+1)*n)`` (minus unreadable ones, listed in the manifest), written to a temporary file and renamed;
after each shard the manifest is rewritten (``"complete": false``). A rerun skips every shard whose manifest
entry has the same plan digest (source records + options) and whose file still has the recorded sha256, so an
interrupted conversion resumes where it stopped and a finished one is left untouched.

Reading (:class:`ShardDataset`): annotations of all shards are loaded at construction (small columns only);
image bytes are sliced out of the memory-mapped file on demand. Corruption is detected on read: a shard's
sha256 is verified on its first use in each process (``verify="sha256"``, the default), every row's image CRC32
on every read (unless ``verify="none"``); either failure raises :class:`ShardError` naming the shard.

A shard folder from a stranger is hostile input (its checksums prove nothing then): the manifest's structure is
checked field by field, shard file names must be plain names inside the folder, every Arrow file is fully
validated (schema and types, offsets within buffers: ``Table.validate(full=True)``) before a value is read, and the
per-annotation lists must agree in length and name known categories. Anything else is a :class:`ShardError`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa

from multibox.core.boxes import ltwh_to_xyxy
from multibox.data.coco import DetectionDataset, ImageRecord
from multibox.data.imagecheck import decode_cleanly_all, image_check_pool, training_decode_problem, worker_count
from multibox.data.policy import CONVERT_DROPS, LoadReport, has_training_box
from multibox.errors import MultiboxError
from multibox.io import atomic_path, atomic_write_text, file_sha256, remove_leftover_temporaries

__all__ = ["FORMAT", "SCHEMA", "ShardDataset", "ShardError", "convert_dataset", "convert_source", "is_shard_dir"]

log = logging.getLogger(__name__)

FORMAT = "multibox-shards"
VERSION = 1
MANIFEST = "manifest.json"

SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("file_name", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("image", pa.large_binary()), ("image_crc32", pa.uint32()),
    ("ann_ids", pa.list_(pa.int64())), ("boxes", pa.list_(pa.float64())), ("bbox_ltwh", pa.list_(pa.float64())),
    ("areas", pa.list_(pa.float64())), ("category_ids", pa.list_(pa.int64())), ("labels", pa.list_(pa.int64())),
    ("crowd", pa.list_(pa.bool_())),
])


class ShardError(MultiboxError, RuntimeError):
    """A shard folder that cannot be used: interrupted conversion, missing / truncated / corrupted shard."""


def _check_manifest(manifest: object, root: Path) -> None:
    """Raise :class:`ShardError` naming the field when ``manifest`` is not a well-formed shard manifest."""
    where = root / MANIFEST

    def fail(field: str, what: str) -> None:
        raise ShardError(f"{where}: {field}: {what}; re-run `multibox convert`")

    if not isinstance(manifest, dict):
        fail("top level", f"expected an object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{root}: not a multibox shard folder")
    if not manifest.get("complete"):
        raise ShardError(f"{root}: conversion did not finish; re-run `multibox convert` to resume it")
    if manifest.get("source_kind", "coco") not in ("coco", "voc", "shards"):
        fail("source_kind", f"unknown value {manifest.get('source_kind')!r}")
    cats = manifest.get("categories")
    if not isinstance(cats, list):
        fail("categories", "expected a list")
    for i, c in enumerate(cats):
        if not (isinstance(c, dict) and isinstance(c.get("id"), int) and not isinstance(c.get("id"), bool)
                and -2**63 <= c["id"] < 2**63 and isinstance(c.get("name"), (str, int))):
            fail(f"categories[{i}]", "expected an object with an integer id and a name")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        fail("shards", "expected a list")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            fail(f"shards[{i}]", "expected an object")
        name = entry.get("file")
        if not (isinstance(name, str) and name and name == Path(name).name and name not in (".", "..")
                and "\\" not in name and "\0" not in name):
            fail(f"shards[{i}].file", f"expected a plain file name inside the folder, got {name!r}")
        for key in ("rows", "bytes"):
            value = entry.get(key)
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63):
                fail(f"shards[{i}].{key}", f"expected a non-negative integer, got {value!r}")
        if not isinstance(entry.get("sha256"), str):
            fail(f"shards[{i}].sha256", "expected a string")
        if not isinstance(entry.get("skipped", []), list):
            fail(f"shards[{i}].skipped", "expected a list")


def is_shard_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


# --------------------------------------------------------------------------- writing


def _list_column(parts: list[np.ndarray], arrow_type: pa.DataType) -> pa.Array:
    """One list<arrow_type> column from per-row numpy arrays (built in one go: a Python list per row costs ~1 ms
    per image at COCO scale, more than checking the image)."""
    offsets = np.zeros(len(parts) + 1, np.int32)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    values = np.concatenate(parts) if parts else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, arrow_type))


def _binary_column(blobs: list[bytes]) -> pa.Array:
    """The image column: one ``b"".join`` wrapped, not ``pa.array(blobs)`` (4x slower here: it faults in its
    fresh memory page by page)."""
    offsets = np.zeros(len(blobs) + 1, np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(blobs),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(blobs))])


def _shard_table(src: DetectionDataset, indices: list[int], blobs: list[bytes]) -> pa.Table:
    records = [src.records[i] for i in indices]
    ltwh = [r.bbox_ltwh.reshape(-1, 4) for r in records]
    to_label = src.category_id_to_label
    columns = {
        "image_id": pa.array([r.image_id for r in records], pa.int64()),
        "file_name": pa.array([r.file_name for r in records], pa.string()),
        "width": pa.array([r.width for r in records], pa.int32()),
        "height": pa.array([r.height for r in records], pa.int32()),
        "image": _binary_column(blobs),
        "image_crc32": pa.array([zlib.crc32(b) for b in blobs], pa.uint32()),
        "ann_ids": _list_column([r.ann_ids.astype(np.int64) for r in records], pa.int64()),
        # float64, as training_target computes it (elementwise: the same bits as one box at a time)
        "boxes": _list_column([ltwh_to_xyxy(b).reshape(-1) for b in ltwh], pa.float64()),
        "bbox_ltwh": _list_column([b.reshape(-1) for b in ltwh], pa.float64()),
        "areas": _list_column([r.areas.astype(np.float64) for r in records], pa.float64()),
        "category_ids": _list_column([r.category_ids.astype(np.int64) for r in records], pa.int64()),
        "labels": _list_column([np.array([to_label[int(c)] for c in r.category_ids.tolist()], np.int64)
                                for r in records], pa.int64()),
        "crowd": _list_column([r.crowd.astype(bool) for r in records], pa.bool_()),
    }
    return pa.Table.from_arrays([columns[name] for name in SCHEMA.names], schema=SCHEMA)


def _write_shard(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_table(table.combine_chunks())


def _read_checked(src: DetectionDataset, indices: list[int], blobs: Iterator[bytes] | None, check_images: bool,
                  pool, clean: list[bool] | None = None) -> list[tuple[int, bytes | None, str | None]]:
    """(index, bytes or None, reason) per image: bytes read here; when ``check_images``, vouched for by
    :func:`multibox.data.imagecheck.decodes_cleanly` (``clean``, one per index, when known; else on ``pool``'s
    workers, here when None, in chunks), the rest decoded here by the training decoder
    (:func:`multibox.data.imagecheck.training_decode_problem`)."""
    read: list[tuple[int, bytes | None, str | None]] = []
    for i in indices:
        if blobs is not None:   # a sequential source: its errors are not about one image
            read.append((i, next(blobs), None))
            continue
        try:
            read.append((i, src.read_bytes(i), None))
        except OSError as err:
            read.append((i, None, str(err)))
    if not check_images:
        return read
    if clean is None:
        todo = [blob for _, blob, _ in read if blob is not None]
        chunks = [todo[k: k + _CHUNK] for k in range(0, len(todo), _CHUNK)]
        verdicts = iter([v for vs in (pool or _Serial()).map(decode_cleanly_all, chunks) for v in vs])
        clean = [next(verdicts) if blob is not None else False for _, blob, _ in read]
    out = []
    for (i, blob, why), ok in zip(read, clean):
        if blob is not None:   # the rare image not vouched for is decoded here, by the training decoder
            why = training_decode_problem(blob, src.describe(i), ok)
        out.append((i, None if why is not None else blob, why))
    return out


class _ChecksAhead:
    """:func:`multibox.data.imagecheck.decodes_cleanly` of a shard's images submitted to the workers ahead of
    packing it, by path (the workers read the files: no ~75 kB per image pickled through a pipe), so that they
    check shard k+1 while this process reads, packs and writes shard k. Idle without a pool or image files."""

    def __init__(self, src: DetectionDataset, pool) -> None:
        self.src, self.pending = src, {}
        self.pool = pool if callable(getattr(src, "image_path", None)) else None

    def submit(self, key: int, indices) -> None:
        if self.pool is None or key in self.pending or not len(indices):
            return
        paths = []
        for i in indices:
            try:
                paths.append(str(self.src.image_path(i)))
            except OSError:
                paths.append("")   # unreadable there too (False); reading it here says why
        self.pending[key] = [self.pool.submit(decode_cleanly_all, paths[k: k + _CHUNK])
                             for k in range(0, len(paths), _CHUNK)]

    def take(self, key: int) -> list[bool] | None:
        futures = self.pending.pop(key, None)
        return None if futures is None else [v for f in futures for v in f.result()]

    def discard(self, key: int) -> None:
        for future in self.pending.pop(key, []):
            future.cancel()


class _Serial:
    map = staticmethod(map)   # the pool interface, run in this process


_CHUNK = 32   # images (paths or bytes) per task of a worker: ~60 ms of checking, a moving progress bar


def _check_pool(workers: int):
    """Worker processes for the image checks (0: every core; None when one is asked for); see
    :func:`multibox.data.imagecheck.image_check_pool` for why processes and ``forkserver``."""
    workers = worker_count(workers)
    return image_check_pool(workers, picklable=True) if workers > 1 else None


def convert_dataset(src: DetectionDataset, out_dir: str | os.PathLike, images_per_shard: int = 1000,
                    check_images: bool = True, workers: int = 0, source_info: dict | None = None,
                    progress: bool = False, on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Pack ``src`` into ``out_dir`` (see the module docstring); returns the manifest. Resumes / is idempotent.

    ``src`` may define ``iter_bytes(start, stop)`` (sequential sources such as MindRecord); otherwise
    ``read_bytes(i)`` is used. ``workers``: processes checking images (0: every core). ``progress``: log each shard
    written (INFO, logger ``multibox.data.shards``); ``on_progress(done, total)``: images packed (or found already
    packed) so far, after each shard.
    """
    pool = _check_pool(workers) if check_images else None
    try:
        return _convert(src, Path(out_dir), images_per_shard, check_images, pool, source_info, progress, on_progress)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _convert(src: DetectionDataset, out: Path, images_per_shard: int, check_images: bool, pool,
             source_info: dict | None, progress: bool, on_progress) -> dict:
    """:func:`convert_dataset` with its worker pool (None: check serially)."""
    out.mkdir(parents=True, exist_ok=True)
    n = max(1, int(images_per_shard))
    options = {"version": VERSION, "images_per_shard": n, "check_images": bool(check_images),
               "class_names": src.class_names, "categories": src.categories}
    options_digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()
    previous = _previous_shards(out)
    remove_leftover_temporaries(out)   # of a conversion killed mid-write (this one resumes it)
    num_shards = (len(src) + n - 1) // n
    manifest = {
        "format": FORMAT, "version": VERSION, "complete": False, "source_kind": src.source_kind,
        "source": source_info or {}, "class_names": src.class_names, "categories": src.categories,
        "images_per_shard": n, "check_images": bool(check_images), "shards": [],
    }
    manifest["dropped"] = _dropped_at_load(src)
    sequential = getattr(src, "iter_bytes", None)
    stream = sequential(0, len(src)) if sequential is not None else None
    written = reused = 0
    ahead = _ChecksAhead(src, pool if check_images and stream is None else None)
    if on_progress is not None:
        on_progress(0, len(src))
    for k in range(num_shards):
        indices = list(range(k * n, min((k + 1) * n, len(src))))
        plan = hashlib.sha256((options_digest + "".join(src.content_digest(i) for i in indices)).encode()).hexdigest()
        name = f"shard-{k:05d}.arrow"
        path = out / name
        old = previous.get(name)
        if on_progress is not None and k:
            on_progress(k * n, len(src))
        if _reusable(old, plan, path):
            manifest["shards"].append(old)
            reused += 1
            ahead.discard(k)
            if stream is not None:
                for _ in indices:
                    next(stream)
            continue
        ahead.submit(k, indices)
        ahead.submit(k + 1, range((k + 1) * n, min((k + 2) * n, len(src))))   # checked while this one is packed
        entry = _pack_shard(src, indices, stream, check_images, pool, path, plan, ahead.take(k))
        manifest["shards"].append(entry)
        written += 1
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))   # progress: resume point
        if progress:
            log.info("  %s: %d images (%d skipped)", name, entry["rows"], len(entry["skipped"]))
    if on_progress is not None and num_shards:
        on_progress(len(src), len(src))
    _remove_stale_shards(out, {s["file"] for s in manifest["shards"]})
    manifest["counts"] = _counts(src, manifest["shards"])
    manifest["complete"] = True
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    manifest["_written"], manifest["_reused"] = written, reused
    return manifest


def _dropped_at_load(src: DetectionDataset) -> list[dict]:
    """What loading ``src`` dropped (so the shards lack it), one warning per kind: the manifest's ``dropped``,
    ``[{"kind", "count", "examples", "message"}]``."""
    report = src.load_report
    dropped = []
    for kind in (k for k in CONVERT_DROPS if report.get(k)):
        (message,) = report.describe([kind])
        log.warning("%s: %s", src.source_name, message)
        dropped.append({"kind": kind, "count": int(report[kind]), "examples": list(report.examples.get(kind, [])),
                        "message": message})
    return dropped


def _previous_shards(out: Path) -> dict[str, dict]:
    """file name -> manifest entry of the shards an earlier run wrote into ``out`` (empty when none)."""
    if not (out / MANIFEST).is_file():
        return {}
    try:
        old = json.loads((out / MANIFEST).read_text())
        return {s["file"]: s for s in old.get("shards", [])} if old.get("format") == FORMAT else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return {}   # an unreadable earlier manifest: every shard is rewritten


def _reusable(old: dict | None, plan: str, path: Path) -> bool:
    """Whether the earlier run's shard at ``path`` holds exactly what ``plan`` would write (size and checksum)."""
    return bool(old and old.get("plan") == plan and path.is_file() and path.stat().st_size == old.get("bytes")
                and file_sha256(path) == old.get("sha256"))


def _pack_shard(src: DetectionDataset, indices: list[int], stream: Iterator[bytes] | None, check_images: bool,
                pool, path: Path, plan: str, clean: list[bool] | None = None) -> dict:
    """Read (and check) the images ``indices``, write their shard to ``path``; returns its manifest entry.
    ``clean``: :func:`multibox.data.imagecheck.decodes_cleanly` of each image when already known."""
    results = _read_checked(src, indices, stream, check_images, pool, clean)
    kept = [(i, b) for i, b, _ in results if b is not None]
    skipped = [{"image_id": src.image_ids[i], "file_name": src.records[i].file_name, "reason": why}
               for i, b, why in results if b is None]
    for s in skipped:
        log.warning("skipping unreadable image %s (image id %s): %s", s["file_name"], s["image_id"], s["reason"])
    table = _shard_table(src, [i for i, _ in kept], [b for _, b in kept])
    _write_shard(path, table)
    return {"file": path.name, "rows": table.num_rows, "bytes": path.stat().st_size,
            "sha256": file_sha256(path), "plan": plan, "skipped": skipped,
            "annotations": sum(len(src.records[i].ann_ids) for i, _ in kept)}


def _remove_stale_shards(out: Path, wanted: set[str]) -> None:
    """Shards of an earlier, larger plan would otherwise linger and confuse a reader of the folder."""
    for stale in sorted(out.glob("shard-*.arrow")):
        if stale.name not in wanted:
            stale.unlink()


def _counts(src: DetectionDataset, shards: list[dict]) -> dict:
    """The manifest's ``counts``: what was packed, what was skipped, and the source's annotations per class."""
    per_class: Counter = Counter()
    num_crowd = 0
    for i in range(len(src)):
        r = src.records[i]
        for c, crowd in zip(r.category_ids.tolist(), r.crowd.tolist()):
            per_class[src.class_names[src.category_id_to_label[c]]] += 1
            num_crowd += crowd
    skipped_ids = {d["image_id"] for s in shards for d in s["skipped"]}
    return {
        "images": sum(s["rows"] for s in shards),
        "annotations": sum(s["annotations"] for s in shards),
        "skipped_images": len(skipped_ids),
        "source_images": len(src), "source_annotations_per_class": dict(per_class), "source_crowd": num_crowd,
    }


# --------------------------------------------------------------------------- reading


class _OpenShard:
    """One memory-mapped shard: the Arrow table and zero-copy views of the image column."""

    def __init__(self, path: Path):
        try:
            self.mmap = pa.memory_map(str(path), "r")
            self.table = pa.ipc.open_file(self.mmap).read_all()
            if not self.table.schema.equals(SCHEMA, check_metadata=False):
                raise ShardError(f"{path}: unexpected columns or types {self.table.schema}; re-run `multibox convert`")
            # Offsets inside their buffers, valid UTF-8, ...: nothing below may read outside the file.
            self.table.validate(full=True)
            for name, column in zip(self.table.schema.names, self.table.columns):
                if column.null_count or (pa.types.is_list(column.type) and column.combine_chunks().flatten().null_count):
                    raise ShardError(f"{path}: column {name!r} holds nulls; re-run `multibox convert`")
        except (pa.ArrowException, OSError, ValueError) as err:
            raise ShardError(f"{path}: not a readable shard ({err}); re-run `multibox convert` to rebuild it") from None
        images = self.table.column("image").combine_chunks()
        bufs = images.buffers()
        self.offsets = np.frombuffer(bufs[1], np.int64)[images.offset: images.offset + len(images) + 1]
        self.data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")
        self.crc = self.table.column("image_crc32").to_numpy()


def _lists(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    arr = table.column(name).combine_chunks()
    offsets = arr.offsets.to_numpy()
    return offsets - offsets[0], arr.flatten().to_numpy(zero_copy_only=False)


class ShardDataset(DetectionDataset):
    """A packed-shard folder as a :class:`DetectionDataset` (same samples as the source it was made from).

    Args:
        root: the folder (``manifest.json`` and ``shard-*.arrow``).
        transform: optional ``(image, target) -> (image, target)``.
        verify: ``"sha256"`` (file checksum on a shard's first use in a process + row CRCs), ``"crc"`` (row
            CRCs only) or ``"none"``.
        keep_crowd: also train on crowd / difficult boxes.
        keep_empty: keep images without a usable box.

    Works with ``DistributedSampler`` and DataLoader workers (open memory maps are not pickled; each process
    maps the files itself).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, verify: str = "sha256",
                 keep_crowd: bool = False, keep_empty: bool = True) -> None:
        if verify not in ("sha256", "crc", "none"):
            raise ValueError(f"verify must be sha256, crc or none; got {verify!r}")
        self.root = Path(root)
        self.source_name = str(self.root)
        try:
            self.manifest = json.loads((self.root / MANIFEST).read_bytes())
        except (OSError, ValueError, RecursionError) as err:
            raise ShardError(f"{self.root / MANIFEST}: unreadable manifest ({type(err).__name__}: {err})") from None
        _check_manifest(self.manifest, self.root)
        known_categories = {int(c["id"]) for c in self.manifest["categories"]}
        self.verify, self.keep_crowd = verify, bool(keep_crowd)
        self.source_kind = self.manifest.get("source_kind", "coco")
        self.shards = self.manifest["shards"]
        self._handles: dict[int, _OpenShard] = {}
        self._verified: set[int] = set()
        records: list[ImageRecord] = []
        self._where: list[tuple[int, int]] = []
        report = LoadReport()
        for k, entry in enumerate(self.shards):
            path = self.shard_path(k)
            if not path.is_file():
                raise ShardError(f"{path}: shard missing; re-run `multibox convert`")
            if path.stat().st_size != entry["bytes"]:
                raise ShardError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']} "
                                 "(truncated or replaced); re-run `multibox convert`")
            table = self._open(k).table
            if table.num_rows != entry["rows"]:
                raise ShardError(f"{path}: {table.num_rows} rows, the manifest says {entry['rows']}")
            ids, names = table.column("image_id").to_numpy(), table.column("file_name").to_pylist()
            widths, heights = table.column("width").to_numpy(), table.column("height").to_numpy()
            cols = {c: _lists(table, c) for c in ("ann_ids", "bbox_ltwh", "areas", "category_ids", "crowd")}
            off = cols["ann_ids"][0]
            for c in ("areas", "category_ids", "crowd"):
                if not np.array_equal(cols[c][0], off):
                    raise ShardError(f"{path}: column {c!r} does not have one value per annotation")
            if not np.array_equal(cols["bbox_ltwh"][0], 4 * off):
                raise ShardError(f"{path}: column 'bbox_ltwh' does not have 4 values per annotation")
            unknown = set(np.unique(cols["category_ids"][1]).tolist()) - known_categories
            if unknown:
                raise ShardError(f"{path}: category ids {sorted(unknown)[:5]} are not in the manifest's categories")
            for row in range(table.num_rows):
                a, b = int(off[row]), int(off[row + 1])
                record = ImageRecord(int(ids[row]), names[row], int(widths[row]), int(heights[row]),
                                     cols["ann_ids"][1][a:b].astype(np.int64),
                                     cols["bbox_ltwh"][1][4 * a: 4 * b].astype(np.float64).reshape(-1, 4),
                                     cols["areas"][1][a:b].astype(np.float64),
                                     cols["category_ids"][1][a:b].astype(np.int64),
                                     cols["crowd"][1][a:b].astype(bool))
                if not keep_empty and not has_training_box(record, self.keep_crowd):
                    report.note("empty_images_dropped", [record.image_id])
                    continue
                records.append(record)
                self._where.append((k, row))
            skipped = entry.get("skipped", [])
            report.note("skipped_at_conversion", [s.get("image_id") for s in skipped if isinstance(s, dict)],
                        count=len(skipped))
        self._handles.clear()   # reopened lazily per process (and verified then)
        self._init_index(self.manifest["categories"], records, transform, report)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_path(self, k: int) -> Path:
        return self.root / self.shards[k]["file"]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row) of sample ``index``."""
        return self._where[index]

    def _open(self, k: int) -> _OpenShard:
        handle = self._handles.get(k)
        if handle is None:
            handle = self._handles[k] = _OpenShard(self.shard_path(k))
        return handle

    def verify_shard(self, k: int) -> None:
        """Compare shard ``k``'s sha256 with the manifest (raises :class:`ShardError`)."""
        path = self.shard_path(k)
        digest = file_sha256(path)
        if digest != self.shards[k]["sha256"]:
            raise ShardError(f"{path}: checksum mismatch (sha256 {digest[:12]}..., manifest "
                             f"{self.shards[k]['sha256'][:12]}...): the shard is corrupted; re-run `multibox convert`")
        self._verified.add(k)

    def read_bytes(self, index: int) -> bytes:
        k, row = self._where[index]
        if self.verify == "sha256" and k not in self._verified:
            self.verify_shard(k)
        handle = self._open(k)
        blob = bytes(handle.data[int(handle.offsets[row]): int(handle.offsets[row + 1])])
        if self.verify != "none" and zlib.crc32(blob) != int(handle.crc[row]):
            raise ShardError(f"{self.shard_path(k)}: row {row} (image id {self.image_ids[index]}) fails its CRC32: "
                             "the shard is corrupted; re-run `multibox convert`")
        return blob

    def describe(self, index: int) -> str:
        k, row = self._where[index]
        return f"{self.shard_path(k)}#{row} ({self.records[index].file_name})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


# --------------------------------------------------------------------------- converting a path


def convert_source(src: str, out: str, image_root: str | None = None, split: str | None = None,
                   instances: str | None = None, images_per_shard: int = 1000, check_images: bool = True,
                   workers: int = 0, keep_difficult: bool = False, progress: bool = False,
                   on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Open ``src`` (COCO JSON, VOC folder, or with ``instances`` a tutorial MindRecord file) and convert it."""
    path = Path(src)
    if instances is not None or path.suffix.startswith(".mindrecord") or "mindrecord" in path.name:
        from multibox.data.mindrecord import MindRecordSource
        if instances is None:
            raise ValueError("converting MindRecord needs --instances (the matching COCO instances JSON)")
        dataset = MindRecordSource(path, instances)
        info = {"kind": "mindrecord", "path": str(path), "instances": str(instances)}
    else:
        from multibox.data.voc import VOCDetection, is_voc_root
        if path.is_dir() and is_voc_root(path):
            dataset = VOCDetection(path, split=split or "trainval", keep_difficult=keep_difficult)
            info = {"kind": "voc", "path": str(path), "split": split or "trainval"}
        elif path.is_file():
            from multibox.data.coco import CocoDetection
            dataset = CocoDetection(path, image_root=image_root)
            info = {"kind": "coco", "path": str(path), "image_root": image_root}
        else:
            raise FileNotFoundError(f"{src}: not a COCO JSON, a VOC folder or a MindRecord file")
    return convert_dataset(dataset, out, images_per_shard, check_images, workers, info, progress, on_progress)
