"""torchvision's published weights by name, through torch hub's cache, and what a new training run starts from
(SPEC §3 and §4 ``--weights``).

A name is a torchvision file stem (:data:`PUBLISHED`): the file is ``torch.hub.get_dir()/checkpoints/<file name>``
(``TORCH_HOME`` moves it), the file name and URL are read from torchvision's weight enums (no network). A file
already in the cache is used as it is, offline; otherwise it is downloaded once with
``torch.hub.download_url_to_file`` and kept only when its sha256 starts with the hash prefix in its name (torch
hub's rule). Offline with no file: one :class:`WeightsUnavailableError` line with the URL and the path to put it at.

:func:`plan_initial_weights` decides, from the config alone, which files a new run loads (a detector, or ImageNet
backbone weights, or nothing with ``model.from_scratch``) and resolves them before any data is read.
"""
from __future__ import annotations

import importlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from multibox.config import Config, ConfigError, preset_names
from multibox.errors import MultiboxError
from multibox.io import atomic_path, file_sha256

__all__ = ["PUBLISHED", "InitialWeights", "Published", "WeightsUnavailableError", "cache_path", "check_fits",
           "loads_backbone_weights", "mobilenet_v3_reduced_tail", "plan_initial_weights", "resolve_weights",
           "settle_backbone_stages", "starts_pretrained", "trainable_backbone_stages"]

logger = logging.getLogger("multibox.models")

# torch.hub's rule (torch.hub.HASH_REGEX): the hex digits after the last-but-extension dash of the file name are
# the start of the file's sha256.
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")
VGG16_STAGES = 5
VGG16_ARCHS = ("ssd300_vgg16_seed", "ssd300_vgg16", "ssd512_vgg16")   # the archs with VGG16's five stages


class WeightsUnavailableError(MultiboxError, FileNotFoundError):
    """Weights a run needs are neither a file nor in torch hub's cache, and cannot be downloaded (or the download
    is not the published file). The message names the URL, the cache path and how to go on."""


@dataclass(frozen=True)
class Published:
    """One of torchvision's published weight files.

    ``kind``: "detector" (a whole SSD) or "backbone" (ImageNet weights of the trunk); ``presets``: the multibox
    presets it initialises (their ``model.arch`` is the preset name with underscores); ``enum``: the torchvision
    weight enum member that names the file, as "module:Class.MEMBER".
    """

    name: str
    kind: str
    presets: tuple[str, ...]
    enum: str
    required: bool = True   # backbone weights: the presets refuse to train from random weights without them

    @property
    def archs(self) -> tuple[str, ...]:
        return tuple(p.replace("-", "_") for p in self.presets)

    def weights_enum(self):
        module, _, member = self.enum.partition(":")
        cls, _, value = member.partition(".")
        return getattr(getattr(importlib.import_module(module), cls), value)

    @property
    def url(self) -> str:
        return self.weights_enum().url

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str | None:
        match = HASH_REGEX.search(self.file_name)
        return match.group(1) if match else None


PUBLISHED: dict[str, Published] = {p.name: p for p in (
    Published("ssd300_vgg16_coco", "detector", ("ssd300-vgg16",),
              "torchvision.models.detection:SSD300_VGG16_Weights.COCO_V1"),
    Published("ssdlite320_mobilenet_v3_large_coco", "detector", ("ssdlite320-mobilenet-v3",),
              "torchvision.models.detection:SSDLite320_MobileNet_V3_Large_Weights.COCO_V1"),
    Published("vgg16_features", "backbone", ("ssd300-vgg16", "ssd512-vgg16"),
              "torchvision.models:VGG16_Weights.IMAGENET1K_FEATURES"),
    # torchvision's SSDLite recipe trains from random weights (660 epochs); ImageNet weights are an option.
    Published("mobilenet_v3_large", "backbone", ("ssdlite320-mobilenet-v3",),
              "torchvision.models:MobileNet_V3_Large_Weights.IMAGENET1K_V1", required=False),
)}


