"""Weights from other SSD code bases, converted into multibox checkpoints without downloading anything.

- :func:`import_torchvision_ssd300`: ``torch.save(model.state_dict())`` of a torchvision ``ssd300_vgg16`` -> a
  checkpoint of the ``ssd300-vgg16`` preset, the same function (SPEC §3);
- :func:`load_vgg16_backbone`: ImageNet VGG16 weights (torchvision's ``vgg16`` state dict, its ``vgg16_features``
  file, or ssd.pytorch's ``vgg16_reducedfc``) as the initialisation of the paper presets' trunk;
- :func:`import_mindspore_ckpt`: a ``mindspore.save_checkpoint`` file of the MindSpore tutorial's ``SSD300Vgg16`` ->
  a checkpoint of the ``ssd300-vgg16-seed`` preset, read with the ``protobuf`` package alone (no MindSpore).

Every conversion maps each parameter by name and shape and fails loudly, listing them, on parameters the source
lacks, source entries nothing uses, and shape mismatches.

The command line is ``multibox import-weights --from torchvision|mindspore FILE --out CKPT``
(:func:`add_import_weights_parser`).
"""
from __future__ import annotations

import argparse
import binascii
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import save_checkpoint
from .config import load_config
from .models import build_model
from .models.vgg import VGG16_BLOCKS, PaperVGG16Backbone

__all__ = [
    "TUTORIAL_CLASS_NAMES",
    "WeightMappingError",
    "add_import_weights_parser",
    "import_mindspore_ckpt",
    "import_torchvision_ssd300",
    "load_vgg16_backbone",
    "read_mindspore_ckpt",
    "remap_state_dict",
    "run_import_weights",
    "subsample_fc6_fc7",
    "swap_yx_offsets",
    "torchvision_coco_class_names",
    "torchvision_ssd300_pairs",
    "tutorial_mindspore_pairs",
    "vgg16_feature_indices",
    "write_mindspore_ckpt",
]

# The tutorial's `train_cls`: background, then COCO's 80 category names in category-id order.
TUTORIAL_CLASS_NAMES = [
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]


class WeightMappingError(ValueError):
    """A source file's parameters do not map one to one onto the model's."""


# --------------------------------------------------------------------------------------------- strict remapping

def _describe(names: Iterable[str], limit: int = 12) -> str:
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
        problems.append(f"{len(missing)} parameters missing from the file: {_describe(missing)}")
    if leftovers:
        problems.append(f"{len(leftovers)} entries of the file map to nothing: {_describe(leftovers)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shapes differ: {_describe(mismatched)}")
    if unfilled:
        problems.append(f"{len(unfilled)} model entries have no mapping: {_describe(unfilled)}")
    if problems:
        raise WeightMappingError(f"{origin}: " + "; ".join(problems))
    return out


def _model_skeleton(cfg) -> nn.Module:
    """The model of ``cfg`` on the meta device: names, shapes and dtypes without allocating or initialising
    tens of millions of weights that the conversion replaces anyway."""
    with torch.device("meta"):
        return build_model(cfg, load_backbone_weights=False)


def _torch_load_state_dict(path: str | Path) -> dict[str, Tensor]:
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


# --------------------------------------------------------------------------------------------- VGG16 layouts

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


def _trunk_names() -> list[str]:
    """Our module names of conv1_1 .. conv5_3 (``vgg_block``: conv, ReLU, conv, ReLU, ...)."""
    return [f"backbone.blocks.{b}.{2 * j}" for b, widths in enumerate(VGG16_BLOCKS) for j in range(len(widths))]


POOL4_INDEX = vgg16_feature_indices()[9] + 2     # the max-pool after conv4_3 in vgg16().features (23)


# --------------------------------------------------------------------------------------------- torchvision SSD300

