"""Sliced inference (:mod:`multibox.inference.tiling`, ``multibox predict --tile``).

The merging is checked against a detector whose behaviour is known exactly: :class:`BlobDetector` sees its input
the way an SSD does, resized to 300x300, and finds a coloured square only where it is at least
:data:`MIN_BLOB_PX` pixels wide there; it then measures the square's box at full resolution (exact to the
pixel). In a 1920x1080 image a 16 px square is 2.5x4.4 px at 300x300 (missed); in a 640 px tile it is 7.5 px
(found). The real models (PyTorch and ONNX, images and a video) are checked to go through the same path, against
:class:`TiledDetector` called directly.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multibox.cli import main
from multibox.errors import InputError
from multibox.inference.detector import as_uint8_chw, load
from multibox.inference.predict import run_predict
from multibox.inference.tiling import TiledDetector, tile_hw, tile_windows_xyxy

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_checkpoint_v1"
NET_SIZE, MIN_BLOB_PX = 300, 5
BACKGROUND, RED, YELLOW = (60, 60, 60), (220, 40, 40), (220, 220, 40)


def components_xyxy(mask: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(H, W) bool -> 8-connected components as (x0, y0, x1, y1), x1 and y1 exclusive (label propagation by
    max-pooling until nothing changes)."""
    h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w) * mask
    while True:
        grown = F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0] * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    boxes = []
    for value in labels.unique():
        if value > 0:
            ys, xs = torch.nonzero(labels == value, as_tuple=True)
            boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return boxes


class BlobDetector:
    """Class 1 = red channel high, class 2 = green channel high (a yellow square is both). Score = 0.5 + the blob's
    full-resolution width / 100: bigger squares score higher. Records the number of images of each call."""

    def __init__(self, nms_threshold: float = 0.5, max_per_image: int | None = None, image_size=None):
        self.cfg = SimpleNamespace(eval=SimpleNamespace(nms_threshold=nms_threshold, max_per_image=max_per_image))
        if image_size is not None:   # the model's input; without it the tiles are square
            self.cfg.model = SimpleNamespace(image_size=image_size)
        self.class_names = ["background", "red", "green"]
        self.category_ids = [1, 2]
        self.score_threshold = 0.1
        self.label_to_category_id = {1: 1, 2: 2}
        self.calls: list[int] = []
        self.shapes: list[tuple[int, int]] = []

    def predict(self, images, score=None, *, batch_size=16, max_det=None):
        images = [images] if isinstance(images, torch.Tensor) and images.ndim == 3 else list(images)
        self.calls.append(len(images))
        self.shapes += [tuple(image.shape[-2:]) for image in images]
        return [self._detect(as_uint8_chw(image)) for image in images]

    def _detect(self, image: torch.Tensor) -> dict:
        h, w = image.shape[-2:]
        small = F.interpolate(image[None].float(), size=(NET_SIZE, NET_SIZE), mode="bilinear", antialias=True)[0]
        boxes, scores, labels = [], [], []
        for label, channel in ((1, 0), (2, 1)):
            full_mask = image[channel] > 140
            for x0, y0, x1, y1 in components_xyxy(small[channel] > 140):
                if min(x1 - x0, y1 - y0) < MIN_BLOB_PX:
                    continue
                # the blob's full-resolution pixels, in its region grown by a network pixel
                fx0, fy0 = max(0, int((x0 - 1) * w / NET_SIZE)), max(0, int((y0 - 1) * h / NET_SIZE))
                fx1, fy1 = min(w, int((x1 + 1) * w / NET_SIZE) + 1), min(h, int((y1 + 1) * h / NET_SIZE) + 1)
                ys, xs = torch.nonzero(full_mask[fy0:fy1, fx0:fx1], as_tuple=True)
                box = [fx0 + xs.min(), fy0 + ys.min(), fx0 + xs.max() + 1, fy0 + ys.max() + 1]
                boxes.append(torch.stack(box).float())
                scores.append(0.5 + float(box[2] - box[0]) / 100)
                labels.append(label)
        return {"boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4), "scores": torch.tensor(scores),
                "labels": torch.tensor(labels, dtype=torch.int64)}


def scene(width: int, height: int, squares: list[tuple[int, int, int, tuple]]) -> torch.Tensor:
    """(3, H, W) uint8: plain background with squares (x, y, side, colour) -> truth boxes are (x, y, x+s, y+s)."""
    image = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1).repeat(1, height, width)
    for x, y, side, colour in squares:
        image[:, y:y + side, x:x + side] = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1)
    return image


