"""COCO-format source -> shards -> train 1 epoch -> eval equals the same run on the loose source (same seed)."""
from __future__ import annotations

import json

import torch

from _data_builders import make_clean_coco
from multibox.cli import main

# Augmentation on (crop, flip, jitter): both runs draw the same random numbers, so they must agree exactly.
SETTINGS = ["model.widths=[8, 8, 8, 8, 8, 8, 8, 8]", "data.num_workers=0", "train.epochs=1", "train.batch_size=3",
            "train.log_every=1", "train.checkpoint_every=0", "train.threads=2", "train.seed=5",
            "eval.score_threshold=0.01", "eval.batch_size=4"]


def _train(data, out, *extra):
    args = ["train", "--data", str(data), "--out", str(out), "--no-progress", "--set", "data.val_fraction=0.3"]
    for item in [*SETTINGS, *extra]:
        args += ["--set", item]
    assert main(args) == 0
    return json.loads((out / "eval.json").read_text())


def test_shards_train_and_evaluate_exactly_like_the_loose_source(tmp_path):
    ann = make_clean_coco(tmp_path / "custom", num_images=10, seed=4, images_dir="photos")
    assert main(["convert", str(ann), "--image-root", str(ann.parent / "photos"), "--out",
                 str(tmp_path / "shards"), "--images-per-shard", "4", "--workers", "1"]) == 0

    loose = _train(ann, tmp_path / "loose", f"data.image_root={ann.parent / 'photos'}")
    packed = _train(tmp_path / "shards", tmp_path / "packed")
    provenance = ("data", "checkpoint")   # what was evaluated: the source's path and the checkpoint's hash differ
    assert {k: v for k, v in packed.items() if k not in provenance} == \
        {k: v for k, v in loose.items() if k not in provenance}
    assert loose["per_class"] and set(loose["per_class"]) == {"car", "dog", "bottle"}
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("loose", "packed")]
    strip = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]   # noqa: E731
    assert strip(logs[0]) == strip(logs[1])
    wa = torch.load(tmp_path / "loose" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "packed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
