"""Configuration: dataclasses with defaults, YAML presets shipped in ``multibox/configs``, ``a.b=value`` overrides.

A config is resolved once (preset -> file -> overrides) and saved next to every run and inside every checkpoint,
so that a checkpoint alone rebuilds its model.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from multibox.errors import MultiboxError
from multibox.io import atomic_write_text


class ConfigError(MultiboxError, ValueError):
    """A configuration that cannot be used: an unknown key, a value of the wrong type, malformed YAML or ``--set``,
    a preset that does not exist. The message names the key or file."""


IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# The names of eval.precision besides "auto": the keys of multibox.runtime.PRECISIONS, here so that the command
# line's parser knows them without importing torch.
PRECISION_NAMES = ("fp32", "bf16", "fp16")
RESIZE_MODES = ("antialias", "torchvision", "letterbox")
# Images whose header declares more pixels are refused before decoding (data.max_image_pixels, check-data).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192


@dataclass
class ModelConfig:
    arch: str = "tiny"                     # tiny | ssd300_vgg16_seed | ssd300_vgg16 | ssdlite320_mobilenet_v3 | ...
    num_classes: int = 80                  # object classes, background excluded
    image_size: int | list[int] = 300      # S (an S x S input) or [H, W], e.g. [320, 544] for 16:9 video
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 128, 128, 128, 128])  # tiny only
    head: str = "conv"                     # conv (3x3 conv) | separable (tutorial: depthwise 3x3, BN, ReLU6, 1x1)
    head_layers: int = 4                   # head shared (zoo SSD-FPN: weight-shared towers over levels): tower depth
    dropout: float = 0.5                   # after fc6/fc7 (VGG)
    vgg_relu: bool = True                  # ssd300_vgg16_seed: ReLU after each VGG conv (zoo; tutorial text: no)
    vgg_bn: bool = False                   # ssd300_vgg16_seed: BatchNorm after each VGG conv (zoo's ssd_vgg_bn)
    init: str = "truncated_normal"         # truncated_normal (σ = 0.02, tutorial) | kaiming | xavier (paper) |
                                           # normal (σ = 0.03, torchvision's SSDLite)
    class_prior: float | None = None       # initial object probability of the sigmoid cls heads (RetinaNet: 0.01)
    # --- what a new training run starts from (multibox.models.published); a resumed run reads its last.pt only
    backbone_weights: str | None = None    # ImageNet trunk: a published name (vgg16_features) or a file
    weights: str | None = None             # --weights: a published name (ssd300_vgg16_coco, ...) or a file (a
                                           # torchvision ssd300_vgg16 state dict, a multibox checkpoint)
    from_scratch: bool = False             # random initialisation: no backbone_weights / weights needed
    trainable_backbone_layers: int | None = None   # VGG16 stages trained; null: 4 when pretrained, else 5
    reduced_tail: bool | None = None       # MobileNetV3 (SSDLite): halve the last stage; null: torchvision's rule,
                                           # reduced unless ImageNet MobileNetV3 weights are loaded


@dataclass
class AnchorConfig:
    # Feature map sizes, one per level: f or [f_h, f_w]. null: the network's at model.image_size (a pass on the
    # meta device, multibox.models.resolve_feature_sizes); given ones that differ are replaced (logged).
    feature_sizes: list[int | list[int]] | None = None
    # Centres at (j + 0.5) / f_k with f_k = image_size / step (the paper's SSD300); null, or a non-square input:
    # f_k = the feature size on each axis. Dropped with feature_sizes written for another input size.
    steps: list[float] | None = field(default_factory=lambda: [8, 16, 32, 64, 100, 300])
    scales: list[float] | None = None      # None: the tutorial's 0.1 .. 0.95 rule, then 1.0
    aspect_ratios: list[list[float]] = field(default_factory=lambda: [[2], [2, 3], [2, 3], [2, 3], [2], [2]])
    clip: bool = False
    extra_box_second: bool = False
    # Per level null (from scales and aspect_ratios) or the explicit [w, h] list of one location's boxes, in
    # units of the image: layouts no scale rule gives (MindSpore's model zoo; fitted boxes).
    sizes: list[list[list[float]] | None] | None = None
    # Before training, fit the boxes' shapes to the data (multibox.data.anchor_fitting): true | false | auto (when
    # they match too few of the objects the grid can match, no sizes are given and no detector is fine-tuned).
    # Fitted boxes are written to `sizes`, so the run's config and checkpoint carry them.
    fit: bool | str = "auto"
    # Boxes per location of the fitted layout, on every level (null: as many as the level has). Set, the boxes are
    # fitted whatever `auto` would decide, and the network gets a box head of that width.
    fit_boxes: int | None = None


@dataclass
class LossConfig:
    kind: str = "focal"                    # focal (tutorial, sigmoid scores) | hard_negative (paper, softmax)
    alpha: float = 0.75
    gamma: float = 2.0
    neg_pos_ratio: int = 3
    smooth_l1_beta: float = 1.0
    match_rule: str = "tutorial"           # tutorial | torchvision
    iou_threshold: float = 0.5
    center_variance: float = 0.1
    size_variance: float = 0.2


@dataclass
class DataConfig:
    path: str = "synth"                    # COCO JSON | "synth"
    image_root: str | None = None
    val_path: str | None = None
    val_fraction: float = 0.1              # held out from `path` when there is no val_path
    synth_root: str = "data/synth"
    synth_train_images: int = 1000
    synth_val_images: int = 200
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN_255))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD_255))
    crop_rule: str = "tutorial"            # tutorial | paper (reference rule: torchvision's RandomIoUCrop) | none
    flip_p: float = 0.5
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4])
    num_workers: int = 2
    # --- the paper's augmentation and torchvision's preprocessing (data/transforms.py)
    resize: str = "antialias"              # antialias (uint8, antialiased) | torchvision (float bilinear, no
                                           # antialias) | letterbox (aspect kept, padded: multibox.core.resize)
    photometric: bool = False              # photometric distortion as torchvision's RandomPhotometricDistort
    zoom_out: float = 0.0                  # largest zoom-out ("expand") ratio; <= 1 disables (paper: 4)
    zoom_out_p: float = 0.5                # probability of a zoom-out when enabled
    # --- sources (data/build.py): `path` / `val_path` = COCO JSON | VOC folder | packed-shard folder | "synth"
    keep_empty: bool = True                # train on images without boxes too (evaluation always keeps them)
    keep_difficult: bool = False           # VOC: also train on `difficult` boxes (evaluation ignores them)
    voc_split: str = "trainval"            # VOC: ImageSets/Main split trained on
    val_split: str | None = "test"         # VOC: split evaluated when there is no val_path (held-out if absent)
    shard_verify: str = "sha256"           # shards: sha256 (file on first use + row CRC) | crc | none
    # --- where the training augmentation runs (data/gpu_transforms.py)
    pipeline: str = "cpu"                  # cpu (per image, in the workers) | batched (workers decode; one
                                           # batched warp + colour ops on the training device)
    # --- hostile inputs: images whose header declares more pixels are refused before decoding (skipped, counted)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class TrainConfig:
    epochs: int | str = 60                 # or "auto": sized by the data (about auto_images images seen)
    time: float | None = None              # minutes for the whole run (`--time 15m`): epochs fitted to it
    auto_images: int = 30000               # epochs: auto -> ceil(auto_images / training images) ...
    auto_max_epochs: int = 300             # ... at most this many
    batch_size: int = 5                    # the global batch: under torchrun each of N processes takes batch_size / N
    schedule: str = "warmup_cosine"        # warmup_cosine (tutorial) | multistep (paper)
    milestones: list[int] = field(default_factory=lambda: [80, 110])   # epochs, multistep only
    gamma: float = 0.1
    lr: float = 0.05                       # peak LR after warm-up
    lr_init: float = 0.001
    lr_end: float = 5e-5
    warmup_epochs: float = 2
    optimizer: str = "sgd"                 # sgd (momentum) | adamw
    momentum: float = 0.9
    weight_decay: float = 1.5e-4
    grad_clip: float | None = None
    amp: bool = True                       # autocast on CUDA only
    amp_dtype: str = "bfloat16"
    channels_last: bool = True             # NHWC weights/activations: faster oneDNN (CPU) and cuDNN (CUDA) convolutions
    eval_every: int = 0                    # epochs; 0 = only at the end
    checkpoint_every: int = 10
    log_every: int = 10                    # steps
    seed: int = 0
    device: str = "auto"
    threads: int = 0                       # torch CPU threads; 0 = torch's default
    # --- data-parallel (torchrun): batch_size is the global batch (it must divide by the number of processes)
    freeze_bn: bool = False                # BatchNorm uses its running statistics while training (exact DDP)
    sync_bn: bool = False                  # DDP on CUDA: convert BatchNorm to SyncBatchNorm
    dist_backend: str = "auto"             # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    # --- reliability (train.py, engine.py)
    checkpoint_every_steps: int = 0        # also write last.pt every N steps, with the position in the epoch; 0 = off
    checkpoint_every_minutes: float = 5.0  # also write last.pt when this long has passed since the last one; 0 = off
    max_nonfinite_steps: int = 20          # stop after this many consecutive non-finite loss / gradient steps; 0 = never
    deterministic: bool = False            # torch.use_deterministic_algorithms, fixed threads (exact resume on CPU)


@dataclass
class EvalConfig:
    score_threshold: float = 0.1
    nms_threshold: float = 0.6
    max_per_class: int = 100
    max_per_image: int | None = None
    pre_nms_top_k: int | None = None       # candidates per class before NMS (torchvision: 400)
    batch_size: int = 16
    backend: str = "faster"                # faster (faster-coco-eval) | pycocotools
    precision: str = "auto"                # inference autocast (eval, predict, multibox.load): auto = fp32 on every
                                           # device (AP must not move with it) | fp32 | bf16 | fp16, opt-in (bf16 is
                                           # ~2x faster on CPUs with AVX512-BF16 or AMX)
    compile: bool = False                  # torch.compile the network for predict / eval / bench (fixed shapes)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        cfg = cls()
        merge(cfg, raw)
        validate(cfg)
        return cfg


class Range(typing.NamedTuple):
    """The values a numeric config key can take: ``low`` .. ``high`` (None: unbounded), ends included unless open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        above = self.low is None or value > self.low or (value == self.low and not self.low_open)
        below = self.high is None or value < self.high or (value == self.high and not self.high_open)
        return above and below

    def __str__(self) -> str:
        ends = [f"{'>' if self.low_open else '>='} {self.low:g}" if self.low is not None else "",
                f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else ""]
        return " and ".join(e for e in ends if e)


