"""Packed shards: same samples as the source, random access, DistributedSampler, idempotent / resumable
conversion, corruption detected on read, MindRecord input."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from _data_builders import make_broken_coco, make_clean_coco, make_voc
from multibox.cli import main
from multibox.data.coco import CocoDetection
from multibox.data.shards import ShardDataset, ShardError, convert_dataset, convert_source


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_clean_coco(tmp_path_factory.mktemp("coco"), num_images=7)


@pytest.fixture(scope="module")
def shards(coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    convert_source(str(coco), str(out), images_per_shard=3, workers=1)
    return out


def _same_sample(a, b):
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1]["boxes"], b[1]["boxes"]) and torch.equal(a[1]["labels"], b[1]["labels"])
    assert a[1]["image_id"] == b[1]["image_id"] and a[1]["orig_size"] == b[1]["orig_size"]


def test_samples_gt_and_names_equal_the_source(coco, shards):
    src, ds = CocoDetection(coco), ShardDataset(shards)
    assert ds.num_shards == 3 and len(ds) == len(src) == 7
    assert ds.class_names == src.class_names == ["background", "car", "dog", "bottle"]
    assert ds.label_to_category_id == src.label_to_category_id
    assert ds.image_ids == src.image_ids
    for i in (6, 0, 3, 1):   # random access, across shards
        _same_sample(ds[i], src[i])
        assert ds.read_bytes(i) == src.read_bytes(i)   # original encoded bytes
    assert ds.coco_gt() == src.coco_gt()
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["counts"]["images"] == 7 and manifest["class_names"] == src.class_names
    for entry in manifest["shards"]:
        assert entry["sha256"] == _sha(shards / entry["file"])


@pytest.mark.slow
def test_distributed_sampler_partitions_and_workers(shards):
    ds = ShardDataset(shards)
    parts = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=1, drop_last=True))
             for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 3 and not set(parts[0]) & set(parts[1])   # disjoint
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, sampler=parts[0],
                                         multiprocessing_context="spawn")
    ids = [t["image_id"] for _, t in loader]
    assert ids == [ds.image_ids[i] for i in parts[0]]


def test_convert_is_idempotent_and_resumes(coco, shards, tmp_path, monkeypatch):
    # Idempotent: a second run into the finished folder rewrites nothing, and an independent run gives equal bytes.
    before = {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in shards.glob("shard-*.arrow")}
    manifest = convert_source(str(coco), str(shards), images_per_shard=3, workers=1)
    assert manifest["_written"] == 0 and manifest["_reused"] == 3
    assert {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in shards.glob("shard-*.arrow")} == before

    # Interrupted after the first shard: the manifest says incomplete, readers refuse, a rerun finishes the rest.
    out = tmp_path / "resumed"
    calls = {"n": 0}
    real = CocoDetection.read_bytes

    def flaky(self, index):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, index)

    monkeypatch.setattr(CocoDetection, "read_bytes", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert_source(str(coco), str(out), images_per_shard=3, workers=1)
    monkeypatch.setattr(CocoDetection, "read_bytes", real)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    with pytest.raises(ShardError, match="did not finish"):
        ShardDataset(out)
    first = (out / "shard-00000.arrow").stat().st_mtime_ns
    manifest = convert_source(str(coco), str(out), images_per_shard=3, workers=1)
    assert manifest["_reused"] == 1 and manifest["_written"] == 2
    assert (out / "shard-00000.arrow").stat().st_mtime_ns == first
    assert {p.name: _sha(p) for p in out.glob("shard-*.arrow")} == {k: v[1] for k, v in before.items()}
    strip = lambda m: {k: v for k, v in m.items() if k != "source"}   # noqa: E731
    assert strip(json.loads((out / "manifest.json").read_text())) == strip(
        json.loads((shards / "manifest.json").read_text()))
    assert not list(out.glob(".*.tmp"))


def test_corrupted_shard_detected_on_read(shards, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    path = bad / "shard-00001.arrow"
    data = bytearray(path.read_bytes())
    ds_ok = ShardDataset(bad, verify="crc")
    assert ds_ok.locate(4) == (1, 1)
    start = bytes(data).find(ds_ok.read_bytes(4))   # flip one byte inside the image bytes of sample 4
    del ds_ok
    assert start > 0
    data[start + 200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00001\.arrow: checksum mismatch"):
        ShardDataset(bad)[4]
    with pytest.raises(ShardError, match=r"shard-00001\.arrow: row 1 .* CRC32"):
        ShardDataset(bad, verify="crc")[4]
    ShardDataset(bad)[0]   # other shards still read fine
    path.write_bytes(bytes(data[:1000]))   # truncated
    with pytest.raises(ShardError, match=r"shard-00001\.arrow: .*bytes, the manifest says"):
        ShardDataset(bad)


def test_unreadable_images_skipped_at_conversion_and_cli(tmp_path, capsys):
    ann, _ = make_broken_coco(tmp_path / "broken")
    assert main(["convert", str(ann), "--out", str(tmp_path / "out"), "--workers", "1"]) == 3   # EXIT_SKIPPED
    out = capsys.readouterr().out
    assert "4 unreadable images skipped" in out and "skipped truncated.jpg (image id 11)" in out
    assert "  left out: 1 annotation with an unknown category_id dropped (annotation id 105)\n" in out
    ds = ShardDataset(tmp_path / "out")
    assert len(ds) == len(CocoDetection(ann)) - 4
    assert ds.load_report["skipped_at_conversion"] == 4
    for i in range(len(ds)):
        image, target = ds[i]
        assert torch.isfinite(target["boxes"]).all()


def test_voc_to_shards_keeps_difficult_as_crowd(tmp_path):
    voc = make_voc(tmp_path, {"000001": [("dog", 2, 3, 20, 30, 0), ("cat", 25, 5, 50, 25, 1)],
                              "000002": [("person", 5, 5, 30, 20, 0)]}, {"trainval": ["000001", "000002"]})
    convert_source(str(voc), str(tmp_path / "s"), split="trainval", workers=1)
    ds = ShardDataset(tmp_path / "s")
    assert ds.source_kind == "voc"
    from multibox.data.voc import VOCDetection
    src = VOCDetection(voc, "trainval")
    assert ds.coco_gt() == src.coco_gt()
    assert [a["difficult"] for a in ds.coco_gt()["annotations"]] == [0, 1, 0]
    _same_sample(ds[0], src[0])


# --------------------------------------------------------------------------- MindRecord

def test_mindrecord_mapping_without_mindspore(tmp_path, coco):
    """The tutorial's rows ([ymin, xmin, ymax, xmax, label], label = rank of the category id) -> COCO boxes."""
    from multibox.data.mindrecord import MindRecordSource

    src = CocoDetection(coco)
    rows = []
    for i in range(len(src)):
        r = src.records[i]
        keep = ~r.crowd
        ltwh = r.bbox_ltwh[keep]
        labels = [src.category_id_to_label[int(c)] for c in r.category_ids[keep]]
        ann = np.stack([ltwh[:, 1], ltwh[:, 0], ltwh[:, 1] + ltwh[:, 3], ltwh[:, 0] + ltwh[:, 2],
                        np.asarray(labels, np.float64)], 1).round().astype(np.int32)
        rows.append({"img_id": np.int32(r.image_id), "image": src.read_bytes(i), "annotation": ann})

    def factory(path, columns):
        return ({c: row[c] for c in columns} for row in rows)

    ms = MindRecordSource("fake.mindrecord", coco, reader_factory=factory)
    assert ms.class_names == src.class_names and ms.image_ids == src.image_ids
    r0 = ms.records[0]
    assert r0.file_name == src.records[0].file_name and r0.width == src.records[0].width
    convert_dataset(ms, tmp_path / "s", images_per_shard=4, workers=1)
    ds = ShardDataset(tmp_path / "s")
    assert ds.read_bytes(5) == src.read_bytes(5)
    a = rows[2]["annotation"].astype(np.float64)   # [ymin, xmin, ymax, xmax, label]
    np.testing.assert_array_equal(ds.records[2].bbox_ltwh, np.c_[a[:, 1], a[:, 0], a[:, 3] - a[:, 1], a[:, 2] - a[:, 0]])
    assert [ds.label_to_category_id[int(l)] for l in rows[2]["annotation"][:, 4]] == ds.records[2].category_ids.tolist()


