"""SSD training losses, batched over images and anchors.

Both losses take the network's raw outputs and the encoder's targets:

- ``loc``: (B, A, 4) predicted offsets; ``cls_logits``: (B, A, 1 + C) class logits (channel 0 = background);
- ``loc_targets``: (B, A, 4); ``labels``: (B, A) int64 with 0 = background.

They return a dict with ``loss`` (the scalar to back-propagate) and its detached parts ``loss_cls``, ``loss_loc``
and ``num_pos``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from multibox.config import Config


def _positive_count(labels: Tensor) -> Tensor:
    # Normalising by zero positives would give inf; an image batch without objects still trains its negatives.
    return (labels > 0).sum().clamp(min=1).to(torch.float32)


def _smooth_l1_positive(loc: Tensor, loc_targets: Tensor, positive: Tensor, beta: float) -> Tensor:
    per_anchor = F.smooth_l1_loss(loc.float(), loc_targets, beta=beta, reduction="none").sum(-1)
    return (per_anchor * positive).sum()


class FocalMultiBoxLoss(nn.Module):
    """The tutorial's loss: sigmoid focal loss (Lin et al. 2017) over all 1 + C channels with one-hot targets,
    plus Smooth L1 on the positives' offsets, both summed and divided by the batch's number of positives.

    Args:
        alpha: weight of target-1 entries (0.75 in the tutorial); target-0 entries get 1 - alpha.
        gamma: focusing exponent (2).
        beta: Smooth L1 transition point (1).
    """

    def __init__(self, alpha: float = 0.75, gamma: float = 2.0, beta: float = 1.0):
        super().__init__()
        self.alpha, self.gamma, self.beta = alpha, gamma, beta

    def forward(self, loc: Tensor, cls_logits: Tensor, loc_targets: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = cls_logits.float()
        one_hot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none")
        prob = logits.sigmoid()
        p_t = one_hot * prob + (1 - one_hot) * (1 - prob)
        alpha_t = one_hot * self.alpha + (1 - one_hot) * (1 - self.alpha)
        loss_cls = (alpha_t * (1 - p_t).pow(self.gamma) * bce).sum()
        positive = labels > 0
        loss_loc = _smooth_l1_positive(loc, loc_targets, positive, self.beta)
        num_pos = _positive_count(labels)
        return {"loss": (loss_cls + loss_loc) / num_pos, "loss_cls": loss_cls.detach() / num_pos,
                "loss_loc": loss_loc.detach() / num_pos, "num_pos": num_pos}


class HardNegativeMultiBoxLoss(nn.Module):
    """The paper's loss (Liu et al. 2016, eq. 1): softmax cross-entropy on the positives and on the hardest
    negatives (ranked by their background loss, ``neg_pos_ratio`` per positive, per image), plus Smooth L1 on
    the positives, divided by the batch's number of positives — as torchvision's ``SSD.compute_loss``.
    """

    def __init__(self, neg_pos_ratio: int = 3, beta: float = 1.0):
        super().__init__()
        self.neg_pos_ratio, self.beta = neg_pos_ratio, beta

    def forward(self, loc: Tensor, cls_logits: Tensor, loc_targets: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = cls_logits.float()
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        positive = labels > 0
        num_neg = self.neg_pos_ratio * positive.sum(dim=1, keepdim=True)     # (B, 1)
        negative_loss = ce.detach().masked_fill(positive, -float("inf"))
        # Rank of every anchor's loss within its image, without a Python loop: sort once, invert the permutation.
        order = negative_loss.argsort(dim=1, descending=True)
        rank = order.argsort(dim=1)
        hard_negative = rank < num_neg
        loss_cls = (ce * (positive | hard_negative)).sum()
        loss_loc = _smooth_l1_positive(loc, loc_targets, positive, self.beta)
        num_pos = _positive_count(labels)
        return {"loss": (loss_cls + loss_loc) / num_pos, "loss_cls": loss_cls.detach() / num_pos,
                "loss_loc": loss_loc.detach() / num_pos, "num_pos": num_pos}


def build_loss(kind: str, **kwargs) -> nn.Module:
    losses = {"focal": FocalMultiBoxLoss, "hard_negative": HardNegativeMultiBoxLoss}
    if kind not in losses:
        raise ValueError(f"unknown loss {kind!r}; choose one of {sorted(losses)}")
    return losses[kind](**kwargs)


def build_criterion(cfg: Config) -> nn.Module:
    """The loss of ``cfg.loss``: the tutorial's focal loss or the paper's hard negative mining."""
    if cfg.loss.kind == "focal":
        return build_loss("focal", alpha=cfg.loss.alpha, gamma=cfg.loss.gamma, beta=cfg.loss.smooth_l1_beta)
    return build_loss(cfg.loss.kind, neg_pos_ratio=cfg.loss.neg_pos_ratio, beta=cfg.loss.smooth_l1_beta)
