"""Tests for multibox.core.losses.

References: a direct re-implementation of the tutorial's ``class_loss`` + ``forward_fn`` (numpy, float64, a loop
over images), hand-computed one-anchor values and gradients, and torchvision's ``SSD.compute_loss``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection import ssd300_vgg16
from torchvision.ops import box_iou

from multibox.core.anchors import default_boxes_cxcywh
from multibox.config import load_config
from multibox.core.losses import FocalMultiBoxLoss, HardNegativeMultiBoxLoss, build_loss
from multibox.core.matching import TargetEncoder, pad_targets
from multibox.core.anchors import anchor_spec


# --------------------------------------------------------------------------- the tutorial's loss, re-implemented

def tutorial_class_loss(logits: np.ndarray, label: np.ndarray) -> np.ndarray:
    """``class_loss``: (A, K) logits, (A,) labels -> (A, K) focal terms (one image)."""
    one_hot = np.eye(logits.shape[-1])[label]
    # ops.binary_cross_entropy_with_logits with unit weight and pos_weight, reduction none:
    # -[z·log σ(x) + (1 - z)·log(1 - σ(x))] = max(x, 0) - x·z + log(1 + exp(-|x|))
    bce = np.maximum(logits, 0) - logits * one_hot + np.log1p(np.exp(-np.abs(logits)))
    sigmoid = 1 / (1 + np.exp(-logits))
    p_t = one_hot * sigmoid + (1 - one_hot) * (1 - sigmoid)
    modulating_factor = (1 - p_t) ** 2.0
    alpha_weight_factor = one_hot * 0.75 + (1 - one_hot) * (1 - 0.75)
    return modulating_factor * alpha_weight_factor * bce


def smooth_l1(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """MindSpore ``nn.SmoothL1Loss()`` (beta 1, no reduction)."""
    d = np.abs(x - y)
    return np.where(d < 1.0, 0.5 * d * d, d - 0.5)


def tutorial_forward_loss(pred_loc, pred_label, gt_loc, gt_label) -> tuple[float, float, float]:
    """``forward_fn`` after the network: per-image sums, then Σ_images (cls + loc) / (batch's positives).

    Returns (loss, Σ cls, Σ loc). Unlike the tutorial, zero positives normalise by 1 (the tutorial divides by 0).
    """
    num_matched = sum(int((lab > 0).sum()) for lab in gt_label)
    denominator = max(num_matched, 1)
    total, cls_sum, loc_sum = 0.0, 0.0, 0.0
    for b in range(len(gt_label)):
        mask = (gt_label[b] > 0).astype(np.float64)
        loss_loc = float((smooth_l1(pred_loc[b], gt_loc[b]) * mask[:, None]).sum())
        loss_cls = float(tutorial_class_loss(pred_label[b], gt_label[b]).sum())
        total += (loss_cls + loss_loc) / denominator
        cls_sum += loss_cls
        loc_sum += loss_loc
    return total, cls_sum, loc_sum


def random_batch(seed: int, batch: int, anchors: int, channels: int, positive_fraction: float):
    g = np.random.default_rng(seed)
    loc = g.normal(0, 1.5, (batch, anchors, 4))
    logits = g.normal(0, 3, (batch, anchors, channels))
    loc_t = g.normal(0, 1.5, (batch, anchors, 4))
    labels = np.where(g.random((batch, anchors)) < positive_fraction, g.integers(1, channels, (batch, anchors)), 0)
    return loc, logits, loc_t, labels


@pytest.mark.parametrize("seed,batch,positive_fraction", [(0, 2, 0.05), (1, 3, 0.3), (2, 1, 0.01)])
def test_focal_loss_matches_tutorial_reference(seed, batch, positive_fraction):
    loc, logits, loc_t, labels = random_batch(seed, batch, 300, 81, positive_fraction)
    labels[0, :3] = [1, 80, 40]          # at least one positive, extreme classes included
    ref, ref_cls, ref_loc = tutorial_forward_loss(loc, logits, loc_t, labels)
    out = FocalMultiBoxLoss()(torch.tensor(loc, dtype=torch.float32), torch.tensor(logits, dtype=torch.float32),
                              torch.tensor(loc_t, dtype=torch.float32), torch.tensor(labels))
    num_pos = int((labels > 0).sum())
    assert float(out["num_pos"]) == num_pos
    assert float(out["loss"]) == pytest.approx(ref, rel=1e-5)
    assert float(out["loss_cls"]) == pytest.approx(ref_cls / num_pos, rel=1e-5)
    assert float(out["loss_loc"]) == pytest.approx(ref_loc / num_pos, rel=1e-5)


def test_focal_loss_normalises_by_batch_positives_not_per_image():
    """Image 0 has 1 positive, image 1 has 3: the divisor is 4 for both images' sums."""
    loc, logits, loc_t, _ = random_batch(3, 2, 50, 5, 0.0)
    labels = np.zeros((2, 50), np.int64)
    labels[0, 7] = 2
    labels[1, [1, 2, 3]] = [1, 3, 4]
    ref, _, _ = tutorial_forward_loss(loc, logits, loc_t, labels)
    out = FocalMultiBoxLoss()(*(torch.tensor(a, dtype=torch.float32) for a in (loc, logits, loc_t)), torch.tensor(labels))
    assert float(out["loss"]) == pytest.approx(ref, rel=1e-5)
    per_image = [tutorial_forward_loss(loc[i:i + 1], logits[i:i + 1], loc_t[i:i + 1], labels[i:i + 1])[0]
                 for i in range(2)]
    assert float(out["loss"]) != pytest.approx(sum(per_image) / 2, rel=1e-3)  # not a mean of per-image losses


def test_focal_loss_zero_positive_batch_is_finite():
    loc, logits, loc_t, _ = random_batch(4, 2, 100, 81, 0.0)
    labels = np.zeros((2, 100), np.int64)
    tensors = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (loc, logits)]
    out = FocalMultiBoxLoss()(tensors[0], tensors[1], torch.tensor(loc_t, dtype=torch.float32), torch.tensor(labels))
    assert torch.isfinite(out["loss"].detach())
    ref, ref_cls, ref_loc = tutorial_forward_loss(loc, logits, loc_t, labels)   # divides by max(0, 1) = 1
    assert ref_loc == 0
    assert float(out["loss"].detach()) == pytest.approx(ref, rel=1e-5)
    out["loss"].backward()
    assert torch.isfinite(tensors[1].grad).all()
    assert (tensors[0].grad == 0).all()                 # no positives: no localisation gradient


