"""Loading weights into multibox models: strict name-and-shape remapping of foreign state dicts, and ImageNet VGG16
weights as the initialisation of the paper presets' trunk (:func:`load_vgg16_backbone`)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from multibox.errors import MultiboxError
from multibox.models.vgg import VGG16_BLOCKS, PaperVGG16Backbone


class WeightMappingError(MultiboxError, ValueError):
    """A source file's parameters do not map one to one onto the model's."""


def describe_names(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def remap_state_dict(source: Mapping[str, Any], pairs: Iterable[tuple[str, str]], target: Mapping[str, Tensor],
                     origin: str, derived: Mapping[str, Tensor] = (), ignored: Iterable[str] = ()) -> dict[str, Tensor]:
    """Build a state dict for ``target`` from ``source`` by explicit (target name, source name) pairs.

    Args:
        source: name -> tensor or array of the foreign file.
        pairs: (our name, source name); each source entry may feed one of our entries only.
        target: the model's own state dict (names and shapes to produce).
        origin: what the source is, for error messages.
        derived: our entries that have no counterpart in the source, with their values (e.g. BatchNorm's
            ``num_batches_tracked``).
        ignored: source entries deliberately not used.
    Raises:
        WeightMappingError: listing our entries with no source, source entries left over, and shape mismatches.
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set(ignored)
    missing, mismatched, mapped = [], [], set()
    for ours, theirs in pairs:
        if ours not in target or ours in mapped:
            raise WeightMappingError(f"internal mapping: {ours!r} is not a model entry, or is mapped twice")
        mapped.add(ours)
        if theirs not in source:
            missing.append(f"{theirs} (for {ours})")
            continue
        if theirs in used:
            raise WeightMappingError(f"internal mapping uses {origin} entry {theirs!r} twice")
        used.add(theirs)
        value = source[theirs] if isinstance(source[theirs], Tensor) else torch.from_numpy(np.array(source[theirs]))
        if tuple(value.shape) != tuple(target[ours].shape):
            mismatched.append(f"{theirs} {tuple(value.shape)} -> {ours} {tuple(target[ours].shape)}")
            continue
        out[ours] = value.to(dtype=target[ours].dtype, device="cpu").clone()
    derived = dict(derived)
    out.update(derived)
    unfilled = set(target) - mapped - set(derived)
    leftovers = set(source) - used
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameters missing from the file: {describe_names(missing)}")
    if leftovers:
        problems.append(f"{len(leftovers)} entries of the file map to nothing: {describe_names(leftovers)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shapes differ: {describe_names(mismatched)}")
    if unfilled:
        problems.append(f"{len(unfilled)} model entries have no mapping: {describe_names(unfilled)}")
    if problems:
        raise WeightMappingError(f"{origin}: " + "; ".join(problems))
    return out