def torchvision_ssd300_pairs(num_levels: int = 6) -> list[tuple[str, str]]:
    """(our name, torchvision name) for every parameter of ``ssd300_vgg16``.

    torchvision keeps conv1_1 .. conv4_3 in ``backbone.features`` (vgg16's indices), conv5 and fc6/fc7 in
    ``backbone.extra.0`` (vgg16's layers from pool4 on: pool4, conv5_1, ReLU, conv5_2, ReLU, conv5_3, ReLU, then a
    Sequential(pool5, fc6, ReLU, fc7, ReLU) at position 7), the extra levels in ``backbone.extra.1..4`` and the
    L2Norm scale as ``backbone.scale_weight``.
    """
    pairs = []
    for ours, index in zip(_trunk_names(), vgg16_feature_indices()):
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
        try:
            from torchvision.models._meta import _COCO_CATEGORIES
            return ["background"] + list(_COCO_CATEGORIES[1:])
        except ImportError:   # a private module: fall back to neutral names
            pass
    return ["background"] + [f"class_{i}" for i in range(1, num_classes_with_background)]


def import_torchvision_ssd300(state_dict_path: str | Path) -> dict[str, Any]:
    """A torchvision ``ssd300_vgg16`` state dict -> checkpoint payload of the ``ssd300-vgg16`` preset.

    The number of classes is read from the classification head (torchvision counts the background: 91 for COCO,
    whose labels are COCO category ids 1..90 with unused slots). Outputs are the same function: loc offsets are
    (dx, dy, dw, dh) with variances 0.1/0.2 in both (torchvision's BoxCoder weights 10, 10, 5, 5), the default boxes
    come in torchvision's order (``anchors.extra_box_second``) and the input is normalised as torchvision does
    (``data.resize: torchvision``).

    Returns:
        dict with ``model`` (state dict), ``config`` (``Config.to_dict()``), ``class_names`` and ``imported_from``;
        save it with :func:`multibox.checkpoint.save_checkpoint`.
    """
    source = _torch_load_state_dict(state_dict_path)
    key = "head.classification_head.module_list.0.weight"
    if key not in source:
        raise WeightMappingError(f"{state_dict_path}: no {key!r}: not a torchvision ssd300_vgg16 state dict")
    anchors_level0 = 4
    with_background = source[key].shape[0] // anchors_level0
    cfg = load_config("ssd300-vgg16", [f"model.num_classes={with_background - 1}"])
    model = _model_skeleton(cfg)
    state = remap_state_dict(source, torchvision_ssd300_pairs(), model.state_dict(),
                             f"torchvision ssd300_vgg16 state dict {state_dict_path}")
    model.load_state_dict(state, assign=True)   # proves the result loads strictly
    return {"model": model.state_dict(), "config": cfg.to_dict(),
            "class_names": torchvision_coco_class_names(with_background),
            "imported_from": f"torchvision:{Path(state_dict_path).name}"}


