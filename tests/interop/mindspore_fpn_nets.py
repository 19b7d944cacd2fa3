"""The MindSpore model zoo's SSD-MobileNetV1-FPN and SSD-ResNet50-FPN (640x640), built in MindSpore, for
tests/interop/test_mindspore_fpn.py.

Run with the Python of the MindSpore environment (numpy < 2; see tests/interop/mindspore_tutorial_net.py)::

    .venv-mindspore/bin/python tests/interop/mindspore_fpn_nets.py --out DIR [--seed 0]
        [--nets mobilenet_v1_fpn,resnet50_fpn]   (both by default)

Built layer for layer from the zoo's published architecture (model_zoo/official/cv/ssd/src/ssd.py
``SsdMobilenetV1Fpn`` / ``SsdResNet50Fpn`` / ``WeightSharedMultiBox``, src/fpn.py, src/mobilenet_v1.py,
src/resnet.py; configs config/ssd_{mobilenet_v1,resnet50}_fpn_config.yaml: 81 classes, 6 boxes per location, 4
addition layers, 256 FPN channels). MindSpore's defaults matter: ``nn.Conv2d`` has no bias unless asked and pads
'same'; ``nn.BatchNorm2d`` has eps 1e-5 unless given. The zoo's ``P.ResizeBilinear`` (align_corners=False, no
half-pixel centres) is ``ResizeBilinearV2(False, False)`` in MindSpore 2.x. Every parameter and BatchNorm statistic
gets a random value from a fixed seed; for each network NAME it writes

- ``DIR/NAME.ckpt`` (``mindspore.save_checkpoint``) and ``DIR/NAME.names.txt`` (name and shape per parameter);
- ``DIR/NAME.loc.npy`` (1, A, 4) raw offsets in the zoo's (dy, dx, dh, dw) order, ``DIR/NAME.cls.npy`` (1, A, 81)
  raw logits (training mode off: BatchNorm uses its moving statistics);
- ``DIR/NAME.count.txt``: the number of trainable parameters (shared ones once);

and ``DIR/input.npy``: (1, 3, 640, 640) float32, a random RGB image normalised with the zoo's mean and std;
``DIR/anchors.npy``: (51150, 4) the zoo's default boxes as (cy, cx, h, w) (:func:`zoo_grid_anchors`).
The attribute names are the checkpoint's contract and must be the zoo's. Nothing here imports multibox.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

# See mindspore_tutorial_net.py: without this MindSpore 2.10's CPU convolutions take minutes on AVX-512 machines.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

import mindspore as ms  # noqa: E402
from mindspore import nn, ops  # noqa: E402
from mindspore.ops import operations as P  # noqa: E402

NUM_CLASSES = 81
NUM_DEFAULT = 6
CHANNELS = 256
NUM_ADDITION_LAYERS = 4
FEATURE_SIZES = [80, 40, 20, 10, 5]
NUM_BOXES = sum(f * f for f in FEATURE_SIZES) * NUM_DEFAULT
IMAGE = 640
MEAN_255 = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD_255 = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255


# ------------------------------------------------------------------------------------------ src/mobilenet_v1.py

def conv_bn_relu(c_in, c_out, kernel, stride, depthwise):
    """'same' conv without bias -> BatchNorm2d (MindSpore defaults: eps 1e-5, momentum 0.9) -> ReLU6."""
    return nn.SequentialCell([
        nn.Conv2d(c_in, c_out, kernel, stride, pad_mode="same", group=c_in if depthwise else 1),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(),
    ])


# (in, out, kernel, stride, depthwise) of the 27 layers: Conv0, then depthwise / pointwise pairs 1..13.
MOBILENET_V1 = [(3, 32, 3, 2, False)]
for _c_in, _c_out, _stride in [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
                               (256, 512, 2), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
                               (512, 512, 1), (512, 1024, 2), (1024, 1024, 1)]:
    MOBILENET_V1 += [(_c_in, _c_in, 3, _stride, True), (_c_in, _c_out, 1, 1, False)]


class MobileNetV1(nn.Cell):
    """``MobileNetV1(features_only=True)``: every layer's output."""

    def __init__(self):
        super().__init__()
        self.network = nn.CellList([conv_bn_relu(*spec) for spec in MOBILENET_V1])

    def construct(self, x):
        features = ()
        for block in self.network:
            x = block(x)
            features += (x,)
        return features