def torch_load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict saved with ``torch.save``: tensors only (``weights_only``), also inside ``{"model": ...}``
    (torchvision's reference scripts' checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightMappingError(f"{path}: not a state dict (a mapping of names to tensors)")
    return obj


def vgg16_feature_indices() -> list[int]:
    """Indices of conv1_1 .. conv5_3 in torchvision's ``vgg16().features`` (conv, ReLU pairs and a max-pool after
    each block): 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28."""
    indices, index = [], 0
    for widths in VGG16_BLOCKS:
        for _ in widths:
            indices.append(index)
            index += 2
        index += 1
    return indices


def vgg16_trunk_names() -> list[str]:
    """Our module names of conv1_1 .. conv5_3 (``vgg_block``: conv, ReLU, conv, ReLU, ...)."""
    return [f"backbone.blocks.{b}.{2 * j}" for b, widths in enumerate(VGG16_BLOCKS) for j in range(len(widths))]


def subsample_fc6_fc7(fc6_weight: Tensor, fc6_bias: Tensor, fc7_weight: Tensor, fc7_bias: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The paper's fc6/fc7 from VGG16's classifier (Liu et al. 2016, §3: "we convert fc6 and fc7 to convolutional
    layers, subsample parameters from fc6 and fc7"; the released Caffe model ``VGG_ILSVRC_16_layers_fc_reduced``,
    DeepLab-LargeFOV's recipe).

    - fc6: (4096, 512·7·7) -> viewed as a 7x7 convolution (4096, 512, 7, 7); every 4th output (1024 of 4096) and
      every 3rd spatial tap (rows/columns 0, 3, 6) are kept: (1024, 512, 3, 3). The kept taps lie 3 pool5 cells
      apart at stride 32; with pool5 at stride 1 the map has stride 16, so the same taps lie 6 cells apart: hence
      the 3x3 kernel with dilation 6 (à trous).
    - fc7: (4096, 4096) -> every 4th output and every 4th input (matching fc6's kept outputs): (1024, 1024, 1, 1).
    - biases: every 4th.
    """
    if tuple(fc6_weight.shape) != (4096, 512 * 7 * 7) or tuple(fc7_weight.shape) != (4096, 4096):
        raise WeightMappingError(f"classifier shapes {tuple(fc6_weight.shape)}, {tuple(fc7_weight.shape)} are not "
                                 "VGG16's (4096, 25088), (4096, 4096)")
    w6 = fc6_weight.reshape(4096, 512, 7, 7)[::4, :, ::3, ::3].contiguous()
    w7 = fc7_weight[::4, ::4].reshape(1024, 1024, 1, 1).contiguous()
    return w6, fc6_bias[::4].contiguous(), w7, fc7_bias[::4].contiguous()


def load_vgg16_backbone(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Initialise the VGG16 trunk (and fc6/fc7 where the file allows) of a paper preset model from ImageNet weights.

    Accepted files (``torch.save`` state dicts; nothing is downloaded):

    - torchvision ``vgg16`` (``features.*``, ``classifier.{0,3,6}.*``): conv1_1 .. conv5_3 from ``features``;
      fc6/fc7 sub-sampled from ``classifier.0`` / ``classifier.3`` (:func:`subsample_fc6_fc7`); ``classifier.6``
      (the 1000-way ImageNet output) has no counterpart and is not used.
    - torchvision's ``vgg16_features`` file (``VGG16_Weights.IMAGENET1K_FEATURES``, ported from ssd.pytorch): the
      same layout, but its classifier holds no values (NaN): fc6/fc7 keep their initialisation (as torchvision's
      own ``ssd300_vgg16`` does), with a warning.
    - ssd.pytorch's ``vgg16_reducedfc`` (keys ``0.weight`` .. ``33.bias``): conv1_1 .. conv5_3, then fc6 (31) and
      fc7 (33), already reduced, copied as they are.

    Args:
        model: an SSD whose backbone is :class:`~multibox.models.vgg.PaperVGG16Backbone` (``ssd300_vgg16``,
            ``ssd512_vgg16``), or such a backbone itself.
    Returns:
        ``{"format": ..., "fc6_fc7": "subsampled" | "copied" | "initialised", "tensors": n}``.
    """
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, PaperVGG16Backbone):
        raise ValueError(f"model.backbone_weights needs a paper VGG16 arch (ssd300_vgg16, ssd512_vgg16), "
                         f"not {type(backbone).__name__}")
    source = torch_load_state_dict(path)
    target = backbone.state_dict()
    trunk = [name[len("backbone."):] for name in vgg16_trunk_names()]
    indices = vgg16_feature_indices()
    if "features.0.weight" in source:
        fmt = "torchvision_vgg16"
        pairs = [(f"{ours}.{p}", f"features.{i}.{p}") for ours, i in zip(trunk, indices) for p in ("weight", "bias")]
        classifier = {k: v for k, v in source.items() if k.startswith("classifier.")}
        expected = {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
        if set(classifier) - expected:
            raise WeightMappingError(f"{path}: unexpected entries {describe_names(set(classifier) - expected)}")
        fc_values = [classifier.get(k) for k in ("classifier.0.weight", "classifier.0.bias",
                                                 "classifier.3.weight", "classifier.3.bias")]
        trunk_source = {k: v for k, v in source.items() if not k.startswith("classifier.")}
        if all(v is not None and torch.isfinite(v).all() for v in fc_values):
            w6, b6, w7, b7 = subsample_fc6_fc7(*fc_values)
            trunk_source.update({"fc6.weight": w6, "fc6.bias": b6, "fc7.weight": w7, "fc7.bias": b7})
            pairs += [(name, name) for name in ("fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias")]
            fc6_fc7 = "subsampled"
        else:
            fc6_fc7 = "initialised"
            warnings.warn(f"{path}: the classifier holds no finite values (torchvision's vgg16_features file): "
                          "fc6/fc7 keep their initialisation", stacklevel=2)
    elif "31.weight" in source:
        fmt = "ssd.pytorch_vgg16_reducedfc"
        pairs = [(f"{ours}.{p}", f"{i}.{p}") for ours, i in zip(trunk, indices) for p in ("weight", "bias")]
        pairs += [("fc6.weight", "31.weight"), ("fc6.bias", "31.bias"), ("fc7.weight", "33.weight"),
                  ("fc7.bias", "33.bias")]
        trunk_source, fc6_fc7 = source, "copied"
    else:
        raise WeightMappingError(f"{path}: neither a torchvision vgg16 state dict (features.*) nor ssd.pytorch's "
                                 "vgg16_reducedfc (0.weight .. 33.bias)")
    subset = {ours: target[ours] for ours, _ in pairs}
    state = remap_state_dict(trunk_source, pairs, subset, f"VGG16 weights {path}")
    backbone.load_state_dict(state, strict=False)   # the trunk (and fc6/fc7); the rest keeps its initialisation
    return {"format": fmt, "fc6_fc7": fc6_fc7, "tensors": len(state)}
