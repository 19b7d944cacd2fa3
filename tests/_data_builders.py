"""Small COCO / VOC datasets built on the fly, clean or with one instance of every problem class.

Used by test_validate.py, test_voc.py, test_shards.py, test_data_roundtrip.py; :func:`train_quick_tiny` by the
exported-model tests (through conftest's ``quick_tiny`` fixture). Images are tiny random-noise
pictures with a bright rectangle per object (enough to train a few steps on). Also the transform tests' random
boxes and mask extents, and a file that fails part-way through a write (checkpoint tests).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# category ids deliberately non-contiguous and unsorted
CATEGORIES = [{"id": 17, "name": "dog", "supercategory": "animal"},
              {"id": 3, "name": "car", "supercategory": "vehicle"},
              {"id": 44, "name": "bottle", "supercategory": "kitchen"}]


def picture(h: int, w: int, seed: int, boxes_xyxy=()) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = (rng.integers(0, 80, size=(h, w, 3))).astype(np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes_xyxy):
        arr[int(y1):int(math.ceil(y2)), int(x1):int(math.ceil(x2))] = (200 + 20 * k) % 256, 255 - 40 * k, 60 * k
    return arr


def make_clean_coco(root: Path, num_images: int = 8, size: tuple[int, int] = (48, 64), seed: int = 0,
                    images_dir: str = "images") -> Path:
    """A valid COCO set: ``num_images`` JPEGs with 1-3 boxes each, one image without boxes, one crowd box."""
    root.mkdir(parents=True, exist_ok=True)
    (root / images_dir).mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    h, w = size
    for i in range(num_images):
        boxes = []
        if i != 1:   # image index 1 has no boxes: a background sample
            for _ in range(int(rng.integers(1, 4))):
                bw, bh = float(rng.uniform(8, w / 2)), float(rng.uniform(8, h / 2))
                x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
                boxes.append((round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)))
        name = f"img_{i:03d}.jpg"
        Image.fromarray(picture(h, w, seed * 100 + i, [(x, y, x + bw, y + bh) for x, y, bw, bh in boxes])).save(
            root / images_dir / name, quality=92)
        image_id = 1000 + 7 * i
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for k, (x, y, bw, bh) in enumerate(boxes):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CATEGORIES[k % 3]["id"],
                         "bbox": [x, y, bw, bh], "area": round(bw * bh * 0.8, 3), "iscrowd": 0})
    anns[0]["iscrowd"] = 1
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path


def make_broken_coco(root: Path) -> tuple[Path, dict]:
    """A COCO set with one instance of every problem class ``check-data`` knows about.

    Returns (annotation path, expected) where expected maps problem kind -> (file name, annotation id or None).
    """
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    h, w = 40, 60
    ok = picture(h, w, 1, [(5, 5, 30, 30)])
    images, anns, expected = [], [], {}

    def add_image(image_id: int, name: str, width: int = w, height: int = h) -> None:
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})

    def add_ann(ann_id, image_id, bbox, cat=17, **extra) -> None:
        anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": 100.0,
                     "iscrowd": 0, **extra})

    # good images (so training has something to learn from)
    for i in range(4):
        Image.fromarray(picture(h, w, 10 + i, [(5, 5, 30, 30)])).save(images_dir / f"good{i}.jpg")
        add_image(i + 1, f"good{i}.jpg")
        add_ann(i + 1, i + 1, [5, 5, 25, 25], cat=[17, 3, 44, 17][i])
    # image problems
    add_image(10, "missing.jpg")
    expected["missing_image"] = ("missing.jpg", None)
    Image.fromarray(ok).save(images_dir / "full.jpg", quality=95)
    data = (images_dir / "full.jpg").read_bytes()
    (images_dir / "truncated.jpg").write_bytes(data[: len(data) // 2])
    add_image(11, "truncated.jpg")
    expected["truncated_image"] = ("truncated.jpg", None)
    (images_dir / "garbage.jpg").write_bytes(b"this is not an image at all")
    add_image(12, "garbage.jpg")
    expected["unreadable_image"] = ("garbage.jpg", None)
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90 degrees clockwise to display
    Image.fromarray(picture(w, h, 3)).save(images_dir / "rotated.jpg", exif=exif.tobytes())   # stored 40x60 (WxH)
    add_image(13, "rotated.jpg", width=w, height=h)   # displayed 60x40
    expected["exif_rotated"] = ("rotated.jpg", None)
    Image.fromarray(ok[..., 0]).save(images_dir / "gray.png")
    add_image(14, "gray.png")
    expected["grayscale_image"] = ("gray.png", None)
    Image.fromarray(ok).convert("RGBA").save(images_dir / "rgba.png")
    add_image(15, "rgba.png")
    expected["rgba_image"] = ("rgba.png", None)
    Image.fromarray(ok).convert("CMYK").save(images_dir / "cmyk.jpg")
    add_image(16, "cmyk.jpg")
    expected["cmyk_image"] = ("cmyk.jpg", None)
    Image.fromarray((ok[..., 1].astype(np.uint16) * 257)).save(images_dir / "deep.png")   # mode I;16
    add_image(17, "deep.png")
    expected["16bit_image"] = ("deep.png", None)
    Image.fromarray(ok).convert("P").save(images_dir / "palette.png")
    add_image(18, "palette.png")
    expected["palette_image"] = ("palette.png", None)
    Image.fromarray(ok).save(images_dir / "small.jpg")
    add_image(19, "small.jpg", width=80, height=50)   # annotation says 80x50, file is 60x40
    expected["size_mismatch"] = ("small.jpg", None)
    (images_dir / "empty.jpg").write_bytes(b"")
    add_image(20, "empty.jpg")
    expected["unreadable_image_empty"] = ("empty.jpg", None)
    # annotation problems (on good images)
    add_ann(101, 1, [10, 10, 0, 5])
    expected["zero_size_box"] = ("good0.jpg", 101)
    add_ann(102, 1, [30, 10, -8, 5])
    expected["negative_box"] = ("good0.jpg", 102)
    add_ann(103, 2, [float("nan"), 3, 4, 5])
    expected["nan_box"] = ("good1.jpg", 103)
    add_ann(104, 2, [50, 30, 20, 20])
    expected["out_of_image_box"] = ("good1.jpg", 104)
    add_ann(105, 3, [1, 1, 5, 5], cat=999)
    expected["unknown_category_id"] = ("good2.jpg", 105)
    add_ann(106, 3, [2, 2, 6, 6])
    add_ann(106, 4, [3, 3, 6, 6])
    expected["duplicate_annotation_id"] = ("annotations.json", 106)
    add_ann(107, 77, [1, 1, 5, 5])
    expected["unknown_image_id"] = ("annotations.json", 107)
    images.append({"id": 4, "file_name": "good0.jpg", "width": w, "height": h})   # duplicate image id
    expected["duplicate_image_id"] = ("good0.jpg", None)
    # boxes on the odd images too, so they matter in training
    for image_id in range(10, 20):
        add_ann(200 + image_id, image_id, [4, 4, 20, 20], cat=3)
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))  # NaN literal
    return path, expected


VOC_XML = """<annotation>
  <folder>VOC2007</folder><filename>{stem}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>
