"""The MindSpore model zoo's ``ssd300`` (SSD300 on MobileNetV2), built in MindSpore, for
tests/interop/test_mindspore_mobilenet_v2.py.

Run with the Python of the MindSpore environment (MindSpore needs numpy < 2; see mindspore_tutorial_net.py)::

    .venv-mindspore/bin/python tests/interop/mindspore_mobilenet_v2_net.py --out DIR [--seed 0]

The network follows the published architecture (mindspore-ai/mindspore, model_zoo/official/cv/ssd/src/ssd.py and
config/ssd300_config.yaml), written here from that description:

- MobileNetV2 (width 1.0): ConvBNReLU 3x3 s2 (3 -> 32), inverted residuals (t, c, n, s) = (1, 16, 1, 1),
  (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1), ConvBNReLU 1x1
  (320 -> 1280); held as ``features_1`` (the first 14 cells) and ``features_2`` (the other 5); a separate
  ``expand_layer_conv_13`` (ConvBNReLU 1x1, 96 -> 576) on ``features_1``'s output gives the 19x19 feature map;
- ConvBNReLU = ``features`` = [conv (no bias, 'same'), BatchNorm(eps 1e-3, momentum 0.97), ReLU6]; an inverted
  residual = ``conv`` = [expansion ConvBNReLU 1x1 unless t = 1, depthwise ConvBNReLU 3x3, 1x1 conv (no bias),
  BatchNorm], plus the input when stride 1 and channels agree, then ReLU6 if ``last_relu``;
- extras ``multi_residual``: inverted residuals (1280 -> 512, t 0.2), (512 -> 256, 0.25), (256 -> 256, 0.5),
  (256 -> 128, 0.25), all stride 2 with last_relu;
- heads ``multi_box.multi_{loc,cls}_layers.k``: depthwise 3x3 'same' (no bias), BatchNorm, ReLU6, 1x1 conv with bias
  to 4·k and 81·k channels, k = 3, 6, 6, 6, 6, 6; flattened NHWC and concatenated to (N, 1917, ·).

Every parameter and BatchNorm statistic gets a random value from a fixed seed; the network is saved with
``mindspore.save_checkpoint`` and evaluated on one fixed input. Writes into DIR:

- ``zoo_ssd300.ckpt``; ``zoo_ssd300_train.ckpt``: the same weights saved from a training network as the zoo's
  train.py saves them (``network.*`` names, optimizer state); ``names.txt`` (every parameter's name and shape);
  ``counts.txt`` (``trainable N`` and ``all N``: parameter counts of the network, without and with BatchNorm's
  moving statistics);
- ``input.npy`` (1, 3, 300, 300) float32, normalised as the zoo's dataset.py;
- ``loc.npy`` (1, 1917, 4) raw offsets in the zoo's (dy, dx, dh, dw) order; ``cls_logits.npy`` (1, 1917, 81);
  ``scores.npy`` (1, 1917, 81) the inference output (sigmoid);
- ``features.npz``: the six feature maps (f0 .. f5), to locate a mismatch.

Nothing here imports multibox.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

# See mindspore_tutorial_net.py: without this cap MindSpore's oneDNN convolutions take a reference kernel on
# AVX-512 machines (~100x slower). Must be set before MindSpore loads oneDNN.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import mindspore as ms  # noqa: E402
from mindspore import nn, ops  # noqa: E402

NUM_CLASSES = 81
NUM_BOXES = 1917
STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
EXTRAS = [(1280, 512, 2, 0.2), (512, 256, 2, 0.25), (256, 256, 2, 0.5), (256, 128, 2, 0.25)]
FEATURE_CHANNELS = [576, 1280, 512, 256, 256, 128]
BOXES_PER_LOCATION = [3, 6, 6, 6, 6, 6]
MEAN_255 = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD_255 = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.97, gamma_init=1, beta_init=0, moving_mean_init=0,
                          moving_var_init=1)


class ConvBNReLU(nn.Cell):
    """conv ('same', no bias; depthwise when ``depthwise``) -> BatchNorm -> ReLU6, as the cell ``features``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, depthwise: bool = False):
        super().__init__()
        conv = nn.Conv2d(c_in, c_out, kernel_size, stride, pad_mode='same', padding=0,
                         group=c_in if depthwise else 1)
        self.features = nn.SequentialCell([conv, batch_norm(c_out), nn.ReLU6()])

    def construct(self, x):
        return self.features(x)


class InvertedResidual(nn.Cell):
    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: float, last_relu: bool = False):
        super().__init__()
        hidden = int(round(c_in * expand_ratio))
        cells = [ConvBNReLU(c_in, hidden, kernel_size=1)] if expand_ratio != 1 else []
        cells += [ConvBNReLU(hidden, hidden, stride=stride, depthwise=True),
                  nn.Conv2d(hidden, c_out, kernel_size=1, stride=1, has_bias=False), batch_norm(c_out)]
        self.conv = nn.SequentialCell(cells)
        self.use_res_connect = stride == 1 and c_in == c_out
        self.last_relu = last_relu
        self.relu = nn.ReLU6()

    def construct(self, x):
        y = self.conv(x)
        if self.use_res_connect:
            y = x + y
        if self.last_relu:
            y = self.relu(y)
        return y


