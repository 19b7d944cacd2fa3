"""Fuzzing with a bounded budget (hypothesis; atheris too when it is installed): box maths, the COCO JSON reader,
the VOC XML reader, shard reading, ``check-data`` and checkpoint loading. Readers must either succeed or raise their
documented error (CocoFormatError, VocXmlError, ShardError, ImageDecodeError, CheckpointError), never anything else;
``check-data`` must always return a report.

Budget (examples per test run) in ``FUZZ_BUDGET``; the whole file stays under ~40 s on two busy cores. Examples are
drawn afresh every run (no example database is written into the repository). ``MULTIBOX_FUZZ_SCALE=20`` multiplies
every budget (hypothesis and atheris) for a deeper run (nightly, or before a release).
"""
from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from _data_builders import CATEGORIES, VOC_OBJ, VOC_XML, make_clean_coco, picture
from multibox.core.boxes import (box_iou_xyxy, cxcywh_to_xyxy, decode_cxcywh, encode_cxcywh, ltwh_to_xyxy,
                            xyxy_to_cxcywh, xyxy_to_ltwh, yxyx_to_xyxy)
from multibox.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from multibox.data.coco import CocoDetection, CocoFormatError, ImageDecodeError, decode_image_rgb
from multibox.data.shards import ShardDataset, ShardError, convert_dataset
from multibox.data.validate import check_dataset
from multibox.data.voc import VocXmlError, parse_voc_xml

FUZZ_BUDGET = {
    "box IoU (bounds, symmetry, vs torchvision)": 300,
    "box format round trips": 150,
    "box encode / decode round trip": 150,
    "COCO JSON: structural mutations (+ check-data)": 250,
    "COCO JSON: byte mutations": 300,
    "VOC XML: text mutations (+ check-data)": 200,
    "shards: corrupted bytes (+ check-data)": 80,
    "images: garbage / mutated bytes (+ check-data)": 300,
    "checkpoints: random / mutated bytes": 250,
}
ATHERIS_RUNS = 15000
SCALE = float(os.environ.get("MULTIBOX_FUZZ_SCALE", "1"))

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin"),   # PIL on corrupted TIFFs
              pytest.mark.slow]   # thousands of generated inputs


@pytest.fixture(scope="module", autouse=True)
def _quiet_data_warnings():
    """No unreadable-image warnings by the hundred while this module runs (restored after: other modules assert
    on them)."""
    data_logger = logging.getLogger("multibox.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)
    yield
    data_logger.setLevel(level)


def _settings(name: str):
    return settings(max_examples=max(1, int(FUZZ_BUDGET[name] * SCALE)), deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ============================================================================================ boxes

coord = st.floats(-1e4, 1e4, allow_nan=False, width=32)
box = st.tuples(coord, coord, coord, coord)   # any order: inverted and degenerate boxes included


@_settings("box IoU (bounds, symmetry, vs torchvision)")
@given(st.lists(box, min_size=1, max_size=6), st.lists(box, min_size=1, max_size=6))
def test_iou_is_bounded_symmetric_and_matches_torchvision(a, b):
    from torchvision.ops import box_iou

    a, b = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    iou = box_iou_xyxy(a, b)
    assert iou.shape == (len(a), len(b))
    assert not torch.isnan(iou).any() and (iou >= 0).all() and (iou <= 1 + 1e-6).all()
    assert torch.equal(iou, box_iou_xyxy(b, a).T)
    # Boxes of real size (1e-3 px and up): torchvision divides 0 by 0 on degenerate ones, and areas below
    # float32's smallest normal number (1e-38) are treated as empty on purpose.
    valid_a = (a[:, 2] - a[:, 0] > 1e-3) & (a[:, 3] - a[:, 1] > 1e-3)
    valid_b = (b[:, 2] - b[:, 0] > 1e-3) & (b[:, 3] - b[:, 1] > 1e-3)
    if valid_a.any() and valid_b.any():
        ref = box_iou(a[valid_a].double(), b[valid_b].double()).float()
        torch.testing.assert_close(iou[valid_a][:, valid_b], ref, rtol=1e-4, atol=1e-5)
    if valid_a.any():
        torch.testing.assert_close(box_iou_xyxy(a[valid_a], a[valid_a]).diagonal(),
                                   torch.ones(int(valid_a.sum())), rtol=1e-4, atol=1e-4)


@_settings("box format round trips")
@given(st.lists(box, min_size=0, max_size=8))
def test_format_conversions_round_trip(boxes):
    x = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(x)), x, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(ltwh_to_xyxy(xyxy_to_ltwh(x)), x, rtol=1e-9, atol=1e-7)
    assert torch.equal(yxyx_to_xyxy(yxyx_to_xyxy(x)), x)
    assert torch.equal(yxyx_to_xyxy(x)[:, [1, 0, 3, 2]], x)


positive = st.floats(1e-3, 1.0, allow_nan=False)
centre = st.floats(-0.5, 1.5, allow_nan=False)


@_settings("box encode / decode round trip")
@given(st.lists(st.tuples(centre, centre, positive, positive), min_size=1, max_size=8), st.data())
def test_encode_decode_round_trip(boxes, data):
    gt = torch.tensor(boxes, dtype=torch.float64)
    anchors = torch.tensor(data.draw(st.lists(st.tuples(centre, centre, positive, positive), min_size=len(boxes),
                                              max_size=len(boxes))), dtype=torch.float64)
    cv, sv = data.draw(st.sampled_from([(0.1, 0.2), (1.0, 1.0), (0.05, 0.5)]))
    offsets = encode_cxcywh(gt, anchors, cv, sv)
    assert torch.isfinite(offsets).all()
    torch.testing.assert_close(decode_cxcywh(offsets, anchors, cv, sv), gt, rtol=1e-9, atol=1e-12)


# ============================================================================================ COCO JSON

json_leaf = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
             | st.text(max_size=6) | st.sampled_from(["abc", "", "17", "NaN", "a.jpg"]))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["id", "bbox", "image_id", "category_id", "file_name", "width", "height", "name", "area",
                     "iscrowd", "images", "annotations", "categories"]) | st.text(max_size=5), inner, max_size=4),
    max_leaves=8)


