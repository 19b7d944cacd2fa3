"""Tests for multibox.evaluation.plots."""

from __future__ import annotations

import json
import math
import struct
import sys

import pytest

from multibox.evaluation.plots import build_training_figure, plot_training_curves, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_jsonl(path, with_eval: bool, nonpositive_loss: bool = False, partial_last_line: bool = False):
    lines = []
    step = 0
    for epoch in range(3):
        for _ in range(10):
            step += 1
            loss = 8.0 * math.exp(-0.1 * step)
            rec = {"kind": "train", "step": step, "epoch": epoch, "loss": loss,
                   "lr": 0.05 * min(1.0, step / 10), "loss_cls": 0.6 * loss, "loss_loc": 0.4 * loss}
            lines.append(json.dumps(rec))
        if with_eval:
            lines.append(json.dumps({"kind": "eval", "epoch": epoch, "step": step,
                                     "AP": 0.1 * (epoch + 1), "AP50": 0.2 * (epoch + 1)}))
    if nonpositive_loss:
        lines.append(json.dumps({"kind": "train", "step": step + 1, "epoch": 2, "loss": 0.0, "lr": 0.01}))
    lines.append("")  # blank line
    lines.append(json.dumps({"kind": "note", "text": "ignored"}))
    text = "\n".join(lines) + "\n"
    if partial_last_line:
        text += '{"kind": "train", "step": 99, "lo'
    path.write_text(text)
    return path


def _check_png(path):
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 450)  # figsize (12, 4.5) at 100 dpi
    assert data[-8:-4] == b"IEND"


@pytest.mark.parametrize("with_eval", [True, False])
def test_plot_writes_png(tmp_path, with_eval):
    metrics = _write_jsonl(tmp_path / "metrics.jsonl", with_eval=with_eval, partial_last_line=True)
    out = plot_training_curves(metrics, tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    _check_png(out)
    assert not list((tmp_path / "plots").glob("*.tmp"))


def test_plot_with_no_records_at_all(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    _check_png(plot_training_curves(metrics, tmp_path / "curves.png"))


def test_read_metrics_splits_kinds_and_skips_partial_line(tmp_path):
    metrics = _write_jsonl(tmp_path / "m.jsonl", with_eval=True, partial_last_line=True)
    train, evals = read_metrics(metrics)
    assert len(train) == 30 and len(evals) == 3
    assert [e["epoch"] for e in evals] == [0, 1, 2]
    assert train[-1]["step"] == 30


def test_figure_content(tmp_path):
    train, evals = read_metrics(_write_jsonl(tmp_path / "m.jsonl", with_eval=True))
    fig = build_training_figure(train, evals)
    ax_loss, ax_ap, ax_lr = fig.axes  # the twin lr axis is added last
    assert ax_loss.get_yscale() == "log"
    assert [line.get_label() for line in ax_loss.get_lines()] == ["loss", "loss_cls", "loss_loc"]
    assert list(ax_loss.get_lines()[0].get_xdata()) == list(range(1, 31))
    assert ax_lr.get_lines()[0].get_ydata()[-1] == pytest.approx(0.05)
    ap_lines = {line.get_label(): line for line in ax_ap.get_lines()}
    assert set(ap_lines) == {"AP", "AP50"}
    assert list(ap_lines["AP"].get_xdata()) == [0, 1, 2]
    assert list(ap_lines["AP50"].get_ydata()) == pytest.approx([0.2, 0.4, 0.6])


def test_linear_scale_when_a_loss_is_not_positive(tmp_path):
    train, evals = read_metrics(_write_jsonl(tmp_path / "m.jsonl", with_eval=False, nonpositive_loss=True))
    fig = build_training_figure(train, evals)
    ax_loss, ax_ap = fig.axes[:2]
    assert ax_loss.get_yscale() == "linear"
    assert ax_ap.get_lines() == []
    assert any("no evaluation yet" in t.get_text() for t in ax_ap.texts)


def test_no_pyplot_state(tmp_path):
    metrics = _write_jsonl(tmp_path / "m.jsonl", with_eval=True)
    plt = sys.modules.get("matplotlib.pyplot")
    before = plt.get_fignums() if plt else []
    plot_training_curves(metrics, tmp_path / "a.png")
    plt = sys.modules.get("matplotlib.pyplot")
    assert (plt.get_fignums() if plt else []) == before
