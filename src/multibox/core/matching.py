"""Batched anchor matching and target encoding (Liu et al. 2016, §2.2 "Matching strategy").

Everything works on padded batch tensors on any device: no loop over images or boxes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from multibox.core.anchors import anchor_spec, default_boxes_cxcywh
from multibox.core.boxes import box_iou_xyxy, cxcywh_to_xyxy, encode_cxcywh, xyxy_to_cxcywh

if TYPE_CHECKING:
    from multibox.config import Config

# A ground-truth slot with this label is padding.
PAD_LABEL = -1


def pad_targets(boxes: list[Tensor], labels: list[Tensor], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Stack per-image targets into padded tensors.

    Args:
        boxes: B tensors (G_i, 4), xyxy.
        labels: B tensors (G_i,), int.
    Returns:
        boxes (B, G, 4) with G = max(1, max G_i), zero-filled; labels (B, G) with ``PAD_LABEL`` in empty slots.
    """
    batch = len(boxes)
    width = max([1] + [len(b) for b in boxes])
    out_boxes = torch.zeros(batch, width, 4, dtype=torch.float32)
    out_labels = torch.full((batch, width), PAD_LABEL, dtype=torch.int64)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        out_boxes[i, : len(b)] = b
        out_labels[i, : len(lab)] = lab
    if device is not None:
        out_boxes, out_labels = out_boxes.to(device, non_blocking=True), out_labels.to(device, non_blocking=True)
    return out_boxes, out_labels


@dataclass(frozen=True)
class Matches:
    """Result of matching one batch: (B, A) index of the ground truth per anchor and its label (0 = background)."""

    gt_index: Tensor
    labels: Tensor

    @property
    def positive(self) -> Tensor:
        return self.labels > 0


def match_tutorial(gt_boxes_xyxy: Tensor, gt_labels: Tensor, anchors_xyxy: Tensor, iou_threshold: float,
                   iou: Tensor | None = None) -> Matches:
    """The tutorial's rule, vectorised.

    Each ground truth's best anchor (first on ties) scores 2.0 instead of its IoU; each anchor then takes the
    ground truth with the highest score (the earlier box on ties) and is positive when that score exceeds
    ``iou_threshold``.

    Args:
        gt_boxes_xyxy: (B, G, 4); gt_labels: (B, G) with ``PAD_LABEL`` for padding; anchors_xyxy: (A, 4).
        iou: their (B, G, A) IoU when the caller has it already.
    """
    valid = gt_labels != PAD_LABEL                                      # (B, G)
    if iou is None:
        iou = box_iou_xyxy(gt_boxes_xyxy, anchors_xyxy)                 # (B, G, A)
    best_anchor = iou.argmax(dim=2, keepdim=True)                       # (B, G, 1)
    iou = iou.scatter(2, best_anchor, 2.0)
    # Padding can never win: it scores below any real IoU.
    iou = iou.masked_fill(~valid[..., None], -1.0)
    score, gt_index = iou.max(dim=1)                                    # (B, A); first index on ties
    labels = gt_labels.gather(1, gt_index)
    labels = torch.where(score > iou_threshold, labels, torch.zeros_like(labels))
    return Matches(gt_index=gt_index, labels=labels)


def match_torchvision(gt_boxes_xyxy: Tensor, gt_labels: Tensor, anchors_xyxy: Tensor, iou_threshold: float,
                      iou: Tensor | None = None) -> Matches:
    """torchvision's ``SSDMatcher``: best ground truth per anchor above the threshold, then every ground
    truth is forced onto its best anchor (the later box wins when two share one). ``iou``: as
    :func:`match_tutorial`'s."""
    valid = gt_labels != PAD_LABEL
    if iou is None:
        iou = box_iou_xyxy(gt_boxes_xyxy, anchors_xyxy)
    iou = iou.masked_fill(~valid[..., None], -1.0)
    score, gt_index = iou.max(dim=1)
    positive = score >= iou_threshold
    best_anchor = iou.argmax(dim=2)                                     # (B, G)
    num_gt = gt_labels.shape[1]
    gt_range = torch.arange(num_gt, device=gt_index.device).expand_as(best_anchor)
    # Padded slots scatter onto a dummy column past the end, then are dropped.
    target_col = torch.where(valid, best_anchor, torch.full_like(best_anchor, anchors_xyxy.shape[0]))
    extended_index = torch.cat((gt_index, gt_index[:, :1]), dim=1)
    extended_pos = torch.cat((positive, positive[:, :1]), dim=1)
    extended_index = extended_index.scatter(1, target_col, gt_range)
    extended_pos = extended_pos.scatter(1, target_col, torch.ones_like(valid))
    gt_index, positive = extended_index[:, :-1], extended_pos[:, :-1]
    labels = torch.where(positive, gt_labels.gather(1, gt_index), torch.zeros_like(gt_index))
    return Matches(gt_index=gt_index, labels=labels)


MATCHERS = {"tutorial": match_tutorial, "torchvision": match_torchvision}


class TargetEncoder:
    """Matches a batch of ground truths to the default boxes and encodes the regression targets.

    Args:
        anchors_cxcywh: (A, 4) default boxes normalised to [0, 1]; pass them in float64 (as the tutorial computes
            them) so that corners, and with them the ties between equal-IoU anchors, round exactly as there.
        iou_threshold: positive if the matching score is above it (0.5 in the paper and the tutorial).
        center_variance, size_variance: encoding scales (0.1, 0.2).
        rule: "tutorial" or "torchvision" (see the matcher functions).
    """

    def __init__(self, anchors_cxcywh: Tensor, iou_threshold: float = 0.5, center_variance: float = 0.1,
                 size_variance: float = 0.2, rule: str = "tutorial"):
        self.anchors_cxcywh = anchors_cxcywh.float()
        self.anchors_xyxy = cxcywh_to_xyxy(anchors_cxcywh).float()
        self.iou_threshold = iou_threshold
        self.center_variance = center_variance
        self.size_variance = size_variance
        self.match = MATCHERS[rule]

    def to(self, device: torch.device) -> "TargetEncoder":
        self.anchors_cxcywh = self.anchors_cxcywh.to(device)
        self.anchors_xyxy = self.anchors_xyxy.to(device)
        return self

    @torch.no_grad()
    def __call__(self, gt_boxes_xyxy: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, G, 4) normalised xyxy boxes and (B, G) labels -> (B, A, 4) offsets and (B, A) labels.

        Offsets of negative anchors are zero (they are never used by the loss).
        """
        matches = self.match(gt_boxes_xyxy, gt_labels, self.anchors_xyxy, self.iou_threshold)
        index = matches.gt_index[..., None].expand(-1, -1, 4)
        matched_boxes = gt_boxes_xyxy.gather(1, index)
        offsets = encode_cxcywh(xyxy_to_cxcywh(matched_boxes), self.anchors_cxcywh,
                                self.center_variance, self.size_variance)
        offsets = offsets * matches.positive[..., None]
        return offsets, matches.labels


def build_encoder(cfg: Config, device: torch.device) -> TargetEncoder:
    """The target encoder of ``cfg`` (its default boxes, matching rule and variances) on ``device``."""
    anchors = default_boxes_cxcywh(anchor_spec(cfg.anchors, cfg.model.image_size), torch.float64)
    return TargetEncoder(anchors, cfg.loss.iou_threshold, cfg.loss.center_variance, cfg.loss.size_variance,
                         cfg.loss.match_rule).to(device)
