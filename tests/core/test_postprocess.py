"""Tests for multibox.core.postprocess.

Reference: the tutorial's ``SsdInferWithDecoder`` decoding + ``COCOMetrics.update`` selection written per image and
per class in Python, with ``torchvision.ops.nms`` for the suppression; hand-made ``group_rank`` cases.
"""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import nms

from multibox.core.anchors import default_boxes_cxcywh
from multibox.config import load_config
from multibox.core.anchors import anchor_spec
from multibox.core.postprocess import PostProcessor, group_rank


def reference_postprocess(loc, cls_logits, anchors, *, score_activation="sigmoid", score_threshold=0.1,
                          nms_threshold=0.6, max_per_class=100, max_per_image=None, pre_nms_top_k=None,
                          image_sizes=None):
    """One image and one class at a time (tutorial order: decode, clip to [0, 1], per class: threshold, NMS,
    keep the first ``max_per_class``; then scale by (h, w) of the image)."""
    out = []
    for n in range(loc.shape[0]):
        xy = loc[n, :, :2] * 0.1 * anchors[:, 2:] + anchors[:, :2]
        wh = torch.exp(loc[n, :, 2:] * 0.2) * anchors[:, 2:]
        boxes = torch.cat((xy - wh / 2.0, xy + wh / 2.0), dim=-1).clamp(0, 1)
        logits = cls_logits[n]
        scores = logits.sigmoid() if score_activation == "sigmoid" else logits.softmax(-1)
        det_boxes, det_scores, det_labels = [], [], []
        for c in range(1, scores.shape[1]):
            class_scores = scores[:, c]
            mask = class_scores > score_threshold
            if not mask.any():
                continue
            class_boxes, class_scores = boxes[mask], class_scores[mask]
            if pre_nms_top_k is not None:
                top = class_scores.argsort(descending=True)[:pre_nms_top_k]
                class_boxes, class_scores = class_boxes[top], class_scores[top]
            keep = nms(class_boxes, class_scores, nms_threshold)[:max_per_class]
            det_boxes.append(class_boxes[keep])
            det_scores.append(class_scores[keep])
            det_labels += [c] * len(keep)
        b = torch.cat(det_boxes) if det_boxes else torch.zeros(0, 4)
        s = torch.cat(det_scores) if det_scores else torch.zeros(0)
        lab = torch.tensor(det_labels, dtype=torch.int64)
        order = s.argsort(descending=True)
        if max_per_image is not None:
            order = order[:max_per_image]
        b, s, lab = b[order], s[order], lab[order]
        if image_sizes is not None:
            h, w = image_sizes[n]
            b = b * torch.tensor([w, h, w, h], dtype=b.dtype)
        out.append({"boxes": b, "scores": s, "labels": lab})
    return out


