"""``multibox synth``: write a synthetic COCO-format dataset (the built-in demo's, or a harder variety of it)."""
from __future__ import annotations

import argparse

from multibox.cli import command_help


def _span(kind: type):
    """argparse type for ``A-B`` (or a single ``A``, meaning A-A) ranges of ints or floats."""
    def parse(text: str) -> tuple:
        low, sep, high = text.partition("-")
        try:
            values = (kind(low), kind(high) if sep else kind(low))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected A-B, got {text!r}") from None
        return values
    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("synth", help=command_help("synth"), description=(
        "Write a synthetic detection dataset in COCO format, deterministic for a seed (`multibox train --data "
        "OUT/annotations.json`). By default the built-in demo's: textured backgrounds with 1-10 objects from six "
        "classes per image. The other options make other data: more classes, crowds, small or elongated objects, "
        "unannotated distractors, empty images."))
    p.add_argument("--out", required=True,
                   help="folder to create: OUT/annotations.json (COCO format) and the JPEGs under OUT/images")
    p.add_argument("--num-images", type=int, default=200, help="number of images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed: the same options give byte-identical files (default: %(default)s)")
    p.add_argument("--classes", type=int, default=6,
                   help="number of classes, 1-24: six shapes, then the same shapes in other colours (default: 6)")
    p.add_argument("--objects", type=_span(int), default=(1, 10), metavar="MIN-MAX",
                   help="objects per image (default: 1-10)")
    p.add_argument("--sizes", type=_span(float), default=(0.03, 0.80), metavar="LO-HI",
                   help="object long side as a fraction of the image's shorter side (default: 0.03-0.8)")
    p.add_argument("--small-fraction", type=float, default=0.15,
                   help="share of objects drawn from the small band LO-0.08 (default: 0.15)")
    p.add_argument("--aspect", type=_span(float), default=(0.6, 1.6), metavar="LO-HI",
                   help="width/height of ellipses, rectangles, rings and crosses (default: 0.6-1.6)")
    p.add_argument("--log-aspect", action="store_true",
                   help="draw the aspect ratio log-uniformly in LO-HI: as many tall shapes as wide ones")
    p.add_argument("--mirror-aspect", action="store_true",
                   help="half the shapes take the reciprocal of their aspect ratio: --aspect 4-12 --mirror-aspect "
                        "gives 4:1 to 12:1 and 1:4 to 1:12, none in between")
    p.add_argument("--side", type=_span(int), default=(256, 416), metavar="MIN-MAX",
                   help="image width and height in pixels, each drawn in MIN-MAX (default: 256-416)")
    p.add_argument("--image-aspect", type=_span(float), default=None, metavar="LO-HI",
                   help="image width/height drawn in LO-HI (e.g. 1.7-1.8 for 16:9 frames): the width in --side, "
                        "the height from it (default: both sides in --side)")
    p.add_argument("--clutter", type=float, default=0.0,
                   help="mean number of unannotated distractor shapes per image (default: 0)")
    p.add_argument("--empty", type=float, default=0.0,
                   help="share of images without objects (default: 0)")
    p.add_argument("--noise", type=_span(float), default=(2.0, 8.0), metavar="LO-HI",
                   help="standard deviation of the background's grain, 0-255 units (default: 2-8)")
    return p


def run(args: argparse.Namespace) -> int:
    from multibox.data.synth import generate_synthetic_coco
    from multibox.errors import InputError

    try:
        path = generate_synthetic_coco(
            args.out, num_images=args.num_images, seed=args.seed, num_classes=args.classes,
            min_objects=args.objects[0], max_objects=args.objects[1], size_range=args.sizes,
            small_fraction=args.small_fraction, aspect_range=args.aspect, log_aspect=args.log_aspect,
            min_side=args.side[0],
            max_side=args.side[1], clutter=args.clutter, empty_fraction=args.empty,
            grain=args.noise, image_aspect=args.image_aspect,
            mirror_aspect=args.mirror_aspect)
    except ValueError as err:   # an impossible combination of options: one line, as for any bad input
        raise InputError(f"synth: {err}") from None
    print(f"wrote {path}")
    return 0
