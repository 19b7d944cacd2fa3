"""MindSpore's SSD300-VGG16s, built in MindSpore, for tests/interop/test_mindspore_import.py: the tutorial's
``SSD300Vgg16`` (SPEC §2) and the model zoo's ``SSD300VGG16`` (official/cv/ssd: src/vgg16.py, src/ssd.py,
src/box_utils.py, config/ssd_vgg16_config.yaml), with or without its ``ssd_vgg_bn`` option.

Run with the Python of a virtual environment that has MindSpore (it needs numpy < 2, so it lives apart from the
project's environment; the tests take ``$MULTIBOX_MINDSPORE_PYTHON``, else ``.venv-mindspore/bin/python``)::

    .venv-mindspore/bin/python tests/interop/mindspore_tutorial_net.py --out DIR [--seed 0] \
        [--layout tutorial zoo zoo_bn]

Per layout (one network build each) it builds the network layer for layer as its source describes it
(MindSpore's defaults: ``nn.Conv2d`` without bias and ``pad_mode='same'`` unless asked; ``nn.BatchNorm2d``
eps 1e-5, momentum 0.9), gives every parameter and BatchNorm statistic a random value from a fixed seed, saves it
with ``mindspore.save_checkpoint`` (as both sources do) and writes, for one fixed input, under ``DIR/LAYOUT/``:

- ``net.ckpt``: the checkpoint;
- ``input.npy``: (1, 3, 300, 300) float32, a random RGB image normalised with the sources' mean and std;
- ``loc.npy``: (1, A, 4) raw box offsets in MindSpore's (dy, dx, dh, dw) order (A = 8732 tutorial, 7308 zoo);
- ``cls_logits.npy``: (1, A, 81) raw class logits;
- ``scores.npy``: (1, A, 81) the network's inference output (sigmoid of the logits);
- ``default_boxes.npy``: (A, 4) the source's default boxes, [cy, cx, h, w] as its ``GeneratDefaultBoxes`` makes
  them;
- ``names.txt``: every parameter name and shape, one per line.

The layouts differ only where their sources do:

- ``tutorial``: ``_make_layer`` stacks the VGG convolutions with no activation (``backbone.bN.{0, 1, 2}``);
  4, 6, 6, 6, 4, 4 default boxes per location, scales from 0.1.
- ``zoo``: ``_make_layer`` puts a ReLU cell after each convolution (``backbone.bN.{0, 2, 4}``); 3, 6, 6, 6, 6, 6
  boxes per location, scales from 0.2, level 0 (0.1, 0.1) plus ratio 2 both ways.
- ``zoo_bn``: the zoo's with ``ssd_vgg_bn``: conv, BatchNorm2d, ReLU (``backbone.bN.{0, 3, 6}``, BN at 1, 4, 7).

The attribute names below are the checkpoints' contract (``backbone.b1.0.weight``, ``b6_1.weight``,
``multi_box.multi_loc_layers.0.3.bias``, ...): they must be the sources'. Nothing here imports multibox.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
from pathlib import Path

import numpy as np

# MindSpore 2.10's CPU convolutions ask oneDNN for plain NCHW layouts; on AVX-512 machines oneDNN then picks a
# reference kernel (~0.2 GFLOP/s: minutes per forward pass). Capping the ISA at AVX2 selects its JIT GEMM path
# (~100x faster) with the same float32 results up to rounding. Must be set before MindSpore loads oneDNN.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import mindspore as ms  # noqa: E402
from mindspore import nn, ops  # noqa: E402

NUM_CLASSES = 81                       # background + the 80 COCO classes
FEATURE_CHANNELS = [512, 1024, 512, 256, 256, 256]
FEATURE_SIZES = [38, 19, 10, 5, 3, 1]
STEPS = [8, 16, 32, 64, 100, 300]
MEAN_255 = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD_255 = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255

# layout -> (ReLU cells in the VGG stages, BatchNorm cells, default boxes per location, min_scale, aspect ratios)
LAYOUTS = {
    "tutorial": (False, False, [4, 6, 6, 6, 4, 4], 0.1, [[2], [2, 3], [2, 3], [2, 3], [2], [2]]),
    "zoo": (True, False, [3, 6, 6, 6, 6, 6], 0.2, [[], [2, 3], [2, 3], [2, 3], [2, 3], [2, 3]]),
    "zoo_bn": (True, True, [3, 6, 6, 6, 6, 6], 0.2, [[], [2, 3], [2, 3], [2, 3], [2, 3], [2, 3]]),
}


def make_layer(channels: list[int], relu: bool, batch_norm: bool) -> nn.SequentialCell:
    """The sources' ``_make_layer``: 3x3 convolutions (MindSpore defaults: no bias, 'same' padding); the zoo
    appends ``nn.BatchNorm2d(out)`` (with ssd_vgg_bn) and ``nn.ReLU()`` cells after each, the tutorial nothing."""
    cells = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        cells.append(nn.Conv2d(in_channels=c_in, out_channels=c_out, kernel_size=3))
        if batch_norm:
            cells.append(nn.BatchNorm2d(c_out))
        if relu:
            cells.append(nn.ReLU())
    return nn.SequentialCell(cells)


class Vgg16(nn.Cell):
    def __init__(self, relu: bool, batch_norm: bool):
        super().__init__()
        self.b1 = make_layer([3, 64, 64], relu, batch_norm)
        self.b2 = make_layer([64, 128, 128], relu, batch_norm)
        self.b3 = make_layer([128, 256, 256, 256], relu, batch_norm)
        self.b4 = make_layer([256, 512, 512, 512], relu, batch_norm)
        self.b5 = make_layer([512, 512, 512, 512], relu, batch_norm)
        self.m1 = nn.MaxPool2d(kernel_size=2, stride=2, pad_mode='SAME')
        self.m2 = nn.MaxPool2d(kernel_size=2, stride=2, pad_mode='SAME')
        self.m3 = nn.MaxPool2d(kernel_size=2, stride=2, pad_mode='SAME')
        self.m4 = nn.MaxPool2d(kernel_size=2, stride=2, pad_mode='SAME')
        self.m5 = nn.MaxPool2d(kernel_size=3, stride=1, pad_mode='SAME')

    def construct(self, x):
        x = self.m1(self.b1(x))
        x = self.m2(self.b2(x))
        x = self.m3(self.b3(x))
        block4 = self.b4(x)
        x = self.m5(self.b5(self.m4(block4)))
        return block4, x


def head(c_in: int, c_out: int) -> nn.SequentialCell:
    """Depthwise 3x3 'same' (no bias) -> BatchNorm(eps 1e-3, momentum 0.97) -> ReLU6 -> 1x1 conv with bias."""
    return nn.SequentialCell([
        nn.Conv2d(c_in, c_in, 3, 1, pad_mode='same', padding=0, group=c_in),
        nn.BatchNorm2d(c_in, eps=1e-3, momentum=0.97, gamma_init=1, beta_init=0, moving_mean_init=0,
                       moving_var_init=1),
        nn.ReLU6(),
        nn.Conv2d(c_in, c_out, kernel_size=1, stride=1, padding=0, pad_mode='same', has_bias=True),
    ])


class FlattenConcat(nn.Cell):
    """Each (N, k·D, H, W) map -> NHWC -> (N, -1), concatenated, -> (N, A, D)."""

    def __init__(self, num_boxes: int):
        super().__init__()
        self.num_boxes = num_boxes

    def construct(self, inputs):
        n = ops.shape(inputs[0])[0]
        flat = ()
        for x in inputs:
            flat += (ops.reshape(ops.transpose(x, (0, 2, 3, 1)), (n, -1)),)
        return ops.reshape(ops.concat(flat, axis=1), (n, self.num_boxes, -1))


class MultiBox(nn.Cell):
    def __init__(self, num_default: list[int]):
        super().__init__()
        self.multi_loc_layers = nn.CellList([head(c, 4 * k) for c, k in zip(FEATURE_CHANNELS, num_default)])
        self.multi_cls_layers = nn.CellList(
            [head(c, NUM_CLASSES * k) for c, k in zip(FEATURE_CHANNELS, num_default)])
        self.flatten_concat = FlattenConcat(sum(f * f * k for f, k in zip(FEATURE_SIZES, num_default)))

    def construct(self, inputs):
        loc, cls = (), ()
        for i in range(len(self.multi_loc_layers)):
            loc += (self.multi_loc_layers[i](inputs[i]),)
            cls += (self.multi_cls_layers[i](inputs[i]),)
        return self.flatten_concat(loc), self.flatten_concat(cls)


class SSD300Vgg16(nn.Cell):
    """The tutorial's ``SSD300Vgg16`` and the zoo's ``SSD300VGG16``: the same cells after the VGG stages."""

    def __init__(self, relu: bool, batch_norm: bool, num_default: list[int]):
        super().__init__()
        self.backbone = Vgg16(relu, batch_norm)
        self.b6_1 = nn.Conv2d(in_channels=512, out_channels=1024, kernel_size=3, padding=6, dilation=6,
                              pad_mode='pad')
        self.b6_2 = nn.Dropout(p=0.5)
        self.b7_1 = nn.Conv2d(in_channels=1024, out_channels=1024, kernel_size=1)
        self.b7_2 = nn.Dropout(p=0.5)
        self.b8_1 = nn.Conv2d(in_channels=1024, out_channels=256, kernel_size=1, padding=1, pad_mode='pad')
        self.b8_2 = nn.Conv2d(in_channels=256, out_channels=512, kernel_size=3, stride=2, pad_mode='valid')
        self.b9_1 = nn.Conv2d(in_channels=512, out_channels=128, kernel_size=1, padding=1, pad_mode='pad')
        self.b9_2 = nn.Conv2d(in_channels=128, out_channels=256, kernel_size=3, stride=2, pad_mode='valid')
        self.b10_1 = nn.Conv2d(in_channels=256, out_channels=128, kernel_size=1)
        self.b10_2 = nn.Conv2d(in_channels=128, out_channels=256, kernel_size=3, pad_mode='valid')
        self.b11_1 = nn.Conv2d(in_channels=256, out_channels=128, kernel_size=1)
        self.b11_2 = nn.Conv2d(in_channels=128, out_channels=256, kernel_size=3, pad_mode='valid')
        self.multi_box = MultiBox(num_default)

    def features(self, x):
        """The six feature maps; as in both sources, no activation after fc6, fc7 or the extra layers."""
        block4, x = self.backbone(x)
        block7 = self.b7_2(self.b7_1(self.b6_2(self.b6_1(x))))
        block8 = self.b8_2(self.b8_1(block7))
        block9 = self.b9_2(self.b9_1(block8))
        block10 = self.b10_2(self.b10_1(block9))
        block11 = self.b11_2(self.b11_1(block10))
        return block4, block7, block8, block9, block10, block11

    def construct(self, x):
        loc, label = self.multi_box(self.features(x))
        if not self.training:
            label = ops.sigmoid(label)
        return loc.astype(ms.float32), label.astype(ms.float32)


def default_boxes(num_default: list[int], min_scale: float, aspect_ratios: list[list[int]]) -> np.ndarray:
    """The sources' ``GeneratDefaultBoxes``: (A, 4) [cy, cx, h, w]. Scales min_scale .. 0.95 evenly, then 1.0;
    per location (s_k, s_k), each ratio r both ways, then (sqrt(s_k s_k+1), same); except a first level without
    ratios, which has (0.1, 0.1) and s_0 at ratio 2 both ways."""
    fk = 300 / np.array(STEPS)
    rate = (0.95 - min_scale) / (len(num_default) - 1)
    scales = [min_scale + rate * i for i in range(len(num_default))] + [1.0]
    boxes = []
    for k, size in enumerate(FEATURE_SIZES):
        s1, s2 = scales[k], scales[k + 1]
        if k == 0 and not aspect_ratios[k]:
            w, h = s1 * math.sqrt(2), s1 / math.sqrt(2)
            sizes = [(0.1, 0.1), (w, h), (h, w)]
        else:
            sizes = [(s1, s1)]
            for r in aspect_ratios[k]:
                w, h = s1 * math.sqrt(r), s1 / math.sqrt(r)
                sizes += [(w, h), (h, w)]
            sizes.append((math.sqrt(s1 * s2),) * 2)
        assert len(sizes) == num_default[k]
        for i, j in itertools.product(range(size), repeat=2):
            for w, h in sizes:
                boxes.append([(i + 0.5) / fk[k], (j + 0.5) / fk[k], h, w])
    return np.array(boxes, dtype=np.float32)


def randomise(net: nn.Cell, seed: int, relu: bool) -> None:
    """Every parameter (and BN's moving statistics) gets a random value, so that no mapping mistake can hide
    behind a constant initialisation. Convolution weights are normals of variance gain / fan_in, so activations
    stay O(1) through the 23 layers: gain 2 (He) for VGG convolutions followed by a ReLU, 1 for those that are not
    (the tutorial's VGG, fc6, fc7, the extras, the heads); large activations would saturate the heads' ReLU6 and
    measure rounding instead of the mapping."""
    rng = np.random.default_rng(seed)
    for param in sorted(net.get_parameters(), key=lambda p: p.name):
        shape = tuple(param.shape)
        leaf = param.name.rsplit(".", 1)[-1]
        if leaf == "weight":
            fan_in = int(np.prod(shape[1:]))
            gain = 2.0 if relu and param.name.startswith("backbone.b") else 1.0
            value = rng.standard_normal(shape) * np.sqrt(gain / fan_in)
        elif leaf in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, shape)
        else:   # bias, beta, moving_mean
            value = rng.standard_normal(shape) * 0.1
        param.set_data(ms.Tensor(value.astype(np.float32)))


def run_layout(layout: str, out: Path, seed: int) -> None:
    relu, batch_norm, num_default, min_scale, ratios = LAYOUTS[layout]
    out.mkdir(parents=True, exist_ok=True)
    ms.set_seed(seed)
    net = SSD300Vgg16(relu, batch_norm, num_default)
    randomise(net, seed, relu)
    net.set_train(False)
    ms.save_checkpoint(net, str(out / "net.ckpt"))
    (out / "names.txt").write_text("".join(f"{p.name} {tuple(p.shape)}\n" for p in net.get_parameters()))
    np.save(out / "default_boxes.npy", default_boxes(num_default, min_scale, ratios))

    rng = np.random.default_rng(seed + 1)
    image = rng.integers(0, 256, (1, 300, 300, 3)).astype(np.float32)     # NHWC RGB pixels
    x = ((image - MEAN_255) / STD_255).transpose(0, 3, 1, 2).astype(np.float32)
    np.save(out / "input.npy", x)
    loc, scores = net(ms.Tensor(x))
    _, logits = net.multi_box(net.features(ms.Tensor(x)))
    np.save(out / "loc.npy", loc.asnumpy())
    np.save(out / "scores.npy", scores.asnumpy())
    np.save(out / "cls_logits.npy", logits.asnumpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", nargs="+", choices=sorted(LAYOUTS), default=["tutorial"])
    args = parser.parse_args()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    for layout in args.layout:
        run_layout(layout, Path(args.out) / layout, args.seed)


if __name__ == "__main__":
    main()
