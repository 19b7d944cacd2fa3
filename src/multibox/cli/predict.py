"""``multibox predict``: detect objects in images, folders and videos (see :mod:`multibox.inference.predict`)."""
from __future__ import annotations

import argparse

from multibox.cli import command_help
from multibox.cli.common import EXIT_OK, EXIT_SKIPPED, add_inference_arguments

# multibox.inference.predict.DISPLAY_SCORE, written out: importing it would load torch for --help
# (tests/inference/test_predict_robust.py checks that the two agree).
DISPLAY_SCORE_TEXT = "0.3"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help=command_help("predict"),
        description="Detect objects in images, folders and videos with a checkpoint (PyTorch) or an exported ONNX "
                    "model (onnxruntime or OpenVINO). Inputs are named by their path relative to the deepest "
                    "folder holding them all. Writes OUT/detections.json (COCO results; category_id = the "
                    "training data's own category id, which the model stores; image_id = the image's relative path, "
                    "e.g. 'a/img.jpg', or '<relative video path>#<frame>' for a video frame, which adds 'video', "
                    "'frame' and 'time'; 'file' = the input as found), OUT/images/<relative path>.png and "
                    "OUT/videos/<relative path>.mp4. Inputs that cannot be read are skipped, each named in a "
                    "warning; the exit status is then 3.")
    p.add_argument("--checkpoint", required=True, help="a multibox checkpoint (.pt) or an exported model (.onnx)")
    p.add_argument("inputs", nargs="+", help="image files, video files or folders (searched recursively)")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "onnxruntime"],
                   help="auto: onnx for an exported ONNX model (run by --runtime), else torch; onnxruntime: onnx "
                        "with --runtime onnxruntime")
    p.add_argument("--runtime", choices=["auto", "onnxruntime", "openvino"],
                   help="the runtime of an exported ONNX model (default: auto = OpenVINO on the CPU where it is "
                        "installed, else onnxruntime); not for checkpoints")
    p.add_argument("--score", type=float,
                   help=f"score threshold of the boxes drawn and listed (default: {DISPLAY_SCORE_TEXT}, or the "
                        f"model's eval.score_threshold where higher; `multibox eval` keeps the model's own, lower "
                        f"threshold, which mAP needs)")
    p.add_argument("--classes", action="append", metavar="CLASS[,CLASS...]",
                   help="keep only these classes: names or category ids (as detections.json writes them), "
                        "comma-separated; repeatable")
    p.add_argument("--max-det", type=int, help="at most this many detections per image")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda[:i] (ONNX models: auto = cpu; cuda needs onnxruntime-gpu)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads of an ONNX model's runtime (0 = its default: one per physical core)")
    p.add_argument("--tile", type=int, metavar="PX",
                   help="also predict each image and frame in overlapping tiles, PX along the longer side of the "
                        "model's input (at least 32; PX x PX for a square model), and merge the boxes with the "
                        "whole image's (class-wise NMS): small objects in large images (default: off)")
    p.add_argument("--tile-overlap", type=float, default=0.2, metavar="FRACTION",
                   help="the fraction of a tile shared with the next, in [0, 1) (default: %(default)s)")
    add_inference_arguments(p)
    p.add_argument("--no-draw", action="store_true", help="write detections.json only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from multibox.inference.predict import load_detector, run_predict

    detector = load_detector(args.checkpoint, args.backend, args.device, args.threads, args.precision, args.compile,
                             runtime=args.runtime)
    summary = run_predict(detector, args.inputs, args.out, score=args.score, classes=args.classes,
                          max_det=args.max_det, batch_size=args.batch_size, progress=not args.no_progress,
                          draw=not args.no_draw, tile=args.tile, tile_overlap=args.tile_overlap)
    parts = [f"{summary['images']} images"]
    if summary["videos"] or summary["frames"]:
        parts.append(f"{summary['frames']} frames of {summary['videos']} videos")
    skipped = len(summary["skipped"])
    print(f"{', '.join(parts)}, {summary['detections']} detections, {skipped} skipped "
          f"({summary['images_per_second']:.1f} images/s) -> {args.out}")
    return EXIT_SKIPPED if skipped else EXIT_OK
