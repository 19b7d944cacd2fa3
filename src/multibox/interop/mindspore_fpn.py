"""A ``mindspore.save_checkpoint`` file of the MindSpore model zoo's SSD-MobileNetV1-FPN or SSD-ResNet50-FPN
(``SsdMobilenetV1Fpn`` / ``SsdResNet50Fpn``; mindspore-ai/mindspore, model_zoo/official/cv/ssd/src/ssd.py, fpn.py)
as a multibox checkpoint of the ``ssd640-mobilenet-v1-fpn`` / ``ssd640-resnet50-fpn`` preset (one of
:data:`multibox.interop.mindspore.MINDSPORE_NETWORKS`).

Parameter names of the zoo networks (a checkpoint saved from its training wrapper prefixes them all with
``network.``, which :func:`~multibox.interop.mindspore.import_mindspore_ckpt` strips), next to ours:

- ``feature_extractor.mobilenet_v1.network.{i}.{0: conv, 1: BN}`` / ``feature_extractor.resnet.*`` (the same
  names below it): ``backbone.body.*``; ``feature_extractor.fpn.{lateral,fpn}_convs_list.*``: ``backbone.fpn.*``;
  ``feature_extractor.bottom_up.blocks.{i}``: ``backbone.bottom_up.{i}``;
- ``multi_box.addition_layer_{loc,cls}.{level}.{j}.features.0``: the tower convolution j, one Parameter shared by
  every level, which MindSpore names after level 0 only: ``head.{loc,cls}_tower.{j}``;
  ``....{level}.{j}.features.1``: that level's BatchNorm, ``head.{loc,cls}_norms.{level}.{j}``;
- ``multi_box.{loc,cls}_layers.0``: the shared predictors, ``head.{loc,cls}_predictor``.

BatchNorm's gamma, beta, moving_mean, moving_variance are PyTorch's weight, bias, running_mean, running_var.

:func:`load_trunk` (``model.backbone_weights: FILE.ckpt``, one of
:data:`multibox.interop.mindspore.MINDSPORE_BACKBONES`) initialises the trunk alone from an ImageNet checkpoint of
the zoo's classification network, as the SSD's train.py does with ``feature_extractor_base_param``.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch import nn

from multibox.config import load_config
from multibox.interop.mindspore import BATCHNORM_LEAVES, imported_payload
from multibox.models import model_skeleton
from multibox.models.fpn import FPNBackbone, MobileNetV1Trunk, ResNet50Trunk
from multibox.models.weights import WeightMappingError, describe_names, remap_state_dict

__all__ = ["IMAGENET_TRUNKS", "NETWORKS", "convert", "imagenet_trunk_pairs", "load_trunk", "recognise",
           "zoo_fpn_pairs"]

logger = logging.getLogger("multibox.models")

# preset -> the zoo's name of the trunk cell under feature_extractor, and a parameter only that trunk has.
NETWORKS = {
    "ssd640-mobilenet-v1-fpn": ("mobilenet_v1", "feature_extractor.mobilenet_v1.network.0.0.weight"),
    "ssd640-resnet50-fpn": ("resnet", "feature_extractor.resnet.conv1.weight"),
}
_HEAD_MARK = "multi_box.addition_layer_loc.0.0.features.0.weight"


def _zoo_module_name(ours: str, trunk: str) -> str:
    """Our module path -> the zoo cell's (see the module docstring)."""
    rules = [(r"^backbone\.body\.", f"feature_extractor.{trunk}."),
             (r"^backbone\.fpn\.", "feature_extractor.fpn."),
             (r"^backbone\.bottom_up\.", "feature_extractor.bottom_up.blocks."),
             (r"^head\.(loc|cls)_tower\.(\d+)$", r"multi_box.addition_layer_\1.0.\2.features.0"),
             (r"^head\.(loc|cls)_norms\.(\d+)\.(\d+)$", r"multi_box.addition_layer_\1.\2.\3.features.1"),
             (r"^head\.(loc|cls)_predictor$", r"multi_box.\1_layers.0")]
    for pattern, replacement in rules:
        name, n = re.subn(pattern, replacement, ours)
        if n:
            return name
    raise WeightMappingError(f"internal mapping: no zoo name for module {ours!r}")


