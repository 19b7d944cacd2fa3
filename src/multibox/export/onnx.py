"""ONNX export: the whole detector (normalisation, network, box decoding, NMS) in one graph.

The exported graph
==================

Input ``images``: (N, 3, H, W) RGB images **already resized** to the model's H x W (``model.image_size``: S for
S x S, 300 for SSD300, or [H, W]; H and W are fixed in the graph), with the resize of the preset's evaluation
(``data.resize``; see :func:`multibox.inference.onnx.resize_for_model`, which
:class:`~multibox.inference.onnx.OnnxDetector` applies for you):

- ``antialias`` (tutorial, tiny presets): each axis scaled on its own, bilinear with antialiasing on the uint8
  image; input ``uint8``;
- ``torchvision`` (paper presets): each axis scaled on its own, bilinear without antialiasing
  (``align_corners=False``) on the float image; input ``float32`` with values in 0..255 (not rounded: rounding to
  uint8 would change the detections slightly);
- ``letterbox``: one scale for both axes (the largest that fits), antialiased on the uint8 image, centred and padded
  with the data's mean colour (metadata ``multibox.letterbox_fill``; see :mod:`multibox.core.resize`); input
  ``uint8``.

``--input-dtype`` overrides the dtype. The batch axis is dynamic. The normalisation is inside the graph:
``(x - mean) / std`` (antialias, letterbox) or torchvision's ``(x / 255 - mean / 255) / (std / 255)``.

Outputs with postprocessing (the default), K = the per-image detection cap:

- ``boxes``: (N, K, 4) float32 xyxy, normalised to [0, 1] of the H x W input: for a stretching resize multiply by
  (w, h, w, h) of the original image to get its pixels; for letterbox undo the padding and the one scale first
  (:func:`multibox.core.resize.boxes_to_image_xyxy`, which :class:`~multibox.inference.onnx.OnnxDetector` applies);
- ``scores``: (N, K) float32, descending within an image;
- ``labels``: (N, K) int64 class indices 1..C into the class names stored in the model's metadata (0 is background;
  ``multibox.category_ids[label - 1]`` is the label's ``category_id`` in the data);
- ``num_detections``: (N,) int64; entries at positions >= num_detections[i] are padding
  (boxes 0, scores 0, labels -1).

The postprocessing reproduces :class:`multibox.core.postprocess.PostProcessor` of the checkpoint's config: sigmoid or
softmax scores, scores strictly above the threshold, at most ``pre_nms_top_k`` candidates per class and image,
per-class NMS (suppress when IoU > threshold), at most ``max_per_class`` per class, at most K per image (highest
scores). ONNX's ``NonMaxSuppression`` does the NMS; its score threshold is strict (``>``) and it suppresses at
IoU strictly above the threshold, as multibox does (checked in tests/export/test_export.py against onnxruntime).
K is ``eval.max_per_image``, or ``--max-det`` when given (smaller), or 100 (COCO's maxDets) when neither: the
graph then equals the PostProcessor with ``max_per_image = K``.

With ``--no-postprocess`` the outputs are the raw ``loc`` (N, A, 4) offsets, ``cls_logits`` (N, A, 1 + C) and the
constant ``anchors_cxcywh`` (A, 4) default boxes, for users who decode and suppress themselves.

The model's metadata (``metadata_props``) holds ``multibox.config`` (the full config as JSON),
``multibox.class_names`` (JSON list, index 0 = "background"), ``multibox.category_ids`` (JSON list: the data's
``category_id`` of each label 1..C, see :mod:`multibox.data.categories`), ``multibox.postprocess`` ("1"/"0"),
``multibox.max_detections``, ``multibox.resize`` (the resize the input needs), ``multibox.input`` (a one-line
description of the input) and, for letterbox exports only, ``multibox.letterbox_fill`` (JSON list: the uint8
padding colour, :func:`multibox.core.resize.letterbox_fill` of ``data.mean``).

Exporter: ``exporter="dynamo"`` is torch's maintained, ``torch.export``-based ``torch.onnx.export(...,
dynamo=True)`` (needs onnxscript); ``"torchscript"`` is the TorchScript-based one (``dynamo=False``), deprecated by
torch and the only one before torch 2.6. Both write the graph above (same inputs, outputs, dtypes, names and
metadata) and the same detections: tests/export/test_export.py runs every preset with the dynamo exporter through
onnxruntime against PyTorch. The NMS is the custom op ``multibox::multiclass_nms`` (:func:`multiclass_nms_indices`
eagerly; a data-dependent number of rows while exporting), which an onnxscript function in
``custom_translation_table`` writes as ``NonMaxSuppression``; under the TorchScript exporter a
``torch.autograd.Function``'s ``symbolic`` writes the same node. The opset is 17 with the TorchScript exporter and
18 with the dynamo one, its lowest: onnx's version converter cannot bring every preset's graph down to 17 (no Pad
adapter, used by the ResNet-FPN preset). The dynamo graph is smaller (no Identity nodes, constants folded, all-zero
conv biases dropped); both quantize fully with onnxruntime's static QDQ (every Conv a QLinearConv) when the biases
are distinct, as trained ones are, but the TorchScript one shares equal biases (e.g. the zeros of a fresh model)
through Identity nodes, which leaves those convolutions in float unless onnxruntime's ``quant_pre_process`` folds
them first (:func:`multibox.export.quantize.quantize_onnx` runs it).

Default (``exporter=None``): dynamo on torch >= 2.14 (checked there on every preset; torch made it its own default
in 2.9) with onnxscript importable, else TorchScript, with the reason logged on the ``multibox.export`` logger.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from multibox.config import Config
from multibox.core.postprocess import PostProcessor, build_postprocessor, group_rank, grouped_nms
from multibox.core.resize import as_hw, letterbox_fill
from multibox.data.categories import category_ids_of
from multibox.errors import InputError, MultiboxError
from multibox.export import DEFAULT_MAX_DETECTIONS, DYNAMO_OPSET, EXPORTER_NAMES, OPSET
from multibox.io import atomic_path

__all__ = [
    "DEFAULT_MAX_DETECTIONS",
    "ExportableSSD",
    "OnnxExportError",
    "default_exporter",
    "dynamo_onnx_export",
    "dynamo_unavailable_reason",
    "export_checkpoint",
    "export_onnx",
    "multiclass_nms",
    "multiclass_nms_indices",
    "resolve_exporter",
    "torchscript_onnx_export",
]

logger = logging.getLogger("multibox.export")

# The dynamo exporter is the default from the oldest torch on which every preset was checked with it (torch made
# it its own default in 2.9; 2.9 to 2.13 are unchecked here). torch.onnx.export has what this module passes it
# (dynamic_shapes, custom_translation_table) from 2.6: exporter="dynamo" is not refused there.
DYNAMO_DEFAULT_TORCH = (2, 14)
DYNAMO_MIN_TORCH = (2, 6)


class OnnxExportError(MultiboxError, RuntimeError):
    """The export cannot be done as asked (the exporter is unavailable, or the graph did not reach the opset)."""

INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}   # keys: multibox.export.INPUT_DTYPE_NAMES
# The input dtype that loses nothing for each data.resize mode (see the module docstring).
DEFAULT_INPUT_DTYPE = {"antialias": "uint8", "torchvision": "float32", "letterbox": "uint8"}


# --------------------------------------------------------------------------- NMS as one ONNX op


def multiclass_nms_indices(boxes_xyxy: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
                           score_threshold: float) -> Tensor:
    """ONNX ``NonMaxSuppression`` semantics, in PyTorch (the eager side of :class:`_NonMaxSuppression`).

    Args:
        boxes_xyxy: (N, A, 4) boxes in [0, 1], shared by all classes of an image.
        scores: (N, C, A) per-class scores.
    Returns:
        (M, 3) int64 ``(batch, class, box)`` rows, ordered by batch, then class, then descending score:
        per (batch, class), boxes with score > ``score_threshold``, greedy NMS (IoU > ``iou_threshold``
        suppresses), at most ``max_per_class`` of them.
    """
    n, c, a = scores.shape
    b, k, i = torch.nonzero(scores > score_threshold, as_tuple=True)
    groups = b * c + k
    keep = grouped_nms(boxes_xyxy[b, i], scores[b, k, i], groups, iou_threshold)
    keep = keep[group_rank(groups[keep]) < max_per_class]
    keep = keep[torch.argsort(groups[keep], stable=True)]     # (batch, class) blocks, scores still descending
    return torch.stack((b[keep], k[keep], i[keep]), dim=1)


class _NonMaxSuppression(torch.autograd.Function):
    """Exports as one ``onnx::NonMaxSuppression`` node (center_point_box = 0: any two opposite corners, so xyxy
    works: IoU does not depend on which axis comes first)."""

    @staticmethod
    def forward(ctx, boxes_xyxy: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
                score_threshold: float) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            # While exporting, ``symbolic`` stands for this op and the value here only needs the right dtype and
            # rank. The real computation has data-dependent loops that the TorchScript passes cannot digest.
            return torch.zeros((0, 3), dtype=torch.int64, device=scores.device)
        return multiclass_nms_indices(boxes_xyxy, scores, max_per_class, iou_threshold, score_threshold)

    @staticmethod
    def symbolic(g, boxes_xyxy, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
        return g.op("NonMaxSuppression", boxes_xyxy, scores,
                    g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
                    g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
                    g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)),
                    center_point_box_i=0)


# The schema is spelled out: torch 2.4 cannot infer it from the postponed (string) annotations of this module.
@torch.library.custom_op("multibox::multiclass_nms", mutates_args=(), schema=(
    "(Tensor boxes_xyxy, Tensor scores, int max_per_class, float iou_threshold, float score_threshold) -> Tensor"))
def _multiclass_nms_op(boxes_xyxy: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
                       score_threshold: float) -> Tensor:
    """:func:`multiclass_nms_indices` as one op for ``torch.export``, which cannot trace its data-dependent loop;
    the dynamo exporter translates it to ``NonMaxSuppression`` (:func:`_nms_translation`)."""
    return multiclass_nms_indices(boxes_xyxy, scores, max_per_class, iou_threshold, score_threshold)


@_multiclass_nms_op.register_fake
def _multiclass_nms_shape(boxes_xyxy: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
                          score_threshold: float) -> Tensor:
    # (M, 3) int64 with M known only at run time: a new symbolic size for the exporter.
    rows = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty((rows, 3), dtype=torch.int64)


def _nms_translation():
    """The ``custom_translation_table`` entry of the dynamo exporter: ``multibox::multiclass_nms`` ->
    ``NonMaxSuppression`` (same attribute and thresholds as :meth:`_NonMaxSuppression.symbolic`)."""
    from onnxscript import opset18 as op

    def nms_onnx(boxes_xyxy, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
        return op.NonMaxSuppression(boxes_xyxy, scores, op.Constant(value_ints=[max_per_class]),
                                    op.Constant(value_floats=[iou_threshold]),
                                    op.Constant(value_floats=[score_threshold]), center_point_box=0)

    return {torch.ops.multibox.multiclass_nms.default: nms_onnx}


def multiclass_nms(boxes_xyxy: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
                   score_threshold: float) -> Tensor:
    """:func:`multiclass_nms_indices` that exports as one ``NonMaxSuppression`` node with either exporter."""
    if torch.jit.is_tracing():   # the TorchScript exporter traces; the autograd.Function's symbolic is the node
        return _NonMaxSuppression.apply(boxes_xyxy, scores, max_per_class, iou_threshold, score_threshold)
    return _multiclass_nms_op(boxes_xyxy, scores, max_per_class, iou_threshold, score_threshold)


# --------------------------------------------------------------------------- the exported module


class ExportableSSD(nn.Module):
    """An SSD with its preprocessing and (optionally) postprocessing, as one traceable module.

    Args:
        model: the network (its ``anchors_cxcywh`` buffer becomes a graph constant).
        mean, std: normalisation in 0..255 pixel units.
        resize: the config's ``data.resize``; "torchvision" normalises with torchvision's formula.
        postprocess: the PostProcessor to reproduce; None -> raw outputs (loc, cls_logits).
        max_detections: K, the fixed number of output rows per image (and the per-image cap).

    ``forward(images)``: (N, 3, H, W) uint8 or float (0..255) -> see the module docstring. In eager mode it gives
    the same values as the ONNX graph, so it can be checked without onnxruntime.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 postprocess: PostProcessor | None, max_detections: int = DEFAULT_MAX_DETECTIONS,
                 resize: str = "antialias"):
        super().__init__()
        self.model = model.eval()
        self.torchvision_normalise = resize == "torchvision"
        if self.torchvision_normalise:   # EvalTransform's constants: float64 m / 255 rounded to float32
            mean, std = [m / 255.0 for m in mean], [v / 255.0 for v in std]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.postprocess = postprocess
        if postprocess is not None:
            if postprocess.max_per_image is not None:
                max_detections = min(max_detections, postprocess.max_per_image)
            if max_detections < 1 or postprocess.max_per_class < 1:
                raise ValueError("max_detections and max_per_class must be >= 1")
        self.max_detections = int(max_detections)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """(N, 3, H, W) -> (boxes, scores, labels, num_detections), or (loc, cls_logits) without postprocess."""
        x = images.float()
        if self.torchvision_normalise:
            x = x / 255.0
        x = (x - self.mean) / self.std
        loc, cls_logits = self.model(x)
        if self.postprocess is None:
            return loc, cls_logits     # export_onnx adds the constant anchors_cxcywh output to the graph
        return self._detect(loc, cls_logits, self.model.anchors_cxcywh)

    def _detect(self, loc: Tensor, cls_logits: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pp = self.postprocess
        boxes = pp.decode(loc, anchors)                            # (N, A, 4) xyxy in [0, 1]
        scores = pp.scores(cls_logits).transpose(1, 2)             # (N, C, A)
        num_classes, num_anchors = scores.shape[1], scores.shape[2]   # static: fixed by the network
        nms_scores = scores
        if pp.pre_nms_top_k is not None and pp.pre_nms_top_k < num_anchors:
            # Candidates outside each (image, class)'s top k get -1: below any threshold, never selected.
            top = torch.topk(scores, pp.pre_nms_top_k, dim=2).indices
            in_top = torch.zeros_like(scores).scatter(2, top, 1.0)
            nms_scores = torch.where(in_top > 0, scores, torch.full_like(scores, -1.0))
        selected = multiclass_nms(boxes, nms_scores, int(pp.max_per_class), float(pp.nms_threshold),
                                  float(pp.score_threshold))
        # Scatter the kept scores into a dense (N, C·A) map (-1 elsewhere) and take each image's top K: that is
        # the per-image cap, the padding to a fixed size and the descending order in one TopK.
        per_image = num_classes * num_anchors
        flat_index = selected[:, 0] * per_image + selected[:, 1] * num_anchors + selected[:, 2]
        flat_scores = scores.reshape(-1)
        kept = torch.full_like(flat_scores, -1.0).scatter(0, flat_index, flat_scores.gather(0, flat_index))
        k = min(self.max_detections, per_image)
        top_scores, top_index = torch.topk(kept.reshape(-1, per_image), k, dim=1)
        valid = top_scores >= 0
        class_index = torch.div(top_index, num_anchors, rounding_mode="floor")
        anchor_index = top_index - class_index * num_anchors
        top_boxes = torch.gather(boxes, 1, anchor_index.unsqueeze(-1).expand(-1, -1, 4))
        out_boxes = torch.where(valid.unsqueeze(-1), top_boxes, torch.zeros_like(top_boxes))
        out_scores = torch.where(valid, top_scores, torch.zeros_like(top_scores))
        out_labels = torch.where(valid, class_index + 1, torch.full_like(class_index, -1))
        return out_boxes, out_scores, out_labels, valid.sum(dim=1)


# --------------------------------------------------------------------------- export


def torchscript_onnx_export(module: nn.Module, args: tuple[Tensor, ...], path: str | os.PathLike,
                            input_names: list[str], output_names: list[str],
                            dynamic_axes: dict[str, dict[int, str]] | None = None, opset: int = OPSET) -> None:
    """``torch.onnx.export`` with the TorchScript exporter on every torch from 2.4 on (``dynamo=False`` where the
    argument exists: from torch 2.9 the dynamo exporter is the default)."""
    kwargs: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False      # the TorchScript exporter (see the module docstring)
    with warnings.catch_warnings():
        # The legacy exporter warns that it is legacy, and the tracer about Python values baked into the graph
        # (class and anchor counts, thresholds): those are constants of the model by design.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, **kwargs)


def _torch_release() -> tuple[int, int]:
    """(major, minor) of the running torch ("2.9.0a0+git..." -> (2, 9): a pre-release counts as its release)."""
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def dynamo_unavailable_reason(for_default: bool = False) -> str | None:
    """Why the dynamo exporter is not used here (None: it is usable); ``for_default``: as the default, which
    needs torch >= 2.14, not only >= 2.6 (see the module docstring)."""
    floor = DYNAMO_DEFAULT_TORCH if for_default else DYNAMO_MIN_TORCH
    if _torch_release() < floor:
        return f"torch {torch.__version__} is older than {floor[0]}.{floor[1]}"
    if importlib.util.find_spec("onnxscript") is None:
        return "onnxscript is not installed (pip install onnxscript)"
    return None


def default_exporter() -> str:
    """The exporter of ``exporter=None``: "dynamo" where :func:`dynamo_unavailable_reason` finds nothing against
    it, else "torchscript" (the reason logged)."""
    reason = dynamo_unavailable_reason(for_default=True)
    if reason is None:
        return "dynamo"
    logger.info("ONNX export with the TorchScript exporter, not the dynamo one: %s", reason)
    return "torchscript"


def resolve_exporter(exporter: str | None) -> str:
    """``exporter`` checked ("dynamo" or "torchscript"), or the default for None."""
    if exporter is None:
        return default_exporter()
    if exporter not in EXPORTER_NAMES:
        raise InputError(f"exporter must be one of {', '.join(EXPORTER_NAMES)}, got {exporter!r}")
    reason = dynamo_unavailable_reason() if exporter == "dynamo" else None
    if reason is not None:
        raise OnnxExportError(f"the dynamo ONNX exporter is unavailable: {reason}; use exporter='torchscript'")
    return exporter


# The Reduce ops whose axes moved from an attribute (opset 13) to an input (opset 18, with noop_with_empty_axes).
_REDUCE_AXES_MOVED = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                      "ReduceMin", "ReduceProd", "ReduceSumSquare"}