# --------------------------------------------------------------------------------------------- ImageNet VGG16

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
    source = _torch_load_state_dict(path)
    target = backbone.state_dict()
    trunk = [name[len("backbone."):] for name in _trunk_names()]
    indices = vgg16_feature_indices()
    if "features.0.weight" in source:
        fmt = "torchvision_vgg16"
        pairs = [(f"{ours}.{p}", f"features.{i}.{p}") for ours, i in zip(trunk, indices) for p in ("weight", "bias")]
        classifier = {k: v for k, v in source.items() if k.startswith("classifier.")}
        expected = {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
        if set(classifier) - expected:
            raise WeightMappingError(f"{path}: unexpected entries {_describe(set(classifier) - expected)}")
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


# --------------------------------------------------------------------------------------------- MindSpore checkpoints

_MS_DTYPES = {"Float16": np.float16, "Float32": np.float32, "Float64": np.float64, "Int8": np.int8,
              "Int16": np.int16, "Int32": np.int32, "Int64": np.int64, "UInt8": np.uint8, "UInt16": np.uint16,
              "UInt32": np.uint32, "UInt64": np.uint64, "Bool": np.bool_}
_CRC_MARK = b"crc_num"          # MindSpore's optional trailer: b"crc_num" + 10-byte big-endian CRC32 of the rest
_CHECKPOINT_CLASS = None


def _checkpoint_message_class():
    """MindSpore's ``checkpoint.proto`` (mindspore/ccsrc/utils/checkpoint.proto), built at run time::

        message Checkpoint {
          message Value { required string tag = 1;
                          oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
          repeated Value value = 1;
        }
        message TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                              required bytes tensor_content = 3; }
        message MapTensorProto { repeated TensorProto tensor = 1; }

    Fields are declared optional here (the wire format is the same) so that a damaged entry gives our own error
    message instead of protobuf's. A private descriptor pool keeps it apart from MindSpore's, should both load.
    """
    global _CHECKPOINT_CLASS
    if _CHECKPOINT_CLASS is not None:
        return _CHECKPOINT_CLASS
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="multibox_mindspore_checkpoint.proto",
                                              package="multibox_mindspore", syntax="proto2")

    def field(msg, name, number, kind, label=F.LABEL_OPTIONAL, type_name=None, oneof=None):
        f = msg.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            f.type_name = type_name
        if oneof is not None:
            f.oneof_index = oneof

    tensor = file.message_type.add(name="TensorProto")
    field(tensor, "dims", 1, F.TYPE_INT64, F.LABEL_REPEATED)
    field(tensor, "tensor_type", 2, F.TYPE_STRING)
    field(tensor, "tensor_content", 3, F.TYPE_BYTES)
    map_tensor = file.message_type.add(name="MapTensorProto")
    field(map_tensor, "tensor", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".multibox_mindspore.TensorProto")
    checkpoint = file.message_type.add(name="Checkpoint")
    value = checkpoint.nested_type.add(name="Value")
    value.oneof_decl.add(name="value")
    field(value, "tag", 1, F.TYPE_STRING)
    field(value, "tensor", 2, F.TYPE_MESSAGE, type_name=".multibox_mindspore.TensorProto", oneof=0)
    field(value, "maptensor", 3, F.TYPE_MESSAGE, type_name=".multibox_mindspore.MapTensorProto", oneof=0)
    field(checkpoint, "value", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".multibox_mindspore.Checkpoint.Value")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    descriptor = pool.FindMessageTypeByName("multibox_mindspore.Checkpoint")
    get_class = getattr(message_factory, "GetMessageClass", None)
    _CHECKPOINT_CLASS = get_class(descriptor) if get_class else \
        message_factory.MessageFactory(pool).GetPrototype(descriptor)
    return _CHECKPOINT_CLASS


def read_mindspore_ckpt(path: str | Path) -> dict[str, np.ndarray | str]:
    """Read a ``mindspore.save_checkpoint`` file (the default ``.ckpt`` protobuf format) into name -> array.

    The file is a sequence of serialised ``Checkpoint`` messages (which protobuf parses as one, appending the
    ``value`` lists); a tensor over 512 MiB is written as consecutive entries with the same tag whose contents are
    concatenated. A CRC trailer (``crc_check=True``) is verified. Scalars (dims ``[0]``) become 0-d arrays, string
    entries (``tensor_type "str"``) Python strings. Encrypted checkpoints and MapParameters are not supported.
    """
    from google.protobuf.message import DecodeError

    path = Path(path)
    data = path.read_bytes()
    if len(data) >= 17 and data[-17:-10] == _CRC_MARK:
        expected = int.from_bytes(data[-10:], "big")
        data = data[:-17]
        if binascii.crc32(data) != expected:
            raise WeightMappingError(f"{path}: CRC check failed: the checkpoint is damaged")
    message = _checkpoint_message_class()()
    try:
        message.ParseFromString(data)
    except DecodeError as err:
        raise WeightMappingError(f"{path}: not a MindSpore checkpoint, or an encrypted one ({err})") from None
    if len(message.value) == 0:
        raise WeightMappingError(f"{path}: not a MindSpore checkpoint (no entries)")

    chunks: dict[str, list] = {}
    order: list[str] = []
    previous = None
    for value in message.value:
        if value.WhichOneof("value") != "tensor":
            raise WeightMappingError(f"{path}: entry {value.tag!r} is a MapParameter, which is not supported")
        if value.tag in chunks and value.tag != previous:
            raise WeightMappingError(f"{path}: entry {value.tag!r} appears twice")
        if value.tag not in chunks:
            chunks[value.tag] = []
            order.append(value.tag)
        chunks[value.tag].append(value.tensor)
        previous = value.tag
    out: dict[str, np.ndarray | str] = {}
    for tag in order:
        parts = chunks[tag]
        kind, dims = parts[0].tensor_type, list(parts[0].dims)
        content = b"".join(p.tensor_content for p in parts)
        if kind == "str":
            out[tag] = np.frombuffer(content, f"U{len(content) // 4}")[0].item() if content else ""
            continue
        if kind == "BFloat16":
            array = torch.frombuffer(bytearray(content), dtype=torch.bfloat16).float().numpy()
        elif kind in _MS_DTYPES:
            array = np.frombuffer(content, dtype=_MS_DTYPES[kind])
        else:
            raise WeightMappingError(f"{path}: entry {tag!r} has unsupported type {kind!r}")
        shape = () if dims == [0] else tuple(dims)
        if array.size != int(np.prod(shape)):
            raise WeightMappingError(f"{path}: entry {tag!r} holds {array.size} values for shape {shape}")
        out[tag] = array.reshape(shape).copy()
    return out


