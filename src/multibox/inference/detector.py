"""The Python API: ``multibox.load(path).predict(images)``, and its PyTorch detector."""
from __future__ import annotations

import dataclasses
import os
from itertools import islice
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from multibox.checkpoint import CheckpointError, load_checkpoint
from multibox.config import Config
from multibox.core.postprocess import PostProcessor, build_postprocessor, detections_to_cpu
from multibox.data.categories import category_ids_of, label_to_category_id
from multibox.data.coco import pil_to_uint8_chw, read_image_rgb
from multibox.data.transforms import build_eval_transform
from multibox.errors import InputError
from multibox.models import SSD, model_from_state_dict
from multibox.runtime import (apply_inference_arguments, autocast, inference_dtype, prepare_for_inference,
                              resolve_device)

ImageLike = Union[str, os.PathLike, Image.Image, Tensor, np.ndarray]


def as_uint8_chw(image: ImageLike) -> Tensor:
    """A path, a PIL image (any mode), an (H, W, 3) uint8 array (RGB) or a (3, H, W) uint8 tensor -> (3, H, W)
    uint8 tensor."""
    if isinstance(image, (str, os.PathLike)):
        return read_image_rgb(image)
    if isinstance(image, Image.Image):
        return pil_to_uint8_chw(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise InputError(f"expected a (3, H, W) uint8 RGB tensor, got {tuple(image.shape)} {image.dtype}")
        return image
    raise TypeError(f"cannot read an image from {type(image).__name__}: give a path, a PIL image, an (H, W, 3) "
                    f"uint8 array or a (3, H, W) uint8 tensor")


def _is_one_image(images) -> bool:
    if isinstance(images, (Tensor, np.ndarray)):
        return images.ndim <= 3   # (N, ...) batches are sequences of images
    return isinstance(images, (str, os.PathLike, Image.Image))


def image_batches(images: ImageLike | Iterable[ImageLike], batch_size: int):
    """One image, a sequence or any iterable of them -> batches of (uint8 (3, H, W) images, their (H, W) sizes),
    each image read when its batch is due."""
    items = iter([images] if _is_one_image(images) else images)
    while batch := [as_uint8_chw(img) for img in islice(items, batch_size)]:
        yield batch, [tuple(img.shape[-2:]) for img in batch]


def check_limits(score: float | None, max_det: int | None) -> None:
    """:class:`InputError` for a score threshold outside 0..1 (``predict(images, 8)`` meant as a batch size would
    silently keep nothing) or a cap below 1."""
    if score is not None and not 0 <= score <= 1:
        raise InputError(f"score {score!r} is not a score threshold between 0 and 1")
    if max_det is not None and max_det < 1:
        raise InputError(f"max_det {max_det!r}: at least 1 detection per image")


def with_limits(postprocess: PostProcessor, score: float | None, max_det: int | None) -> PostProcessor:
    """``postprocess`` with another score threshold and per-image cap where given (a copy: the detector's own
    stays as it is)."""
    changes = {"score_threshold": score, "max_per_image": max_det}
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(postprocess, **changes) if changes else postprocess


def model_format(path: str | os.PathLike) -> str:
    """``"checkpoint"`` or ``"onnx"``: a torch.save zip archive is a checkpoint whatever its name; otherwise the
    suffix tells (``.onnx``; ``.pt``/``.pth``, whose loader says why the file is not a checkpoint). A missing file
    goes by its suffix too (its loader names it). Any other file: :class:`InputError` naming it."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                return "checkpoint"
    except OSError:
        return "onnx" if suffix == ".onnx" else "checkpoint"
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt", ".pth"):
        return "checkpoint"
    raise InputError(f"{path}: neither a multibox checkpoint (a torch.save zip archive, .pt) nor an exported "
                     f"ONNX model (.onnx)")


class Detector:
    """A trained SSD with its preprocessing and postprocessing.

    Args:
        model: the network; cfg: its resolved config; class_names: index 0 = "background".
        category_ids: the data's category id of each label 1..C (``category_ids[label - 1]``, a checkpoint's
            ``category_ids``); None: the fallback of :func:`multibox.data.categories.category_ids_of`.
    """

    def __init__(self, model: SSD, cfg: Config, class_names: Sequence[str], device: torch.device,
                 category_ids: Sequence[int] | None = None):
        self.model = prepare_for_inference(model, cfg, device)
        self.cfg, self.class_names, self.device = cfg, list(class_names), device
        self.category_ids = category_ids_of(self.class_names, None if category_ids is None else list(category_ids))
        self.postprocess: PostProcessor = build_postprocessor(cfg)
        self.transform = build_eval_transform(cfg)
        self.dtype = inference_dtype(cfg)

    def preprocess(self, images: Sequence[Tensor]) -> Tensor:
        """uint8 (3, H_i, W_i) images -> (N, 3, S, S) normalised batch on the device, as evaluation prepares them.

        The uint8 images go to the device first (a quarter of float32's bytes) and are resized there."""
        return self.transform.batch([img.to(self.device, non_blocking=True) for img in images])

    @property
    def score_threshold(self) -> float:
        """The model's own score threshold (``eval.score_threshold``), which ``predict(score=None)`` applies."""
        return self.postprocess.score_threshold

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """``{label: category id}``: what ``detections.json`` writes for each predicted label."""
        return label_to_category_id(self.category_ids)

    @torch.no_grad()
    def predict(self, images: ImageLike | Iterable[ImageLike], score: float | None = None, *, batch_size: int = 16,
                max_det: int | None = None) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` (K, 4) xyxy in the image's pixels, ``scores`` (K,), ``labels`` (K,),
        sorted by score.

        Args:
            images: one image or a sequence of them: paths, PIL images (any mode), (H, W, 3) uint8 RGB arrays,
                (3, H, W) uint8 tensors.
            score: keep scores strictly above it; None: the model's own threshold (``eval.score_threshold``, low:
                right for mAP; about 0.3 suits pictures).
            max_det: at most this many detections per image; None: the model's ``eval.max_per_image``.
        """
        check_limits(score, max_det)
        postprocess = with_limits(self.postprocess, score, max_det)
        results: list[dict[str, Tensor]] = []
        for batch, sizes in image_batches(images, batch_size):
            with autocast(self.device, self.dtype):
                loc, cls = self.model(self.preprocess(batch))
            results += detections_to_cpu(postprocess(loc, cls, self.model.anchors_cxcywh, sizes))
        return results


def load(checkpoint: str | Path, device: str = "auto", precision: str | None = None,
         compile: bool | None = None) -> Detector:
    """Rebuild a detector from a checkpoint alone (weights, config, class names, category ids).

    ``precision`` (auto | fp32 | bf16 | fp16) and ``compile`` override the checkpoint's ``eval.precision`` and
    ``eval.compile``. An exported ONNX model is refused here (:func:`multibox.load` runs it with onnxruntime or
    OpenVINO: :func:`multibox.inference.onnx.load_onnx`)."""
    if model_format(checkpoint) == "onnx":
        raise CheckpointError(f"{checkpoint}: an exported ONNX model, not a checkpoint (multibox.load runs it with "
                              f"onnxruntime or OpenVINO)")
    payload = load_checkpoint(checkpoint)
    cfg = apply_inference_arguments(Config.from_dict(payload["config"]), precision, compile)
    category_ids = category_ids_of(payload["class_names"], payload.get("category_ids"), source=str(checkpoint))
    return Detector(model_from_state_dict(cfg, payload["model"]), cfg, payload["class_names"], resolve_device(device),
                    category_ids)
