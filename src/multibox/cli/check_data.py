"""``multibox check-data SRC``: every problem of a dataset (see :mod:`multibox.data.validate`); exit status 1 when
one is an error (training would drop or refuse data), 0 when there are none or only warnings."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from multibox.cli import command_help
from multibox.cli.common import EXIT_OK
from multibox.config import DEFAULT_MAX_IMAGE_PIXELS

EXIT_PROBLEMS = 1   # check-data's own status: the check ran and found an error (not EXIT_ERROR: it did not fail)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check-data", help=command_help("check-data"))
    p.add_argument("src", help="COCO annotation JSON, VOC folder, or packed-shard folder")
    p.add_argument("--image-root", help="folder the COCO file names are relative to")
    p.add_argument("--split", help="VOC: ImageSets/Main split to check (default: every XML)")
    p.add_argument("--no-images", action="store_true", help="check annotations only, do not decode images")
    p.add_argument("--workers", type=int, default=0, help="image-checking processes (default: 0 = every core)")
    p.add_argument("--full-decode", action="store_true",
                   help="decode JPEGs at full size (default: at 1/8 scale, which reads and checks the same data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="images whose header declares more pixels are reported (oversized_image), not decoded "
                        "(default: 8192x8192, as data.max_image_pixels; 0 = no limit)")
    p.add_argument("--max-print", type=int, default=200, help="problems printed (all go to --json)")
    p.add_argument("--json", help="write the full report to this JSON file")
    return p


def run(args: argparse.Namespace) -> int:
    from multibox.cli.common import progress_callback
    from multibox.data.validate import check_dataset

    with progress_callback(not args.no_progress, "checking images") as show:
        report = check_dataset(args.src, args.image_root, args.split, images=not args.no_images,
                               workers=args.workers, max_pixels=args.max_image_pixels or None, progress=show,
                               full_decode=args.full_decode)
    shown = report.problems if args.max_print is None else report.problems[: args.max_print]
    for p in shown:
        print(p)
    if len(shown) < len(report.problems):
        print(f"... {len(report.problems) - len(shown)} more (see --json)")
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1))
        print(f"wrote {args.json}")
    return EXIT_PROBLEMS if report.num_errors else EXIT_OK
