"""multibox: SSD object detectors in PyTorch."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multibox.inference.detector import Detector
    from multibox.inference.onnx import OnnxDetector

__version__ = "0.1.0"


def load(checkpoint: str | Path, device: str = "auto", precision: str | None = None,
         compile: bool | None = None, runtime: str = "auto") -> Detector | OnnxDetector:
    """A detector of a checkpoint (``.pt``: :func:`multibox.inference.detector.load`, PyTorch) or of an exported
    model (``.onnx``: :func:`multibox.inference.onnx.load_onnx`, run by ``runtime``: "auto" (OpenVINO on the CPU
    where it is installed, else onnxruntime), "openvino" or "onnxruntime"). Both predict alike:
    ``predict(images, score=None, batch_size=16)`` -> per image ``boxes`` (K, 4) xyxy pixels, ``scores``, ``labels``.
    Any other file: a :class:`~multibox.errors.MultiboxError` naming it."""
    # Imported here: ``import multibox`` (and so ``multibox --help``) stays free of torch.
    from multibox.inference.detector import load as _load, model_format
    if model_format(checkpoint) == "onnx":
        from multibox.inference.onnx import load_onnx
        return load_onnx(checkpoint, device, precision, compile, runtime=runtime)
    if runtime != "auto":
        from multibox.errors import InputError
        raise InputError(f"{checkpoint}: runtime applies to exported ONNX models; a checkpoint runs in PyTorch")
    return _load(checkpoint, device, precision, compile)


__all__ = ["load", "__version__"]
