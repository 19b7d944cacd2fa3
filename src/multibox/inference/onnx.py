"""An exported multibox model (``multibox export``) run by onnxruntime, with the API of the PyTorch
:class:`~multibox.inference.detector.Detector`; the graph's inputs and outputs are described in
:mod:`multibox.export.onnx`. :func:`multibox.load` gives one for a ``.onnx`` file (:func:`load_onnx`)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from multibox.config import Config
from multibox.core.postprocess import build_postprocessor
from multibox.data.categories import category_ids_of, label_to_category_id
from multibox.errors import InputError, MultiboxError
from multibox.inference.detector import ImageLike, check_limits, image_batches, with_limits

__all__ = ["OnnxDetector", "OnnxModelError", "load_onnx", "resize_for_model"]

log = logging.getLogger(__name__)


class OnnxModelError(MultiboxError, ValueError):
    """An ONNX file that cannot be used: missing, unreadable by onnxruntime, or not written by ``multibox export``."""


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MultiboxError("running an exported model needs onnxruntime: pip install 'multibox[export]' "
                            "(or: pip install onnxruntime)") from None
    return onnxruntime


def load_onnx(path: str | os.PathLike, device: str = "auto", precision: str | None = None,
              compile: bool | None = None, threads: int = 0) -> "OnnxDetector":
    """:class:`OnnxDetector` of an exported model, with the arguments of :func:`multibox.inference.detector.load`:
    ``device`` "auto" or "cpu" (onnxruntime's CPU provider; "cuda[:i]" needs onnxruntime-gpu). ``precision`` and
    ``compile`` belong to checkpoints: an exported graph runs in the precision it was exported in."""
    if precision not in (None, "auto") or compile:
        raise InputError(f"{path}: precision and compile apply to checkpoints; an exported ONNX model runs as it "
                         f"was exported")
    if device in ("auto", "cpu"):
        providers: list = ["CPUExecutionProvider"]
    elif device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        index = int(device.partition(":")[2] or 0)
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    else:
        raise InputError(f"unknown device {device!r} for an ONNX model: auto, cpu or cuda[:i]")
    return OnnxDetector(path, providers=providers, threads=threads)


def resize_for_model(image: Tensor, size: int, resize: str = "antialias") -> Tensor:
    """(3, H, W) uint8 -> (3, S, S) as the exported graph expects it, the resize of
    :class:`multibox.data.transforms.EvalTransform`: "antialias" -> uint8 (antialiased bilinear of the uint8 image);
    "torchvision" -> float32 in 0..255 (bilinear of the float image, no antialiasing; EvalTransform normalises first
    and resizes then, the same linear maps in the other order)."""
    from torchvision.transforms.v2 import functional as F
    if resize == "torchvision":
        x = image.float()
        if tuple(image.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        return x
    if tuple(image.shape[-2:]) == (size, size):
        return image
    return F.resize(image, [size, size], antialias=True)


class OnnxDetector:
    """An exported multibox model run by onnxruntime, with the API of :class:`multibox.inference.detector.Detector`.

    Args:
        path: the ``.onnx`` file written by :func:`multibox.export.onnx.export_onnx` (with or without postprocessing).
        providers: onnxruntime execution providers (default: CPU).
        threads: intra-op threads (0 = onnxruntime's default).
        spin: let idle worker threads spin (onnxruntime's default: lowest latency on a free machine; turn it off on
            shared cores, where spinning threads take CPU time from the others).

    Attributes: ``cfg``, ``class_names``, ``category_ids`` (the data's id of each label 1..C), ``image_size``,
    ``has_postprocess``, ``max_detections`` (K of the graph), and ``postprocess``: for a graph without
    postprocessing, the PyTorch PostProcessor applied to its raw outputs (adjustable like the torch backend's); None
    otherwise.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0,
                 spin: bool = True):
        self.path = Path(path)
        self.session = _session(self.path, providers or ["CPUExecutionProvider"], threads, spin)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "multibox.config" not in meta:
            raise OnnxModelError(f"{path}: not a multibox export (no multibox.config metadata; `multibox export` "
                                 f"writes it)")
        self.cfg = Config.from_dict(json.loads(meta["multibox.config"]))
        self.class_names: list[str] = json.loads(meta["multibox.class_names"])
        self.category_ids = _category_ids(meta, self.class_names, self.path)
        self.image_size = int(self.cfg.model.image_size)
        self.has_postprocess = meta.get("multibox.postprocess") == "1"
        self.max_detections = int(meta.get("multibox.max_detections", 0)) if self.has_postprocess else None
        image_input = self.session.get_inputs()[0]
        self.input_name = image_input.name
        self.input_dtype = np.uint8 if image_input.type == "tensor(uint8)" else np.float32
        self.resize = meta.get("multibox.resize", getattr(self.cfg.data, "resize", "antialias"))
        self.postprocess = None if self.has_postprocess else build_postprocessor(self.cfg)
        self.device = torch.device("cpu")
        self._warned: set[str] = set()

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """``{label: category id}``: what ``detections.json`` writes for each predicted label."""
        return label_to_category_id(self.category_ids)

    @property
    def score_threshold(self) -> float:
        """The model's own score threshold, which ``predict(score=None)`` applies (fixed in a graph with NMS)."""
        return self.postprocess.score_threshold if self.postprocess is not None else self.cfg.eval.score_threshold

    def run(self, batch: Tensor) -> list[np.ndarray]:
        """(N, 3, S, S) resized images (uint8 or float, 0..255) -> the graph's raw outputs."""
        if self.input_dtype == np.uint8 and batch.dtype != torch.uint8:
            batch = batch.round().clamp(0, 255).to(torch.uint8)
        return self.session.run(None, {self.input_name: batch.numpy().astype(self.input_dtype, copy=False)})

    def predict(self, images: ImageLike | Iterable[ImageLike], score: float | None = None, *, batch_size: int = 16,
                max_det: int | None = None) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` (K, 4) xyxy in the image's pixels, ``scores`` (K,), ``labels`` (K,);
        the arguments of :meth:`multibox.inference.detector.Detector.predict`.

        A graph with NMS inside has its threshold and K fixed: a higher ``score`` or a smaller ``max_det`` gives
        exactly what the graph would give with them; a lower threshold or a larger cap cannot be honoured
        (logged once)."""
        check_limits(score, max_det)
        if self.has_postprocess:
            self._warn_unhonoured(score, max_det)
        else:
            postprocess = with_limits(self.postprocess, score, max_det)
        results: list[dict[str, Tensor]] = []
        for batch, sizes in image_batches(images, batch_size):
            stacked = torch.stack([resize_for_model(img, self.image_size, self.resize) for img in batch])
            outputs = self.run(stacked)
            if self.has_postprocess:
                results += [_limit(det, score, max_det) for det in _split_fixed(*outputs, sizes)]
            else:
                loc, cls_logits, anchors = (torch.from_numpy(o) for o in outputs)
                results += postprocess(loc, cls_logits, anchors, sizes)
        return results

    def _warn_unhonoured(self, score: float | None, max_det: int | None) -> None:
        """Log, once each, a threshold below or a cap above the ones fixed in the graph."""
        notes = []
        if score is not None and score < self.score_threshold:
            notes.append(f"score threshold {score} is below the exported model's {self.score_threshold}: detections "
                         f"between the two are not in its output")
        if max_det is not None and max_det > self.max_detections:
            notes.append(f"max_det {max_det} exceeds the exported model's {self.max_detections} detections per image")
        for note in notes:
            if note not in self._warned:
                self._warned.add(note)
                log.warning("%s: %s", self.path, note)


def _category_ids(meta: dict[str, str], class_names: list[str], path: Path) -> list[int]:
    """The export's ``multibox.category_ids`` (absent in exports written before they were stored: the fallback of
    :func:`multibox.data.categories.category_ids_of`)."""
    stored = meta.get("multibox.category_ids")
    if stored is not None:
        try:
            stored = json.loads(stored)
        except ValueError:
            raise OnnxModelError(f"{path}: metadata multibox.category_ids is not JSON") from None
    return category_ids_of(class_names, stored, source=f"{path}: metadata multibox.category_ids")


def _session(path: Path, providers: Sequence, threads: int, spin: bool):
    """An onnxruntime session of ``path``; :class:`OnnxModelError` naming the file when onnxruntime cannot read it."""
    ort = _onnxruntime()
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such ONNX model file")
    available = ort.get_available_providers()
    missing = [p for p in providers if (p if isinstance(p, str) else p[0]) not in available]
    if missing:
        raise InputError(f"onnxruntime has no {missing[0]!r} here (available: {', '.join(available)})")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except Exception as err:   # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) carry no base class
        detail = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise OnnxModelError(f"{path}: not a readable ONNX model ({detail[:300]})") from None


def _limit(det: dict[str, Tensor], score: float | None, max_det: int | None) -> dict[str, Tensor]:
    """One image's detections (sorted by score) above ``score`` and at most ``max_det`` of them."""
    n = len(det["scores"]) if score is None else int((det["scores"] > score).sum())
    n = n if max_det is None else min(n, max_det)
    return {key: value[:n] for key, value in det.items()}


def _split_fixed(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, counts: np.ndarray,
                 sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """Fixed-size graph outputs -> per-image dicts with boxes scaled to each image's (H, W)."""
    out = []
    for i, (height, width) in enumerate(sizes):
        n = int(counts[i])
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        out.append({"boxes": torch.from_numpy(boxes[i, :n].copy()) * scale,
                    "scores": torch.from_numpy(scores[i, :n].copy()),
                    "labels": torch.from_numpy(labels[i, :n].astype(np.int64))})
    return out
