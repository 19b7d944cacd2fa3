"""The MindSpore SSD300-VGG16 trunk's VGG options (``model.vgg_relu``, ``model.vgg_bn``) and the zoo preset.

References: the tutorial's ``_make_layer`` (convolutions only, /work/shared/seed/ssd_tutorial.txt), the model zoo's
(official/cv/ssd/src/vgg16.py: Conv2d, [BatchNorm2d,] ReLU), its default boxes worked out by hand from
src/box_utils.py and config/ssd_vgg16_config.yaml, and parameter counts worked out from the layer list.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multibox.config import load_config
from multibox.core.anchors import anchor_spec, default_boxes_cxcywh
from multibox.models import build_model, count_parameters
from multibox.models.vgg import TutorialVGG16Backbone, vgg_block


def _stage_pair(relu: bool, batch_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A VGG stage on 2x - 3y and 2·f(x) - 3·f(y) (float64, eval mode)."""
    torch.manual_seed(0)
    stage = vgg_block(3, (8, 8), bias=False, relu=relu, batch_norm=batch_norm).double().eval()
    x, y = torch.randn(2, 1, 3, 9, 9, dtype=torch.float64).unbind(0)
    with torch.no_grad():
        return stage(2 * x - 3 * y), 2 * stage(x) - 3 * stage(y)


def test_tutorial_vgg_stage_is_linear_and_the_zoo_one_is_not():
    """The tutorial's stage has no activation: a linear map. The zoo's ReLU makes it non-linear."""
    lhs, rhs = _stage_pair(relu=False, batch_norm=False)
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)
    lhs, rhs = _stage_pair(relu=True, batch_norm=False)
    assert (lhs - rhs).abs().max() > 0.1


def test_vgg_stage_names_per_layout():
    """Convolutions stay at 0, 2 (an identity in place of the ReLU) so tutorial checkpoints keep loading; with
    BatchNorm at 0, 3 and BatchNorm at 1, 4 (MindSpore's defaults eps 1e-5, momentum 0.9 = PyTorch's 0.1)."""
    names = lambda m: sorted(n for n, _ in m.named_parameters())   # noqa: E731
    assert names(vgg_block(3, (8, 8), bias=False, relu=False)) == ["0.weight", "2.weight"]
    assert names(vgg_block(3, (8, 8), bias=False, relu=True)) == ["0.weight", "2.weight"]
    stage = vgg_block(3, (8, 8), bias=False, relu=True, batch_norm=True)
    assert names(stage) == ["0.weight", "1.bias", "1.weight", "3.weight", "4.bias", "4.weight"]
    assert [type(m) for m in stage] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
    assert stage[1].eps == 1e-5 and stage[1].momentum == pytest.approx(0.1)
    assert [type(m) for m in vgg_block(3, (8,), bias=False, relu=False)] == [nn.Conv2d, nn.Identity]


def test_presets_pick_the_vgg_layout():
    seed, zoo = load_config("ssd300-vgg16-seed").model, load_config("ssd300-vgg16-zoo").model
    assert (seed.vgg_relu, seed.vgg_bn) == (False, False) and (zoo.vgg_relu, zoo.vgg_bn) == (True, False)
    relus = lambda bb: sum(isinstance(m, nn.ReLU) for m in bb.modules())   # noqa: E731
    with torch.device("meta"):
        assert relus(TutorialVGG16Backbone(relu=False)) == 0 and relus(TutorialVGG16Backbone(relu=True)) == 13
        bn = TutorialVGG16Backbone(relu=True, batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 13


def test_zoo_default_boxes_by_hand():
    """src/box_utils.py with ssd_vgg16's config: 3, 6, 6, 6, 6, 6 boxes per location, 7308 in all; scales
    0.2 + 0.15 k; level 0: (0.1, 0.1), (0.2·√2, 0.2/√2), (0.2/√2, 0.2·√2); level k > 0: (s_k, s_k), ratios 2 and 3
    both ways, then √(s_k s_k+1). Centres (j + 0.5) / (300 / step)."""
    spec = anchor_spec(load_config("ssd300-vgg16-zoo").anchors, 300)
    assert spec.boxes_per_location() == [3, 6, 6, 6, 6, 6] and spec.num_anchors() == 7308
    boxes = default_boxes_cxcywh(spec, torch.float64)
    r2 = math.sqrt(2)
    torch.testing.assert_close(boxes[:3], torch.tensor(
        [[4 / 300, 4 / 300, 0.1, 0.1], [4 / 300, 4 / 300, 0.2 * r2, 0.2 / r2], [4 / 300, 4 / 300, 0.2 / r2, 0.2 * r2]],
        dtype=torch.float64))
    # level 1 (19 x 19, step 16), first location: s = 0.35, next 0.5
    level1 = boxes[38 * 38 * 3:38 * 38 * 3 + 6]
    s, r3 = 0.35, math.sqrt(3)
    expected_wh = [(s, s), (s * r2, s / r2), (s / r2, s * r2), (s * r3, s / r3), (s / r3, s * r3),
                   (math.sqrt(s * 0.5),) * 2]
    torch.testing.assert_close(level1[:, 2:], torch.tensor(expected_wh, dtype=torch.float64))
    torch.testing.assert_close(level1[:, :2], torch.full((6, 2), 8 / 300, dtype=torch.float64))
    # the last box: level 5 (1 x 1), √(0.95 · 1.0) at the centre
    torch.testing.assert_close(boxes[-1], torch.tensor([0.5, 0.5, math.sqrt(0.95), math.sqrt(0.95)],
                                                       dtype=torch.float64))


def test_zoo_parameter_counts_by_hand():
    """The seed's 22,935,232 trunk parameters (tests/models/test_models.py) plus the heads Σ (22c + 85kc + 85k)
    over (512, 3) (1024, 6) (512, 6) (256, 6) x 3 = 142,079 + 545,278 + 272,894 + 3·136,702 = 1,370,357:
    24,305,589; ssd_vgg_bn adds 2·(2·64 + 2·128 + 3·256 + 6·512) = 8,448 BatchNorm parameters."""
    with torch.device("meta"):
        zoo = build_model(load_config("ssd300-vgg16-zoo"))
        zoo_bn = build_model(load_config("ssd300-vgg16-zoo", ["model.vgg_bn=true"]))
    assert count_parameters(zoo) == 24_305_589 and count_parameters(zoo_bn) == 24_305_589 + 8_448
