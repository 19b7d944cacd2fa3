"""The paper presets' IoU crop (``crop_rule: paper``) against torchvision's ``RandomIoUCrop``, run on real tensors.

Reference: ``torchvision.transforms.v2.RandomIoUCrop`` (and ``RandomZoomOut`` before it), applied to an image and a
``tv_tensors.BoundingBoxes`` of simulated COCO-like boxes; whether it cropped and the window it kept are read off
its output. multibox's sampler is run on the same boxes with its own generator. The two are independent random
streams, so they are compared as distributions: shares with a tolerance of 4 binomial standard errors, window
areas with a two-sample Kolmogorov-Smirnov bound at alpha = 0.001. Seeds are fixed, so a pass is reproducible.

Run as a script (``python tests/data/test_crop_reference.py [N]``) to print the statistics table of the report.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from multibox.data.transforms import PAPER_MIN_IOUS, TrainTransform, crop_acceptable, sample_crop_window

W, H = 640, 480
THRESHOLDS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)

pytestmark = pytest.mark.usefixtures("one_thread")


def coco_like_boxes(n_images: int, seed: int) -> list[torch.Tensor]:
    """Per image 1-15 boxes (n, 4) xyxy in a W x H image: size log-uniform from 1 % to 80 % of the image side,
    aspect w/h log-uniform in [1/2, 2], position uniform where the box fits."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_images):
        n = int(torch.randint(1, 16, (1,), generator=g))
        u = torch.rand(n, 4, generator=g, dtype=torch.float64)
        scale = torch.exp(math.log(0.01) + (math.log(0.8) - math.log(0.01)) * u[:, 0])
        aspect = torch.exp(math.log(0.5) + (math.log(2.0) - math.log(0.5)) * u[:, 1])
        bw = (scale * aspect.sqrt() * W).clamp(1.0, W)
        bh = (scale / aspect.sqrt() * H).clamp(1.0, H)
        x1, y1 = u[:, 2] * (W - bw), u[:, 3] * (H - bh)
        out.append(torch.stack([x1, y1, x1 + bw, y1 + bh], 1).float())
    return out


def multibox_outcomes(boxes: list[torch.Tensor], seed: int, zoom_out: float = 0.0, min_ious=None,
                      width: int = W, height: int = H) -> tuple[float, torch.Tensor]:
    """Share of images left uncropped and (k,) window area / canvas area of the cropped ones, from
    :meth:`TrainTransform.sample_params` (zoom-out with p = 0.5 when ``zoom_out`` > 1, as the paper presets)."""
    tr = TrainTransform(300, crop_rule="paper", zoom_out=zoom_out, zoom_out_p=0.5, min_ious=min_ious, seed=seed,
                        jitter=(0.0, 0.0, 0.0))
    uncropped, areas = 0, []
    for b in boxes:
        p = tr.sample_params((height, width), {"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)})
        cw, ch = (p["expand"] or (width, height))[:2]
        if p["window"] is None:
            uncropped += 1
        else:
            x1, y1, x2, y2 = p["window"]
            areas.append((x2 - x1) * (y2 - y1) / (cw * ch))
    return uncropped / len(boxes), torch.tensor(areas, dtype=torch.float64)


def torchvision_outcomes(boxes: list[torch.Tensor], seed: int, zoom_out: bool = False, options=None,
                         width: int = W, height: int = H) -> tuple[float, torch.Tensor]:
    """The same statistics from torchvision: ``RandomZoomOut(side_range=(1, 4), p=0.5)`` (when ``zoom_out``) then
    ``RandomIoUCrop(sampler_options=options)`` on an image and its BoundingBoxes. The zoom-out is applied to the
    boxes alone and the crop gets a zero image of the canvas size as a stride-0 view (the crop only slices it), so
    no 4x canvas is materialised."""
    torch.manual_seed(seed)   # torchvision draws from the global stream
    zoom = v2.RandomZoomOut(fill=0, side_range=(1.0, 4.0), p=0.5)
    crop = v2.RandomIoUCrop(sampler_options=options)
    uncropped, areas = 0, []
    for b in boxes:
        bb = tv_tensors.BoundingBoxes(b, format="XYXY", canvas_size=(height, width))
        if zoom_out:
            bb = zoom(bb)
        ch, cw = bb.canvas_size
        image = tv_tensors.Image(torch.zeros(1, 1, 1, dtype=torch.uint8).expand(1, ch, cw))
        out, _ = crop(image, bb)
        h2, w2 = out.shape[-2:]
        if (h2, w2) == (ch, cw):
            uncropped += 1
        else:
            areas.append(h2 * w2 / (ch * cw))
    return uncropped / len(boxes), torch.tensor(areas, dtype=torch.float64)


def _assert_shares_agree(p1: float, n1: int, p2: float, n2: int, what: str) -> None:
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-4) * (1 / n1 + 1 / n2))
    assert abs(p1 - p2) <= 4 * se, f"{what}: {p1:.4f} vs {p2:.4f} (4 SE = {4 * se:.4f})"


