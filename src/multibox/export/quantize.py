"""Static INT8 quantization of an exported multibox graph (onnxruntime's QDQ format), with an accuracy gate.

What is quantized
=================

Only the network: the convolutions and the ops between them (ReLU, pooling, residual adds, concatenations,
resizes). The normalisation in front of the first convolution and everything after the last ones -- box decoding,
scores, NMS, top-k -- stay in float32: a node is quantized only when it lies between two convolutions of the graph
(found from the graph's structure, so any exporter's node names and every preset work). Weights: int8, per output
channel; activations: uint8, per tensor (asymmetric ranges for post-ReLU tensors; U8S8 is the pair onnxruntime's
x86 kernels run natively with VNNI); biases: int32. By default the first convolution (it sees the raw normalised
image) and the last convolution of every head (the loc offsets and class logits themselves) stay in float: the
layers whose quantization is known to cost detectors the most accuracy and which are a small share of the work.

Before quantizing, the float graph goes through onnxruntime's ``quant_pre_process`` (its basic graph
optimisations and ONNX shape inference): the TorchScript exporter writes ``Identity`` nodes in front of shared
constants and head biases that are outputs of nodes rather than initializers, which leaves the QDQ pattern
unfusable for many convolutions; after it every convolution has constant weights and bias and onnxruntime fuses
each quantized one into a ``QLinearConv`` (counted by :func:`optimized_op_counts` in onnxruntime's own optimized
graph).

Calibration and the gate
========================

:func:`export_int8` calibrates on images of the calibration data, decoded as multibox decodes them and resized by
:func:`multibox.inference.onnx.resize_for_model` with the export's resize and input dtype (the preprocessing of
every deployed model). On an annotated source the calibration images are drawn from its *training* split and the
gate measures COCO AP on its *evaluation* split (:func:`multibox.data.build.build_splits`): the gate never scores
the images the ranges were fitted on. ``val_data`` replaces the evaluation split by every image of another set.

The gate runs the float and the INT8 graph through the same runtime (:func:`~multibox.inference.onnx.load_onnx`
with ``runtime``) and refuses an INT8 model whose AP is more than :data:`MAX_RELATIVE_AP_DROP` (1 %) below the
float model's, relative. With the gate, the first try quantizes the heads too (only the first convolution stays in
float): they hold a third of SSD300-VGG16's weights at 91 classes and a quarter of its INT8 time, and a model whose
AP survives it keeps that speed. When it fails, the second try keeps the heads in float (the default without a
gate), and before refusing it tries :data:`FALLBACK_ROUNDS` more times, each time leaving in float the
quantized convolutions with the largest quantization error on the calibration images (:func:`conv_errors`). A
refusal raises :class:`AccuracyGateError` (a one-line reason with both APs) and writes nothing; ``force`` skips
the gate. Without annotations the model is written and a warning says that the gate could not run.

Calibration: MinMax ranges over :data:`DEFAULT_CALIB_IMAGES` (64) images. Measured on a tiny model trained on
320 synthetic images (COCO AP 0.4525 on its 80 held-out images): MinMax, Percentile (99.999) and Entropy on 8, 32
and 128 calibration images all gave INT8 AP 0.453-0.456 on both runtimes -- no method or count stood out of the
noise -- and MinMax was the cheapest (1.2 / 2.6 / 8.9 s for 8 / 32 / 128 images; Percentile and Entropy 1.9-15.5
s) and needs no histograms. 64 images give a range many scenes to see (MinMax ranges only widen with more) for 64
forward passes. The fallback ranks convolutions by the error of their own input and output quantization on the
calibration images (:func:`conv_errors`), which with MinMax ranges is the rounding cost of wide ranges (outliers).
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from multibox.errors import InputError, MultiboxError
from multibox.export import DEFAULT_CALIB_IMAGES, MAX_RELATIVE_AP_DROP
from multibox.io import atomic_path

__all__ = ["AccuracyGateError", "CALIBRATION_METHOD", "DEFAULT_CALIB_IMAGES", "FALLBACK_ROUNDS", "Int8Report",
           "MAX_RELATIVE_AP_DROP", "NetworkGraph", "conv_errors", "export_int8", "network_graph",
           "optimized_op_counts", "quantize_onnx"]

log = logging.getLogger(__name__)

FALLBACK_ROUNDS = 3
CALIBRATION_METHOD = "MinMax"
# Op types quantized when they lie between two convolutions (inside the network).
NETWORK_OP_TYPES = ("Conv", "Relu", "Clip", "MaxPool", "Add", "Concat", "Resize")
FLOAT_CONV_TYPES = ("Conv", "FusedConv", "NhwcFusedConv")
INT8_CONV_TYPES = ("QLinearConv", "ConvInteger")


class AccuracyGateError(MultiboxError):
    """The INT8 model lost more accuracy than the gate allows (one line: both APs, the change, what to do)."""


@dataclass
class Int8Report:
    """What :func:`export_int8` wrote: ``ap_float`` / ``ap_int8`` are COCO AP on the gate's data (None when the
    gate did not run), ``keep_float`` the node names left in float, ``int8_convs`` / ``float_convs`` the
    convolutions of onnxruntime's optimized INT8 graph that run int8 / float kernels."""

    path: Path
    ap_float: float | None
    ap_int8: float | None
    gated: bool
    keep_float: list[str]
    int8_convs: int = 0
    float_convs: int = 0
    calib_images: int = 0
    gate_data: str | None = None
    rounds: int = 1
    runtime: str | None = None   # the runtime the gate scored both models with

    @property
    def relative_change(self) -> float | None:
        """(AP int8 - AP float) / AP float, None without both (or with a float AP of 0)."""
        if self.ap_float is None or self.ap_int8 is None or self.ap_float <= 0:
            return None
        return (self.ap_int8 - self.ap_float) / self.ap_float


