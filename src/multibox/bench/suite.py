"""``multibox bench``: multibox against torchvision's ``ssd300_vgg16`` (random weights), same process, same device;
with ``--arch ssdlite320_mobilenet_v3`` against torchvision's ``ssdlite320_mobilenet_v3_large``, and where the arch
has such a twin, inference runs both on the same weights (:data:`TORCHVISION_TWINS`).

Every line reports multibox's number, the reference's, and their ratio (> 1 means multibox is faster):

- ``train_step``: images/s of forward + matching + loss + backward + SGD step on an augmented batch in memory;
- ``train_e2e``: images/s of training fed from disk with the full augmentation, DataLoader included: multibox
  reads packed shards (``data.pipeline`` cpu: augmentation in the workers; batched: workers decode, the batch is
  warped on the device), torchvision its reference recipe (``references/detection``: loose JPEG files through
  ``torchvision.datasets.CocoDetection``, its "ssd" v2 transforms on PIL images, ``ssd300_vgg16`` resizing on the
  device); both over the same synthetic COCO-like images (480-640 px JPEGs) generated at bench time;
- ``infer_e2e``: images/s of inference from uint8 images in host memory (480 x 640) to per-image detections,
  preprocessing, box decoding and NMS included, in the worst case (random weights: nearly every anchor passes the
  score threshold) and a realistic one (a fixed budget of confident boxes per image, imposed on both systems alike
  through a hook on their class heads); batch-1 rows also give the latency in ms;
- ``infer_jpeg``: the realistic case from JPEG files on disk (640 x 480), decoding included;
- ``augment``: images/s of the training augmentation on one CPU thread (torchvision: its reference SSD
  transforms plus the resize its model does) and of the batched augmentation on the bench device;
- ``eval``: seconds of COCO evaluation of a fixed prediction set (reference: pycocotools);
- ``data``: decoded samples/s from packed shards vs loose JPEG files (:mod:`multibox.bench.data`).

``--arch tiny`` swaps the VGG16 trunk of *both* systems for multibox's tiny backbone (torchvision's ``SSD`` class
around it): a smoke test of every line in seconds, whose ratios then compare everything but the convolutions.
``--profile`` adds torch.profiler's top operators of multibox's training step and inference.

Each row is logged (logger ``multibox.bench.suite``, :func:`format_line`) the moment it is measured. On the CPU the
bench runs on one thread unless told otherwise (``threads``), as README's speed table; the title states the count.
"""
from __future__ import annotations

import contextlib
import logging
import os
import statistics
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from multibox.bench import BACKENDS, LINES
from multibox.config import Config, load_config, preset_names
from multibox.runtime import PRECISIONS, autocast
from multibox.core.matching import pad_targets
from multibox.core.resize import as_hw
from multibox.errors import InputError
from multibox.models import build_model

NUM_CLASSES = 90   # torchvision's COCO head: 91 channels with background
SSD300_ANCHORS = 8732   # default boxes of torchvision's ssd300_vgg16
INFER_HW = (480, 640)   # a typical COCO photo: inference includes resizing it
REFERENCE_MEAN = (123.0, 117.0, 104.0)   # torchvision's references/detection "ssd" recipe (zoom-out fill)
TINY = ["model.arch=tiny", "model.widths=[16, 32, 64, 128, 128, 128, 128, 128]", "model.init=kaiming"]

logger = logging.getLogger(__name__)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns (a b, b a, a b, ...): on a shared or
    throttling machine, a load change then hits both systems alike instead of whichever ran during it."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paper_config(preset: str, arch: str = "ssd300_vgg16", overrides: list[str] = ()) -> Config:
    """The preset with torchvision's 90 COCO classes; ``arch="tiny"`` swaps in the tiny backbone."""
    return load_config(preset, [f"model.num_classes={NUM_CLASSES}", *(TINY if arch == "tiny" else []), *overrides])