def test_focal_one_anchor_golden_value_and_alpha_gradient():
    """One anchor, 2 channels (background, class 1), label 1, logits 0: σ = 0.5 everywhere.

    Each channel: (1 - p_t)² · BCE = 0.25 · ln 2; weights α = 0.75 (target-1 channel 1), 0.25 (channel 0).
    loss = (0.75 + 0.25) · 0.25 · ln 2 = 0.1732868 (one positive).
    d/dx of α (1-p)^γ (-ln p) for a target-1 entry: α (1-p)² [2p ln p - (1 - p)] = 0.75 · 0.25 · (-ln 2 - 0.5)
      = -0.2237151 (channel 1);
    for a target-0 entry: (1-α) p² [-2(1-p) ln(1-p) + p] = 0.25 · 0.25 · (ln 2 + 0.5) = 0.0745717 (channel 0).
    The ratio 3 = 0.75/0.25 is the α weighting of positives.
    """
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    loc = torch.zeros(1, 1, 4, requires_grad=True)
    # Smooth L1 on offsets (0.5, 2, 0, -1) vs 0: 0.5·0.5² + (2 - 0.5) + 0 + 0.5·1² = 0.125 + 1.5 + 0.5 = 2.125
    loc_t = torch.tensor([[[0.5, 2.0, 0.0, -1.0]]])
    out = FocalMultiBoxLoss()(loc, logits, loc_t, torch.tensor([[1]]))
    assert float(out["loss_cls"]) == pytest.approx(0.1732868, abs=1e-6)
    assert float(out["loss_loc"]) == pytest.approx(2.125, abs=1e-6)
    assert float(out["loss"].detach()) == pytest.approx(2.2982868, abs=1e-6)
    out["loss"].backward()
    assert logits.grad[0, 0].tolist() == pytest.approx([0.0745717, -0.2237151], abs=1e-6)
    assert float(-logits.grad[0, 0, 1] / logits.grad[0, 0, 0]) == pytest.approx(3.0, rel=1e-5)
    # d SmoothL1/dx = clamp(x - t, -1, 1): (-0.5, -1, 0, 1)
    assert loc.grad[0, 0].tolist() == pytest.approx([-0.5, -1.0, 0.0, 1.0], abs=1e-6)