# What a run can use. A setting outside would fail later with a traceback (batch_size 0), train on nothing
# (val_fraction 1.5) or train backwards (lr -1). lr 0 is allowed: nothing moves, a way to evaluate where fine-tuning
# starts.
_PROBABILITY, _COUNT, _POSITIVE, _NON_NEGATIVE = Range(0, 1), Range(0), Range(1), Range(0.0)
RANGES: dict[str, Range] = {
    "data.val_fraction": Range(0, 1, high_open=True),
    "data.num_workers": _COUNT,
    "data.flip_p": _PROBABILITY,
    "data.zoom_out_p": _PROBABILITY,
    "data.max_image_pixels": _POSITIVE,
    "train.epochs": _POSITIVE,
    "train.time": Range(0, low_open=True),
    "train.auto_images": _POSITIVE,
    "train.auto_max_epochs": _POSITIVE,
    "train.batch_size": _POSITIVE,
    "train.lr": _NON_NEGATIVE,
    "train.lr_init": _NON_NEGATIVE,
    "train.lr_end": _NON_NEGATIVE,
    "train.warmup_epochs": _NON_NEGATIVE,
    "train.momentum": Range(0, 1, high_open=True),
    "train.weight_decay": _NON_NEGATIVE,
    "train.eval_every": _COUNT,
    "train.checkpoint_every": _COUNT,
    "train.checkpoint_every_steps": _COUNT,
    "train.checkpoint_every_minutes": _NON_NEGATIVE,
    "train.log_every": _POSITIVE,
    "train.threads": _COUNT,
    "train.max_nonfinite_steps": _COUNT,
    "loss.iou_threshold": Range(0, 1, low_open=True),
    "eval.score_threshold": _PROBABILITY,
    "eval.nms_threshold": Range(0, 1, low_open=True),
    "eval.max_per_class": _POSITIVE,
    "eval.batch_size": _POSITIVE,
}


