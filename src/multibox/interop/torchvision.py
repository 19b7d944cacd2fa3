"""torchvision's ``ssd300_vgg16`` and ``ssdlite320_mobilenet_v3_large`` weights as multibox checkpoints of the
``ssd300-vgg16`` and ``ssdlite320-mobilenet-v3`` presets, the same functions (SPEC §1, §3), without downloading
anything: :func:`import_torchvision` recognises which of the two a state dict holds.

Every parameter is mapped by name and shape; parameters the source lacks, source entries nothing uses and shape
mismatches fail loudly, listing them (:func:`multibox.models.weights.remap_state_dict`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from multibox.config import Config, load_config
from multibox.models import model_skeleton
from multibox.models.weights import (WeightMappingError, remap_state_dict, torch_load_state_dict, vgg16_feature_indices,
                                     vgg16_trunk_names)

__all__ = ["import_torchvision", "import_torchvision_ssd300", "is_torchvision_detector", "is_torchvision_ssd300",
           "is_torchvision_ssdlite", "torchvision_coco_class_names", "torchvision_detector_state_dict",
           "torchvision_ssd300_pairs", "torchvision_ssd300_state_dict", "torchvision_ssdlite_pairs",
           "torchvision_ssdlite_state_dict"]


POOL4_INDEX = vgg16_feature_indices()[9] + 2     # the max-pool after conv4_3 in vgg16().features (23)


def torchvision_ssd300_pairs(num_levels: int = 6) -> list[tuple[str, str]]:
    """(our name, torchvision name) for every parameter of ``ssd300_vgg16``.

    torchvision keeps conv1_1 .. conv4_3 in ``backbone.features`` (vgg16's indices), conv5 and fc6/fc7 in
    ``backbone.extra.0`` (vgg16's layers from pool4 on: pool4, conv5_1, ReLU, conv5_2, ReLU, conv5_3, ReLU, then a
    Sequential(pool5, fc6, ReLU, fc7, ReLU) at position 7), the extra levels in ``backbone.extra.1..4`` and the
    L2Norm scale as ``backbone.scale_weight``.
    """
    pairs = []
    for ours, index in zip(vgg16_trunk_names(), vgg16_feature_indices()):
        theirs = f"backbone.features.{index}" if index < POOL4_INDEX else f"backbone.extra.0.{index - POOL4_INDEX}"
        pairs += [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]
    pairs.append(("backbone.l2norm.scale", "backbone.scale_weight"))
    for ours, theirs in (("backbone.fc6", "backbone.extra.0.7.1"), ("backbone.fc7", "backbone.extra.0.7.3")):
        pairs += [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]
    for level in range(num_levels - 2):
        for conv in (0, 2):
            ours, theirs = f"backbone.extras.{level}.{conv}", f"backbone.extra.{level + 1}.{conv}"
            pairs += [(f"{ours}.weight", f"{theirs}.weight"), (f"{ours}.bias", f"{theirs}.bias")]
    for level in range(num_levels):
        for ours, theirs in (("loc_heads", "head.regression_head"), ("cls_heads", "head.classification_head")):
            pairs += [(f"{ours}.{level}.weight", f"{theirs}.module_list.{level}.weight"),
                      (f"{ours}.{level}.bias", f"{theirs}.module_list.{level}.bias")]
    return pairs


def torchvision_coco_class_names(num_classes_with_background: int) -> list[str]:
    """torchvision's 91 COCO category slots (index = COCO category id; "N/A" for unused ids), background first,
    from torchvision's own source; ``class_i`` names for any other class count."""
    if num_classes_with_background == 91:
        from torchvision.models.detection import SSD300_VGG16_Weights

        return ["background"] + list(SSD300_VGG16_Weights.COCO_V1.meta["categories"][1:])
    return ["background"] + [f"class_{i}" for i in range(1, num_classes_with_background)]


CLASS_HEAD_KEY = "head.classification_head.module_list.0.weight"   # (4·(1 + C), 512, 3, 3): conv4_3's 4 anchors


def is_torchvision_ssd300(source: Mapping[str, Any]) -> bool:
    """Whether a state dict looks like torchvision's ``ssd300_vgg16`` (its VGG16 trunk and SSD head names)."""
    return CLASS_HEAD_KEY in source and "backbone.scale_weight" in source


def torchvision_ssd300_state_dict(source: Mapping[str, Tensor], origin: str) -> tuple[Config, dict[str, Tensor]]:
    """A torchvision ``ssd300_vgg16`` state dict in multibox's layout: (the ``ssd300-vgg16`` config with the source's
    class count, read from its first class head, and the state dict). Every parameter is mapped by name and shape
    (:func:`torchvision_ssd300_pairs`); anything missing, left over or misshapen is a WeightMappingError."""
    if CLASS_HEAD_KEY not in source:
        raise WeightMappingError(f"{origin}: no {CLASS_HEAD_KEY!r}: not a torchvision ssd300_vgg16 state dict")
    anchors_level0 = 4
    with_background = source[CLASS_HEAD_KEY].shape[0] // anchors_level0
    cfg = load_config("ssd300-vgg16", [f"model.num_classes={with_background - 1}"])
    model = model_skeleton(cfg)
    state = remap_state_dict(source, torchvision_ssd300_pairs(), model.state_dict(),
                             f"torchvision ssd300_vgg16 state dict {origin}")
    model.load_state_dict(state, assign=True)   # proves the result loads strictly
    return cfg, model.state_dict()


SSDLITE_CLASS_KEY = "head.classification_head.module_list.0.1.weight"   # (6·(1 + C), 672, 1, 1): the 1x1 conv
SSDLITE_EXTRA_KEY = "backbone.extra.0.0.0.weight"
REDUCED_TAIL_CHANNELS = 480


def is_torchvision_ssdlite(source: Mapping[str, Any]) -> bool:
    """Whether a state dict looks like torchvision's ``ssdlite320_mobilenet_v3_large`` (its split MobileNetV3 trunk,
    extra levels and SSDLite head names)."""
    return SSDLITE_CLASS_KEY in source and SSDLITE_EXTRA_KEY in source


def torchvision_ssdlite_pairs(target_names: list[str], num_levels: int = 6) -> list[tuple[str, str]]:
    """(our name, torchvision name) for every entry of ``ssdlite320_mobilenet_v3_large``: the backbone has
    torchvision's names (``backbone.features.*``, ``backbone.extra.*``); each head level is torchvision's
    ``module_list.K`` = Sequential(Conv2dNormActivation(depthwise, BN, ReLU6), 1x1 conv), ours the flat
    Sequential(depthwise, BN, ReLU6, 1x1): ``.0.0`` -> ``.0``, ``.0.1`` -> ``.1``, ``.1`` -> ``.3``."""
    pairs = [(name, name) for name in target_names if name.startswith("backbone.")]
    for level in range(num_levels):
        for ours, theirs in (("loc_heads", "head.regression_head"), ("cls_heads", "head.classification_head")):
            src = f"{theirs}.module_list.{level}"
            pairs.append((f"{ours}.{level}.0.weight", f"{src}.0.0.weight"))
            pairs += [(f"{ours}.{level}.1.{p}", f"{src}.0.1.{p}")
                      for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
            pairs += [(f"{ours}.{level}.3.{p}", f"{src}.1.{p}") for p in ("weight", "bias")]
    return pairs


def torchvision_ssdlite_state_dict(source: Mapping[str, Tensor], origin: str) -> tuple[Config, dict[str, Tensor]]:
    """A torchvision ``ssdlite320_mobilenet_v3_large`` state dict in multibox's layout: (the
    ``ssdlite320-mobilenet-v3`` config with the source's class count, read from its first class head, and its
    tail — reduced for the COCO model, full when trained from ImageNet weights — and the state dict)."""
    if not is_torchvision_ssdlite(source):
        raise WeightMappingError(f"{origin}: not a torchvision ssdlite320_mobilenet_v3_large state dict")
    anchors_level0 = 6
    with_background = source[SSDLITE_CLASS_KEY].shape[0] // anchors_level0
    # The first extra level reads the trunk's last layer: 480 channels with the reduced tail, 960 with the full one.
    reduced = source[SSDLITE_EXTRA_KEY].shape[1] == REDUCED_TAIL_CHANNELS
    cfg = load_config("ssdlite320-mobilenet-v3", [f"model.num_classes={with_background - 1}",
                                                  f"model.reduced_tail={str(reduced).lower()}"])
    model = model_skeleton(cfg)
    target = model.state_dict()
    state = remap_state_dict(source, torchvision_ssdlite_pairs(list(target)), target,
                             f"torchvision ssdlite320_mobilenet_v3_large state dict {origin}")
    model.load_state_dict(state, assign=True)
    return cfg, model.state_dict()


def is_torchvision_detector(source: Mapping[str, Any]) -> bool:
    """Whether a state dict is one of the torchvision detectors multibox converts (SSD300 or SSDLite)."""
    return is_torchvision_ssd300(source) or is_torchvision_ssdlite(source)


def torchvision_detector_state_dict(source: Mapping[str, Tensor], origin: str) -> tuple[Config, dict[str, Tensor]]:
    """:func:`torchvision_ssd300_state_dict` or :func:`torchvision_ssdlite_state_dict`, whichever network the
    state dict holds (recognised by its names); anything else is a WeightMappingError."""
    if is_torchvision_ssdlite(source):
        return torchvision_ssdlite_state_dict(source, origin)
    if is_torchvision_ssd300(source):
        return torchvision_ssd300_state_dict(source, origin)
    raise WeightMappingError(f"{origin}: neither torchvision's ssd300_vgg16 nor its ssdlite320_mobilenet_v3_large "
                             f"(no {CLASS_HEAD_KEY!r} or {SSDLITE_CLASS_KEY!r})")


def import_torchvision(state_dict_path: str | Path) -> dict[str, Any]:
    """A torchvision ``ssd300_vgg16`` or ``ssdlite320_mobilenet_v3_large`` state dict -> checkpoint payload of the
    ``ssd300-vgg16`` or ``ssdlite320-mobilenet-v3`` preset (recognised from the names; see
    :func:`import_torchvision_ssd300` for what the payload holds)."""
    cfg, state = torchvision_detector_state_dict(torch_load_state_dict(state_dict_path), str(state_dict_path))
    return _payload(cfg, state, state_dict_path)


def _payload(cfg: Config, state: dict[str, Tensor], path: str | Path) -> dict[str, Any]:
    with_background = cfg.model.num_classes + 1
    return {"model": state, "config": cfg.to_dict(),
            "class_names": torchvision_coco_class_names(with_background),
            # torchvision's label is the COCO category id (91 slots, "N/A" gaps kept): label i -> id i
            "category_ids": list(range(1, with_background)),
            "imported_from": f"torchvision:{Path(path).name}"}


def import_torchvision_ssd300(state_dict_path: str | Path) -> dict[str, Any]:
    """A torchvision ``ssd300_vgg16`` state dict -> checkpoint payload of the ``ssd300-vgg16`` preset.

    The number of classes is read from the classification head (torchvision counts the background: 91 for COCO,
    whose labels are COCO category ids 1..90 with unused slots). Outputs are the same function: loc offsets are
    (dx, dy, dw, dh) with variances 0.1/0.2 in both (torchvision's BoxCoder weights 10, 10, 5, 5), the default boxes
    come in torchvision's order (``anchors.extra_box_second``) and the input is normalised as torchvision does
    (``data.resize: torchvision``).

    Returns:
        dict with ``model`` (state dict), ``config`` (``Config.to_dict()``), ``class_names``, ``category_ids``
        (label i -> COCO category id i) and ``imported_from``;
        save it with :func:`multibox.checkpoint.save_checkpoint`.
    """
    cfg, state = torchvision_ssd300_state_dict(torch_load_state_dict(state_dict_path), str(state_dict_path))
    return _payload(cfg, state, state_dict_path)
