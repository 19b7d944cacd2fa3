"""Tests for multibox.core.matching.

References: a literal port of the tutorial's per-image numpy loop ``ssd_bboxes_encode`` (yxyx boxes, its own
default boxes from tests/conftest.py), and torchvision's ``SSDMatcher`` + SSD ``BoxCoder``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder, SSDMatcher
from torchvision.ops import box_iou

from multibox.core.anchors import default_boxes_cxcywh
from multibox.config import load_config
from multibox.core.matching import PAD_LABEL, TargetEncoder, match_torchvision, pad_targets
from multibox.core.anchors import anchor_spec


# --------------------------------------------------------------------------- the tutorial's encoder, literally

def make_tutorial_encoder(default_boxes: np.ndarray, default_boxes_tlbr: np.ndarray):
    """``ssd_bboxes_encode`` as written in the tutorial, closed over its module-level globals."""
    y1, x1, y2, x2 = np.split(default_boxes_tlbr[:, :4], 4, axis=-1)
    vol_anchors = (x2 - x1) * (y2 - y1)
    matching_threshold = 0.5

    def ssd_bboxes_encode(boxes):
        """boxes: (n, 5) float32 rows (y1, x1, y2, x2, label), normalised."""

        def jaccard_with_anchors(bbox):
            ymin = np.maximum(y1, bbox[0])
            xmin = np.maximum(x1, bbox[1])
            ymax = np.minimum(y2, bbox[2])
            xmax = np.minimum(x2, bbox[3])
            w = np.maximum(xmax - xmin, 0.)
            h = np.maximum(ymax - ymin, 0.)
            inter_vol = h * w
            union_vol = vol_anchors + (bbox[2] - bbox[0]) * (bbox[3] - bbox[1]) - inter_vol
            jaccard = inter_vol / union_vol
            return np.squeeze(jaccard)

        pre_scores = np.zeros((8732), dtype=np.float32)
        t_boxes = np.zeros((8732, 4), dtype=np.float32)
        t_label = np.zeros((8732), dtype=np.int64)
        for bbox in boxes:
            label = int(bbox[4])
            scores = jaccard_with_anchors(bbox)
            idx = np.argmax(scores)
            scores[idx] = 2.0
            mask = (scores > matching_threshold)
            mask = mask & (scores > pre_scores)
            pre_scores = np.maximum(pre_scores, scores * mask)
            t_label = mask * label + (1 - mask) * t_label
            for i in range(4):
                t_boxes[:, i] = mask * bbox[i] + (1 - mask) * t_boxes[:, i]

        index = np.nonzero(t_label)
        bboxes = np.zeros((8732, 4), dtype=np.float32)
        bboxes[:, [0, 1]] = (t_boxes[:, [0, 1]] + t_boxes[:, [2, 3]]) / 2
        bboxes[:, [2, 3]] = t_boxes[:, [2, 3]] - t_boxes[:, [0, 1]]
        bboxes_t = bboxes[index]
        default_boxes_t = default_boxes[index]
        bboxes_t[:, :2] = (bboxes_t[:, :2] - default_boxes_t[:, :2]) / (default_boxes_t[:, 2:] * 0.1)
        tmp = np.maximum(bboxes_t[:, 2:4] / default_boxes_t[:, 2:4], 0.000001)
        bboxes_t[:, 2:4] = np.log(tmp) / 0.2
        bboxes[index] = bboxes_t
        num_match = np.array([len(np.nonzero(t_label)[0])], dtype=np.int32)
        return bboxes, t_label.astype(np.int32), num_match

    return ssd_bboxes_encode


@pytest.fixture(scope="module")
def seed_anchors() -> torch.Tensor:
    """The seed preset's default boxes in float64, as computed (the tutorial also computes them in float64 and
    casts once at the end): the encoder needs full precision to derive the tutorial's exact float32 corners."""
    cfg = load_config("ssd300-vgg16-seed")
    return default_boxes_cxcywh(anchor_spec(cfg.anchors, cfg.model.image_size), dtype=torch.float64)


@pytest.fixture(scope="module")
def tutorial_encode(tutorial_default_boxes):
    return make_tutorial_encoder(*tutorial_default_boxes)


