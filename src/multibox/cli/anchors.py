"""``multibox anchors DATA``: how well a model's default boxes fit a dataset, and what ``anchors.fit`` would do.

Prints the recall at the matching threshold, the best-IoU distribution and positives per object, by feature
level, COCO size bucket and aspect ratio, and the objects no default box reaches, with their files. Writes
``anchors.json`` (everything, up to 10,000 unmatched objects), ``anchors.png`` and ``index.html`` into ``--out``.
With ``--fit``, the boxes fitted to the data are analysed beside the preset's and printed as ``anchors.sizes``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from multibox.cli import command_help


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("anchors", help=command_help("anchors"), description=(
        "Analyse how the default boxes of a preset (or of a checkpoint) fit a dataset's objects, with the model's "
        "own matching rule at its input size; --fit also fits them to the data, as anchors.fit does before "
        "training."))
    p.add_argument("data", help="COCO annotation JSON, VOC folder, packed-shard folder, or synth")
    p.add_argument("--config", default="tiny", help="preset name or YAML file (default: %(default)s)")
    p.add_argument("--checkpoint", help="analyse this checkpoint's default boxes instead of --config's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", help="folder for anchors.json, anchors.png and index.html (default: "
                                 "runs/anchors-<data>)")
    p.add_argument("--max-images", type=int, default=10000,
                   help="images analysed, drawn at random when the data has more (default: %(default)s; 0 = all)")
    p.add_argument("--fit", action="store_true", help="fit the boxes to the data and compare (anchors.fit=true; "
                   "without it: what the config's anchors.fit decides, auto by default)")
    p.add_argument("--list", type=int, default=10, help="unmatched objects printed (default: %(default)s)")
    return p


def _config(args: argparse.Namespace):
    from multibox.config import Config, load_config, set_override

    if not args.checkpoint:
        return load_config(args.config, args.set)
    from multibox.checkpoint import load_checkpoint

    raw = load_checkpoint(args.checkpoint)["config"]
    for assignment in args.set:
        set_override(raw, assignment)
    return Config.from_dict(raw)


def _rows(title: str, key: str, rows: list[dict], fitted: list[dict] | None) -> list[str]:
    def cell(v) -> str:
        return "-" if v is None else f"{v:.3f}"
    head = f"{title:>10s} {'objects':>8s} {'recall':>7s} {'mean IoU':>8s} {'pos/obj':>7s}"
    lines = [head + ("  recall (fitted)  mean IoU (fitted)  pos/obj (fitted)" if fitted else "")]
    for i, r in enumerate(rows):
        line = f"{r[key]:>10s} {r['objects']:>8d} {cell(r['recall']):>7s} {cell(r['mean_iou']):>8s} " \
               f"{cell(r['positives']):>7s}"
        if fitted:
            line += f"  {cell(fitted[i]['recall']):>15s}  {cell(fitted[i]['mean_iou']):>17s}  " \
                    f"{cell(fitted[i]['positives']):>16s}"
        lines.append(line)
    return lines


def _report_lines(report: dict, fitted: dict | None, listed: int) -> list[str]:
    from multibox.evaluation.anchors import summary_line

    s = report["summary"]
    lines = [f"{s['objects']} objects in {s['images']} images at {s['image_hw'][0]}x{s['image_hw'][1]}, "
             f"{s['default_boxes']} default boxes, matching {s['matching']['rule']} at IoU "
             f"{s['matching']['iou_threshold']:g}",
             "default boxes: " + summary_line(report)]
    if fitted:
        lines.append("fitted boxes:  " + summary_line(fitted))
    q = report["best_iou"]["quantiles"]
    if q:
        lines.append("best IoU quantiles: " + ", ".join(f"{float(k):.0%} {v:.3f}" for k, v in q.items()))
    for title, key, rows in (("level", "level", "by_level"), ("size", "size", "by_size"),
                             ("aspect w:h", "aspect", "by_aspect")):
        lines += [""] + _rows(title, key, report[rows], fitted[rows] if fitted else None)
    unmatched = report["unmatched"]
    lines += ["", f"{unmatched['count']} objects reach no default box at the threshold"
              + (f"; the {min(listed, len(unmatched['listed']))} worst:" if unmatched["count"] and listed else "")]
    for item in unmatched["listed"][:listed]:
        w, h = item["wh_net_px"]
        lines.append(f"  {item['file']} annotation {item['ann_id']} (bbox {item['bbox_ltwh']}): {w:.0f}x{h:.0f} px "
                     f"at network scale, best IoU {item['best_iou']:.3f}")
    return lines


def run(args: argparse.Namespace) -> int:
    from multibox.core.anchor_fit import sample_rows
    from multibox.data.anchor_fitting import describe_fit, fit_anchors
    from multibox.data.build import open_dataset
    from multibox.data.objects import letterbox_input, object_table
    from multibox.evaluation.anchors import AnchorReport, html_page
    from multibox.io import atomic_write_text

    cfg = _config(args)
    dataset = open_dataset(args.data, cfg)
    limit = args.max_images if args.max_images > 0 else len(dataset)
    indices = sample_rows(len(dataset), limit, cfg.train.seed).tolist()
    table = object_table(dataset, indices, letterbox_input(cfg))
    decision = fit_anchors(cfg, table, True if args.fit else None)
    report = AnchorReport.of(cfg, table, decision)
    before, after = report.before, report.after
    if len(indices) < len(dataset):
        print(f"{len(indices)} of {len(dataset)} images, drawn at random (--max-images 0: all)")
    print("\n".join(_report_lines(before.report, after.report if after else None, args.list)))
    print("\nanchors.fit " + str(cfg.anchors.fit).lower() + (" (--fit: true)" if args.fit else "") + ": "
          + describe_fit(decision))
    if after is not None:
        print("fitted boxes, for --set or a config file:\n  anchors.sizes="
              + json.dumps([[[round(v, 4) for v in wh] for wh in level] for level in decision.sizes]))
    out = Path(args.out or Path("runs") / f"anchors-{Path(args.data).stem or 'data'}")
    report.write(out)
    atomic_write_text(out / "index.html", html_page(f"multibox anchors: {args.data}", before.report,
                                                    after.report if after else None))
    print(f"wrote {out / 'anchors.json'}, {out / 'anchors.png'} and {out / 'index.html'}")
    return 0