class MobileNetV2Trunk(nn.Cell):
    """Returns (the 19x19 expansion of the 13th block's output, the trunk's 10x10 output)."""

    def __init__(self):
        super().__init__()
        cells = [ConvBNReLU(3, 32, stride=2)]
        channels = 32
        for t, c, n, s in STAGES:
            for i in range(n):
                cells.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        cells.append(ConvBNReLU(channels, 1280, kernel_size=1))
        self.expand_layer_conv_13 = ConvBNReLU(96, 576, kernel_size=1)
        self.features_1 = nn.SequentialCell(cells[:14])
        self.features_2 = nn.SequentialCell(cells[14:])

    def construct(self, x):
        x = self.features_1(x)
        return self.expand_layer_conv_13(x), self.features_2(x)


def head(c_in: int, c_out: int) -> nn.SequentialCell:
    return nn.SequentialCell([
        nn.Conv2d(c_in, c_in, 3, 1, pad_mode='same', padding=0, group=c_in),
        batch_norm(c_in),
        nn.ReLU6(),
        nn.Conv2d(c_in, c_out, kernel_size=1, stride=1, padding=0, pad_mode='same', has_bias=True),
    ])


class FlattenConcat(nn.Cell):
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


class SSD300(nn.Cell):
    def __init__(self):
        super().__init__()
        self.backbone = MobileNetV2Trunk()
        self.multi_residual = nn.CellList(
            [InvertedResidual(c_in, c_out, s, t, last_relu=True) for c_in, c_out, s, t in EXTRAS])
        self.multi_box = MultiBox()

    def features(self, x):
        first, x = self.backbone(x)
        maps = (first, x)
        for residual in self.multi_residual:
            x = residual(x)
            maps += (x,)
        return maps

    def construct(self, x):
        loc, label = self.multi_box(self.features(x))
        if not self.training:
            label = ops.sigmoid(label)
        return loc.astype(ms.float32), label.astype(ms.float32)


class WithLoss(nn.Cell):
    """Stands for the zoo's ``SSDWithLossCell``: it holds the network as ``self.network`` (the loss itself does not
    matter here, only the names a checkpoint of the training network gets)."""

    def __init__(self, network: nn.Cell):
        super().__init__()
        self.network = network

    def construct(self, x):
        loc, label = self.network(x)
        return loc.sum() + label.sum()


class TrainingWrapper(nn.Cell):
    """Stands for the zoo's ``TrainingWrapper``: ``auto_prefix=False``, holding the loss cell and the optimizer,
    which is what train.py's ModelCheckpoint saves."""

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer):
        super().__init__(auto_prefix=False)
        self.network = network
        self.optimizer = optimizer


def save_training_checkpoint(net: nn.Cell, path: Path) -> None:
    """The checkpoint of train.py's training network: ``network.``-prefixed weights, Momentum's ``moments.*``
    and ``momentum``, ``learning_rate`` (a per-step array, as get_lr gives) and ``global_step``."""
    loss = WithLoss(net)
    lr = ms.Tensor(np.linspace(0.001, 0.05, 8, dtype=np.float32))
    optimizer = nn.Momentum(loss.trainable_params(), lr, 0.9, 1.5e-4, 1024.0)
    ms.save_checkpoint(TrainingWrapper(loss, optimizer), str(path))


def randomise(net: nn.Cell, seed: int) -> None:
    """Random values everywhere (BN statistics included), so that no mapping mistake can hide behind a constant
    initialisation. Convolution weights are N(0, 1/fan_in): with He's 2/fan_in the 17 residual blocks blow float32
    rounding up to ~3e-5 of the outputs (in any float32 implementation, against a float64 one); at 1/fan_in it stays
    ~1e-6 and the outputs still vary (std ~0.4)."""
    rng = np.random.default_rng(seed)
    for param in sorted(net.get_parameters(), key=lambda p: p.name):
        shape = tuple(param.shape)
        leaf = param.name.rsplit(".", 1)[-1]
        if leaf == "weight":
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) * np.sqrt(1.0 / fan_in)
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
    net = SSD300()
    randomise(net, args.seed)
    net.set_train(False)
    ms.save_checkpoint(net, str(out / "zoo_ssd300.ckpt"))
    params = net.get_parameters()
    (out / "names.txt").write_text("".join(f"{p.name} {tuple(p.shape)}\n" for p in net.get_parameters()))
    trainable = sum(int(np.prod(p.shape)) for p in net.trainable_params())
    total = sum(int(np.prod(p.shape)) for p in params)
    (out / "counts.txt").write_text(f"trainable {trainable}\nall {total}\n")

    rng = np.random.default_rng(args.seed + 1)
    image = rng.integers(0, 256, (1, 300, 300, 3)).astype(np.float32)     # NHWC RGB pixels
    x = ((image - MEAN_255) / STD_255).transpose(0, 3, 1, 2).astype(np.float32)
    np.save(out / "input.npy", x)

    loc, scores = net(ms.Tensor(x))
    maps = net.features(ms.Tensor(x))
    _, logits = net.multi_box(maps)
    np.save(out / "loc.npy", loc.asnumpy())
    np.save(out / "scores.npy", scores.asnumpy())
    np.save(out / "cls_logits.npy", logits.asnumpy())
    np.savez(out / "features.npz", **{f"f{i}": m.asnumpy() for i, m in enumerate(maps)})
    # Last: wrapping renames the network's parameters (network.*).
    save_training_checkpoint(net, out / "zoo_ssd300_train.ckpt")


if __name__ == "__main__":
    main()