def random_batch(batch: int, size: int | Sequence[int], max_boxes: int,
                 seed: int) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(N, 3, H, W) images in [0, 1] (``size``: S or (H, W), :func:`multibox.core.resize.as_hw`) and
    1..max_boxes random boxes per image (normalised xyxy) with labels in 1..90."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, *as_hw(size), generator=g)
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(1, max_boxes + 1, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.7
        wh = 0.05 + torch.rand(n, 2, generator=g) * 0.25
        boxes.append(torch.cat((xy, xy + wh), 1))
        labels.append(torch.randint(1, NUM_CLASSES + 1, (n,), generator=g))
    return images, boxes, labels


# ------------------------------------------------------------------------------------------------ the reference

class _TinyTrunk(nn.Module):
    """multibox's tiny backbone with torchvision's backbone interface (an ordered dict of feature maps)."""

    def __init__(self, cfg: Config):
        super().__init__()
        from multibox.models import build_backbone
        self.body = build_backbone(cfg)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return OrderedDict((str(i), f) for i, f in enumerate(self.body(x)))


# multibox archs with a torchvision counterpart: the bench compares each with it on the same weights; every other
# arch is compared with torchvision's ssd300_vgg16, the reference of SPEC §5.
TORCHVISION_TWINS = {"ssd300_vgg16": "ssd300_vgg16", "ssdlite320_mobilenet_v3": "ssdlite320_mobilenet_v3_large"}


def reference_name(arch: str) -> str:
    """torchvision's model that ``arch`` is measured against."""
    return "SSD around the tiny trunk" if arch == "tiny" else TORCHVISION_TWINS.get(arch, "ssd300_vgg16")


def torchvision_ssd(device: torch.device, arch: str = "ssd300_vgg16") -> nn.Module:
    """torchvision's twin of ``arch`` (:data:`TORCHVISION_TWINS`; ``ssd300_vgg16`` otherwise) with random weights,
    or (``arch="tiny"``) its ``SSD`` around the tiny trunk."""
    if arch == "ssdlite320_mobilenet_v3":
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large
        return ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                             num_classes=NUM_CLASSES + 1).to(device)
    if arch != "tiny":
        from torchvision.models.detection import ssd300_vgg16
        return ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1).to(device)
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD
    cfg = paper_config("ssd300-vgg16", "tiny")
    anchors = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]], scales=cfg.anchors.scales,
                                  steps=[int(s) for s in cfg.anchors.steps])
    return SSD(_TinyTrunk(cfg), anchors, (300, 300), NUM_CLASSES + 1,
               image_mean=[0.48235, 0.45882, 0.40784], image_std=[1.0 / 255.0] * 3).to(device)


def twin_weights(arch: str, theirs: nn.Module) -> dict[str, Tensor] | None:
    """torchvision's random weights in multibox's layout when ``arch`` has a torchvision twin (both systems then
    compute the same function, and the worst case sends the same candidates to NMS); None otherwise."""
    if arch not in TORCHVISION_TWINS:
        return None
    from multibox.interop.torchvision import torchvision_detector_state_dict
    return torchvision_detector_state_dict({k: v.cpu() for k, v in theirs.state_dict().items()}, "bench")[1]


def _maybe_compile(model: nn.Module, compile_: bool) -> nn.Module:
    return torch.compile(model) if compile_ else model


# ------------------------------------------------------------------------------------------------ train_step

