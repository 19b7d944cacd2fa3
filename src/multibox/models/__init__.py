"""Build an SSD from a :class:`multibox.config.Config`."""
from __future__ import annotations

from torch import nn

from ..anchors import AnchorSpec, default_boxes_cxcywh, tutorial_scales
from ..config import AnchorConfig, Config
from .ssd import SSD
from .tiny import TinyBackbone
from .vgg import TutorialVGG16Backbone


def anchor_spec(anchors: AnchorConfig, image_size: int) -> AnchorSpec:
    scales = anchors.scales or tutorial_scales(len(anchors.feature_sizes))
    return AnchorSpec(anchors.feature_sizes, anchors.steps, scales, anchors.aspect_ratios, image_size,
                      anchors.clip, anchors.extra_box_second)


def build_backbone(cfg: Config) -> nn.Module:
    arch = cfg.model.arch
    if arch == "tiny":
        return TinyBackbone(cfg.model.widths)
    if arch == "ssd300_vgg16_seed":
        return TutorialVGG16Backbone(cfg.model.dropout)
    raise ValueError(f"unknown model.arch {arch!r}")


def init_weights(model: nn.Module, scheme: str) -> None:
    """``truncated_normal``: the tutorial's TruncatedNormal(σ = 0.02) (cut at ±2σ, as MindSpore does) on every
    weight except BatchNorm's; ``kaiming``: He initialisation for convolutions. Biases start at zero, BN at (1, 0)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if scheme == "truncated_normal":
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                raise ValueError(f"unknown model.init {scheme!r}")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_model(cfg: Config) -> SSD:
    spec = anchor_spec(cfg.anchors, cfg.model.image_size)
    backbone = build_backbone(cfg)
    if len(backbone.out_channels) != len(spec.feature_sizes):
        raise ValueError(f"{cfg.model.arch} gives {len(backbone.out_channels)} feature maps, "
                         f"anchors.feature_sizes has {len(spec.feature_sizes)}")
    model = SSD(backbone, backbone.out_channels, spec.boxes_per_location(), cfg.model.num_classes,
                default_boxes_cxcywh(spec), head=cfg.model.head)
    init_weights(model, cfg.model.init)
    if cfg.model.class_prior is not None:
        model.init_class_prior(cfg.model.class_prior)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["SSD", "anchor_spec", "build_model", "count_parameters", "init_weights"]