OPTIONAL = {"train.time"}        # None: not set
AUTOMATIC = {"train.epochs"}     # "auto": decided when the data is known


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first key of :data:`RANGES` whose value is out of its range, or a
    combination that cannot be trained."""
    for key, allowed in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None and key in OPTIONAL or value == "auto" and key in AUTOMATIC:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            also = " or 'auto'" if key in AUTOMATIC else " or null" if key in OPTIONAL else ""
            raise ConfigError(f"config key {key!r} expects a number{also}, got {value!r}")
        if not allowed.contains(value):
            raise ConfigError(f"config key {key!r} = {value!r} is out of range: it must be {allowed}")
    _check_image_size(cfg.model.image_size)
    if cfg.data.resize not in RESIZE_MODES:
        raise ConfigError(f"config key 'data.resize' expects one of {', '.join(RESIZE_MODES)}, got {cfg.data.resize!r}")
    if not (isinstance(cfg.anchors.fit, bool) or cfg.anchors.fit == "auto"):
        raise ConfigError(f"config key 'anchors.fit' expects true, false or auto, got {cfg.anchors.fit!r}")
    if cfg.anchors.fit_boxes is not None and (not _whole(cfg.anchors.fit_boxes) or cfg.anchors.fit is False):
        raise ConfigError(f"config key 'anchors.fit_boxes' expects a number of boxes per location with anchors.fit "
                          f"true or auto, got {cfg.anchors.fit_boxes!r} with anchors.fit {cfg.anchors.fit!r}")
    if cfg.train.epochs == "auto" and cfg.train.schedule == "multistep":
        # The milestones are epochs of a run of known length; sized by the data they would fall anywhere.
        raise ConfigError("train.epochs: auto sizes a warmup_cosine schedule; train.schedule multistep takes its "
                          "milestones in epochs, so give train.epochs a number")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_image_size(size: Any) -> None:
    if not (_whole(size) or isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_whole, size))):
        raise ConfigError(f"config key 'model.image_size' expects a size S or [H, W] of whole pixels, got {size!r}")


def merge(cfg: Any, raw: dict[str, Any], prefix: str = "") -> None:
    """Recursively copy ``raw`` into the dataclass ``cfg``; unknown keys are an error (typos must not pass)."""
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if not hasattr(cfg, key) or key.startswith("_"):
            raise ConfigError(f"unknown config key {name!r}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name!r} is a section; got {value!r}")
            merge(current, value, name + ".")
        else:
            setattr(cfg, key, _coerce(value, typing.get_type_hints(type(cfg))[key], name))


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Numbers written as strings become numbers where the field is numeric: YAML 1.1 reads ``1e-2`` as a string."""
    numeric = [t for t in (typing.get_args(hint) or (hint,)) if t in (int, float)]
    if isinstance(value, str) and numeric:
        try:
            return float(value) if float in numeric else int(value)
        except ValueError:
            if str in typing.get_args(hint):   # a number or a word (train.epochs: auto); validate() judges it
                return value
            raise ConfigError(f"config key {name!r} expects a number, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool) and float in numeric:
        return float(value)
    return value


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("multibox.configs").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: a config must be a mapping, got {type(raw).__name__}")
    return raw


def set_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b=value`` to a nested dict; the value is parsed as YAML (numbers, lists, null, booleans)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is a value, not a section")
    try:
        node[leaf] = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {assignment!r}: not a YAML value ({err})") from None


def load_config(preset_or_file: str | None = "tiny", overrides: list[str] = ()) -> Config:
    """Resolve a preset name (see :func:`preset_names`) or a YAML file, then apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if preset_or_file:
        path = Path(preset_or_file)
        if path.suffix in (".yaml", ".yml") and path.exists():
            raw = _read_yaml(path.read_text(), str(path))
        elif preset_or_file in preset_names():
            text = resources.files("multibox.configs").joinpath(f"{preset_or_file}.yaml").read_text()
            raw = _read_yaml(text, preset_or_file)
        else:
            raise ConfigError(f"no preset or config file {preset_or_file!r}; presets: {', '.join(preset_names())}")
    for assignment in overrides:
        set_override(raw, assignment)
    return Config.from_dict(raw)


def save_config(cfg: Config, path: str | Path) -> None:
    """Written atomically: a run rewrites its config.yaml while training (a fitted time budget), and resume reads it."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