def write_mindspore_ckpt(path: str | Path, tensors: Mapping[str, np.ndarray | Tensor]) -> None:
    """Write name -> array as a MindSpore ``.ckpt`` (one ``Checkpoint`` message per entry, as MindSpore writes
    them), loadable by ``mindspore.load_checkpoint``. Used to test the reader's failure modes and to hand weights
    back to MindSpore."""
    names = {np.dtype(v): k for k, v in _MS_DTYPES.items()}
    message_class = _checkpoint_message_class()
    with open(path, "wb") as f:
        for tag, value in tensors.items():
            array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
            message = message_class()
            entry = message.value.add(tag=tag)
            entry.tensor.dims.extend(array.shape)      # a scalar has no dims, as MindSpore 2.x writes it
            entry.tensor.tensor_type = names[array.dtype]
            entry.tensor.tensor_content = np.ascontiguousarray(array).tobytes()
            f.write(message.SerializeToString())


def tutorial_mindspore_pairs(num_levels: int = 6) -> list[tuple[str, str]]:
    """(our name, MindSpore name) for every parameter of the tutorial's ``SSD300Vgg16`` (SPEC §2): ``backbone.bS.J``
    (no biases), ``b6_1`` (fc6), ``b7_1`` (fc7), ``b8_1`` .. ``b11_2`` (extras), and the heads
    ``multi_box.multi_{loc,cls}_layers.K.{0: depthwise, 1: BatchNorm, 3: 1x1 conv}``; BatchNorm's gamma, beta,
    moving_mean, moving_variance are PyTorch's weight, bias, running_mean, running_var."""
    pairs = []
    for b, widths in enumerate(VGG16_BLOCKS):
        pairs += [(f"backbone.blocks.{b}.{2 * j}.weight", f"backbone.b{b + 1}.{j}.weight") for j in range(len(widths))]
    pairs += [("backbone.fc6.weight", "b6_1.weight"), ("backbone.fc7.weight", "b7_1.weight")]
    pairs += [(f"backbone.extras.{e}.{c}.weight", f"b{e + 8}_{c + 1}.weight") for e in range(4) for c in range(2)]
    for ours, theirs in (("loc_heads", "multi_loc_layers"), ("cls_heads", "multi_cls_layers")):
        for k in range(num_levels):
            dst, src = f"{ours}.{k}", f"multi_box.{theirs}.{k}"
            pairs += [(f"{dst}.0.weight", f"{src}.0.weight"),
                      (f"{dst}.1.weight", f"{src}.1.gamma"), (f"{dst}.1.bias", f"{src}.1.beta"),
                      (f"{dst}.1.running_mean", f"{src}.1.moving_mean"),
                      (f"{dst}.1.running_var", f"{src}.1.moving_variance"),
                      (f"{dst}.3.weight", f"{src}.3.weight"), (f"{dst}.3.bias", f"{src}.3.bias")]
    return pairs


# Entries that a MindSpore *training* network or ModelCheckpoint adds next to the weights.
_TRAINING_STATE_NAMES = {"global_step", "learning_rate", "epoch_num", "step_num", "loss_scale", "scale_sense",
                         "current_iterator_step", "last_overflow_iterator_step", "beta1_power", "beta2_power"}
_TRAINING_STATE_PREFIXES = ("moments.", "accum.", "moment1.", "moment2.", "momentum.")


