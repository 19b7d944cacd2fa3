"""A ``mindspore.save_checkpoint`` file of the MindSpore model zoo's ``ssd300`` (``SSD300`` on
``SSDWithMobileNetV2``; mindspore-ai/mindspore, model_zoo/official/cv/ssd/src/ssd.py) as a multibox checkpoint of
the ``ssd300-mobilenet-v2`` preset (one of :data:`multibox.interop.mindspore.MINDSPORE_NETWORKS`).

Parameter names of the zoo network (a checkpoint of its training network has them under ``network.``, which
:func:`~multibox.interop.mindspore.import_mindspore_ckpt` removes before :func:`recognise` sees them):

- ``backbone.features_1.{0..13}`` / ``backbone.features_2.{0..4}``: MobileNetV2's ``features`` cut at 14 (ours
  ``backbone.features.{0..18}``); a ``ConvBNReLU`` is ``.features.{0: conv, 1: BatchNorm}``, an inverted residual
  ``.conv.{j}`` (ConvBNReLU cells, then the 1x1 projection and its BatchNorm);
- ``backbone.expand_layer_conv_13`` (ours ``backbone.expand_13``), ``multi_residual.{0..3}`` (ours
  ``backbone.extras``), ``multi_box.multi_{loc,cls}_layers.{k}.{0, 1, 3}`` (ours ``{loc,cls}_heads.{k}``).

BatchNorm's gamma, beta, moving_mean, moving_variance are PyTorch's weight, bias, running_mean, running_var.

:func:`load_trunk` (``model.backbone_weights: FILE.ckpt``, via
:func:`~multibox.interop.mindspore.load_mindspore_backbone`) takes the ImageNet checkpoint of the zoo's own
classifier instead, official/cv/mobilenetv2 (src/models.py ``define_net``: ``MobileNetV2Combine`` of
``MobileNetV2Backbone`` and ``MobileNetV2Head``, built with ``auto_prefix=False``, so its entries are
``features.{0..18}.*`` and the classifier's ``head.{1,2}.*``, or ``dense.*`` in mindspore-ai/models' copy).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from torch import nn

from multibox.config import load_config
from multibox.interop.mindspore import batchnorm_pairs, imported_payload, separable_head_pairs
from multibox.models import model_skeleton
from multibox.models.mobilenet_v2 import EXTRAS, MOBILENET_V2_STAGES, SPLIT, SSDMobileNetV2Backbone
from multibox.models.weights import WeightMappingError, describe_names, remap_state_dict

__all__ = ["IMAGENET_CLASSIFIER_PREFIXES", "IMAGENET_TRUNK_PREFIXES", "PRESET", "convert",
           "imagenet_mobilenet_v2_pairs", "load_trunk", "recognise", "zoo_mobilenet_v2_pairs"]

logger = logging.getLogger("multibox.models")

PRESET = "ssd300-mobilenet-v2"
NUM_LEVELS = 6


def _conv_bn_relu(ours: str, theirs: str) -> list[tuple[str, str]]:
    """Our ``conv_bn_relu6`` Sequential (0: conv, 1: BN) <- the zoo's ``ConvBNReLU`` (``.features.0/1``)."""
    return [(f"{ours}.0.weight", f"{theirs}.features.0.weight")] + batchnorm_pairs(f"{ours}.1", f"{theirs}.features.1")


def _inverted_residual(ours: str, theirs: str, expands: bool) -> list[tuple[str, str]]:
    """``.conv.{j}``: [expansion ConvBNReLU], depthwise ConvBNReLU, 1x1 projection, BN: the same indices in both."""
    pairs, j = [], 0
    for _ in range(2 if expands else 1):
        pairs += _conv_bn_relu(f"{ours}.conv.{j}", f"{theirs}.conv.{j}")
        j += 1
    pairs.append((f"{ours}.conv.{j}.weight", f"{theirs}.conv.{j}.weight"))
    return pairs + batchnorm_pairs(f"{ours}.conv.{j + 1}", f"{theirs}.conv.{j + 1}")