def cache_path(published: Published) -> Path:
    """Where torch hub keeps the file: ``torch.hub.get_dir()/checkpoints/<file name>`` (``TORCH_HOME``/hub by
    default ~/.cache/torch/hub)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / published.file_name


def check_fits(name: str, arch: str, key: str) -> Published | None:
    """The published weights called ``name`` (None for a file path), refused with one line when they belong to
    another preset than ``arch``'s."""
    published = PUBLISHED.get(name)
    if published is not None and arch not in published.archs:
        presets = [p for p in published.presets if p in preset_names()]
        fix = (f"choose that preset (--config {presets[0]}) or other weights" if presets else
               "that preset is not in this version of multibox; choose other weights")
        raise ConfigError(f"{key}={name}: torchvision's {published.kind} weights of the "
                          f"{' / '.join(published.presets)} preset, not of model.arch {arch}; {fix}")
    return published


def resolve_weights(value: str, key: str, fix: str = "") -> Path:
    """The local file of ``value``: a published name (:data:`PUBLISHED`) through torch hub's cache, fetched once
    when absent, or a file path. ``key`` (the config key) and ``fix`` (what else the user can do) go into the
    one-line :class:`WeightsUnavailableError`."""
    published = PUBLISHED.get(value)
    if published is None:
        path = Path(value).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"{key}: {value} is neither a file nor a published name "
                                          f"({', '.join(PUBLISHED)})")
        return path
    path = cache_path(published)
    if not path.is_file():
        fetch(published, path, key, fix)
    return path


