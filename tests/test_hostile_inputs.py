"""Hostile inputs, tallied: every bad input below is fed to the readers (training's and ``check-data``'s) and must be
refused cleanly (the documented error, naming the file and, for annotations, the field) or reported; interrupted
checkpoint writes must lose nothing. ``test_the_table`` tabulates kinds, counts, crashes and data lost, with the
fuzzing of tests/test_fuzz.py (hypothesis budgets; atheris runs only where they happened in this session); it is
in that test's captured output (``pytest tests/test_hostile_inputs.py -rP``), or in the file named by
``MULTIBOX_HOSTILE_TABLE``.

Outcomes: ``refused`` (documented error / reported problem, message checked), ``inert`` (read, and the hostile part
verifiably had no effect), ``crash`` (any other exception), ``accepted`` (a bad input that got through).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from _data_builders import CATEGORIES, FailingFile, make_clean_coco, make_voc, picture
from multibox.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint
from multibox.data.coco import CocoDetection, CocoFormatError, ImageTooLargeError, collate_detection, decode_image_rgb
from multibox.data.shards import ShardDataset, ShardError, convert_dataset
from multibox.data.validate import check_dataset
from multibox.data.voc import VOCDetection, VocXmlError, parse_voc_xml

pytestmark = pytest.mark.slow   # hundreds of hostile inputs through every reader, plus training


@dataclass
class Outcome:
    kind: str
    name: str
    outcome: str            # refused | inert | crash | accepted
    detail: str = ""
    lost: int = 0           # checkpoints whose previous good state did not survive


def _probe(results: list, kind: str, name: str, fn) -> None:
    """Run one probe; ``fn`` returns (outcome, detail) or (outcome, detail, lost). Any exception escaping it is a
    crash (the probes catch exactly the documented error types)."""
    try:
        got = fn()
    except BaseException as err:   # noqa: BLE001 - everything that escapes is a crash, by definition
        if isinstance(err, (KeyboardInterrupt, SystemExit)) and not getattr(err, "_expected", False):
            raise
        results.append(Outcome(kind, name, "crash", f"{type(err).__name__}: {err}"[:300]))
        return
    results.append(Outcome(kind, name, *got))


def _refused_if(ok: bool, detail: str):
    return ("refused", detail) if ok else ("accepted", detail)


# ============================================================================================ images

def _png_header(width: int, height: int) -> bytes:
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _encode(fmt: str, array=None, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8) if array is None else array).save(buf, fmt, **kw)
    return buf.getvalue()


def _patched(data: bytes, offset: int, packed: bytes) -> bytes:
    out = bytearray(data)
    out[offset:offset + len(packed)] = packed
    return bytes(out)


def _real_png_bomb() -> bytes:
    """A real 3000 x 3000 image (9 Mpx) in ~9 kB: decodable, refused under a 4 Mpx limit."""
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, "PNG")
    return buf.getvalue()


def _bombs() -> dict[str, bytes]:
    jpeg = _encode("JPEG")
    sof = jpeg.index(b"\xff\xc0")
    webp_body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\0" * 4 + (16_000_000 - 1).to_bytes(3, "little") * 2
    return {
        "png_100000x100000.png": _png_header(100_000, 100_000),
        "png_9000x9000.png": _png_header(9000, 9000),              # just above the default 67 Mpx
        "jpeg_65000x65000.jpg": _patched(jpeg, sof + 5, struct.pack(">HH", 65000, 65000)),
        "gif_65535x65535.gif": _patched(_encode("GIF"), 6, struct.pack("<HH", 65535, 65535)),
        "bmp_200000x200000.bmp": _patched(_encode("BMP"), 18, struct.pack("<ii", 200_000, 200_000)),
        "ppm_300000x300000.ppm": b"P6\n300000 300000\n255\n" + b"\0" * 64,
        "webp_16Mx16M.webp": b"RIFF" + struct.pack("<I", len(webp_body)) + webp_body,
    }


# A 32x24 PNG with bytes changed by tests/test_fuzz.py: torchvision 0.29's decode_image kills the process on it
# (SIGSEGV after "libpng error: bad adaptive filter value"; cf. pytorch/vision#3613). PNG therefore goes to PIL.
TORCHVISION_SEGFAULT_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAYCAIAAAAUMWhjAAAHSUlEQVR4nH3NCV/ajAGA8VwkhAABwinIKaCIeOFVu1Zt5/quH2LfcVu39re1"
    "2letvt6Kghxyg0A4AgkBQkL2CebzAZ4/uINq75Urq+6j35uukJpN6/38fWP6nQJKqzU0qn0Pp676TqehZPxPB/qs/3HdfOuYv2QKIYBNUEE8"
    "k6Xc3inzS7UGv3CzADUSqtoV0w82u0vpCHYoFNvg4ocoo+jJR7Qtio5Rrlz24HzWMK/QHnMisJVzkYujkwunawQ5d2iwNJAB8zVJ1ulbIDMk"
    "VkUfYX76yZi9oA9dw4gvp/DcG8n8LdePoHGpPqdfvK2D1vD6IN79JiUk/9/fgki+G5ys2Ga7g5j+7MNg81TWb/BndGe5I9yoNbreRMPB2Bim"
    "99rHO9C+PTN63IppZeshBUHzziayU37lDgBA+mVvPeKmisnY0zke3we6CYBr52Kg11CTZnBRJ2kTGnzMIkXgRwDq/9qfZoFeZVoJggZTAJJF"
    "p6/ofh2Iju6U8LjrQVRBZBQ4fKZgdR02agcPbc5x7FAeGW1TZeto4nawAIiXPmb7morZRQA6PkuIyDVIAGThdeBJQNfP8DdQ7p4kQ4NwT0TJ"
    "HmJw2GSjTc2orl1JhZqIZ6SZdhSx1bo3sKT5yEwddTlgDxpCs4me9dHzOjDZj1wv/nOgIRQ+E9C79z+f9bbL352BfupWaH/9LIroDUotc2Vj"
    "PFC/BRXQENbDb1Ghj/8bbUBVIdFUDV8HrPy96ZerQ814qwVdaAFct06lfIZUycDjzO6nJ0VXTWWcKCU5uqjyrXl0ilWuwywzuX33yTqPmBSu"
    "TIt4HUALDK1ak5Lpl6WoNlaUSsvWP4viRTZtWbc+xywaI/fG1TpOhCKs5pJpIkBt0zktKJBm4qRRgK672Npm/HUgBYznu5zFS/CnWFjfkha6"
    "sf+yE8PqZgZ+zmtOcGHU+umGuoqG5UQ1ECNqo3pQHSuWZwqzMQry+Msn9+rXAYN1UVSYKr2RzZwrKLeCgwvSzPY1sbsNZEcb8F45usMPd9Sf"
    "ShmfZx0iZGPg54gwTs4vXUofBkFpZM7Seh1wTsg/vF+AGXJkdUg9hTwVWoqaPP2VNnZWXktVpiXq+jw6frJupYTLotSx3Gx3o7dazFE5Ts6B"
    "kD8QbZQuwgbV3TIQzrsSyjSc9AqjscrOyU212l7CUnBv6y8tuW/XX5R+TBz7QYAtw3iY6OeNHf6QD+BCe6Fcb4Z4cOSraW6X22CJDsESA1lE"
    "qAoh4448IcHJShT6EknKzcDYbORRQpaBEK+OcKYuxX80Med/d5WyVOrtsouoJ8a1A3r65BE4mzrLzGp9CNTxJHbX+tUBXB0abTqpFWaddnHU"
    "8erU2TXoN+W62c970qO6GMRxGwQ+taB10/LOgPi2Vze4SkB3JJK72yu6pUrXmE0/Tyj/FIS5/wjWURfg36gtTfDZQGm1+aKVQGyM66+AOoU7"
    "c/WqfuESr80K0IP+4ADC/ANaOenk5gUJDitVFfx3Dpz7nJ/9BwT6VnzJYr0T11e3hnFvEFDKx9yeBZt6tg7yfF3lqA8OikkYJduWt3IDrdp6"
    "qH2akkUzzhrXjNtIFpzanKtijv3iU9/khS5RXH80GL1/Ea7mF1YPSw1tILGUtdBikVeuWufhGt1slRDXQF0YiKKUdfrxusCTuB2rcb0lvoiz"
    "hpaeAoJ9Qw5FAorKL/HZAy1aELsi84gYh/kTdiX1vWUWLSi+YfspnfRW6hEZfej6DCZKdkFXCvP9VZVhxnHD9cJfR/01q+wSMT1WaRla6xJR"
    "wm0g1Nco3VyX/w67k5kUHaIpLxjesDRz6CphjHUQdhvtwcpJn9XBVi8QQ5mXeEu/4KTSR86AN07QQszeHjKbbZw0Viao98IynK+DsKNOWxXt"
    "+ratyFzbke1EVTA4jezxucYHBZ/moEInalryndDxcEDHnl4uZgYRRuIK/0Iu2jc1p9nS6XGOoC9R1TcOtsmpyb4qcqGYK0Qdtx6ezulapnwC"
    "ETUvy+XsVb2mMjTvrv36Md87IN/5OphcAQVoN8iM0mrIv/TQKCDe3RclOaTHYWKnsNxfQKk0pAC41MQ9X88BgavEs19W57U7onhIe/CZDyuP"
    "jEaju0O65cJGl32JfDdwlrlnpdrOeiwSv1bp6wIFEP9t3f6cLMrTNoubynw1uSaj2FxiXbfGkI/ZxOwadIY7wLsLP7KRAA/BrMFGTefGPcKP"
    "qYc+tXtglEX05m7Y5jKCtkVi2tBUJ0PDNvYd54gxjwwVAPd3QLG2dFi9gT3wdtXR0DfLxAKhwexNLS6dCihIMs38ghL/uq8wFlgadURy7doS"
    "0M8oNVBzSRMQWD5ZxcQ9zH814lezbJHnElU8SPrJSU3clkEk8fAeWKnpIPOWy1Ggp5vDHJJPE5+iGqJHn1vSmH62QXbMbGCm1SirqqSkcwoT"
    "8yR5FyE88rJUesKdpF2uVpW5UZPUJuwYTdAyKDzKkwUF1wANw/8BegvCFvwXGs4AAAAASUVORK5CYII="
)


def _coco_over(root: Path, files: dict[str, bytes]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, (name, data) in enumerate(files.items()):
        (root / "images" / name).write_bytes(data)
        images.append({"id": i + 1, "file_name": name, "width": 8, "height": 8})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 17, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0})
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return path


def _image_probes(results: list, root: Path) -> None:
    kind = "decompression bombs / absurd image sizes"
    bombs = _bombs()
    ann = _coco_over(root / "bombs", bombs)
    report = check_dataset(ann, workers=1)
    dataset = CocoDetection(ann)
    for index, (name, data) in enumerate(bombs.items()):
        def one(name=name, data=data, index=index):
            try:
                decode_image_rgb(data, name)
                return "accepted", "decoded"
            except ImageTooLargeError as err:
                if name not in str(err) or "refused" not in str(err):
                    return "accepted", f"unclear message: {err}"
            reported = [p for p in report.by_kind("oversized_image") if p.file.endswith(name)]
            skipped = dataset[index] is None
            return _refused_if(bool(reported) and skipped, f"check-data {len(reported)}, training skipped {skipped}")
        _probe(results, kind, name, one)

    def real_bomb():
        data = _real_png_bomb()
        assert decode_image_rgb(data, "ok", max_pixels=None).shape == (3, 3000, 3000)   # a real image...
        try:
            decode_image_rgb(data, "bomb.png", max_pixels=4_000_000)
            return "accepted", "decoded"
        except ImageTooLargeError as err:
            ds_root = root / "real_bomb"
            path = _coco_over(ds_root, {"bomb.png": data})
            ds = CocoDetection(path)
            ds.max_image_pixels = 4_000_000      # data.max_image_pixels
            rep = check_dataset(path, workers=1, max_pixels=4_000_000)
            return _refused_if(ds[0] is None and len(rep.by_kind("oversized_image")) == 1, str(err)[:80])
    _probe(results, kind, "real 3000x3000 PNG under a 4 Mpx limit", real_bomb)


def _native_decoder_probes(results: list, root: Path) -> None:
    kind = "corrupted images that crash native decoders"

    def one():
        root.mkdir(parents=True, exist_ok=True)
        (root / "crash.png").write_bytes(TORCHVISION_SEGFAULT_PNG)
        code = ("import sys; from multibox.data.coco import ImageDecodeError, read_image_rgb\n"
                "try:\n    read_image_rgb(sys.argv[1])\nexcept ImageDecodeError as err:\n    print('REFUSED', err)")
        done = subprocess.run([sys.executable, "-c", code, str(root / "crash.png")], capture_output=True, text=True,
                              timeout=120)   # a subprocess: a regression must not take pytest down with it
        if done.returncode != 0:
            return "crash", f"exit {done.returncode}: {done.stderr[-200:]}"
        ann = _coco_over(root / "set", {"crash.png": TORCHVISION_SEGFAULT_PNG})
        reported = check_dataset(ann, workers=1).by_kind("unreadable_image")
        return _refused_if("REFUSED" in done.stdout and len(reported) == 1, done.stdout.strip()[-100:])
    _probe(results, kind, "PNG: bad adaptive filter value (torchvision SIGSEGV)", one)


def _file_probes(results: list, root: Path) -> None:
    kind = "0-byte and wrongly named files"
    good = picture(40, 60, 1, [(5, 5, 30, 30)])
    png, jpeg = _encode("PNG", good), _encode("JPEG", good)
    files = {
        "empty.jpg": (b"", "unreadable_image"),
        "empty.png": (b"", "unreadable_image"),
        "png_named.jpg": (png, "wrong_extension"),
        "jpeg_named.png": (jpeg, "wrong_extension"),
        "text_named.jpg": (b"just some notes, not a picture\n" * 3, "unreadable_image"),
        "html_named.jpg": (b"<!doctype html><html><body>404 Not Found</body></html>", "unreadable_image"),
        "json_named.png": (b'{"images": []}', "unreadable_image"),
        "zip_named.jpg": (b"PK\x03\x04" + b"\0" * 60, "unreadable_image"),
        "jpeg_truncated_to_20_bytes.jpg": (jpeg[:20], "unreadable_image"),
    }
    ann = _coco_over(root / "files", {name: data for name, (data, _) in files.items()})
    report = check_dataset(ann, workers=1)
    dataset = CocoDetection(ann)
    for index, (name, (data, expected)) in enumerate(files.items()):
        def one(name=name, data=data, expected=expected, index=index):
            hits = [p for p in report.by_kind(expected) if p.file.endswith(name)]
            sample = dataset[index]
            if expected == "wrong_extension":   # reported, and decoded by content all the same
                ok = bool(hits) and sample is not None and sample[0].shape == (3, 40, 60)
            else:                               # reported and skipped by training (counted in Batch.skipped)
                ok = bool(hits) and sample is None and collate_detection([sample]).skipped == 1
                if name.startswith("empty"):
                    ok = ok and "empty" in hits[0].message
                if name.startswith("text"):
                    ok = ok and "text" in hits[0].message
            return _refused_if(ok, f"{expected}: {hits[0].message[:80] if hits else 'not reported'}")
        _probe(results, kind, name, one)


# ============================================================================================ VOC XML

def _billion_laughs() -> str:
    entities = '<!ENTITY lol "lol">\n' + "".join(
        f'<!ENTITY lol{i} "{("&lol;" if i == 1 else f"&lol{i - 1};") * 10}">\n' for i in range(1, 10))
    return f'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n{entities}]>\n<annotation><filename>&lol9;</filename></annotation>'


XML_ATTACKS = {
    "billion_laughs": _billion_laughs(),
    "quadratic_blowup": '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "' + "A" * 20000 + '">]><annotation>'
                        "<filename>" + "&x;" * 2000 + "</filename></annotation>",
    "external_entity_file": '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                            "<annotation><filename>&x;</filename></annotation>",
    "external_entity_url": '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "http://example.invalid/x">]>'
                           "<annotation><filename>&x;</filename></annotation>",
    "external_dtd": '<?xml version="1.0"?><!DOCTYPE annotation SYSTEM "http://example.invalid/voc.dtd">'
                    "<annotation><filename>a.jpg</filename></annotation>",
    "parameter_entity": '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>'
                        "<annotation/>",
    "internal_entity_in_box": '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY n "12">]><annotation><object>'
                              "<name>dog</name><bndbox><xmin>&n;</xmin><ymin>1</ymin><xmax>20</xmax><ymax>20</ymax>"
                              "</bndbox></object></annotation>",
}


def _xml_probes(results: list, root: Path) -> None:
    kind = "VOC: XML entity expansion, DTDs, path traversal"
    voc = make_voc(root, {"000001": [("dog", 1, 1, 20, 20, 0)]}, {"trainval": ["000001"]})
    stems = ["000001"]
    for k, (name, text) in enumerate(XML_ATTACKS.items()):
        stem = f"9{k:05d}"
        (voc / "Annotations" / f"{stem}.xml").write_text(text)
        shutil.copy(voc / "JPEGImages" / "000001.jpg", voc / "JPEGImages" / f"{stem}.jpg")
        stems.append(stem)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(stems) + "\n")
    report = check_dataset(voc, workers=1)
    dataset = VOCDetection(voc, split="trainval")
    dropped = {Path(path).stem for path, _ in dataset.xml_problems}
    for k, name in enumerate(XML_ATTACKS):
        stem = f"9{k:05d}"
        xml = voc / "Annotations" / f"{stem}.xml"

        def one(xml=xml, stem=stem):
            try:
                info, objects, _ = parse_voc_xml(xml)
                return "accepted", f"parsed: {info} {objects}"
            except VocXmlError as err:
                if str(xml) not in str(err) or "refused" not in str(err):
                    return "accepted", f"unclear message {err}"
            hits = [p for p in report.by_kind("bad_annotation_file") if p.file == str(xml)]
            return _refused_if(bool(hits) and stem in dropped, str(hits[0].message)[:80] if hits else "not reported")
        _probe(results, kind, name, one)

    def xinclude():
        xml = voc / "Annotations" / "xinclude.xml"
        xml.write_text('<annotation xmlns:xi="http://www.w3.org/2001/XInclude"><filename>a.jpg</filename>'
                       '<xi:include href="/etc/passwd" parse="text"/></annotation>')
        info, objects, _ = parse_voc_xml(xml)
        return ("inert", "XInclude not processed") if info["filename"] == "a.jpg" and not objects else ("accepted", "")
    _probe(results, kind, "xinclude", xinclude)

    def traversal():
        (voc / "ImageSets" / "Main" / "evil.txt").write_text("000001\n../../../../../etc/hostname\n/etc/passwd\n")
        ds = VOCDetection(voc, split="evil")
        rep = check_dataset(voc, split="evil", workers=1)
        hits = [p for p in rep.by_kind("bad_annotation_file") if "not a plain file name" in p.message]
        ok = len(ds) == 1 and ds.load_report["bad_split_ids_dropped"] == 2 and len(hits) == 2
        return _refused_if(ok, f"{ds.load_report['bad_split_ids_dropped']} ids dropped, {len(hits)} reported")
    _probe(results, kind, "split ids ../../etc/hostname and /etc/passwd", traversal)


# ============================================================================================ COCO JSON

def _valid_coco() -> dict:
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": 60, "height": 40},
                       {"id": 2, "file_name": "b.jpg", "width": 60, "height": 40}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 17, "bbox": [1, 1, 5, 5], "area": 25,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [2, 2, 6, 6], "area": 36,
                             "iscrowd": 0}],
            "categories": [dict(c) for c in CATEGORIES]}


def _mutated(path: list, value, delete: bool = False) -> bytes:
    coco = _valid_coco()
    node = coco
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return json.dumps(coco).encode()


COCO_ATTACKS: list[tuple[str, bytes, str]] = [
    ("truncated JSON", json.dumps(_valid_coco()).encode()[:-40], "invalid JSON at line 1, column"),
    ("trailing comma", b'{"images": [], "categories": [],}', "invalid JSON at line 1, column"),
    ("empty file", b"", "invalid JSON at line 1, column 1"),
    ("not UTF-8", b'{"images": [{"file_name": "\xff\xfe"}]}', "not UTF-8"),
    ("nested 100000 deep", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("top level is a list", b"[1, 2, 3]", "top level: expected a JSON object"),
    ("top level is a string", b'"images"', "top level: expected a JSON object"),
    ("images missing", _mutated(["images"], None, delete=True), "images: missing"),
    ("images is an object", _mutated(["images"], {"id": 1}), "images: expected a list"),
    ("annotations is a string", _mutated(["annotations"], "none"), "annotations: expected a list"),
    ("categories is a number", _mutated(["categories"], 3), "categories: expected a list"),
    ("image is a string", _mutated(["images", 1], "b.jpg"), "images[1]: expected an object"),
    ("image id missing", _mutated(["images", 0, "id"], None, delete=True), "images[0].id: missing"),
    ("image id is a string", _mutated(["images", 0, "id"], "7"), 'images[0].id: expected an integer, got "7"'),
    ("image id 10**30", _mutated(["images", 0, "id"], 10**30), "images[0].id: expected an integer"),
    ("file_name is a number", _mutated(["images", 0, "file_name"], 5), "images[0].file_name: expected a string"),
    ("width is text", _mutated(["images", 0, "width"], "abc"), 'images[0].width: expected a non-negative integer'),
    ("height is negative", _mutated(["images", 1, "height"], -5), "images[1].height: expected a non-negative"),
    ("bbox is text", _mutated(["annotations", 1, "bbox"], "abc"),
     'annotations[1].bbox: expected 4 numbers [left, top, width, height], got "abc"'),
    ("bbox has 3 numbers", _mutated(["annotations", 1, "bbox"], [1, 2, 3]), "annotations[1].bbox: expected 4 numbers"),
    ("bbox has a string", _mutated(["annotations", 0, "bbox"], [1, "2", 3, 4]), "annotations[0].bbox"),
    ("bbox has a boolean", _mutated(["annotations", 0, "bbox"], [True, 1, 2, 3]), "annotations[0].bbox"),
    ("bbox number too large for a float", _mutated(["annotations", 0, "bbox"], [10**400, 1, 2, 3]),
     "annotations[0].bbox"),
    ("image_id null", _mutated(["annotations", 0, "image_id"], None), "annotations[0].image_id: expected an integer"),
    ("category_id missing", _mutated(["annotations", 1, "category_id"], None, delete=True),
     "annotations[1].category_id: missing"),
    ("area is text", _mutated(["annotations", 0, "area"], "big"), "annotations[0].area: expected a number"),
    ("iscrowd is 2", _mutated(["annotations", 0, "iscrowd"], 2), "annotations[0].iscrowd: expected 0 or 1"),
    ("annotation is a list", _mutated(["annotations", 0], [1, 2]), "annotations[0]: expected an object"),
    ("category is a list", _mutated(["categories", 0], [17, "dog"]), "categories[0]: expected an object"),
    ("category id 1.5", _mutated(["categories", 1, "id"], 1.5), "categories[1].id: expected an integer"),
    ("category name is an object", _mutated(["categories", 2, "name"], {"a": 1}), "categories[2].name"),
]


def _coco_probes(results: list, root: Path) -> None:
    kind = "malformed COCO JSON"
    root.mkdir(parents=True, exist_ok=True)
    for k, (name, data, expected) in enumerate(COCO_ATTACKS):
        path = root / f"case{k:02d}.json"
        path.write_bytes(data)

        def one(path=path, expected=expected):
            try:
                CocoDetection(path)
                return "accepted", "loaded"
            except CocoFormatError as err:
                message = str(err)
            report = check_dataset(path, images=False, workers=1)
            reported = [str(p) for p in report.problems if p.kind in ("bad_annotation_file", "malformed_annotation")]
            ok = str(path) in message and expected in message and any(expected in r for r in reported)
            return _refused_if(ok, message.replace(str(path), "FILE")[:110])
        _probe(results, kind, name, one)


# ============================================================================================ shards

def _rewrite_shard(folder: Path, change) -> None:
    """Replace shard 0's table by ``change(table)`` and update the manifest to match (a consistent forgery)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    path = folder / manifest["shards"][0]["file"]
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()   # a copy: the file is rewritten
    table = change(table)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    import hashlib
    manifest["shards"][0].update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _set_column(table: pa.Table, name: str, array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _flip_image_byte(path: Path) -> None:
    """Flip a byte inside the first stored JPEG (the image column), leaving the Arrow structure valid."""
    data = bytearray(path.read_bytes())
    data[data.index(b"\xff\xd8\xff") + 200] ^= 0xFF
    path.write_bytes(bytes(data))


SHARD_ATTACKS = {
    "image byte flipped (sha256 verify)": ("sha256", lambda d: _flip_image_byte(d / "shard-00000.arrow")),
    "image byte flipped (crc verify)": ("crc", lambda d: _flip_image_byte(d / "shard-00000.arrow")),
    "shard truncated": ("sha256", lambda d: (d / "shard-00000.arrow").write_bytes(
        (d / "shard-00000.arrow").read_bytes()[:1000])),
    "shard replaced by random bytes": ("none", lambda d: (d / "shard-00000.arrow").write_bytes(
        np.random.default_rng(0).integers(0, 256, (d / "shard-00000.arrow").stat().st_size, np.uint8).tobytes())),
    "shard missing": ("sha256", lambda d: (d / "shard-00000.arrow").unlink()),
    "manifest not JSON": ("sha256", lambda d: (d / "manifest.json").write_text("{not json")),
    "manifest is a list": ("sha256", lambda d: (d / "manifest.json").write_text("[]")),
    "manifest incomplete": ("sha256", lambda d: _edit_manifest(d, lambda m: m.update(complete=False))),
    "shard file ../../etc/passwd": ("none", lambda d: _edit_manifest(
        d, lambda m: m["shards"][0].update(file="../../../../etc/passwd"))),
    "shard file /etc/passwd": ("none", lambda d: _edit_manifest(d, lambda m: m["shards"][0].update(file="/etc/passwd"))),
    "rows is text": ("none", lambda d: _edit_manifest(d, lambda m: m["shards"][0].update(rows="2"))),
    "categories missing": ("none", lambda d: _edit_manifest(d, lambda m: m.pop("categories"))),
    "unknown category id in a row": ("none", lambda d: _rewrite_shard(d, lambda t: _set_column(
        t, "category_ids", pa.array([[999] * len(r) for r in t.column("category_ids").to_pylist()],
                                    pa.list_(pa.int64()))))),
    "bbox list of 3 values per box": ("none", lambda d: _rewrite_shard(d, lambda t: _set_column(
        t, "bbox_ltwh", pa.array([r[:-1] if r else [1.0] for r in t.column("bbox_ltwh").to_pylist()],
                                 pa.list_(pa.float64()))))),
    "image column of the wrong type": ("none", lambda d: _rewrite_shard(d, lambda t: _set_column(
        t, "image", pa.array(["x"] * t.num_rows, pa.string())))),
    "null image": ("none", lambda d: _rewrite_shard(d, lambda t: _set_column(
        t, "image", pa.array([None] * t.num_rows, pa.large_binary())))),
}


def _shard_probes(results: list, root: Path) -> None:
    kind = "corrupted / forged shard folders"
    source = CocoDetection(make_clean_coco(root / "src", num_images=4))
    clean = root / "clean"
    convert_dataset(source, clean, images_per_shard=2, workers=1)
    for k, (name, (verify, corrupt)) in enumerate(SHARD_ATTACKS.items()):
        folder = root / f"case{k:02d}"
        shutil.copytree(clean, folder)
        corrupt(folder)

        def one(folder=folder, verify=verify):
            try:
                ds = ShardDataset(folder, verify=verify)
                for i in range(len(ds)):
                    ds.read_bytes(i)
                return "accepted", "read every row"
            except ShardError as err:
                message = str(err)
            report = check_dataset(folder, workers=1)
            ok = str(folder) in message and report.num_errors > 0
            return _refused_if(ok, message.replace(str(folder), "DIR")[:110])
        _probe(results, kind, name, one)


# ============================================================================================ checkpoints

class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _checkpoint_probes(results: list, root: Path) -> None:
    kind = "hostile checkpoint files"
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "pwned"
    good = root / "good.pt"
    save_checkpoint({"model": {"w": torch.zeros(4)}, "config": {}, "class_names": ["background", "a"]}, good)
    with zipfile.ZipFile(good) as z:
        records = {i.filename: z.read(i) for i in z.infolist()}

    def write_torch(obj, legacy=False):
        def make(path):
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        return make

    def rezip(compression):
        def make(path):
            with zipfile.ZipFile(path, "w", compression) as z:
                for name, data in records.items():
                    z.writestr(name, data)
        return make

    def with_field(field, value):
        payload = torch.load(good, weights_only=True)
        payload[field] = value
        return write_torch(payload)

    header = {"format": "multibox-checkpoint", "version": 1}
    cases = {
        "os.system in the pickle": write_torch({**header, "model": _Call(os.system, f"touch {marker}")}),
        "eval in the pickle": write_torch({**header, "x": _Call(eval, f"open({str(marker)!r}, 'w')")}),
        "exec in the pickle": write_torch({**header, "x": _Call(exec, f"open({str(marker)!r}, 'w')")}),
        "subprocess.Popen in the pickle": write_torch({**header, "x": _Call(subprocess.Popen, ["touch", str(marker)])}),
        "builtins.getattr in the pickle": write_torch({**header, "x": _Call(getattr, "os", "upper")}),
        "legacy pickle format": write_torch({**header, "model": {}}, legacy=True),
        "zip with deflated records (bomb)": rezip(zipfile.ZIP_DEFLATED),
        "empty file": lambda p: p.write_bytes(b""),
        "random bytes": lambda p: p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes()),
        "truncated checkpoint": lambda p: p.write_bytes(good.read_bytes()[: good.stat().st_size // 2]),
        "zip header then garbage": lambda p: p.write_bytes(b"PK\x03\x04" + b"\x11" * 500),
        "plain torch dict": write_torch({"state_dict": {"w": torch.zeros(1)}}),
        "list payload": write_torch([1, 2, 3]),
        "model is not tensors": with_field("model", {"w": "zeros"}),
        "class_names is a string": with_field("class_names", "background"),
        "version is text": with_field("version", "1"),
        "version from the future": with_field("version", 99),
    }
    for k, (name, make) in enumerate(cases.items()):
        path = root / f"case{k:02d}.pt"
        make(path)

        def one(path=path):
            try:
                load_checkpoint(path)
                return "accepted", "loaded"
            except CheckpointError as err:
                ok = str(path) in str(err) and not marker.exists()
                return _refused_if(ok, str(err).replace(str(path), "FILE")[:110])
        _probe(results, kind, name, one)


def _write_probes(results: list, root: Path) -> None:
    """Failures while a checkpoint is written: the previous one must survive (``lost`` counts those that did not)."""
    kind = "interrupted checkpoint writes"
    import multibox.checkpoint as ckpt

    def check(path: Path, step: int) -> int:
        try:
            state = load_checkpoint(path)
        except CheckpointError:
            return 1
        return int(state["step"] != step)

    errors = {"disk full (ENOSPC) part-way": OSError(28, "No space left on device"),
              "I/O error (EIO) part-way": OSError(5, "Input/output error"),
              "quota exceeded (EDQUOT) part-way": OSError(122, "Disk quota exceeded"),
              "Ctrl-C part-way": KeyboardInterrupt()}
    for k, (name, error) in enumerate(errors.items()):
        path = root / f"w{k}" / "last.pt"

        def one(path=path, error=error):
            save_checkpoint({"model": {"w": torch.ones(100)}, "step": 1}, path)
            real = os.fdopen
            ckpt.os.fdopen = lambda fd, mode: FailingFile(real(fd, mode), 1000, error)
            try:
                save_checkpoint({"model": {"w": torch.zeros(100_000)}, "step": 2}, path)
            except (CheckpointWriteError, KeyboardInterrupt):
                pass
            finally:
                ckpt.os.fdopen = real
            lost = check(path, 1)
            leftovers = [p.name for p in path.parent.iterdir() if p.name != "last.pt"]
            return ("refused" if not leftovers else "accepted", f"leftovers {leftovers}", lost)
        _probe(results, kind, name, one)

    def unpicklable():
        path = root / "w_unpicklable" / "last.pt"
        save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, path)
        try:
            save_checkpoint({"model": {"w": torch.ones(3)}, "step": 2, "bad": lambda: None}, path)
            return "accepted", "saved", 0
        except CheckpointWriteError as err:
            return "refused", str(err)[-60:], check(path, 1)
    _probe(results, kind, "serialisation error mid-save", unpicklable)

    script = """
import sys, torch
from multibox.checkpoint import save_checkpoint

for k in range(int(sys.argv[2]), 10**6):
    save_checkpoint({"model": {"w": torch.full((500_000,), float(k))}, "step": k}, sys.argv[1])
    print(k, flush=True)
"""
    path, last = root / "w_kill" / "last.pt", 0
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        def one(attempt=attempt):
            nonlocal last
            proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(last + 1)], stdout=subprocess.PIPE,
                                    text=True)
            proc.stdout.readline()
            time.sleep(0.05 * (attempt + 1))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            try:
                state = load_checkpoint(path)
            except CheckpointError:
                return "refused", "last.pt unreadable", 1
            lost = int(not (state["step"] > last and bool((state["model"]["w"] == state["step"]).all())))
            last = state["step"]
            return "refused", f"killed, last.pt at step {state['step']}", lost
        _probe(results, kind, f"SIGKILL while writing #{attempt + 1}", one)


