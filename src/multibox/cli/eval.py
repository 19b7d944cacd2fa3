"""``multibox eval``: COCO evaluation of a checkpoint, with eval.json and the HTML report."""
from __future__ import annotations

import argparse
from pathlib import Path

from multibox.cli import command_help
from multibox.cli.common import add_inference_arguments


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help=command_help("eval"))
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="COCO annotation JSON, VOC folder or shards (default: the checkpoint's evaluation "
                                  "split)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's config (data.voc_split=test, eval.score_threshold=0.01)")
    p.add_argument("--out", help="folder for eval.json (default: the checkpoint's folder)")
    p.add_argument("--device", default="auto")
    add_inference_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from multibox.checkpoint import load_checkpoint
    from multibox.config import Config, set_override
    from multibox.data.build import build_splits
    from multibox.evaluation.coco import format_per_class_table, write_eval_json
    from multibox.evaluation.evaluate import category_map_by_name, evaluate_model
    from multibox.evaluation.report import write_eval_report
    from multibox.models import model_from_state_dict
    from multibox.runtime import apply_inference_arguments, prepare_for_inference, resolve_device

    payload = load_checkpoint(args.checkpoint)
    raw = payload["config"]
    for assignment in args.set:   # e.g. data.voc_split=test, eval.score_threshold=0.01
        set_override(raw, assignment)
    cfg = apply_inference_arguments(Config.from_dict(raw), args.precision, args.compile)
    if args.data:   # evaluate every image of another COCO-format set
        cfg.data.path, cfg.data.val_path = args.data, args.data
    splits = build_splits(cfg)
    try:   # by class name: a checkpoint with more classes (torchvision's 91 COCO slots) evaluates on the data's
        category_map = category_map_by_name(payload["class_names"], splits)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    device = resolve_device(args.device)
    model = model_from_state_dict(cfg, payload["model"])
    result, detections = evaluate_model(cfg, prepare_for_inference(model, cfg, device), splits, device, progress=True,
                                        return_detections=True, label_to_category_id=category_map)
    print(result.summary)
    print(format_per_class_table(result.per_class))
    out = Path(args.out or Path(args.checkpoint).parent)
    out.mkdir(parents=True, exist_ok=True)
    write_eval_json(out / "eval.json", result, extra={"checkpoint": str(args.checkpoint)})
    files = write_eval_report(out, result, splits.val_gt, detections, splits.class_names,
                              metrics_jsonl=Path(args.checkpoint).parent / "metrics.jsonl",
                              images=splits.val, image_ids=splits.val_image_ids)
    print(f"wrote {out / 'eval.json'} and the report {files['index']}")
    return 0
