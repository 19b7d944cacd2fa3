"""Tests of the COCO dataset reader (multibox.data.coco)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from multibox.data.coco import CocoDetection, collate_detection, read_image_rgb


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture()
def coco_dir(tmp_path: Path) -> Path:
    """Small COCO set: non-contiguous, unsorted category ids; a crowd box; an empty image;
    a degenerate box; a box sticking out of its image; a grayscale image."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    Image.fromarray(_rgb(40, 60, 0)).save(images_dir / "a.png")
    Image.fromarray(_rgb(30, 20, 1)).save(images_dir / "empty.png")
    Image.fromarray(_rgb(50, 50, 2)[..., 0]).save(images_dir / "gray.png")  # mode "L"
    coco = {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 60, "height": 40},
            {"id": 3, "file_name": "empty.png", "width": 20, "height": 30},
            {"id": 7, "file_name": "gray.png", "width": 50, "height": 50},
        ],
        "categories": [
            {"id": 12, "name": "zebra", "supercategory": "animal"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
            {"id": 7, "name": "dog", "supercategory": "animal"},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [5.5, 4.0, 10.0, 20.0], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 12, "bbox": [30, 10, 25, 15], "area": 375, "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 60, 40], "area": 2400, "iscrowd": 1},
            {"id": 4, "image_id": 7, "category_id": 3, "bbox": [10, 10, 0, 5], "area": 0, "iscrowd": 0},
            {"id": 5, "image_id": 7, "category_id": 3, "bbox": [40, -5, 20, 15], "area": 300, "iscrowd": 0},
            {"id": 6, "image_id": 7, "category_id": 12, "bbox": [60, 10, 5, 5], "area": 25},  # fully outside
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    return tmp_path


def test_category_mapping_sorted_by_id(coco_dir):
    ds = CocoDetection(coco_dir / "instances.json")
    assert ds.class_names == ["background", "car", "dog", "zebra"]
    assert ds.label_to_category_id == {1: 3, 2: 7, 3: 12}
    assert ds.category_id_to_label == {3: 1, 7: 2, 12: 3}
    assert ds.num_classes == 3
    assert ds.image_ids == [10, 3, 7]  # file order, empty image kept
    assert len(ds) == 3


def test_sample_boxes_xyxy_labels_and_crowd_ignored(coco_dir):
    ds = CocoDetection(coco_dir / "instances.json")
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 60)
    assert torch.equal(image, torch.from_numpy(_rgb(40, 60, 0)).permute(2, 0, 1))
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    # [x, y, w, h] -> [x1, y1, x2, y2]; the crowd box (id 3) is gone.
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.5, 4.0, 15.5, 24.0], [30.0, 10.0, 55.0, 25.0]]))
    assert target["labels"].tolist() == [2, 3]  # dog, zebra
    assert target["image_id"] == 10
    assert target["orig_size"] == (40, 60)


def test_empty_image_kept_and_dropped(coco_dir):
    ds = CocoDetection(coco_dir / "instances.json")
    image, target = ds[1]
    assert image.shape == (3, 30, 20)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["image_id"] == 3
    ds2 = CocoDetection(coco_dir / "instances.json", keep_empty=False)
    assert ds2.image_ids == [10, 7]


def test_degenerate_dropped_clipped_and_gray_to_rgb(coco_dir):
    ds = CocoDetection(coco_dir / "instances.json")
    image, target = ds[2]
    assert image.shape == (3, 50, 50)
    gray = torch.from_numpy(_rgb(50, 50, 2)[..., 0])
    assert all(torch.equal(image[c], gray) for c in range(3))
    # Zero-width box dropped; [40,-5,60,10] clipped to the 50x50 image; box outside the image dropped.
    torch.testing.assert_close(target["boxes"], torch.tensor([[40.0, 0.0, 50.0, 10.0]]))
    assert target["labels"].tolist() == [1]


def test_image_root_resolution(coco_dir, tmp_path_factory):
    # Default: JSON folder, then JSON folder/images (used above). Explicit root:
    elsewhere = tmp_path_factory.mktemp("ann")
    (elsewhere / "instances.json").write_text((coco_dir / "instances.json").read_text())
    ds = CocoDetection(elsewhere / "instances.json", image_root=coco_dir / "images")
    assert ds[0][0].shape == (3, 40, 60)
    ds_missing = CocoDetection(elsewhere / "instances.json")
    with pytest.raises(FileNotFoundError, match="a.png"):
        ds_missing.image_path(0)
    assert ds_missing[0] is None  # training policy: an unreadable image is skipped, not fatal


def test_official_coco_layout_needs_no_image_root(tmp_path):
    """coco/annotations/instances_{train,val}2017.json with coco/{train,val}2017/: found as unpacked, and with
    image_root=coco for both JSONs; check-data resolves the same files."""
    from multibox.data.validate import check_coco

    from _data_builders import make_clean_coco

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split, seed in (("train2017", 0), ("val2017", 1)):
        made = make_clean_coco(tmp_path / split, num_images=2, seed=seed, images_dir=split)
        (tmp_path / split / split).rename(coco / split)
        made.rename(coco / "annotations" / f"instances_{split}.json")
    for split in ("train2017", "val2017"):
        ann = coco / "annotations" / f"instances_{split}.json"
        for root in (None, coco):
            ds = CocoDetection(ann, image_root=root)
            assert ds.image_path(0) == coco / split / "img_000.jpg" and ds[0] is not None
        assert check_coco(ann).num_errors == 0
    other = coco / "annotations" / "mine.json"   # not COCO's naming: no split folder is guessed
    other.write_text((coco / "annotations" / "instances_val2017.json").read_text())
    with pytest.raises(FileNotFoundError, match="img_000.jpg"):
        CocoDetection(other).image_path(0)
    assert check_coco(other).num_errors > 0


def test_exif_orientation_applied(tmp_path):
    arr = _rgb(20, 30, 4)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    decoded = read_image_rgb(tmp_path / "rot.jpg")
    with Image.open(tmp_path / "rot.jpg") as im:
        ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert decoded.shape == (3, 30, 20)
    # Same orientation as PIL's reference (JPEG decoders may differ by a few levels).
    diff = (decoded.permute(1, 2, 0).int() - torch.from_numpy(ref.copy()).int()).abs().float().mean()
    assert diff < 3.0


def test_pil_fallback_for_formats_torchvision_cannot_decode(tmp_path):
    arr = _rgb(9, 7, 5)
    Image.fromarray(arr).save(tmp_path / "x.bmp")
    assert torch.equal(read_image_rgb(tmp_path / "x.bmp"), torch.from_numpy(arr).permute(2, 0, 1))


def test_transform_and_collate(coco_dir):
    def to_square(image, target):
        return torch.zeros(3, 8, 8), {**target, "seen": True}

    ds = CocoDetection(coco_dir / "instances.json", transform=to_square)
    images, targets = collate_detection([ds[0], ds[1]])
    assert images.shape == (2, 3, 8, 8)
    assert [t["image_id"] for t in targets] == [10, 3] and all(t["seen"] for t in targets)

    raw = CocoDetection(coco_dir / "instances.json")
    with pytest.raises(ValueError, match="equal image shapes"):
        collate_detection([raw[0], raw[1]])
