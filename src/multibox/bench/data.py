"""The ``data`` line of ``multibox bench``: samples/s from loose image files vs from packed shards, same images.

Two rates per storage, both in shuffled (training) order, one process:

* ``fetch``: decode-ready samples/s: the encoded image bytes and the sample's annotations in memory, ready for
  the decoder (loose: open + read + close one file per sample; shards: a slice of a memory-mapped Arrow file
  plus its CRC check);
* ``decoded``: full ``dataset[i]`` (fetch + JPEG decode + the box policy), what a DataLoader worker delivers
  before augmentation.

Loose files and shards hold byte-identical JPEGs (shards keep the original encoding), so the difference is the
storage path alone. Files are read through the page cache (a first, unmeasured pass warms it); on a cold or
network disk, per-file opens cost far more and the gap widens.
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["bench_data"]


def _rates(fns: dict[str, Callable[[int], Any]], order: list[int], repeats: int) -> dict[str, float]:
    """Samples/s of each function over ``order`` (best of ``repeats`` passes), the functions taking turns pass by
    pass, so that a load change on a shared machine affects both storages alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for i in order:
                fn(i)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: len(order) / seconds for name, seconds in best.items()}


def bench_data(num_images: int = 200, images_per_shard: int = 64, repeats: int = 3, seed: int = 0,
               workdir: str | Path | None = None) -> dict[str, Any]:
    """Build ``num_images`` synthetic COCO images (JPEG, 300-640 px), pack them, and time both storages.

    Returns ``{"images", "mean_jpeg_kib", "loose_fetch_per_s", "shards_fetch_per_s", "fetch_speedup",
    "loose_decoded_per_s", "shards_decoded_per_s", "decoded_speedup"}``.
    """
    from multibox.data.coco import CocoDetection
    from multibox.data.shards import ShardDataset, convert_dataset
    from multibox.data.synth import generate_synthetic_coco

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        ann = generate_synthetic_coco(root / "loose", num_images=num_images, seed=seed)
        loose = CocoDetection(ann)
        convert_dataset(loose, root / "shards", images_per_shard=images_per_shard, check_images=False, workers=1)
        shards = ShardDataset(root / "shards", verify="sha256")
        order = list(range(len(loose)))
        random.Random(seed).shuffle(order)

        def fetch_loose(i: int):
            return loose.read_bytes(i), loose.records[i]

        def fetch_shards(i: int):
            return shards.read_bytes(i), shards.records[i]

        for i in order:   # warm the page cache and the shards' first-use checksum: neither is measured
            fetch_loose(i), fetch_shards(i)
        sizes = [len(loose.read_bytes(i)) for i in order]
        out = {"images": len(order), "mean_jpeg_kib": round(sum(sizes) / len(sizes) / 1024, 1)}
        fetch = _rates({"loose": fetch_loose, "shards": fetch_shards}, order, repeats)
        out["loose_fetch_per_s"] = round(fetch["loose"], 1)
        out["shards_fetch_per_s"] = round(fetch["shards"], 1)
        out["fetch_speedup"] = round(out["shards_fetch_per_s"] / out["loose_fetch_per_s"], 2)
        decoded = _rates({"loose": loose.__getitem__, "shards": shards.__getitem__}, order, repeats)
        out["loose_decoded_per_s"] = round(decoded["loose"], 1)
        out["shards_decoded_per_s"] = round(decoded["shards"], 1)
        out["decoded_speedup"] = round(out["shards_decoded_per_s"] / out["loose_decoded_per_s"], 2)
        return out
