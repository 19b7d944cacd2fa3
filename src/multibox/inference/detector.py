"""The Python API: ``multibox.load(checkpoint).predict(images)``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

from multibox.checkpoint import load_checkpoint
from multibox.config import Config
from multibox.core.postprocess import PostProcessor, build_postprocessor, detections_to_cpu
from multibox.data.coco import read_image_rgb
from multibox.data.transforms import build_eval_transform
from multibox.models import SSD, model_from_state_dict
from multibox.runtime import (apply_inference_arguments, autocast, inference_dtype, prepare_for_inference,
                              resolve_device)

ImageLike = Union[str, os.PathLike, Tensor, np.ndarray]


def as_uint8_chw(image: ImageLike) -> Tensor:
    """A path, an (H, W, 3) uint8 array (RGB) or a (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor."""
    if isinstance(image, (str, os.PathLike)):
        return read_image_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, Tensor) and image.ndim == 3 and image.shape[0] == 3 and image.dtype == torch.uint8:
        return image
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def image_batches(images: ImageLike | Sequence[ImageLike], batch_size: int):
    """One image or a sequence -> batches of (uint8 (3, H, W) images, their (H, W) sizes)."""
    if isinstance(images, (str, os.PathLike, Tensor, np.ndarray)):
        images = [images]
    for start in range(0, len(images), batch_size):
        batch = [as_uint8_chw(img) for img in images[start:start + batch_size]]
        yield batch, [tuple(img.shape[-2:]) for img in batch]


class Detector:
    """A trained SSD with its preprocessing and postprocessing.

    Args:
        model: the network; cfg: its resolved config; class_names: index 0 = "background".
    """

    def __init__(self, model: SSD, cfg: Config, class_names: Sequence[str], device: torch.device):
        self.model = prepare_for_inference(model, cfg, device)
        self.cfg, self.class_names, self.device = cfg, list(class_names), device
        self.postprocess: PostProcessor = build_postprocessor(cfg)
        self.transform = build_eval_transform(cfg)
        self.dtype = inference_dtype(cfg, device)

    def preprocess(self, images: Sequence[Tensor]) -> Tensor:
        """uint8 (3, H_i, W_i) images -> (N, 3, S, S) normalised batch on the device, as evaluation prepares them.

        The uint8 images go to the device first (a quarter of float32's bytes) and are resized there."""
        return self.transform.batch([img.to(self.device, non_blocking=True) for img in images])

    @torch.no_grad()
    def predict(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 16) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` (K, 4) xyxy in the image's pixels, ``scores`` (K,), ``labels`` (K,)."""
        results: list[dict[str, Tensor]] = []
        for batch, sizes in image_batches(images, batch_size):
            with autocast(self.device, self.dtype):
                loc, cls = self.model(self.preprocess(batch))
            results += detections_to_cpu(self.postprocess(loc, cls, self.model.anchors_cxcywh, sizes))
        return results


def load(checkpoint: str | Path, device: str = "auto", precision: str | None = None,
         compile: bool | None = None) -> Detector:
    """Rebuild a detector from a checkpoint alone (weights, config, class names).

    ``precision`` (auto | fp32 | bf16 | fp16) and ``compile`` override the checkpoint's ``eval.precision`` and
    ``eval.compile``."""
    payload = load_checkpoint(checkpoint)
    cfg = apply_inference_arguments(Config.from_dict(payload["config"]), precision, compile)
    return Detector(model_from_state_dict(cfg, payload["model"]), cfg, payload["class_names"], resolve_device(device))