# ---------------------------------------------------------------------------------------------- src/resnet.py

def _bn_resnet(channels):
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.997)


class ResidualBlock(nn.Cell):
    """Bottleneck: 1x1 -> 3x3 (stride here) -> 1x1 x4, 'same' convs without bias; projection shortcut when the
    stride or width changes."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        mid = c_out // 4
        self.conv1 = nn.Conv2d(c_in, mid, 1, 1, pad_mode="same")
        self.bn1 = _bn_resnet(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, pad_mode="same")
        self.bn2 = _bn_resnet(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, 1, pad_mode="same")
        self.bn3 = _bn_resnet(c_out)
        self.relu = nn.ReLU()
        self.down_sample = stride != 1 or c_in != c_out
        self.down_sample_layer = None
        if self.down_sample:
            self.down_sample_layer = nn.SequentialCell([nn.Conv2d(c_in, c_out, 1, stride, pad_mode="same"),
                                                        _bn_resnet(c_out)])

    def construct(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.down_sample_layer(x) if self.down_sample else x
        return self.relu(out + identity)


class ResNet50(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, pad_mode="same")
        self.bn1 = _bn_resnet(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="same")
        self.layer1 = self._layer(3, 64, 256, 1)
        self.layer2 = self._layer(4, 256, 512, 2)
        self.layer3 = self._layer(6, 512, 1024, 2)
        self.layer4 = self._layer(3, 1024, 2048, 2)

    @staticmethod
    def _layer(n, c_in, c_out, stride):
        return nn.SequentialCell([ResidualBlock(c_in, c_out, stride)] +
                                 [ResidualBlock(c_out, c_out, 1) for _ in range(1, n)])

    def construct(self, x):
        c1 = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(c1)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c1, c2, c3, c4, c5


# ------------------------------------------------------------------------------------------------- src/fpn.py

class FpnTopDown(nn.Cell):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.lateral_convs_list = nn.CellList([
            nn.Conv2d(c, out_channels, 1, 1, has_bias=True, padding=0, pad_mode="same") for c in in_channels])
        self.fpn_convs_list = nn.CellList([
            conv_bn_relu(out_channels, out_channels, 3, 1, False) for _ in in_channels])
        self.resize = P.ResizeBilinearV2(align_corners=False, half_pixel_centers=False)

    def construct(self, inputs):
        laterals = ()
        for i, feature in enumerate(inputs):
            laterals += (self.lateral_convs_list[i](feature),)
        merged = (laterals[-1],)
        for i in range(len(inputs) - 1):
            down = len(inputs) - i - 2
            size = ops.shape(inputs[down])
            merged += (self.resize(merged[-1], (size[2], size[3])) + laterals[down],)
        n = len(merged)
        out = ()
        for i in range(n):
            out += (self.fpn_convs_list[i](merged[n - i - 1]),)
        return out


class BottomUp(nn.Cell):
    def __init__(self, levels, channels, kernel, stride):
        super().__init__()
        self.blocks = nn.CellList([conv_bn_relu(channels, channels, kernel, stride, False) for _ in range(levels)])

    def construct(self, features):
        for block in self.blocks:
            features += (block(features[-1]),)
        return features


class MobileNetV1Fpn(nn.Cell):
    def __init__(self):
        super().__init__()
        self.mobilenet_v1 = MobileNetV1()
        self.fpn = FpnTopDown([256, 512, 1024], CHANNELS)
        self.bottom_up = BottomUp(2, CHANNELS, 3, 2)

    def construct(self, x):
        features = self.mobilenet_v1(x)
        return self.bottom_up(self.fpn((features[10], features[22], features[26])))


class ResNetV1Fpn(nn.Cell):
    def __init__(self):
        super().__init__()
        self.resnet = ResNet50()
        self.fpn = FpnTopDown([512, 1024, 2048], CHANNELS)
        self.bottom_up = BottomUp(2, CHANNELS, 3, 2)

    def construct(self, x):
        _, _, c3, c4, c5 = self.resnet(x)
        return self.bottom_up(self.fpn((c3, c4, c5)))


# ------------------------------------------------------------------------------------------------- src/ssd.py

def _conv2d(c_in, c_out, kernel=3):
    return nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=1, padding=0, pad_mode="same", has_bias=True)


def _bn_head(channels):
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.97)


class ConvBNReLU(nn.Cell):
    """``ConvBNReLU(..., shared_conv=conv)``: the given (shared) conv -> its own BatchNorm -> ReLU6."""

    def __init__(self, channels, shared_conv):
        super().__init__()
        self.features = nn.SequentialCell([shared_conv, _bn_head(channels), nn.ReLU6()])

    def construct(self, x):
        return self.features(x)


class FlattenConcat(nn.Cell):
    def construct(self, inputs):
        n = ops.shape(inputs[0])[0]
        flat = ()
        for x in inputs:
            flat += (ops.reshape(ops.transpose(x, (0, 2, 3, 1)), (n, -1)),)
        return ops.reshape(ops.concat(flat, axis=1), (n, NUM_BOXES, -1))


class WeightSharedMultiBox(nn.Cell):
    """``loc_cls_shared_addition=False``: per tower (loc, cls) 4 'same' 3x3 convs with bias shared by all levels,
    a BatchNorm per level and layer; one shared 3x3 predictor per tower."""

    def __init__(self, num_levels=len(FEATURE_SIZES)):
        super().__init__()
        loc_convs = [_conv2d(CHANNELS, CHANNELS) for _ in range(NUM_ADDITION_LAYERS)]
        cls_convs = [_conv2d(CHANNELS, CHANNELS) for _ in range(NUM_ADDITION_LAYERS)]
        self.addition_layer_loc = nn.CellList([
            nn.SequentialCell([ConvBNReLU(CHANNELS, loc_convs[x]) for x in range(NUM_ADDITION_LAYERS)])
            for _ in range(num_levels)])
        self.addition_layer_cls = nn.CellList([
            nn.SequentialCell([ConvBNReLU(CHANNELS, cls_convs[x]) for x in range(NUM_ADDITION_LAYERS)])
            for _ in range(num_levels)])
        self.loc_layers = nn.SequentialCell([_conv2d(CHANNELS, 4 * NUM_DEFAULT)])
        self.cls_layers = nn.SequentialCell([_conv2d(CHANNELS, NUM_CLASSES * NUM_DEFAULT)])
        self.flatten_concat = FlattenConcat()

    def construct(self, inputs):
        loc, cls = (), ()
        for i in range(len(inputs)):
            loc += (self.loc_layers(self.addition_layer_loc[i](inputs[i])),)
            cls += (self.cls_layers(self.addition_layer_cls[i](inputs[i])),)
        return self.flatten_concat(loc), self.flatten_concat(cls)


class SsdFpn(nn.Cell):
    """``SsdMobilenetV1Fpn`` / ``SsdResNet50Fpn``: the raw (training-graph) outputs, loc and cls logits."""

    def __init__(self, feature_extractor):
        super().__init__()
        self.multi_box = WeightSharedMultiBox()
        self.feature_extractor = feature_extractor

    def construct(self, x):
        return self.multi_box(self.feature_extractor(x))


NETS = {"mobilenet_v1_fpn": MobileNetV1Fpn, "resnet50_fpn": ResNetV1Fpn}
STEPS = [8, 16, 32, 64, 128]


def zoo_grid_anchors(image=IMAGE, scale=4.0, scales_per_octave=2, aspect_ratios=(1.0, 2.0, 0.5)):
    """The default boxes of box_utils.py with ``use_anchor_generator`` (anchor_generator.py
    ``GridAnchorGenerator(img_shape, 4, 2, [1.0, 2.0, 0.5]).generate_multi_levels(steps)``), float32 as there:
    (A, 4) as (cy, cx, h, w) / image. Per level: octave scales 2^(i / 2) and aspect ratios meshed aspect-major,
    h = scale / √a · 4·step, w = scale · √a · 4·step; centres (k·step + step / 2) on an (image / step)² grid,
    rows, then columns, then the boxes of one location."""
    octaves = np.array([2 ** (i / scales_per_octave) for i in range(scales_per_octave)], np.float32)
    octave_grid, ratio_grid = np.meshgrid(octaves, np.array(aspect_ratios, np.float32))
    octave_grid, ratio_grid = octave_grid.reshape(-1), ratio_grid.reshape(-1)
    levels = []
    for step in STEPS:
        base = np.float32(scale * step)
        heights = octave_grid / np.sqrt(ratio_grid) * base
        widths = octave_grid * np.sqrt(ratio_grid) * base
        centres = np.arange(image // step, dtype=np.float32) * step + step / 2.0
        cy, cx = np.meshgrid(centres, centres, indexing="ij")
        n = len(heights)
        cyx = np.stack([cy.reshape(-1), cx.reshape(-1)], axis=1).repeat(n, axis=0)
        hw = np.tile(np.stack([heights, widths], axis=1), (cy.size, 1))
        levels.append(np.concatenate([cyx, hw], axis=1) / np.float32(image))
    return np.concatenate(levels).astype(np.float32)


def randomise(net: nn.Cell, seed: int) -> None:
    """Every parameter and BN statistic random (He-scaled conv weights so activations stay O(1))."""
    rng = np.random.default_rng(seed)
    for param in sorted(net.get_parameters(), key=lambda p: p.name):
        shape = tuple(param.shape)
        leaf = param.name.rsplit(".", 1)[-1]
        if leaf == "weight":
            value = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
        elif leaf == "gamma" and ".bn3." in param.name:
            # ResNet's last BatchNorm of each residual branch (the zoo's _bn_last, initialised to 0 there): small,
            # so that 16 residual sums do not grow activations to ~1e5, where float32 rounding alone (in either
            # framework) differs from float64 by ~3e-4 relative and would hide the comparison.
            value = rng.uniform(0.1, 0.3, shape)
        elif leaf in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, shape)
        else:   # bias, beta, moving_mean
            value = rng.standard_normal(shape) * 0.1
        param.set_data(ms.Tensor(value.astype(np.float32)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nets", default=",".join(NETS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    ms.set_seed(args.seed)

    rng = np.random.default_rng(args.seed + 1)
    image = rng.integers(0, 256, (1, IMAGE, IMAGE, 3)).astype(np.float32)
    x = ((image - MEAN_255) / STD_255).transpose(0, 3, 1, 2).astype(np.float32)
    np.save(out / "input.npy", x)
    np.save(out / "anchors.npy", zoo_grid_anchors())
    for name in args.nets.split(","):
        net = SsdFpn(NETS[name]())
        randomise(net, args.seed)
        net.set_train(False)
        ms.save_checkpoint(net, str(out / f"{name}.ckpt"))
        params = list(net.get_parameters())
        (out / f"{name}.names.txt").write_text("".join(f"{p.name} {tuple(p.shape)}\n" for p in params))
        # Trainable parameters (BatchNorm's moving statistics are Parameters in MindSpore, buffers in PyTorch).
        (out / f"{name}.count.txt").write_text(str(sum(int(np.prod(p.shape)) for p in net.trainable_params())))
        loc, cls = net(ms.Tensor(x))
        np.save(out / f"{name}.loc.npy", loc.asnumpy())
        np.save(out / f"{name}.cls.npy", cls.asnumpy())


if __name__ == "__main__":
    main()
