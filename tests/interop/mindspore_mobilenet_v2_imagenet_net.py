"""The MindSpore model zoo's ImageNet MobileNetV2 and the ``ssd300`` trunk initialised from it, built in MindSpore,
for tests/interop/test_mindspore_mobilenet_v2_trunk.py.

Run with the Python of the MindSpore environment (MindSpore needs numpy < 2; see mindspore_tutorial_net.py)::

    .venv-mindspore/bin/python tests/interop/mindspore_mobilenet_v2_imagenet_net.py --out DIR [--seed 0]

The classifier follows the published architecture (mindspore-ai/mindspore, model_zoo/official/cv/mobilenetv2:
src/mobilenetV2.py, src/models.py ``define_net``), written here from that description:

- ``ConvBNReLU`` = ``features`` = [conv (no bias, pad_mode 'pad' with padding (k - 1) // 2: symmetric), BatchNorm
  with MindSpore's defaults (eps 1e-5), ReLU6]; ``InvertedResidual`` = ``conv`` = [expansion ConvBNReLU 1x1 unless
  t = 1, depthwise ConvBNReLU 3x3, 1x1 conv (no bias), BatchNorm], plus the input at stride 1 with equal channels;
- ``MobileNetV2Backbone``: ``features`` = ConvBNReLU 3x3 s2 (3 -> 32), the 17 inverted residuals of (t, c, n, s),
  ConvBNReLU 1x1 (320 -> 1280); ``MobileNetV2Head``: ``head`` = [global average pooling, Dense(1280, 1000)];
- ``MobileNetV2Combine(backbone, head)`` with ``auto_prefix=False``: entries ``features.*`` and ``head.1.*``.

The reference trunk is the zoo SSD's (``MobileNetV2Trunk`` of mindspore_mobilenet_v2_net.py: 'same' padding, eps
1e-3, ``features_1`` / ``features_2``) with the classifier's tensors put in by the names of the SSD's
init_params.py ``load_backbone_params`` (``features_1.{i}`` <- ``features.{i}``, ``features_2.{i}`` <-
``features.{i + 14}``; ``expand_layer_conv_13`` is not in the file and keeps its values). Writes into DIR:

- ``mobilenetv2_imagenet.ckpt`` (``mindspore.save_checkpoint`` of the classifier); ``mobilenetv2_imagenet_train.ckpt``
  (the same weights saved from a TrainOneStepCell with Momentum, as train.py's ModelCheckpoint: optimizer state
  beside them); ``names.txt`` (every entry's name and shape); ``counts.txt`` (``features N``, ``head N``: parameter
  counts, BatchNorm statistics included);
- ``input.npy`` (1, 3, 300, 300) float32, normalised as the zoo's SSD dataset.py;
- ``trunk.npz``: ``split`` (1, 96, 19, 19) = ``features_1``'s output, ``last`` (1, 1280, 10, 10) = ``features_2``'s,
  of the SSD trunk; ``classifier_last`` (1, 1280, 10, 10): the classifier's own ``features`` output.

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

# The same folder (this script's, first on sys.path): the zoo SSD's trunk, its random initialisation, constants.
from mindspore_mobilenet_v2_net import MEAN_255, STAGES, STD_255, MobileNetV2Trunk, randomise  # noqa: E402

SPLIT = 14
IMAGENET_CLASSES = 1000


class ConvBNReLU(nn.Cell):
    """The classifier's conv (symmetric 'pad' padding, no bias; depthwise when ``depthwise``) -> BatchNorm -> ReLU6."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, depthwise: bool = False):
        super().__init__()
        conv = nn.Conv2d(c_in, c_out, kernel_size, stride, pad_mode='pad', padding=(kernel_size - 1) // 2,
                         group=c_in if depthwise else 1)
        self.features = nn.SequentialCell([conv, nn.BatchNorm2d(c_out), nn.ReLU6()])

    def construct(self, x):
        return self.features(x)