def test_focal_one_anchor_golden_value_nonzero_logits():
    """Logits (-1, 1) for (background, class 1), label 1: p = σ(1) = 0.7310586 on both channels' p_t.

    Channel 1 (target 1): 0.75 · (1 - 0.7310586)² · (-ln 0.7310586) = 0.75 · 0.0723295 · 0.3132617 = 0.0169935
    Channel 0 (target 0, p = σ(-1) = 0.2689414): 0.25 · 0.2689414² · (-ln 0.7310586) = 0.0056645
    Sum 0.0226581. Gradients: channel 1: 0.75 (1-p)² [2p ln p - (1-p)] = -0.0394358;
    channel 0: 0.25 q² [-2(1-q) ln(1-q) + q] with q = 0.2689414: 0.0131453.
    """
    logits = torch.tensor([[[-1.0, 1.0]]], requires_grad=True)
    out = FocalMultiBoxLoss()(torch.zeros(1, 1, 4), logits, torch.zeros(1, 1, 4), torch.tensor([[1]]))
    assert float(out["loss"].detach()) == pytest.approx(0.0226581, abs=1e-6)
    out["loss"].backward()
    assert logits.grad[0, 0].tolist() == pytest.approx([0.0131453, -0.0394358], abs=1e-6)


def test_focal_loss_background_is_a_one_hot_channel():
    """A background anchor's target is one-hot on channel 0, so channel 0 is a target-1 entry (α = 0.75) and the
    class channels target-0 entries (0.25). With logits 0 every entry is α_t · 0.25 · ln 2."""
    out = FocalMultiBoxLoss()(torch.zeros(1, 2, 4), torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.tensor([[1, 0]]))
    # anchor 0 (label 1): channel 1 -> 0.75, channels 0, 2 -> 0.25 each; anchor 1 (label 0): channel 0 -> 0.75,
    # channels 1, 2 -> 0.25 each. Σ α_t = 1.25 + 1.25 = 2.5; loss = 2.5 · 0.25 · ln 2 / 1 positive = 0.4332169
    assert float(out["loss"]) == pytest.approx(0.4332169, abs=1e-6)


def test_build_loss():
    assert isinstance(build_loss("focal", alpha=0.75), FocalMultiBoxLoss)
    assert isinstance(build_loss("hard_negative"), HardNegativeMultiBoxLoss)
    with pytest.raises(ValueError):
        build_loss("nope")


# --------------------------------------------------------------------------- hard negative mining vs torchvision

@pytest.fixture(scope="module")
def torchvision_ssd():
    torch.manual_seed(0)
    return ssd300_vgg16(weights=None, weights_backbone=None, num_classes=5)


@pytest.fixture(scope="module")
def anchors_cxcywh() -> torch.Tensor:
    cfg = load_config("ssd300-vgg16-seed")
    return default_boxes_cxcywh(anchor_spec(cfg.anchors, 300))