def _drop_opset18_reduce_attribute(proto: Any) -> None:
    """Remove ``noop_with_empty_axes`` from the Reduce nodes of a graph converted below opset 18, in place.

    onnx's 18 -> 17 adapters (onnx 1.15 to at least 1.23) move ``axes`` back to an attribute but keep this
    opset-18 attribute, which the checker and runtimes then reject. At its default 0 with ``axes`` given it changes
    nothing, so dropping it is exact; 1 has no opset-17 equivalent: OnnxExportError.
    """
    for node in proto.graph.node:
        if node.op_type not in _REDUCE_AXES_MOVED:
            continue
        for i, attribute in enumerate(node.attribute):
            if attribute.name == "noop_with_empty_axes":
                if attribute.i != 0:
                    raise OnnxExportError(f"{node.op_type} node {node.name!r} needs opset 18 "
                                          f"(noop_with_empty_axes=1)")
                del node.attribute[i]
                break


def dynamo_onnx_export(module: nn.Module, args: tuple[Tensor, ...], input_names: list[str],
                       output_names: list[str], dynamic_batch: bool = True, opset: int = DYNAMO_OPSET) -> Any:
    """``torch.onnx.export(..., dynamo=True)`` -> its ``onnx.ModelProto`` at ``opset``, axis 0 of every input
    dynamic when ``dynamic_batch`` (the examples in ``args`` need a batch > 1: torch.export specialises a 1).

    The exporter builds opset 18 at least; below that, onnx's version converter converts the graph, which fails
    for some ops (Pad, in the ResNet-FPN preset): OnnxExportError then, as when the graph did not reach ``opset``.
    """
    import onnx
    import onnx.checker
    import onnx.version_converter

    batch = torch.export.Dim("batch", min=1)
    parameters = list(inspect.signature(module.forward).parameters)[:len(args)]
    dynamic_shapes = {name: {0: batch} for name in parameters} if dynamic_batch else None
    program = torch.onnx.export(module, args, None, input_names=input_names, output_names=output_names,
                                opset_version=max(opset, DYNAMO_OPSET), dynamo=True, dynamic_shapes=dynamic_shapes,
                                custom_translation_table=_nms_translation(), external_data=False, verbose=False)
    proto = program.model_proto
    if opset < DYNAMO_OPSET:
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
            _drop_opset18_reduce_attribute(proto)
            onnx.checker.check_model(proto)
        except (RuntimeError, onnx.checker.ValidationError) as e:
            reason = str(e).strip().splitlines()[0]
            raise OnnxExportError(f"onnx's version converter cannot bring the dynamo exporter's opset-"
                                  f"{DYNAMO_OPSET} graph to opset {opset} ({reason}); export at opset >= "
                                  f"{DYNAMO_OPSET} (the default) or with exporter='torchscript'") from e
    reached = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if reached != opset:
        raise OnnxExportError(f"the dynamo exporter's graph is at opset {reached}, not the requested {opset}")
    return proto


