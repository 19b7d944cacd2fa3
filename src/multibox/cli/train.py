"""``multibox train``: train a detector (a new run, or the continuation of one with ``--resume``)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from multibox.cli import command_help


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help=command_help("train"))
    p.add_argument("--config", default="tiny", help="preset name or YAML file (default: tiny)")
    p.add_argument("--data", help="COCO annotation JSON, or 'synth' (default: the config's data.path)")
    p.add_argument("--val-data", help="COCO annotation JSON to evaluate on (default: a held-out split)")
    p.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last.pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--dry-run", action="store_true", help="build, run one training step, print sizes, exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from multibox.config import load_config
    from multibox.engine.fit import fit

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
    result = fit(cfg, out, resume=bool(args.resume), progress=not args.no_progress, dry_run=args.dry_run)
    if args.dry_run:   # the report as the last line on stdout, after the run's log lines
        print(json.dumps(result))
    return 0
