"""``multibox predict``: detect objects in images, folders and videos, with PyTorch or an exported ONNX model.

Each input is named by its path relative to the deepest folder that holds every input (a folder given counts,
and a file's own folder): ``cams/a/img.jpg`` and ``cams/b/img.jpg``, given as ``cams``, are ``a/img.jpg`` and
``b/img.jpg``. A file found twice is predicted once. Writes into ``--out`` (never read as input itself):

- ``detections.json`` (written atomically): COCO results (``bbox`` = [left, top, width, height] in pixels,
  ``score``, ``category_id``: the data's own id, which the checkpoint or export stores, see
  :mod:`multibox.data.categories`; ``category_name``) with ``file``, the input's path as given or found. ``image_id``
  is a string throughout: an image's relative path (``"a/img.jpg"``), or for a video frame
  ``"<relative video path>#<frame index>"`` (``"clips/walk.mp4#12"``), which adds ``video`` (its relative path),
  ``frame`` (the index) and ``time`` (seconds);
- ``images/<relative path>.png``: each image with its detections drawn (``images/a/img.png``; where two inputs
  differ only in their suffix, both keep it: ``images/a/img.jpg.png`` and ``images/a/img.png.png``);
- ``videos/<relative path>.mp4``: each video with its detections drawn on every frame (same frame count and rate).

Inputs that cannot be read -- a damaged image, a video that cannot be opened or decoded, a file named explicitly
whose suffix is neither an image's nor a video's -- are skipped: each is named, with the reason, in one logged
warning and listed in the summary; everything else is done and written (a video that fails part-way keeps the
frames before the failure). :class:`~multibox.errors.InputError` instead for a path that does not exist, an unknown
suffix as the only input, or when no input at all could be read. In folders, files of other suffixes are ignored.

Filters, applied in this order: the detector's own postprocessing, with ``--score`` as its threshold and
``--max-det`` as its per-image cap, then ``--classes``, which filters the final detections (so under a per-image
cap an image may keep fewer). ``--score`` defaults to :data:`DISPLAY_SCORE`, or the model's own
``eval.score_threshold`` where that is higher: the evaluation threshold is low, right for mAP, and would draw some
hundred boxes per picture.

``tile`` (``--tile``): each image and frame is also predicted in overlapping tiles of the model input's shape,
that many pixels along its longer side, and the detections merged
(:class:`multibox.inference.tiling.TiledDetector`), for small objects in large images.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from multibox.errors import InputError, MultiboxError
from multibox.io import atomic_write_text, progress_bar
from multibox.inference.video import VIDEO_SUFFIXES, VideoError

__all__ = ["DISPLAY_SCORE", "IMAGE_SUFFIXES", "Inputs", "Skipped", "collect_inputs", "display_score",
           "load_detector", "output_names", "run_predict"]

log = logging.getLogger(__name__)

# The default --score: the boxes a person wants to see. Evaluation keeps the model's eval.score_threshold.
DISPLAY_SCORE = 0.3

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Skipped:
    """An input left out: its path (as given or found) and why, in a few words."""

    path: str
    reason: str


def _skip(path: str | Path, reason: str) -> Skipped:
    log.warning("%s: skipped: %s", path, reason)
    return Skipped(str(path), reason)


def _absolute(path: str | os.PathLike) -> Path:
    """Absolute and normalised (``..`` folded), symbolic links kept: the name the user sees."""
    return Path(os.path.abspath(path))


@dataclass
class Inputs:
    """What :func:`collect_inputs` found: images and videos (paths as given or found), the deepest folder holding
    every input (``root``, absolute), and the inputs skipped."""

    images: list[Path]
    videos: list[Path]
    root: Path
    skipped: list[Skipped] = field(default_factory=list)

    def relative(self, path: Path) -> Path:
        """``path`` relative to :attr:`root`: its name in the outputs."""
        return _absolute(path).relative_to(self.root)


def collect_inputs(inputs: Sequence[str | Path], exclude: str | Path | None = None) -> Inputs:
    """Files and folders (searched recursively, sorted, leaving out anything under ``exclude``) -> :class:`Inputs`.

    A file named explicitly whose suffix is neither an image's nor a video's is skipped with a warning, or is an
    :class:`InputError` when it is the only input; so is a path that does not exist, or finding nothing at all.
    """
    items = [Path(item) for item in inputs]
    excluded = _absolute(exclude) if exclude is not None else None
    found = Inputs([], [], _common_folder(items))
    seen: set[Path] = set()
    known = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    for item in items:
        if item.is_dir():
            paths = [p for p in sorted(item.rglob("*")) if p.suffix.lower() in known and p.is_file()
                     and not (excluded is not None and excluded in _absolute(p).parents)]
        elif item.is_file() and item.suffix.lower() in known:
            paths = [item]
        elif item.is_file():
            reason = f"not an image or video file (suffix {item.suffix or 'none'!r})"
            if len(items) == 1:
                raise InputError(f"{item}: {reason}; images: {' '.join(sorted(IMAGE_SUFFIXES))}; videos: "
                                 f"{' '.join(sorted(VIDEO_SUFFIXES))}")
            found.skipped.append(_skip(item, reason))
            continue
        else:
            raise InputError(f"{item}: no such file or folder")
        for path in paths:
            if _absolute(path) not in seen:
                seen.add(_absolute(path))
                (found.videos if path.suffix.lower() in VIDEO_SUFFIXES else found.images).append(path)
    if not found.images and not found.videos:
        if found.skipped:
            raise _nothing_read(found.skipped)
        raise InputError("no images or videos found in " + ", ".join(map(str, inputs)))
    return found


def _common_folder(items: Sequence[Path]) -> Path:
    """The deepest folder holding every item: a folder item itself, a file's own folder."""
    folders = [_absolute(item) if item.is_dir() else _absolute(item).parent for item in items]
    return Path(os.path.commonpath(folders))


