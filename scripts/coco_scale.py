#!/usr/bin/env python
"""Build a COCO-train-sized detection set cheaply and time ``multibox check-data`` / ``multibox convert`` on it.

The set (``build``): ``--distinct`` different 640x480 JPEGs of synthetic scenes (gradient, noise, rectangles and
ellipses, seeded), hard-linked under ``--images`` file names (``images/000000000001.jpg`` ...), so every file is
decoded for real while the disk holds only the distinct ones; a COCO instances JSON with 80 categories and 7 boxes
per image (``--boxes`` in all, 827,952 by default as COCO train2017), each with a polygon segmentation sized so the
file is about ``--json-mb`` MB (160 MB by default). Same arguments -> byte-identical files.

Measuring (``measure``): each command runs as a child process; wall time, the peak RSS of its largest process
(``getrusage(RUSAGE_CHILDREN)``) and the peak of the summed PSS of its whole process tree (``/proc``, polled every
0.1 s; PSS counts pages shared by forked workers once) are printed, plus pycocotools' ``COCO()`` index of the same
JSON as the reference. The machine may be shared: give per-image costs (``wall / images``) with the load average.

    python scripts/coco_scale.py build /tmp/coco_scale --images 20000
    python scripts/coco_scale.py measure /tmp/coco_scale [--what check-data,convert,pycocotools] [--workers 1 ...]

(arguments it does not know go to both multibox commands).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 640, 480
COCO_TRAIN_IMAGES, COCO_TRAIN_BOXES = 118_287, 827_952


def synthetic_jpeg(seed: int) -> bytes:
    """One 640x480 scene: a smooth gradient, sensor-like noise and a dozen filled shapes (JPEG quality 90)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    level, slope_x, slope_y = rng.uniform(0, 255, 3), rng.uniform(-0.2, 0.2, 3), rng.uniform(-0.2, 0.2, 3)
    base = level + slope_x * xx[..., None] + slope_y * yy[..., None]
    pixels = np.clip(base + rng.normal(0, 12, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = rng.integers(0, WIDTH - 20), rng.integers(0, HEIGHT - 20)
        x1, y1 = x0 + rng.integers(10, 250), y0 + rng.integers(10, 200)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _annotations(num_images: int, num_boxes: int, polygon_points: int, rng: np.random.Generator):
    """Yield COCO annotation dicts: 7 per image (fewer on the last images so the total is ``num_boxes``)."""
    per_image = np.full(num_images, num_boxes // num_images, np.int64)
    per_image[: num_boxes - int(per_image.sum())] += 1
    ann_id = 0
    for image_id, n in enumerate(per_image.tolist(), start=1):
        wh = rng.uniform(8, 300, (n, 2)).round(2)
        xy = (rng.uniform(0, 1, (n, 2)) * (np.array([WIDTH, HEIGHT]) - wh)).round(2)
        cats = rng.integers(1, 81, n)
        for k in range(n):
            ann_id += 1
            x, y, w, h = float(xy[k, 0]), float(xy[k, 1]), float(wh[k, 0]), float(wh[k, 1])
            t = np.linspace(0, 2 * np.pi, polygon_points, endpoint=False)
            poly = np.stack([x + w / 2 * (1 + np.cos(t)), y + h / 2 * (1 + np.sin(t))], 1).round(2).reshape(-1)
            yield {"segmentation": [poly.tolist()], "area": round(w * h * 0.785, 4), "iscrowd": 0,
                   "image_id": image_id, "bbox": [x, y, w, h], "category_id": int(cats[k]), "id": ann_id}


def build(folder: Path, num_images: int, num_boxes: int, distinct: int, json_mb: float) -> Path:
    """Write ``folder/images/*.jpg`` (hard links to ``folder/distinct/*.jpg``) and ``folder/annotations.json``."""
    (folder / "distinct").mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    sources = []
    for k in range(distinct):
        path = folder / "distinct" / f"scene{k:04d}.jpg"
        if not path.is_file():
            path.write_bytes(synthetic_jpeg(k))
        sources.append(path)
    names = [f"{i:012d}.jpg" for i in range(1, num_images + 1)]
    for i, name in enumerate(names):
        link = folder / "images" / name
        if not link.exists():
            os.link(sources[i % distinct], link)
    # ~16 bytes per polygon coordinate pair and ~150 bytes of other fields per annotation, ~110 per image.
    budget = json_mb * 1e6 - 110 * num_images - 150 * num_boxes
    points = max(4, int(budget / max(num_boxes, 1) / 16))
    rng = np.random.default_rng(0)
    ann_file = folder / "annotations.json"
    with open(ann_file, "w") as f:
        f.write('{"info": {"description": "coco_scale synthetic"}, "licenses": [], "categories": ')
        json.dump([{"id": c, "name": f"class{c:02d}", "supercategory": "thing"} for c in range(1, 81)], f)
        f.write(', "images": ')
        json.dump([{"id": i, "file_name": name, "width": WIDTH, "height": HEIGHT}
                   for i, name in enumerate(names, start=1)], f)
        f.write(', "annotations": [')
        for k, ann in enumerate(_annotations(num_images, num_boxes, points, rng)):
            f.write((", " if k else "") + json.dumps(ann))
        f.write("]}")
    print(f"{ann_file}: {ann_file.stat().st_size / 1e6:.1f} MB, {num_images} images ({distinct} distinct), "
          f"{num_boxes} boxes, {points} polygon points per box")
    return ann_file


def _tree_sample(root_pid: int, cpu: dict[int, float]) -> int:
    """Summed PSS (kB) of ``root_pid`` and its descendants now; records each one's CPU seconds so far in ``cpu``
    (processes that vanished meanwhile count with their last sample)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            stats[int(entry)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo, tick = 0, [root_pid], os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if pid in stats:   # fields after the name: state ppid ... utime (12th) stime (13th)
            cpu[pid] = (int(stats[pid][11]) + int(stats[pid][12])) / tick
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def timed(cmd: list[str]) -> dict:
    """Run ``cmd``: wall seconds, CPU seconds of its process tree, peak RSS of its largest process, peak summed
    PSS of its tree, exit status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, cpu = [0], {}

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_sample(proc.pid, cpu))
            time.sleep(0.1)
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    watcher.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime   # complete, unlike the last sample
    cpu[proc.pid] = max(cpu.get(proc.pid, 0.0), own)
    return {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": wall, "cpu_s": sum(cpu.values()),
            "max_rss_mb": (usage.ru_maxrss if usage.ru_maxrss > before.ru_maxrss else float("nan")) / 1024,
            "peak_tree_pss_mb": peak[0] / 1024, "tail": out[-600:]}


def measure(folder: Path, what: list[str], extra: list[str]) -> None:
    ann = folder / "annotations.json"
    num_images = len(list((folder / "images").iterdir()))
    multibox = [str(Path(sys.executable).parent / "multibox")]   # the console script of this venv
    cmds = {
        "pycocotools": [sys.executable, "-c", f"from pycocotools.coco import COCO; COCO({str(ann)!r})"],
        "check-data": multibox + ["check-data", str(ann), "--json", str(folder / "report.json"), *extra],
        "convert": multibox + ["convert", str(ann), "--out", str(folder / "shards"), *extra],
    }
    print(f"{num_images} images; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores")
    for name in what:
        if name == "convert":
            subprocess.run(["rm", "-rf", str(folder / "shards")], check=True)   # a rerun would only verify
        r = timed(cmds[name])
        print(f"{name:<12} rc={r['rc']} wall {r['wall_s']:7.1f} s ({1e3 * r['wall_s'] / num_images:.2f} ms/image), "
              f"CPU {r['cpu_s']:7.1f} s ({1e3 * r['cpu_s'] / num_images:.2f} ms/image), "
              f"largest process {r['max_rss_mb']:.0f} MB, tree PSS peak {r['peak_tree_pss_mb']:.0f} MB; "
              f"load average now {os.getloadavg()[0]:.2f}")
        if r["rc"] not in (0, 1, 3):
            print(r["tail"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("folder", type=Path)
    b.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES)
    b.add_argument("--boxes", type=int, default=None, help="default: 7 per image (827,952 at full size)")
    b.add_argument("--distinct", type=int, default=300)
    b.add_argument("--json-mb", type=float, default=None, help="default: 160 MB scaled by images / 118,287")
    m = sub.add_parser("measure")
    m.add_argument("folder", type=Path)
    m.add_argument("--what", default="pycocotools,check-data,convert")
    args, extra = parser.parse_known_args(argv)   # the unknown ones go to the multibox commands
    if extra and args.cmd != "measure":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "build":
        scale = args.images / COCO_TRAIN_IMAGES
        boxes = args.boxes if args.boxes is not None else round(COCO_TRAIN_BOXES * scale)
        build(args.folder, args.images, boxes, args.distinct, args.json_mb or 160 * scale)
    else:
        measure(args.folder, args.what.split(","), [a for a in extra if a != "--"])


if __name__ == "__main__":
    main()