def _export_settings(cfg: Config, input_dtype: str | None, opset: int | None) -> tuple[str, str]:
    """(resize mode, input dtype name) of the export, the arguments checked."""
    resize = getattr(cfg.data, "resize", "antialias")
    input_dtype = input_dtype or DEFAULT_INPUT_DTYPE.get(resize, "float32")
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {sorted(INPUT_DTYPES)}, got {input_dtype!r}")
    if opset is not None and opset < 17:
        raise ValueError("opset must be >= 17")
    return resize, input_dtype


def _output_axes(postprocess: bool) -> tuple[list[str], dict[str, dict[int, str]]]:
    """The traced graph's output names and dynamic (batch) axes."""
    if postprocess:
        outputs = ["boxes", "scores", "labels", "num_detections"]
        return outputs, {"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    return ["loc", "cls_logits"], {"images": {0: "batch"}, "loc": {0: "batch"}, "cls_logits": {0: "batch"}}


def _metadata(cfg: Config, class_names: Sequence[str], category_ids: Sequence[int], postprocess: bool,
              max_detections: int, input_dtype: str, resize: str) -> dict[str, str]:
    """The ``metadata_props`` entries (see the module docstring)."""
    height, width = as_hw(cfg.model.image_size)
    meta = {
        "multibox.config": json.dumps(cfg.to_dict()),
        "multibox.class_names": json.dumps(list(class_names)),
        "multibox.category_ids": json.dumps([int(c) for c in category_ids]),
        "multibox.postprocess": "1" if postprocess else "0",
        "multibox.max_detections": str(max_detections),
        "multibox.input": f"images: (N, 3, {height}, {width}) {input_dtype} RGB, 0..255, resized to "
                          f"{height}x{width} ({resize} resize); boxes out: xyxy normalised to [0, 1]",
        "multibox.resize": resize,
    }
    if resize == "letterbox":
        meta["multibox.letterbox_fill"] = json.dumps(letterbox_fill(cfg.data.mean))
    return meta


def _finish_graph(proto: Any, module: ExportableSSD, postprocess: bool, meta: dict[str, str]) -> None:
    """Complete the traced ``onnx.ModelProto`` in place: the constant anchors output (raw graphs), the metadata
    (the model's only; no per-node entries), the doc string and the fixed output dims (postprocessed graphs)."""
    import onnx
    import onnx.numpy_helper

    if not postprocess:   # a constant output: the tracer only follows values that depend on the input
        anchors = module.model.anchors_cxcywh.detach().cpu().float().numpy()
        proto.graph.node.append(onnx.helper.make_node(
            "Constant", [], ["anchors_cxcywh"], value=onnx.numpy_helper.from_array(anchors, "anchors_cxcywh")))
        proto.graph.output.append(onnx.helper.make_tensor_value_info("anchors_cxcywh", onnx.TensorProto.FLOAT,
                                                                     list(anchors.shape)))
    for node in proto.graph.node:   # the dynamo exporter's stack traces would name the exporting machine's files
        del node.metadata_props[:]
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "multibox SSD detector; see metadata multibox.input"
    if postprocess:
        # The tracer leaves K symbolic (it comes out of TopK); it is a constant of the graph, so say so.
        for value in proto.graph.output:
            dims = value.type.tensor_type.shape.dim
            for axis in range(1, len(dims)):
                dims[axis].Clear()
                dims[axis].dim_value = module.max_detections if axis == 1 else 4


def export_onnx(model: nn.Module, cfg: Config, class_names: Sequence[str], out: str | os.PathLike,
                postprocess: bool = True, max_detections: int | None = None, input_dtype: str | None = None,
                opset: int | None = None, check: bool = True, category_ids: Sequence[int] | None = None,
                exporter: str | None = None) -> Path:
    """Export ``model`` (built from ``cfg``; moved to the CPU in float32) to ``out``; returns the path written.

    Args:
        postprocess: include decoding + NMS (fixed-size outputs) or give raw outputs.
        max_detections: K; default ``cfg.eval.max_per_image`` or :data:`DEFAULT_MAX_DETECTIONS`.
        input_dtype: "uint8" or "float32" (0..255 pixel values); default: the one of ``data.resize``.
        category_ids: the data's category id of each label 1..C (a checkpoint's ``category_ids``), written to the
            metadata; None: the fallback of :func:`multibox.data.categories.category_ids_of`.
        opset: the ONNX opset; default 17 (:data:`~multibox.export.OPSET`) with the TorchScript exporter, 18
            (:data:`~multibox.export.DYNAMO_OPSET`) with the dynamo one (17 there: see :func:`dynamo_onnx_export`).
        check: run ``onnx.checker`` on the result.
        exporter: "dynamo" or "torchscript" (see the module docstring); None: :func:`default_exporter`.

    The file appears atomically (:func:`multibox.io.atomic_path`): a failed export leaves no partial file.
    """
    import onnx

    resize, input_dtype = _export_settings(cfg, input_dtype, opset)
    exporter = resolve_exporter(exporter)
    opset = opset or (DYNAMO_OPSET if exporter == "dynamo" else OPSET)
    category_ids = category_ids_of(class_names, None if category_ids is None else list(category_ids))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    k = max_detections or cfg.eval.max_per_image or DEFAULT_MAX_DETECTIONS
    pp = build_postprocessor(cfg) if postprocess else None
    module = ExportableSSD(model.cpu().float(), cfg.data.mean, cfg.data.std, pp, k, resize).eval()
    # A batch of 2: torch.export would specialise a batch of 1 to a constant. H and W stay the example's: fixed.
    example = torch.randint(0, 256, (2, 3, *as_hw(cfg.model.image_size)),
                            dtype=torch.uint8).to(INPUT_DTYPES[input_dtype])
    outputs, axes = _output_axes(postprocess)
    with atomic_path(out) as tmp:
        with torch.no_grad():
            if exporter == "dynamo":
                proto = dynamo_onnx_export(module, (example,), ["images"], outputs, True, opset)
            else:
                torchscript_onnx_export(module, (example,), tmp, ["images"], outputs, axes, opset)
                proto = onnx.load(str(tmp))
        meta = _metadata(cfg, class_names, category_ids, postprocess, module.max_detections, input_dtype, resize)
        _finish_graph(proto, module, postprocess, meta)
        if check:
            onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return out


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, **kwargs) -> Path:
    """Rebuild the model of a multibox checkpoint and :func:`export_onnx` it (``kwargs``: its options, e.g.
    ``exporter``)."""
    from multibox.checkpoint import load_checkpoint
    from multibox.models import model_from_state_dict

    payload = load_checkpoint(checkpoint)
    cfg = Config.from_dict(payload["config"])
    category_ids = category_ids_of(payload["class_names"], payload.get("category_ids"), source=str(checkpoint))
    return export_onnx(model_from_state_dict(cfg, payload["model"]), cfg, payload["class_names"], out,
                       category_ids=category_ids, **kwargs)
