"""Training-curve plots (loss / learning rate / AP) from a run's ``metrics.jsonl``.

Drawn with matplotlib's object API on an Agg canvas: no ``pyplot``, so no global figure
registry that could leak figures (memory) across the many calls of a long training run,
and no dependency on a display.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from multibox.io import atomic_write_bytes

__all__ = ["read_metrics", "build_training_figure", "plot_training_curves", "save_figure_png"]

_TRAIN_LOSS_KEYS = ("loss", "loss_cls", "loss_loc")
_EVAL_KEYS = ("AP", "AP50")


def read_metrics(metrics_jsonl: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split ``metrics.jsonl`` into (train records, eval records), in file order.

    Records are the JSON objects with ``"kind": "train"`` / ``"kind": "eval"``; other
    kinds and blank lines are ignored. A line that is not valid JSON is skipped: the file
    is appended to while training runs, so its last line may be half-written when read.
    """
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    with open(metrics_jsonl, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            if rec.get("kind") == "train":
                train.append(rec)
            elif rec.get("kind") == "eval":
                evals.append(rec)
    return train, evals


def _series(records: Sequence[dict[str, Any]], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """(x, y) of the records that carry finite numbers under both keys."""
    xs: list[float] = []
    ys: list[float] = []
    for r in records:
        x, y = r.get(x_key), r.get(y_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def build_training_figure(train: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]]) -> Figure:
    """Two panels: loss (and lr on a twin axis) vs step; AP / AP50 vs epoch.

    The loss axis is logarithmic when every plotted loss is > 0 (losses span decades),
    linear otherwise. COCO's -1 ("undefined") AP values are not plotted.
    """
    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    ax_loss, ax_ap = fig.subplots(1, 2)

    # ---- left: losses and learning rate vs step
    all_losses: list[float] = []
    last_step = 0.0
    for key, style in zip(_TRAIN_LOSS_KEYS, ("-", "--", ":")):
        xs, ys = _series(train, "step", key)
        if xs:
            ax_loss.plot(xs, ys, style, label=key, linewidth=1.2 if key == "loss" else 1.0,
                         marker="o" if len(xs) == 1 else None)   # a line of one point is not drawn
            all_losses.extend(ys)
            last_step = max(last_step, xs[-1])
    if all_losses and min(all_losses) > 0:
        ax_loss.set_yscale("log")
    _count_axis(ax_loss, last_step)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(True, alpha=0.3)

    handles, labels = ax_loss.get_legend_handles_labels()
    xs, ys = _series(train, "step", "lr")
    if xs:
        ax_lr = ax_loss.twinx()
        (lr_line,) = ax_lr.plot(xs, ys, color="tab:gray", alpha=0.7, linewidth=1.0, label="lr")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        handles.append(lr_line)
        labels.append("lr")
    if handles:
        # Above the panel, not inside: the lr curve sits on the twin axis, drawn over
        # anything inside, and a flat lr plateau runs exactly where a legend would go.
        ax_loss.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(handles),
                       fontsize="small", frameon=False)
    else:
        ax_loss.text(0.5, 0.5, "no training records yet", ha="center", va="center", transform=ax_loss.transAxes)

    _plot_evaluations(ax_ap, evals)
    return fig


def _plot_evaluations(ax, evals: Sequence[dict[str, Any]]) -> None:
    """AP / AP50 (defined values only) vs epoch, with a marker at every evaluation (``train.eval_every``)."""
    last_epoch = -1.0
    for key, marker in zip(_EVAL_KEYS, ("o", "s")):
        xs, ys = _series(evals, "epoch", key)
        pts = [(x, y) for x, y in zip(xs, ys) if y >= 0]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=key)
            last_epoch = max(last_epoch, max(p[0] for p in pts))
    ax.set_xlabel("epoch")
    ax.set_ylabel("COCO AP")
    ax.set_title("evaluation")
    ax.grid(True, alpha=0.3)
    if last_epoch >= 0:
        _count_axis(ax, last_epoch)
        ax.set_ylim(bottom=0.0)
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)


def _count_axis(ax, last: float) -> None:
    """An x axis of whole numbers (steps, epochs) from 0 to ``last`` (at least 1), ticks on whole numbers only:
    matplotlib's automatic limits around a single point (one epoch) would be 0.945 .. 1.055."""
    hi = max(1.0, float(last))
    pad = 0.04 * hi   # the markers at either end stay whole
    ax.set_xlim(-pad, hi + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=2))


def plot_training_curves(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Read ``metrics_jsonl`` and write the loss / lr / AP curves to ``out_png``.

    Works at any point of a run (no eval record yet, or no record at all). The PNG is
    written to a temporary name and renamed, so a viewer never sees a partial file.
    Returns the path written.
    """
    train, evals = read_metrics(metrics_jsonl)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure_png(build_training_figure(train, evals), out)


def save_figure_png(fig: Figure, path: Path) -> Path:
    """Render ``fig`` on an Agg canvas (independent of the pyplot backend) and write it to ``path`` as a PNG,
    atomically; returns ``path``."""
    FigureCanvasAgg(fig)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return atomic_write_bytes(path, png.getbuffer())
