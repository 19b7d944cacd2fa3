"""``multibox predict`` on videos, folders and images, with the torch and onnxruntime backends.

The reference for the per-frame detections is independent of the prediction code: the test decodes the input
video itself and runs :meth:`multibox.inference.detector.Detector.predict` on every frame.
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

av = pytest.importorskip("av", reason="video support needs PyAV (pip install 'multibox[video]')")

from multibox.inference.detector import load  # noqa: E402
from multibox.checkpoint import save_checkpoint  # noqa: E402
from multibox.config import load_config  # noqa: E402
from multibox.models import build_model  # noqa: E402
from multibox.cli import main  # noqa: E402
from multibox.evaluation.visualize import draw_detections  # noqa: E402
from multibox.inference.predict import collect_inputs, run_predict  # noqa: E402
from multibox.inference.video import VideoWriter, read_frames, video_info  # noqa: E402

NUM_FRAMES, FPS, WIDTH, HEIGHT = 12, 6, 160, 120
CLASS_NAMES = ["background", "disc", "block"]
SCORE = 0.7


def shapes_frame(t: int, width: int = WIDTH, height: int = HEIGHT) -> torch.Tensor:
    """A gradient background with a red disc moving right and a blue block moving down, at time step ``t``."""
    xs = np.linspace(40, 200, width, dtype=np.float32)
    background = np.stack([np.tile(xs, (height, 1)), np.full((height, width), 90.0, np.float32),
                           np.tile(xs[::-1], (height, 1))], axis=-1).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    x = 10 + 8 * t
    draw.ellipse([x, 30, x + 40, 70], fill=(220, 30, 30))
    y = 5 + 6 * t
    draw.rectangle([100, y, 140, y + 30], fill=(30, 40, 220))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.num_classes=2", f"eval.score_threshold={SCORE}", "eval.max_per_image=20"])
    model = build_model(cfg).eval()
    with torch.no_grad():   # random weights: spread the class logits so that some boxes score above SCORE
        for head in model.cls_heads:
            head.weight.mul_(3.0)
            head.bias.view(-1, 3)[:, 1:] = -2.0
    ckpt = root / "model.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "class_names": CLASS_NAMES}, ckpt)
    video = root / "inputs" / "clip.mp4"
    frames = [shapes_frame(t) for t in range(NUM_FRAMES)]
    with VideoWriter(video, FPS, WIDTH, HEIGHT) as writer:
        for frame in frames:
            writer.write(frame)
    folder = root / "inputs" / "stills"
    folder.mkdir()
    for t in (0, 5):
        Image.fromarray(shapes_frame(t, 150, 110).permute(1, 2, 0).numpy()).save(folder / f"still_{t}.png")
    return dict(root=root, ckpt=ckpt, video=video, folder=folder, cfg=cfg)


def by_image(detections: list[dict]) -> dict:
    grouped = defaultdict(list)
    for d in detections:
        grouped[(d.get("video"), d["image_id"])].append(d)
    return grouped


def assert_matches(results: list[dict], det: dict, tol: float = 0.02) -> None:
    """COCO result dicts of one image vs a Detector output dict: same count, and a one-to-one pairing with equal
    class, score within 1e-4 and bbox within ``tol`` px (the file rounds bbox to 2 decimals, score to 5)."""
    assert len(results) == len(det["scores"])
    ltwh = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in det["boxes"].tolist()]
    compatible = np.array([[r["category_id"] == label and r["category_name"] == CLASS_NAMES[label]
                            and abs(r["score"] - score) <= 1e-4 and np.abs(np.subtract(r["bbox"], box)).max() <= tol
                            for box, score, label in zip(ltwh, det["scores"].tolist(), det["labels"].tolist())]
                           for r in results]).reshape(len(results), len(ltwh))
    assert perfect_matching(compatible)


def test_video_frames_and_per_frame_detections(setup, tmp_path):
    out = tmp_path / "out"
    detector = load(setup["ckpt"], device="cpu")
    summary = run_predict(detector, [setup["video"]], out, batch_size=5, progress=False)
    assert summary["frames"] == NUM_FRAMES and summary["images"] == 0 and summary["images_per_second"] > 0

    # The annotated video: every frame, same size and rate.
    annotated = out / "videos" / "clip.mp4"
    info = video_info(annotated)
    assert (info.width, info.height, info.fps) == (WIDTH, HEIGHT, FPS)
    out_frames = [frame for _, _, frame in read_frames(annotated)]
    assert len(out_frames) == NUM_FRAMES

    # Per-frame detections against the Detector run on the decoded input frames.
    in_frames = [frame for _, _, frame in read_frames(setup["video"])]
    expected = load(setup["ckpt"], device="cpu").predict(in_frames)
    grouped = by_image(json.loads((out / "detections.json").read_text()))
    assert set(grouped) <= {("clip.mp4", f"clip.mp4#{i}") for i in range(NUM_FRAMES)}
    assert sum(len(e["scores"]) for e in expected) > NUM_FRAMES, "test model gives too few detections"
    for index, det in enumerate(expected):
        results = grouped.get(("clip.mp4", f"clip.mp4#{index}"), [])
        assert_matches(results, det)
        for r in results:
            assert r["time"] == pytest.approx(index / FPS, abs=1e-3) and r["frame"] == index

    # The detections are drawn: the output frame is the input frame with them drawn, up to the codec's error,
    # which is far smaller than what the drawing changes.
    index = max(range(NUM_FRAMES), key=lambda i: len(expected[i]["scores"]))
    drawn = draw_detections(in_frames[index], expected[index], CLASS_NAMES).float()
    to_drawn = (out_frames[index].float() - drawn).abs().mean()
    to_input = (out_frames[index].float() - in_frames[index].float()).abs().mean()
    assert to_drawn < to_input / 3


def test_folders_and_videos_mixed_with_filters(setup, tmp_path):
    found = collect_inputs([setup["folder"].parent])
    assert [p.name for p in found.images] == ["still_0.png", "still_5.png"]
    assert [p.name for p in found.videos] == ["clip.mp4"] and found.skipped == []

    everything = tmp_path / "all"
    run_predict(load(setup["ckpt"], device="cpu"), [setup["folder"].parent], everything, progress=False)
    full = by_image(json.loads((everything / "detections.json").read_text()))
    drawn = {p.relative_to(everything / "images").as_posix() for p in (everything / "images").rglob("*.png")}
    assert drawn == {"stills/still_0.png", "stills/still_5.png"}
    assert [p.name for p in (everything / "videos").iterdir()] == ["clip.mp4"]
    assert {key[0] for key in full} <= {None, "clip.mp4"} and (None, "stills/still_0.png") in full

    # The class of the best detection overall, so the filters below keep something to check.
    best = max((r for results in full.values() for r in results), key=lambda r: r["score"])
    filtered = tmp_path / "filtered"
    run_predict(load(setup["ckpt"], device="cpu"), [setup["folder"], setup["video"]], filtered, score=0.75,
                classes=[best["category_name"]], max_det=2, progress=False, draw=False)
    kept = by_image(json.loads((filtered / "detections.json").read_text()))
    assert not (filtered / "images").exists() and not (filtered / "videos").exists()
    assert kept, "no detection survived the filters: the checks below would be empty"
    for key, results in kept.items():
        assert len(results) <= 2
        assert all(r["category_name"] == best["category_name"] and r["score"] > 0.75 for r in results)
        # Among the unfiltered detections of that image (same boxes, same scores), and within its top 2.
        top = sorted(full[key], key=lambda r: -r["score"])[:2]
        assert {(tuple(r["bbox"]), r["score"]) for r in results} <= {(tuple(r["bbox"]), r["score"]) for r in top}


def test_cli_with_onnxruntime_backend_matches_torch(setup, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from multibox.export.onnx import export_checkpoint

    onnx_path = export_checkpoint(setup["ckpt"], tmp_path / "model.onnx")
    runs = {}
    for backend, model in (("torch", setup["ckpt"]), ("onnxruntime", onnx_path)):
        out = tmp_path / backend
        assert main(["predict", "--checkpoint", str(model), str(setup["video"]), str(setup["folder"]),
                     "--out", str(out), "--backend", backend, "--classes", "disc,2", "--max-det", "20"]) == 0
        captured = capsys.readouterr()
        assert "images/s" in captured.out and "12 frames" in captured.out
        assert "img/s" not in captured.err and "img]" not in captured.err   # no progress bar off a terminal
        runs[backend] = by_image(json.loads((out / "detections.json").read_text()))
    assert runs["torch"].keys() == runs["onnxruntime"].keys()
    for key, results in runs["torch"].items():
        other = runs["onnxruntime"][key]
        assert len(results) == len(other)
        assert all(r["category_name"] == "block" or r["category_name"] == "disc" for r in results)
        compatible = np.array([[a["category_id"] == b["category_id"] and abs(a["score"] - b["score"]) <= 1e-4
                                and np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 0.02 for b in other]
                               for a in results]).reshape(len(results), len(other))
        assert perfect_matching(compatible), key


def perfect_matching(compatible: np.ndarray) -> bool:
    """Whether the bipartite graph ``compatible`` (n, n) has a perfect matching (augmenting paths): equal
    detections may be listed in either order when their scores are equal after rounding."""
    match_of_right = [-1] * compatible.shape[1]

    def augment(left: int, seen: set) -> bool:
        for right in np.flatnonzero(compatible[left]):
            if right not in seen:
                seen.add(right)
                if match_of_right[right] < 0 or augment(match_of_right[right], seen):
                    match_of_right[right] = left
                    return True
        return False

    return all(augment(left, set()) for left in range(compatible.shape[0]))