def test_mindrecord_written_by_mindspore(tmp_path, coco, mindspore_python):
    """A real MindRecord (mindspore.mindrecord.FileWriter, in the MindSpore venv) read with FileReader there,
    through multibox's own reader function, and converted here."""
    import inspect

    from multibox.data import mindrecord as mr

    src = CocoDetection(coco)
    payload = []
    for i in range(len(src)):
        r = src.records[i]
        ann = np.stack([r.bbox_ltwh[:, 1], r.bbox_ltwh[:, 0], r.bbox_ltwh[:, 1] + r.bbox_ltwh[:, 3],
                        r.bbox_ltwh[:, 0] + r.bbox_ltwh[:, 2],
                        [src.category_id_to_label[int(c)] for c in r.category_ids]], 1).reshape(-1, 5)
        payload.append((r.image_id, src.read_bytes(i), ann.astype(np.int32).tolist()))
    (tmp_path / "payload.json").write_text(json.dumps([(a, b.hex(), c) for a, b, c in payload]))
    script = textwrap.dedent(f"""
        import json, pickle, sys
        import numpy as np
        from mindspore.mindrecord import FileWriter
        path = {str(tmp_path / 'ssd.mindrecord0')!r}
        rows = json.load(open({str(tmp_path / 'payload.json')!r}))
        writer = FileWriter(path, shard_num=1, overwrite=True)
        writer.add_schema({{"img_id": {{"type": "int32"}}, "image": {{"type": "bytes"}},
                           "annotation": {{"type": "int32", "shape": [-1, 5]}}}}, "ssd")
        writer.write_raw_data([{{"img_id": a, "image": bytes.fromhex(b),
                                "annotation": np.array(c, np.int32).reshape(-1, 5)}} for a, b, c in rows])
        writer.commit()
        from typing import Iterator, Sequence
        exec({inspect.getsource(mr.mindspore_reader)!r})
        out = {{}}
        for cols in (["img_id", "annotation"], ["img_id", "image"]):
            out[tuple(cols)] = [{{k: (bytes(v) if k == "image" else np.asarray(v).tolist()) for k, v in row.items()}}
                               for row in mindspore_reader(path, cols)]
        pickle.dump(out, open({str(tmp_path / 'rows.pkl')!r}, "wb"))
    """)
    done = subprocess.run([mindspore_python, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GLOG_v": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    import pickle

    dumped = pickle.loads((tmp_path / "rows.pkl").read_bytes())

    def factory(path, columns):
        return iter(dumped[tuple(columns)])

    ms = mr.MindRecordSource(tmp_path / "ssd.mindrecord0", coco, reader_factory=factory)
    assert ms.image_ids == src.image_ids
    convert_dataset(ms, tmp_path / "s", workers=1)
    ds = ShardDataset(tmp_path / "s")
    for i in range(len(src)):
        assert ds.read_bytes(i) == src.read_bytes(i)
        expected = np.asarray(payload[i][2], np.float64).reshape(-1, 5)
        np.testing.assert_array_equal(ds.records[i].bbox_ltwh[:, :2], expected[:, [1, 0]])
        np.testing.assert_array_equal(ds.records[i].bbox_ltwh[:, 2:], expected[:, [3, 2]] - expected[:, [1, 0]])


def test_bench_data_reports_both_storages(tmp_path):
    from multibox.bench.data import bench_data

    out = bench_data(num_images=6, images_per_shard=4, repeats=1, workdir=tmp_path)
    assert out["images"] == 6
    for key in ("loose_fetch_per_s", "shards_fetch_per_s", "loose_decoded_per_s", "shards_decoded_per_s"):
        assert out[key] > 0
    assert list(tmp_path.iterdir()) == []   # temporary data removed


def test_convert_skips_exactly_what_the_training_decoder_cannot_decode(tmp_path):
    """The cheap check of convert (1/8-scale JPEG decode, the training decoder only on what it flags) drops the
    same images as decoding each with the training decoder, on a corpus of damaged JPEGs."""
    from test_validate import _coco_of, damaged_jpegs

    from multibox.data.coco import ImageDecodeError, decode_image_rgb
    from multibox.data.imagecheck import training_decode_problem

    files = damaged_jpegs()
    undecodable = set()
    for name, data in files.items():
        try:
            decode_image_rgb(data, name)
        except (OSError, ImageDecodeError):
            undecodable.add(name)
    assert len(undecodable) > 300
    assert {n for n, d in files.items() if training_decode_problem(d, n) is not None} == undecodable
    ann = _coco_of(tmp_path / "src", files)
    calls = []
    serial = convert_source(str(ann), str(tmp_path / "serial"), images_per_shard=100, workers=1,
                            on_progress=lambda done, total: calls.append((done, total)))
    parallel = convert_source(str(ann), str(tmp_path / "parallel"), images_per_shard=100, workers=2)
    skipped = {s["file_name"] for entry in serial["shards"] for s in entry["skipped"]}
    assert skipped == undecodable
    assert [e["sha256"] for e in parallel["shards"]] == [e["sha256"] for e in serial["shards"]]
    assert [e["skipped"] for e in parallel["shards"]] == [e["skipped"] for e in serial["shards"]]
    n = len(files)
    assert calls == [(0, n)] + [(k * 100, n) for k in range(1, (n + 99) // 100)] + [(n, n)]