def _ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b| (exact, ties included)."""
    grid = torch.cat([a, b]).unique()
    fa = torch.searchsorted(a.sort().values, grid, right=True).double() / len(a)
    fb = torch.searchsorted(b.sort().values, grid, right=True).double() / len(b)
    return float((fa - fb).abs().max())


def _assert_areas_agree(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    n, m = len(a), len(b)
    bound = 1.95 * math.sqrt((n + m) / (n * m))          # alpha = 0.001
    d = _ks_statistic(a, b)
    assert d <= bound, f"{what}: KS {d:.4f} > {bound:.4f} (means {a.mean():.4f} vs {b.mean():.4f})"


# --------------------------------------------------------------------------------------------- against torchvision

@pytest.mark.parametrize("zoom_out", [False, True])
def test_uncropped_share_and_window_area_match_torchvision(zoom_out):
    """COCO-like boxes: the share of images torchvision leaves uncropped (about 23 %, 29 % after zoom-out) and the
    distribution of the kept window's area are multibox's, within sampling error. (The old "every box" rule left
    81 % / 90 % uncropped: 40 standard errors off.)"""
    n_ref, n_ours = (300, 2000) if zoom_out else (400, 2000)
    ref_share, ref_areas = torchvision_outcomes(coco_like_boxes(n_ref, seed=1), seed=2, zoom_out=zoom_out)
    share, areas = multibox_outcomes(coco_like_boxes(n_ours, seed=3), seed=4, zoom_out=4.0 if zoom_out else 0.0)
    assert 0.15 < ref_share < 0.4                      # the reference itself is in the expected regime
    _assert_shares_agree(share, n_ours, ref_share, n_ref, "share uncropped")
    _assert_areas_agree(areas, ref_areas, "window area")


@pytest.mark.parametrize("t", [0.5])
def test_per_threshold_failure_matches_torchvision(t):
    """Options {t, whole image}: every round draws t or "keep", and a failed round (no window in the trials) draws
    again, so the share uncropped is 1 / (2 - f) with f the probability that the trials at t all fail; both
    implementations must agree on it, and on the window areas that threshold accepts."""
    n_ref, n_ours = 300, 2000
    ref_share, ref_areas = torchvision_outcomes(coco_like_boxes(n_ref, seed=5), seed=6, options=[t, 1.0])
    share, areas = multibox_outcomes(coco_like_boxes(n_ours, seed=7), seed=8, min_ious=(t, None))
    assert ref_share > 0.5 and share > 0.5             # "keep" alone gives 1/2; failures add to it
    _assert_shares_agree(share, n_ours, ref_share, n_ref, f"share uncropped, t = {t}")
    _assert_areas_agree(areas, ref_areas, f"window area, t = {t}")


def test_threshold_zero_accepts_any_window_with_a_box_centre_inside():
    """t = 0: a window is accepted as soon as one box centre is inside, whatever its IoU; with box centres on a
    dense grid every window qualifies, so the windows follow the bare window law: torchvision's, exactly."""
    inside = torch.tensor([[True, False]])
    assert bool(crop_acceptable(torch.tensor([[1e-6, 0.9]]), inside, 0.0, "paper")[0])
    assert not bool(crop_acceptable(torch.tensor([[1e-6, 0.9]]), inside, 0.1, "paper")[0])  # the 0.9 is outside
    assert not bool(crop_acceptable(torch.tensor([[0.5]]), torch.tensor([[False]]), 0.0, "paper")[0])
    # 2 px boxes every 40 px: every window (sides >= 0.3 * 480 = 144 px) holds some centre.
    ys, xs = torch.meshgrid(torch.arange(4.0, H, 40.0), torch.arange(4.0, W, 40.0), indexing="ij")
    grid = torch.stack([xs.flatten(), ys.flatten(), xs.flatten() + 2, ys.flatten() + 2], 1)
    n = 600
    ref_share, ref_areas = torchvision_outcomes([grid] * n, seed=9, options=[0.0])
    share, areas = multibox_outcomes([grid] * n, seed=10, min_ious=(0.0,))
    assert share == ref_share == 0.0
    _assert_areas_agree(areas, ref_areas, "t = 0 window area")
    # The bare window law by numerical integration: side fractions r_w, r_h ~ U[0.3, 1], kept when the aspect
    # (W r_w) / (H r_h) is in [0.5, 2]; the int() truncation of the sides moves the mean by < 1 %.
    r = torch.linspace(0.3, 1.0, 1401, dtype=torch.float64)
    rw, rh = r[:, None], r[None, :]
    ok = ((W * rw) / (H * rh) >= 0.5) & ((W * rw) / (H * rh) <= 2.0)
    law_mean = float((rw * rh * ok).sum() / ok.sum())
    se = float(areas.std()) / math.sqrt(n)
    assert abs(float(areas.mean()) - law_mean) < 4 * se + 0.01, (float(areas.mean()), law_mean)


