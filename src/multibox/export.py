"""ONNX export: the whole detector (normalisation, network, box decoding, NMS) in one graph.

The exported graph
==================

Input ``images``: (N, 3, S, S) RGB images **already resized** to the model's S x S (S = ``model.image_size``,
300 for SSD300), each axis independently, with the resize of the preset's evaluation (``data.resize``; see
:func:`resize_for_model`, which :class:`OnnxDetector` applies for you):

- ``antialias`` (tutorial, tiny presets): bilinear with antialiasing on the uint8 image; input ``uint8``;
- ``torchvision`` (paper presets): bilinear without antialiasing (``align_corners=False``) on the float image;
  input ``float32`` with values in 0..255 (not rounded: rounding to uint8 would change the detections slightly).

``--input-dtype`` overrides the dtype. The batch axis is dynamic. The normalisation is inside the graph:
``(x - mean) / std`` (antialias) or torchvision's ``(x / 255 - mean / 255) / (std / 255)``.

Outputs with postprocessing (the default), K = the per-image detection cap:

- ``boxes``: (N, K, 4) float32 xyxy, normalised to [0, 1] of the input image: multiply by (W, H, W, H) of the
  original image to get its pixels (the S x S resize scales each axis independently);
- ``scores``: (N, K) float32, descending within an image;
- ``labels``: (N, K) int64 class indices 1..C into the class names stored in the model's metadata (0 is background);
- ``num_detections``: (N,) int64; entries at positions >= num_detections[i] are padding
  (boxes 0, scores 0, labels -1).

The postprocessing reproduces :class:`multibox.postprocess.PostProcessor` of the checkpoint's config: sigmoid or
softmax scores, scores strictly above the threshold, at most ``pre_nms_top_k`` candidates per class and image,
per-class NMS (suppress when IoU > threshold), at most ``max_per_class`` per class, at most K per image (highest
scores). ONNX's ``NonMaxSuppression`` does the NMS; its score threshold is strict (``>``) and it suppresses at
IoU strictly above the threshold, as multibox does (checked in tests/test_export.py against onnxruntime).
K is ``eval.max_per_image``, or ``--max-det`` when given (smaller), or 100 (COCO's maxDets) when neither: the
graph then equals the PostProcessor with ``max_per_image = K``.

With ``--no-postprocess`` the outputs are the raw ``loc`` (N, A, 4) offsets, ``cls_logits`` (N, A, 1 + C) and the
constant ``anchors_cxcywh`` (A, 4) default boxes, for users who decode and suppress themselves.

The model's metadata (``metadata_props``) holds ``multibox.config`` (the full config as JSON),
``multibox.class_names`` (JSON list, index 0 = "background"), ``multibox.postprocess`` ("1"/"0"),
``multibox.max_detections``, ``multibox.resize`` (the resize the input needs) and ``multibox.input`` (a one-line
description of the input).

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``, which exists from torch 2.4 to at least
2.14 and maps a ``torch.autograd.Function`` to ``NonMaxSuppression`` through its ``symbolic``; the dynamo exporter
would need onnxscript and a custom translation for that op.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .config import Config
from .postprocess import PostProcessor, group_rank

try:
    from .postprocess import grouped_nms
except ImportError:  # older name of the same function
    from .postprocess import batched_nms_float64 as grouped_nms

__all__ = [
    "DEFAULT_MAX_DETECTIONS",
    "ExportableSSD",
    "OnnxDetector",
    "add_export_parser",
    "export_checkpoint",
    "export_onnx",
    "multiclass_nms_indices",
    "resize_for_model",
    "torchscript_onnx_export",
]

DEFAULT_MAX_DETECTIONS = 100
OPSET = 17
INPUT_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
# The input dtype that loses nothing for each data.resize mode (see the module docstring).
DEFAULT_INPUT_DTYPE = {"antialias": "uint8", "torchvision": "float32"}


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


# --------------------------------------------------------------------------- the exported module


class ExportableSSD(nn.Module):
    """An SSD with its preprocessing and (optionally) postprocessing, as one traceable module.

    Args:
        model: the network (its ``anchors_cxcywh`` buffer becomes a graph constant).
        mean, std: normalisation in 0..255 pixel units.
        resize: the config's ``data.resize``; "torchvision" normalises with torchvision's formula.
        postprocess: the PostProcessor to reproduce; None -> raw outputs (loc, cls_logits).
        max_detections: K, the fixed number of output rows per image (and the per-image cap).

    ``forward(images)``: (N, 3, S, S) uint8 or float (0..255) -> see the module docstring. In eager mode it gives
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
        """(N, 3, S, S) -> (boxes, scores, labels, num_detections), or (loc, cls_logits) without postprocess."""
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
        selected = _NonMaxSuppression.apply(boxes, nms_scores, int(pp.max_per_class), float(pp.nms_threshold),
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


def _postprocessor_from_config(cfg: Config) -> PostProcessor:
    from .train import build_postprocessor
    return build_postprocessor(cfg)


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


def export_onnx(model: nn.Module, cfg: Config, class_names: Sequence[str], out: str | os.PathLike,
                postprocess: bool = True, max_detections: int | None = None, input_dtype: str | None = None,
                opset: int = OPSET, check: bool = True) -> Path:
    """Export ``model`` (built from ``cfg``; moved to the CPU in float32) to ``out``; returns the path written.

    Args:
        postprocess: include decoding + NMS (fixed-size outputs) or give raw outputs.
        max_detections: K; default ``cfg.eval.max_per_image`` or :data:`DEFAULT_MAX_DETECTIONS`.
        input_dtype: "uint8" or "float32" (0..255 pixel values); default: the one of ``data.resize``.
        check: run ``onnx.checker`` on the result.
    """
    import onnx
    import onnx.numpy_helper

    resize = getattr(cfg.data, "resize", "antialias")
    input_dtype = input_dtype or DEFAULT_INPUT_DTYPE.get(resize, "float32")
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {sorted(INPUT_DTYPES)}, got {input_dtype!r}")
    if opset < 17:
        raise ValueError("opset must be >= 17")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    k = max_detections or cfg.eval.max_per_image or DEFAULT_MAX_DETECTIONS
    pp = _postprocessor_from_config(cfg) if postprocess else None
    module = ExportableSSD(model.cpu().float(), cfg.data.mean, cfg.data.std, pp, k, resize).eval()
    size = cfg.model.image_size
    example = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8).to(INPUT_DTYPES[input_dtype])
    if postprocess:
        outputs = ["boxes", "scores", "labels", "num_detections"]
        axes = {"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    else:
        outputs = ["loc", "cls_logits"]
        axes = {"images": {0: "batch"}, "loc": {0: "batch"}, "cls_logits": {0: "batch"}}
    tmp = out.with_name(out.name + ".tmp")
    with torch.no_grad():
        torchscript_onnx_export(module, (example,), tmp, ["images"], outputs, axes, opset)
    proto = onnx.load(str(tmp))
    if not postprocess:   # a constant output: the tracer only follows values that depend on the input
        anchors = module.model.anchors_cxcywh.detach().cpu().float().numpy()
        proto.graph.node.append(onnx.helper.make_node(
            "Constant", [], ["anchors_cxcywh"], value=onnx.numpy_helper.from_array(anchors, "anchors_cxcywh")))
        proto.graph.output.append(onnx.helper.make_tensor_value_info("anchors_cxcywh", onnx.TensorProto.FLOAT,
                                                                     list(anchors.shape)))
    meta = {
        "multibox.config": json.dumps(cfg.to_dict()),
        "multibox.class_names": json.dumps(list(class_names)),
        "multibox.postprocess": "1" if postprocess else "0",
        "multibox.max_detections": str(module.max_detections),
        "multibox.input": f"images: (N, 3, {size}, {size}) {input_dtype} RGB, 0..255, resized to {size}x{size} "
                          f"({resize} resize); boxes out: xyxy normalised to [0, 1]",
        "multibox.resize": resize,
    }
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
    if check:
        onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    os.replace(tmp, out)
    return out


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, **kwargs) -> Path:
    """Rebuild the model of a multibox checkpoint and :func:`export_onnx` it."""
    from .checkpoint import load_checkpoint
    from .models import model_from_state_dict

    payload = load_checkpoint(checkpoint)
    cfg = Config.from_dict(payload["config"])
    return export_onnx(model_from_state_dict(cfg, payload["model"]), cfg, payload["class_names"], out, **kwargs)


