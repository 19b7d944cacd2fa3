"""check-data reports every problem class with its file / annotation id; training on broken data stays finite."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _data_builders import make_broken_coco, make_clean_coco, make_voc
from multibox.cli import main
from multibox.data.coco import CocoDetection, collate_detection
from multibox.data.validate import check_dataset

TINY = ["model.widths=[8, 8, 8, 8, 8, 8, 8, 8]", "data.num_workers=0", "train.threads=2", "train.epochs=2",
        "train.batch_size=5", "train.log_every=1", "train.checkpoint_every=0", "eval.batch_size=8"]


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return make_broken_coco(tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="module")
def report(broken):
    return check_dataset(broken[0], workers=1)


def test_every_problem_class_reported_with_file_and_id(broken, report):
    _, expected = broken
    for key, (file_name, ann_id) in expected.items():
        kind = key.replace("_empty", "")
        hits = [p for p in report.by_kind(kind) if p.file.endswith(file_name) and p.ann_id == ann_id]
        assert hits, f"{kind} on {file_name} / {ann_id} not reported; got {[str(p) for p in report.by_kind(kind)]}"


def test_no_false_alarms_on_good_images(broken, report):
    flagged_images = {p.file.rsplit("/", 1)[-1] for p in report.problems if p.ann_id is None}
    assert not {"good1.jpg", "good2.jpg", "good3.jpg"} & flagged_images
    # exactly one out-of-image box, one zero-size, one negative, one NaN
    for kind in ("out_of_image_box", "zero_size_box", "negative_box", "nan_box", "unknown_category_id"):
        assert len(report.by_kind(kind)) == 1, kind


def test_summary_and_cli_exit_status(broken, report, tmp_path, capsys):
    text = report.summary()
    assert "truncated_image" in text and "errors" in text
    assert report.num_images == 15 and report.num_errors > 0
    assert main(["check-data", str(broken[0]), "--json", str(tmp_path / "r.json"), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "missing.jpg [image 10]: missing_image" in out
    assert "[annotation 105]: unknown_category_id" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["counts"]["truncated_image"] == 1


def test_clean_coco_has_no_errors(tmp_path):
    ann = make_clean_coco(tmp_path / "c", num_images=4)
    rep = check_dataset(ann, workers=1)
    assert rep.problems == [], [str(p) for p in rep.problems]


def test_voc_problems(tmp_path):
    voc = make_voc(tmp_path, {"000001": [("dog", 1, 1, 20, 20, 0), ("cat", 30, 5, 80, 30, 0)],   # out of 60x40
                              "000002": [("person", 5, 5, 5, 20, 1), ("persn", 2, 2, 9, 9, 0)]},
                   {"trainval": ["000001", "000002"]})
    (voc / "Annotations" / "000003.xml").write_text("<annotation><object>")   # broken XML
    (voc / "JPEGImages" / "000002.jpg").unlink()
    rep = check_dataset(voc.parent, workers=1)
    assert [p.file.endswith("000003.xml") for p in rep.by_kind("bad_annotation_file")] == [True]
    (hit,) = rep.by_kind("out_of_image_box")
    assert hit.ann_id == "000001#1" and hit.file.endswith("000001.xml")
    assert not rep.by_kind("zero_size_box")   # xmin == xmax is a 1-pixel-wide box in VOC's inclusive indices
    (typo,) = rep.by_kind("unknown_class_name")
    assert typo.ann_id == "000002#1" and "persn" in typo.message
    (missing,) = rep.by_kind("missing_image")
    assert missing.file.endswith("000002.jpg") and missing.image_id == "000002"


def test_dataset_policy_on_broken_data(broken):
    ds = CocoDetection(broken[0])
    rep = ds.load_report
    assert rep["duplicate_image_ids"] == 1 and rep["annotations_unknown_category"] == 1
    assert rep["annotations_bad_bbox"] == 1 and rep["annotations_unknown_image"] == 1
    assert rep["annotation_ids_renumbered"] == 1
    assert rep["degenerate_boxes_dropped"] == 2 and rep["boxes_clipped"] == 1
    samples = [ds[i] for i in range(len(ds))]
    unreadable = {ds.records[i].file_name for i, s in enumerate(samples) if s is None}
    assert unreadable == {"missing.jpg", "truncated.jpg", "garbage.jpg", "empty.jpg"}
    for s in samples:
        if s is None:
            continue
        image, target = s
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        boxes = target["boxes"]
        h, w = target["orig_size"]
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all()
    by_name = {ds.records[i].file_name: s for i, s in enumerate(samples)}
    assert by_name["rotated.jpg"][0].shape == (3, 40, 60)          # EXIF applied
    deep = by_name["deep.png"][0]
    assert deep.dtype == torch.uint8 and int(deep.max()) > 100     # 16-bit scaled, not clipped to 255
    batch = collate_detection([(torch.zeros(3, 4, 4), {}), None, None])
    images, targets = batch
    assert images.shape == (1, 3, 4, 4) and batch.skipped == 2
    assert ds.coco_gt()["annotations"] and len({a["id"] for a in ds.coco_gt()["annotations"]}) == len(
        ds.coco_gt()["annotations"])


def test_training_on_broken_set_is_finite_and_logs_skips(broken, tmp_path):
    from multibox.cli import main

    ann, _ = broken
    out = tmp_path / "run"
    args = ["train", "--data", str(ann), "--val-data", str(ann), "--out", str(out), "--no-progress"]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 3   # done, but 4 unreadable images were skipped
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    data = [r for r in records if r["kind"] == "data"][0]
    assert data["train_annotations_unknown_category"] == 1 and data["train_annotations_bad_bbox"] == 1
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [e["skipped_images"] for e in epochs] == [4, 4]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert all(e["skipped_steps"] == 0 for e in epochs)
    result = json.loads((out / "eval.json").read_text())
    assert all(np.isfinite(result[k]) for k in ("AP", "AP50"))


# --------------------------------------------------------------------------- COCO-scale checks

_UNUSABLE = ("unreadable_image", "truncated_image", "oversized_image")


def _jpeg(progressive: bool, mode: str, seed: int = 0) -> bytes:
    import io

    from PIL import Image

    noise = np.random.default_rng(seed).normal(128, 40, (72, 96, 3)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).convert(mode).save(buf, "JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def damaged_jpegs() -> dict[str, bytes]:
    """name -> bytes: baseline / progressive JPEGs (RGB, L, CMYK) truncated at 59 offsets, one byte changed every
    ~1/80 of the header (markers, lengths, tables), 60 bytes of entropy-coded data inverted, tails zero-filled."""
    out = {}
    rng = np.random.default_rng(1)
    for progressive in (False, True):
        for mode in ("RGB", "L", "CMYK"):
            data = _jpeg(progressive, mode)
            tag, n = f"{'prog' if progressive else 'base'}_{mode}", len(data)
            sos = data.index(b"\xff\xda")
            scan = sos + 2 + int.from_bytes(data[sos + 2: sos + 4], "big")   # first entropy-coded byte
            out[f"{tag}_intact.jpg"] = data
            for k in range(1, 60):
                out[f"{tag}_cut{k}.jpg"] = data[: n * k // 60]
            for k in range(0, scan, max(1, n // 80)):
                out[f"{tag}_header{k}.jpg"] = data[:k] + bytes([data[k] ^ 0x5A]) + data[k + 1:]
            for k in rng.integers(scan, n - 2, 60).tolist():
                out[f"{tag}_flip{k}.jpg"] = data[:k] + bytes([data[k] ^ 0xFF]) + data[k + 1:]
            for frac in (2, 4, 10, 50, 200):
                zeros = max(2, (n - scan) // frac)
                out[f"{tag}_zeros{frac}.jpg"] = data[: n - zeros] + bytes(zeros)
    return out


def _coco_of(folder, files: dict[str, bytes]):
    (folder / "images").mkdir(parents=True)
    for name, data in files.items():
        (folder / "images" / name).write_bytes(data)
    images = [{"id": i, "file_name": name, "width": 96, "height": 72} for i, name in enumerate(sorted(files), 1)]
    coco = {"images": images, "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 9, 9]} for i in range(1, 30)]}
    (folder / "instances.json").write_text(json.dumps(coco))
    return folder / "instances.json"


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    return _coco_of(tmp_path_factory.mktemp("damaged"), damaged_jpegs())


def test_scaled_jpeg_check_flags_every_file_full_decode_flags(damaged):
    full = check_dataset(damaged, workers=1, full_decode=True)
    cheap = check_dataset(damaged, workers=1)
    flagged_full = {(p.file, p.kind, p.image_id) for p in full.problems if p.kind in _UNUSABLE}
    flagged_cheap = {(p.file, p.kind, p.image_id) for p in cheap.problems if p.kind in _UNUSABLE}
    assert len(flagged_full) > 300   # the corpus really is damaged: truncations, broken headers, zero tails
    missed, extra = flagged_full - flagged_cheap, flagged_cheap - flagged_full
    assert not missed, f"flagged by the full decode only: {sorted(missed)[:5]}"
    assert not extra, f"flagged by the scaled decode only: {sorted(extra)[:5]}"
    assert {f.rsplit("/", 1)[-1] for f, _, _ in flagged_cheap} >= {f"{t}_cut1.jpg" for t in ("base_RGB", "prog_L")}
    assert not any(f.endswith("_intact.jpg") for f, _, _ in flagged_cheap)   # and no false alarm on the originals
    assert all(p.file.endswith(".jpg") and p.image_id for p in cheap.problems if p.kind in _UNUSABLE)


def test_parallel_report_equals_serial_and_progress_totals(damaged):
    calls = []
    serial = check_dataset(damaged, workers=1, progress=lambda done, total: calls.append((done, total)))
    parallel = check_dataset(damaged, workers=2)
    assert parallel.problems == serial.problems and parallel.num_images == serial.num_images
    total = serial.num_images
    assert total > 64 and calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(t == total for _, t in calls) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) == 2 + (total - 1) // 64   # one call per chunk of 64 images, and the start
