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
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from multibox.config import load_config
from multibox.data.categories import category_ids_of
from multibox.interop.mindspore import (TUTORIAL_CLASS_NAMES, batchnorm_pairs, separable_head_pairs,
                                        swap_yx_offsets)
from multibox.models import model_skeleton
from multibox.models.mobilenet_v2 import EXTRAS, MOBILENET_V2_STAGES, SPLIT
from multibox.models.weights import remap_state_dict

__all__ = ["PRESET", "convert", "recognise", "zoo_mobilenet_v2_pairs"]

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


def zoo_mobilenet_v2_pairs(num_levels: int = NUM_LEVELS) -> list[tuple[str, str]]:
    """(our name, zoo name) for every parameter and BatchNorm statistic of the zoo's ``ssd300`` network."""
    pairs = _conv_bn_relu("backbone.features.0", _trunk_name(0))
    index = 1
    for t, _, n, _ in MOBILENET_V2_STAGES:
        for _ in range(n):
            pairs += _inverted_residual(f"backbone.features.{index}", _trunk_name(index), expands=t != 1)
            index += 1
    pairs += _conv_bn_relu(f"backbone.features.{index}", _trunk_name(index))
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
    path = Path(path)
    cfg = load_config(PRESET)
    model = model_skeleton(cfg)
    target = model.state_dict()
    derived = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in target.items() if k.endswith("num_batches_tracked")}
    state = remap_state_dict(source, zoo_mobilenet_v2_pairs(), target, f"MindSpore checkpoint {path}",
                             derived=derived)
    for k in range(NUM_LEVELS):
        for p in ("weight", "bias"):
            state[f"loc_heads.{k}.3.{p}"] = swap_yx_offsets(state[f"loc_heads.{k}.3.{p}"])
    model.load_state_dict(state, assign=True)
    return {"model": model.state_dict(), "config": cfg.to_dict(), "class_names": list(TUTORIAL_CLASS_NAMES),
            "category_ids": category_ids_of(TUTORIAL_CLASS_NAMES), "imported_from": f"mindspore:{path.name}"}