def _nothing_read(skipped: Sequence[Skipped]) -> InputError:
    listed = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return InputError(f"no input could be read ({listed}{more})")


def output_names(relative: Sequence[Path], suffix: str) -> list[Path]:
    """Inputs' relative paths -> distinct output paths ending in ``suffix``: the input's suffix replaced
    (``a/img.jpg`` -> ``a/img.png``), or kept and ``suffix`` appended where replacing would make two alike
    (``a/img.jpg``, ``a/img.png`` -> ``a/img.jpg.png``, ``a/img.png.png``)."""
    replaced = [rel.with_suffix(suffix) for rel in relative]
    counts = Counter(replaced)
    names = [rel.with_name(rel.name + suffix) if counts[new] > 1 else new for rel, new in zip(relative, replaced)]
    if len(set(names)) < len(names):   # an input already named like another's output: append everywhere
        names = [rel.with_name(rel.name + suffix) for rel in relative]
    return names


def load_detector(model_path: str | Path, backend: str = "auto", device: str = "auto", threads: int = 0,
                  precision: str | None = None, compile_: bool | None = None, runtime: str | None = None):
    """A :class:`multibox.inference.detector.Detector` (``backend="torch"``, a ``.pt`` checkpoint) or a
    :class:`multibox.inference.onnx.OnnxDetector` (``backend="onnx"``, an exported ``.onnx`` file, run by
    ``runtime``: auto | onnxruntime | openvino, None = auto; ``backend="onnxruntime"`` = onnx with the onnxruntime
    runtime). ``auto`` picks by the file (:func:`multibox.inference.detector.model_format`); ``precision`` and
    ``compile_`` apply to the torch backend, ``runtime`` and ``threads`` to ONNX models."""
    from multibox.inference.detector import load, model_format

    path = Path(model_path)
    if backend == "auto":
        backend = "onnx" if model_format(path) == "onnx" else "torch"
    if backend == "onnxruntime":
        if runtime not in (None, "onnxruntime"):
            raise InputError(f"backend onnxruntime with runtime {runtime}: use backend onnx (or auto) with "
                             f"runtime {runtime}")
        backend, runtime = "onnx", "onnxruntime"
    if backend == "onnx":
        from multibox.inference.onnx import load_onnx
        return load_onnx(path, device, precision, compile_, threads=threads, runtime=runtime or "auto")
    if backend == "torch":
        if runtime is not None:
            raise InputError(f"{path}: --runtime ({runtime}) applies to exported ONNX models; a checkpoint runs in "
                             f"PyTorch (export it first: multibox export --checkpoint {path} --format onnx)")
        return load(path, device, precision, compile_)
    raise InputError(f"unknown backend {backend!r}: auto, torch, onnx or onnxruntime")