# --------------------------------------------------------------------------- onnxruntime backend

ImageLike = Union[str, os.PathLike, Tensor, np.ndarray]


def resize_for_model(image: Tensor, size: int, resize: str = "antialias") -> Tensor:
    """(3, H, W) uint8 -> (3, S, S) as the exported graph expects it, the resize of
    :class:`multibox.data.transforms.EvalTransform`: "antialias" -> uint8 (antialiased bilinear of the uint8 image);
    "torchvision" -> float32 in 0..255 (bilinear of the float image, no antialiasing; EvalTransform normalises first
    and resizes then, the same linear maps in the other order)."""
    from torchvision.transforms.v2 import functional as F
    if resize == "torchvision":
        x = image.float()
        if tuple(image.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        return x
    if tuple(image.shape[-2:]) == (size, size):
        return image
    return F.resize(image, [size, size], antialias=True)


class OnnxDetector:
    """An exported multibox model run by onnxruntime, with the API of :class:`multibox.api.Detector`.

    Args:
        path: the ``.onnx`` file written by :func:`export_onnx` (with or without postprocessing).
        providers: onnxruntime execution providers (default: CPU).
        threads: intra-op threads (0 = onnxruntime's default).
        spin: let idle worker threads spin (onnxruntime's default: lowest latency on a free machine; turn it off on
            shared cores, where spinning threads take CPU time from the others).

    Attributes: ``cfg``, ``class_names``, ``image_size``, ``has_postprocess``, ``max_detections`` (K of the graph),
    and ``postprocess``: for a graph without postprocessing, the PyTorch PostProcessor applied to its raw outputs
    (adjustable like the torch backend's); None otherwise.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0,
                 spin: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        meta = self.session.get_modelmeta().custom_metadata_map
        if "multibox.config" not in meta:
            raise ValueError(f"{path}: not a multibox export (no multibox.config metadata)")
        self.cfg = Config.from_dict(json.loads(meta["multibox.config"]))
        self.class_names: list[str] = json.loads(meta["multibox.class_names"])
        self.image_size = int(self.cfg.model.image_size)
        self.has_postprocess = meta.get("multibox.postprocess") == "1"
        self.max_detections = int(meta.get("multibox.max_detections", 0)) if self.has_postprocess else None
        image_input = self.session.get_inputs()[0]
        self.input_name = image_input.name
        self.input_dtype = np.uint8 if image_input.type == "tensor(uint8)" else np.float32
        self.resize = meta.get("multibox.resize", getattr(self.cfg.data, "resize", "antialias"))
        self.postprocess = None if self.has_postprocess else _postprocessor_from_config(self.cfg)
        self.device = torch.device("cpu")

    def run(self, batch: Tensor) -> list[np.ndarray]:
        """(N, 3, S, S) resized images (uint8 or float, 0..255) -> the graph's raw outputs."""
        if self.input_dtype == np.uint8 and batch.dtype != torch.uint8:
            batch = batch.round().clamp(0, 255).to(torch.uint8)
        return self.session.run(None, {self.input_name: batch.numpy().astype(self.input_dtype, copy=False)})

    def predict(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 16) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes`` (K, 4) xyxy in the image's pixels, ``scores`` (K,), ``labels`` (K,)."""
        from .api import image_batches

        results: list[dict[str, Tensor]] = []
        for batch, sizes in image_batches(images, batch_size):
            stacked = torch.stack([resize_for_model(img, self.image_size, self.resize) for img in batch])
            outputs = self.run(stacked)
            if self.has_postprocess:
                results += _split_fixed(*outputs, sizes)
            else:
                loc, cls_logits, anchors = (torch.from_numpy(o) for o in outputs)
                results += self.postprocess(loc, cls_logits, anchors, sizes)
        return results


def _split_fixed(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, counts: np.ndarray,
                 sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """Fixed-size graph outputs -> per-image dicts with boxes scaled to each image's (H, W)."""
    out = []
    for i, (height, width) in enumerate(sizes):
        n = int(counts[i])
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        out.append({"boxes": torch.from_numpy(boxes[i, :n].copy()) * scale,
                    "scores": torch.from_numpy(scores[i, :n].copy()),
                    "labels": torch.from_numpy(labels[i, :n].astype(np.int64))})
    return out


# --------------------------------------------------------------------------- CLI


def _export(args: argparse.Namespace) -> int:
    if args.format != "onnx":
        raise SystemExit(f"error: unknown format {args.format!r}")
    path = export_checkpoint(args.checkpoint, args.out, postprocess=not args.no_postprocess,
                             max_detections=args.max_det, input_dtype=args.input_dtype, opset=args.opset)
    size_mb = path.stat().st_size / 2**20
    kind = "raw outputs (loc, cls_logits, anchors_cxcywh)" if args.no_postprocess else \
        "boxes, scores, labels, num_detections"
    detector = OnnxDetector(path)
    size = detector.image_size
    print(f"wrote {path} ({size_mb:.1f} MiB, opset {args.opset}); input: images (N, 3, {size}, {size}) "
          f"{np.dtype(detector.input_dtype).name}, 0..255, resized to {size}x{size} ({detector.resize}); "
          f"outputs: {kind}")
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``multibox export`` to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX (normalisation, network, decoding and NMS in one graph)",
        description="Export a checkpoint to ONNX. Input: (N, 3, S, S) RGB images already resized to S x S, "
                    "uint8 or float32 in 0..255; outputs: boxes (N, K, 4) xyxy in [0, 1], scores (N, K), "
                    "labels (N, K), num_detections (N,).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", required=True, help="output file (.onnx)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="raw outputs (loc, cls_logits, anchors_cxcywh) instead of decoded, suppressed detections")
    p.add_argument("--max-det", type=int, default=None,
                   help=f"detections per image K (default: eval.max_per_image, else {DEFAULT_MAX_DETECTIONS})")
    p.add_argument("--input-dtype", choices=sorted(INPUT_DTYPES),
                   help="graph input dtype (default: uint8, or float32 for data.resize = torchvision presets)")
    p.add_argument("--opset", type=int, default=OPSET)
    p.set_defaults(func=_export)
    return p