def compare_with_tutorial(images, seed_anchors, tutorial_encode):
    """images: list of (boxes (n, 4) float32 xyxy in [0, 1], labels (n,) int) -> asserts equality image by image."""
    boxes, labels = pad_targets([torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b, _ in images],
                                [torch.as_tensor(lab, dtype=torch.int64).reshape(-1) for _, lab in images])
    offsets, out_labels = TargetEncoder(seed_anchors, rule="tutorial")(boxes, labels)
    assert offsets.shape == (len(images), 8732, 4) and out_labels.shape == (len(images), 8732)
    assert out_labels.dtype == torch.int64
    for i, (b, lab) in enumerate(images):
        b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
        rows = np.concatenate((b[:, [1, 0, 3, 2]], np.asarray(lab, dtype=np.float32).reshape(-1, 1)), axis=1)
        ref_offsets, ref_labels, num_match = tutorial_encode(rows.astype(np.float32))
        got = out_labels[i].numpy()
        mismatch = np.nonzero(got != ref_labels)[0]
        assert mismatch.size == 0, (f"image {i}: labels differ at anchors {mismatch[:10].tolist()} "
                                    f"(ours {got[mismatch[:10]].tolist()}, tutorial {ref_labels[mismatch[:10]].tolist()})")
        assert int((got > 0).sum()) == int(num_match[0])
        pos = got > 0
        # ours: (dx, dy, dw, dh); the tutorial's: (dcy, dcx, dh, dw)
        ours_tutorial_order = offsets[i].numpy()[:, [1, 0, 3, 2]]
        np.testing.assert_allclose(ours_tutorial_order[pos], ref_offsets[pos], rtol=0, atol=1e-4)
        assert (offsets[i][~torch.from_numpy(pos)] == 0).all()


def test_encoder_corners_equal_tutorial_tlbr(seed_anchors, tutorial_default_boxes):
    """Root cause check for the tie cases below: the tutorial computes (y1, x1, y2, x2) in float64 and casts to
    float32; corners derived from float32 centres differ by one ulp in thousands of coordinates, which is
    enough to change which of several exactly-tied default boxes is a small box's best anchor."""
    _, default_boxes_tlbr = tutorial_default_boxes
    ours = TargetEncoder(seed_anchors, rule="tutorial").anchors_xyxy
    ref = torch.from_numpy(default_boxes_tlbr[:, [1, 0, 3, 2]].copy())
    differ = int((ours != ref).sum())
    assert differ == 0, f"{differ} of {ref.numel()} corner coordinates differ from the tutorial's"


def random_boxes(rng: np.random.Generator, n: int, min_size: float, max_size: float) -> np.ndarray:
    """n xyxy boxes inside [0, 1]."""
    wh = rng.uniform(min_size, max_size, (n, 2))
    xy = rng.uniform(0, 1, (n, 2)) * (1 - wh)
    return np.concatenate((xy, xy + wh), axis=1).astype(np.float32)


def test_tutorial_rule_random_overlapping_boxes(seed_anchors, tutorial_encode):
    rng = np.random.default_rng(0)
    images = []
    for _ in range(24):
        n = int(rng.integers(1, 9))
        images.append((random_boxes(rng, n, 0.1, 0.9), rng.integers(1, 81, n)))
    compare_with_tutorial(images, seed_anchors, tutorial_encode)


def test_tutorial_rule_crowded_overlapping_boxes(seed_anchors, tutorial_encode):
    """Many heavily overlapping boxes around one point: anchors above 0.5 with several ground truths."""
    rng = np.random.default_rng(1)
    images = []
    for _ in range(8):
        n = 12
        centre = rng.uniform(0.3, 0.7, 2)
        wh = rng.uniform(0.15, 0.5, (n, 2))
        c = centre + rng.normal(0, 0.03, (n, 2))
        b = np.concatenate((c - wh / 2, c + wh / 2), axis=1).clip(0, 1).astype(np.float32)
        images.append((b, rng.integers(1, 81, n)))
    compare_with_tutorial(images, seed_anchors, tutorial_encode)


