"""``multibox train``: train a detector (a new run, or the continuation of one with ``--resume``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from multibox.cli import command_help
from multibox.cli.common import EXIT_OK, EXIT_SKIPPED


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help=command_help("train"))
    p.add_argument("--config", default="tiny", help="preset name or YAML file (default: tiny)")
    p.add_argument("--data", help="training data: a COCO instances JSON, a Pascal VOC folder, a folder of packed "
                                  "shards (multibox convert) or 'synth' (default: the config's data.path)")
    p.add_argument("--val-data", help="data to evaluate on, in any of --data's forms (default: a held-out split of "
                                      "--data, data.val_fraction)")
    p.add_argument("--weights", metavar="NAME|FILE",
                   help="start from these weights and fine-tune (model.weights): ssd300_vgg16_coco, "
                        "ssdlite320_mobilenet_v3_large_coco, vgg16_features or mobilenet_v3_large (torchvision's "
                        "files, through torch hub's cache; downloaded once), a torchvision ssd300_vgg16 state dict "
                        "or a multibox checkpoint; class rows are kept for classes whose names match")
    p.add_argument("--out", help="run folder (default: runs/<timestamp>); must be new or empty")
    p.add_argument("--exist-ok", action="store_true",
                   help="start a new run in a --out that already holds files (they are overwritten as it goes)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its last.pt (written every epoch, every "
                        "train.checkpoint_every_minutes and on Ctrl-C)")
    p.add_argument("--time", metavar="DURATION",
                   help="finish within this time (15m, 90s, 1.5h): the number of epochs and the LR schedule are "
                        "fitted to it once the first minute of training is timed (train.time)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--dry-run", action="store_true", help="build, run one training step, print sizes, exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from multibox.config import load_config
    from multibox.engine.budget import parse_minutes
    from multibox.engine.fit import check_run_folder, fit
    from multibox.engine.interrupt import TrainingInterrupted
    from multibox.errors import InputError

    overrides = list(args.set)
    if args.time:
        overrides.append(f"train.time={parse_minutes(args.time)}")
    if args.resume and args.weights:
        raise InputError("--weights starts a new run; --resume continues from the run's last.pt, which holds its "
                         "weights")
    if args.resume:
        out = Path(args.resume)
        check_run_folder(out, resume=True)
        cfg = load_config(str(out / "config.yaml"), overrides)
    else:
        if args.data:
            overrides.append(f"data.path={args.data}")
        if args.val_data:
            overrides.append(f"data.val_path={args.val_data}")
        cfg = load_config(args.config, overrides)
        if args.weights:   # as given: a path is not parsed as a YAML value
            cfg.model.weights = args.weights
        out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    try:
        result = fit(cfg, out, resume=bool(args.resume), progress=not args.no_progress, dry_run=args.dry_run,
                     exist_ok=args.exist_ok)
    except TrainingInterrupted as stop:   # not an error: the run is saved and can continue
        print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_status
    if args.dry_run:   # the report as the last line on stdout, after the run's log lines
        print(json.dumps(result))
    # Under torchrun a non-zero status fails (or restarts) the whole group: skipped images are a warning there.
    single_process = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    return EXIT_SKIPPED if result.get("skipped_images") and single_process else EXIT_OK