def display_score(detector, score: float | None) -> float:
    """``score``, or by default :data:`DISPLAY_SCORE` -- the model's own threshold where that is higher."""
    return score if score is not None else max(DISPLAY_SCORE, detector.score_threshold)


def parse_classes(spec: Sequence[str] | None, class_names: Sequence[str],
                  category_ids: Sequence[int] | None = None) -> frozenset[int] | None:
    """``["person", "13", "car,dog"]`` -> labels 1..C. Names are matched exactly; numbers are ``category_id``s, as
    ``detections.json`` writes them (``category_ids[i - 1]`` is label i's; None: the labels themselves)."""
    if not spec:
        return None
    index = {name: i for i, name in enumerate(class_names) if i > 0}
    ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names)))
    by_id = {int(cid): label for label, cid in enumerate(ids, start=1)}
    labels: set[int] = set()
    for token in (t.strip() for item in spec for t in item.split(",")):
        if not token:
            continue
        if token in index:
            labels.add(index[token])
        elif token.isdigit() and int(token) in by_id:
            labels.add(by_id[int(token)])
        else:
            raise InputError(f"--classes: unknown class {token!r}; classes: "
                             + ", ".join(f"{n} ({cid})" for n, cid in zip(class_names[1:], ids)))
    return frozenset(labels)


def keep_classes(det: dict[str, Tensor], labels: frozenset[int] | None) -> dict[str, Tensor]:
    """One image's detections of the classes ``labels`` (None: all)."""
    if labels is None:
        return det
    keep = torch.isin(det["labels"], torch.tensor(sorted(labels), dtype=det["labels"].dtype))
    return {k: v[keep] for k, v in det.items()}


def coco_results(det: dict[str, Tensor], image_id, class_names: Sequence[str],
                 label_to_category_id: dict[int, int], **extra) -> list[dict]:
    """One image's (or frame's) detections -> ``detections.json`` entries: the evaluation's COCO results (same
    rounding) with ``category_name`` and ``extra``; ``category_id`` is the data's id of the label (the detector's
    ``label_to_category_id``, from the checkpoint or export)."""
    from multibox.evaluation.results import to_coco_results
    return to_coco_results(image_id, det, label_to_category_id, class_names, **extra)


def save_png(image: Tensor, path: Path) -> None:
    """(3, H, W) uint8 -> PNG file (PIL: torchvision's image encoders are deprecated)."""
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _reason(path: str | Path, err: Exception) -> str:
    """Why ``path`` could not be read, without its name (the warning names it once)."""
    text, prefix = str(err), f"{path}: "
    if text.startswith(prefix):
        return text[len(prefix):]
    return getattr(err, "strerror", None) or text or type(err).__name__