def _valid_coco() -> dict:
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": 60, "height": 40},
                       {"id": 2, "file_name": "b.jpg", "width": 60, "height": 40}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 17, "bbox": [1, 1, 5, 5], "area": 25,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [2.5, 2, 6, 6.5], "iscrowd": 1},
                            {"id": 2, "image_id": 9, "category_id": 44, "bbox": [0, 0, 0, 3]}],
            "categories": [dict(c) for c in CATEGORIES]}


def _mutate(node, data, depth=0):
    """Replace, delete or insert at a random place of a JSON structure (in place where possible)."""
    containers = isinstance(node, (dict, list)) and len(node) > 0
    action = data.draw(st.sampled_from(["descend", "replace", "delete", "insert"] if containers else ["replace"]))
    if action == "replace" or depth > 6:
        return data.draw(json_value)
    keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
    key = data.draw(st.sampled_from(keys))
    if action == "descend":
        node[key] = _mutate(node[key], data, depth + 1)
    elif action == "delete":
        del node[key]
    elif isinstance(node, dict):
        node[data.draw(st.sampled_from(["id", "bbox", "extra", "images"]))] = data.draw(json_value)
    else:
        node.insert(key, data.draw(json_value | st.just(node[key])))
    return node


def _coco_invariants(path: Path) -> None:
    try:
        ds = CocoDetection(path)
    except CocoFormatError as err:
        assert str(path) in str(err)
        return
    for i in range(len(ds)):
        target = ds.target(i, 60, 40)
        assert target["boxes"].shape[-1] == 4 and torch.isfinite(target["boxes"]).all()
    json.dumps(ds.coco_gt())   # evaluation ground truth stays serialisable


@_settings("COCO JSON: structural mutations (+ check-data)")
@given(st.data())
def test_coco_reader_survives_structural_mutations(data):
    coco = _valid_coco()
    for _ in range(data.draw(st.integers(1, 4))):
        coco = _mutate(coco, data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "annotations.json"
        path.write_text(json.dumps(coco))
        _coco_invariants(path)
        report = check_dataset(path, images=False, workers=1)
        assert report.kind in ("coco", "unknown")


@_settings("COCO JSON: byte mutations")
@given(st.data())
def test_coco_reader_survives_byte_mutations(data):
    text = bytearray(json.dumps(_valid_coco()).encode())
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(text)))
        how = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = data.draw(st.binary(min_size=1, max_size=4) | st.sampled_from(
            [b"[", b"]", b"{", b"}", b",", b":", b'"', b"NaN", b"-1e999", b"99999999999999999999999", b"\\u0000"]))
        if how == "insert":
            text[at:at] = chunk
        elif how == "delete":
            del text[at:at + len(chunk)]
        else:
            text[at:at + len(chunk)] = chunk
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "annotations.json"
        path.write_bytes(bytes(text))
        _coco_invariants(path)
        check_dataset(path, images=False, workers=1)


# ============================================================================================ VOC XML

