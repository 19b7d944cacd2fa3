"""Tests of the synthetic COCO dataset generator (multibox.data.synth)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from multibox.data import synth
from multibox.data.synth import (
    SYNTH_CATEGORIES,
    generate_demo_splits,
    generate_synthetic_coco,
)

BASE_HUES = dict(synth._CLASS_SPECS)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    ann = generate_synthetic_coco(out, num_images=48, seed=5)
    return ann, json.loads(ann.read_text())


def test_same_seed_is_byte_identical_and_seeds_differ(tmp_path):
    a = _files(generate_synthetic_coco(tmp_path / "a", num_images=5, seed=1).parent)
    b = _files(generate_synthetic_coco(tmp_path / "b", num_images=5, seed=1).parent)
    c = _files(generate_synthetic_coco(tmp_path / "c", num_images=5, seed=2).parent)
    assert "annotations.json" in a and "images/synth_000004.jpg" in a
    assert a == b
    assert a["annotations.json"] != c["annotations.json"]
    assert all(a[k] != c[k] for k in a if k.startswith("images/"))
    # Image i depends only on (seed, i), not on how many images are generated.
    d = _files(generate_synthetic_coco(tmp_path / "d", num_images=3, seed=1).parent)
    assert all(d[f"images/synth_{i:06d}.jpg"] == a[f"images/synth_{i:06d}.jpg"] for i in range(3))


def test_coco_structure_loads_in_pycocotools(dataset):
    ann_path, data = dataset
    coco = COCO(str(ann_path))
    assert len(coco.getImgIds()) == 48
    cats = coco.loadCats(coco.getCatIds())
    assert len(cats) >= 6
    assert [c["id"] for c in cats] == list(range(1, len(cats) + 1))
    assert len({c["name"] for c in cats}) == len(cats)
    assert all(c["supercategory"] for c in cats)
    assert [c["name"] for c in cats] == [c["name"] for c in SYNTH_CATEGORIES]
    ann_ids = [a["id"] for a in data["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    for a in data["annotations"]:
        assert a["iscrowd"] == 0
        assert all(isinstance(v, float) for v in a["bbox"])
        assert a["category_id"] in coco.cats


def test_images_match_annotations_and_boxes_inside(dataset):
    ann_path, data = dataset
    root = ann_path.parent / "images"
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for img in data["images"]:
        with Image.open(root / img["file_name"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (img["width"], img["height"])
        assert 256 <= img["width"] <= 416 and 256 <= img["height"] <= 416
        anns = by_image.get(img["id"], [])
        assert 1 <= len(anns) <= 10
        for a in anns:
            x, y, w, h = a["bbox"]
            assert w >= 1 and h >= 1
            assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
            assert 0 < a["area"] <= w * h + 1e-6
    # Varied image sizes and object counts, not one fixed value.
    assert len({(i["width"], i["height"]) for i in data["images"]}) > 20
    assert len({len(v) for v in by_image.values()}) >= 6


def test_object_sizes_overlaps_and_class_coverage(dataset):
    _, data = dataset
    sizes = {i["id"]: min(i["width"], i["height"]) for i in data["images"]}
    fracs = np.array([max(a["bbox"][2:]) / sizes[a["image_id"]] for a in data["annotations"]])
    # Long side in [3 %, 80 %] of the shorter image side (+ rasterisation slack).
    assert fracs.min() >= 0.02 and fracs.max() <= 0.82
    assert (fracs < 0.08).any() and (fracs > 0.5).any()
    assert 0.5 < np.mean((fracs >= 0.08) & (fracs <= 0.8)) < 0.97
    assert {a["category_id"] for a in data["annotations"]} == {c["id"] for c in SYNTH_CATEGORIES}
    # Placement rejects a box overlapping an earlier one with IoU > 0.35.
    by_image: dict[int, list[list[float]]] = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    for boxes in by_image.values():
        b = np.array(boxes)
        lt = np.maximum(b[:, None, :2], b[None, :, :2])
        rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
        area = np.prod(b[:, 2:] - b[:, :2], axis=1)
        iou = inter / (area[:, None] + area[None, :] - inter)
        np.fill_diagonal(iou, 0)
        assert iou.max() <= 0.35 + 1e-9


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = rgb.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    s = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    return h, s, mx


def test_drawn_pixels_lie_in_their_boxes(dataset):
    """Saturated object pixels appear inside boxes of their class and nowhere outside all boxes."""
    ann_path, data = dataset
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    names = {c["id"]: c["name"] for c in data["categories"]}
    for img in data["images"][:24]:
        rgb = np.asarray(Image.open(ann_path.parent / "images" / img["file_name"]).convert("RGB"))
        h, s, v = _hsv(rgb)
        vivid = (s > 0.55) & (v > 0.6)  # backgrounds are muted (s <= 0.3), objects are not
        outside = np.ones(vivid.shape, bool)
        for a in by_image[img["id"]]:
            x, y, w, hh = a["bbox"]
            x0, y0 = max(int(math.floor(x)) - 2, 0), max(int(math.floor(y)) - 2, 0)
            x1, y1 = int(math.ceil(x + w)) + 2, int(math.ceil(y + hh)) + 2
            outside[y0:y1, x0:x1] = False
            # At least half of each object stays visible; its hue family must be present in its box.
            base = BASE_HUES[names[a["category_id"]]]
            hue_dist = np.abs((h[y0:y1, x0:x1] - base + 180.0) % 360.0 - 180.0)
            own = vivid[y0:y1, x0:x1] & (hue_dist < 20)
            assert own.sum() >= 0.25 * a["area"], (img["file_name"], a)
        assert vivid[outside].mean() < 5e-4, img["file_name"]


@pytest.mark.parametrize("kind", [name for name, _ in synth._CLASS_SPECS])
def test_rendered_box_is_tight_extent_of_mask(kind):
    rng = np.random.default_rng(0)
    for long_side in (6.0, 17.3, 60.0, 150.0, 300.0):
        mask, mask_u8, (x0, y0, x1, y1), area = synth._render_shape(rng, kind, long_side)
        assert mask.size == (mask_u8.shape[1], mask_u8.shape[0])
        ys, xs = np.nonzero(mask_u8)
        # Coverage > 0 exactly on the pixels the (sub-pixel) box touches.
        assert xs.min() == math.floor(x0) and xs.max() + 1 == math.ceil(x1)
        assert ys.min() == math.floor(y0) and ys.max() + 1 == math.ceil(y1)
        # The shape spans its requested long side (up to rasterisation).
        assert abs(max(x1 - x0, y1 - y0) - long_side) <= 1.0
        # Area = exact supersampled count; the anti-aliased mask's coverage sum agrees.
        assert 0 < area <= (x1 - x0) * (y1 - y0)
        assert abs(mask_u8.sum() / 255.0 - area) <= 0.02 * area + 1.0


def test_demo_splits_differ_and_are_reused(tmp_path):
    train, val = generate_demo_splits(tmp_path, num_train=4, num_val=3, seed=0)
    assert train == tmp_path / "train" / "annotations.json" and val == tmp_path / "val" / "annotations.json"
    t, v = json.loads(train.read_text()), json.loads(val.read_text())
    assert len(t["images"]) == 4 and len(v["images"]) == 3
    assert (tmp_path / "train" / "images" / "synth_000000.jpg").read_bytes() != (
        tmp_path / "val" / "images" / "synth_000000.jpg"
    ).read_bytes()

    stamp = train.stat().st_mtime_ns, (tmp_path / "train/images/synth_000001.jpg").stat().st_mtime_ns
    os.utime(train, ns=(1, 1))  # an untouched, complete split is not rewritten
    generate_demo_splits(tmp_path, num_train=4, num_val=3, seed=0)
    assert train.stat().st_mtime_ns == 1
    assert (tmp_path / "train/images/synth_000001.jpg").stat().st_mtime_ns == stamp[1]

    # A missing image makes the split incomplete -> regenerated.
    (tmp_path / "train/images/synth_000002.jpg").unlink()
    generate_demo_splits(tmp_path, num_train=4, num_val=3, seed=0)
    assert (tmp_path / "train/images/synth_000002.jpg").is_file()
    assert train.stat().st_mtime_ns != 1

    # Different parameters -> regenerated, stale images removed.
    generate_demo_splits(tmp_path, num_train=2, num_val=3, seed=0)
    assert sorted(os.listdir(tmp_path / "train/images")) == ["synth_000000.jpg", "synth_000001.jpg"]
    assert len(json.loads(train.read_text())["images"]) == 2


def test_size_parameters_are_honoured(tmp_path):
    ann = generate_synthetic_coco(tmp_path, num_images=10, seed=0, size_range=(0.2, 0.5), small_fraction=0.0)
    data = json.loads(ann.read_text())
    short = {i["id"]: min(i["width"], i["height"]) for i in data["images"]}
    fracs = np.array([max(a["bbox"][2:]) / short[a["image_id"]] for a in data["annotations"]])
    assert fracs.min() >= 0.2 - 0.01 and fracs.max() <= 0.5 + 0.01
    assert json.loads((tmp_path / "synth_manifest.json").read_text())["params"]["size_range"] == [0.2, 0.5]
    with pytest.raises(ValueError):
        generate_synthetic_coco(tmp_path / "bad", num_images=1, size_range=(0.5, 0.2))


def test_image_aspect_gives_wide_frames(tmp_path):
    ann = generate_synthetic_coco(tmp_path, num_images=8, seed=0, min_side=320, max_side=400,
                                  image_aspect=(1.7, 1.8))
    data = json.loads(ann.read_text())
    for image in data["images"]:
        assert 320 <= image["width"] <= 400
        assert 1.7 - 0.01 <= image["width"] / image["height"] <= 1.8 + 0.01
        assert Image.open(ann.parent / "images" / image["file_name"]).size == (image["width"], image["height"])
    assert json.loads((tmp_path / "synth_manifest.json").read_text())["params"]["image_aspect"] == [1.7, 1.8]


def test_the_variety_options_give_other_data(tmp_path):
    """More classes (a shape again in another colour family), crowding, empty images, clutter left unannotated
    and elongated objects, as asked; the demo's defaults leave the demo's files as they were (test above)."""
    ann = generate_synthetic_coco(tmp_path / "v", num_images=40, seed=2, num_classes=14, min_objects=4,
                                  max_objects=20, empty_fraction=0.25, clutter=3, aspect_range=(3.0, 5.0),
                                  grain=(20.0, 30.0))
    data = json.loads(ann.read_text())
    names = [c["name"] for c in data["categories"]]
    assert len(names) == 14 and names[:6] == [c["name"] for c in SYNTH_CATEGORIES] and names[6] == "ellipse_2"
    assert synth.synth_classes(14)[6].hue == pytest.approx((BASE_HUES["ellipse"] + 180.0) % 360.0)
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=41)[1:]
    empty = per_image == 0
    assert 4 <= empty.sum() <= 18                      # 25 % of 40 images, binomial spread
    assert per_image[~empty].min() >= 3 and per_image.max() <= 20   # crowded (a placement may fail now and then)
    rects = [a["bbox"] for a in data["annotations"] if names[a["category_id"] - 1] in ("rectangle", "ellipse")]
    aspects = [max(w / h, h / w) for _, _, w, h in rects]
    assert np.median(aspects) > 2.5
    # Clutter is drawn but not annotated: vivid pixels outside every box exist on empty images.
    img = data["images"][int(np.nonzero(empty)[0][0])]
    _, s, v = _hsv(np.asarray(Image.open(ann.parent / "images" / img["file_name"]).convert("RGB")))
    assert ((s > 0.55) & (v > 0.6)).mean() > 0.001
    again = generate_synthetic_coco(tmp_path / "w", num_images=40, seed=2, num_classes=14, min_objects=4,
                                    max_objects=20, empty_fraction=0.25, clutter=3, aspect_range=(3.0, 5.0),
                                    grain=(20.0, 30.0))
    assert _files(again.parent) == _files(ann.parent)


@pytest.mark.parametrize("options", [dict(num_classes=25), dict(num_classes=0), dict(min_objects=5, max_objects=2),
                                     dict(empty_fraction=1.0), dict(clutter=-1), dict(aspect_range=(2.0, 1.0)),
                                     dict(image_aspect=(2.0, 1.0))])
def test_impossible_variety_is_refused(tmp_path, options):
    with pytest.raises(ValueError):
        generate_synthetic_coco(tmp_path / "x", num_images=2, **options)


def test_mirror_aspect_gives_tall_and_wide_shapes_and_none_between(tmp_path):
    from multibox.cli import main

    assert main(["synth", "--out", str(tmp_path), "--num-images", "12", "--seed", "3", "--classes", "4",
                 "--objects", "4-6", "--sizes", "0.3-0.6", "--small-fraction", "0", "--aspect", "4-8",
                 "--mirror-aspect"]) == 0
    data = json.loads((tmp_path / "annotations.json").read_text())
    shape_of = {c["id"]: c["name"] for c in data["categories"]}
    # Triangles and stars keep their own shape; the others are 4:1 to 8:1 either way (boxes rounded to pixels).
    ratios = [w / h for _, _, w, h in (a["bbox"] for a in data["annotations"]
                                       if shape_of[a["category_id"]] not in ("triangle", "star"))]
    assert len(ratios) >= 10
    assert all(r >= 3.5 or r <= 1 / 3.5 for r in ratios)
    assert sum(r > 1 for r in ratios) >= 3 and sum(r < 1 for r in ratios) >= 3
    assert json.loads((tmp_path / "synth_manifest.json").read_text())["params"]["mirror_aspect"] is True