class InvertedResidual(nn.Cell):
    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(c_in * expand_ratio))
        cells = [ConvBNReLU(c_in, hidden, kernel_size=1)] if expand_ratio != 1 else []
        cells += [ConvBNReLU(hidden, hidden, stride=stride, depthwise=True),
                  nn.Conv2d(hidden, c_out, kernel_size=1, stride=1, has_bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.SequentialCell(cells)
        self.use_res_connect = stride == 1 and c_in == c_out

    def construct(self, x):
        y = self.conv(x)
        return x + y if self.use_res_connect else y


class MobileNetV2Backbone(nn.Cell):
    def __init__(self):
        super().__init__()
        cells = [ConvBNReLU(3, 32, stride=2)]
        channels = 32
        for t, c, n, s in STAGES:
            for i in range(n):
                cells.append(InvertedResidual(channels, c, s if i == 0 else 1, t))
                channels = c
        cells.append(ConvBNReLU(channels, 1280, kernel_size=1))
        self.features = nn.SequentialCell(cells)

    def construct(self, x):
        return self.features(x)


class GlobalAvgPooling(nn.Cell):
    def construct(self, x):
        return ops.mean(x, (2, 3))


class MobileNetV2Head(nn.Cell):
    def __init__(self):
        super().__init__()
        self.head = nn.SequentialCell([GlobalAvgPooling(), nn.Dense(1280, IMAGENET_CLASSES, has_bias=True)])

    def construct(self, x):
        return self.head(x)


class MobileNetV2Combine(nn.Cell):
    def __init__(self, backbone: nn.Cell, head: nn.Cell):
        super().__init__(auto_prefix=False)
        self.backbone = backbone
        self.head = head

    def construct(self, x):
        return self.head(self.backbone(x))


def save_training_checkpoint(net: nn.Cell, path: Path) -> None:
    """The classifier's training network as train.py's Model(net, loss_fn, optimizer) builds it: WithLossCell and
    TrainOneStepCell add no prefix (auto_prefix=False), the optimizer adds ``moments.*``, ``learning_rate``,
    ``momentum``, ``global_step``."""
    loss = nn.WithLossCell(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction='mean'))
    lr = ms.Tensor(np.linspace(0.0, 0.8, 8, dtype=np.float32))
    optimizer = nn.Momentum(net.trainable_params(), lr, 0.9, 4e-5)
    ms.save_checkpoint(nn.TrainOneStepCell(loss, optimizer), str(path))


def ssd_trunk_from(path: Path, seed: int) -> MobileNetV2Trunk:
    """The zoo SSD's trunk (random values first), then every entry the SSD's load_backbone_params finds in the
    classifier's checkpoint at ``path`` under its renamed name; all but ``expand_layer_conv_13`` must be found."""
    imagenet = ms.load_checkpoint(str(path))
    trunk = MobileNetV2Trunk()
    randomise(trunk, seed)
    for param in trunk.get_parameters():
        part, index, rest = param.name.split(".", 2)
        if part == "expand_layer_conv_13":
            continue
        index = int(index) + (SPLIT if part == "features_2" else 0)
        name = f"features.{index}.{rest}"
        assert name in imagenet, f"{param.name} <- {name}: not in the ImageNet checkpoint"
        assert tuple(imagenet[name].shape) == tuple(param.shape), name
        param.set_data(ms.Tensor(imagenet[name].asnumpy()))
    trunk.set_train(False)
    return trunk


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
    net = MobileNetV2Combine(MobileNetV2Backbone(), MobileNetV2Head())
    randomise(net, args.seed)
    net.set_train(False)
    ms.save_checkpoint(net, str(out / "mobilenetv2_imagenet.ckpt"))
    params = net.get_parameters()
    (out / "names.txt").write_text("".join(f"{p.name} {tuple(p.shape)}\n" for p in params))
    counts = {"features": 0, "head": 0}
    for p in net.get_parameters():
        counts[p.name.split(".")[0]] += int(np.prod(p.shape))
    (out / "counts.txt").write_text("".join(f"{k} {v}\n" for k, v in counts.items()))

    rng = np.random.default_rng(args.seed + 1)
    image = rng.integers(0, 256, (1, 300, 300, 3)).astype(np.float32)     # NHWC RGB pixels
    x = ((image - MEAN_255) / STD_255).transpose(0, 3, 1, 2).astype(np.float32)
    np.save(out / "input.npy", x)

    trunk = ssd_trunk_from(out / "mobilenetv2_imagenet.ckpt", args.seed + 2)
    split = trunk.features_1(ms.Tensor(x))
    last = trunk.features_2(split)
    classifier_last = net.backbone(ms.Tensor(x))
    np.savez(out / "trunk.npz", split=split.asnumpy(), last=last.asnumpy(), classifier_last=classifier_last.asnumpy())
    save_training_checkpoint(net, out / "mobilenetv2_imagenet_train.ckpt")


if __name__ == "__main__":
    main()