"""
VOC_OBJ = """  <object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{difficult}</difficult>
    <bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>
"""


def make_voc(root: Path, objects_per_image: dict[str, list[tuple]], splits: dict[str, list[str]],
             size: tuple[int, int] = (40, 60)) -> Path:
    """VOCdevkit/VOC2007 under ``root``; objects: stem -> [(name, xmin, ymin, xmax, ymax, difficult)]."""
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    h, w = size
    for i, (stem, objs) in enumerate(objects_per_image.items()):
        Image.fromarray(picture(h, w, 50 + i, [(o[1] - 1, o[2] - 1, o[3], o[4]) for o in objs])).save(
            voc / "JPEGImages" / f"{stem}.jpg", quality=92)
        body = "".join(VOC_OBJ.format(name=o[0], xmin=o[1], ymin=o[2], xmax=o[3], ymax=o[4], difficult=int(o[5]))
                       for o in objs)
        (voc / "Annotations" / f"{stem}.xml").write_text(VOC_XML.format(stem=stem, w=w, h=h, objects=body))
    for split, stems in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return voc


def scene_uint8(height: int, width: int, seed: int) -> torch.Tensor:
    """A natural-ish uint8 image: smooth gradients plus a few flat rectangles (sharp edges)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    img = torch.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)]).float()
    for _ in range(4):
        x1 = int(torch.randint(0, width - 40, (1,), generator=g))
        y1 = int(torch.randint(0, height - 40, (1,), generator=g))
        img[:, y1:y1 + 30 + x1 % 50, x1:x1 + 30 + y1 % 50] = torch.randint(0, 256, (3, 1, 1), generator=g).float()
    return img.to(torch.uint8)


