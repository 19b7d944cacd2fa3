"""multibox: SSD object detectors in PyTorch."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multibox.inference.detector import Detector

__version__ = "0.1.0"


def load(checkpoint: str | Path, device: str = "auto", precision: str | None = None,
         compile: bool | None = None) -> Detector:
    """Rebuild a detector from a checkpoint; see :func:`multibox.inference.detector.load`."""
    # Imported here: ``import multibox`` (and so ``multibox --help``) stays free of torch.
    from multibox.inference.detector import load as _load
    return _load(checkpoint, device, precision, compile)


__all__ = ["load", "__version__"]
