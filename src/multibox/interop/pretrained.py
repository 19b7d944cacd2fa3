"""The initial weights of a new training run (``multibox train --weights NAME|FILE``, ``model.backbone_weights``;
SPEC §3, §4): a detector fine-tuned onto the run's classes, or ImageNet weights of the trunk.

The files are resolved before any data is read (:func:`multibox.models.published.plan_initial_weights`); here they
are loaded into the model :func:`multibox.engine.fit` builds for the data's classes (:func:`prepare_for_training`).
A detector brings its backbone and box (loc) head; of its class head the background row and the rows of the
classes whose names match the run's are kept, the other rows keep the model's own initialisation
(:func:`multibox.models.weights.transfer_detector_weights`). Detector files: a torchvision ``ssd300_vgg16`` or
``ssdlite320_mobilenet_v3_large`` state dict (``ssd300_vgg16_coco``, ``ssdlite320_mobilenet_v3_large_coco``; their
classes are COCO's names as torchvision lists them) or a multibox checkpoint of the same arch (its ``class_names``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from multibox.checkpoint import FORMAT as CHECKPOINT_FORMAT
from multibox.config import Config
from multibox.interop.mindspore import is_mindspore_ckpt, load_mindspore_backbone
from multibox.interop.torchvision import (is_torchvision_detector, torchvision_coco_class_names,
                                          torchvision_detector_state_dict)
from multibox.models import freeze_backbone
from multibox.models.published import (VGG16_STAGES, InitialWeights, plan_initial_weights,
                                       trainable_backbone_stages)
from multibox.models.weights import (WeightMappingError, as_state_dict, load_backbone, torch_load_file,
                                     transfer_detector_weights)

__all__ = ["load_detector_weights", "load_initial_weights", "plan_initial_weights", "prepare_for_training"]

logger = logging.getLogger("multibox.train")


def prepare_for_training(model: nn.Module, cfg: Config, initial: InitialWeights | None,
                         class_names: Sequence[str]) -> None:
    """Load ``initial`` (None: a resumed run, whose checkpoint holds the weights) into ``model``, built for
    ``class_names``, then freeze the VGG16 stages ``cfg`` does not train (every run, resumed ones too: the optimizer
    state must see the same parameters)."""
    if initial is not None:
        load_initial_weights(model, cfg, initial, class_names)
    frozen = freeze_backbone(model, cfg)
    if frozen:
        trainable = trainable_backbone_stages(cfg)
        logger.info(f"frozen: VGG16 {', '.join(f'conv{i + 1}_x' for i in range(VGG16_STAGES - trainable))} "
                    f"({len(frozen)} parameters; {trainable} of {VGG16_STAGES} stages train, "
                    "model.trainable_backbone_layers: torchvision trains 4 from pretrained weights)")


def load_initial_weights(model: nn.Module, cfg: Config, initial: InitialWeights, class_names: Sequence[str]) -> None:
    """The detector of ``initial`` (fine-tuned onto ``class_names``), else its ImageNet backbone, into ``model``."""
    if initial.detector is not None:
        load_detector_weights(model, cfg, initial.detector, class_names, initial.detector_source)
    elif initial.backbone is not None and is_mindspore_ckpt(initial.backbone):
        load_mindspore_backbone(model, cfg.model.arch, initial.backbone,
                                _named(initial.backbone_source, initial.backbone))
    elif initial.backbone is not None:
        load_backbone(model, initial.backbone, _named(initial.backbone_source, initial.backbone))


def _named(source: str | None, path: Path) -> str:
    """How messages name a weights file: as configured, with the resolved path when it differs."""
    return str(path) if source in (None, str(path)) else f"{source} ({path})"


def load_detector_weights(model: nn.Module, cfg: Config, path: Path, class_names: Sequence[str],
                          source: str | None = None) -> dict[str, list[str]]:
    """Fine-tuning's start: the detector in ``path`` into ``model`` (``cfg``'s arch, built for ``class_names``),
    class rows matched by name; logs one line with the classes kept and the new ones.

    A file with ImageNet VGG16 weights (``--weights vgg16.pth``) initialises the backbone instead. Raises
    WeightMappingError: not a detector this arch can take (another arch: one line naming both), or shapes that
    differ (another head or anchor layout).
    """
    origin = _named(source, path) if source is None else f"--weights {_named(source, path)}"
    raw = torch_load_file(path)
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:
        state, source_classes = _checkpoint_weights(raw, cfg, origin)
    else:
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):   # torchvision's reference checkpoints
            raw = raw["model"]
        if not isinstance(raw, dict) or not (is_torchvision_detector(raw) or "features.0.weight" in raw
                                             or "31.weight" in raw or "features.0.0.weight" in raw):
            raise WeightMappingError(f"{origin}: neither a multibox checkpoint, a torchvision ssd300_vgg16 or "
                                     "ssdlite320_mobilenet_v3_large state dict nor ImageNet backbone weights")
        if not is_torchvision_detector(raw):
            load_backbone(model, raw, origin)
            return {"kept": [], "new": list(class_names[1:])}
        source_cfg, state = torchvision_detector_state_dict(as_state_dict(raw, origin), origin)
        if source_cfg.model.arch != cfg.model.arch:
            preset = source_cfg.model.arch.replace("_", "-")
            raise WeightMappingError(f"{origin}: torchvision weights of model.arch {source_cfg.model.arch} "
                                     f"(--config {preset}), and this run builds {cfg.model.arch}")
        source_classes = torchvision_coco_class_names(source_cfg.model.num_classes + 1)
    report = transfer_detector_weights(model, state, source_classes, class_names, origin)
    logger.info(f"fine-tuning from {origin}: backbone and box head kept; class rows kept for "
                f"{len(report['kept'])} classes ({', '.join(report['kept']) or 'none'}) and the background; "
                f"{len(report['new'])} new, initialised fresh ({', '.join(report['new']) or 'none'})")
    return report


def _checkpoint_weights(payload: dict[str, Any], cfg: Config, origin: str) -> tuple[dict, list[str]]:
    """(state dict, class names) of a multibox checkpoint payload whose arch is ``cfg``'s (one line otherwise)."""
    arch = (payload.get("config") or {}).get("model", {}).get("arch")
    if arch != cfg.model.arch:
        raise WeightMappingError(f"{origin}: a checkpoint of model.arch {arch}, and this run builds "
                                 f"{cfg.model.arch}: --weights takes a checkpoint of the same arch")
    names = payload.get("class_names")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise WeightMappingError(f"{origin}: the checkpoint has no class_names (a list of strings)")
    return as_state_dict(payload, origin), names
