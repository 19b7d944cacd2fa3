"""The MindSpore tutorial's ``SSD300Vgg16`` (SPEC §2), built in MindSpore, for tests/interop/test_mindspore_import.py.

Run with the Python of a virtual environment that has MindSpore (it needs numpy < 2, so it lives apart from the
project's environment; the tests take ``$MULTIBOX_MINDSPORE_PYTHON``, else ``.venv-mindspore/bin/python``)::

    .venv-mindspore/bin/python tests/interop/mindspore_tutorial_net.py --out DIR [--seed 0]

It builds the network layer for layer as SPEC §2 describes it (MindSpore's defaults: ``nn.Conv2d`` without bias
and ``pad_mode='same'`` unless asked), gives every parameter and BatchNorm statistic a random value from a fixed
seed, saves it with ``mindspore.save_checkpoint`` (as the tutorial does) and writes, for one fixed input:

- ``DIR/tutorial.ckpt``: the checkpoint;
- ``DIR/input.npy``: (1, 3, 300, 300) float32, a random RGB image normalised with the tutorial's mean and std;
- ``DIR/loc.npy``: (1, 8732, 4) raw box offsets in the tutorial's (dy, dx, dh, dw) order;
- ``DIR/cls_logits.npy``: (1, 8732, 81) raw class logits;
- ``DIR/scores.npy``: (1, 8732, 81) the network's inference output (sigmoid of the logits);
- ``DIR/names.txt``: every parameter name and shape, one per line.

The attribute names below are the checkpoint's contract (``backbone.b1.0.weight``, ``b6_1.weight``,
``multi_box.multi_loc_layers.0.3.bias``, ...): they must be the tutorial's. Nothing here imports multibox.
"""
from __future__ import annotations

import argparse
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
BOXES_PER_LOCATION = [4, 6, 6, 6, 4, 4]
NUM_BOXES = 8732
MEAN_255 = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD_255 = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255


def vgg_stage(widths: list[int]) -> nn.SequentialCell:
    """3x3 convolutions, MindSpore defaults (no bias, 'same' padding), each followed by ReLU."""
    cells = []
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        cells.append(nn.Conv2d(in_channels=c_in, out_channels=c_out, kernel_size=3))
    # ReLUs have no parameters; they are applied in construct so that conv indices stay 0, 1, 2 as in the tutorial.
    return nn.SequentialCell(cells)


class Vgg16(nn.Cell):
    def __init__(self):
        super().__init__()
        self.b1 = vgg_stage([3, 64, 64])
        self.b2 = vgg_stage([64, 128, 128])
        self.b3 = vgg_stage([128, 256, 256, 256])
        self.b4 = vgg_stage([256, 512, 512, 512])
        self.b5 = vgg_stage([512, 512, 512, 512])
        self.m1 = nn.MaxPool2d(kernel_size=2, stride=2, pad_mode='SAME')
        self.m2 = nn.MaxPool2d(kernel_size=2, stride=2, pad_mode='SAME')
        self.m3 = nn.MaxPool2d(kernel_size=2, stride=2, pad_mode='SAME')
        self.m4 = nn.MaxPool2d(kernel_size=2, stride=2, pad_mode='SAME')
        self.m5 = nn.MaxPool2d(kernel_size=3, stride=1, pad_mode='SAME')
        self.relu = nn.ReLU()

    def stage(self, block, x):
        for conv in block:
            x = self.relu(conv(x))
        return x

    def construct(self, x):
        x = self.m1(self.stage(self.b1, x))
        x = self.m2(self.stage(self.b2, x))
        x = self.m3(self.stage(self.b3, x))
        block4 = self.stage(self.b4, x)
        x = self.m5(self.stage(self.b5, self.m4(block4)))
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
    """Each (N, k·D, H, W) map -> NHWC -> (N, -1), concatenated, -> (N, 8732, D)."""

    def construct(self, inputs):
        n = ops.shape(inputs[0])[0]
        flat = ()
        for x in inputs:
            flat += (ops.reshape(ops.transpose(x, (0, 2, 3, 1)), (n, -1)),)
        return ops.reshape(ops.concat(flat, axis=1), (n, NUM_BOXES, -1))


class MultiBox(nn.Cell):
    def __init__(self):
        super().__init__()
        self.multi_loc_layers = nn.CellList(
            [head(c, 4 * k) for c, k in zip(FEATURE_CHANNELS, BOXES_PER_LOCATION)])
        self.multi_cls_layers = nn.CellList(
            [head(c, NUM_CLASSES * k) for c, k in zip(FEATURE_CHANNELS, BOXES_PER_LOCATION)])
        self.flatten_concat = FlattenConcat()

    def construct(self, inputs):
        loc, cls = (), ()
        for i in range(len(self.multi_loc_layers)):
            loc += (self.multi_loc_layers[i](inputs[i]),)
            cls += (self.multi_cls_layers[i](inputs[i]),)
        return self.flatten_concat(loc), self.flatten_concat(cls)


class SSD300Vgg16(nn.Cell):
    def __init__(self):
        super().__init__()
        self.backbone = Vgg16()
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
        self.multi_box = MultiBox()

    def features(self, x):
        """The six feature maps; as in the tutorial, no activation after fc6, fc7 or the extra layers."""
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


def randomise(net: nn.Cell, seed: int) -> None:
    """Every parameter (and BN's moving statistics) gets a random value, so that no mapping mistake can hide
    behind a constant initialisation. Convolution weights get He-scaled normals so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    for param in sorted(net.get_parameters(), key=lambda p: p.name):
        shape = tuple(param.shape)
        leaf = param.name.rsplit(".", 1)[-1]
        if leaf == "weight":
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif leaf in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, shape)
        else:   # bias, beta, moving_mean
            value = rng.standard_normal(shape) * 0.1
        param.set_data(ms.Tensor(value.astype(np.float32)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    ms.set_seed(args.seed)
    net = SSD300Vgg16()
    randomise(net, args.seed)
    net.set_train(False)
    ms.save_checkpoint(net, str(out / "tutorial.ckpt"))
    (out / "names.txt").write_text("".join(f"{p.name} {tuple(p.shape)}\n" for p in net.get_parameters()))

    rng = np.random.default_rng(args.seed + 1)
    image = rng.integers(0, 256, (1, 300, 300, 3)).astype(np.float32)     # NHWC RGB pixels
    x = ((image - MEAN_255) / STD_255).transpose(0, 3, 1, 2).astype(np.float32)
    np.save(out / "input.npy", x)

    loc, scores = net(ms.Tensor(x))
    _, logits = net.multi_box(net.features(ms.Tensor(x)))
    np.save(out / "loc.npy", loc.asnumpy())
    np.save(out / "scores.npy", scores.asnumpy())
    np.save(out / "cls_logits.npy", logits.asnumpy())


if __name__ == "__main__":
    main()