# --------------------------------------------------------------------------- the graph


@dataclass
class NetworkGraph:
    """The network part of an exported graph. ``convs``: its Conv node names in graph order; ``first``: those with
    no Conv upstream; ``heads``: those with no Conv downstream (the loc / cls outputs); ``region``: the nodes of
    :data:`NETWORK_OP_TYPES` between two convolutions (the ones quantized)."""

    convs: list[str]
    first: list[str]
    heads: list[str]
    region: list[str]

    @property
    def default_keep_float(self) -> list[str]:
        """The first convolution(s) and the last one of every head."""
        return [name for name in self.convs if name in set(self.first) | set(self.heads)]


def network_graph(model: Any) -> NetworkGraph:
    """:class:`NetworkGraph` of an ``onnx.ModelProto`` (nodes topologically sorted, as ONNX requires; every node
    named)."""
    nodes = list(model.graph.node)
    producer = {out: node for node in nodes for out in node.output}
    conv_above: dict[str, bool] = {}
    for node in nodes:
        parents = [producer[t] for t in node.input if t in producer]
        conv_above[node.name] = any(p.op_type == "Conv" or conv_above[p.name] for p in parents)
    consumers: dict[str, list] = {}
    for node in nodes:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    conv_below: dict[str, bool] = {}
    for node in reversed(nodes):
        children = [c for t in node.output for c in consumers.get(t, [])]
        conv_below[node.name] = any(c.op_type == "Conv" or conv_below[c.name] for c in children)
    convs = [n for n in nodes if n.op_type == "Conv"]
    region = [n.name for n in nodes if n.op_type in NETWORK_OP_TYPES
              and (n.op_type == "Conv" or (conv_above[n.name] and conv_below[n.name]))]
    return NetworkGraph(convs=[n.name for n in convs], first=[n.name for n in convs if not conv_above[n.name]],
                        heads=[n.name for n in convs if not conv_below[n.name]], region=region)