def _trunk_name(index: int) -> str:
    """The zoo's name of MobileNetV2 ``features[index]``: the trunk is held as two cells cut at :data:`SPLIT`."""
    return f"backbone.features_1.{index}" if index < SPLIT else f"backbone.features_2.{index - SPLIT}"


def _mobilenet_v2_trunk_pairs(name_of: Callable[[int], str]) -> list[tuple[str, str]]:
    """(our name, theirs) for MobileNetV2's 19 ``features`` (ours ``backbone.features.{i}``), theirs at
    ``name_of(i)``: the stem and last ConvBNReLU, the 17 inverted residuals between (same inner indices)."""
    pairs = _conv_bn_relu("backbone.features.0", name_of(0))
    index = 1
    for t, _, n, _ in MOBILENET_V2_STAGES:
        for _ in range(n):
            pairs += _inverted_residual(f"backbone.features.{index}", name_of(index), expands=t != 1)
            index += 1
    return pairs + _conv_bn_relu(f"backbone.features.{index}", name_of(index))


def zoo_mobilenet_v2_pairs(num_levels: int = NUM_LEVELS) -> list[tuple[str, str]]:
    """(our name, zoo name) for every parameter and BatchNorm statistic of the zoo's ``ssd300`` network."""
    pairs = _mobilenet_v2_trunk_pairs(_trunk_name)
    pairs += _conv_bn_relu("backbone.expand_13", "backbone.expand_layer_conv_13")
    for e, (_, _, _, t) in enumerate(EXTRAS):
        pairs += _inverted_residual(f"backbone.extras.{e}", f"multi_residual.{e}", expands=t != 1)
    return pairs + separable_head_pairs(num_levels)


def recognise(source: Mapping[str, np.ndarray]) -> bool:
    """Whether ``source`` is (an attempt at) the zoo's ``ssd300``: it has MobileNetV2's stem convolution under the
    zoo's two-part trunk and the separate ``expand_layer_conv_13``."""
    return ("backbone.features_1.0.features.0.weight" in source
            and "backbone.expand_layer_conv_13.features.0.weight" in source)


def convert(source: Mapping[str, np.ndarray], path: Path) -> dict[str, Any]:
    """A checkpoint of the zoo's ``ssd300`` -> checkpoint payload of ``ssd300-mobilenet-v2`` (81 classes: the zoo's
    ``classes``, background then COCO's 80 names in id order, as the tutorial's).

    Every parameter is mapped by name and shape (:func:`zoo_mobilenet_v2_pairs`); missing or left-over entries
    are an error. The zoo encodes boxes as (cy, cx, h, w) (box_utils.py ``ssd_bboxes_encode``), so its loc outputs
    are (dy, dx, dh, dw) per anchor: the loc heads' last 1x1 convolutions get their output channels swapped
    (:func:`swap_yx_offsets`) to our (dx, dy, dw, dh). Default boxes are in the zoo's order in the preset.
    """
    cfg = load_config(PRESET)
    return imported_payload(cfg, model_skeleton(cfg), source, zoo_mobilenet_v2_pairs(),
                            [f"loc_heads.{k}.3" for k in range(NUM_LEVELS)], Path(path))


# Where an ImageNet checkpoint of the zoo's MobileNetV2 (official/cv/mobilenetv2/src/mobilenetV2.py) keeps
# ``features[i]``: ``features.{i}`` from ``MobileNetV2Combine`` (define_net, mindspore_hub_conf.py; auto_prefix=False)
# or ``MobileNetV2Backbone`` alone, which the SSD's init_params.py ``load_backbone_params`` reads (it turns
# ``backbone.features_1.{i}`` into ``features.{i}`` and ``backbone.features_2.{i}`` into ``features.{i + 14}``);
# ``backbone.{i}`` from the same file's ``MobileNetV2`` class, which holds the features cell as ``self.backbone``.
IMAGENET_TRUNK_PREFIXES = ("features.", "backbone.")
# The ImageNet classifier, which the SSD does not use: MobileNetV2Head's Dense, ``head.1`` (``head.2`` with dropout)
# in mindspore-ai/mindspore's copy, ``dense`` in mindspore-ai/models'.
IMAGENET_CLASSIFIER_PREFIXES = ("head.", "dense.")