def small_squares(count: int = 20, seed: int = 0) -> list[tuple[int, int, int, tuple]]:
    """``count`` red squares of 12-20 px at random places in 1920x1080, 40 px apart and clear of the big one."""
    rng = np.random.default_rng(seed)
    placed: list[tuple[int, int, int, tuple]] = []
    while len(placed) < count:
        x, y, side = int(rng.integers(0, 1900)), int(rng.integers(0, 1060)), int(rng.integers(12, 21))
        x, y = min(x, 1920 - side), min(y, 1080 - side)
        clear = all(abs(x - px) > 40 or abs(y - py) > 40 for px, py, *_ in placed)
        if clear and not (400 < x < 760 and 450 < y < 750):
            placed.append((x, y, side, RED))
    return placed


BIG = (450, 500, 260, RED)   # 260 px: cut by the inner borders x=512, x=640, y=640 in every tile that holds it


def truth_xyxy(squares) -> torch.Tensor:
    return torch.tensor([[x, y, x + s, y + s] for x, y, s, _ in squares], dtype=torch.float32)


def matched(pred_xyxy: torch.Tensor, truth: torch.Tensor, tol: float = 1.0) -> int:
    """How many truth boxes have a predicted box with every edge within ``tol`` px."""
    if len(pred_xyxy) == 0:
        return 0
    close = ((pred_xyxy[None] - truth[:, None]).abs().amax(-1) <= tol)
    return int(close.any(1).sum())


# ---- the grid ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height, width, tile, overlap, xs, ys", [
    (1080, 1920, 640, 0.2, [0, 512, 1024, 1280], [0, 440]),     # stride 512, last aligned to the edge
    (600, 1000, 640, 0.5, [0, 320, 360], [0]),                  # height clipped: tiles 640x600
    (1280, 1280, 640, 0.0, [0, 640], [0, 640]),                 # exact fit: no extra edge tile
    (1281, 1281, 640, 0.0, [0, 640, 641], [0, 640, 641]),
    (640, 640, 640, 0.2, [0], [0]),                              # no larger than a tile: the image itself
    (300, 500, 640, 0.2, [0], [0]),
])
def test_tile_grid_by_hand(height, width, tile, overlap, xs, ys):
    windows = tile_windows_xyxy(height, width, tile, overlap)
    assert windows == [(x, y, min(x + tile, width), min(y + tile, height)) for y in ys for x in xs]


@pytest.mark.parametrize("height, width, tile, overlap", [(1080, 1920, 640, 0.2), (777, 2049, 256, 0.35),
                                                          (513, 4000, 512, 0.0), (100, 3000, 64, 0.9)])
def test_tile_grid_covers_every_pixel_once_per_window(height, width, tile, overlap):
    windows = tile_windows_xyxy(height, width, tile, overlap)
    assert len(set(windows)) == len(windows)
    cover = torch.zeros(height, width, dtype=torch.int32)
    for x0, y0, x1, y1 in windows:
        assert (x1 - x0, y1 - y0) == (min(tile, width), min(tile, height))
        assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    stride = int(tile * (1 - overlap))
    starts = sorted({x0 for x0, *_ in windows})
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("tile, input_hw, expected", [
    (640, None, (640, 640)), (640, (300, 300), (640, 640)),
    (640, (320, 544), (376, 640)),       # 640 * 320 / 544 = 376.5
    (640, (544, 320), (640, 376)),       # tall
    (40, (100, 1000), (32, 40)),         # never below MIN_TILE
])
def test_tiles_take_the_shape_of_the_models_input(tile, input_hw, expected):
    assert tile_hw(tile, input_hw) == expected


def test_tile_grid_of_wide_tiles_by_hand():
    # 376x640 tiles, overlap 0.2: strides 300 down and 512 across, the last row and column at the edges
    windows = tile_windows_xyxy(1080, 1920, (376, 640), 0.2)
    assert windows == [(x, y, x + 640, y + 376) for y in (0, 300, 600, 704) for x in (0, 512, 1024, 1280)]


def test_a_wide_model_is_given_wide_tiles(big_scene):
    image, small_truth, big_truth = big_scene
    detector = BlobDetector(image_size=[320, 544])
    tiled = TiledDetector(detector, tile=640, overlap=0.2).predict(image)[0]
    assert detector.shapes == [(1080, 1920)] + [(376, 640)] * 16        # the whole image, then 4 x 4 tiles
    assert matched(tiled["boxes"], small_truth) == 20 and matched(tiled["boxes"], big_truth) == 1
    assert len(tiled["boxes"]) == 21


@pytest.mark.parametrize("tile, overlap", [(16, 0.2), (0, 0.2), (-640, 0.2), (640.0, 0.2), (True, 0.2),
                                           (640, -0.1), (640, 1.0), (640, 1.5)])
def test_bad_tile_or_overlap_is_an_input_error(tile, overlap):
    with pytest.raises(InputError, match="tile"):
        TiledDetector(BlobDetector(), tile, overlap)