def test_a_failed_threshold_is_followed_by_a_new_draw():
    """A single 2 px box: IoU >= 0.5 is impossible, t = 0 is met by any window around its centre. Options {0.5, 0}
    then always end cropped at t = 0, for torchvision and for us; with one round only (no redraw) about half of the
    images would stay uncropped."""
    box = torch.tensor([[319.0, 239.0, 321.0, 241.0]])
    g = torch.Generator().manual_seed(11)
    outs = [sample_crop_window(box, torch.tensor([1]), W, H, g, "paper", (0.5, 0.0)) for _ in range(200)]
    assert all(s.window is not None and s.min_iou == 0.0 and s.labels.tolist() == [1] for s in outs)
    ref_share, _ = torchvision_outcomes([box] * 60, seed=12, options=[0.5, 0.0])
    assert ref_share == 0.0
    one_round = [sample_crop_window(box, torch.tensor([1]), W, H, g, "paper", (0.5, 0.0), max_rounds=1)
                 for _ in range(200)]
    assert 0.38 < sum(s.window is None for s in one_round) / 200 < 0.62   # 1/2 +- 3.4 SE


def test_the_rounds_are_bounded_then_the_whole_image_is_kept():
    """No threshold feasible (only 0.5 offered, IoU <= 0.002): after ``max_rounds`` rounds (one threshold and 40
    windows drawn each, nothing more) the whole image is kept, where torchvision would loop forever."""
    box = torch.tensor([[319.0, 239.0, 321.0, 241.0]])
    g = torch.Generator().manual_seed(13)
    expected = torch.Generator().manual_seed(13)
    s = sample_crop_window(box, torch.tensor([1]), W, H, g, "paper", (0.5,), max_rounds=7)
    assert s.window is None and s.min_iou is None and torch.equal(s.boxes, box)
    for _ in range(7):
        torch.randint(1, (1,), generator=expected)
        torch.rand(40, 4, generator=expected, dtype=torch.float64)
    assert torch.equal(g.get_state(), expected.get_state())


def test_paper_defaults_are_torchvisions():
    """The thresholds and trials are RandomIoUCrop's defaults (its 1.0 = our None, "keep the whole image")."""
    ref = v2.RandomIoUCrop()
    assert [1.0 if t is None else t for t in PAPER_MIN_IOUS] == ref.options and ref.trials == 40
    assert (ref.min_scale, ref.max_scale, ref.min_aspect_ratio, ref.max_aspect_ratio) == (0.3, 1.0, 0.5, 2.0)


# --------------------------------------------------------------------------------------------- the report's table

def main(n: int) -> None:
    """Print the crop statistics on ``n`` COCO-like images: share left uncropped (with / without zoom-out) and, per
    threshold t, the share uncropped with the options {t, keep the whole image} (1/2 plus failed rounds at t), with
    the mean kept-window area, for multibox and torchvision."""
    boxes = coco_like_boxes(n, seed=123)
    rows = []
    for zoom in (False, True):
        ours, ours_a = multibox_outcomes(boxes, seed=1, zoom_out=4.0 if zoom else 0.0)
        ref, ref_a = torchvision_outcomes(boxes, seed=1, zoom_out=zoom)
        rows.append((f"uncropped{', zoom-out 4 p 0.5' if zoom else ''}", ours, ref, ours_a.mean(), ref_a.mean()))
    for t in THRESHOLDS:
        ours, ours_a = multibox_outcomes(boxes, seed=2, min_ious=(t, None))
        ref, ref_a = torchvision_outcomes(boxes, seed=2, options=[t, 1.0])
        rows.append((f"uncropped, options {{{t}, keep}}", ours, ref, ours_a.mean(), ref_a.mean()))
    print(f"{n} COCO-like images {W}x{H}")
    print(f"{'statistic':32s} {'multibox':>9s} {'torchvision':>12s} {'area mb':>8s} {'area tv':>8s}")
    for name, a, b, am, bm in rows:
        print(f"{name:32s} {a:9.4f} {b:12.4f} {float(am):8.4f} {float(bm):8.4f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4000)
