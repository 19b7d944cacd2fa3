"""Tests for multibox.models (SSD, the tutorial's VGG16 trunk, the tiny backbone, build_model).

References: SPEC §2's layer list (shapes, biases, BatchNorm settings, a parameter count worked out from it by
hand), and the NHWC flattening order checked by planting known values in the heads' outputs.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from multibox.core.anchors import default_boxes_cxcywh
from multibox.config import load_config
from multibox.core.anchors import anchor_spec
from multibox.models import build_model, count_parameters
from multibox.models.ssd import flatten_levels

FEATURE_SIZES = [38, 19, 10, 5, 3, 1]
BOXES_PER_LOCATION = [4, 6, 6, 6, 4, 4]
SEED_CHANNELS = [512, 1024, 512, 256, 256, 256]


@pytest.fixture(scope="module")
def seed_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(load_config("ssd300-vgg16-seed")).eval()


@pytest.fixture(scope="module")
def seed_forward(seed_model):
    """One batch-1 forward of the seed network, with the backbone's feature maps captured."""
    captured = {}
    handle = seed_model.backbone.register_forward_hook(lambda m, i, o: captured.setdefault("features", o))
    try:
        with torch.no_grad():
            loc, cls = seed_model(torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(0)))
    finally:
        handle.remove()
    return captured["features"], loc, cls


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(load_config("tiny")).eval()


# --------------------------------------------------------------------------- seed preset: the tutorial's network

def test_seed_feature_maps(seed_forward):
    features, _, _ = seed_forward
    assert [tuple(f.shape) for f in features] == [(1, c, s, s) for c, s in zip(SEED_CHANNELS, FEATURE_SIZES)]


def test_seed_outputs(seed_forward):
    _, loc, cls = seed_forward
    assert loc.shape == (1, 8732, 4) and cls.shape == (1, 8732, 81)
    assert torch.isfinite(loc).all() and torch.isfinite(cls).all()


def test_seed_vgg_convolutions_have_no_bias(seed_model):
    convs = [m for m in seed_model.backbone.modules() if isinstance(m, nn.Conv2d)]
    # 13 VGG convolutions + fc6 + fc7 + 4 extras x 2
    assert len(convs) == 13 + 2 + 8
    assert all(c.bias is None for c in convs)


