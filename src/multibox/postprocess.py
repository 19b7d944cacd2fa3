"""Raw SSD outputs -> detections: decode, score, threshold, one batched NMS for the whole batch, caps, rescale."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import nms

from .boxes import cxcywh_to_xyxy, decode_cxcywh

# torchvision's bound on the predicted log size ratio: keeps exp() finite with random weights.
MAX_LOG_RATIO = 4.135166556742356  # log(1000 / 16)


def group_rank(groups: Tensor) -> Tensor:
    """Position of each element among the earlier elements of its group: (K,) int ids -> (K,) ranks 0, 1, ...

    The input order is kept within a group, so ranks follow it (e.g. descending score)."""
    if groups.numel() == 0:
        return groups
    order = torch.argsort(groups, stable=True)
    sorted_groups = groups[order]
    is_start = torch.ones_like(sorted_groups, dtype=torch.bool)
    is_start[1:] = sorted_groups[1:] != sorted_groups[:-1]
    positions = torch.arange(len(groups), device=groups.device)
    starts = torch.cummax(torch.where(is_start, positions, torch.zeros_like(positions)), dim=0).values
    rank = torch.empty_like(positions)
    rank[order] = positions - starts
    return rank


def batched_nms_float64(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each group, all groups in one ``nms`` call; indices sorted by descending score.

    Boxes lie in [0, 1], so shifting group g by 2·g separates the groups. The shift is done in float64: in
    float32, with thousands of (image, class) groups in a batch, the shifted corners lose ~1e-4 of precision and
    suppression near the threshold would depend on an image's position in the batch.
    """
    shifted = boxes.double() + groups.double()[:, None] * 2.0
    return nms(shifted, scores.double(), iou_threshold)


@dataclass
class PostProcessor:
    """Turns (loc, cls) into per-image detections in the input image's normalised coordinates or in pixels.

    Args:
        score_activation: "sigmoid" (independent per-class scores, the tutorial's focal loss) or "softmax".
        score_threshold: keep class scores strictly above it.
        nms_threshold: IoU above which a lower-scored box of the same class and image is suppressed.
        max_per_class: at most this many boxes per class and image after NMS.
        max_per_image: at most this many boxes per image (highest scores), None = no cap.
        pre_nms_top_k: at most this many candidates per class and image enter NMS (torchvision: 400).
        center_variance, size_variance: the box encoding's scales.
    """

    score_activation: str = "sigmoid"
    score_threshold: float = 0.1
    nms_threshold: float = 0.6
    max_per_class: int = 100
    max_per_image: int | None = None
    pre_nms_top_k: int | None = None
    center_variance: float = 0.1
    size_variance: float = 0.2

    def scores(self, cls_logits: Tensor) -> Tensor:
        """(N, A, 1 + C) logits -> (N, A, C) object-class scores (background dropped)."""
        logits = cls_logits.float()
        probs = logits.sigmoid() if self.score_activation == "sigmoid" else logits.softmax(-1)
        return probs[..., 1:]

    def decode(self, loc: Tensor, anchors_cxcywh: Tensor) -> Tensor:
        """(N, A, 4) offsets -> (N, A, 4) xyxy boxes clipped to [0, 1]."""
        boxes = decode_cxcywh(loc.float(), anchors_cxcywh, self.center_variance, self.size_variance, MAX_LOG_RATIO)
        return cxcywh_to_xyxy(boxes).clamp(0.0, 1.0)

    @torch.no_grad()
    def __call__(self, loc: Tensor, cls_logits: Tensor, anchors_cxcywh: Tensor,
                 image_sizes: list[tuple[int, int]] | Tensor | None = None) -> list[dict[str, Tensor]]:
        """Args:
            loc: (N, A, 4); cls_logits: (N, A, 1 + C); anchors_cxcywh: (A, 4).
            image_sizes: N (height, width) pairs: boxes are scaled to those pixel sizes; None keeps [0, 1] units.
        Returns:
            N dicts with ``boxes`` (K, 4) xyxy, ``scores`` (K,), ``labels`` (K,) int64 in 1..C, sorted by score.
        """
        boxes = self.decode(loc, anchors_cxcywh)
        scores = self.scores(cls_logits)
        n, a, c = scores.shape
        image_idx, anchor_idx, class_idx = torch.nonzero(scores > self.score_threshold, as_tuple=True)
        cand_scores = scores[image_idx, anchor_idx, class_idx]
        groups = image_idx * c + class_idx
        if self.pre_nms_top_k is not None:
            order = torch.argsort(cand_scores, descending=True)
            top = order[group_rank(groups[order]) < self.pre_nms_top_k]
            image_idx, anchor_idx, class_idx, cand_scores, groups = (
                t[top] for t in (image_idx, anchor_idx, class_idx, cand_scores, groups))
        cand_boxes = boxes[image_idx, anchor_idx]
        keep = batched_nms_float64(cand_boxes, cand_scores, groups, self.nms_threshold)
        keep = keep[group_rank(groups[keep]) < self.max_per_class]
        if self.max_per_image is not None:
            keep = keep[group_rank(image_idx[keep]) < self.max_per_image]
        return self._split(cand_boxes[keep], cand_scores[keep], class_idx[keep] + 1, image_idx[keep], n, image_sizes)

    @staticmethod
    def _split(boxes: Tensor, scores: Tensor, labels: Tensor, image_idx: Tensor, n: int,
               image_sizes: list[tuple[int, int]] | Tensor | None) -> list[dict[str, Tensor]]:
        if image_sizes is not None:
            sizes = torch.as_tensor(image_sizes, dtype=boxes.dtype, device=boxes.device).reshape(n, 2)
            boxes = boxes * sizes[image_idx][:, [1, 0, 1, 0]]
        # One sort by image keeps each image's detections in descending score order.
        order = torch.argsort(image_idx, stable=True)
        counts = torch.bincount(image_idx, minlength=n).tolist()
        return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in
                zip(boxes[order].split(counts), scores[order].split(counts), labels[order].split(counts))]