def _nonfinite_probes(results: list) -> None:
    from engine.test_nonfinite import _run   # the toy model and scripted NaNs of tests/engine/test_nonfinite.py

    kind = "non-finite training steps"
    for bad in ("nan_input", "nan_loss", "nan_grad"):
        def one(bad=bad):
            result, records, snaps, _ = _run(["ok", bad, bad, "ok"])
            unchanged = all(torch.equal(snaps[0][k], snaps[2][k]) for k in snaps[0])
            logged = [r["step"] for r in records if r["kind"] == "nonfinite"] == [1, 2]
            return ("refused" if unchanged and logged else "accepted", "skipped, logged, no change",
                    int(not unchanged))
        _probe(results, kind, bad, one)


# ============================================================================================ the tally

@pytest.fixture(scope="module")
def tally(tmp_path_factory) -> list[Outcome]:
    root = tmp_path_factory.mktemp("hostile")
    results: list[Outcome] = []
    _image_probes(results, root / "images")
    _native_decoder_probes(results, root / "native")
    _file_probes(results, root / "files")
    _xml_probes(results, root / "voc")
    _coco_probes(results, root / "coco")
    _shard_probes(results, root / "shards")
    _checkpoint_probes(results, root / "checkpoints")
    _write_probes(results, root / "writes")
    _nonfinite_probes(results)
    return results