class _Predictor:
    """One :func:`run_predict`: predicts images and videos, collects the results and the inputs skipped, draws."""

    def __init__(self, detector, out: Path, score: float, max_det: int | None, labels: frozenset[int] | None,
                 draw: bool, batch_size: int, skipped: list[Skipped]):
        self.detector, self.out, self.score, self.max_det, self.labels = detector, out, score, max_det, labels
        self.draw, self.batch_size, self.skipped = draw, batch_size, skipped
        self.names, self.category_of = detector.class_names, detector.label_to_category_id
        self.results: list[dict] = []
        self.images = self.frames = self.videos = 0

    def detect(self, frames: list[Tensor]) -> list[dict[str, Tensor]]:
        dets = self.detector.predict(frames, self.score, batch_size=self.batch_size, max_det=self.max_det)
        return [keep_classes(det, self.labels) for det in dets]

    def predict_images(self, found: Inputs, bar) -> None:
        from multibox.data.coco import read_image_rgb
        from multibox.evaluation.visualize import draw_detections

        relative = [found.relative(path) for path in found.images]
        for batch in _batches(zip(found.images, relative, output_names(relative, ".png")), self.batch_size):
            readable = []
            for path, rel, png in batch:
                try:
                    readable.append((path, rel, png, read_image_rgb(path)))
                except OSError as err:   # multibox.data.coco.ImageDecodeError, or the file is gone / not readable
                    self.skipped.append(_skip(path, _reason(path, err)))
            dets = self.detect([image for *_, image in readable]) if readable else []
            for (path, rel, png, image), det in zip(readable, dets):
                self.results += coco_results(det, rel.as_posix(), self.names, self.category_of, file=str(path))
                if self.draw:
                    save_png(draw_detections(image, det, self.names), self.out / "images" / png)
            self.images += len(readable)
            bar.update(len(batch))

    def predict_video(self, path: Path, rel: Path, mp4: Path, info, bar) -> None:
        """Every frame of one video; the drawn video is opened at the first frame (none for a video that has none)."""
        from multibox.evaluation.visualize import draw_detections
        from multibox.inference.video import VideoWriter, read_frames

        writer = None
        try:
            for batch in _batches(read_frames(path), self.batch_size):
                if writer is None and self.draw:
                    writer = VideoWriter(self.out / "videos" / mp4, info.fps, info.width, info.height)
                for (index, seconds, frame), det in zip(batch, self.detect([frame for *_, frame in batch])):
                    self.results += coco_results(det, f"{rel.as_posix()}#{index}", self.names, self.category_of,
                                                 file=str(path), video=rel.as_posix(), frame=index,
                                                 time=round(seconds, 4))
                    if writer is not None:
                        writer.write(draw_detections(frame, det, self.names))
                self.frames += len(batch)
                bar.update(len(batch))
            self.videos += 1
        except VideoError as err:   # the frames before the failure are kept
            self.skipped.append(_skip(path, _reason(path, err)))
        finally:
            if writer is not None:
                writer.close()


def run_predict(detector, inputs: Sequence[str | Path], out: str | Path, score: float | None = None,
                classes: Sequence[str] | None = None, max_det: int | None = None, batch_size: int = 8,
                progress: bool = True, draw: bool = True, tile: int | None = None,
                tile_overlap: float = 0.2) -> dict:
    """Predict on images, folders and videos; write ``detections.json``, ``images/`` and ``videos/`` into ``out``
    (see the module's documentation). ``score`` None: :func:`display_score`. ``tile``: also predict in tiles of
    that many pixels, overlapping by ``tile_overlap`` of a tile, and merge
    (:class:`~multibox.inference.tiling.TiledDetector`); None: whole images only.

    Returns a summary: ``images``, ``frames``, ``videos`` (read), ``detections``, ``skipped`` (``{"path",
    "reason"}`` per input left out), ``seconds``, ``images_per_second``.
    """
    from multibox.inference.video import video_info

    out = Path(out)
    if tile is not None:
        from multibox.inference.tiling import TiledDetector
        detector = TiledDetector(detector, tile, tile_overlap)   # checks both before any input is read
    found = collect_inputs(inputs, exclude=out)
    labels = parse_classes(classes, detector.class_names, detector.category_ids)
    run = _Predictor(detector, out, display_score(detector, score), max_det, labels, draw, batch_size, found.skipped)
    infos = {}
    for path in found.videos:
        try:
            infos[path] = video_info(path)
        except MultiboxError as err:   # VideoError, or no PyAV: the images are still done
            found.skipped.append(_skip(path, _reason(path, err)))
    t0 = time.perf_counter()
    bar = progress_bar(total=len(found.images) + sum(i.num_frames for i in infos.values()) or None,
                       enabled=progress, unit="img", desc="predict")
    run.predict_images(found, bar)
    relative = [found.relative(path) for path in infos]
    for (path, info), rel, mp4 in zip(infos.items(), relative, output_names(relative, ".mp4")):
        run.predict_video(path, rel, mp4, info, bar)
    bar.close()
    if not (run.images or run.frames or run.videos):
        raise _nothing_read(found.skipped)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "detections.json", json.dumps(run.results))
    seconds = time.perf_counter() - t0
    return {"images": run.images, "frames": run.frames, "videos": run.videos, "detections": len(run.results),
            "skipped": [asdict(s) for s in found.skipped], "seconds": round(seconds, 3),
            "images_per_second": round((run.images + run.frames) / max(seconds, 1e-9), 2)}
