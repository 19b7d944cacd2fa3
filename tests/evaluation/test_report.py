"""Evaluation pictures and page (multibox.evaluation.report): the numbers behind them, the files, and the page in a browser."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from multibox.data.synth import generate_synthetic_coco
from multibox.evaluation.coco import evaluate_coco
from multibox.evaluation.report import confusion_matrix, write_eval_report


def make_detections(gt: dict) -> tuple[list[dict], np.ndarray]:
    """Detections built from the ground truth with a known confusion matrix (returned alongside).

    Per non-crowd object, in turn: exact box, right class (score 0.9) | box shifted by 10 % of its width, class
    cycled to the next (0.8) | missed | exact box, right class, low score 0.1 (below the 0.25 threshold: counts as
    missed) . Plus, per image, one false positive far from any object (0.7), and one (0.05) under the threshold.
    """
    cat_ids = sorted(c["id"] for c in gt["categories"])
    k = len(cat_ids)
    col = {c: i for i, c in enumerate(cat_ids)}
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    dets = []
    anns = [a for a in gt["annotations"] if not a.get("iscrowd", 0)]
    for n, a in enumerate(anns):
        x, y, w, h = a["bbox"]
        c = col[a["category_id"]]
        kind = n % 4
        if kind == 0:
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, w, h],
                         "score": 0.9})
            matrix[c, c] += 1
        elif kind == 1:
            other = cat_ids[(c + 1) % k]
            dets.append({"image_id": a["image_id"], "category_id": other, "bbox": [x + 0.1 * w, y, w, h],
                         "score": 0.8})
            matrix[c, col[other]] += 1
        else:
            if kind == 3:
                dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, w, h],
                             "score": 0.1})
            matrix[c, k] += 1
    for img in gt["images"]:
        # A 1x1 box in a corner: no object of the synthetic set is that small, so IoU with any object is < 0.5.
        dets.append({"image_id": img["id"], "category_id": cat_ids[0], "bbox": [0, 0, 1, 1], "score": 0.7})
        matrix[k, 0] += 1
        dets.append({"image_id": img["id"], "category_id": cat_ids[1], "bbox": [2, 2, 1, 1], "score": 0.05})
    return dets, matrix


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    ann = generate_synthetic_coco(root / "data", num_images=6, seed=11)
    gt = json.loads(ann.read_text())
    dets, matrix = make_detections(gt)
    result = evaluate_coco(ann, dets, backend="pycocotools", verbose=False)
    metrics = root / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in (
        [{"kind": "train", "step": s, "loss": 3.0 / (1 + s), "loss_cls": 2.0 / (1 + s), "loss_loc": 1.0 / (1 + s),
          "lr": 0.01} for s in range(0, 50, 5)] + [{"kind": "eval", "epoch": 1, "AP": 0.1, "AP50": 0.2},
                                                   {"kind": "eval", "epoch": 2, "AP": 0.3, "AP50": 0.5}])))
    out = root / "run"
    files = write_eval_report(out, result, ann, dets, class_names=["background"] + [c["name"] for c in
                              sorted(gt["categories"], key=lambda c: c["id"])], metrics_jsonl=metrics)
    return dict(ann=ann, gt=gt, dets=dets, matrix=matrix, result=result, out=out, files=files)


def test_confusion_matrix_counts_match_the_construction(evaluated):
    matrix, cat_ids = confusion_matrix(evaluated["gt"], evaluated["dets"])
    assert cat_ids == sorted(c["id"] for c in evaluated["gt"]["categories"])
    np.testing.assert_array_equal(matrix, evaluated["matrix"])
    # Every non-crowd object is in exactly one cell of its row; every detection above threshold in one column.
    num_objects = sum(not a.get("iscrowd", 0) for a in evaluated["gt"]["annotations"])
    assert matrix[:-1].sum() == num_objects
    assert matrix[:, :-1].sum() == sum(d["score"] >= 0.25 for d in evaluated["dets"])


def test_confusion_matrix_greedy_one_to_one_and_crowd():
    gt = {"images": [{"id": 1}], "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10]},
                          {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 50, 10, 10], "iscrowd": 1}]}
    dets = [{"image_id": 1, "category_id": 7, "bbox": [1, 0, 10, 10], "score": 0.9},   # IoU 0.818 -> pairs
            {"image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.3},   # IoU 1.0 -> pairs first
            {"image_id": 1, "category_id": 3, "bbox": [50, 50, 10, 10], "score": 0.9}]  # on the crowd box
    matrix, _ = confusion_matrix(gt, dets, score_threshold=0.25)
    # Greedy by IoU: the exact box takes the object, the shifted one is left over (background row), the crowd
    # object is ignored, so the detection on it is a false positive too.
    np.testing.assert_array_equal(matrix, [[1, 0, 0], [0, 0, 0], [1, 1, 0]])


def test_pr_curve_data_integrates_to_the_reported_ap(evaluated):
    """The curves are the evaluator's precision slices: their mean over recall, then classes, is AP50 / AP."""
    from multibox.evaluation.report import _pr_slices

    result = evaluated["result"]
    at_50, mean = _pr_slices(result)
    assert at_50.shape == (101, len(result.category_ids))
    assert np.nanmean(at_50) == pytest.approx(result.stats["AP50"], abs=1e-9)
    assert np.nanmean(mean) == pytest.approx(result.stats["AP"], abs=1e-9)
    for k, name in enumerate(result.category_names):
        assert np.nanmean(mean[:, k]) == pytest.approx(result.per_class[name], abs=1e-9)