def test_every_bad_input_is_refused_cleanly(tally):
    failures = [o for o in tally if o.outcome not in ("refused", "inert")]
    assert not failures, "\n".join(f"{o.kind} / {o.name}: {o.outcome}: {o.detail}" for o in failures)
    assert len(tally) >= 100


def test_no_data_lost(tally):
    lost = [o for o in tally if o.lost]
    assert not lost, [(o.kind, o.name, o.detail) for o in lost]


def _fuzz_table(fuzz_runs: dict[str, int]) -> list[str]:
    """The fuzz targets of tests/test_fuzz.py: hypothesis's budgets, and what atheris ran in this session (a count
    only when it ran, the reason when it was skipped)."""
    import importlib.util

    from test_fuzz import ATHERIS_TARGET, FUZZ_BUDGET, SCALE

    lines = ["| fuzz target (tests/test_fuzz.py) | inputs |", "|---|---:|"]
    lines += [f"| {name} (hypothesis) | at most {max(1, int(n * SCALE))} per run |" for name, n in FUZZ_BUDGET.items()]
    if ATHERIS_TARGET in fuzz_runs:
        atheris = f"{fuzz_runs[ATHERIS_TARGET]} in this session"
    elif importlib.util.find_spec("atheris") is None:
        atheris = "skipped: atheris is not installed"
    else:
        atheris = "not run in this session"
    return lines + [f"| {ATHERIS_TARGET} | {atheris} |"]


