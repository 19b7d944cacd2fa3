"""Loading weights into multibox models: strict name-and-shape remapping of foreign state dicts, ImageNet VGG16
weights as the initialisation of the paper presets' trunk (:func:`load_vgg16_backbone`), and a detector's weights
carried over to another class list (:func:`transfer_detector_weights`, fine-tuning)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from multibox.errors import MultiboxError
from multibox.models.mobilenet_v3 import SSDLiteMobileNetV3Backbone
from multibox.models.vgg import VGG16_BLOCKS, PaperVGG16Backbone

logger = logging.getLogger("multibox.models")


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


def torch_load_file(path: str | Path) -> Any:
    """What ``torch.save`` wrote to ``path``, read with ``weights_only=True`` (tensors and plain containers, never
    code) onto the CPU; an unreadable file is a :class:`WeightMappingError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # UnpicklingError (objects other than tensors), damaged archives, ...
        detail = next((line.strip() for line in str(err).splitlines() if line.strip()), "no detail")[:300]
        raise WeightMappingError(f"{path}: not a readable weights file ({type(err).__name__}: {detail})") from None


def as_state_dict(obj: Any, origin: str) -> dict[str, Tensor]:
    """``obj`` as a state dict: a mapping of names to tensors, also inside ``{"model": ...}`` (torchvision's
    reference scripts' checkpoints, multibox checkpoints)."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightMappingError(f"{origin}: not a state dict (a mapping of names to tensors)")
    return obj


def torch_load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict saved with ``torch.save``: tensors only (``weights_only``), also inside ``{"model": ...}``."""
    return as_state_dict(torch_load_file(path), str(path))


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


def load_vgg16_backbone(model: nn.Module, source: str | Path | Mapping[str, Tensor], origin: str | None = None
                        ) -> dict[str, Any]:
    """Initialise the VGG16 trunk (and fc6/fc7 where the file allows) of a paper preset model from ImageNet weights.

    Accepted files (``torch.save`` state dicts; nothing is downloaded here, see :mod:`multibox.models.published`):

    - torchvision ``vgg16`` (``features.*``, ``classifier.{0,3,6}.*``): conv1_1 .. conv5_3 from ``features``;
      fc6/fc7 sub-sampled from ``classifier.0`` / ``classifier.3`` (:func:`subsample_fc6_fc7`); ``classifier.6``
      (the 1000-way ImageNet output) has no counterpart and is not used.
    - torchvision's ``vgg16_features`` file (``VGG16_Weights.IMAGENET1K_FEATURES``, ported from ssd.pytorch): the
      same layout, but its classifier holds no values (NaN): fc6/fc7 keep their initialisation, as torchvision's
      own ``ssd300_vgg16`` does (logged).
    - ssd.pytorch's ``vgg16_reducedfc`` (keys ``0.weight`` .. ``33.bias``): conv1_1 .. conv5_3, then fc6 (31) and
      fc7 (33), already reduced, copied as they are.

    Args:
        model: an SSD whose backbone is :class:`~multibox.models.vgg.PaperVGG16Backbone` (``ssd300_vgg16``,
            ``ssd512_vgg16``), or such a backbone itself.
        source: the file, or its state dict already loaded (then ``origin`` names it in messages).
    Returns:
        ``{"format": ..., "fc6_fc7": "subsampled" | "copied" | "initialised", "tensors": n}``.
    """
    backbone = getattr(model, "backbone", model)
    origin = origin or str(source)
    if not isinstance(backbone, PaperVGG16Backbone):
        raise WeightMappingError(f"{origin}: VGG16 ImageNet weights need a paper VGG16 arch (ssd300_vgg16, "
                                 f"ssd512_vgg16), not {type(backbone).__name__}")
    source = torch_load_state_dict(source) if isinstance(source, (str, Path)) else as_state_dict(source, origin)
    trunk = [name[len("backbone."):] for name in vgg16_trunk_names()]
    if "features.0.weight" in source:
        fmt, pairs, trunk_source, fc6_fc7 = "torchvision_vgg16", *_torchvision_vgg16_pairs(source, trunk, origin)
    elif "31.weight" in source:
        fmt = "ssd.pytorch_vgg16_reducedfc"
        pairs = [(f"{ours}.{p}", f"{i}.{p}") for ours, i in zip(trunk, vgg16_feature_indices())
                 for p in ("weight", "bias")]
        pairs += [("fc6.weight", "31.weight"), ("fc6.bias", "31.bias"), ("fc7.weight", "33.weight"),
                  ("fc7.bias", "33.bias")]
        trunk_source, fc6_fc7 = source, "copied"
    else:
        raise WeightMappingError(f"{origin}: neither a torchvision vgg16 state dict (features.*) nor ssd.pytorch's "
                                 "vgg16_reducedfc (0.weight .. 33.bias)")
    target = backbone.state_dict()
    subset = {ours: target[ours] for ours, _ in pairs}
    state = remap_state_dict(trunk_source, pairs, subset, f"VGG16 weights {origin}")
    backbone.load_state_dict(state, strict=False)   # the trunk (and fc6/fc7); the rest keeps its initialisation
    logger.info(f"VGG16 ImageNet weights from {origin}: conv1_1 .. conv5_3"
                + {"subsampled": ", fc6/fc7 sub-sampled from the classifier", "copied": ", fc6/fc7",
                   "initialised": "; fc6/fc7 keep their initialisation (the file's classifier holds no values, as "
                                  "torchvision's vgg16_features)"}[fc6_fc7])
    return {"format": fmt, "fc6_fc7": fc6_fc7, "tensors": len(state)}


def load_backbone(model: nn.Module, source: str | Path | Mapping[str, Tensor], origin: str | None = None
                  ) -> dict[str, Any]:
    """ImageNet weights into the trunk of ``model``'s backbone: :func:`load_mobilenet_v3_backbone` for SSDLite,
    :func:`load_vgg16_backbone` otherwise (which refuses backbones without VGG16)."""
    if isinstance(getattr(model, "backbone", model), SSDLiteMobileNetV3Backbone):
        return load_mobilenet_v3_backbone(model, source, origin)
    return load_vgg16_backbone(model, source, origin)


def mobilenet_v3_pairs(names: Iterable[str], c4: int) -> list[tuple[str, str]]:
    """(our name, torchvision ``mobilenet_v3_large`` name) for the trunk entries of SSDLite's backbone, which
    splits torchvision's ``features`` at block ``c4``: ``features.0.{i}`` = ``features.{i}`` for i < c4,
    ``features.0.{c4}`` = ``features.{c4}.block.0`` (the expansion layer), ``features.1.0.{j}`` =
    ``features.{c4}.block.{j}`` for j >= 1 (a slice of a Sequential keeps its keys), ``features.1.{i}`` =
    ``features.{c4 + i}`` for i >= 1."""
    pairs = []
    for name in names:
        part, index, rest = name.split(".", 3)[1:]
        index = int(index)
        if part == "0":
            theirs = f"features.{index}.{rest}" if index < c4 else f"features.{c4}.block.0.{rest}"
        elif index == 0:
            theirs = f"features.{c4}.block.{rest}"
        else:
            theirs = f"features.{c4 + index}.{rest}"
        pairs.append((name, theirs))
    return pairs


def load_mobilenet_v3_backbone(model: nn.Module, source: str | Path | Mapping[str, Tensor],
                               origin: str | None = None) -> dict[str, Any]:
    """torchvision's ImageNet ``mobilenet_v3_large`` weights (``features.*``; the classifier is not used) into the
    trunk of SSDLite's backbone (:class:`~multibox.models.mobilenet_v3.SSDLiteMobileNetV3Backbone`, built with the
    full tail: ``model.reduced_tail`` false). The extra levels and heads keep their initialisation, as in
    torchvision's ``ssdlite320_mobilenet_v3_large(weights_backbone=...)``."""
    backbone = getattr(model, "backbone", model)
    origin = origin or str(source)
    source = torch_load_state_dict(source) if isinstance(source, (str, Path)) else as_state_dict(source, origin)
    if "features.0.0.weight" not in source:
        raise WeightMappingError(f"{origin}: not a torchvision mobilenet_v3_large state dict (no features.0.0.weight)")
    last = max(int(k.split(".")[1]) for k in source if k.startswith("features."))
    if source[f"features.{last}.0.weight"].shape[0] != backbone.out_channels[1]:
        raise WeightMappingError(f"{origin}: a MobileNetV3 with a {source[f'features.{last}.0.weight'].shape[0]}-"
                                 f"channel tail, and this backbone's has {backbone.out_channels[1]}: ImageNet "
                                 "weights need the full tail (model.reduced_tail: false, or null with them set)")
    target = {k: v for k, v in backbone.state_dict().items() if k.startswith("features.")}
    pairs = mobilenet_v3_pairs(target, len(backbone.features[0]) - 1)
    trunk_source = {k: v for k, v in source.items() if k.startswith("features.")}
    state = remap_state_dict(trunk_source, pairs, target, f"MobileNetV3 weights {origin}")
    backbone.load_state_dict(state, strict=False)   # the trunk; extras keep their initialisation
    logger.info(f"MobileNetV3-Large ImageNet weights from {origin}: {len(state)} trunk tensors")
    return {"format": "torchvision_mobilenet_v3_large", "tensors": len(state)}


def _torchvision_vgg16_pairs(source: Mapping[str, Tensor], trunk: list[str], origin: str
                             ) -> tuple[list[tuple[str, str]], dict[str, Tensor], str]:
    """(pairs, the source to map, fc6_fc7) for a torchvision ``vgg16`` state dict: the trunk from ``features``,
    fc6/fc7 sub-sampled from the classifier when it holds finite values."""
    pairs = [(f"{ours}.{p}", f"features.{i}.{p}") for ours, i in zip(trunk, vgg16_feature_indices())
             for p in ("weight", "bias")]
    classifier = {k: v for k, v in source.items() if k.startswith("classifier.")}
    expected = {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    if set(classifier) - expected:
        raise WeightMappingError(f"{origin}: unexpected entries {describe_names(set(classifier) - expected)}")
    fc_values = [classifier.get(k) for k in ("classifier.0.weight", "classifier.0.bias",
                                             "classifier.3.weight", "classifier.3.bias")]
    trunk_source = {k: v for k, v in source.items() if not k.startswith("classifier.")}
    if not all(v is not None and torch.isfinite(v).all() for v in fc_values):
        return pairs, trunk_source, "initialised"
    w6, b6, w7, b7 = subsample_fc6_fc7(*fc_values)
    trunk_source.update({"fc6.weight": w6, "fc6.bias": b6, "fc7.weight": w7, "fc7.bias": b7})
    pairs += [(name, name) for name in ("fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias")]
    return pairs, trunk_source, "subsampled"


def class_row_layers(model: nn.Module) -> dict[str, int]:
    """The class convolution of each level of an SSD (the last layer of ``cls_heads[i]``, or a weight-shared head's
    one ``head.cls_predictor``): its state-dict prefix -> anchors per location k. Its k·(1 + C) output channels are anchor-major: channel a·(1 + C) + c is class c
    (0 = background) of anchor a (see :func:`multibox.models.ssd.flatten_levels`)."""
    if getattr(model, "head", None) is not None:    # a weight-shared head: one predictor for every level
        predictor = model.head.cls_predictor
        return {"head.cls_predictor": predictor.out_channels // (model.num_classes + 1)}
    layers = {}
    for level, head in enumerate(model.cls_heads):
        last, name = (head[-1], f"cls_heads.{level}.{len(head) - 1}") if isinstance(head, nn.Sequential) \
            else (head, f"cls_heads.{level}")
        layers[name] = last.out_channels // (model.num_classes + 1)
    return layers


def match_class_rows(source_classes: Sequence[str], target_classes: Sequence[str]) -> dict[int, int]:
    """Target label -> source label for the classes both lists name (exactly, as evaluation matches names),
    background (0) always. Placeholder names of unused slots (torchvision's "N/A") never match."""
    placeholders = {"N/A", "__background__", "background"}
    source_label = {}
    for label, name in enumerate(source_classes):
        if label and name not in placeholders:
            source_label.setdefault(name, label)
    rows = {0: 0}
    rows.update({t: source_label[name] for t, name in enumerate(target_classes) if t and name in source_label})
    return rows


def transfer_detector_weights(model: nn.Module, source: Mapping[str, Tensor], source_classes: Sequence[str],
                              target_classes: Sequence[str], origin: str) -> dict[str, list[str]]:
    """Load a detector's weights (in multibox's layout) into ``model``, an SSD of the same arch built for
    ``target_classes``: every tensor but the class convolutions is copied; of the class convolutions (per level
    (k·(1 + C), ...) weights and biases, anchor-major) the background row and the rows of the classes whose
    names match (:func:`match_class_rows`) are copied per anchor, the others keep ``model``'s initialisation.

    Args:
        source: our layout's state dict with ``len(source_classes)`` class rows per anchor.
        source_classes / target_classes: class names, background first.
    Returns:
        ``{"kept": [...], "new": [...]}``: the target's class names (background excluded) copied / fresh.
    Raises:
        WeightMappingError: tensors missing, left over or of other shapes (another arch or anchor layout).
    """
    if len(target_classes) != model.num_classes + 1:
        raise ValueError(f"{len(target_classes)} class names for a model of {model.num_classes} classes")
    target = model.state_dict()
    layers = class_row_layers(model)
    rows = match_class_rows(source_classes, target_classes)
    t_index, s_index = torch.tensor(list(rows)), torch.tensor(list(rows.values()))
    out, problems = {}, []
    for name in sorted(set(source) - set(target)):
        problems.append(f"{name} (not in this model)")
    for name, value in target.items():
        prefix = name.rsplit(".", 1)[0]
        if name not in source:
            problems.append(f"{name} (missing from the file)")
        elif prefix in layers and source[name].shape[1:] == value.shape[1:] \
                and source[name].shape[0] == layers[prefix] * len(source_classes):
            k, tail = layers[prefix], tuple(value.shape[1:])
            rowed = value.detach().clone().view(k, len(target_classes), *tail)
            rowed[:, t_index] = source[name].view(k, len(source_classes), *tail)[:, s_index].to(value.dtype)
            out[name] = rowed.view_as(value)
        elif tuple(source[name].shape) != tuple(value.shape):
            problems.append(f"{name} {tuple(source[name].shape)} -> {tuple(value.shape)}")
        else:
            out[name] = source[name]
    if problems:
        raise WeightMappingError(f"{origin} does not fit this model (another arch, head or anchor layout): "
                                 f"{len(problems)} tensors differ: {describe_names(problems, limit=6)}")
    model.load_state_dict(out)
    kept = [target_classes[t] for t in rows if t]
    return {"kept": kept, "new": [n for t, n in enumerate(target_classes) if t and t not in rows]}