# ---- merging, against the blob detector --------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_scene():
    squares = small_squares()
    return scene(1920, 1080, squares + [BIG]), truth_xyxy(squares), truth_xyxy([BIG])


def test_tiles_find_the_small_objects_that_the_whole_image_misses(big_scene):
    image, small_truth, big_truth = big_scene
    detector = BlobDetector()
    whole = detector.predict(image)[0]
    assert matched(whole["boxes"], small_truth) == 0                     # 0 of 20 at 300x300
    assert len(whole["boxes"]) == 1 and matched(whole["boxes"], big_truth) == 1
    detector.calls.clear()
    tiled = TiledDetector(detector, tile=640, overlap=0.2).predict(image)[0]
    assert detector.calls == [1 + 8]                                     # the whole image and 8 tiles, one call
    assert (tiled["labels"] == 1).all()
    assert matched(tiled["boxes"], small_truth) == 20                    # 20 of 20, every edge within 1 px
    assert matched(tiled["boxes"], big_truth) == 1
    assert len(tiled["boxes"]) == 21                                     # nothing else: no duplicates, no halves
    assert torch.all(tiled["scores"][:-1] >= tiled["scores"][1:])


def test_boxes_cut_by_inner_tile_borders_would_be_duplicates(big_scene):
    """Keeping the tiles' boxes at inner borders (margin < 0 keeps all) adds the big square's cut parts."""
    image, small_truth, big_truth = big_scene
    kept = TiledDetector(BlobDetector(), tile=640, overlap=0.2, border_margin=-1).predict(image)[0]
    assert len(kept["boxes"]) > 21
    assert matched(kept["boxes"], small_truth) == 20


def test_duplicates_in_overlapping_tiles_merge_to_one_box_per_class():
    # a yellow square (both classes) where four tiles overlap: x 512..640 and y 440..640
    square = (560, 500, 18, YELLOW)
    image, truth = scene(1920, 1080, [square]), truth_xyxy([square])
    detector = BlobDetector()
    windows = tile_windows_xyxy(1080, 1920, 640, 0.2)
    per_tile = [detector.predict(image[:, y0:y1, x0:x1])[0] for x0, y0, x1, y1 in windows]
    assert sum(len(det["boxes"]) for det in per_tile) == 4 * 2           # found in 4 tiles, as 2 classes each
    merged = TiledDetector(detector, tile=640, overlap=0.2).predict(image)[0]
    assert sorted(merged["labels"].tolist()) == [1, 2]                   # class-wise: one box per class
    assert matched(merged["boxes"][merged["labels"] == 1], truth) == 1
    assert matched(merged["boxes"][merged["labels"] == 2], truth) == 1


def test_image_no_larger_than_a_tile_is_the_detectors_own_result():
    image = scene(600, 400, [(100, 100, 30, RED), (300, 200, 18, YELLOW)])
    detector = BlobDetector()
    own = detector.predict(image)[0]
    detector.calls.clear()
    tiled = TiledDetector(detector, tile=640).predict([image, image])
    assert detector.calls == [2]                                         # no tiles
    for det in tiled:
        assert det.keys() == own.keys() and all(torch.equal(det[k], own[k]) for k in own)
    assert len(own["boxes"]) == 3


def test_max_det_keeps_the_best_scores(big_scene):
    image, *_ = big_scene
    everything = TiledDetector(BlobDetector()).predict(image)[0]
    capped = TiledDetector(BlobDetector()).predict(image, max_det=5)[0]
    assert torch.equal(capped["scores"], everything["scores"][:5])
    own_cap = TiledDetector(BlobDetector(max_per_image=7)).predict(image)[0]   # the model's eval.max_per_image
    assert len(own_cap["scores"]) == 7


def test_attributes_are_the_detectors_and_tiles_are_logged_once(big_scene, caplog):
    detector = BlobDetector()
    tiled = TiledDetector(detector, tile=640, overlap=0.2)
    assert tiled.class_names is detector.class_names and tiled.cfg is detector.cfg
    assert tiled.label_to_category_id == {1: 1, 2: 2} and tiled.score_threshold == 0.1
    with caplog.at_level(logging.INFO, logger="multibox.inference.tiling"):
        tiled.predict([big_scene[0]] * 2)
        tiled.predict(big_scene[0])
    lines = [r.getMessage() for r in caplog.records if r.name == "multibox.inference.tiling"]
    assert lines == ["1920x1080 images: the whole image and 8 tiles of 640 px (overlap 0.2)"]
    wide = TiledDetector(BlobDetector(image_size=[320, 544]), tile=640, overlap=0.2)
    with caplog.at_level(logging.INFO, logger="multibox.inference.tiling"):
        wide.predict(big_scene[0])
    assert caplog.records[-1].getMessage() == \
        "1920x1080 images: the whole image and 16 tiles of 640x376 px (overlap 0.2)"


