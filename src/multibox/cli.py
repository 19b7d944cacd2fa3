"""``multibox``: the one command-line entry point."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .bench import add_bench_parser
from .export import add_export_parser
from .inference import add_inference_arguments
from .predict import add_predict_parser
from .data.shards import add_convert_parser
from .data.validate import add_check_data_parser
from .interop import add_import_weights_parser


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import fit

    if args.resume:
        out = Path(args.resume)
        cfg = load_config(str(out / "config.yaml"), args.set)
    else:
        overrides = list(args.set)
        if args.data:
            overrides.append(f"data.path={args.data}")
        if args.val_data:
            overrides.append(f"data.val_path={args.val_data}")
        cfg = load_config(args.config, overrides)
        out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    fit(cfg, out, resume=bool(args.resume), progress=not args.no_progress, dry_run=args.dry_run)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .config import Config, set_override
    from .data.build import build_splits
    from .evaluation import format_per_class_table, write_eval_json
    from .models import model_from_state_dict
    from .report import write_eval_report
    from .inference import apply_inference_arguments, prepare_for_inference
    from .train import category_map_by_name, evaluate_model, resolve_device

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


def _synth(args: argparse.Namespace) -> int:
    from .data.synth import generate_synthetic_coco

    path = generate_synthetic_coco(args.out, num_images=args.num_images, seed=args.seed)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multibox", description="SSD object detectors: train, evaluate, predict.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a detector (default: the tiny preset on the synthetic demo data)")
    p.add_argument("--config", default="tiny", help="preset name or YAML file (default: tiny)")
    p.add_argument("--data", help="COCO annotation JSON, or 'synth' (default: the config's data.path)")
    p.add_argument("--val-data", help="COCO annotation JSON to evaluate on (default: a held-out split)")
    p.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--dry-run", action="store_true", help="build, run one training step, print sizes, exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="COCO evaluation of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="COCO annotation JSON, VOC folder or shards (default: the checkpoint's evaluation "
                                  "split)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the checkpoint's config (data.voc_split=test, eval.score_threshold=0.01)")
    p.add_argument("--out", help="folder for eval.json (default: the checkpoint's folder)")
    p.add_argument("--device", default="auto")
    add_inference_arguments(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("synth", help="write the synthetic COCO-format demo dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)

    add_predict_parser(sub)
    add_export_parser(sub)
    add_convert_parser(sub)
    add_check_data_parser(sub)
    add_import_weights_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError, CheckpointWriteError
    from .config import ConfigError
    from .data.coco import CocoFormatError
    from .data.shards import ShardError
    from .engine import NonFiniteTrainingError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, CheckpointWriteError, ConfigError, CocoFormatError, ShardError,
            NonFiniteTrainingError, FileNotFoundError) as err:
        # Expected failures on bad input get one clear line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