def _table(tally: list[Outcome], fuzz_runs: dict[str, int]) -> str:
    rows = defaultdict(lambda: [0, 0, 0, 0])
    for o in tally:
        row = rows[o.kind]
        row[0] += 1
        row[1] += o.outcome in ("refused", "inert")
        row[2] += o.outcome == "crash"
        row[3] += o.lost
    lines = ["| bad input kind | tried | refused / reported cleanly | crashes | data lost |",
             "|---|---:|---:|---:|---:|"]
    for kind, (tried, clean, crashes, lost) in rows.items():
        lines.append(f"| {kind} | {tried} | {clean} | {crashes} | {lost} |")
    total = [sum(r[i] for r in rows.values()) for i in range(4)]
    lines.append(f"| **total** | **{total[0]}** | **{total[1]}** | **{total[2]}** | **{total[3]}** |")
    return "\n".join(lines + [""] + _fuzz_table(fuzz_runs))


def test_the_table(tally, fuzz_runs):
    """The table goes to the captured output (shown with ``-rP``), never past pytest's capture among the dots."""
    table = _table(tally, fuzz_runs)
    print(table)
    out = os.environ.get("MULTIBOX_HOSTILE_TABLE")
    if out:
        Path(out).write_text(table + "\n")
    assert f"| **total** | **{len(tally)}** |" in table and f"| {tally[0].kind} |" in table


def test_the_table_states_atheris_runs_only_when_they_happened():
    from test_fuzz import ATHERIS_RUNS, ATHERIS_TARGET

    tally = [Outcome("COCO JSON", "a", "refused"), Outcome("COCO JSON", "b", "crash", lost=1)]
    table = _table(tally, {})
    assert "| COCO JSON | 2 | 1 | 1 | 1 |" in table
    atheris = next(line for line in table.splitlines() if line.startswith(f"| {ATHERIS_TARGET} |"))
    assert str(ATHERIS_RUNS) not in atheris
    assert atheris.endswith(("| skipped: atheris is not installed |", "| not run in this session |")), atheris
    assert f"| {ATHERIS_TARGET} | 1234 in this session |" in _table(tally, {ATHERIS_TARGET: 1234})
