"""``multibox predict`` and ``multibox.load(...).predict()`` in a user's first hour (issue 13): a display threshold
for pictures, PIL images, ``.onnx`` files, unreadable inputs skipped and named, output names that never collide.

The test model has random weights with class logits shifted so that its own threshold (0.05) keeps its per-image
cap of 100 boxes, of which only a handful score above the display threshold.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import multibox
from multibox.checkpoint import CheckpointError, save_checkpoint
from multibox.cli import main
from multibox.config import load_config
from multibox.data.coco import read_image_rgb
from multibox.errors import InputError, MultiboxError
from multibox.inference.detector import as_uint8_chw, load
from multibox.inference.predict import DISPLAY_SCORE, run_predict
from multibox.models import build_model

CLASS_NAMES = ["background", "disc", "block"]
MODEL_SCORE = 0.05


def picture(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random (h, w, 3) uint8 RGB picture (coarse noise, upsampled)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g) * 255
    image = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").round().byte()[0]
    return image.permute(1, 2, 0).contiguous().numpy()


def save(path, array: np.ndarray, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("tiny", ["model.num_classes=2", f"eval.score_threshold={MODEL_SCORE}",
                               "eval.max_per_image=100"])
    model = build_model(cfg, load_backbone_weights=False).eval()
    with torch.no_grad():
        for head in model.cls_heads:
            head.weight.mul_(2.0)
            head.bias.view(-1, 3)[:, 1:] = -4.0
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "class_names": CLASS_NAMES}, path)
    return path


@pytest.fixture(scope="module")
def detector(ckpt):
    return load(ckpt, device="cpu")


@pytest.fixture(scope="module")
def onnx_path(ckpt):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from multibox.export.onnx import export_checkpoint
    return export_checkpoint(ckpt, ckpt.parent / "model.onnx")


def predict_cli(ckpt, *args) -> int:
    return main(["predict", "--checkpoint", str(ckpt), *map(str, args), "--device", "cpu", "--no-progress"])


def read_results(out) -> list[dict]:
    return json.loads((out / "detections.json").read_text())


# ------------------------------------------------------------------------------------------ 1. display threshold


def test_predict_shows_confident_boxes_by_default(ckpt, detector, tmp_path):
    image = save(tmp_path / "in" / "photo.png", picture(120, 160, 0))
    assert predict_cli(ckpt, image, "--out", tmp_path / "default") == 0
    shown = read_results(tmp_path / "default")
    own = detector.predict(image)[0]["scores"]
    assert len(own) == 100 and own.min() <= DISPLAY_SCORE, "degenerate test: the model's own threshold shows few"
    assert 0 < len(shown) == int((own > DISPLAY_SCORE).sum()) < 30
    assert all(r["score"] > DISPLAY_SCORE for r in shown)

    assert predict_cli(ckpt, image, "--out", tmp_path / "low", "--score", MODEL_SCORE) == 0
    assert len(read_results(tmp_path / "low")) == 100


def test_predict_help_states_the_display_threshold(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"--score SCORE score threshold of the boxes drawn and listed (default: {DISPLAY_SCORE}" in text


def test_detector_predict_takes_a_score_threshold(detector):
    image = torch.from_numpy(picture(120, 160, 1)).permute(2, 0, 1)
    own = detector.predict(image)[0]
    assert len(own["scores"]) == 100 and bool((own["scores"] > MODEL_SCORE).all())
    shown = detector.predict(image, score=DISPLAY_SCORE)[0]
    keep = own["scores"] > DISPLAY_SCORE
    assert 0 < len(shown["scores"]) == int(keep.sum()) < 100
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(shown[key], own[key][keep], rtol=0, atol=0)
    assert detector.postprocess.score_threshold == MODEL_SCORE   # a per-call threshold changes nothing after it
    assert len(detector.predict(image)[0]["scores"]) == 100


@pytest.mark.parametrize("mode, fmt", [("RGB", "png"), ("L", "png"), ("RGBA", "png"), ("P", "png"),
                                       ("I;16", "png"), ("CMYK", "tiff"), ("1", "png")])
def test_pil_images_in_any_mode_read_as_files_are(tmp_path, mode, fmt):
    rgb = Image.fromarray(picture(40, 56, 2))
    if mode == "I;16":   # 16-bit samples above 255: files are scaled to 8 bit, so must PIL images be
        im = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257))
    else:
        im = rgb.convert(mode)
    path = tmp_path / f"image.{fmt}"
    im.save(path)
    with Image.open(path) as opened:
        assert opened.mode == im.mode
        torch.testing.assert_close(as_uint8_chw(opened), read_image_rgb(path), rtol=0, atol=0)


def test_pil_image_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6   # orientation: rotate 90 degrees clockwise to display
    path = save(tmp_path / "rotated.png", picture(40, 56, 3), exif=exif.tobytes())
    with Image.open(path) as opened:
        image = as_uint8_chw(opened)
    assert image.shape == (3, 56, 40)
    torch.testing.assert_close(image, read_image_rgb(path), rtol=0, atol=0)


def test_predict_takes_one_pil_image_or_a_list(detector):
    pictures = [picture(120, 160, 4), picture(90, 70, 5)]
    tensors = [torch.from_numpy(p).permute(2, 0, 1) for p in pictures]
    expected = detector.predict(tensors, score=DISPLAY_SCORE) + detector.predict(tensors[1], score=DISPLAY_SCORE)
    got = detector.predict([Image.fromarray(p) for p in pictures], score=DISPLAY_SCORE)
    single = detector.predict(Image.fromarray(pictures[1]), score=DISPLAY_SCORE)
    assert len(got) == 2 and len(single) == 1
    for e, g in zip(expected, got + single):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(g[key], e[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ 2. multibox.load


def test_load_gives_the_onnxruntime_detector_for_an_onnx_file(detector, onnx_path):
    from multibox.inference.onnx import OnnxDetector

    exported = multibox.load(onnx_path)
    assert isinstance(exported, OnnxDetector) and exported.class_names == CLASS_NAMES
    image = Image.fromarray(picture(120, 160, 6))
    for score in (None, DISPLAY_SCORE):
        want, got = detector.predict(image, score=score)[0], exported.predict(image, score=score)[0]
        assert got["boxes"].dtype == torch.float32 and got["labels"].dtype == torch.int64
        assert len(got["scores"]) == len(want["scores"]) > 0
        torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=0, atol=0.05)
    assert len(exported.predict(image, score=DISPLAY_SCORE)[0]["scores"]) < 100


def test_load_names_a_file_that_is_no_model(tmp_path, onnx_path):
    text = tmp_path / "model.bin"
    text.write_text("not a model")
    with pytest.raises(MultiboxError, match=f"^{text}: neither a multibox checkpoint"):
        multibox.load(text)
    garbage = tmp_path / "broken.onnx"
    garbage.write_bytes(b"\x08\x07garbage")
    with pytest.raises(MultiboxError, match=f"^{garbage}: not a readable ONNX model"):
        multibox.load(garbage)
    with pytest.raises(CheckpointError, match="an exported ONNX model, not a checkpoint"):
        load(onnx_path)


def test_load_of_a_foreign_onnx_model_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(MultiboxError, match=f"^{path}: not a multibox export"):
        multibox.load(path)


# ------------------------------------------------------------------------------------------ 3. unreadable inputs


def broken_inputs(root):
    """A folder with one readable image, a truncated JPEG and a video that is not one; a text file beside it."""
    good = save(root / "photos" / "good.png", picture(120, 160, 7))
    jpeg = save(root / "photos" / "cut.jpg", picture(120, 160, 8), quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])
    video = root / "photos" / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    notes = root / "notes.txt"
    notes.write_text("remember the milk")
    return good, jpeg, video, notes


def test_unreadable_inputs_are_named_skipped_and_the_rest_written(ckpt, tmp_path, caplog, capsys):
    good, jpeg, video, notes = broken_inputs(tmp_path)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="multibox"):
        status = predict_cli(ckpt, good.parent, notes, "--out", out)
    assert status == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    for path, why in ((jpeg, "truncated"), (video, "cannot open video"), (notes, "not an image or video")):
        [line] = [w for w in warnings if str(path) in w]
        assert why in line and "\n" not in line
    assert {r["image_id"] for r in read_results(out)} == {"photos/good.png"}
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.png")] == ["images/photos/good.png"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("1 images, ") and ", 3 skipped (" in last


def test_run_predict_summary_lists_the_skipped_inputs(detector, tmp_path):
    good, jpeg, video, notes = broken_inputs(tmp_path)
    summary = run_predict(detector, [good.parent, notes], tmp_path / "out", progress=False)
    assert summary["images"] == 1
    assert sorted(s["path"] for s in summary["skipped"]) == sorted(map(str, (jpeg, video, notes)))
    assert all(s["reason"] for s in summary["skipped"])


def test_everything_readable_is_exit_status_0(ckpt, tmp_path, capsys):
    good, *_ = broken_inputs(tmp_path)
    assert predict_cli(ckpt, good, "--out", tmp_path / "out") == 0
    assert ", 0 skipped (" in capsys.readouterr().out


def test_an_unknown_suffix_as_the_only_input_is_an_error(ckpt, tmp_path, capsys):
    *_, notes = broken_inputs(tmp_path)
    assert predict_cli(ckpt, notes, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {notes}: not an image or video") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_nothing_readable_is_an_error(detector, tmp_path):
    _, jpeg, video, _ = broken_inputs(tmp_path)
    with pytest.raises(InputError, match="no input could be read"):
        run_predict(detector, [jpeg, video], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "detections.json").exists()


# ------------------------------------------------------------------------------------------ 4. output names


def test_same_file_names_in_other_folders_stay_apart(detector, tmp_path):
    a = save(tmp_path / "cams" / "a" / "img.jpg", picture(120, 160, 9), quality=95)
    b = save(tmp_path / "cams" / "b" / "img.jpg", picture(100, 130, 10), quality=95)
    out = tmp_path / "out"
    summary = run_predict(detector, [tmp_path / "cams"], out, score=0.2, progress=False)
    assert summary["images"] == 2
    drawn = {p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.png")}
    assert drawn == {"a/img.png", "b/img.png"}
    with Image.open(out / "images" / "b" / "img.png") as im:
        assert im.size == (130, 100)
    results = read_results(out)
    assert {r["image_id"] for r in results} == {"a/img.jpg", "b/img.jpg"}
    for path, rel in ((a, "a/img.jpg"), (b, "b/img.jpg")):
        expected = detector.predict(path, score=0.2)[0]
        mine = [r for r in results if r["image_id"] == rel]
        assert len(mine) == len(expected["scores"]) > 0
        assert {r["file"] for r in mine} == {str(path)}


def test_inputs_from_several_folders_are_named_from_their_common_folder(detector, tmp_path):
    one = save(tmp_path / "x" / "one" / "p.png", picture(60, 80, 11))
    two = save(tmp_path / "x" / "two" / "deep" / "p.png", picture(60, 80, 12))
    also = save(tmp_path / "x" / "one" / "p.jpg", picture(60, 80, 13))   # same stem as one/p.png
    out = tmp_path / "out"
    run_predict(detector, [one, also, tmp_path / "x" / "two"], out, progress=False)
    drawn = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.png"))
    assert drawn == ["one/p.jpg.png", "one/p.png.png", "two/deep/p.png"]
    assert {r["image_id"] for r in read_results(out)} == {"one/p.png", "one/p.jpg", "two/deep/p.png"}
    assert str(two) in {r["file"] for r in read_results(out)}


def test_a_file_given_twice_is_predicted_once(detector, tmp_path):
    image = save(tmp_path / "in" / "p.png", picture(60, 80, 14))
    summary = run_predict(detector, [image, image.parent], tmp_path / "out", progress=False)
    assert summary["images"] == 1


def test_the_output_folder_inside_an_input_folder_is_not_read_back(detector, tmp_path):
    save(tmp_path / "in" / "p.png", picture(60, 80, 15))
    for _ in range(2):
        summary = run_predict(detector, [tmp_path / "in"], tmp_path / "in" / "out", progress=False)
        assert summary["images"] == 1


def test_image_and_frame_ids_have_one_type(detector, tmp_path):
    pytest.importorskip("av")
    from multibox.inference.video import VideoWriter

    save(tmp_path / "in" / "still.png", picture(60, 80, 16))
    frames = [torch.from_numpy(picture(60, 80, 17 + t)).permute(2, 0, 1) for t in range(3)]
    with VideoWriter(tmp_path / "in" / "clips" / "walk.mp4", 5, 80, 60) as writer:
        for frame in frames:
            writer.write(frame)
    out = tmp_path / "out"
    run_predict(detector, [tmp_path / "in"], out, score=MODEL_SCORE, max_det=2, progress=False)
    results = read_results(out)
    assert {type(r["image_id"]) for r in results} == {str}
    frame_results = [r for r in results if "video" in r]
    assert {r["image_id"] for r in frame_results} == {f"clips/walk.mp4#{i}" for i in range(3)}
    assert all(r["image_id"] == f"{r['video']}#{r['frame']}" and r["video"] == "clips/walk.mp4"
               and r["file"] == str(tmp_path / "in" / "clips" / "walk.mp4") for r in frame_results)
    assert (out / "videos" / "clips" / "walk.mp4").is_file()
    assert {r["image_id"] for r in results if "video" not in r} == {"still.png"}


def test_a_score_outside_zero_to_one_is_refused(detector, onnx_path):
    """``predict(images, 8)`` written for the old positional batch size must not silently keep nothing."""
    image = torch.from_numpy(picture(64, 80, 5)).permute(2, 0, 1).contiguous()
    for model in (detector, multibox.load(onnx_path)):
        for score, max_det in [(8, None), (-0.1, None), (None, 0)]:
            with pytest.raises(InputError):
                model.predict(image, score, max_det=max_det)
        assert len(model.predict(image, 1.0)[0]["scores"]) == 0   # the ends are thresholds too