def imagenet_mobilenet_v2_pairs(prefix: str = "features.") -> list[tuple[str, str]]:
    """(our name, checkpoint name) for MobileNetV2's trunk (ours ``backbone.features.{0..18}``, 260 entries with
    BatchNorm statistics) in an ImageNet checkpoint whose ``features[i]`` is ``{prefix}{i}``
    (:data:`IMAGENET_TRUNK_PREFIXES`)."""
    return _mobilenet_v2_trunk_pairs(lambda index: f"{prefix}{index}")


def _imagenet_prefix(source: Mapping[str, np.ndarray], origin: str) -> str:
    """The :data:`IMAGENET_TRUNK_PREFIXES` entry under which ``source`` holds the stem convolution."""
    for prefix in IMAGENET_TRUNK_PREFIXES:
        if f"{prefix}0.features.0.weight" in source:
            return prefix
    if recognise(source):
        raise WeightMappingError(f"{origin}: a checkpoint of the zoo's whole ssd300, not of its ImageNet MobileNetV2: "
                                 "import it with `multibox import-weights --from mindspore` and start from the "
                                 "result (--weights FILE.pt)")
    stems = " or ".join(f"{p}0.features.0.weight" for p in IMAGENET_TRUNK_PREFIXES)
    raise WeightMappingError(f"{origin}: not an ImageNet checkpoint of the MindSpore model zoo's MobileNetV2 (no stem "
                             f"convolution {stems}; it has {describe_names(source, limit=4)})")


def load_trunk(model: nn.Module, source: Mapping[str, np.ndarray], origin: str) -> dict[str, Any]:
    """The ImageNet weights of the zoo's MobileNetV2 (``source``: name -> array of its ``mindspore.save_checkpoint``
    file, training state already dropped) into the trunk ``backbone.features`` of an ``ssd300_mobilenet_v2`` model,
    as the SSD's ``load_backbone_params`` would (init_params.py): the tensors as they are, by name and shape.

    Every trunk entry of ours must be in the file (:func:`imagenet_mobilenet_v2_pairs`); the classifier
    (:data:`IMAGENET_CLASSIFIER_PREFIXES`) is ignored; anything else is an error. ``expand_13`` (the zoo's
    ``expand_layer_conv_13``, not part of the classifier network), the extra levels and the heads keep their
    initialisation, as in the zoo. The classifier pads 'pad' (symmetric) and its BatchNorm has eps 1e-5 where the
    SSD's trunk pads 'same' and uses eps 1e-3: the loaded trunk computes the zoo SSD's function, not the
    classifier's exactly, as in the zoo.
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, SSDMobileNetV2Backbone):
        raise WeightMappingError(f"{origin}: MobileNetV2 ImageNet weights fit the trunk of ssd300_mobilenet_v2, and "
                                 f"this model's backbone is {type(backbone).__name__}")
    prefix = _imagenet_prefix(source, origin)
    target = {k: v for k, v in model.state_dict().items()
              if k.startswith("backbone.features.") and not k.endswith("num_batches_tracked")}
    ignored = [k for k in source if k.startswith(IMAGENET_CLASSIFIER_PREFIXES)]
    state = remap_state_dict(source, imagenet_mobilenet_v2_pairs(prefix), target,
                             f"MindSpore MobileNetV2 ImageNet checkpoint {origin}", ignored=ignored)
    model.load_state_dict(state, strict=False)   # the trunk only; the rest keeps its initialisation
    logger.info(f"MobileNetV2 ImageNet weights (MindSpore) from {origin}: {len(state)} trunk tensors; "
                f"expand_13, extra levels and heads keep their initialisation")
    return {"format": "mindspore_mobilenet_v2_imagenet", "tensors": len(state), "ignored": len(ignored)}