def test_seed_vgg_layers_as_spec(seed_model):
    bb = seed_model.backbone
    convs = [m for m in bb.modules() if isinstance(m, nn.Conv2d)]
    widths = [c.out_channels for c in convs[:13]]
    assert widths == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs[:13])
    fc6, fc7 = convs[13], convs[14]
    assert (fc6.in_channels, fc6.out_channels, fc6.kernel_size, fc6.dilation, fc6.padding) == \
        (512, 1024, (3, 3), (6, 6), (6, 6))
    assert (fc7.in_channels, fc7.out_channels, fc7.kernel_size) == (1024, 1024, (1, 1))
    # extras: (in, out, kernel, stride, padding) per SPEC §2 b8..b11
    expected = [(1024, 256, 1, 1, 1), (256, 512, 3, 2, 0), (512, 128, 1, 1, 1), (128, 256, 3, 2, 0),
                (256, 128, 1, 1, 0), (128, 256, 3, 1, 0), (256, 128, 1, 1, 0), (128, 256, 3, 1, 0)]
    got = [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs[15:]]
    assert got == expected
    pools = [m for m in bb.modules() if isinstance(m, nn.MaxPool2d)]
    assert any(p.kernel_size == 2 and p.stride == 2 and p.ceil_mode for p in pools)
    assert any(p.kernel_size == 3 and p.stride == 1 and p.padding == 1 for p in pools)
    dropouts = [m for m in bb.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(d.p == 0.5 for d in dropouts)


def test_seed_has_no_activation_after_fc6_fc7_and_extras(seed_model):
    """SPEC §2: no activation after fc6, fc7 or any extra layer, and no biases, so fc6 -> fc7 -> extras is a
    linear map: f(a·x + b·y) = a·f(x) + b·f(y) (dropout is the identity in eval mode)."""
    bb = seed_model.backbone
    fc6, fc7 = copy.deepcopy(bb.fc6).double(), copy.deepcopy(bb.fc7).double()
    extras = copy.deepcopy(bb.extras).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 512, 19, 19, generator=g).double().unbind(0)

    def tail(t):
        t = fc7(bb.dropout(fc6(t[None])))
        out = [t]
        for extra in extras:
            t = extra(t)
            out.append(t)
        return out

    with torch.no_grad():
        lhs = tail(2.0 * x - 3.0 * y)
        rhs = [2.0 * a - 3.0 * b for a, b in zip(tail(x), tail(y))]
    for a, b in zip(lhs, rhs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_seed_heads_are_separable_with_spec_batchnorm(seed_model):
    for heads, per_anchor in ((seed_model.loc_heads, 4), (seed_model.cls_heads, 81)):
        assert len(heads) == 6
        for head, c, k in zip(heads, SEED_CHANNELS, BOXES_PER_LOCATION):
            depthwise, bn, act, pointwise = head
            assert isinstance(depthwise, nn.Conv2d) and depthwise.groups == c and depthwise.bias is None
            assert depthwise.kernel_size == (3, 3) and depthwise.padding == (1, 1) and depthwise.out_channels == c
            assert isinstance(bn, nn.BatchNorm2d) and bn.eps == 1e-3 and bn.momentum == pytest.approx(0.03)
            assert isinstance(act, nn.ReLU6)
            assert pointwise.kernel_size == (1, 1) and pointwise.bias is not None
            assert pointwise.out_channels == k * per_anchor


def test_seed_parameter_count_from_spec(seed_model):
    """Worked out from SPEC §2 (weights only where there is no bias):
    VGG 3x3 convs: 9·(3·64 + 64·64 + 64·128 + 128·128 + 128·256 + 2·256·256 + 256·512 + 5·512·512) = 14,710,464
    fc6 9·512·1024 = 4,718,592; fc7 1024·1024 = 1,048,576
    extras: 1024·256 + 9·256·512 + 512·128 + 9·128·256 + 2·(256·128 + 9·128·256) = 2,457,600
    heads, per level (c, k) and per head (d = 4 or 81): depthwise 9c + BN 2c + 1x1 c·k·d + bias k·d
      = Σ (22c + 85kc + 85k) over (512,4) (1024,6) (512,6) (256,6) (256,4) (256,4)
      = 185,684 + 545,278 + 272,894 + 136,702 + 93,012 + 93,012 = 1,326,582
    total 24,261,814 (BatchNorm running statistics are buffers, not parameters).
    """
    n = count_parameters(seed_model)
    print(f"ssd300-vgg16-seed parameters: {n:,}")
    assert n == 24_261_814


def test_seed_initialisation(seed_model):
    """TruncatedNormal(σ = 0.02) cut at ±2σ on convolution weights; BN (1, 0); biases 0."""
    w = torch.cat([m.weight.detach().flatten() for m in seed_model.modules() if isinstance(m, nn.Conv2d)])
    assert w.abs().max() <= 0.04 + 1e-7
    # std of N(0, σ²) truncated at ±2σ: σ·√(1 - 4φ(2)/(Φ(2) - Φ(-2))) = 0.02·0.8796 = 0.01759
    assert float(w.std()) == pytest.approx(0.01759, rel=0.02)
    for m in seed_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            assert (m.bias == 0).all()


def test_seed_anchor_buffer(seed_model):
    cfg = load_config("ssd300-vgg16-seed")
    assert torch.equal(seed_model.anchors_cxcywh, default_boxes_cxcywh(anchor_spec(cfg.anchors, 300)))
    assert "anchors_cxcywh" not in seed_model.state_dict()


# --------------------------------------------------------------------------- tiny preset

def test_tiny_layout(tiny_model):
    captured = {}
    handle = tiny_model.backbone.register_forward_hook(lambda m, i, o: captured.setdefault("features", o))
    try:
        with torch.no_grad():
            loc, cls = tiny_model(torch.randn(2, 3, 300, 300))
    finally:
        handle.remove()
    assert [f.shape[-1] for f in captured["features"]] == FEATURE_SIZES
    assert [f.shape[-2] for f in captured["features"]] == FEATURE_SIZES
    assert loc.shape == (2, 8732, 4) and cls.shape == (2, 8732, 81)
    assert tiny_model.anchors_cxcywh.shape == (8732, 4)
    assert [h.out_channels for h in tiny_model.loc_heads] == [4 * k for k in BOXES_PER_LOCATION]
    assert [h.out_channels for h in tiny_model.cls_heads] == [81 * k for k in BOXES_PER_LOCATION]


def test_tiny_num_classes_override():
    model = build_model(load_config("tiny", ["model.num_classes=3"]))
    assert [h.out_channels for h in model.cls_heads] == [4 * k for k in BOXES_PER_LOCATION]


# --------------------------------------------------------------------------- flattening order

def _code(level, channel, row, col):
    """A value that names where a head output element came from (exact in float32)."""
    return float(level * 2**21 + channel * 4096 + row * 64 + col)      # < 2^24: exact in float32


def _planting_hook(level):
    def hook(module, inputs, output):
        n, ch, h, w = output.shape
        lv = torch.full((ch, h, w), float(level * 2**21))
        c = torch.arange(ch, dtype=torch.float32)[:, None, None] * 4096
        r = torch.arange(h, dtype=torch.float32)[None, :, None] * 64
        q = torch.arange(w, dtype=torch.float32)[None, None, :]
        return (lv + c + r + q).expand(n, ch, h, w).clone()
    return hook


@pytest.mark.parametrize("which", ["loc", "cls"])
def test_flattening_order_is_level_row_column_anchor(tiny_model, which):
    """Output row ``offset_l + (i·W + j)·k + a``, value ``d`` comes from head channel ``a·D + d`` at (i, j) (NHWC),
    and that row's default box is centred on cell (i, j) of level l."""
    heads = tiny_model.loc_heads if which == "loc" else tiny_model.cls_heads
    per_anchor = 4 if which == "loc" else 81
    handles = [h.register_forward_hook(_planting_hook(lv)) for lv, h in enumerate(heads)]
    try:
        with torch.no_grad():
            loc, cls = tiny_model(torch.zeros(2, 3, 300, 300))
    finally:
        for handle in handles:
            handle.remove()
    out = loc if which == "loc" else cls
    anchors = tiny_model.anchors_cxcywh
    offset = 0
    for level, (f, k) in enumerate(zip(FEATURE_SIZES, BOXES_PER_LOCATION)):
        step = 300 / [8, 16, 32, 64, 100, 300][level]
        cells = {(0, 0, 0), (0, 1, k - 1), (1, 0, 1), (f - 1, f - 1, k - 1), (f // 2, f // 3, k // 2)}
        for i, j, a in sorted(c for c in cells if c[0] < f and c[1] < f):
            row = offset + (i * f + j) * k + a
            expected = torch.tensor([_code(level, a * per_anchor + d, i, j) for d in range(per_anchor)])
            assert torch.equal(out[1, row], expected), (level, i, j, a)
            assert anchors[row, 0] == pytest.approx((j + 0.5) / step, abs=1e-6)
            assert anchors[row, 1] == pytest.approx((i + 0.5) / step, abs=1e-6)
        offset += f * f * k
    assert offset == out.shape[1] == 8732


def test_flatten_levels_one_hot_channel():
    """Plant a 1 in a single channel of one level's map and find it in the flat output."""
    outs = [torch.zeros(1, 3 * 2, 4, 4), torch.zeros(1, 2 * 2, 2, 2)]
    # level 1, anchor a = 1, value d = 0 -> channel a·D + d = 2; cell (i=1, j=0)
    outs[1][0, 2, 1, 0] = 1.0
    flat = flatten_levels(outs, 2)
    assert flat.shape == (1, 4 * 4 * 3 + 2 * 2 * 2, 2)
    # row = 48 (level 0) + (1·2 + 0)·2 + 1 = 53
    assert torch.nonzero(flat).tolist() == [[0, 53, 0]]
