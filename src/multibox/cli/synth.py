"""``multibox synth``: write the synthetic COCO-format demo dataset."""
from __future__ import annotations

import argparse

from multibox.cli import command_help


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("synth", help=command_help("synth"), description=(
        "Write the built-in demo's synthetic detection dataset in COCO format: textured backgrounds with 1-10 "
        "objects from six classes per image, deterministic for a seed (`multibox train --data OUT/annotations.json`)."))
    p.add_argument("--out", required=True,
                   help="folder to create: OUT/annotations.json (COCO format) and the JPEGs under OUT/images")
    p.add_argument("--num-images", type=int, default=200, help="number of images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed: the same options give byte-identical files (default: %(default)s)")
    return p


def run(args: argparse.Namespace) -> int:
    from multibox.data.synth import generate_synthetic_coco

    path = generate_synthetic_coco(args.out, num_images=args.num_images, seed=args.seed)
    print(f"wrote {path}")
    return 0