def test_tutorial_rule_identical_duplicates_tie_to_earlier_box(seed_anchors, tutorial_encode):
    box = [0.2, 0.3, 0.6, 0.7]
    images = [
        (np.array([box, box]), [5, 9]),
        (np.array([box, [0.0, 0.0, 0.3, 0.3], box, box]), [7, 1, 3, 2]),
    ]
    compare_with_tutorial(images, seed_anchors, tutorial_encode)
    boxes, labels = pad_targets([torch.tensor([box, box])], [torch.tensor([5, 9])])
    _, out = TargetEncoder(seed_anchors, rule="tutorial")(boxes, labels)
    assert set(out[0].unique().tolist()) == {0, 5}       # the later duplicate never wins


def test_tutorial_rule_boxes_sharing_best_anchor(seed_anchors, tutorial_encode):
    """Two boxes whose best anchor is the same one: both score 2.0 there, the earlier box keeps it."""
    a = torch.tensor([[0.30, 0.30, 0.52, 0.52]])
    b = torch.tensor([[0.305, 0.30, 0.52, 0.525]])
    anchors_xyxy = TargetEncoder(seed_anchors).anchors_xyxy
    best = box_iou(torch.cat((a, b)), anchors_xyxy).argmax(1)
    assert best[0] == best[1], "test setup: the two boxes must share their best anchor"
    images = [(torch.cat((a, b)).numpy(), [4, 8]), (torch.cat((b, a)).numpy(), [8, 4])]
    compare_with_tutorial(images, seed_anchors, tutorial_encode)
    boxes, labels = pad_targets([torch.cat((a, b))], [torch.tensor([4, 8])])
    _, out = TargetEncoder(seed_anchors, rule="tutorial")(boxes, labels)
    assert out[0, best[0]] == 4


def test_tutorial_rule_small_boxes(seed_anchors, tutorial_encode):
    """Boxes of 2-8 % of the image (COCO's small objects at 300 px): positives come mostly from the forced
    best anchor."""
    rng = np.random.default_rng(2)
    images = []
    for _ in range(16):
        n = int(rng.integers(1, 6))
        images.append((random_boxes(rng, n, 0.02, 0.08), rng.integers(1, 81, n)))
    compare_with_tutorial(images, seed_anchors, tutorial_encode)


def test_tutorial_rule_tiny_boxes(seed_anchors, tutorial_encode):
    """Boxes under 2 % of the image lie inside several default boxes of the same size, so their best-anchor
    IoUs tie in exact arithmetic; the tutorial breaks the tie by the float32 rounding of its (y1, x1, y2, x2)
    default boxes computed in float64. Fidelity needs the same corners."""
    rng = np.random.default_rng(3)
    images = []
    for _ in range(16):
        n = int(rng.integers(1, 6))
        images.append((random_boxes(rng, n, 0.002, 0.02), rng.integers(1, 81, n)))
    compare_with_tutorial(images, seed_anchors, tutorial_encode)


def test_tutorial_rule_images_without_boxes_and_mixed_counts(seed_anchors, tutorial_encode):
    rng = np.random.default_rng(4)
    images = [
        (np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
        (random_boxes(rng, 7, 0.1, 0.8), rng.integers(1, 81, 7)),
        (np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
        (random_boxes(rng, 1, 0.1, 0.8), rng.integers(1, 81, 1)),
        (random_boxes(rng, 3, 0.1, 0.8), rng.integers(1, 81, 3)),
    ]
    compare_with_tutorial(images, seed_anchors, tutorial_encode)


def test_all_empty_batch_is_all_background(seed_anchors):
    boxes, labels = pad_targets([torch.zeros(0, 4), torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)] * 2)
    assert boxes.shape == (2, 1, 4) and (labels == PAD_LABEL).all()
    for rule in ("tutorial", "torchvision"):
        offsets, out = TargetEncoder(seed_anchors, rule=rule)(boxes, labels)
        assert (out == 0).all() and (offsets == 0).all()


def test_pad_targets_layout():
    boxes, labels = pad_targets([torch.ones(2, 4), torch.zeros(0, 4), 2 * torch.ones(3, 4)],
                                [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.int64), torch.tensor([3, 4, 5])])
    assert boxes.shape == (3, 3, 4) and labels.shape == (3, 3)
    assert labels.tolist() == [[1, 2, PAD_LABEL], [PAD_LABEL] * 3, [3, 4, 5]]
    assert (boxes[0, :2] == 1).all() and (boxes[0, 2] == 0).all() and (boxes[2] == 2).all()