class _OurTrainer:
    """multibox's training step (the same operations as :func:`multibox.engine.train_one_epoch`'s body)."""

    def __init__(self, cfg: Config, device: torch.device, amp: torch.dtype | None, compile_: bool = False):
        from multibox.core.losses import build_criterion
        from multibox.core.matching import build_encoder
        from multibox.engine.optim import build_optimizer
        self.device, self.amp = device, amp
        self.model = build_model(cfg).to(device).train()
        if cfg.train.channels_last:   # as fit() does
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion, self.encoder = build_criterion(cfg), build_encoder(cfg, device)
        self.optimizer = build_optimizer(cfg, self.model)
        self.forward = _maybe_compile(self.model, compile_)

    def step(self, images: Tensor, boxes: list[Tensor], labels: list[Tensor]) -> None:
        images = images.to(self.device, non_blocking=True)
        gt_boxes, gt_labels = pad_targets(boxes, labels, self.device)
        loc_t, lab_t = self.encoder(gt_boxes, gt_labels)
        with autocast(self.device, self.amp):
            loc, cls = self.forward(images)
        loss = self.criterion(loc, cls, loc_t, lab_t)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class _TheirTrainer:
    """torchvision's training step (its references/detection ``train_one_epoch`` body, SGD as there)."""

    def __init__(self, device: torch.device, amp: torch.dtype | None, arch: str):
        self.device, self.amp = device, amp
        self.model = torchvision_ssd(device, arch).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)

    def step(self, images: list[Tensor], targets: list[dict]) -> None:
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with autocast(self.device, self.amp):
            losses = self.model(images, targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def bench_train_step(preset: str, device: torch.device, batch: int, amp: torch.dtype | None, iters: int,
                     arch: str = "ssd300_vgg16", compile_: bool = False, warmup: int = 2) -> dict:
    cfg = paper_config(preset, arch)
    height, width = as_hw(cfg.model.image_size)
    images, boxes, labels = random_batch(batch, (height, width), 8, seed=0)
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    normalised = ((images * 255 - mean) / std).to(device)
    ours = _OurTrainer(cfg, device, amp, compile_)
    theirs = _TheirTrainer(device, amp, arch)
    their_images = list(images.to(device))
    pixels = torch.tensor([width, height, width, height], dtype=torch.float32)   # normalised xyxy -> pixels
    their_targets = [{"boxes": b * pixels, "labels": lab} for b, lab in zip(boxes, labels)]
    seconds = paired({"ours": lambda: ours.step(normalised, boxes, labels),
                      "theirs": lambda: theirs.step(their_images, their_targets)}, device, warmup, iters)
    return row("train_step" + (" +compile" if compile_ else ""), batch / seconds["ours"], batch / seconds["theirs"],
               "img/s", batch=batch)


# ------------------------------------------------------------------------------------------------ train_e2e

def make_e2e_data(root: Path, num_images: int, seed: int = 0) -> tuple[Path, Path]:
    """Synthetic COCO-like JPEGs (480-640 px) under ``root/loose`` and the same images packed under ``root/shards``."""
    from multibox.data.coco import CocoDetection
    from multibox.data.shards import convert_dataset
    from multibox.data.synth import generate_synthetic_coco

    ann = generate_synthetic_coco(root / "loose", num_images=num_images, seed=seed, min_side=480, max_side=640)
    convert_dataset(CocoDetection(ann), root / "shards", images_per_shard=256, check_images=False, workers=1)
    return ann, root / "shards"


def _reference_augmentation(arch: str) -> list:
    """torchvision's references/detection augmentation: ``data_augmentation="ssd"`` (photometric distortion,
    zoom-out, IoU crop, flip), or ``"ssdlite"`` (IoU crop and flip) for SSDLite, as its recipe trains."""
    from torchvision.transforms import v2

    photometric = [] if arch == "ssdlite320_mobilenet_v3" else \
        [v2.RandomPhotometricDistort(), v2.RandomZoomOut(fill=list(REFERENCE_MEAN))]
    return [*photometric, v2.RandomIoUCrop(), v2.RandomHorizontalFlip(p=0.5)]


def _reference_train_transform(arch: str = "ssd300_vgg16"):
    """torchvision's references/detection ``DetectionPresetTrain`` for ``arch`` (v2, PIL backend)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    return v2.Compose([
        *_reference_augmentation(arch), v2.ToImage(), v2.ToDtype(torch.float, scale=True),
        v2.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.XYXY), v2.SanitizeBoundingBoxes(), v2.ToPureTensor()])


def _reference_collate(batch):
    return tuple(zip(*batch))


def _loader_kwargs(workers: int) -> dict:
    return {"num_workers": workers, "pin_memory": torch.cuda.is_available(), "persistent_workers": False,
            **({"prefetch_factor": 4} if workers > 0 else {})}


def _run_loader(loader, step: Callable, device: torch.device, warmup: int, iters: int, batch: int) -> float:
    """Images/s of ``step`` over ``iters`` batches from ``loader`` after ``warmup`` batches (workers started)."""
    it = iter(loader)
    for _ in range(warmup):
        step(next(it))
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step(next(it))
    _sync(device)
    return iters * batch / (time.perf_counter() - start)


def bench_train_e2e(preset: str, device: torch.device, batch: int, amp: torch.dtype | None, iters: int,
                    workers: int, pipelines: list[str], num_images: int, arch: str = "ssd300_vgg16",
                    warmup: int = 2, workdir: str | None = None) -> list[dict]:
    """One row per multibox ``data.pipeline``, each against the same torchvision run."""
    from torch.utils.data import RandomSampler
    from torchvision.datasets import CocoDetection as TVCoco, wrap_dataset_for_transforms_v2

    from multibox.data.build import build_splits, make_loader
    from multibox.data.gpu_transforms import DeviceAugmentLoader, build_batch_augment

    needed = (warmup + iters) * batch
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        ann, shards = make_e2e_data(Path(tmp), num_images)
        rates = {}
        for pipeline in pipelines:
            cfg = paper_config(preset, arch, [f"data.path={shards}", f"data.val_path={shards}",
                                              f"data.pipeline={pipeline}", f"data.num_workers={workers}"])
            splits = build_splits(cfg)
            sampler = RandomSampler(splits.train, num_samples=needed, generator=torch.Generator().manual_seed(0))
            augment = build_batch_augment(cfg) if pipeline == "batched" else None
            loader = make_loader(splits.train, batch, shuffle=False, num_workers=workers, seed=0, sampler=sampler,
                                 drop_last=True, collate_fn=None if augment is None else augment.collate)
            if augment is not None:
                loader = DeviceAugmentLoader(loader, augment, device)
            ours = _OurTrainer(cfg, device, amp)

            def our_step(b, ours=ours):
                images, targets = b
                ours.step(images, [t["boxes"] for t in targets], [t["labels"] for t in targets])

            rates[pipeline] = _run_loader(loader, our_step, device, warmup, iters, batch)
            del ours, loader
        with contextlib.redirect_stdout(None):   # pycocotools' loading messages
            coco = TVCoco(str(Path(ann).parent / "images"), str(ann), transforms=_reference_train_transform(arch))
        dataset = wrap_dataset_for_transforms_v2(coco, target_keys=["boxes", "labels"])
        sampler = RandomSampler(dataset, num_samples=needed, generator=torch.Generator().manual_seed(0))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                                             collate_fn=_reference_collate, **_loader_kwargs(workers))
        theirs = _TheirTrainer(device, amp, arch)
        their_rate = _run_loader(loader, lambda b: theirs.step(list(b[0]), list(b[1])), device, warmup, iters, batch)
    for pipeline in pipelines:
        rows.append(row(f"train_e2e {pipeline} aug, {workers} workers", rates[pipeline], their_rate, "img/s",
                        batch=batch))
    return rows


# ------------------------------------------------------------------------------------------------ infer_e2e

def budget_hook(budget: int | None, activation: str, seed: int, num_anchors: int = SSD300_ANCHORS):
    """A forward hook replacing class logits by fixed ones: background wins everywhere except about ``budget``
    random (anchor, class) pairs per image, spread over the levels by their share of the ``num_anchors`` default
    boxes, which score high. Applied identically to both systems."""
    cache: dict[tuple, Tensor] = {}

    def hook(module, inputs, output):
        key = tuple(output.shape)
        if key not in cache:
            n, channels, h, w = output.shape
            k = channels // (NUM_CLASSES + 1)
            logits = torch.full((n, h, w, k, NUM_CLASSES + 1), -10.0 if activation == "sigmoid" else 0.0)
            logits[..., 0] = 10.0
            g = torch.Generator().manual_seed(seed + h)
            flat = logits.view(n, -1)
            per_level = max(1, budget * h * w * k // num_anchors)
            for i in range(n):
                cells = torch.randint(0, h * w * k, (per_level,), generator=g)
                classes = torch.randint(1, NUM_CLASSES + 1, (per_level,), generator=g)
                flat[i, cells * (NUM_CLASSES + 1) + classes] = 12.0
            cache[key] = logits.view(n, h, w, -1).permute(0, 3, 1, 2).to(output.device, output.dtype)
        return output * 0 + cache[key]

    return hook


def _detector(cfg: Config, device: torch.device, amp: torch.dtype | None, compile_: bool,
              state_dict: dict[str, Tensor] | None = None):
    """multibox's Detector as ``multibox predict`` builds it (NHWC, ``eval.precision``, ``eval.compile``), with
    ``state_dict``'s weights when given."""
    from multibox.inference.detector import Detector

    cfg.eval.precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    cfg.eval.compile = compile_
    model = build_model(cfg)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return Detector(model, cfg, ["background"] + [f"c{i}" for i in range(1, NUM_CLASSES + 1)], device)


def _class_heads(detector) -> list[nn.Module]:
    model = getattr(detector.model, "_orig_mod", detector.model)
    return model.class_layers()


def _paired_detectors(preset: str, device: torch.device, amp: torch.dtype | None, budget: int | None, arch: str,
                      compile_: bool):
    """(multibox's Detector, torchvision's model) on the same weights where ``arch`` has a twin, with the budget
    hook on both systems' class heads when ``budget`` is given."""
    theirs = torchvision_ssd(device, arch).eval()
    detector = _detector(paper_config(preset, arch), device, amp, compile_, twin_weights(arch, theirs))
    if budget is not None:
        activation = detector.postprocess.score_activation
        ours_anchors = len(detector.model.anchors_cxcywh)
        # A twin has our default boxes; every other reference is ssd300_vgg16 (tiny: SSD300's layout), 8732.
        their_anchors = ours_anchors if arch in TORCHVISION_TWINS else SSD300_ANCHORS
        for head in _class_heads(detector):
            head.register_forward_hook(budget_hook(budget, activation, 0, ours_anchors))
        for head in theirs.head.classification_head.module_list:
            last = head[-1] if isinstance(head, nn.Sequential) else head
            last.register_forward_hook(budget_hook(budget, "softmax", 0, their_anchors))
    return detector, theirs


def _infer_row(name: str, batch: int, seconds: dict[str, float]) -> dict:
    ours_s, their_s = seconds["ours"], seconds["theirs"]
    extra = {"latency_ms": round(1000 * ours_s, 2), "reference_latency_ms": round(1000 * their_s, 2)} \
        if batch == 1 else {}
    return row(name, batch / ours_s, batch / their_s, "img/s", batch=batch, **extra)


def bench_infer(preset: str, device: torch.device, batch: int, amp: torch.dtype | None, iters: int,
                budget: int | None, arch: str = "ssd300_vgg16", compile_: bool = False, warmup: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    images = [(torch.rand(3, *INFER_HW, generator=g) * 255).to(torch.uint8) for _ in range(batch)]
    detector, theirs = _paired_detectors(preset, device, amp, budget, arch, compile_)

    def ours():
        detector.predict(images, batch_size=batch)

    @torch.no_grad()
    def their():
        with autocast(device, amp):
            out = theirs([img.to(device, non_blocking=True).float() / 255.0 for img in images])
        return [{k: v.cpu() for k, v in d.items()} for d in out]   # as predict() returns them

    name = f"infer_e2e b{batch} " + ("worst" if budget is None else f"{budget} boxes/img") \
        + (" +compile" if compile_ else "")
    return _infer_row(name, batch, paired({"ours": ours, "theirs": their}, device, warmup, iters))


def bench_infer_jpeg(preset: str, device: torch.device, batch: int, amp: torch.dtype | None, iters: int,
                     budget: int, arch: str = "ssd300_vgg16", compile_: bool = False, warmup: int = 1,
                     workdir: str | None = None) -> dict:
    """``infer_jpeg``: from JPEG files on disk (640 x 480) to detections, decoding included: multibox's
    ``predict(paths)``; torchvision reads and decodes each file with ``torchvision.io`` and runs its model."""
    from torchvision.io import decode_jpeg, encode_jpeg, read_file

    detector, theirs = _paired_detectors(preset, device, amp, budget, arch, compile_)
    g = torch.Generator().manual_seed(2)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        paths = []
        for i in range(batch):
            path = Path(tmp) / f"{i}.jpg"
            path.write_bytes(encode_jpeg((torch.rand(3, *INFER_HW, generator=g) * 255).to(torch.uint8),
                                         quality=90).numpy().tobytes())
            paths.append(str(path))

        def ours():
            detector.predict(paths, batch_size=batch)

        @torch.no_grad()
        def their():
            images = [decode_jpeg(read_file(p)).to(device, non_blocking=True).float() / 255.0 for p in paths]
            with autocast(device, amp):
                out = theirs(images)
            return [{k: v.cpu() for k, v in d.items()} for d in out]

        seconds = paired({"ours": ours, "theirs": their}, device, warmup, iters)
    return _infer_row(f"infer_jpeg b{batch} {budget} boxes/img" + (" +compile" if compile_ else ""), batch, seconds)


# ------------------------------------------------------------------------------------------------ augment

def _augment_samples(num_images: int) -> list[tuple[Tensor, dict]]:
    """Decoded COCO-like samples (375 x 500 uint8, 1-6 boxes): what a worker holds before augmenting."""
    _, boxes, labels = random_batch(num_images, 1, 6, seed=2)
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([500, 375, 500, 375])
    return [((torch.rand(3, 375, 500, generator=g) * 255).to(torch.uint8),
             {"boxes": b * scale, "labels": lab, "image_id": i, "orig_size": (375, 500)})
            for i, (b, lab) in enumerate(zip(boxes, labels))]


def bench_augment(preset: str, num_images: int, device: torch.device, iters: int = 3,
                  arch: str = "ssd300_vgg16") -> list[dict]:
    """Per-worker augmentation throughput on one thread, and the batched augmentation on ``device``, both against
    torchvision's reference SSD transforms on one thread (plus the resize to S that its model does on the device)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from multibox.data.gpu_transforms import build_batch_augment
    from multibox.data.transforms import build_train_transform

    cfg = paper_config(preset)
    samples = _augment_samples(num_images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = build_train_transform(cfg, seed=0)

        def run_ours():
            for img, target in samples:
                ours(img, target)

        reference = v2.Compose([
            *_reference_augmentation(arch), v2.Resize(list(as_hw(cfg.model.image_size))), v2.SanitizeBoundingBoxes(),
            v2.ToDtype(torch.float, scale=True)])
        their_samples = [(tv_tensors.Image(img), {"boxes": tv_tensors.BoundingBoxes(t["boxes"], format="XYXY",
                                                                                    canvas_size=(375, 500)),
                                                  "labels": t["labels"]}) for img, t in samples]

        def run_theirs():
            for img, target in their_samples:
                reference(img, target)

        seconds = paired({"ours": run_ours, "theirs": run_theirs}, torch.device("cpu"), 1, iters)
        ours_rate, their_rate = num_images / seconds["ours"], num_images / seconds["theirs"]
    finally:
        torch.set_num_threads(threads)
    rows = [row("augment cpu (1 thread)", ours_rate, their_rate, "img/s")]

    batched = build_batch_augment(cfg, seed=0)
    images, targets = [s[0] for s in samples], [s[1] for s in samples]
    if device.type == "cuda":   # the device half alone: the workers' half is per image and runs in parallel
        prepared = batched.prepare(images, targets).pin_memory()
        rate = num_images / timed(lambda: batched.warp(prepared, device), device, 2, iters)
        rows.append(row(f"augment batched, {device.type} warp+colour", rate, their_rate, "img/s"))
    else:
        torch.set_num_threads(1)
        try:
            rate = num_images / timed(lambda: batched(images, targets), device, 1, iters)
        finally:
            torch.set_num_threads(threads)
        rows.append(row("augment batched cpu (1 thread)", rate, their_rate, "img/s"))
    return rows


# ------------------------------------------------------------------------------------------------ eval, data

def bench_eval(num_images: int, dets_per_image: int) -> dict:
    """Seconds to evaluate a fixed prediction set with faster-coco-eval (ours) and pycocotools (reference)."""
    from multibox.evaluation.coco import evaluate_coco

    g = torch.Generator().manual_seed(4)
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(num_images)]
    annotations, detections = [], []
    for i in range(num_images):
        for j in range(7):
            x, y = (torch.rand(2, generator=g) * 400).tolist()
            w, h = (10 + torch.rand(2, generator=g) * 200).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 1 + (i + j) % 80,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        for j in range(dets_per_image):
            x, y = (torch.rand(2, generator=g) * 400).tolist()
            w, h = (10 + torch.rand(2, generator=g) * 200).tolist()
            detections.append({"image_id": i, "category_id": 1 + int(torch.randint(0, 80, (1,), generator=g)),
                               "bbox": [x, y, w, h], "score": float(torch.rand(1, generator=g))})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}
    seconds = {}
    for backend in ("faster", "pycocotools"):
        start = time.perf_counter()
        with contextlib.redirect_stdout(None):
            evaluate_coco(gt, detections, backend=backend, verbose=False)
        seconds[backend] = time.perf_counter() - start
    return row(f"eval {num_images} img, {num_images * dets_per_image} dets", seconds["faster"],
               seconds["pycocotools"], "s", lower_is_better=True)


def bench_data_row(num_images: int, workdir: str | None = None) -> dict:
    from multibox.bench.data import bench_data

    out = bench_data(num_images=num_images, images_per_shard=max(8, num_images // 4), workdir=workdir)
    return row(f"data shards vs loose files, {out['images']} img", out["shards_decoded_per_s"],
               out["loose_decoded_per_s"], "smp/s", fetch_speedup=out["fetch_speedup"],
               mean_jpeg_kib=out["mean_jpeg_kib"])


# ------------------------------------------------------------------------------------------------ profile

def profile_ours(preset: str, device: torch.device, batch: int, amp: torch.dtype | None, arch: str,
                 infer_batch: int, top: int = 15) -> dict[str, str]:
    """torch.profiler tables (top operators by self time) of multibox's training step and worst-case inference."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    cfg = paper_config(preset, arch)
    images, boxes, labels = random_batch(batch, cfg.model.image_size, 8, seed=0)
    trainer = _OurTrainer(cfg, device, amp)
    images = images.to(device)
    trainer.step(images, boxes, labels)
    _sync(device)
    tables = {}
    with profile(activities=activities) as prof:
        trainer.step(images, boxes, labels)
        _sync(device)
    tables["train_step"] = prof.key_averages().table(sort_by=sort, row_limit=top)
    del trainer
    detector = _detector(cfg, device, amp, False)
    g = torch.Generator().manual_seed(1)
    inputs = [(torch.rand(3, *INFER_HW, generator=g) * 255).to(torch.uint8) for _ in range(infer_batch)]
    detector.predict(inputs, batch_size=infer_batch)
    _sync(device)
    with profile(activities=activities) as prof:
        detector.predict(inputs, batch_size=infer_batch)
        _sync(device)
    tables["infer_e2e worst"] = prof.key_averages().table(sort_by=sort, row_limit=top)
    return tables


# ------------------------------------------------------------------------------------------------ table, run

def row(name: str, ours: float, theirs: float, unit: str, lower_is_better: bool = False, **extra) -> dict:
    ratio = theirs / ours if lower_is_better else ours / theirs
    # 4 significant digits: toy sizes in the tests give sub-millisecond numbers that 3 decimals would zero
    return {"name": name, "multibox": float(f"{ours:.4g}"), "reference": float(f"{theirs:.4g}"), "unit": unit,
            "ratio": round(ratio, 2), **extra}


def _label(r: dict) -> str:
    return r["name"] + (f" [{r['precision']}]" if "precision" in r else "")


def _notes(r: dict) -> str:
    return f"latency {r['latency_ms']:.1f} ms vs {r['reference_latency_ms']:.1f} ms" if "latency_ms" in r else ""


def format_table(rows: list[dict], title: str) -> str:
    lines = [title, f"{'benchmark':48s} {'multibox':>10s} {'reference':>10s} {'unit':>6s} {'ratio':>7s}  notes"]
    for r in rows:
        lines.append(f"{_label(r):48s} {r['multibox']:10.3f} {r['reference']:10.3f} {r['unit']:>6s} "
                     f"{r['ratio']:6.2f}x  " + _notes(r))
    return "\n".join(lines)


def format_line(r: dict) -> str:
    """One row as the log line that ``multibox bench`` shows the moment the row is measured."""
    notes = _notes(r)
    return (f"{_label(r)}: multibox {r['multibox']:.4g} {r['unit']}, reference {r['reference']:.4g} {r['unit']}, "
            f"ratio {r['ratio']:.2f}x" + (f" ({notes})" if notes else ""))


@dataclass
class BenchOptions:
    """What ``multibox bench`` measures and how (its options, one field each); None: the default of the device,
    filled in by :meth:`resolved`. ``precision`` and ``only`` are comma-separated lists, as on the command line."""

    device: str | None = None              # default: cuda when there is one (and no backends), else cpu
    preset: str | None = None              # default: the arch's own preset (tiny: ssd300-vgg16's settings)
    arch: str = "ssd300_vgg16"             # tiny or any preset's model.arch
    precision: str | None = None           # cuda: bf16,fp32; cpu: fp32
    train_batch: int | None = None         # cuda 64, cpu 4
    infer_batches: list[int] | None = None   # cuda [1, 64], cpu [1, 8]
    budget: int = 100
    iters: int | None = None               # cuda 20, cpu 3
    warmup: int | None = None              # cuda 3, cpu 1
    workers: int | None = None             # cuda: cores - 2, at most 12; cpu: 0
    pipelines: list[str] | None = None     # cuda [cpu, batched], cpu [cpu]
    e2e_images: int | None = None          # cuda 512, cpu max(8, 2 * train_batch)
    augment_images: int = 64
    eval_images: int = 500
    eval_dets: int = 100
    data_images: int = 200
    compile: bool = False
    profile: bool = False
    threads: int | None = None             # cpu 1 (README's table), cuda 0; 0: torch's default
    only: str | None = None                # default: every line of LINES (none with backends)
    workdir: str | None = None
    backends: str | None = None            # comma-separated BACKENDS: the table of multibox.bench.backends
    checkpoint: str | None = None          # backends: the weights (default: random, the arch's twin's)
    data: str | None = None                # backends: AP on its evaluation split (needs checkpoint)

    def resolved(self) -> "BenchOptions":
        """A copy with the device's defaults in place of the None fields; :class:`InputError` on unknown precisions
        or lines."""
        # --backends is a CPU table: the CPU unless told otherwise
        device = self.device or ("cuda" if torch.cuda.is_available() and not self.backends else "cpu")
        cuda = device.startswith("cuda")
        precision = self.precision or ("bf16,fp32" if cuda else "fp32")
        unknown = set(precision.split(",")) - set(PRECISIONS)
        if unknown:
            raise InputError(f"unknown --precision {sorted(unknown)}; choose from {', '.join(PRECISIONS)}")
        unknown = set(self.only.split(",")) - set(LINES) if self.only else set()
        if unknown:
            raise InputError(f"unknown --only lines {sorted(unknown)}; choose from {', '.join(LINES)}")
        unknown = [b for b in self.backends.split(",") if b not in BACKENDS] if self.backends is not None else []
        if unknown or self.backends == "":
            raise InputError(f"unknown --backends {unknown}; choose from {', '.join(BACKENDS)}")
        if (self.checkpoint or self.data) and not self.backends:
            raise InputError("--checkpoint and --data belong to --backends")
        if self.data and not self.checkpoint:
            raise InputError("--data measures AP, which needs a trained --checkpoint")
        train_batch = self.train_batch or (64 if cuda else 4)
        return replace(
            self, device=device, precision=precision, train_batch=train_batch,
            preset=self.preset or arch_preset(self.arch),
            infer_batches=self.infer_batches or ([1, 64] if cuda else [1, 8]),
            iters=self.iters or (20 if cuda else 3),
            warmup=self.warmup if self.warmup is not None else (3 if cuda else 1),
            workers=self.workers if self.workers is not None else
            (max(1, min(12, (os.cpu_count() or 1) - 2)) if cuda else 0),
            pipelines=self.pipelines or (["cpu", "batched"] if cuda else ["cpu"]),
            e2e_images=self.e2e_images or (512 if cuda else max(8, 2 * train_batch)),
            threads=self.threads if self.threads is not None else (0 if cuda else 1))


def arch_preset(arch: str) -> str:
    """The preset whose ``model.arch`` is ``arch`` (tiny: ssd300-vgg16, whose trunk it swaps); InputError if none."""
    if arch == "tiny":
        return "ssd300-vgg16"
    preset = arch.replace("_", "-")
    if preset not in preset_names():
        raise InputError(f"unknown --arch {arch}; choose tiny or one of "
                         f"{', '.join(p.replace('-', '_') for p in preset_names() if p != 'tiny')}")
    return preset


def run(options: BenchOptions) -> list[dict]:
    """The rows of every line that ``options`` asks for, each logged (:func:`format_line`) as soon as it is
    measured."""
    o = options.resolved()
    device = torch.device(o.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # fixed shapes, both systems alike
    rows: list[dict] = []

    def measured(*new: dict, **extra) -> None:
        for r in new:
            rows.append({**r, **extra})
            logger.info(format_line(rows[-1]))

    only = set(o.only.split(",")) if o.only else (set() if o.backends else set(LINES))
    for precision in o.precision.split(","):
        amp = PRECISIONS[precision]
        if "train_step" in only:
            measured(bench_train_step(o.preset, device, o.train_batch, amp, o.iters, o.arch, o.compile, o.warmup),
                     precision=precision)
        if "train_e2e" in only:
            measured(*bench_train_e2e(o.preset, device, o.train_batch, amp, o.iters, o.workers, o.pipelines,
                                      o.e2e_images, o.arch, o.warmup, o.workdir), precision=precision)
        if "infer_e2e" in only:
            for batch in o.infer_batches:
                for budget in (None, o.budget):
                    measured(bench_infer(o.preset, device, batch, amp, o.iters, budget, o.arch, o.compile,
                                         o.warmup), precision=precision)
        if "infer_jpeg" in only:
            for batch in o.infer_batches:
                measured(bench_infer_jpeg(o.preset, device, batch, amp, o.iters, o.budget, o.arch, o.compile,
                                          o.warmup, o.workdir), precision=precision)
    if "augment" in only:
        measured(*bench_augment(o.preset, o.augment_images, device, max(1, o.iters), o.arch))
    if "eval" in only:
        measured(bench_eval(o.eval_images, o.eval_dets))
    if "data" in only:
        measured(bench_data_row(o.data_images, o.workdir))
    return rows


def bench_report(options: BenchOptions) -> dict:
    """Run the bench: ``device``, ``threads`` (torch's CPU threads during the run), ``title`` (for
    :func:`format_table`, naming both), ``torch`` and ``torchvision`` versions, ``args`` (the resolved options),
    ``rows`` and, with ``options.profile``, ``profile`` (operator tables by part); ``options.backends`` is
    :func:`multibox.bench.backends.backends_report`'s (which uses this module's helpers).

    ``options.threads`` sets torch's CPU threads for the run; the process's setting is restored afterwards."""
    import torchvision

    options = options.resolved()
    device = torch.device(options.device)
    before = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        threads = torch.get_num_threads()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        title = f"multibox bench on {name}, {threads} thread{'' if threads == 1 else 's'} (torch " \
                f"{torch.__version__}, torchvision {torchvision.__version__}, arch {options.arch} against " \
                f"torchvision's {reference_name(options.arch)})"
        only = options.only.split(",") if options.only else ([] if options.backends else LINES)
        logger.info("%s: measuring %s", title, ", ".join([line for line in LINES if line in only]
                                                         + ([f"backends {options.backends}"] if options.backends
                                                            else [])))
        report = {"device": name, "threads": threads, "title": title, "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "args": asdict(options), "rows": run(options)}
        if options.profile:
            amp = PRECISIONS[options.precision.split(",")[0]]   # the first precision benchmarked
            report["profile"] = profile_ours(options.preset, device, options.train_batch, amp, options.arch,
                                             options.infer_batches[-1])
    finally:
        torch.set_num_threads(before)
    return report
