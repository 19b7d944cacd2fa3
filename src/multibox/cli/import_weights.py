"""``multibox import-weights --from torchvision|mindspore FILE --out CKPT`` (see :mod:`multibox.interop`)."""
from __future__ import annotations

import argparse

from multibox.cli import command_help


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "import-weights", help=command_help("import-weights"),
        description="torchvision: a torch.save(model.state_dict()) file of torchvision's ssd300_vgg16 or "
                    "ssdlite320_mobilenet_v3_large becomes a checkpoint of its preset. mindspore: a "
                    "mindspore.save_checkpoint file of the MindSpore tutorial's SSD300Vgg16 or of one of the "
                    "MindSpore model zoo's SSDs (official/cv/ssd) becomes a checkpoint of its preset; which network "
                    "the file holds is recognised from its parameter names and shapes (the tutorial's VGG16 "
                    "-> ssd300-vgg16-seed, the zoo's ssd_vgg16 with or without ssd_vgg_bn -> ssd300-vgg16-zoo; a "
                    "training network's network.* names are read as the network's own). MindSpore is not needed.")
    p.add_argument("--from", dest="source", required=True, choices=("torchvision", "mindspore"),
                   help="the framework that wrote the weights file")
    p.add_argument("file", help="the weights file to convert")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--ignore-training-state", action="store_true",
                   help="mindspore: drop optimizer/bookkeeping entries (moments.*, global_step, learning_rate, "
                        "momentum, ...)")
    return p


def run(args: argparse.Namespace) -> int:
    from multibox.checkpoint import save_checkpoint
    from multibox.interop.mindspore import import_mindspore_ckpt
    from multibox.interop.torchvision import import_torchvision

    if args.source == "torchvision":
        payload = import_torchvision(args.file)
    else:
        payload = import_mindspore_ckpt(args.file, ignore_training_state=args.ignore_training_state)
    save_checkpoint(payload, args.out)
    print(f"{args.file} ({args.source}) -> {args.out}: {payload['config']['model']['arch']}, "
          f"{len(payload['class_names']) - 1} classes, {len(payload['model'])} tensors")
    return 0
