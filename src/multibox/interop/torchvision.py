"""torchvision's ``ssd300_vgg16`` weights as a multibox checkpoint of the ``ssd300-vgg16`` preset, the same function
(SPEC §3), without downloading anything: :func:`import_torchvision_ssd300`.

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

__all__ = ["import_torchvision_ssd300", "is_torchvision_ssd300", "torchvision_coco_class_names",
           "torchvision_ssd300_pairs", "torchvision_ssd300_state_dict"]


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
    with_background = cfg.model.num_classes + 1
    return {"model": state, "config": cfg.to_dict(),
            "class_names": torchvision_coco_class_names(with_background),
            # torchvision's label is the COCO category id (91 slots, "N/A" gaps kept): label i -> id i
            "category_ids": list(range(1, with_background)),
            "imported_from": f"torchvision:{Path(state_dict_path).name}"}