def zoo_fpn_pairs(model: nn.Module, trunk: str) -> list[tuple[str, str]]:
    """(our name, zoo name) for every parameter and BatchNorm statistic of ``model`` (an SSD of an FPN preset)."""
    pairs = []
    for module_name, module in model.named_modules():
        leaves = [name for name, _ in module.named_parameters(recurse=False)]
        if isinstance(module, nn.BatchNorm2d):
            leaves += ["running_mean", "running_var"]
        if not leaves:
            continue
        theirs = _zoo_module_name(module_name, trunk)
        bn = isinstance(module, nn.BatchNorm2d)
        pairs += [(f"{module_name}.{leaf}", f"{theirs}.{BATCHNORM_LEAVES[leaf] if bn else leaf}") for leaf in leaves]
    return pairs


def _preset_of(names: Mapping[str, Any]) -> str | None:
    if _HEAD_MARK not in names:
        return None
    return next((preset for preset, (_, mark) in NETWORKS.items() if mark in names), None)


def recognise(source: Mapping[str, np.ndarray]) -> bool:
    """Whether ``source`` is (an attempt at) one of the zoo's SSD-FPN networks: the weight-shared head's first
    loc tower convolution and the MobileNetV1 or ResNet50 trunk's stem (a training network's ``network.`` prefix
    already removed, :func:`~multibox.interop.mindspore.import_mindspore_ckpt`)."""
    return _preset_of(source) is not None


def convert(source: Mapping[str, np.ndarray], path: Path) -> dict[str, Any]:
    """A checkpoint of the zoo's SSD-MobileNetV1-FPN or SSD-ResNet50-FPN -> checkpoint payload of the matching
    preset (81 classes: the zoo's ``classes``, background then COCO's 80 names in id order, as the tutorial's).

    Every parameter is mapped by name and shape (:func:`zoo_fpn_pairs`); missing or left-over entries are an
    error. The zoo encodes boxes as (cy, cx, h, w) (box_utils.py ``ssd_bboxes_encode``), so its loc outputs are
    (dy, dx, dh, dw) per anchor: the shared loc predictor's output channels are swapped (:func:`swap_yx_offsets`)
    to our (dx, dy, dw, dh). Default boxes are the zoo's grid anchors in its order (the preset's anchors.sizes).
    """
    path = Path(path)
    preset = _preset_of(source)
    if preset is None:
        raise WeightMappingError(f"{path}: not a MindSpore model-zoo SSD-FPN checkpoint")
    cfg = load_config(preset)
    model = model_skeleton(cfg)
    predictor = source.get("multi_box.cls_layers.0.weight")
    expected = model.head.cls_predictor.weight.shape[0]
    if predictor is not None and predictor.shape[0] != expected:
        raise WeightMappingError(f"{path}: its class predictor has {predictor.shape[0]} outputs; the zoo's COCO "
                                 f"network ({preset}) has {expected} (6 boxes x 81 classes)")
    return imported_payload(cfg, model, source, zoo_fpn_pairs(model, NETWORKS[preset][0]), ["head.loc_predictor"],
                            path)


# Our trunk class -> (the zoo's ImageNet classification network, its classifier's entry prefix, the format name).
# train.py (ssd_model_build) prefixes every entry x of feature_extractor_base_param with
# "network.feature_extractor.<trunk>." and calls load_param_into_net on the trunk cell alone, whose parameters
# are named "feature_extractor.<trunk>.<...>": its prefix fallback (a file name that ends with the parameter's)
# then loads entry x into parameter "feature_extractor.<trunk>.x". So a file entry's name is the trunk-relative
# name, the same below the trunk in the classification networks (official/cv/mobilenetv1 src/mobilenet_v1.py:
# ``network.{i}.{0,1}``, ``fc``; official/cv/resnet src/resnet.py: ``conv1``, ``bn1``, ``layer{1-4}.{j}.*``,
# ``end_point``) and the SSD's trunks (ssd/src/mobilenet_v1.py, ssd/src/resnet.py). The classifier lies outside
# the trunk cell and is never loaded.
# A file carries no BatchNorm eps: the trunk keeps the SSD's (ResNet50 1e-3, where the classification net has 1e-4).
IMAGENET_TRUNKS: dict[type, tuple[str, str, str]] = {
    MobileNetV1Trunk: ("MobileNetV1 (official/cv/mobilenetv1)", "fc.", "mindspore_zoo_mobilenet_v1"),
    ResNet50Trunk: ("ResNet50 (official/cv/resnet)", "end_point.", "mindspore_zoo_resnet50"),
}


