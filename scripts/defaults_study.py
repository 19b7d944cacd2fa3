"""How the no-flag `multibox train --data X --val-data Y` does on data nobody tuned for.

A family of synthetic sets unlike the demo (`multibox synth` options: classes, crowding, sizes, elongation,
clutter, empty images, image sizes). The T1-T5 sets were used to choose the tiny preset's defaults; the H1-H3 sets
were not looked at until the defaults were fixed. Each run is a plain `multibox train` in a subprocess; the table
gives wall minutes and the held-out AP50 / AP from its eval.json.

    python scripts/defaults_study.py --root /tmp/study --sets H1,H2,H3 [--set train.epochs=20 ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from multibox.data.synth import generate_synthetic_coco

# name: (train images, generator options). Validation: 150 images of the same kind, another seed.
FAMILY = {
    "T1": (600, dict(num_classes=12, min_objects=5, max_objects=40, size_range=(0.02, 0.3), small_fraction=0.4,
                     min_side=480, max_side=800, clutter=3)),
    "T2": (600, dict(num_classes=3, max_objects=3, size_range=(0.2, 0.9), min_side=200, max_side=400,
                     empty_fraction=0.1)),
    "T3": (600, dict(num_classes=8, max_objects=15, aspect_range=(0.3, 3.0), min_side=240, max_side=720,
                     clutter=1, empty_fraction=0.05)),
    "T4": (600, dict(num_classes=20, max_objects=10, size_range=(0.05, 0.6))),
    "T5": (700, dict(num_classes=6, max_objects=8, size_range=(0.02, 0.6), min_side=320, max_side=640, clutter=1,
                     grain=(15.0, 35.0))),
    "H1": (600, dict(num_classes=5, max_objects=12, size_range=(0.02, 0.7), min_side=300, max_side=640, clutter=2,
                     grain=(20.0, 40.0))),
    "H2": (800, dict(num_classes=15, min_objects=2, max_objects=25, size_range=(0.03, 0.5), min_side=320,
                     max_side=640, clutter=1, empty_fraction=0.1)),
    "H3": (500, dict(num_classes=2, max_objects=6, size_range=(0.05, 0.8), aspect_range=(0.25, 4.0),
                     min_side=256, max_side=512, empty_fraction=0.15)),
}


def make_set(root: Path, name: str) -> tuple[Path, Path]:
    count, options = FAMILY[name]
    seed = 100 + list(FAMILY).index(name)
    train = generate_synthetic_coco(root / name / "train", count, 2 * seed, skip_if_complete=True, **options)
    val = generate_synthetic_coco(root / name / "val", 150, 2 * seed + 1, skip_if_complete=True, **options)
    return train, val


def train(root: Path, name: str, tag: str, overrides: list[str]) -> dict:
    train_json, val_json = make_set(root, name)
    out = root / "runs" / f"{name}-{tag}"
    command = [sys.executable, "-m", "multibox", "train", "--data", str(train_json), "--val-data", str(val_json),
               "--out", str(out), "--exist-ok", "--no-progress"] + [a for o in overrides for a in ("--set", o)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    (root / "runs" / f"{name}-{tag}.log").write_text(done.stdout + done.stderr)
    if done.returncode not in (0, 3):
        return {"set": name, "tag": tag, "minutes": minutes, "error": done.stderr.strip().splitlines()[-1:]}
    metrics = json.loads((out / "eval.json").read_text())
    return {"set": name, "tag": tag, "images": FAMILY[name][0], "minutes": round(minutes, 2),
            "AP50": round(metrics["AP50"], 4), "AP": round(metrics["AP"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="where the sets and runs go")
    parser.add_argument("--sets", default="T1,T2,T3,T4,T5", help="comma-separated names of FAMILY")
    parser.add_argument("--tag", default="default", help="name of this variant in the run folders")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--generate-only", action="store_true", help="write the sets, train nothing")
    args = parser.parse_args()
    for name in args.sets.split(","):
        if args.generate_only:
            print(name, make_set(args.root, name))
            continue
        row = train(args.root, name, args.tag, args.overrides)
        print(json.dumps(row), flush=True)
        with open(args.root / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
