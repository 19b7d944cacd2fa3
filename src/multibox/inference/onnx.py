"""An exported multibox model (``multibox export``) run by onnxruntime, with the API of the PyTorch
:class:`~multibox.inference.detector.Detector`; the graph's inputs and outputs are described in
:mod:`multibox.export.onnx`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from multibox.config import Config
from multibox.core.postprocess import build_postprocessor
from multibox.inference.detector import ImageLike, image_batches

__all__ = ["OnnxDetector", "resize_for_model"]


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

    Attributes: ``cfg``, ``class_names``, ``image_size``, ``has_postprocess``, ``max_detections`` (K of the graph),
    and ``postprocess``: for a graph without postprocessing, the PyTorch PostProcessor applied to its raw outputs
    (adjustable like the torch backend's); None otherwise.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0,
                 spin: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        meta = self.session.get_modelmeta().custom_metadata_map
        if "multibox.config" not in meta:
            raise ValueError(f"{path}: not a multibox export (no multibox.config metadata)")
        self.cfg = Config.from_dict(json.loads(meta["multibox.config"]))
        self.class_names: list[str] = json.loads(meta["multibox.class_names"])
        self.image_size = int(self.cfg.model.image_size)
        self.has_postprocess = meta.get("multibox.postprocess") == "1"
        self.max_detections = int(meta.get("multibox.max_detections", 0)) if self.has_postprocess else None
        image_input = self.session.get_inputs()[0]
        self.input_name = image_input.name
        self.input_dtype = np.uint8 if image_input.type == "tensor(uint8)" else np.float32
        self.resize = meta.get("multibox.resize", getattr(self.cfg.data, "resize", "antialias"))
        self.postprocess = None if self.has_postprocess else build_postprocessor(self.cfg)
        self.device = torch.device("cpu")

    def run(self, batch: Tensor) -> list[np.ndarray]:
        """(N, 3, S, S) resized images (uint8 or float, 0..255) -> the graph's raw outputs."""
        if self.input_dtype == np.uint8 and batch.dtype != torch.uint8:
            batch = batch.round().clamp(0, 255).to(torch.uint8)
        return self.session.run(None, {self.input_name: batch.numpy().astype(self.input_dtype, copy=False)})

    def predict(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 16) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` (K, 4) xyxy in the image's pixels, ``scores`` (K,), ``labels`` (K,)."""
        results: list[dict[str, Tensor]] = []
        for batch, sizes in image_batches(images, batch_size):
            stacked = torch.stack([resize_for_model(img, self.image_size, self.resize) for img in batch])
            outputs = self.run(stacked)
            if self.has_postprocess:
                results += _split_fixed(*outputs, sizes)
            else:
                loc, cls_logits, anchors = (torch.from_numpy(o) for o in outputs)
                results += self.postprocess(loc, cls_logits, anchors, sizes)
        return results


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