def swap_yx_offsets(tensor: Tensor) -> Tensor:
    """Reorder a loc head's output channels (k·4 first) from (dy, dx, dh, dw) to (dx, dy, dw, dh) per anchor (the
    map is its own inverse)."""
    k = tensor.shape[0] // 4
    return tensor.reshape(k, 4, *tensor.shape[1:])[:, [1, 0, 3, 2]].reshape(tensor.shape).contiguous()


def import_mindspore_ckpt(path: str | Path, ignore_training_state: bool = False) -> dict[str, Any]:
    """A checkpoint of the MindSpore tutorial's ``SSD300Vgg16`` -> checkpoint payload of ``ssd300-vgg16-seed``.

    Every parameter is mapped by name and shape (:func:`tutorial_mindspore_pairs`); missing or left-over entries are
    an error. The tutorial's loc outputs are (dy, dx, dh, dw) per anchor and ours (dx, dy, dw, dh): the loc heads'
    last 1x1 convolutions get their output channels (weight rows and bias) swapped 0<->1, 2<->3 per anchor, so the
    imported network equals the tutorial's up to exactly that reordering of its loc output. Default boxes are in
    the tutorial's order (extra box last) in the seed preset; class channel 0 is background in both.

    Args:
        ignore_training_state: drop optimizer and bookkeeping entries (``moments.*``, ``global_step``,
            ``learning_rate``, ``epoch_num``, ...) that a checkpoint of a MindSpore training network carries; by
            default they are left-overs, and an error.
    """
    source = read_mindspore_ckpt(path)
    ignored = set()
    if ignore_training_state:
        ignored = {k for k in source if k in _TRAINING_STATE_NAMES or k.startswith(_TRAINING_STATE_PREFIXES)}
    strings = {k for k, v in source.items() if isinstance(v, str)} - ignored
    if strings:
        raise WeightMappingError(f"{path}: string entries map to nothing: {_describe(strings)}")
    cfg = load_config("ssd300-vgg16-seed")
    model = _model_skeleton(cfg)
    target = model.state_dict()
    derived = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in target.items() if k.endswith("num_batches_tracked")}
    state = remap_state_dict(source, tutorial_mindspore_pairs(), target, f"MindSpore checkpoint {path}",
                             derived=derived, ignored=ignored)
    for k in range(len(cfg.anchors.feature_sizes)):
        for p in ("weight", "bias"):
            state[f"loc_heads.{k}.3.{p}"] = swap_yx_offsets(state[f"loc_heads.{k}.3.{p}"])
    model.load_state_dict(state, assign=True)
    return {"model": model.state_dict(), "config": cfg.to_dict(), "class_names": list(TUTORIAL_CLASS_NAMES),
            "imported_from": f"mindspore:{Path(path).name}"}


# --------------------------------------------------------------------------------------------- command line

def add_import_weights_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``multibox import-weights --from torchvision|mindspore FILE --out CKPT``."""
    p = subparsers.add_parser(
        "import-weights", help="convert torchvision ssd300_vgg16 or MindSpore tutorial weights into a checkpoint",
        description="torchvision: a torch.save(model.state_dict()) file of torchvision's ssd300_vgg16 becomes an "
                    "ssd300-vgg16 checkpoint. mindspore: a mindspore.save_checkpoint file of the MindSpore "
                    "tutorial's SSD300Vgg16 becomes an ssd300-vgg16-seed checkpoint (MindSpore is not needed).")
    p.add_argument("--from", dest="source", required=True, choices=("torchvision", "mindspore"))
    p.add_argument("file", help="the weights file to convert")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--ignore-training-state", action="store_true",
                   help="mindspore: drop optimizer/bookkeeping entries (moments.*, global_step, learning_rate, ...)")
    p.set_defaults(func=run_import_weights)
    return p


def run_import_weights(args: argparse.Namespace) -> int:
    if args.source == "torchvision":
        payload = import_torchvision_ssd300(args.file)
    else:
        payload = import_mindspore_ckpt(args.file, ignore_training_state=args.ignore_training_state)
    save_checkpoint(payload, args.out)
    print(f"{args.file} ({args.source}) -> {args.out}: {payload['config']['model']['arch']}, "
          f"{len(payload['class_names']) - 1} classes, {len(payload['model'])} tensors")
    return 0
