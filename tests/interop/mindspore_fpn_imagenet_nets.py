"""ImageNet checkpoints of the MindSpore model zoo's classification MobileNetV1 and ResNet50, and the SSD-FPN trunks
that the zoo's train.py initialises from them, built in MindSpore for tests/interop/test_mindspore_fpn_trunk.py.

Run with the Python of the MindSpore environment (numpy < 2; see tests/interop/mindspore_tutorial_net.py)::

    .venv-mindspore/bin/python tests/interop/mindspore_fpn_imagenet_nets.py --out DIR [--seed 0] [--size 256]
        [--nets mobilenet_v1,resnet50]   (both by default)

The classification networks are built as their repositories build them for ImageNet (1001 classes):
official/cv/mobilenetv1 src/mobilenet_v1.py ``MobileNetV1(1001)`` (``network``: a SequentialCell of the 27
conv-BN-ReLU6 cells, then ``fc``) and official/cv/resnet src/resnet.py ``resnet50(1001)`` (``conv1``, ``bn1``,
``layer1..4`` of bottlenecks, ``end_point``; its BatchNorms eps 1e-4, where the SSD's src/resnet.py has 1e-3).
Each gets random weights and BatchNorm statistics from a fixed seed and is saved the way its train.py's
ModelCheckpoint saves it: the training network (loss cell and Momentum optimizer around it), so the file also holds
``moments.*``, ``learning_rate``, ``momentum`` and ``global_step``. Then the SSD-FPN of the zoo's ssd/src
(tests/interop/mindspore_fpn_nets.py) is built with other random weights, and the file is loaded into its trunk by
the rule of the zoo's train.py ``ssd_model_build``: every entry ``x`` renamed ``network.feature_extractor.<trunk>.x``,
then ``load_param_into_net(<the trunk cell>, ...)``, whose prefix fallback matches ``<trunk>.x``. For each NAME it
writes

- ``DIR/NAME.ckpt``: the classification checkpoint; ``DIR/NAME.count.txt``: the trunk's parameter count (the
  classifier's not included);
- ``DIR/NAME.features.npz``: the SSD trunk's three feature maps (``c3``, ``c4``, ``c5``; the outputs FPN reads:
  MobileNetV1 layers 10, 22, 26, ResNet50's c3, c4, c5) for ``DIR/input.npy`` (1, 3, size, size), a random image
  normalised with the zoo's mean and std, in inference mode (BatchNorm uses the moving statistics);
- ``DIR/NAME.not_loaded.txt``: the trunk parameters ``load_param_into_net`` did not load (none expected).

Nothing here imports multibox.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
# Sets ONEDNN_MAX_CPU_ISA before mindspore is imported (without it MindSpore's CPU convolutions are very slow).
import mindspore_fpn_nets as zoo  # noqa: E402

import mindspore as ms  # noqa: E402
from mindspore import nn, ops  # noqa: E402

IMAGENET_CLASSES = 1001


class MobileNetV1Classifier(nn.Cell):
    """official/cv/mobilenetv1 ``MobileNetV1(class_num)`` without ``features_only``."""

    def __init__(self, class_num=IMAGENET_CLASSES):
        super().__init__()
        self.network = nn.SequentialCell([zoo.conv_bn_relu(*spec) for spec in zoo.MOBILENET_V1])
        self.fc = nn.Dense(1024, class_num)

    def construct(self, x):
        return self.fc(ops.mean(self.network(x), (2, 3)))


def _bn(channels):
    """official/cv/resnet ``_bn``: eps 1e-4, momentum 0.9."""
    return nn.BatchNorm2d(channels, eps=1e-4, momentum=0.9)


class ResidualBlock(nn.Cell):
    """official/cv/resnet ``ResidualBlock`` (use_se False): 1x1, 3x3 (the stride), 1x1 x4, 'same' convs without
    bias; ``down_sample_layer`` when the stride or width changes."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        mid = c_out // 4
        self.conv1 = nn.Conv2d(c_in, mid, 1, 1, pad_mode="same")
        self.bn1 = _bn(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, pad_mode="same")
        self.bn2 = _bn(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, 1, pad_mode="same")
        self.bn3 = _bn(c_out)
        self.relu = nn.ReLU()
        self.down_sample = stride != 1 or c_in != c_out
        self.down_sample_layer = None
        if self.down_sample:
            self.down_sample_layer = nn.SequentialCell([nn.Conv2d(c_in, c_out, 1, stride, pad_mode="same"),
                                                        _bn(c_out)])

    def construct(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.down_sample_layer(x) if self.down_sample else x
        return self.relu(out + identity)


class ResNet50Classifier(nn.Cell):
    """official/cv/resnet ``resnet50(class_num)``."""

    def __init__(self, class_num=IMAGENET_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, pad_mode="same")
        self.bn1 = _bn(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="same")
        for i, (n, c_in, c_out, stride) in enumerate([(3, 64, 256, 1), (4, 256, 512, 2), (6, 512, 1024, 2),
                                                       (3, 1024, 2048, 2)]):
            blocks = [ResidualBlock(c_in, c_out, stride)] + [ResidualBlock(c_out, c_out) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.SequentialCell(blocks))
        self.end_point = nn.Dense(2048, class_num)

    def construct(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.end_point(ops.mean(x, (2, 3)))


# NAME -> (classification network, SSD-FPN feature extractor, its trunk cell's attribute, the cell train.py loads
# into relative to the trunk, the trunk outputs FPN reads).
NETS = {
    "mobilenet_v1": (MobileNetV1Classifier, zoo.MobileNetV1Fpn, "mobilenet_v1", "network", (10, 22, 26)),
    "resnet50": (ResNet50Classifier, zoo.ResNetV1Fpn, "resnet", None, (2, 3, 4)),
}


def save_as_trained(net: nn.Cell, path: Path) -> None:
    """``mindspore.save_checkpoint`` of the training network its train.py builds (Model(net, loss, Momentum)):
    names unchanged (WithLossCell and TrainOneStepCell add no prefix), plus the optimizer's entries."""
    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    optimizer = nn.Momentum(net.trainable_params(), learning_rate=0.1, momentum=0.9)
    ms.save_checkpoint(nn.TrainOneStepCell(nn.WithLossCell(net, loss), optimizer), str(path))


def zoo_trunk_from(path: Path, name: str, seed: int) -> tuple[nn.Cell, list[str]]:
    """The zoo SSD-FPN's trunk cell initialised from the checkpoint at ``path`` by train.py's rule, and the trunk
    parameters load_param_into_net left unloaded."""
    _, fpn_class, trunk_attr, load_attr, _ = NETS[name]
    ssd = zoo.SsdFpn(fpn_class())
    zoo.randomise(ssd, seed + 100)          # the weights the load must replace
    trunk = getattr(ssd.feature_extractor, trunk_attr)
    param_dict = ms.load_checkpoint(str(path))
    for key in list(param_dict.keys()):
        param_dict[f"network.feature_extractor.{trunk_attr}." + key] = param_dict.pop(key)
    result = ms.load_param_into_net(trunk if load_attr is None else getattr(trunk, load_attr), param_dict)
    not_loaded = result[0] if isinstance(result, tuple) else result
    return trunk, list(not_loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--nets", default=",".join(NETS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    ms.set_seed(args.seed)

    rng = np.random.default_rng(args.seed + 1)
    image = rng.integers(0, 256, (1, args.size, args.size, 3)).astype(np.float32)
    x = ((image - zoo.MEAN_255) / zoo.STD_255).transpose(0, 3, 1, 2).astype(np.float32)
    np.save(out / "input.npy", x)
    for name in args.nets.split(","):
        classifier_class, _, _, _, taps = NETS[name]
        classifier = classifier_class()
        zoo.randomise(classifier, args.seed)
        save_as_trained(classifier, out / f"{name}.ckpt")
        trunk, not_loaded = zoo_trunk_from(out / f"{name}.ckpt", name, args.seed)
        (out / f"{name}.not_loaded.txt").write_text("".join(f"{p}\n" for p in not_loaded))
        (out / f"{name}.count.txt").write_text(str(sum(int(np.prod(p.shape)) for p in trunk.trainable_params())))
        trunk.set_train(False)
        features = trunk(ms.Tensor(x))
        np.savez(out / f"{name}.features.npz", **{f"c{i + 3}": features[t].asnumpy() for i, t in enumerate(taps)})


if __name__ == "__main__":
    main()
