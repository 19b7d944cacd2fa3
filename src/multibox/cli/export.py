"""``multibox export``: a checkpoint to ONNX (see :mod:`multibox.export.onnx` for the graph); ``--int8``: static
INT8 with an accuracy gate (see :mod:`multibox.export.quantize`)."""
from __future__ import annotations

import argparse

from multibox.cli import command_help
from multibox.export import (DEFAULT_CALIB_IMAGES, DEFAULT_MAX_DETECTIONS, DYNAMO_OPSET, EXPORTER_NAMES,
                             INPUT_DTYPE_NAMES, MAX_RELATIVE_AP_DROP, OPSET)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help=command_help("export"),
        description="Export a checkpoint to ONNX. Input: (N, 3, H, W) RGB images already resized to the "
                    "model's H x W (model.image_size, with data.resize: stretched or letterboxed), "
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
    p.add_argument("--opset", type=int, default=None,
                   help=f"ONNX opset version (default: {OPSET} with torchscript, {DYNAMO_OPSET} with dynamo)")
    p.add_argument("--exporter", choices=EXPORTER_NAMES,
                   help="torch's ONNX exporter (default: dynamo where it works, see multibox.export.onnx)")
    q = p.add_argument_group("INT8 (static QDQ quantization; decoding and NMS stay float)")
    q.add_argument("--int8", action="store_true",
                   help="quantize the network to INT8, calibrated on --calib-data, refused (non-zero exit, no file) "
                        f"when COCO AP drops by more than {MAX_RELATIVE_AP_DROP:.0%}% relative")
    q.add_argument("--calib-data", metavar="DATA",
                   help="calibration images: a COCO JSON, VOC folder, shard folder or a folder of images; annotated "
                        "data is calibrated on its training split and gated on its evaluation split")
    q.add_argument("--calib-images", type=int, default=None, metavar="N",
                   help=f"images to calibrate on (default: {DEFAULT_CALIB_IMAGES})")
    q.add_argument("--val-data", metavar="DATA", help="annotated data to gate on (every image of it) instead of "
                                                     "--calib-data's evaluation split")
    q.add_argument("--force", action="store_true", help="write the INT8 model without the accuracy gate")
    q.add_argument("--runtime", choices=["auto", "onnxruntime", "openvino"], default="auto",
                   help="the runtime the gate scores both models with: the one the model will run on "
                        "(default: %(default)s, as multibox.load and predict choose)")
    return p


def _run_int8(args: argparse.Namespace, export_kwargs: dict) -> int:
    from multibox.errors import InputError
    from multibox.export.quantize import export_int8

    if not args.calib_data:
        raise InputError("--int8 needs --calib-data DATA (the images to calibrate the INT8 ranges on)")
    report = export_int8(args.checkpoint, args.out, args.calib_data,
                         calib_images=args.calib_images or DEFAULT_CALIB_IMAGES, val_data=args.val_data,
                         force=args.force, runtime=args.runtime, **export_kwargs)
    size_mb = report.path.stat().st_size / 2**20
    if report.gated:
        accuracy = (f"AP {report.ap_float:.4f} -> {report.ap_int8:.4f} INT8 "
                    + (f"({report.relative_change:+.2%})" if report.relative_change is not None else "")
                    + f" on {report.gate_data}, {report.runtime}")
    else:
        accuracy = "accuracy gate skipped (--force)" if args.force else "accuracy gate not run (no annotations)"
    kept = report.keep_float
    names = ", ".join(kept[:4]) + (f", +{len(kept) - 4} more" if len(kept) > 4 else "")
    print(f"wrote {report.path} ({size_mb:.1f} MiB, INT8, {report.calib_images} calibration images); {accuracy}; "
          f"{report.int8_convs} int8 / {report.float_convs} float convolutions; {len(kept)} layers kept in float"
          + (f" ({names}; all in the metadata's multibox.quantization)" if kept else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import onnx

    from multibox.errors import InputError
    from multibox.export.onnx import export_checkpoint
    from multibox.inference.onnx import OnnxDetector

    export_kwargs = {"postprocess": not args.no_postprocess, "max_detections": args.max_det,
                     "input_dtype": args.input_dtype, "opset": args.opset}
    if args.exporter:
        export_kwargs["exporter"] = args.exporter
    if args.int8:
        return _run_int8(args, export_kwargs)
    for option in ("calib_data", "calib_images", "val_data"):
        if getattr(args, option) is not None:
            raise InputError(f"--{option.replace('_', '-')} applies to --int8 exports only")
    if args.force or args.runtime != "auto":
        raise InputError("--force and --runtime apply to --int8 exports only (their accuracy gate)")
    path = export_checkpoint(args.checkpoint, args.out, **export_kwargs)
    size_mb = path.stat().st_size / 2**20
    kind = "raw outputs (loc, cls_logits, anchors_cxcywh)" if args.no_postprocess else \
        "boxes, scores, labels, num_detections"
    detector = OnnxDetector(path, runtime="onnxruntime")   # read back: the input the graph really has
    height, width = detector.image_hw
    opset = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))
    print(f"wrote {path} ({size_mb:.1f} MiB, opset {opset}); input: images (N, 3, {height}, {width}) "
          f"{np.dtype(detector.input_dtype).name}, 0..255, resized to {height}x{width} ({detector.resize}); "
          f"outputs: {kind}")
    return 0