def _prepare(float_path: Path, prepared: Path) -> Any:
    """onnxruntime's ``quant_pre_process`` of ``float_path`` into ``prepared`` (see the module docstring), every
    node named; returns the ``onnx.ModelProto``."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    # Symbolic shape inference is for transformer graphs; ONNX shape inference (kept) types every tensor here.
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    names = {node.name for node in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = next(f"{node.op_type}_{i}_{k}" for k in range(len(names) + 1)
                             if f"{node.op_type}_{i}_{k}" not in names)
            names.add(node.name)
    constants = {init.name for init in model.graph.initializer}
    loose = [n.name for n in model.graph.node if n.op_type == "Conv" and any(t not in constants for t in n.input[1:])]
    if loose:
        log.warning("%s: %d convolutions have weights or biases that are not constants (e.g. %s): they cannot run "
                    "int8 kernels", float_path, len(loose), loose[0])
    onnx.save(model, str(prepared))
    return model


# --------------------------------------------------------------------------- quantization


class _Batches:
    """onnxruntime's CalibrationDataReader over a list of input arrays.

    ``CalibStridedMinMax`` reads it in chunks (``__len__``, ``set_range``): the calibrator merges ranges chunk by
    chunk instead of holding every intermediate tensor of every batch in memory at once."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]):
        self.input_name, self.batches = input_name, batches
        self.position, self.end = 0, len(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, min(end_index, len(self.batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}


def _as_arrays(calibration_batches: Iterable[Any]) -> list[np.ndarray]:
    """(N, 3, H, W) tensors or arrays -> a list of contiguous numpy arrays (refused when there is none)."""
    arrays = [b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b) for b in calibration_batches]
    if not arrays:
        raise InputError("calibration needs at least one image; got none")
    return [np.ascontiguousarray(a) for a in arrays]


def quantize_onnx(float_path: str | os.PathLike, out_path: str | os.PathLike, calibration_batches: Iterable[Any],
                  keep_float: Sequence[str] | None = None, method: str = CALIBRATION_METHOD,
                  ranges_cache: str | os.PathLike | None = None, quantize_heads: bool = False) -> Path:
    """Static QDQ INT8 quantization of the exported graph ``float_path`` into ``out_path`` (atomically); returns
    ``out_path``.

    Args:
        calibration_batches: (N, 3, H, W) arrays (or tensors) of the graph's input dtype: resized images
            (:func:`multibox.inference.onnx.resize_for_model`).
        keep_float: node names of the graph to leave in float; None = the first convolution and the last one of
            every head (:attr:`NetworkGraph.default_keep_float`; only the first with ``quantize_heads``). Names of
            nodes that are not in the graph: :class:`InputError`.
        method: onnxruntime's calibration method: "MinMax", "Percentile" or "Entropy".
        ranges_cache: a file for the calibrated ranges: computed and written when it does not exist, read when it
            does (quantizing the same graph and batches again, with other nodes kept in float).
    The metadata of the float graph is kept, plus ``multibox.quantization`` (JSON: what was done).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    float_path, out_path = Path(float_path), Path(out_path)
    arrays = _as_arrays(calibration_batches)
    with tempfile.TemporaryDirectory(prefix="multibox-int8-") as tmp:
        prepared = _prepare(float_path, Path(tmp) / "prepared.onnx")
        graph = network_graph(prepared)
        if keep_float is not None:
            keep = list(keep_float)
        else:
            keep = [name for name in graph.convs if name in graph.first] if quantize_heads else graph.default_keep_float
        unknown = sorted(set(keep) - {n.name for n in prepared.graph.node})
        if unknown:
            raise InputError(f"{float_path}: no node named {unknown[0]!r} to keep in float")
        nodes = [name for name in graph.region if name not in set(keep)]
        types = sorted({n.op_type for n in prepared.graph.node if n.name in set(nodes)})
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(str(Path(tmp) / "prepared.onnx"), str(quantized),
                        _Batches(prepared.graph.input[0].name, arrays), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=types, nodes_to_quantize=nodes,
                        calibrate_method=getattr(CalibrationMethod, method),
                        # A tensor constant on every image (a dead channel) gets a range of 0 and a scale of 0
                        # otherwise (NaN zero point); 1e-4 is far below any range that matters.
                        extra_options={"CalibStridedMinMax": _stride(len(arrays)), "MinimumRealRange": 1e-4},
                        **_ranges_cache_argument(quantize_static, ranges_cache))
        model = onnx.load(str(quantized))
    _copy_metadata(onnx.load(str(float_path), load_external_data=False), model, {
        "format": "QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor", "calibration": method,
        "calibration_batches": len(arrays), "float_nodes": keep,
        "quantized_convs": [c for c in graph.convs if c not in set(keep)]})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp_file:
        onnx.save(model, str(tmp_file))
    return out_path


def _ranges_cache_argument(quantize_static: Any, ranges_cache: str | os.PathLike | None) -> dict[str, Any]:
    """``calibration_cache_path`` for onnxruntime's quantize_static where it has it (recent releases); older ones
    calibrate again on every call, with the same ranges."""
    if ranges_cache is None or "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        return {}
    return {"calibration_cache_path": ranges_cache}


def _stride(count: int) -> int:
    """Batches per calibration chunk: the largest divisor of ``count`` up to 8 (onnxruntime needs a divisor)."""
    return max(d for d in range(1, 9) if count % d == 0)


def _copy_metadata(source: Any, target: Any, quantization: dict[str, Any]) -> None:
    """``target``'s metadata = ``source``'s plus ``multibox.quantization``."""
    del target.metadata_props[:]
    for prop in source.metadata_props:
        if prop.key != "multibox.quantization":
            target.metadata_props.add(key=prop.key, value=prop.value)
    target.metadata_props.add(key="multibox.quantization", value=json.dumps(quantization))


def optimized_op_counts(path: str | os.PathLike) -> Counter:
    """Node counts by op type of onnxruntime's optimized graph of ``path`` (CPU provider, extended
    optimisations: the level at which QDQ groups become int8 kernels), written through
    ``SessionOptions.optimized_model_filepath``."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="multibox-ort-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def conv_counts(path: str | os.PathLike) -> tuple[int, int]:
    """(int8, float) convolutions of onnxruntime's optimized graph of ``path``."""
    counts = optimized_op_counts(path)
    return sum(counts[t] for t in INT8_CONV_TYPES), sum(counts[t] for t in FLOAT_CONV_TYPES)


