"""Raw SSD outputs -> detections: decode, score, threshold, one batched NMS for the whole batch, caps, rescale."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.ops import nms

from multibox.core.boxes import cxcywh_to_xyxy, decode_cxcywh
from multibox.core.resize import as_hw, detections_to_pixels

if TYPE_CHECKING:
    from multibox.config import Config

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


def default_nms_chunk(device: torch.device) -> int:
    """Candidates per ``nms`` call. torchvision's CPU kernel does O(candidates x kept) sequential work per call, so
    on the CPU a call should hold about one group (pre_nms_top_k = 400: ~1 class of one image); the CUDA kernel
    builds the whole pairwise mask in parallel, so there fewer, larger calls win."""
    return 4096 if device.type == "cuda" else 512


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float,
                max_per_call: int | None = None) -> Tensor:
    """Exact NMS within each group (image x class); returns kept indices sorted by descending score.

    Groups are separated by shifting group g by 2·g (boxes lie in [0, 1]) so that one ``nms`` call handles many
    groups. The shift is done in float64: in float32, with thousands of groups, shifted corners lose ~1e-4 and
    suppression near the threshold would depend on an image's position in the batch. Greedy NMS costs
    O(candidates x kept) per call, so candidates are split into calls of about ``max_per_call`` whole groups:
    one call when a trained model leaves few candidates, bounded work when random weights pass everything.
    ``max_per_call`` defaults to :func:`default_nms_chunk` of the boxes' device.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if max_per_call is None:
        max_per_call = default_nms_chunk(boxes.device)
    order = torch.argsort(groups, stable=True)
    sorted_groups = groups[order]
    _, counts = torch.unique_consecutive(sorted_groups, return_counts=True)
    group_start = torch.cumsum(counts, 0) - counts
    # Chunk id of each group: the start offset of the group in units of max_per_call (whole groups per chunk).
    chunk_of_group = torch.div(group_start, max_per_call, rounding_mode="floor")
    _, chunk_sizes = torch.unique_consecutive(chunk_of_group.repeat_interleave(counts), return_counts=True)
    shifted = boxes.double()[order] + sorted_groups.double()[:, None] * 2.0
    sorted_scores = scores.double()[order]
    keep, start = [], 0
    for size in chunk_sizes.tolist():
        keep.append(nms(shifted[start:start + size], sorted_scores[start:start + size], iou_threshold) + start)
        start += size
    kept = order[torch.cat(keep)]
    return kept[torch.argsort(scores[kept], descending=True, stable=True)]


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
        input_hw, letterbox: the network's (H, W) input and whether images were letterboxed into it
            (:mod:`multibox.core.resize`), which decide how boxes map back to each image's pixels.
    """

    score_activation: str = "sigmoid"
    score_threshold: float = 0.1
    nms_threshold: float = 0.6
    max_per_class: int = 100
    max_per_image: int | None = None
    pre_nms_top_k: int | None = None
    center_variance: float = 0.1
    size_variance: float = 0.2
    input_hw: tuple[int, int] = (300, 300)
    letterbox: bool = False

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
                 image_sizes: list[tuple[int, int]] | Tensor | None = None,
                 output_device: torch.device | str | None = None) -> list[dict[str, Tensor]]:
        """Args:
            loc: (N, A, 4); cls_logits: (N, A, 1 + C); anchors_cxcywh: (A, 4).
            image_sizes: N (height, width) pairs: boxes are mapped to those images' pixels (stretched or
                letterboxed, ``input_hw`` and ``letterbox``); None keeps the input's [0, 1] units.
            output_device: where the detections go (e.g. "cpu"): the batch's detections are copied in three
                transfers before being split per image, instead of three per image.
        Returns:
            N dicts with ``boxes`` (K, 4) xyxy, ``scores`` (K,), ``labels`` (K,) int64 in 1..C, sorted by score.
        """
        boxes = self.decode(loc, anchors_cxcywh)
        scores = self.scores(cls_logits)
        n, a, c = scores.shape
        if self.pre_nms_top_k is not None and self.pre_nms_top_k < a:
            image_idx, anchor_idx, class_idx, cand_scores = self._top_k_candidates(scores)
        else:
            image_idx, anchor_idx, class_idx = torch.nonzero(scores > self.score_threshold, as_tuple=True)
            cand_scores = scores[image_idx, anchor_idx, class_idx]
        groups = image_idx * c + class_idx
        cand_boxes = boxes[image_idx, anchor_idx]
        keep = grouped_nms(cand_boxes, cand_scores, groups, self.nms_threshold)
        keep = keep[group_rank(groups[keep]) < self.max_per_class]
        if self.max_per_image is not None:
            keep = keep[group_rank(image_idx[keep]) < self.max_per_image]
        return self._split(cand_boxes[keep], cand_scores[keep], class_idx[keep] + 1, image_idx[keep], n, image_sizes,
                           output_device)

    def _top_k_candidates(self, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The ``pre_nms_top_k`` best anchors of every (image, class) whose score passes the threshold.

        One dense ``topk`` over (N, C, A) instead of thresholding first: with untrained weights nearly every one of
        the N·A·C scores passes a 0.01 threshold, and sorting those candidates to rank them within their group
        cost ~10x the network's own postprocessing time (torchvision also takes a per-class top-k first).
        Returns (K,) image, anchor and class indices and scores, grouped by (image, class), best first in a group.
        """
        top_scores, top_anchor = scores.transpose(1, 2).topk(self.pre_nms_top_k, dim=2)   # (N, C, k), sorted
        image_idx, class_idx, slot = torch.nonzero(top_scores > self.score_threshold, as_tuple=True)
        return image_idx, top_anchor[image_idx, class_idx, slot], class_idx, top_scores[image_idx, class_idx, slot]

    def _split(self, boxes: Tensor, scores: Tensor, labels: Tensor, image_idx: Tensor, n: int,
               image_sizes: list[tuple[int, int]] | Tensor | None,
               output_device: torch.device | str | None = None) -> list[dict[str, Tensor]]:
        if image_sizes is not None:
            boxes, keep = detections_to_pixels(boxes, image_idx, image_sizes, self.input_hw, self.letterbox)
            if not bool(keep.all()):
                boxes, scores, labels, image_idx = boxes[keep], scores[keep], labels[keep], image_idx[keep]
        # One sort by image keeps each image's detections in descending score order.
        order = torch.argsort(image_idx, stable=True)
        counts = torch.bincount(image_idx, minlength=n).tolist()
        boxes, scores, labels = boxes[order], scores[order], labels[order]
        if output_device is not None:
            boxes, scores, labels = boxes.to(output_device), scores.to(output_device), labels.to(output_device)
        return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in
                zip(boxes.split(counts), scores.split(counts), labels.split(counts))]


def build_postprocessor(cfg: Config) -> PostProcessor:
    """The postprocessing of ``cfg``: sigmoid scores for the focal loss, softmax otherwise; ``eval.*`` thresholds."""
    return PostProcessor(
        score_activation="sigmoid" if cfg.loss.kind == "focal" else "softmax",
        score_threshold=cfg.eval.score_threshold, nms_threshold=cfg.eval.nms_threshold,
        max_per_class=cfg.eval.max_per_class, max_per_image=cfg.eval.max_per_image,
        pre_nms_top_k=cfg.eval.pre_nms_top_k, center_variance=cfg.loss.center_variance,
        size_variance=cfg.loss.size_variance, input_hw=as_hw(cfg.model.image_size),
        letterbox=cfg.data.resize == "letterbox")


def detections_to_cpu(detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Per-image detections -> on the CPU, with one device-to-host copy per field for the whole batch (a copy per
    image and field would synchronise with a GPU 3 x batch times)."""
    if not detections:
        return []
    counts = [len(d["scores"]) for d in detections]
    fields = {key: torch.cat([d[key] for d in detections]).cpu().split(counts) for key in detections[0]}
    return [{key: parts[i] for key, parts in fields.items()} for i in range(len(detections))]
