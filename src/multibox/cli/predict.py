"""``multibox predict``: detect objects in images, folders and videos (see :mod:`multibox.inference.predict`)."""
from __future__ import annotations

import argparse

from multibox.cli import command_help
from multibox.cli.common import add_inference_arguments


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help=command_help("predict"),
        description="Detect objects in images, folders and videos with a checkpoint (PyTorch) or an exported ONNX "
                    "model (onnxruntime). Writes OUT/detections.json (COCO results; image_id = file stem, or the "
                    "frame index plus 'video' for video frames), OUT/images/*.png and OUT/videos/*.mp4.")
    p.add_argument("--checkpoint", required=True, help="a multibox checkpoint (.pt) or an exported model (.onnx)")
    p.add_argument("inputs", nargs="+", help="image files, video files or folders (searched recursively)")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"],
                   help="auto: onnxruntime for a .onnx file, else torch")
    p.add_argument("--score", type=float, help="score threshold (default: the model's eval.score_threshold)")
    p.add_argument("--classes", action="append", metavar="CLASS[,CLASS...]",
                   help="keep only these classes: names or label ids 1..C, comma-separated; repeatable")
    p.add_argument("--max-det", type=int, help="at most this many detections per image")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="torch backend: auto | cpu | cuda[:i]")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    add_inference_arguments(p)
    p.add_argument("--no-draw", action="store_true", help="write detections.json only")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    from multibox.inference.predict import load_detector, run_predict

    detector = load_detector(args.checkpoint, args.backend, args.device, args.threads, args.precision, args.compile)
    summary = run_predict(detector, args.inputs, args.out, score=args.score, classes=args.classes,
                          max_det=args.max_det, batch_size=args.batch_size, progress=not args.no_progress,
                          draw=not args.no_draw)
    parts = [f"{summary['images']} images"]
    if summary["videos"]:
        parts.append(f"{summary['frames']} frames of {summary['videos']} videos")
    print(f"{', '.join(parts)}, {summary['detections']} detections "
          f"({summary['images_per_second']:.1f} images/s) -> {args.out}")
    return 0
