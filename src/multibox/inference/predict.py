"""``multibox predict``: detect objects in images, folders and videos, with the PyTorch or onnxruntime backend.

Writes into ``--out``:

- ``detections.json``: COCO results (``bbox`` = [left, top, width, height] in pixels, ``score``, ``category_id``,
  ``category_name``); ``image_id`` is the image's file stem, or for a video frame its frame index, with
  ``video`` (the video's file name) and ``time`` (seconds) added;
- ``images/<stem>.png``: each image with its detections drawn;
- ``videos/<stem>.mp4``: each video with its detections drawn on every frame (same frame count and rate).

Filters, applied in this order: the detector's own postprocessing (``--max-det`` sets its per-image cap),
then ``--score`` (a threshold above the model's own gives exactly what the model would give with it), then
``--classes``, which filters the final detections (so under a per-image cap an image may keep fewer).
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from multibox.errors import InputError
from multibox.io import progress_bar
from multibox.inference.video import VIDEO_SUFFIXES

__all__ = ["IMAGE_SUFFIXES", "DetectionFilter", "collect_inputs", "load_detector", "run_predict"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def collect_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """Split files and folders (searched recursively, sorted) into (images, videos).

    A file named explicitly is a video if its suffix is a video suffix, else an image.
    """
    images: list[Path] = []
    videos: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            for p in sorted(item.rglob("*")):
                suffix = p.suffix.lower()
                if suffix in IMAGE_SUFFIXES:
                    images.append(p)
                elif suffix in VIDEO_SUFFIXES:
                    videos.append(p)
        elif item.is_file():
            (videos if item.suffix.lower() in VIDEO_SUFFIXES else images).append(item)
        else:
            raise InputError(f"{item}: no such file or folder")
    if not images and not videos:
        raise InputError("no images or videos found in " + ", ".join(map(str, inputs)))
    return images, videos


def load_detector(model_path: str | Path, backend: str = "auto", device: str = "auto", threads: int = 0,
                  precision: str | None = None, compile_: bool | None = None):
    """A :class:`multibox.inference.detector.Detector` (``backend="torch"``, a ``.pt`` checkpoint) or a
    :class:`multibox.inference.onnx.OnnxDetector` (``backend="onnxruntime"``, an exported ``.onnx`` file).
    ``auto`` picks by the file's suffix; ``precision`` and ``compile_`` apply to the torch backend."""
    path = Path(model_path)
    if backend == "auto":
        backend = "onnxruntime" if path.suffix.lower() == ".onnx" else "torch"
    if backend == "onnxruntime":
        from multibox.inference.onnx import OnnxDetector
        return OnnxDetector(path, threads=threads)
    if backend == "torch":
        from multibox.inference.detector import load
        return load(path, device, precision, compile_)
    raise ValueError(f"unknown backend {backend!r}")


@dataclass
class DetectionFilter:
    """Applies ``--score``, ``--classes`` and ``--max-det`` to one image's detections (sorted by score)."""

    score: float | None = None
    labels: frozenset[int] | None = None
    max_det: int | None = None

    def __call__(self, det: dict[str, Tensor]) -> dict[str, Tensor]:
        keep = torch.ones_like(det["scores"], dtype=torch.bool)
        if self.score is not None:
            keep &= det["scores"] > self.score
        if self.labels is not None:
            keep &= torch.isin(det["labels"], torch.tensor(sorted(self.labels), dtype=det["labels"].dtype))
        det = {k: v[keep] for k, v in det.items()}
        if self.max_det is not None:
            det = {k: v[:self.max_det] for k, v in det.items()}
        return det


def parse_classes(spec: Sequence[str] | None, class_names: Sequence[str]) -> frozenset[int] | None:
    """``["person", "3", "car,dog"]`` -> class indices 1..C (names are matched exactly, ids are labels 1..C)."""
    if not spec:
        return None
    index = {name: i for i, name in enumerate(class_names) if i > 0}
    labels: set[int] = set()
    for token in (t.strip() for item in spec for t in item.split(",")):
        if not token:
            continue
        if token in index:
            labels.add(index[token])
        elif token.isdigit() and 1 <= int(token) < len(class_names):
            labels.add(int(token))
        else:
            raise InputError(f"--classes: unknown class {token!r}; classes: {', '.join(class_names[1:])}")
    return frozenset(labels)


