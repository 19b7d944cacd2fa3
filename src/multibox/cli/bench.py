"""``multibox bench``: multibox against torchvision's SSD300 in one process (see :mod:`multibox.bench.suite`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from multibox.bench import BACKENDS, LINES
from multibox.cli import command_help


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help=command_help("bench"))
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when there is one, else cpu)")
    p.add_argument("--arch", default="ssd300_vgg16",
                   help="any preset's model.arch (ssd300_vgg16, ssdlite320_mobilenet_v3, ssd512_vgg16, ...): "
                        "measured against its torchvision twin on the same weights where there is one "
                        "(ssd300_vgg16, ssdlite320_mobilenet_v3), else torchvision's ssd300_vgg16; tiny: both "
                        "systems on multibox's tiny trunk (a fast smoke test of every line; default: %(default)s)")
    p.add_argument("--preset", default=None,
                   help="multibox preset for the arch's settings (default: the arch's own preset)")
    p.add_argument("--precision", default=None, help="comma-separated bf16,fp32: both systems autocast alike "
                                                      "(cuda: bf16,fp32; cpu: fp32 -- bf16 needs AVX512-BF16/AMX)")
    p.add_argument("--train-batch", type=int, default=None, help="train_step / train_e2e batch (cuda 64, cpu 4)")
    p.add_argument("--infer-batches", type=int, nargs="+", default=None,
                   help="infer_e2e batch sizes (cuda: 1 64, cpu: 1 8)")
    p.add_argument("--budget", type=int, default=100,
                   help="confident boxes per image in infer_e2e's realistic case (default: %(default)s)")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (cuda 20, cpu 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repetitions first (cuda 3, cpu 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="train_e2e DataLoader workers, both systems (cuda: cores - 2, at most 12; cpu: 0)")
    p.add_argument("--pipelines", default=None, help="train_e2e multibox data.pipeline values (cuda: cpu,batched; "
                                                     "cpu: cpu)")
    p.add_argument("--e2e-images", type=int, default=None,
                   help="synthetic JPEGs for train_e2e, cycled (cuda: 512, cpu: twice the train batch, at least 8)")
    p.add_argument("--augment-images", type=int, default=64, help="images per augment pass (default: %(default)s)")
    p.add_argument("--eval-images", type=int, default=500, help="images of the eval line (default: %(default)s)")
    p.add_argument("--eval-dets", type=int, default=100, help="eval detections per image (default: %(default)s)")
    p.add_argument("--data-images", type=int, default=200,
                   help="synthetic images of the data line (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile multibox's network (train_step, infer_e2e)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of multibox's "
                                                          "training step and worst-case inference")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads during the bench, stated in the table's title (default: 1 on the CPU, as "
                        "README's table; torch's default on cuda; 0: torch's default). On a shared machine keep 1: "
                        "OpenMP threads waiting for a descheduled sibling make multi-threaded timings meaningless")
    p.add_argument("--only", help="comma-separated subset of " + ",".join(LINES))
    p.add_argument("--backends", default=None,
                   help="comma-separated deployment backends, one table on the CPU, each against torchvision's eager "
                        "fp32 model on the same weights, end to end from 8 JPEGs (AP with --data, ms at batch 1, "
                        "img/s at batch 8, file size, time per stage): " + ",".join(BACKENDS) + " (alone it runs no "
                        "other line; add --only for those)")
    p.add_argument("--checkpoint", default=None,
                   help="--backends: a trained checkpoint (its arch and config; default: random weights of --arch, "
                        "its torchvision twin's where there is one)")
    p.add_argument("--data", default=None,
                   help="--backends: COCO JSON, VOC folder or shards: AP of every backend on its evaluation split "
                        "(needs --checkpoint); the INT8 export is calibrated on it and refused past its accuracy "
                        "gate (default: no AP, INT8 calibrated on the bench's JPEGs)")
    p.add_argument("--workdir", default=None,
                   help="folder for the temporary datasets and exported models (default: the system's)")
    p.add_argument("--out", default="bench.json", help="the JSON report (default: %(default)s)")
    return p


def run(args: argparse.Namespace) -> int:
    from multibox.bench.backends import backends_report, format_backends_table
    from multibox.bench.suite import BenchOptions, bench_report, format_table

    options = vars(args).copy()
    out = options.pop("out")
    del options["command"]
    options["pipelines"] = options["pipelines"].split(",") if options["pipelines"] else None
    resolved = BenchOptions(**options).resolved()
    report = bench_report(resolved)
    if resolved.backends:
        report["backends"] = backends_report(resolved)
    report["args"]["out"] = out   # the report records where it was saved, as every option
    if report["rows"]:
        print("\n" + format_table(report["rows"], report["title"]))   # after the log line of each row
    if "backends" in report:
        print("\n" + format_backends_table(report["backends"]))
    for what, table in report.get("profile", {}).items():
        print(f"\nprofile: multibox {what}\n{table}")
    Path(out).write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0