def _random_gt(rng: np.random.Generator, n: int) -> np.ndarray:
    wh = rng.uniform(0.1, 0.7, (n, 2))
    xy = rng.uniform(0, 1, (n, 2)) * (1 - wh)
    return np.concatenate((xy, xy + wh), axis=1).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_hard_negative_loss_matches_torchvision_compute_loss(torchvision_ssd, anchors_cxcywh, seed):
    rng = np.random.default_rng(seed)
    encoder = TargetEncoder(anchors_cxcywh, rule="torchvision")
    counts = [3, 1, 6]
    gts = []
    for n in counts:
        while True:   # distinct best anchors, so that torchvision's forced matches are order-independent
            boxes = torch.from_numpy(_random_gt(rng, n))
            if box_iou(boxes, encoder.anchors_xyxy).argmax(1).unique().numel() == n:
                break
        gts.append((boxes, torch.from_numpy(rng.integers(1, 5, n))))
    batch, num_anchors = len(counts), anchors_cxcywh.shape[0]
    g = torch.Generator().manual_seed(seed)
    bbox_regression = torch.randn(batch, num_anchors, 4, generator=g)
    cls_logits = torch.randn(batch, num_anchors, 5, generator=g) * 2

    # torchvision's side: pixels of a 300x300 input, per-image lists, its own matcher.
    anchors_px = encoder.anchors_xyxy * 300
    targets = [{"boxes": b * 300, "labels": lab} for b, lab in gts]
    matched_idxs = [torchvision_ssd.proposal_matcher(box_iou(t["boxes"], anchors_px)) for t in targets]
    ref = torchvision_ssd.compute_loss(targets, {"bbox_regression": bbox_regression, "cls_logits": cls_logits},
                                       [anchors_px] * batch, matched_idxs)

    # ours: normalised boxes, padded batch.
    loc_targets, labels = encoder(*pad_targets([b for b, _ in gts], [lab for _, lab in gts]))
    for i in range(batch):    # torchvision uses -1 for background in matched_idxs
        assert torch.equal(labels[i] > 0, matched_idxs[i] >= 0)
    out = HardNegativeMultiBoxLoss(neg_pos_ratio=3)(bbox_regression, cls_logits, loc_targets, labels)
    assert float(out["num_pos"]) == sum(int((m >= 0).sum()) for m in matched_idxs)
    torch.testing.assert_close(out["loss_cls"], ref["classification"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss_loc"], ref["bbox_regression"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["loss"], ref["classification"] + ref["bbox_regression"], rtol=1e-4, atol=1e-4)


def test_hard_negative_selection_hand_case():
    """One image, 6 anchors, 1 positive -> the 3 negatives with the largest background loss count."""
    # Background logit 0 and class logit v: CE for label 0 = log(1 + e^v); ranks follow v.
    v = torch.tensor([0.0, 3.0, -2.0, 1.0, 2.0, -1.0])
    logits = torch.stack((torch.zeros(6), v), dim=-1)[None]
    labels = torch.tensor([[1, 0, 0, 0, 0, 0]])
    out = HardNegativeMultiBoxLoss()(torch.zeros(1, 6, 4), logits, torch.zeros(1, 6, 4), labels)
    # positive anchor 0: CE = log(1 + e^0) = ln 2; hard negatives v = 3, 2, 1: log(1 + e^v)
    expected = math.log(2) + sum(math.log1p(math.exp(x)) for x in (3.0, 2.0, 1.0))
    assert float(out["loss_cls"]) == pytest.approx(expected, rel=1e-6)


def test_hard_negative_zero_positive_batch_is_finite():
    logits = torch.randn(2, 50, 5, requires_grad=True)
    out = HardNegativeMultiBoxLoss()(torch.zeros(2, 50, 4), logits, torch.zeros(2, 50, 4),
                                     torch.zeros(2, 50, dtype=torch.int64))
    assert torch.isfinite(out["loss"].detach()) and float(out["loss"].detach()) == 0.0
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all()
