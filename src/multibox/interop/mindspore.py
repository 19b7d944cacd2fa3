"""A ``mindspore.save_checkpoint`` file of a MindSpore SSD as a multibox checkpoint (:func:`import_mindspore_ckpt`),
read with the ``protobuf`` package alone (no MindSpore); :func:`write_mindspore_ckpt` writes the same format (tests).

Which network a file holds is recognised from its parameter names and shapes by the modules of
:data:`MINDSPORE_NETWORKS`; this one knows the SSD300-VGG16s: the MindSpore tutorial's ``SSD300Vgg16``
(``ssd300-vgg16-seed``) and the model zoo's ``SSD300VGG16`` (``ssd300-vgg16-zoo``, with or without ``ssd_vgg_bn``).

Every parameter is mapped by name and shape; parameters the source lacks, source entries nothing uses and shape
mismatches fail loudly, listing them (:func:`multibox.models.weights.remap_state_dict`).
"""
from __future__ import annotations

import binascii
import importlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from multibox.config import Config, load_config
from multibox.data.categories import category_ids_of
from multibox.models import model_skeleton
from multibox.models.vgg import VGG16_BLOCKS
from multibox.models.weights import WeightMappingError, describe_names, remap_state_dict

__all__ = ["MINDSPORE_NETWORKS", "TUTORIAL_CLASS_NAMES", "VGG16_LAYOUTS", "convert", "import_mindspore_ckpt",
           "mindspore_vgg16_pairs", "read_mindspore_ckpt", "recognise", "swap_yx_offsets", "tutorial_mindspore_pairs",
           "vgg16_config", "vgg16_layout", "write_mindspore_ckpt"]


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


# Where a MindSpore SSD300-VGG16 keeps each VGG convolution inside a stage ``bN`` (a SequentialCell), and its
# BatchNorm: the tutorial's `_make_layer` holds convolutions only (0, 1, 2); the model zoo's appends a ReLU cell
# after each (0, 2, 4); with `ssd_vgg_bn` a BatchNorm2d between them (conv 0, 3, 6; BatchNorm 1, 4, 7).
# layout -> (cells per convolution, whether a BatchNorm follows each convolution).
VGG16_LAYOUTS: dict[str, tuple[int, bool]] = {"tutorial": (1, False), "zoo": (2, False), "zoo_bn": (3, True)}
# Default boxes per location of the six levels -> the preset of that anchor layout.
_ANCHOR_PRESETS = {(4, 6, 6, 6, 4, 4): "ssd300-vgg16-seed", (3, 6, 6, 6, 6, 6): "ssd300-vgg16-zoo"}


# MindSpore's BatchNorm2d gamma, beta, moving_mean, moving_variance are PyTorch's weight, bias, running_mean,
# running_var.
BATCHNORM_LEAVES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def batchnorm_pairs(ours: str, theirs: str) -> list[tuple[str, str]]:
    """(our name, MindSpore name) of one BatchNorm's four entries (:data:`BATCHNORM_LEAVES`)."""
    return [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in BATCHNORM_LEAVES.items()]


def separable_head_pairs(num_levels: int) -> list[tuple[str, str]]:
    """(our name, MindSpore name) of the tutorial's and the zoo's per-level heads ``multi_box.multi_{loc,cls}_layers.K``
    (0: depthwise, 1: BatchNorm, 3: 1x1 conv with bias) as our separable ``loc_heads.K`` / ``cls_heads.K``."""
    pairs = []
    for ours, theirs in (("loc_heads", "multi_loc_layers"), ("cls_heads", "multi_cls_layers")):
        for k in range(num_levels):
            dst, src = f"{ours}.{k}", f"multi_box.{theirs}.{k}"
            pairs += [(f"{dst}.0.weight", f"{src}.0.weight"), *batchnorm_pairs(f"{dst}.1", f"{src}.1"),
                      (f"{dst}.3.weight", f"{src}.3.weight"), (f"{dst}.3.bias", f"{src}.3.bias")]
    return pairs