def configure(detector, score: float | None, max_det: int | None) -> None:
    """Push ``--score`` / ``--max-det`` into the detector's postprocessing where it has one in PyTorch, so the
    per-image cap is applied where the model applies it. An exported graph's threshold and K are fixed: a lower
    score threshold or a larger K than the export's cannot be honoured (warned)."""
    pp = getattr(detector, "postprocess", None)
    if pp is not None:
        if score is not None:
            pp.score_threshold = score
        if max_det is not None:
            pp.max_per_image = max_det
        return
    baked_score = detector.cfg.eval.score_threshold
    if score is not None and score < baked_score:
        warnings.warn(f"--score {score} is below the exported model's threshold {baked_score}: "
                      f"detections between the two are not in the model's output", stacklevel=2)
    if max_det is not None and max_det > detector.max_detections:
        warnings.warn(f"--max-det {max_det} exceeds the exported model's {detector.max_detections} detections per "
                      f"image", stacklevel=2)


def coco_results(det: dict[str, Tensor], image_id, class_names: Sequence[str], **extra) -> list[dict]:
    """One image's (or frame's) detections -> ``detections.json`` entries: the evaluation's COCO results (same
    rounding) with ``category_name`` and ``extra``; ``category_id`` is the model's label."""
    from multibox.evaluation.results import to_coco_results
    return to_coco_results(image_id, det, None, class_names, **extra)


def save_png(image: Tensor, path: Path) -> None:
    """(3, H, W) uint8 -> PNG file (PIL: torchvision's image encoders are deprecated)."""
    from PIL import Image
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


def run_predict(detector, inputs: Sequence[str | Path], out: str | Path, score: float | None = None,
                classes: Sequence[str] | None = None, max_det: int | None = None, batch_size: int = 8,
                progress: bool = True, draw: bool = True) -> dict:
    """Predict on images, folders and videos; write ``detections.json``, ``images/`` and ``videos/`` into ``out``.

    Returns a summary: ``images``, ``frames``, ``detections``, ``seconds``, ``images_per_second``.
    """
    from multibox.data.coco import read_image_rgb
    from multibox.inference.video import VideoWriter, read_frames, video_info
    from multibox.evaluation.visualize import draw_detections

    out = Path(out)
    image_paths, video_paths = collect_inputs(inputs)
    configure(detector, score, max_det)
    keep = DetectionFilter(score, parse_classes(classes, detector.class_names), max_det)
    names = detector.class_names
    infos = {p: video_info(p) for p in video_paths}
    total = len(image_paths) + sum(info.num_frames for info in infos.values())
    results: list[dict] = []
    t0 = time.perf_counter()
    bar = progress_bar(total=total or None, enabled=progress, unit="img", desc="predict")
    done = 0
    if image_paths and draw:
        (out / "images").mkdir(parents=True, exist_ok=True)
    for batch in _batches(image_paths, batch_size):
        frames = [read_image_rgb(p) for p in batch]
        for path, image, det in zip(batch, frames, detector.predict(frames, batch_size=batch_size)):
            det = keep(det)
            results += coco_results(det, path.stem, names)
            if draw:
                save_png(draw_detections(image, det, names), out / "images" / f"{path.stem}.png")
        done += len(batch)
        bar.update(len(batch))
    frames_done = 0
    for path in video_paths:
        info = infos[path]
        writer = VideoWriter(out / "videos" / f"{path.stem}.mp4", info.fps, info.width, info.height) if draw else None
        try:
            for batch in _batches(read_frames(path), batch_size):
                dets = detector.predict([frame for _, _, frame in batch], batch_size=batch_size)
                for (index, seconds, frame), det in zip(batch, dets):
                    det = keep(det)
                    results += coco_results(det, index, names, video=path.name, time=round(seconds, 4))
                    if writer is not None:
                        writer.write(draw_detections(frame, det, names))
                frames_done += len(batch)
                bar.update(len(batch))
        finally:
            if writer is not None:
                writer.close()
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "detections.json").write_text(json.dumps(results))
    seconds = time.perf_counter() - t0
    count = done + frames_done
    summary = {"images": done, "frames": frames_done, "videos": len(video_paths), "detections": len(results),
               "seconds": round(seconds, 3), "images_per_second": round(count / max(seconds, 1e-9), 2)}
    return summary