VOC_SNIPPETS = ["<", ">", "&", "&amp;", "&lol;", "]]>", "<![CDATA[", "<!ENTITY x 'y'>", "<!DOCTYPE a [",
                "<object>", "</object>", "<bndbox>", "<xmin>", "nan", "inf", "1e999", "-5", "\x00", "\ufffd", "é"]


def _voc_text() -> str:
    objects = "".join(VOC_OBJ.format(name=n, xmin=x1, ymin=y1, xmax=x2, ymax=y2, difficult=d)
                      for n, x1, y1, x2, y2, d in [("dog", 1, 1, 20, 20, 0), ("cat", 5, 5, 30, 25, 1)])
    return VOC_XML.format(stem="000001", w=60, h=40, objects=objects)


@_settings("VOC XML: text mutations (+ check-data)")
@given(st.data())
def test_voc_reader_survives_mutations(data):
    text = _voc_text()
    for _ in range(data.draw(st.integers(1, 5))):
        at = data.draw(st.integers(0, len(text)))
        how = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = data.draw(st.sampled_from(VOC_SNIPPETS) | st.text(min_size=1, max_size=5))
        if how == "insert":
            text = text[:at] + chunk + text[at:]
        elif how == "delete":
            text = text[:at] + text[at + len(chunk):]
        else:
            text = text[:at] + chunk + text[at + len(chunk):]
    with tempfile.TemporaryDirectory() as tmp:
        voc = Path(tmp) / "VOC2007"
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (voc / sub).mkdir(parents=True)
        xml = voc / "Annotations" / "000001.xml"
        xml.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        try:
            info, objects, problems = parse_voc_xml(xml)
            assert isinstance(info["width"], int) and all(len(o) == 6 for o in objects)
        except VocXmlError as err:
            assert str(xml) in str(err)
        check_dataset(voc, images=False, workers=1)


# ============================================================================================ shards

@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-shards")
    convert_dataset(CocoDetection(make_clean_coco(root / "src", num_images=3)), root / "shards", images_per_shard=2,
                    workers=1)
    return root / "shards"


@_settings("shards: corrupted bytes (+ check-data)")
@given(data=st.data())
def test_shard_reader_refuses_corrupted_bytes(clean_shards, data):
    clean = clean_shards
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        shutil.copytree(clean, folder)
        target = folder / data.draw(st.sampled_from(["shard-00000.arrow", "shard-00001.arrow", "manifest.json"]))
        blob = bytearray(target.read_bytes())
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            blob = blob[: data.draw(st.integers(0, len(blob)))]
        target.write_bytes(bytes(blob))
        verify = data.draw(st.sampled_from(["sha256", "crc", "none"]))
        try:
            ds = ShardDataset(folder, verify=verify)
            for i in range(len(ds)):
                try:
                    image = decode_image_rgb(ds.read_bytes(i), ds.describe(i))
                    assert image.dtype == torch.uint8 and image.shape[0] == 3
                except ImageDecodeError:
                    assert verify == "none"   # with checksums on, corrupted bytes never reach the decoder
        except ShardError as err:
            assert str(folder) in str(err)
        check_dataset(folder, workers=1)


# ============================================================================================ images / check-data

def _seed_images() -> list[bytes]:
    arr = picture(24, 32, 3, [(2, 2, 12, 12)])
    out = []
    for fmt, kw in [("PNG", {}), ("JPEG", {"quality": 90}), ("GIF", {}), ("BMP", {}), ("WEBP", {}), ("TIFF", {})]:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt, **kw)
        out.append(buf.getvalue())
    return out


SEED_IMAGES = _seed_images()