def mindspore_vgg16_pairs(layout: str = "tutorial", num_levels: int = 6) -> list[tuple[str, str]]:
    """(our name, MindSpore name) for every parameter of a MindSpore SSD300-VGG16 whose VGG stages are laid out as
    ``layout`` (:data:`VGG16_LAYOUTS`): the tutorial's ``SSD300Vgg16`` (SPEC §2) or the model zoo's
    ``SSD300VGG16`` (official/cv/ssd, src/ssd.py and src/vgg16.py). ``backbone.bS.J`` (no biases; ours
    ``backbone.blocks.S-1.I`` with I = 2j, or 3j with BatchNorm at 3j + 1, :func:`multibox.models.vgg.vgg_block`),
    ``b6_1`` (fc6), ``b7_1`` (fc7), ``b8_1`` .. ``b11_2`` (extras), and the heads
    ``multi_box.multi_{loc,cls}_layers.K.{0: depthwise, 1: BatchNorm, 3: 1x1 conv}``."""
    cells, batch_norm = VGG16_LAYOUTS[layout]
    ours_step = 3 if batch_norm else 2
    pairs = []
    for b, widths in enumerate(VGG16_BLOCKS):
        for j in range(len(widths)):
            dst, src = f"backbone.blocks.{b}.{ours_step * j}", f"backbone.b{b + 1}.{cells * j}"
            pairs.append((f"{dst}.weight", f"{src}.weight"))
            if batch_norm:
                pairs += batchnorm_pairs(f"backbone.blocks.{b}.{ours_step * j + 1}",
                                          f"backbone.b{b + 1}.{cells * j + 1}")
    pairs += [("backbone.fc6.weight", "b6_1.weight"), ("backbone.fc7.weight", "b7_1.weight")]
    pairs += [(f"backbone.extras.{e}.{c}.weight", f"b{e + 8}_{c + 1}.weight") for e in range(4) for c in range(2)]
    return pairs + separable_head_pairs(num_levels)


def tutorial_mindspore_pairs(num_levels: int = 6) -> list[tuple[str, str]]:
    """:func:`mindspore_vgg16_pairs` of the tutorial's layout (VGG convolutions at ``backbone.bS.{0, 1, 2}``)."""
    return mindspore_vgg16_pairs("tutorial", num_levels)


# Entries that a MindSpore *training* network or ModelCheckpoint adds next to the weights (``momentum``:
# nn.Momentum's coefficient, a parameter of the optimizer).
_TRAINING_STATE_NAMES = {"global_step", "learning_rate", "epoch_num", "step_num", "loss_scale", "scale_sense",
                         "current_iterator_step", "last_overflow_iterator_step", "beta1_power", "beta2_power",
                         "momentum"}
_TRAINING_STATE_PREFIXES = ("moments.", "accum.", "moment1.", "moment2.", "momentum.")
# A training network's own prefix: the zoo's train.py checkpoints TrainingWrapper(SSDWithLossCell(net)), whose
# loss cell holds the network as `self.network`, so every weight is saved as `network.<name>`.
_TRAINING_NETWORK_PREFIX = "network."


def _is_training_state(name: str) -> bool:
    return name in _TRAINING_STATE_NAMES or name.startswith(_TRAINING_STATE_PREFIXES)


def without_training_prefix(source: dict[str, Any]) -> dict[str, Any]:
    """``source`` with the ``network.`` prefix of a training network's checkpoint removed, when every weight (each
    entry that is not training state) has it; otherwise ``source`` unchanged."""
    weights = [k for k in source if not _is_training_state(k)]
    if not weights or not all(k.startswith(_TRAINING_NETWORK_PREFIX) for k in weights):
        return source
    cut = len(_TRAINING_NETWORK_PREFIX)
    return {k[cut:] if k.startswith(_TRAINING_NETWORK_PREFIX) else k: v for k, v in source.items()}


def swap_yx_offsets(tensor: Tensor) -> Tensor:
    """Reorder a loc head's output channels (k·4 first) from (dy, dx, dh, dw) to (dx, dy, dw, dh) per anchor (the
    map is its own inverse)."""
    k = tensor.shape[0] // 4
    return tensor.reshape(k, 4, *tensor.shape[1:])[:, [1, 0, 3, 2]].reshape(tensor.shape).contiguous()


def imported_payload(cfg: Config, model: nn.Module, source: Mapping[str, np.ndarray], pairs: list[tuple[str, str]],
                     loc_layers: list[str], path: Path) -> dict[str, Any]:
    """The checkpoint payload of a MindSpore SSD imported into ``model`` (a skeleton of ``cfg``): every parameter
    mapped by name and shape (``pairs``; BatchNorm's ``num_batches_tracked`` derived), the output channels of the
    ``loc_layers`` (our prefixes of the loc convolutions) reordered from MindSpore's (dy, dx, dh, dw) to our
    (dx, dy, dw, dh) (:func:`swap_yx_offsets`). Its 81 classes are the tutorial's (COCO 2017's in id order, so its
    labels name COCO's category ids: 12 -> 13)."""
    target = model.state_dict()
    derived = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in target.items() if k.endswith("num_batches_tracked")}
    state = remap_state_dict(source, pairs, target, f"MindSpore checkpoint {path}", derived=derived)
    for layer in loc_layers:
        for p in ("weight", "bias"):
            state[f"{layer}.{p}"] = swap_yx_offsets(state[f"{layer}.{p}"])
    model.load_state_dict(state, assign=True)
    return {"model": model.state_dict(), "config": cfg.to_dict(), "class_names": list(TUTORIAL_CLASS_NAMES),
            "category_ids": category_ids_of(TUTORIAL_CLASS_NAMES), "imported_from": f"mindspore:{Path(path).name}"}