def assert_same_detections(got, ref, atol=1e-5):
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g["boxes"].shape == r["boxes"].shape, f"image {i}: {len(g['boxes'])} vs {len(r['boxes'])} detections"
        assert g["labels"].dtype == torch.int64
        # ours is sorted by descending score; ties between classes are improbable with random logits
        assert (g["scores"][:-1] >= g["scores"][1:]).all()
        torch.testing.assert_close(g["scores"], r["scores"], rtol=0, atol=1e-6)
        assert torch.equal(g["labels"], r["labels"])
        torch.testing.assert_close(g["boxes"], r["boxes"], rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def seed_anchors() -> torch.Tensor:
    cfg = load_config("ssd300-vgg16-seed")
    return default_boxes_cxcywh(anchor_spec(cfg.anchors, cfg.model.image_size))


def random_outputs(seed, n, a, c, logit_mean=-3.0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, a, 4, generator=g) * 0.5
    logits = torch.randn(n, a, c + 1, generator=g) * 1.5 + logit_mean
    return loc, logits


SETTINGS = [
    dict(),                                                                       # the tutorial: 0.1, 0.6, 100
    dict(score_threshold=0.3, nms_threshold=0.45, max_per_class=5),
    dict(score_threshold=0.2, nms_threshold=0.5, max_per_class=50, max_per_image=40),
    dict(score_threshold=0.2, nms_threshold=0.45, max_per_class=20, max_per_image=30, pre_nms_top_k=25),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_matches_per_image_per_class_reference_seed_anchors(seed_anchors, settings):
    loc, logits = random_outputs(0, 3, seed_anchors.shape[0], 6)
    sizes = [(480, 640), (300, 300), (375, 500)]                  # (H, W)
    got = PostProcessor(**settings)(loc, logits, seed_anchors, sizes)
    ref = reference_postprocess(loc, logits, seed_anchors, image_sizes=sizes, **settings)
    assert sum(len(r["scores"]) for r in ref) > 50                # the case is not trivial
    assert_same_detections(got, ref, atol=1e-3)                   # pixels


@pytest.mark.parametrize("settings", SETTINGS)
def test_matches_reference_few_candidates(settings):
    """Few candidates (torchvision's batched_nms takes its coordinate-offset path), normalised output."""
    g = torch.Generator().manual_seed(1)
    centres = torch.rand(80, 2, generator=g) * 0.6 + 0.2
    sizes = torch.rand(80, 2, generator=g) * 0.2 + 0.05
    anchors = torch.cat((centres, sizes), dim=1)
    loc, logits = random_outputs(1, 4, 80, 3, logit_mean=-1.0)
    got = PostProcessor(**settings)(loc, logits, anchors)
    ref = reference_postprocess(loc, logits, anchors, **settings)
    assert sum(len(r["scores"]) for r in ref) > 20
    assert_same_detections(got, ref)


def test_softmax_scores_match_reference():
    g = torch.Generator().manual_seed(2)
    anchors = torch.cat((torch.rand(200, 2, generator=g), torch.rand(200, 2, generator=g) * 0.3 + 0.05), dim=1)
    loc, logits = random_outputs(2, 2, 200, 4, logit_mean=0.0)
    settings = dict(score_activation="softmax", score_threshold=0.25, nms_threshold=0.45, max_per_class=10)
    got = PostProcessor(**settings)(loc, logits, anchors, torch.tensor([[100, 200], [50, 70]]))
    ref = reference_postprocess(loc, logits, anchors, image_sizes=[(100, 200), (50, 70)], **settings)
    assert sum(len(r["scores"]) for r in ref) > 10
    assert_same_detections(got, ref, atol=1e-4)


def test_rescale_uses_height_width_order_and_clips_first():
    """One anchor whose decoded box leaves the image: clipped in [0, 1] first, then x·W and y·H."""
    anchors = torch.tensor([[0.9, 0.5, 0.4, 0.2]])                # xyxy (0.7, 0.4, 1.1, 0.6)
    logits = torch.tensor([[[-9.0, 4.0]]])                        # background, class 1
    out = PostProcessor()(torch.zeros(1, 1, 4), logits, anchors, [(200, 1000)])   # H = 200, W = 1000
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[700.0, 80.0, 1000.0, 120.0]]))
    assert out[0]["labels"].tolist() == [1]
    assert out[0]["scores"].tolist() == pytest.approx([1 / (1 + math.exp(-4.0))])


def test_threshold_is_strict():
    anchors = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    logits = torch.tensor([[[0.0, 0.0]]])                         # σ(0) = 0.5 exactly
    assert len(PostProcessor(score_threshold=0.5)(torch.zeros(1, 1, 4), logits, anchors)[0]["scores"]) == 0
    assert len(PostProcessor(score_threshold=0.4999)(torch.zeros(1, 1, 4), logits, anchors)[0]["scores"]) == 1


def test_empty_result_shapes():
    loc = torch.zeros(3, 10, 4)
    logits = torch.full((3, 10, 5), -20.0)
    anchors = torch.tensor([[0.5, 0.5, 0.1, 0.1]]).repeat(10, 1)
    for sizes in (None, [(10, 20)] * 3):
        out = PostProcessor()(loc, logits, anchors, sizes)
        assert len(out) == 3
        for d in out:
            assert d["boxes"].shape == (0, 4) and d["boxes"].dtype == torch.float32
            assert d["scores"].shape == (0,)
            assert d["labels"].shape == (0,) and d["labels"].dtype == torch.int64


def test_one_image_empty_others_not():
    anchors = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    logits = torch.full((3, 2, 3), -20.0)
    logits[0, 1, 2] = 5.0
    logits[2, 0, 1] = 3.0
    out = PostProcessor()(torch.zeros(3, 2, 4), logits, anchors)
    assert [len(d["scores"]) for d in out] == [1, 0, 1]
    assert out[0]["labels"].tolist() == [2] and out[2]["labels"].tolist() == [1]
    torch.testing.assert_close(out[0]["boxes"], torch.tensor([[0.6, 0.6, 0.8, 0.8]]))


def test_nms_is_per_class_and_per_image():
    """Two identical boxes: suppressed within one class, both kept when the classes or images differ."""
    anchors = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
    logits = torch.full((2, 2, 3), -20.0)
    logits[0, 0, 1], logits[0, 1, 1] = 2.0, 1.0           # image 0: same class -> one survives
    logits[1, 0, 1], logits[1, 1, 2] = 2.0, 1.0           # image 1: different classes -> both survive
    out = PostProcessor()(torch.zeros(2, 2, 4), logits, anchors)
    assert out[0]["labels"].tolist() == [1]
    assert out[0]["scores"].tolist() == pytest.approx([1 / (1 + math.exp(-2.0))])
    assert out[1]["labels"].tolist() == [1, 2]