def test_padding_does_not_change_matches(seed_anchors):
    """An image matched alone equals the same image inside a wider padded batch."""
    rng = np.random.default_rng(5)
    b = torch.from_numpy(random_boxes(rng, 2, 0.1, 0.6))
    lab = torch.tensor([3, 4])
    for rule in ("tutorial", "torchvision"):
        enc = TargetEncoder(seed_anchors, rule=rule)
        alone = enc(*pad_targets([b], [lab]))
        wide = enc(*pad_targets([b, torch.from_numpy(random_boxes(rng, 9, 0.1, 0.6))],
                                [lab, torch.arange(1, 10)]))
        assert torch.equal(alone[1][0], wide[1][0])
        torch.testing.assert_close(alone[0][0], wide[0][0])


# --------------------------------------------------------------------------- torchvision's SSDMatcher

def _distinct_best_anchor_images(rng, anchors_xyxy, count, min_size, max_size):
    images = []
    while len(images) < count:
        n = int(rng.integers(1, 8))
        b = torch.from_numpy(random_boxes(rng, n, min_size, max_size))
        iou = box_iou(b, anchors_xyxy)
        best = iou.argmax(1)
        # skip shared best anchors (the winner is implementation-defined) and exact best-IoU ties
        top2 = iou.topk(2, dim=1).values
        if best.unique().numel() == n and (top2[:, 0] > top2[:, 1]).all():
            images.append((b, torch.from_numpy(rng.integers(1, 81, n))))
    return images


@pytest.mark.parametrize("sizes", [(0.1, 0.9), (0.03, 0.3)])
def test_torchvision_rule_matches_ssd_matcher(seed_anchors, sizes):
    rng = np.random.default_rng(6)
    enc = TargetEncoder(seed_anchors, rule="torchvision")
    images = _distinct_best_anchor_images(rng, enc.anchors_xyxy, 12, *sizes)
    images.insert(3, (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)))     # an empty image in the batch
    boxes, labels = pad_targets([b for b, _ in images], [lab for _, lab in images])
    offsets, out_labels = enc(boxes, labels)
    matches = match_torchvision(boxes, labels, enc.anchors_xyxy, 0.5)
    matcher = SSDMatcher(0.5)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    for i, (b, lab) in enumerate(images):
        if len(b) == 0:
            assert (out_labels[i] == 0).all()
            continue
        ref = matcher(box_iou(b, enc.anchors_xyxy))                  # (A,) gt index or -1
        pos = ref >= 0
        assert torch.equal(out_labels[i] > 0, pos)
        assert torch.equal(matches.gt_index[i][pos], ref[pos])
        assert torch.equal(out_labels[i][pos], lab[ref[pos]])
        ref_offsets = coder.encode_single(b[ref[pos]], enc.anchors_xyxy[pos])
        torch.testing.assert_close(offsets[i][pos], ref_offsets, rtol=1e-4, atol=1e-4)


def test_torchvision_rule_threshold_is_inclusive_tutorial_is_strict():
    """torchvision keeps IoU >= 0.5, the tutorial needs > 0.5."""
    anchors = torch.tensor([[0.25, 0.5, 0.5, 1.0],     # cxcywh; xyxy (0, 0, 0.5, 1)
                            [0.75, 0.5, 0.5, 1.0],     # xyxy (0.5, 0, 1, 1)
                            [0.75, 0.25, 0.5, 0.5]])   # xyxy (0.5, 0, 1, 0.5)
    # gt 1 = anchor 0 exactly; gt 2 = anchor 2 exactly (its best anchor) and has IoU 0.25/0.5 = 0.5 with anchor 1.
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]]])
    labels = torch.tensor([[1, 2]])
    _, tv = TargetEncoder(anchors, rule="torchvision")(boxes, labels)
    _, tut = TargetEncoder(anchors, rule="tutorial")(boxes, labels)
    assert tv.tolist() == [[1, 2, 2]]
    assert tut.tolist() == [[1, 0, 2]]
