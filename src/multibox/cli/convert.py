"""``multibox convert SRC --out DIR``: pack a dataset into Arrow shards (see :mod:`multibox.data.shards`).

Exit status 0 when every image and annotation of the source was packed; 3 when some were left out (unreadable
images, annotations naming an unknown category or image, duplicate images, ...), which the summary lists."""
from __future__ import annotations

import argparse

from multibox.cli import command_help
from multibox.cli.common import EXIT_OK, EXIT_SKIPPED

MAX_LISTED = 20   # skipped images named in the summary (the manifest lists all)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help=command_help("convert"))
    p.add_argument("src", help="COCO annotation JSON, VOC folder, or MindRecord file (with --instances)")
    p.add_argument("--out", required=True, help="output folder (re-running resumes / verifies)")
    p.add_argument("--image-root", help="folder the COCO file names are relative to")
    p.add_argument("--split", help="VOC split to pack (default: trainval)")
    p.add_argument("--instances", help="MindRecord source: the matching COCO instances JSON (class names, files)")
    p.add_argument("--images-per-shard", type=int, default=1000,
                   help="images per Arrow shard file (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="image-checking processes (default: 0 = every core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-check", action="store_true", help="do not decode images while packing")
    return p


def run(args: argparse.Namespace) -> int:
    """Pack the source; exit status 3 (``EXIT_SKIPPED``) when anything was left out (each kind or image named in
    a warning while converting, summed up here), else 0."""
    from multibox.cli.common import progress_callback
    from multibox.data.shards import convert_source

    with progress_callback(not args.no_progress, "packing") as show:
        manifest = convert_source(args.src, args.out, args.image_root, args.split, args.instances,
                                  args.images_per_shard, not args.no_check, args.workers, progress=True,
                                  on_progress=show)
    counts = manifest["counts"]
    print(f"{args.out}: {len(manifest['shards'])} shards ({manifest['_written']} written, {manifest['_reused']} "
          f"already done), {counts['images']} images, {counts['annotations']} annotations, "
          f"{counts['skipped_images']} unreadable images skipped, {len(manifest['class_names']) - 1} classes")
    for item in manifest["dropped"]:
        print(f"  left out: {item['message']}")
    skipped = [s for entry in manifest["shards"] for s in entry["skipped"]]
    for s in skipped[:MAX_LISTED]:
        print(f"  skipped {s['file_name']} (image id {s['image_id']}): {s['reason']}")
    if len(skipped) > MAX_LISTED:
        print(f"  ... {len(skipped) - MAX_LISTED} more skipped images (listed in {args.out}/manifest.json)")
    return EXIT_SKIPPED if manifest["dropped"] or skipped else EXIT_OK