def test_near_threshold_pairs_do_not_depend_on_batch_position():
    """Every image of the batch holds the same 10 pairs of boxes, each pair with IoU just below the NMS threshold
    (0.6 - ε), scored on the last class: per-image, per-class NMS keeps all 20 boxes in every image.

    The whole batch goes through one ``batched_nms`` with group = image·C + class. With few candidates
    torchvision offsets each group's boxes by group·(max coordinate + 1) in float32; with normalised boxes and
    group ids up to N·C that rounds the coordinates of later images/classes (spacing 2.4e-4 past 2048) and
    flips near-threshold decisions, so an image's detections would depend on where it sits in the batch.
    """
    num_images, num_classes, thr = 16, 80, 0.6
    anchors = []
    for k in range(10):
        side = 0.04 + 0.004 * k
        iou = thr - 10 ** (-4 + 0.25 * k)                       # ε from 1e-4 to 1.8e-2
        shift = side * (1 - iou) / (1 + iou)                    # horizontal shift: IoU = (s - d)/(s + d)
        cx, cy = 0.1 + 0.08 * k, 0.1 + 0.08 * k
        anchors += [[cx, cy, side, side], [cx + shift, cy, side, side]]
    anchors = torch.tensor(anchors, dtype=torch.float64).float()
    logits = torch.full((num_images, 20, num_classes + 1), -20.0)
    logits[:, :, num_classes] = torch.linspace(3.0, 1.0, 20)   # distinct scores, same in every image
    loc = torch.zeros(num_images, 20, 4)
    ref = reference_postprocess(loc, logits, anchors, nms_threshold=thr)
    assert [len(r["scores"]) for r in ref] == [20] * num_images
    got = PostProcessor(nms_threshold=thr)(loc, logits, anchors)
    counts = [len(d["scores"]) for d in got]
    assert counts == [20] * num_images, f"detections per image: {counts}"
    assert_same_detections(got, ref)


# --------------------------------------------------------------------------- group_rank

@pytest.mark.parametrize("groups,ranks", [
    ([2, 0, 2, 1, 0, 2], [0, 0, 1, 0, 1, 2]),
    ([5], [0]),
    ([1, 1, 1, 1], [0, 1, 2, 3]),
    ([3, 1, 3, 1], [0, 0, 1, 1]),
    ([0, 1, 2, 3], [0, 0, 0, 0]),
    ([7, 7, 2, 7, 2, 9], [0, 1, 0, 2, 1, 0]),
])
def test_group_rank_golden(groups, ranks):
    assert group_rank(torch.tensor(groups)).tolist() == ranks


def test_group_rank_empty_and_random_against_loop():
    assert group_rank(torch.zeros(0, dtype=torch.int64)).shape == (0,)
    g = torch.Generator().manual_seed(3)
    groups = torch.randint(0, 17, (500,), generator=g)
    seen: dict[int, int] = {}
    expected = []
    for x in groups.tolist():
        expected.append(seen.get(x, 0))
        seen[x] = seen.get(x, 0) + 1
    assert group_rank(groups).tolist() == expected


@pytest.mark.parametrize("max_per_call", [1, 7, 64, 100_000])
def test_grouped_nms_chunking_is_exact(max_per_call):
    """Splitting the candidates into several nms calls (whole groups each) keeps exactly the same boxes as a
    per-group reference loop."""
    from multibox.core.postprocess import grouped_nms

    g = torch.Generator().manual_seed(3)
    n = 400
    xy = torch.rand(n, 2, generator=g) * 0.8
    boxes = torch.cat((xy, xy + 0.05 + torch.rand(n, 2, generator=g) * 0.2), dim=1)
    scores = torch.rand(n, generator=g)
    groups = torch.randint(0, 23, (n,), generator=g)
    got = grouped_nms(boxes, scores, groups, 0.4, max_per_call=max_per_call)
    expected = []
    for group in groups.unique():
        idx = torch.nonzero(groups == group).flatten()
        expected.append(idx[nms(boxes[idx], scores[idx], 0.4)])
    expected = torch.cat(expected)
    expected = expected[torch.argsort(scores[expected], descending=True)]
    assert torch.equal(got, expected)


def test_detections_to_cpu_keeps_each_images_detections():
    from multibox.core.postprocess import detections_to_cpu

    g = torch.Generator().manual_seed(0)
    detections = [{"boxes": torch.rand(n, 4, generator=g), "scores": torch.rand(n, generator=g),
                   "labels": torch.randint(1, 5, (n,), generator=g)} for n in (2, 0, 3)]
    moved = detections_to_cpu(detections)
    assert len(moved) == 3 and detections_to_cpu([]) == []
    for before, after in zip(detections, moved):
        assert set(after) == {"boxes", "scores", "labels"}
        for key in before:
            assert torch.equal(after[key], before[key]) and after[key].device.type == "cpu"
