"""``multibox bench`` end to end at toy sizes (``--arch tiny``: both systems on the tiny trunk): every line runs, the
table and the JSON have the documented structure, and the ratios are consistent with the two measured numbers."""
from __future__ import annotations

import json

import pytest
import torch

from multibox.bench.suite import LINES, format_table, row
from multibox.cli import main


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--device", "cpu", "--arch", "tiny", "--threads", "1", "--train-batch", "2",
                     "--infer-batches", "1", "--iters", "1", "--warmup", "0", "--augment-images", "4",
                     "--eval-images", "10", "--eval-dets", "5", "--data-images", "8", "--e2e-images", "4",
                     "--workdir", str(out.parent), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_every_line_is_reported_with_positive_numbers(bench_report):
    rows = bench_report["rows"]
    names = [r["name"] for r in rows]
    for line in LINES:
        assert any(n.startswith(line) for n in names), (line, names)
    assert {"infer_e2e b1 worst", "infer_e2e b1 100 boxes/img", "augment cpu (1 thread)",
            "augment batched cpu (1 thread)", "train_e2e cpu aug, 0 workers"} <= set(names)
    for r in rows:
        assert set(r) >= {"name", "multibox", "reference", "unit", "ratio"}
        assert r["multibox"] > 0 and r["reference"] > 0 and r["ratio"] > 0
        # ratio = reference / multibox for seconds, multibox / reference for rates (rounded values in the JSON)
        expected = r["reference"] / r["multibox"] if r["unit"] == "s" else r["multibox"] / r["reference"]
        assert r["ratio"] == pytest.approx(expected, rel=0.05, abs=0.02), r
    b1 = next(r for r in rows if r["name"] == "infer_e2e b1 worst")
    assert b1["latency_ms"] == pytest.approx(1000.0 / b1["multibox"], rel=0.02)
    assert all(r["precision"] == "fp32" for r in rows if r["name"].startswith(("train", "infer")))
    assert bench_report["args"]["arch"] == "tiny" and bench_report["device"].startswith("cpu")


def test_table_and_ratio_conventions():
    rows = [row("eval x", 2.0, 10.0, "s", lower_is_better=True), row("infer_e2e b1 worst", 50.0, 25.0, "img/s",
                                                                    latency_ms=20.0, reference_latency_ms=40.0)]
    assert rows[0]["ratio"] == 5.0 and rows[1]["ratio"] == 2.0
    table = format_table(rows, "title").splitlines()
    assert table[0] == "title" and "ratio" in table[1]
    assert table[2].split()[-1] == "5.00x" and "latency 20.0 ms vs 40.0 ms" in table[3]