def random_boxes_xyxy(width: int, height: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n integer boxes, at least 6 px a side, inside a width x height image."""
    x1 = torch.randint(0, width - 8, (n,), generator=g)
    y1 = torch.randint(0, height - 8, (n,), generator=g)
    x2 = torch.minimum(x1 + 6 + torch.randint(0, width // 2, (n,), generator=g), torch.tensor(width))
    y2 = torch.minimum(y1 + 6 + torch.randint(0, height // 2, (n,), generator=g), torch.tensor(height))
    return torch.stack([x1, y1, x2, y2], 1).float()


def mask_extent(mask: torch.Tensor) -> torch.Tensor:
    """The xyxy bounding box of an (H, W) boolean mask, in [0, 1] units of each axis."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    h, w = mask.shape
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32) / \
        torch.tensor([w, h, w, h], dtype=torch.float32)


def check_boxes_as_masks(transform, boxes_xyxy: torch.Tensor, target: dict, out: dict, params: dict,
                         image_hw: tuple[int, int], tol: float) -> int:
    """Draw each source box (``boxes_xyxy``, label k = row k - 1) as a white mask on an ``image_hw`` image and push
    it through ``transform`` with ``params``: the mask's extent in the output must be the box ``out`` gives that
    label, within ``tol`` in [0, 1] units. Returns how many boxes were checked."""
    height, width = image_hw
    for box, label in zip(out["boxes"], out["labels"]):
        bx = boxes_xyxy[label - 1].int().tolist()
        mask = torch.zeros(3, height, width, dtype=torch.uint8)
        mask[:, bx[1]:bx[3], bx[0]:bx[2]] = 255
        m, _ = transform.apply(mask, target, params)
        assert (mask_extent(m[0] > 127.5) - box).abs().max() <= tol, (params, box)
    return len(out["boxes"])


class FailingFile:
    """A file that accepts ``limit`` bytes, then fails the way a full disk (or an interrupt) does."""

    def __init__(self, real, limit, error):
        self.real, self.limit, self.error = real, limit, error

    def write(self, data):
        data = bytes(data)
        room = max(0, self.limit - self.real.tell())
        self.real.write(data[:room])
        if len(data) > room:
            raise self.error
        return len(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


# A narrow tiny model on easy synthetic data (large objects, two classes): a few seconds of training give
# confident detections (AP well above 0), which comparisons of exported and quantized models need.
QUICK_TINY_TRAIN = ["model.widths=[16, 32, 48, 64, 64, 64, 64, 64]", "data.num_workers=0", "train.epochs=20",
                    "train.batch_size=4", "train.threads=1", "train.log_every=100", "train.checkpoint_every=0",
                    "data.val_fraction=0.25", "data.crop_rule=none", "data.flip_p=0", "data.jitter=[0, 0, 0]",
                    "train.lr=0.005", "train.lr_init=0.0005", "train.warmup_epochs=2", "train.weight_decay=0",
                    "eval.batch_size=8"]


def train_quick_tiny(root: Path) -> tuple[Path, Path]:
    """(annotations.json, best.pt) of a tiny model trained on 24 synthetic images (6 held out) under ``root``."""
    from multibox.cli import main

    ann = root / "data" / "annotations.json"
    assert main(["synth", "--out", str(ann.parent), "--num-images", "24", "--seed", "11", "--classes", "2",
                 "--objects", "1-2", "--sizes", "0.3-0.7", "--side", "160-200"]) == 0
    args = ["train", "--data", str(ann), "--out", str(root / "run"), "--no-progress"]
    for item in QUICK_TINY_TRAIN:
        args += ["--set", item]
    assert main(args) == 0
    return ann, root / "run" / "best.pt"