# The MindSpore networks `import-weights --from mindspore` recognises, tried in order: modules that define
#   recognise(source: Mapping[str, np.ndarray]) -> bool      (from parameter names and shapes alone)
#   convert(source: Mapping[str, np.ndarray], path: Path) -> dict   (the checkpoint payload, see import_mindspore_ckpt)
MINDSPORE_NETWORKS: list[str] = ["multibox.interop.mindspore", "multibox.interop.mindspore_fpn",
                                 "multibox.interop.mindspore_mobilenet_v2"]


def import_mindspore_ckpt(path: str | Path, ignore_training_state: bool = False) -> dict[str, Any]:
    """A ``mindspore.save_checkpoint`` file -> multibox checkpoint payload, for whichever network of
    :data:`MINDSPORE_NETWORKS` recognises the file's parameter names and shapes.

    The payload: ``model`` (state dict), ``config`` (``Config.to_dict()``), ``class_names`` (background first),
    ``category_ids`` and ``imported_from`` (``"mindspore:<file name>"``). A training network's checkpoint (names
    ``network.*``, as the model zoo's train.py writes them) reads as the network's own.

    Args:
        ignore_training_state: drop optimizer and bookkeeping entries (``moments.*``, ``global_step``,
            ``learning_rate``, ``momentum``, ...) that a checkpoint of a MindSpore training network carries; by
            default they are left-overs, and an error.
    """
    path = Path(path)
    source = without_training_prefix(read_mindspore_ckpt(path))
    if ignore_training_state:
        source = {k: v for k, v in source.items() if not _is_training_state(k)}
    strings = {k for k, v in source.items() if isinstance(v, str)}
    if strings:
        raise WeightMappingError(f"{path}: string entries map to nothing: {describe_names(strings)}")
    for name in MINDSPORE_NETWORKS:
        network = importlib.import_module(name)
        if network.recognise(source):
            return network.convert(source, path)
    raise WeightMappingError(f"{path}: no known MindSpore network has these parameters "
                             f"({describe_names(source, limit=4)}); known: {', '.join(MINDSPORE_NETWORKS)}")


# The model-zoo archs whose trunk an ImageNet MindSpore checkpoint initialises (model.backbone_weights: FILE.ckpt, as
# the zoo's feature_extractor_base_param / pre_trained): arch -> module defining
#   load_trunk(model: nn.Module, source: Mapping[str, np.ndarray], origin: str) -> dict   (what was loaded)
MINDSPORE_BACKBONES: dict[str, str] = {
    "ssd640_mobilenet_v1_fpn": "multibox.interop.mindspore_fpn",
    "ssd640_resnet50_fpn": "multibox.interop.mindspore_fpn",
    "ssd300_mobilenet_v2": "multibox.interop.mindspore_mobilenet_v2",
}


def is_mindspore_ckpt(path: str | Path) -> bool:
    """Whether ``path`` names a MindSpore checkpoint (``.ckpt``, MindSpore's suffix) rather than a ``torch.save`` file."""
    return Path(path).suffix == ".ckpt"


def load_mindspore_backbone(model: nn.Module, arch: str, path: str | Path, origin: str | None = None) -> dict[str, Any]:
    """ImageNet weights of a model-zoo trunk from a MindSpore checkpoint into ``model`` (an SSD of ``arch``): its
    training-state entries and ``network.`` prefix are dropped, then the arch's importer of
    :data:`MINDSPORE_BACKBONES` maps the trunk by name and shape (the rest keeps its initialisation)."""
    origin = origin or str(path)
    if arch not in MINDSPORE_BACKBONES:
        raise WeightMappingError(f"{origin}: a MindSpore checkpoint initialises the trunk of "
                                 f"{', '.join(sorted(MINDSPORE_BACKBONES)) or 'no arch'}, not of model.arch {arch}")
    source = without_training_prefix(read_mindspore_ckpt(path))
    source = {k: v for k, v in source.items() if not _is_training_state(k) and not isinstance(v, str)}
    return importlib.import_module(MINDSPORE_BACKBONES[arch]).load_trunk(model, source, origin)


def recognise(source: Mapping[str, np.ndarray]) -> bool:
    """Whether ``source`` is (an attempt at) a MindSpore SSD300-VGG16, the tutorial's or the model zoo's: it has
    VGG16's first convolution ``backbone.b1.0.weight`` and fc6 ``b6_1.weight``."""
    return "backbone.b1.0.weight" in source and "b6_1.weight" in source