def imagenet_trunk_pairs(body: nn.Module) -> list[tuple[str, str]]:
    """(our name under ``backbone.body``, the classification checkpoint's name) for every parameter and BatchNorm
    statistic of a zoo trunk (:class:`MobileNetV1Trunk` / :class:`ResNet50Trunk`): the same path, BatchNorm leaves
    renamed (``num_batches_tracked`` has no counterpart)."""
    pairs = []
    for module_name, module in body.named_modules():
        bn = isinstance(module, nn.BatchNorm2d)
        leaves = [name for name, _ in module.named_parameters(recurse=False)]
        leaves += ["running_mean", "running_var"] if bn else []
        pairs += [(f"{module_name}.{leaf}", f"{module_name}.{BATCHNORM_LEAVES[leaf] if bn else leaf}")
                  for leaf in leaves]
    return pairs


def load_trunk(model: nn.Module, source: Mapping[str, np.ndarray], origin: str) -> dict[str, Any]:
    """ImageNet weights of the zoo's classification MobileNetV1 or ResNet50 (``source``: name -> array of its
    ``mindspore.save_checkpoint`` file, training state already dropped) into the trunk ``model.backbone.body`` of
    an SSD-FPN, as the zoo's train.py loads ``feature_extractor_base_param``; the FPN, bottom-up levels and head
    keep their initialisation.

    Every trunk parameter and BatchNorm statistic is mapped by name and shape (:func:`imagenet_trunk_pairs`); the
    classifier's entries (``fc.*`` / ``end_point.*``) are not used; a missing trunk entry, a shape mismatch or any
    other left-over entry is a WeightMappingError naming them. Returns ``{"format": ..., "tensors": n}``.
    """
    backbone = getattr(model, "backbone", None)
    body = getattr(backbone, "body", None) if isinstance(backbone, FPNBackbone) else None
    if type(body) not in IMAGENET_TRUNKS:
        raise WeightMappingError(f"{origin}: a model-zoo ImageNet trunk initialises the MobileNetV1 or ResNet50 "
                                 f"trunk of an SSD-FPN, not {type(backbone).__name__}")
    network, classifier, fmt = IMAGENET_TRUNKS[type(body)]
    pairs = imagenet_trunk_pairs(body)
    theirs = {name for _, name in pairs}
    source = dict(source)
    if source and all(k not in theirs and f"network.{k}" in theirs for k in source):
        # A MobileNetV1 file without its classifier: the reader took its "network." for a training wrapper's.
        source = {f"network.{k}": v for k, v in source.items()}
    if pairs[0][1] not in source:
        raise WeightMappingError(f"{origin}: not an ImageNet checkpoint of the model zoo's {network} (no "
                                 f"{pairs[0][1]}; it holds {describe_names(source, limit=4)}); a whole SSD "
                                 "checkpoint is imported with multibox import-weights --from mindspore")
    target = {k: v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    ignored = [k for k in source if k.startswith(classifier)]
    state = remap_state_dict(source, pairs, target, f"{network} ImageNet weights {origin}", ignored=ignored)
    body.load_state_dict(state, strict=False)   # the trunk only; num_batches_tracked keeps its value
    logger.info(f"{network} ImageNet weights from {origin}: {len(state)} trunk tensors; the classifier "
                f"({classifier}*) is not used, FPN, bottom-up levels and head keep their initialisation")
    return {"format": fmt, "tensors": len(state)}