# ---- the real models: run_predict, the CLI, ONNX, a video --------------------------------------------------

TILE = 64   # on 160x120 inputs: x starts 0, 51, 96 and y starts 0, 51, 56: 9 tiles


def real_image() -> torch.Tensor:
    from multibox.data.coco import read_image_rgb
    image = read_image_rgb(FIXTURE / "image.png")
    return F.interpolate(image[None].float(), size=(120, 160), mode="bilinear")[0].round().byte()


@pytest.fixture(scope="module")
def torch_detector():
    return load(FIXTURE / "best.pt", device="cpu")


def test_real_model_tiled_differs_from_whole_and_keeps_its_limits(torch_detector):
    image = real_image()
    assert len(tile_windows_xyxy(120, 160, TILE, 0.2)) == 9
    whole = torch_detector.predict(image, score=0.2)[0]
    tiled = TiledDetector(torch_detector, tile=TILE).predict(image, score=0.2)[0]
    assert len(tiled["boxes"]) > 0 and not torch.equal(tiled["boxes"], whole["boxes"])
    assert (tiled["scores"] > 0.2).all() and len(tiled["scores"]) <= torch_detector.cfg.eval.max_per_image
    assert (tiled["boxes"][:, 2:] <= torch.tensor([160, 120])).all() and (tiled["boxes"] >= 0).all()


def test_cli_predict_tile_writes_the_tiled_detections(torch_detector, tmp_path, capsys):
    from PIL import Image
    image = real_image()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "a.png")
    assert main(["predict", "--checkpoint", str(FIXTURE / "best.pt"), str(tmp_path / "a.png"), "--out",
                 str(tmp_path / "out"), "--tile", str(TILE), "--tile-overlap", "0.2", "--no-draw",
                 "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    expected = TiledDetector(torch_detector, tile=TILE).predict(image, score=0.3)[0]
    whole = torch_detector.predict(image, score=0.3)[0]
    assert len(results) == len(expected["scores"]) > 0 and len(expected["scores"]) != len(whole["scores"])
    assert set(results[0]) == {"image_id", "bbox", "score", "category_id", "category_name", "file"}
    boxes_xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in results)])
    np.testing.assert_allclose(boxes_xyxy, expected["boxes"].numpy(), atol=0.02)
    np.testing.assert_allclose([r["score"] for r in results], expected["scores"].numpy(), atol=1e-4)
    capsys.readouterr()
    for bad in (["--tile", "16"], ["--tile", str(TILE), "--tile-overlap", "1"]):
        assert main(["predict", "--checkpoint", str(FIXTURE / "best.pt"), str(tmp_path / "a.png"), "--out",
                     str(tmp_path / "bad"), "--device", "cpu", *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: tile")


def test_video_frames_go_through_the_tiles(torch_detector, tmp_path):
    pytest.importorskip("av", reason="video support needs PyAV")
    from multibox.inference.video import VideoWriter, read_frames
    base = real_image()
    with VideoWriter(tmp_path / "clip.mp4", 5, 160, 120) as writer:
        for t in range(3):
            writer.write(torch.roll(base, shifts=8 * t, dims=2))
    frames = [frame for _, _, frame in read_frames(tmp_path / "clip.mp4")]
    summary = run_predict(torch_detector, [tmp_path / "clip.mp4"], tmp_path / "out", draw=False, progress=False,
                          tile=TILE, tile_overlap=0.2)
    assert summary["frames"] == 3
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    expected = TiledDetector(torch_detector, tile=TILE).predict(frames, score=0.3)
    whole = torch_detector.predict(frames, score=0.3)
    assert [len(d["scores"]) for d in expected] != [len(d["scores"]) for d in whole]
    for index, det in enumerate(expected):
        got = [r for r in results if r["frame"] == index]
        assert len(got) == len(det["scores"])
        np.testing.assert_allclose([r["score"] for r in got], det["scores"].numpy(), atol=1e-4)


def test_onnx_backend_tiles_like_torch(torch_detector, tmp_path):
    pytest.importorskip("onnxruntime")
    from multibox.export.onnx import export_checkpoint
    from multibox.inference.onnx import OnnxDetector
    path = export_checkpoint(FIXTURE / "best.pt", tmp_path / "tiny.onnx", exporter="torchscript", check=False)
    image = real_image()
    expected = TiledDetector(torch_detector, tile=TILE).predict(image, score=0.2)[0]
    got = TiledDetector(OnnxDetector(path, runtime="onnxruntime"), tile=TILE).predict(image, score=0.2)[0]
    assert len(got["scores"]) == len(expected["scores"]) > 0
    torch.testing.assert_close(got["scores"], expected["scores"], rtol=0, atol=1e-4)
    torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=0, atol=1e-2)
    assert torch.equal(got["labels"], expected["labels"])
