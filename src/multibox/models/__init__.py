"""Build an SSD from a :class:`multibox.config.Config`."""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from multibox.config import Config, ConfigError
from multibox.core.anchors import AnchorSpec, anchor_spec, default_boxes_cxcywh
from multibox.core.resize import as_hw
from multibox.models.ssd import SSD
from multibox.models.fpn import FPN_TRUNKS, build_fpn_backbone
from multibox.models.shared_head import WeightSharedHead
from multibox.models.mobilenet_v2 import SSDMobileNetV2Backbone
from multibox.models.mobilenet_v3 import SSDLiteMobileNetV3Backbone
from multibox.models.tiny import TinyBackbone
from multibox.models.published import (check_fits, mobilenet_v3_reduced_tail, resolve_weights,
                                       trainable_backbone_stages)
from multibox.models.vgg import PaperVGG16Backbone, TutorialVGG16Backbone, freeze_vgg16_stages, init_paper_ssd
from multibox.models.weights import load_backbone


# The paper's VGG16 trunks: arch name -> SSD512's extra level (see PaperVGG16Backbone).
PAPER_ARCHS = {"ssd300_vgg16": False, "ssd512_vgg16": True}


def build_backbone(cfg: Config) -> nn.Module:
    arch = cfg.model.arch
    if arch == "tiny":
        return TinyBackbone(cfg.model.widths)
    if arch == "ssd300_vgg16_seed":
        return TutorialVGG16Backbone(cfg.model.dropout, relu=cfg.model.vgg_relu, batch_norm=cfg.model.vgg_bn)
    if arch in PAPER_ARCHS:
        return PaperVGG16Backbone(highres=PAPER_ARCHS[arch])
    if arch == "ssdlite320_mobilenet_v3":
        return SSDLiteMobileNetV3Backbone(reduced_tail=mobilenet_v3_reduced_tail(cfg))
    if arch == "ssd300_mobilenet_v2":
        return SSDMobileNetV2Backbone()
    if arch in FPN_TRUNKS:
        return build_fpn_backbone(arch)
    raise ValueError(f"unknown model.arch {arch!r}")


def network_feature_sizes(cfg: Config) -> list[tuple[int, int]]:
    """(f_h, f_w) of each feature map that ``model.arch`` gives at ``model.image_size``: one forward pass on the
    meta device (shapes only: no memory, no arithmetic, no weights read)."""
    height, width = as_hw(cfg.model.image_size)
    with torch.device("meta"):
        backbone = build_backbone(cfg).eval()
    try:
        features = backbone(torch.empty(1, 3, height, width, device="meta"))
    except RuntimeError as e:   # a map shrunk below a kernel: the input is too small for this network
        raise ConfigError(f"model.image_size {cfg.model.image_size!r} is too small for {cfg.model.arch}: "
                          f"{str(e).splitlines()[0]}") from None
    return [(int(f.shape[-2]), int(f.shape[-1])) for f in features]


def resolve_feature_sizes(cfg: Config) -> Config:
    """Set ``anchors.feature_sizes`` to the network's at ``model.image_size`` (f where the map is square, else
    [f_h, f_w]) and return ``cfg``. Sizes the config gives that equal the network's are kept with its ``steps``.
    Sizes that differ were written for another input size (a preset's, with ``model.image_size`` changed): the
    network's replace them, since others cannot run, and what was written for that size goes with them (logged):
    ``anchors.steps`` (centres on the feature grid instead) and, from a square input to a non-square one, explicit
    ``anchors.sizes`` become fractions of the shorter side (the boxes keep their shape in pixels)."""
    network = network_feature_sizes(cfg)
    if len(cfg.anchors.aspect_ratios) != len(network):
        raise ConfigError(f"{cfg.model.arch} gives {len(network)} feature maps, anchors.aspect_ratios has "
                          f"{len(cfg.anchors.aspect_ratios)} levels")
    given, steps = cfg.anchors.feature_sizes, cfg.anchors.steps
    if given is not None and [as_hw(f) for f in given] == network:
        return cfg
    cfg.anchors.feature_sizes = [h if h == w else [h, w] for h, w in network]
    if given is None and _steps_fit(steps, cfg, network):
        return cfg
    cfg.anchors.steps = None
    if given is not None and all(isinstance(f, int) for f in given) and cfg.anchors.sizes is not None:
        cfg.anchors.sizes = _square_sizes_on(cfg.anchors.sizes, as_hw(cfg.model.image_size))
    logging.getLogger(__name__).info(
        "anchors.feature_sizes: %s's maps at %s are %s (the config's %s and steps %s are for another input size: "
        "centres on the feature grid)", cfg.model.arch, "x".join(map(str, as_hw(cfg.model.image_size))),
        cfg.anchors.feature_sizes, given, steps)
    return cfg


def _square_sizes_on(sizes: list, input_hw: tuple[int, int]) -> list:
    """Explicit (w, h) boxes written in units of a square input, in units of each axis of ``input_hw``."""
    height, width = input_hw
    short = min(height, width)
    return [None if level is None else [[w * short / width, h * short / height] for w, h in level]
            for level in sizes]


