"""``multibox eval``: COCO evaluation of a checkpoint or of an exported ONNX model, with eval.json and the HTML
report (an ONNX file's metadata holds the config, class names and category ids: it evaluates as its checkpoint).

Beside the checkpoint: ``eval.json`` and the report for its own evaluation split, ``eval-<data>.json`` and the
folder ``eval-<data>/`` for other data (:func:`multibox.evaluation.provenance.eval_destination`); ``--out DIR``:
``DIR/eval.json`` and the report in ``DIR``. An eval JSON that holds another checkpoint's or other data's
evaluation is never replaced; each records what it evaluated (checkpoint path and sha256, data, thresholds,
evaluator)."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

from multibox.cli import command_help
from multibox.cli.common import add_inference_arguments


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help=command_help("eval"))
    p.add_argument("--checkpoint", required=True,
                   help="the multibox checkpoint (.pt) or exported model (.onnx, `multibox export`) to evaluate")
    p.add_argument("--data", help="COCO annotation JSON, VOC folder or shards (default: the checkpoint's evaluation "
                                  "split)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's config (data.voc_split=test, eval.score_threshold=0.01)")
    p.add_argument("--out", help="folder for eval.json and the report (default: the checkpoint's folder: eval.json "
                                 "for its own evaluation split, eval-<data>.json and eval-<data>/ for other data)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--runtime", choices=["auto", "onnxruntime", "openvino"], default="auto",
                   help="runtime of an .onnx model (default: %(default)s: the fastest here)")
    add_inference_arguments(p)
    return p


def _configs(args: argparse.Namespace, raw: dict):
    """(the evaluation's config, the checkpoint's own): ``--set`` and ``--data`` apply to the first only."""
    from multibox.config import Config, set_override
    from multibox.runtime import apply_inference_arguments

    own = Config.from_dict(copy.deepcopy(raw))
    for assignment in args.set:   # e.g. data.voc_split=test, eval.score_threshold=0.01
        set_override(raw, assignment)
    cfg = apply_inference_arguments(Config.from_dict(raw), args.precision, args.compile)
    if args.data:   # evaluate every image of another COCO-format set
        cfg.data.path, cfg.data.val_path = args.data, args.data
    return cfg, own


def _destination(args: argparse.Namespace, cfg, own, splits, checkpoint: dict) -> tuple[Path, Path]:
    """(eval JSON, report folder), checked not to hold another evaluation (InputError) before any is run."""
    from multibox.evaluation.provenance import (check_replaceable, data_record, eval_destination,
                                                evaluation_data_key)

    record = data_record(cfg, splits)
    if args.out:
        json_path, report_dir = Path(args.out) / "eval.json", Path(args.out)
    else:
        own_split = evaluation_data_key(cfg) == evaluation_data_key(own)
        json_path, report_dir = eval_destination(Path(args.checkpoint).parent, args.checkpoint, own_split, record)
    check_replaceable(json_path, {"checkpoint": checkpoint, "data": record})
    return json_path, report_dir


def _onnx_payload(args: argparse.Namespace):
    """(detector, the payload fields eval needs: config, class_names, category_ids) of an .onnx model."""
    from multibox.errors import InputError
    from multibox.inference.onnx import load_onnx

    if args.precision not in (None, "auto") or args.compile:
        raise InputError(f"{args.checkpoint}: --precision and --compile apply to checkpoints; an exported model "
                         f"runs as it was exported")
    fixed = [a for a in args.set if a.startswith("eval.") and not a.startswith(("eval.batch_size=", "eval.backend="))]
    if fixed:
        raise InputError(f"{args.checkpoint}: --set {fixed[0]}: an exported model's eval.* settings were fixed "
                         f"when it was exported (export again with other eval.* settings)")
    detector = load_onnx(args.checkpoint, device=args.device, runtime=args.runtime)
    return detector, {"config": detector.cfg.to_dict(), "class_names": detector.class_names,
                      "category_ids": detector.category_ids}


def _evaluate(args: argparse.Namespace, cfg, payload: dict, detector, splits, category_map):
    """(result, COCO detections) of the checkpoint (``detector`` None) or the exported model."""
    from multibox.evaluation.evaluate import evaluate_model
    from multibox.models import model_from_state_dict
    from multibox.runtime import prepare_for_inference, resolve_device

    if detector is not None:
        from multibox.inference.onnx_eval import evaluate_onnx

        detector.cfg = cfg   # --set data.* / eval.batch_size: how the images are read and batched
        return evaluate_onnx(detector, splits, progress=not args.no_progress, return_detections=True,
                             label_to_category_id=category_map)
    device = resolve_device(args.device)
    model = model_from_state_dict(cfg, payload["model"])
    return evaluate_model(cfg, prepare_for_inference(model, cfg, device), splits, device,
                          progress=not args.no_progress, return_detections=True, label_to_category_id=category_map)


def run(args: argparse.Namespace) -> int:
    from multibox.checkpoint import load_checkpoint
    from multibox.data.build import build_splits
    from multibox.data.categories import category_ids_of
    from multibox.errors import InputError
    from multibox.evaluation.coco import format_per_class_table, write_eval_json
    from multibox.evaluation.evaluate import category_map_by_name
    from multibox.evaluation.provenance import checkpoint_record, eval_provenance
    from multibox.evaluation.anchors import anchors_html
    from multibox.evaluation.report import write_eval_report
    from multibox.inference.detector import model_format

    detector = None
    if model_format(args.checkpoint) == "onnx":
        detector, payload = _onnx_payload(args)
    else:
        if args.runtime != "auto":
            raise InputError(f"{args.checkpoint}: --runtime applies to exported (.onnx) models")
        payload = load_checkpoint(args.checkpoint)
    cfg, own = _configs(args, payload["config"])
    splits = build_splits(cfg)
    # A checkpoint's labels name its training data's categories: matched to the evaluated data's by (name, id),
    # then by name (a checkpoint with more classes, torchvision's 91 COCO slots, evaluates on the data's).
    category_ids = category_ids_of(payload["class_names"], payload.get("category_ids"), source=args.checkpoint)
    try:
        category_map = category_map_by_name(payload["class_names"], splits, category_ids)
    except ValueError as err:
        raise InputError(str(err)) from None
    checkpoint = checkpoint_record(args.checkpoint, payload.get("epoch"))
    json_path, report_dir = _destination(args, cfg, own, splits, checkpoint)
    result, detections = _evaluate(args, cfg, payload, detector, splits, category_map)
    print(result.summary)
    print(format_per_class_table(result.per_class))
    provenance = eval_provenance(cfg, splits, result, checkpoint)
    write_eval_json(json_path, result, extra=provenance)
    files = write_eval_report(report_dir, result, splits.val_gt, detections, splits.class_names,
                              metrics_jsonl=Path(args.checkpoint).parent / "metrics.jsonl",
                              images=splits.val, image_ids=splits.val_image_ids, provenance=provenance,
                              sections=anchors_html(report_dir) if report_dir == Path(args.checkpoint).parent else [])
    print(f"wrote {json_path} and the report {files['index']}")
    return 0