# --------------------------------------------------------------------------- which layers hurt


def _with_outputs(model: Any, tensors: Sequence[str]) -> bytes:
    """``model`` serialized with ``tensors`` added as graph outputs (a copy)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    copy.graph.output.extend(onnx.ValueInfoProto(name=t) for t in dict.fromkeys(tensors) if t not in present)
    return copy.SerializeToString()


def _activation_qdq(model: Any) -> dict[str, tuple[str, bool]]:
    """``{tensor: (its QDQ'd copy, zero point is 0)}`` for every activation quantized in the QDQ ``model``."""
    from onnx import numpy_helper

    constants = {i.name: i for i in model.graph.initializer}
    dequantized = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    found = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants and node.output[0] in dequantized:
            zero = len(node.input) < 3 or not numpy_helper.to_array(constants[node.input[2]]).any()
            found[node.input[0]] = (dequantized[node.output[0]], bool(zero))
    return found


def conv_errors(int8_path: str | os.PathLike, calibration_batches: Iterable[Any]) -> dict[str, float]:
    """The quantization error at each quantized convolution of the QDQ graph ``int8_path``, on the batches.

    Each quantized activation tensor ``x`` gets ``|qdq(x) - x|² / |x|²`` from one run of the INT8 graph (as QDQ
    arithmetic): the error of its own range and rounding, not the noise that reached it from above (with a zero
    point of 0 the range starts at 0 on purpose -- a ReLU fused into it -- so ``x`` is taken as ``max(x, 0)``).
    A convolution's error is that of its input plus that of its output: what leaving it in float would remove
    first. Returns ``{conv node name: error}`` for the quantized convolutions, largest first."""
    import onnx
    import onnxruntime as ort

    int8 = onnx.load(str(int8_path))
    qdq = _activation_qdq(int8)
    producer_of_dq = {n.output[0]: n.input[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}
    quantize_input = {n.output[0]: n.input[0] for n in int8.graph.node if n.op_type == "QuantizeLinear"}
    tensors = [t for pair in ((x, copy) for x, (copy, _) in qdq.items()) for t in pair]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # keep every tensor
    session = ort.InferenceSession(_with_outputs(int8, tensors), options, providers=["CPUExecutionProvider"])
    noise, power = Counter(), Counter()
    for batch in _as_arrays(calibration_batches):
        values = dict(zip(tensors, session.run(tensors, {session.get_inputs()[0].name: batch})))
        for x, (copy, zero) in qdq.items():
            ref = np.maximum(values[x], 0) if zero else values[x]
            noise[x] += float(np.square(values[copy].astype(np.float64) - ref).sum())
            power[x] += float(np.square(ref.astype(np.float64)).sum())
    error = {x: noise[x] / max(power[x], 1e-30) for x in qdq}
    quantized = set(json.loads({p.key: p.value for p in int8.metadata_props}["multibox.quantization"])[
        "quantized_convs"])
    result = {}
    for conv in (n for n in int8.graph.node if n.name in quantized):
        source = quantize_input.get(producer_of_dq.get(conv.input[0], ""), "")
        result[conv.name] = error.get(source, 0.0) + error.get(conv.output[0], 0.0)
    return dict(sorted(result.items(), key=lambda item: -item[1]))


# --------------------------------------------------------------------------- calibration and gate data


@dataclass
class _Data:
    """Calibration images (decoded uint8 (3, H, W)) and the gate's splits (None: no annotated data to gate on)."""

    images: list[torch.Tensor]
    gate: Any = None            # DataSplits whose ``val`` the gate scores
    gate_name: str | None = None


def _sample(indices: Sequence[int], count: int, seed: int) -> list[int]:
    """``count`` of ``indices`` drawn without replacement (all when fewer), deterministic for ``seed``, sorted."""
    indices = list(indices)
    return sorted(random.Random(seed).sample(indices, min(count, len(indices))))


def _decoded(dataset: Any, indices: Sequence[int]) -> list[torch.Tensor]:
    """Decoded images of a multibox dataset (unreadable ones are logged by the dataset and left out)."""
    samples = (dataset[i] for i in indices)
    return [sample[0] for sample in samples if sample is not None]


def _splits_of(cfg: Any, path: str, evaluate_all: bool) -> Any:
    """``build_splits`` of ``path`` under the checkpoint's config: every image for evaluation (``evaluate_all``,
    as ``multibox eval --data``), else its own training / evaluation split."""
    import copy

    from multibox.data.build import build_splits

    cfg = copy.deepcopy(cfg)
    cfg.data.path, cfg.data.val_path = path, (path if evaluate_all else None)
    return build_splits(cfg, train_transform=_identity)


def _identity(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    return image, target


def _annotated(path: str, cfg: Any) -> bool:
    """Whether the data source at ``path`` has at least one box (a folder of images has none)."""
    from multibox.data.build import open_dataset, source_kind

    if path != "synth" and Path(path).is_dir():
        try:
            source_kind(path)
        except FileNotFoundError:   # a plain folder of images
            return False
    if path == "synth":
        return True
    return any(record.num_boxes for record in open_dataset(path, cfg).records)


def _calibration_data(cfg: Any, calib_data: str, calib_images: int, val_data: str | None) -> _Data:
    """The calibration images and the gate's data (see the module docstring)."""
    from multibox.data.coco import read_image_rgb
    from multibox.inference.predict import collect_inputs

    if calib_images < 1:
        raise InputError(f"--calib-images must be >= 1, got {calib_images}")
    seed = int(cfg.train.seed)
    if _annotated(calib_data, cfg):
        splits = _splits_of(cfg, calib_data, evaluate_all=False)
        train = splits.train
        images = _decoded(train.dataset, [train.indices[i] for i in _sample(range(len(train)), calib_images, seed)])
        data = _Data(images, splits, f"the evaluation split of {calib_data} ({len(splits.val)} images)")
    else:
        found = collect_inputs([calib_data]).images
        chosen = [found[i] for i in _sample(range(len(found)), calib_images, seed)]
        data = _Data([read_image_rgb(p, int(cfg.data.max_image_pixels)) for p in chosen])
    if val_data is not None:
        if not _annotated(val_data, cfg):
            raise InputError(f"{val_data}: --val-data has no annotations to measure AP on")
        splits = _splits_of(cfg, val_data, evaluate_all=True)
        data.gate, data.gate_name = splits, f"{val_data} ({len(splits.val)} images)"
    if not data.images:
        raise InputError(f"{calib_data}: none of the images chosen for calibration could be read")
    return data


def calibration_batches(images: Sequence[torch.Tensor], detector: Any, batch_size: int = 1) -> list[np.ndarray]:
    """Decoded uint8 images -> the graph inputs of ``detector`` (an OnnxDetector): (B, 3, H, W) arrays of its
    input dtype, resized by its :meth:`~multibox.inference.onnx.OnnxDetector.preprocess` (what its ``predict``
    feeds the graph)."""
    batches = []
    for start in range(0, len(images), batch_size):
        stacked = detector.preprocess(images[start:start + batch_size])
        if detector.input_dtype == np.uint8 and stacked.dtype != torch.uint8:
            stacked = stacked.round().clamp(0, 255).to(torch.uint8)
        batches.append(stacked.numpy().astype(detector.input_dtype, copy=False))
    return batches


def _gate_ap(path: Path, splits: Any, runtime: str) -> float:
    """COCO AP of the graph at ``path`` on ``splits.val`` (labels matched to the data's categories by name)."""
    from multibox.evaluation.evaluate import category_map_by_name
    from multibox.inference.onnx import load_onnx
    from multibox.inference.onnx_eval import evaluate_onnx

    detector = load_onnx(path, runtime=runtime)
    try:
        mapping = category_map_by_name(detector.class_names, splits, detector.category_ids)
    except ValueError as err:
        raise InputError(str(err)) from None
    return float(evaluate_onnx(detector, splits, label_to_category_id=mapping).stats["AP"])


# --------------------------------------------------------------------------- export


def _refusal(ap_float: float, ap_int8: float, gate_name: str, keep: list[str], rounds: int) -> AccuracyGateError:
    change = (ap_int8 - ap_float) / ap_float if ap_float > 0 else float("-inf")
    return AccuracyGateError(
        f"INT8 model refused: COCO AP {ap_float:.4f} (float) -> {ap_int8:.4f} (INT8), {change:+.2%} relative on "
        f"{gate_name}, beyond the -{MAX_RELATIVE_AP_DROP:.0%} limit after {rounds} tries with up to {len(keep)} "
        f"layers kept in float; calibrate on more or more representative images (--calib-data, --calib-images) or "
        f"pass --force to write it anyway")


def _passes(ap_float: float, ap_int8: float) -> bool:
    return ap_float - ap_int8 <= MAX_RELATIVE_AP_DROP * max(ap_float, 0.0)


def _gated_quantization(float_path: Path, int8_path: Path, batches: list[np.ndarray], data: _Data,
                        runtime: str) -> tuple[float, float, list[str], int]:
    """Quantize (heads included), gate, on failure keep the heads in float, then leave the noisiest convolutions in
    float for up to FALLBACK_ROUNDS more tries. Returns (AP float, AP int8, nodes kept in float, tries);
    :class:`AccuracyGateError` when none passes."""
    ap_float = _gate_ap(float_path, data.gate, runtime)
    keep: list[str] | None = None
    for attempt in range(1, FALLBACK_ROUNDS + 3):
        quantize_onnx(float_path, int8_path, batches, keep_float=keep, ranges_cache=int8_path.with_suffix(".ranges"),
                      quantize_heads=attempt == 1)
        stored = _quantization_record(int8_path)
        keep = stored["float_nodes"]
        ap_int8 = _gate_ap(int8_path, data.gate, runtime)
        log.info("INT8 try %d: AP %.4f (float %.4f) with %d layers in float", attempt, ap_int8, ap_float, len(keep))
        if _passes(ap_float, ap_int8):
            return ap_float, ap_int8, keep, attempt
        if attempt == 1:
            keep = None   # the default: heads in float
            log.info("INT8 gate failed with the heads quantized; keeping them in float next")
        elif attempt <= FALLBACK_ROUNDS + 1 and stored["quantized_convs"]:
            errors = conv_errors(int8_path, batches)
            worst = list(errors)[:max(1, math.ceil(len(stored["quantized_convs"]) / 10))]
            log.info("INT8 gate failed; keeping in float next: %s", ", ".join(worst))
            keep = keep + worst
        else:
            break
    int8_path.unlink(missing_ok=True)
    raise _refusal(ap_float, ap_int8, data.gate_name or "the gate's data", keep, attempt)


def _quantization_record(path: Path) -> dict[str, Any]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(meta["multibox.quantization"])


def export_int8(checkpoint: str | os.PathLike, out: str | os.PathLike, calib_data: str, *,
                calib_images: int = DEFAULT_CALIB_IMAGES, val_data: str | None = None, force: bool = False,
                runtime: str = "auto", **export_kwargs: Any) -> Int8Report:
    """Export the checkpoint to ONNX (``export_kwargs``: :func:`multibox.export.onnx.export_checkpoint`'s), quantize
    it to INT8 calibrated on ``calib_images`` images of ``calib_data`` and gate it (see the module docstring);
    writes ``out`` atomically, nothing when refused (:class:`AccuracyGateError`).

    ``calib_data``: a COCO JSON, VOC folder, shard folder, ``synth`` or a folder of images (no gate then, unless
    ``val_data``); ``val_data``: annotated data to gate on instead of ``calib_data``'s evaluation split;
    ``force``: no gate; ``runtime``: the runtime both models are scored with (``load_onnx``'s)."""
    from multibox.checkpoint import load_checkpoint
    from multibox.config import Config
    from multibox.export.onnx import export_checkpoint
    from multibox.inference.onnx import OnnxDetector, resolve_runtime

    out = Path(out)
    cfg = Config.from_dict(load_checkpoint(checkpoint)["config"])
    data = _calibration_data(cfg, calib_data, calib_images, val_data)
    with tempfile.TemporaryDirectory(prefix="multibox-int8-") as tmp:
        float_path = export_checkpoint(checkpoint, Path(tmp) / "float.onnx", **export_kwargs)
        # onnxruntime only reads the graph's input here: no OpenVINO compilation for it.
        batches = calibration_batches(data.images, OnnxDetector(float_path, runtime="onnxruntime"))
        int8_path = Path(tmp) / "int8.onnx"
        report = Int8Report(path=out, ap_float=None, ap_int8=None, gated=False, keep_float=[],
                            calib_images=len(data.images), gate_data=data.gate_name)
        if force or data.gate is None:
            quantize_onnx(float_path, int8_path, batches)
            report.keep_float = _quantization_record(int8_path)["float_nodes"]
            if not force:
                log.warning("%s: no annotations to measure AP on: the INT8 model is written without the accuracy "
                            "gate (give annotated data with --val-data to run it)", calib_data)
        else:
            report.runtime = resolve_runtime(runtime)
            report.ap_float, report.ap_int8, report.keep_float, report.rounds = _gated_quantization(
                float_path, int8_path, batches, data, report.runtime)
            report.gated = True
        report.int8_convs, report.float_convs = conv_counts(int8_path)
        out.parent.mkdir(parents=True, exist_ok=True)   # only now: a refused model leaves no new folder either
        with atomic_path(out) as tmp_out:
            shutil.copyfile(int8_path, tmp_out)
    return report