def _steps_fit(steps: list[float] | None, cfg: Config, network: list[tuple[int, int]]) -> bool:
    """Whether ``anchors.steps`` describe these maps as the paper's do: each map has ceil(S / step) cells (SSD300:
    300 / 8 = 37.5 -> 38); non-square inputs use the grid anyway (:meth:`AnchorSpec.density_hw`)."""
    height, width = as_hw(cfg.model.image_size)
    if steps is None or height != width:
        return True
    return len(steps) == len(network) and all(math.ceil(height / s - 1e-9) == f for s, (f, _) in zip(steps, network))


def model_anchor_spec(cfg: Config) -> AnchorSpec:
    """The default-box geometry of ``cfg``'s model, its feature sizes resolved (:func:`resolve_feature_sizes`)."""
    return anchor_spec(resolve_feature_sizes(cfg).anchors, cfg.model.image_size)


def build_head(cfg: Config, feature_channels: list[int], boxes_per_location: list[int]) -> str | nn.Module:
    """``model.head``: a per-level head's name for :class:`SSD`, or for ``shared`` the weight-shared towers
    (:class:`WeightSharedHead`, ``model.head_layers`` deep), which need equal channels and boxes on every level."""
    if cfg.model.head != "shared":
        return cfg.model.head
    if len(set(feature_channels)) != 1 or len(set(boxes_per_location)) != 1:
        raise ValueError(f"model.head shared needs the same channels and boxes per location on every level, got "
                         f"{feature_channels} and {boxes_per_location}")
    return WeightSharedHead(feature_channels[0], len(feature_channels), boxes_per_location[0],
                            cfg.model.num_classes + 1, cfg.model.head_layers)


def init_weights(model: nn.Module, scheme: str) -> None:
    """``truncated_normal``: the tutorial's TruncatedNormal(σ = 0.02) (cut at ±2σ, as MindSpore does) on every
    weight except BatchNorm's; ``kaiming``: He initialisation for convolutions; ``normal``: torchvision's
    ``_normal_init`` of SSDLite, N(0, 0.03²) on every convolution. Biases start at zero, BN at (1, 0)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if scheme == "truncated_normal":
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            elif scheme == "normal":
                nn.init.normal_(module.weight, mean=0.0, std=0.03)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                raise ValueError(f"unknown model.init {scheme!r}")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_model(cfg: Config, load_backbone_weights: bool = False) -> SSD:
    """The network of ``cfg``, initialised per ``model.init``. With ``load_backbone_weights`` (and not
    ``model.from_scratch``), ImageNet VGG16 weights from ``model.backbone_weights``, a published name resolved
    through torch hub's cache or a file (:func:`multibox.models.weights.load_vgg16_backbone`).

    ``anchors.feature_sizes`` are set to the network's (:func:`resolve_feature_sizes`). By default nothing is
    read: a checkpoint's state dict, a conversion or a benchmark replaces or ignores the
    initial weights, and only a new training run needs them (it loads them itself, with ``model.weights``: see
    :func:`multibox.models.published.plan_initial_weights`)."""
    spec = model_anchor_spec(cfg)
    backbone = build_backbone(cfg)
    model = SSD(backbone, backbone.out_channels, spec.boxes_per_location(), cfg.model.num_classes,
                default_boxes_cxcywh(spec),
                head=build_head(cfg, backbone.out_channels, spec.boxes_per_location()))
    if cfg.model.init == "xavier":
        init_paper_ssd(model)
    else:
        init_weights(model, cfg.model.init)
    if cfg.model.class_prior is not None:
        model.init_class_prior(cfg.model.class_prior)
    if cfg.model.backbone_weights and load_backbone_weights and not cfg.model.from_scratch:
        check_fits(cfg.model.backbone_weights, cfg.model.arch, "model.backbone_weights")
        load_backbone(model, resolve_weights(cfg.model.backbone_weights, "model.backbone_weights"))
    return model


def freeze_backbone(model: SSD, cfg: Config) -> list[str]:
    """Freeze the VGG16 stages that ``cfg`` does not train (:func:`multibox.models.published.trainable_backbone_stages`:
    conv1_x when the run starts from pretrained weights, as torchvision's ``ssd300_vgg16``; nothing from scratch).
    A function of the config alone, so that a resumed run freezes what the new run froze. Returns the frozen
    parameters' names (none for backbones without VGG16 stages)."""
    stages = trainable_backbone_stages(cfg)
    if not isinstance(model.backbone, (PaperVGG16Backbone, TutorialVGG16Backbone)):
        return []
    return [f"backbone.{name}" for name in freeze_vgg16_stages(model.backbone, stages)]


def model_from_state_dict(cfg: Config, state_dict: dict) -> SSD:
    """The network of ``cfg`` holding a checkpoint's full ``state_dict`` (no backbone weights file is read)."""
    model = build_model(cfg, load_backbone_weights=False)
    model.load_state_dict(state_dict)
    return model


def model_skeleton(cfg: Config) -> SSD:
    """The network of ``cfg`` on the meta device: names, shapes and dtypes without allocating or initialising the
    weights (for conversions that replace them all anyway)."""
    with torch.device("meta"):
        return build_model(cfg, load_backbone_weights=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["SSD", "build_model", "count_parameters", "freeze_backbone", "init_weights", "model_from_state_dict",
           "model_skeleton"]