def fetch(published: Published, path: Path, key: str = "weights", fix: str = "") -> None:
    """Download ``published`` to ``path`` (through a temporary file beside it: a cut-short or wrong download never
    takes the name), checking the sha256 prefix of its name; errors as :class:`WeightsUnavailableError`."""
    import torch.hub

    where = (f"put {published.url} at {path} (TORCH_HOME moves torch hub's cache), or run once with network "
             f"access" + (f", {fix}" if fix else ""))
    logger.info(f"downloading {published.name} ({key}) from {published.url} to {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.hub.download_url_to_file(published.url, str(tmp), progress=sys.stderr.isatty())
            digest = file_sha256(tmp)
            if published.hash_prefix and not digest.startswith(published.hash_prefix):
                raise WeightsUnavailableError(f"{key}={published.name}: the download from {published.url} is not "
                                              f"the published file (sha256 {digest[:16]}..., expected "
                                              f"{published.hash_prefix}...); {where}")
    except WeightsUnavailableError:
        raise
    except Exception as err:   # URLError (offline), HTTP errors, a full disk, ...: the file is not there
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise WeightsUnavailableError(f"{key}={published.name} is not in torch hub's cache and could not be "
                                      f"downloaded ({reason}): {where}") from None


@dataclass(frozen=True)
class InitialWeights:
    """What a new training run starts from: resolved local files (None: the model's own initialisation).

    ``detector``: a whole SSD (a torchvision ``ssd300_vgg16`` state dict or a multibox checkpoint: its backbone and
    box head are kept, its class rows where the class names match); ``backbone``: ImageNet weights of the trunk.
    ``detector_source`` / ``backbone_source``: the configured name or path, for messages.
    """

    detector: Path | None = None
    backbone: Path | None = None
    detector_source: str | None = None
    backbone_source: str | None = None


def starts_pretrained(cfg: Config) -> bool:
    """Whether a new run of ``cfg`` starts from published or given weights (a function of the config alone, so that
    a resumed run freezes what the new run froze)."""
    return not cfg.model.from_scratch and bool(cfg.model.weights or cfg.model.backbone_weights)


def trainable_backbone_stages(cfg: Config) -> int:
    """VGG16 stages (conv1 .. conv5) that train: ``model.trainable_backbone_layers``, by default 4 with pretrained
    weights (conv1_x frozen) and 5 from scratch, as torchvision's ``ssd300_vgg16`` (whose
    ``_validate_trainable_layers`` also trains all 5 when nothing is pretrained)."""
    if not starts_pretrained(cfg):
        return VGG16_STAGES
    stages = cfg.model.trainable_backbone_layers
    if stages is None:
        return VGG16_STAGES - 1
    if isinstance(stages, bool) or not isinstance(stages, int) or not 0 <= stages <= VGG16_STAGES:
        raise ConfigError(f"config key 'model.trainable_backbone_layers' = {stages!r} must be an integer 0 .. "
                          f"{VGG16_STAGES} (or null: 4 with pretrained weights)")
    return stages


def loads_backbone_weights(cfg: Config) -> bool:
    """Whether a new run of ``cfg`` initialises its trunk from ImageNet weights (``model.backbone_weights``, or
    ``--weights`` naming published backbone weights), from the config alone."""
    m = cfg.model
    if m.from_scratch:
        return False
    published = PUBLISHED.get(m.weights or "")
    return bool(m.backbone_weights) or (published is not None and published.kind == "backbone")


def mobilenet_v3_reduced_tail(cfg: Config) -> bool:
    """``model.reduced_tail``, or torchvision's rule when null: the last stage is halved unless ImageNet weights
    initialise the trunk (``reduce_tail = weights_backbone is None`` in ``ssdlite320_mobilenet_v3_large``; its
    published COCO model has the reduced tail)."""
    if cfg.model.reduced_tail is not None:
        return bool(cfg.model.reduced_tail)
    return not loads_backbone_weights(cfg)


def settle_backbone_stages(cfg: Config, resumed: bool) -> None:
    """Write the VGG16 stages that train into ``cfg.model.trainable_backbone_layers`` (a run's config.yaml then
    says them, and a resume freezes what the run froze). A resumed run whose config leaves them null is older than
    frozen stages: it trained all five. Other trunks have no VGG16 stages: their config is left as it is."""
    if cfg.model.arch in VGG16_ARCHS and cfg.model.trainable_backbone_layers is None:
        cfg.model.trainable_backbone_layers = VGG16_STAGES if resumed else trainable_backbone_stages(cfg)


SCRATCH_FIX = "or train from random weights with --set model.from_scratch=true"


def plan_initial_weights(cfg: Config) -> InitialWeights:
    """The files a new run of ``cfg`` loads, resolved now (downloaded once if absent), before any data is read.

    - ``model.from_scratch: true``: nothing (``model.weights`` with it is a contradiction, refused);
    - ``model.weights`` (``--weights``): a detector name or file; a backbone name (``vgg16_features``) stands for
      ``model.backbone_weights``;
    - otherwise ``model.backbone_weights``; an arch that trains from ImageNet weights (the paper presets) without
      any is refused, with the ways out.
    Raises ConfigError (weights of another preset, contradictions), WeightsUnavailableError (no file).
    """
    m = cfg.model
    trainable_backbone_stages(cfg)   # a bad value fails now, not after the data is read
    if m.from_scratch:
        if m.weights:
            raise ConfigError(f"model.weights={m.weights} and model.from_scratch=true contradict each other: drop "
                              "--weights to train from random weights, or model.from_scratch to fine-tune")
        return InitialWeights()
    backbone = m.backbone_weights
    if m.weights:
        published = check_fits(m.weights, m.arch, "--weights")
        if published is None or published.kind == "detector":
            return InitialWeights(detector=resolve_weights(m.weights, "--weights"), detector_source=m.weights)
        backbone = m.weights
    if backbone:
        check_fits(backbone, m.arch, "model.backbone_weights")
        return InitialWeights(backbone=resolve_weights(backbone, "model.backbone_weights", SCRATCH_FIX),
                              backbone_source=backbone)
    wanted = [p.name for p in PUBLISHED.values() if p.kind == "backbone" and p.required and m.arch in p.archs]
    if wanted:
        raise ConfigError(f"model.arch {m.arch} trains from ImageNet weights, and none are set: "
                          f"--set model.backbone_weights={wanted[0]} (or a file), --weights NAME|FILE, "
                          f"{SCRATCH_FIX}")
    return InitialWeights()