@_settings("images: garbage / mutated bytes (+ check-data)")
@given(st.data())
def test_decoder_and_check_data_survive_garbage_images(data):
    if data.draw(st.booleans()):
        blob = data.draw(st.binary(max_size=300))
    else:
        blob = bytearray(data.draw(st.sampled_from(SEED_IMAGES)))
        for _ in range(data.draw(st.integers(1, 10))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            blob = blob[: data.draw(st.integers(0, len(blob)))]
        blob = bytes(blob)
    try:
        image = decode_image_rgb(blob, "fuzz")
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
        decodable = True
    except ImageDecodeError as err:
        assert "fuzz" in str(err)
        decodable = False
    name = "x" + data.draw(st.sampled_from([".jpg", ".png", ".gif", ".bmp", ".webp", ".tif", ".txt", ""]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        (root / "images" / name).write_bytes(blob)
        (root / "a.json").write_text(json.dumps({"images": [{"id": 1, "file_name": name, "width": 32, "height": 24}],
                                                 "annotations": [], "categories": CATEGORIES}))
        report = check_dataset(root / "a.json", workers=1)
        assert report.num_images == 1
        if not decodable:   # what training will skip, check-data must report as an error
            assert report.num_errors >= 1, [str(p) for p in report.problems]


# ============================================================================================ checkpoints

def _checkpoint_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint({"model": {"w": torch.arange(6.0), "b": torch.zeros(2)}, "epoch": 1, "class_names": ["a"]},
                        Path(tmp) / "c.pt")
        return (Path(tmp) / "c.pt").read_bytes()


CHECKPOINT_BYTES = _checkpoint_bytes()


# torch.load's warnings about the garbage it is fed (odd pickle protocols, odd objects) are expected here
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.filterwarnings("ignore::Warning:torch._weights_only_unpickler")
@_settings("checkpoints: random / mutated bytes")
@given(st.data())
def test_checkpoint_loading_refuses_garbage(data):
    if data.draw(st.booleans()):
        blob = data.draw(st.binary(max_size=400) | st.binary(max_size=50).map(lambda b: b"PK\x03\x04" + b))
    else:
        blob = bytearray(CHECKPOINT_BYTES)
        for _ in range(data.draw(st.integers(1, 12))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):
            blob = blob[: data.draw(st.integers(0, len(blob)))]
        blob = bytes(blob)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pt"
        path.write_bytes(blob)
        try:
            payload = load_checkpoint(path)
            assert isinstance(payload, dict) and payload["format"] == "multibox-checkpoint"
        except CheckpointError as err:
            assert str(path) in str(err)


# ============================================================================================ atheris

ATHERIS_HARNESS = textwrap.dedent('''
    import sys
    from collections import Counter

    import atheris

    with atheris.instrument_imports(include=["multibox.data.coco"]):
        from multibox.data.coco import CocoFormatError, coco_structure_errors, index_coco, parse_coco_json

    def one_input(data: bytes) -> None:
        try:
            coco = parse_coco_json(data, "<fuzz>")
        except CocoFormatError:
            return
        issues = coco_structure_errors(coco)
        if not issues:
            categories, records = index_coco(coco, Counter())
            assert all(r.bbox_ltwh.shape == (r.num_boxes, 4) for r in records)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
''')


ATHERIS_TARGET = "COCO JSON reader (atheris / libFuzzer, subprocess)"
ATHERIS_MISSING = ("atheris is not installed (pip install atheris): coverage-guided fuzzing of the COCO reader "
                   "skipped; the hypothesis tests above still run")


def libfuzzer_runs(output: str) -> int:
    """The number of inputs libFuzzer says it ran (its last line: ``Done 15000 runs in 7 second(s)``)."""
    done = re.findall(r"^Done (\d+) runs in ", output, re.MULTILINE)
    if not done:
        raise AssertionError(f"libFuzzer reported no 'Done N runs' line:\n{output[-3000:]}")
    return int(done[-1])


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason=ATHERIS_MISSING)
def test_atheris_coco_reader(tmp_path, fuzz_runs):
    """libFuzzer (through atheris) mutates a valid COCO file, coverage-guided, for ATHERIS_RUNS inputs or its time
    limit, whichever comes first; the number it ran is recorded (``fuzz_runs``) for the hostile-inputs table."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "valid.json").write_text(json.dumps(_valid_coco()))
    (corpus / "minimal.json").write_text('{"images": [], "annotations": [], "categories": []}')
    harness = tmp_path / "harness.py"
    harness.write_text(ATHERIS_HARNESS)
    done = subprocess.run([sys.executable, str(harness), str(corpus), f"-runs={int(ATHERIS_RUNS * SCALE)}",
                           "-max_len=2048", f"-max_total_time={int(25 * SCALE)}", "-rss_limit_mb=4096",
                           f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, timeout=180 * SCALE)
    tail = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, tail
    assert "crash-" not in "".join(p.name for p in tmp_path.iterdir()), tail
    runs = libfuzzer_runs(done.stdout + done.stderr)
    assert 0 < runs <= int(ATHERIS_RUNS * SCALE), tail
    fuzz_runs[ATHERIS_TARGET] = runs


def test_libfuzzer_run_count_is_read_from_its_last_line():
    output = "#2\tINITED cov: 10\n#4096\tpulse cov: 12\nDone 4096 runs in 3 second(s)\n"
    assert libfuzzer_runs(output) == 4096
    with pytest.raises(AssertionError, match="no 'Done N runs' line"):
        libfuzzer_runs("#2\tINITED cov: 10\n==123== ERROR: libFuzzer: deadly signal\n")