def vgg16_layout(source: Mapping[str, np.ndarray], path: Path | str = "checkpoint") -> str:
    """The :data:`VGG16_LAYOUTS` entry of a MindSpore SSD300-VGG16 checkpoint, from where its first stage keeps
    the two convolutions (4-d ``backbone.b1.I.weight``) and whether a BatchNorm (``backbone.b1.1.gamma``) follows:
    (0, 1) tutorial, (0, 2) zoo, (0, 3) with BatchNorm zoo_bn."""
    convs = tuple(sorted(int(k.split(".")[2]) for k, v in source.items()
                         if k.startswith("backbone.b1.") and k.endswith(".weight") and k.count(".") == 3
                         and np.ndim(v) == 4))
    batch_norm = "backbone.b1.1.gamma" in source
    for layout, (cells, with_bn) in VGG16_LAYOUTS.items():
        if convs == (0, cells) and batch_norm == with_bn:
            return layout
    raise WeightMappingError(
        f"{path}: backbone.b1 holds convolutions at {list(convs)}{' and a BatchNorm at 1' if batch_norm else ''}: "
        "neither the MindSpore tutorial's VGG16 (0, 1), the model zoo's (0, 2) nor its ssd_vgg_bn (0, 3, "
        "BatchNorm 1)")


def _boxes_per_location(source: Mapping[str, np.ndarray], path: Path) -> tuple[int, ...]:
    """Default boxes per location of each level, from the loc heads' last convolutions (4 outputs per box)."""
    boxes, k = [], 0
    while f"multi_box.multi_loc_layers.{k}.3.weight" in source:
        boxes.append(np.shape(source[f"multi_box.multi_loc_layers.{k}.3.weight"])[0] // 4)
        k += 1
    if tuple(boxes) not in _ANCHOR_PRESETS:
        known = "; ".join(f"{list(b)} ({p})" for b, p in _ANCHOR_PRESETS.items())
        raise WeightMappingError(f"{path}: its loc heads predict {boxes} boxes per location, a layout of default "
                                 f"boxes none of the known SSD300-VGG16s has: {known}")
    return tuple(boxes)


def vgg16_config(source: Mapping[str, np.ndarray], path: Path | str = "checkpoint") -> Config:
    """The config of the network a MindSpore SSD300-VGG16 checkpoint holds: the preset of its default boxes
    (``ssd300-vgg16-seed``: the tutorial's 4, 6, 6, 6, 4, 4 per location; ``ssd300-vgg16-zoo``: the zoo's
    3, 6, 6, 6, 6, 6) with ``model.vgg_relu`` / ``model.vgg_bn`` of its VGG layout (:func:`vgg16_layout`)."""
    path = Path(path)
    layout = vgg16_layout(source, path)
    boxes = _boxes_per_location(source, path)
    cls = source.get("multi_box.multi_cls_layers.0.3.weight")
    num_classes = None if cls is None else np.shape(cls)[0] // boxes[0]
    if num_classes != len(TUTORIAL_CLASS_NAMES):
        raise WeightMappingError(f"{path}: its class heads predict {num_classes} classes per box; the known "
                                 f"SSD300-VGG16s predict background + COCO's 80 ({len(TUTORIAL_CLASS_NAMES)})")
    return load_config(_ANCHOR_PRESETS[boxes], [f"model.vgg_relu={str(layout != 'tutorial').lower()}",
                                                f"model.vgg_bn={str(VGG16_LAYOUTS[layout][1]).lower()}"])


def convert(source: Mapping[str, np.ndarray], path: Path) -> dict[str, Any]:
    """A checkpoint of a MindSpore SSD300-VGG16 (the tutorial's or the model zoo's) -> checkpoint payload of the
    config :func:`vgg16_config` recognises.

    Every parameter is mapped by name and shape (:func:`mindspore_vgg16_pairs`); missing or left-over entries are
    an error. MindSpore's loc outputs are (dy, dx, dh, dw) per anchor (both sources' box_utils encode
    [cy, cx, h, w]) and ours (dx, dy, dw, dh): the loc heads' last 1x1 convolutions get their output channels
    (weight rows and bias) swapped 0<->1, 2<->3 per anchor, so the imported network equals MindSpore's up to
    exactly that reordering of its loc output. Default boxes are in MindSpore's order (extra box last) in both
    presets; class channel 0 is background in both.
    """
    cfg = vgg16_config(source, path)
    levels = len(cfg.anchors.feature_sizes)
    return imported_payload(cfg, model_skeleton(cfg), source, mindspore_vgg16_pairs(vgg16_layout(source, path), levels),
                            [f"loc_heads.{k}.3" for k in range(levels)], path)