def test_files_written_and_page_references_them(evaluated):
    out, files = evaluated["out"], evaluated["files"]
    names = {"pr_curves.png", "confusion_matrix.png", "samples.png", "curves.png"}
    assert {p.name for p in files.values()} == names | {"index.html"}
    for name in names:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width >= 600 and im.height >= 300
            # Not blank: a drawn figure has many distinct colours.
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
    page = (out / "index.html").read_text()
    assert set(re.findall(r'<img src="([^"]+)"', page)) == names       # relative links, next to the page
    assert f"{evaluated['result'].stats['AP']:.3f}" in page
    for name in evaluated["result"].category_names:
        assert f"<td>{name}</td>" in page


def test_samples_skipped_with_a_note_when_images_are_missing(evaluated, tmp_path):
    files = write_eval_report(tmp_path, evaluated["result"], evaluated["gt"], evaluated["dets"])  # dict: no folder
    assert "samples" not in files and "curves" not in files
    assert "No sample grid" in (tmp_path / "index.html").read_text()


@pytest.mark.slow
def test_samples_read_through_the_dataset_or_a_mapping(evaluated, tmp_path):
    """A COCO dict as ground truth (no folder to look in): the images come from the evaluation dataset, as the
    ``multibox eval`` wiring passes ``splits.val``, or from an explicit {id: file} map; unreadable ones are skipped."""
    from multibox.data.build import TransformedSubset
    from multibox.data.coco import CocoDetection
    from multibox.evaluation.report import _image_loader, _load_samples

    dataset = CocoDetection(evaluated["ann"])
    subset = TransformedSubset(dataset, range(len(dataset)), lambda image, target: (image, target))
    files = write_eval_report(tmp_path / "a", evaluated["result"], evaluated["gt"], evaluated["dets"],
                              images=subset, num_samples=4)
    assert "samples" in files
    folder = evaluated["ann"].parent / "images"
    mapping = {img["id"]: folder / img["file_name"] for img in evaluated["gt"]["images"]}
    mapping[evaluated["gt"]["images"][0]["id"]] = folder / "missing.jpg"
    files = write_eval_report(tmp_path / "b", evaluated["result"], evaluated["gt"], evaluated["dets"],
                              images=mapping, num_samples=8)
    assert "samples" in files
    ids = [img["id"] for img in evaluated["gt"]["images"]]
    loaded = _load_samples(_image_loader(evaluated["gt"], evaluated["gt"], mapping, None), ids, 8)
    assert list(loaded) == ids[1:]                      # the missing file is skipped, the order kept
    loaded = _load_samples(_image_loader(evaluated["gt"], evaluated["gt"], subset, None), ids, 3)
    assert list(loaded) == [ids[0], ids[2], ids[5]]     # spread over the ids (np.linspace(0, 5, 3).round())
    assert torch.equal(loaded[ids[2]], dataset.load_image(2))


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_renders_with_every_picture_in_headless_chromium(evaluated, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (CI: apt-get install -y chromium): the HTML page was not rendered")
    page = evaluated["out"] / "index.html"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--window-size=1200,1600"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run(command + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         env=env).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, f"the page's load script did not run; DOM starts: {dom[:300]!r}"
    assert loaded.group(1) == loaded.group(2) == "4"
    shot = tmp_path / "page.png"
    subprocess.run(command + [f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, env=env)
    with Image.open(shot) as im:
        assert im.size == (1200, 1600)
