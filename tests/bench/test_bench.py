"""``multibox bench`` end to end at toy sizes (``--arch tiny``: both systems on the tiny trunk): every line runs, the
table and the JSON have the documented structure, the ratios are consistent with the two measured numbers, and
each row is logged the moment it is measured."""
from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch

from multibox.bench import suite
from multibox.bench.suite import LINES, BenchOptions, format_line, format_table, row
from multibox.cli import build_parser, main


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """The bench at toy sizes with the default threads: (report, the log lines of multibox.bench, torch's threads
    before, torch's threads after)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    logger, lines = logging.getLogger("multibox.bench"), _Lines()
    level, threads = logger.level, torch.get_num_threads()
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        assert main(["bench", "--device", "cpu", "--arch", "tiny", "--train-batch", "2",
                     "--infer-batches", "1", "--iters", "1", "--warmup", "0", "--augment-images", "4",
                     "--eval-images", "10", "--eval-dets", "5", "--data-images", "8", "--e2e-images", "4",
                     "--workdir", str(out.parent), "--out", str(out)]) == 0
        threads_after = torch.get_num_threads()
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
        torch.set_num_threads(threads)
    return json.loads(out.read_text()), lines.messages, threads, threads_after


@pytest.fixture(scope="module")
def bench_report(bench_run):
    return bench_run[0]


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


def test_cpu_default_is_one_thread_stated_in_the_title(bench_run):
    """README's speed table is measured on one thread: so is ``multibox bench --device cpu`` by default, its title
    says so, and the process's own thread count is back afterwards."""
    report, _, before, after = bench_run
    assert report["args"]["threads"] == 1 and report["threads"] == 1
    assert report["title"].startswith("multibox bench on cpu, 1 thread (torch ")
    assert after == before
    assert BenchOptions(device="cpu").resolved().threads == 1
    assert BenchOptions(device="cuda").resolved().threads == 0   # torch's default next to a GPU
    assert BenchOptions(device="cpu", threads=0).resolved().threads == 0


def test_every_row_is_logged_once(bench_run):
    report, messages, _, _ = bench_run
    assert messages[0] == f"{report['title']}: measuring {', '.join(LINES)}"   # before the first measurement
    assert messages[1:] == [format_line(r) for r in report["rows"]]


def _bench_messages(caplog) -> list[str]:
    """The bench's own log lines (the measured code may log too)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("multibox.bench")]


def test_each_row_is_logged_as_soon_as_it_is_measured(monkeypatch, caplog):
    seen_before_data: list[str] = []

    def data_row(num_images, workdir=None):
        seen_before_data.extend(_bench_messages(caplog))
        return row("data stub", 2.0, 1.0, "smp/s")

    monkeypatch.setattr(suite, "bench_data_row", data_row)
    with caplog.at_level(logging.INFO, logger="multibox.bench"):
        rows = suite.run(BenchOptions(device="cpu", only="eval,data", eval_images=4, eval_dets=2))
    assert [r["name"] for r in rows] == ["eval 4 img, 8 dets", "data stub"]
    assert seen_before_data == [format_line(rows[0])]   # the eval row was out before the data line started
    assert _bench_messages(caplog) == [format_line(r) for r in rows]
    assert format_line(rows[1]) == "data stub: multibox 2 smp/s, reference 1 smp/s, ratio 2.00x"


def test_help_describes_every_option():
    parser = build_parser("bench")
    bench = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    options = [a for a in bench._actions if a.dest != "help"]
    assert len(options) > 20 and all(a.help for a in options), [a.dest for a in options if not a.help]
    text = " ".join(bench.format_help().split())   # argparse wraps to the terminal's width
    assert "default: 1 on the CPU" in text and "(default: bench.json)" in text


@pytest.mark.parametrize("arch, reference", [("ssdlite320_mobilenet_v3", "ssdlite320_mobilenet_v3_large"),
                                             ("ssd300_vgg16", "ssd300_vgg16")])
def test_archs_with_a_torchvision_twin_run_on_its_weights(arch, reference):
    """With a twin, multibox's detector gets torchvision's random weights: the same raw outputs on the same input."""
    torch.manual_seed(0)
    theirs = suite.torchvision_ssd(torch.device("cpu"), arch).eval()
    ours = suite.build_model(suite.paper_config(suite.arch_preset(arch), arch)).eval()
    ours.load_state_dict(suite.twin_weights(arch, theirs))
    size = suite.paper_config(suite.arch_preset(arch), arch).model.image_size
    x = torch.rand(1, 3, size, size)
    raw = {}
    theirs.head.register_forward_hook(lambda m, i, o: raw.update(o))
    with torch.no_grad():
        loc, cls = ours(x)
        theirs.head(list(theirs.backbone(x).values()))
    torch.testing.assert_close(loc, raw["bbox_regression"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls, raw["cls_logits"], rtol=1e-4, atol=1e-4)
    assert suite.reference_name(arch) == reference


def test_every_preset_arch_is_benchable_and_unknown_archs_are_refused():
    from multibox.config import preset_names
    from multibox.errors import InputError

    for preset in preset_names():
        arch = suite.load_config(preset).model.arch
        own = suite.arch_preset(arch)   # a preset of that arch (several presets may share one)
        assert own == "ssd300-vgg16" if arch == "tiny" else suite.load_config(own).model.arch == arch
        assert suite.reference_name(arch)
    assert suite.reference_name("ssd512_vgg16") == "ssd300_vgg16"
    with pytest.raises(InputError, match="unknown --arch resnet9000"):
        suite.arch_preset("resnet9000")
