"""``multibox export``: a checkpoint to ONNX (see :mod:`multibox.export.onnx` for the graph)."""
from __future__ import annotations

import argparse

from multibox.cli import command_help
from multibox.export import DEFAULT_MAX_DETECTIONS, INPUT_DTYPE_NAMES, OPSET


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help=command_help("export"),
        description="Export a checkpoint to ONNX. Input: (N, 3, S, S) RGB images already resized to S x S, "
                    "uint8 or float32 in 0..255; outputs: boxes (N, K, 4) xyxy in [0, 1], scores (N, K), "
                    "labels (N, K), num_detections (N,).")
    p.add_argument("--checkpoint", required=True, help="the multibox checkpoint (.pt) to export")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="output format (default: %(default)s)")
    p.add_argument("--out", required=True, help="output file (.onnx)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="raw outputs (loc, cls_logits, anchors_cxcywh) instead of decoded, suppressed detections")
    p.add_argument("--max-det", type=int, default=None,
                   help=f"detections per image K (default: eval.max_per_image, else {DEFAULT_MAX_DETECTIONS})")
    p.add_argument("--input-dtype", choices=sorted(INPUT_DTYPE_NAMES),
                   help="graph input dtype (default: uint8, or float32 for data.resize = torchvision presets)")
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset version (default: %(default)s)")
    return p


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from multibox.export.onnx import export_checkpoint
    from multibox.inference.onnx import OnnxDetector

    path = export_checkpoint(args.checkpoint, args.out, postprocess=not args.no_postprocess,
                             max_detections=args.max_det, input_dtype=args.input_dtype, opset=args.opset)
    size_mb = path.stat().st_size / 2**20
    kind = "raw outputs (loc, cls_logits, anchors_cxcywh)" if args.no_postprocess else \
        "boxes, scores, labels, num_detections"
    detector = OnnxDetector(path)   # read back: the input the graph really has
    size = detector.image_size
    print(f"wrote {path} ({size_mb:.1f} MiB, opset {args.opset}); input: images (N, 3, {size}, {size}) "
          f"{np.dtype(detector.input_dtype).name}, 0..255, resized to {size}x{size} ({detector.resize}); "
          f"outputs: {kind}")
    return 0
