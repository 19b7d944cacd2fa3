"""``multibox synth``: write the synthetic COCO-format demo dataset."""
from __future__ import annotations

import argparse

from multibox.cli import command_help


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("synth", help=command_help("synth"))
    p.add_argument("--out", required=True)
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> int:
    from multibox.data.synth import generate_synthetic_coco

    path = generate_synthetic_coco(args.out, num_images=args.num_images, seed=args.seed)
    print(f"wrote {path}")
    return 0
