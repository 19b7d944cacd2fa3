"""multibox: SSD object detectors in PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"


def load(checkpoint, device: str = "auto"):
    """Rebuild a detector from a checkpoint; see :func:`multibox.api.load`."""
    from .api import load as _load
    return _load(checkpoint, device)


__all__ = ["load", "__version__"]
