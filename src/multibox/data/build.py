"""From ``data.*`` config keys to datasets and loaders: resolve the source, hold out a split, attach transforms.

``data.path`` / ``data.val_path`` accept:

* a COCO instances JSON (images next to it, under ``images/`` or under ``data.image_root``);
* a Pascal VOC folder (``VOCdevkit/VOC2007``-style): trains on ``data.voc_split``; without ``val_path`` evaluates
  ``data.val_split`` when that split exists, else a held-out part of the training split;
* a packed-shard folder (``manifest.json``, made by ``multibox convert``);
* ``synth``: the built-in demo data (generated on first use).

Every source is a :class:`~multibox.data.coco.DetectionDataset`; evaluation scores against its ``coco_gt()``.
"""
from __future__ import annotations

import logging
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from multibox.config import Config
from multibox.data.coco import CocoDetection, DetectionDataset, collate_detection
from multibox.data.policy import MAX_EXAMPLES, has_training_box
from multibox.data.transforms import build_eval_transform, build_train_transform
from multibox.errors import InputError

log = logging.getLogger("multibox.data")


class SampleIndex(int):
    """A dataset index that also carries the ``epoch`` and ``seed`` it was drawn for (an ``int`` everywhere else).

    :class:`EpochShuffleSampler` (``keyed=True``) yields these; :class:`TransformedSubset` then calls a transform
    that accepts keys (``transform.keyed``) with ``key=(seed, epoch, index)``, so the random augmentation of a
    sample is a pure function of those three numbers: not of the worker that loads it, nor of what ran before.
    """

    epoch: int
    seed: int

    def __new__(cls, index: int, epoch: int, seed: int):
        self = super().__new__(cls, index)
        self.epoch, self.seed = int(epoch), int(seed)
        return self

    def __reduce__(self):   # DataLoader workers receive the indices pickled
        return (SampleIndex, (int(self), self.epoch, self.seed))

    def __repr__(self) -> str:
        return f"SampleIndex({int(self)}, epoch={self.epoch}, seed={self.seed})"


class TransformedSubset(Dataset):
    """``dataset[indices[i]]`` passed through ``transform`` (``None``, an unreadable image, passes through).

    With a :class:`SampleIndex` ``i`` and a keyed transform, the transform gets ``key=(seed, epoch, i)``.
    """

    def __init__(self, dataset: DetectionDataset, indices: Sequence[int], transform: Callable):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        sample = self.dataset[self.indices[i]]
        if sample is None:
            return None
        if isinstance(i, SampleIndex) and getattr(self.transform, "keyed", False):
            return self.transform(*sample, key=(i.seed, i.epoch, int(i)))
        return self.transform(*sample)


@dataclass
class DataSplits:
    """The training and evaluation sets, and what evaluation needs to score the latter against its ground truth."""

    train: Dataset
    val: Dataset
    class_names: list[str]                 # index 0 = "background"
    label_to_category_id: dict[int, int]
    val_gt: Any                            # COCO dict (or JSON path) of the evaluation set's ground truth
    val_image_ids: list[int]
    val_source_kind: str = "coco"          # "voc": VOC07 / VOC area mAP apply (multibox.evaluation.voc.evaluate_voc)
    # {"train": counts} of the training source, plus "val" when evaluation reads another source
    load_report: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def category_ids(self) -> list[int]:
        """The category id of each label 1..C (``category_ids[label - 1]``), as checkpoints store it."""
        return [self.label_to_category_id[label] for label in range(1, len(self.class_names))]


def source_kind(path: str) -> str:
    """``"synth"``, ``"shards"``, ``"voc"`` or ``"coco"`` for a ``data.path`` value (FileNotFoundError if none)."""
    from multibox.data.shards import is_shard_dir
    from multibox.data.voc import is_voc_root

    if path == "synth":
        return "synth"
    p = Path(path)
    if is_shard_dir(p):
        return "shards"
    if p.is_dir() and is_voc_root(p):
        return "voc"
    if p.is_file():
        return "coco"
    raise FileNotFoundError(f"data source {path!r}: not a COCO JSON file, a VOC folder (Annotations/, JPEGImages/, "
                            "ImageSets/Main/), a packed-shard folder (manifest.json) or 'synth'")


def open_dataset(path: str, cfg: Config, split: str | None = None) -> DetectionDataset:
    """The dataset at ``path`` (no transform), every image of it: ``data.keep_empty`` filters the training split
    only (:func:`build_splits`); ``split`` picks a VOC split (default ``data.voc_split``)."""
    kind = source_kind(path)
    dataset: DetectionDataset
    if kind == "shards":
        from multibox.data.shards import ShardDataset
        dataset = ShardDataset(path, verify=cfg.data.shard_verify, keep_crowd=cfg.data.keep_difficult)
    elif kind == "voc":
        from multibox.data.voc import VOCDetection
        dataset = VOCDetection(path, split=split or cfg.data.voc_split, keep_difficult=cfg.data.keep_difficult)
    elif kind == "coco":
        dataset = CocoDetection(path, image_root=cfg.data.image_root)
    else:
        raise ValueError("'synth' is resolved by resolve_sources")
    dataset.max_image_pixels = int(cfg.data.max_image_pixels)   # larger images are refused before decoding
    return dataset


def resolve_sources(cfg: Config) -> tuple[str, str | None]:
    """The training and (optional) validation sources; ``synth`` generates the demo dataset once."""
    if cfg.data.path == "synth":
        from multibox.data.synth import generate_demo_splits
        root = Path(cfg.data.synth_root)
        generate_demo_splits(root, cfg.data.synth_train_images, cfg.data.synth_val_images, seed=cfg.train.seed)
        return str(root / "train" / "annotations.json"), cfg.data.val_path or str(root / "val" / "annotations.json")
    return cfg.data.path, cfg.data.val_path


def held_out_split(num_images: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index lists; val gets ``fraction`` of the images, at least one."""
    indices = list(range(num_images))
    random.Random(seed).shuffle(indices)
    num_val = max(1, round(num_images * fraction))
    return sorted(indices[num_val:]), sorted(indices[:num_val])


def _voc_val_split_exists(path: str, split: str | None) -> bool:
    from multibox.data.voc import find_voc_root
    root = find_voc_root(path)
    return bool(split) and root is not None and (root / "ImageSets" / "Main" / f"{split}.txt").is_file()


def train_sample_transform(cfg: Config) -> Callable:
    """The training set's per-sample transform: the whole augmentation (``data.pipeline: cpu``), or only drawing its
    parameters, the image staying decoded uint8 (``batched``: the batch is augmented on the training device, see
    :mod:`multibox.data.gpu_transforms`)."""
    from multibox.data.gpu_transforms import PIPELINES, build_sample_params

    if cfg.data.pipeline not in PIPELINES:
        raise ValueError(f"unknown data.pipeline {cfg.data.pipeline!r}; choose one of {PIPELINES}")
    return build_train_transform(cfg) if cfg.data.pipeline == "cpu" else build_sample_params(cfg)


def build_splits(cfg: Config, train_transform: Callable | None = None) -> DataSplits:
    """The training and evaluation sets of ``cfg.data``, refused (:class:`~multibox.errors.InputError`, one line)
    when either has no usable image; what loading dropped or will change is logged once per source file.

    ``data.keep_empty: false`` leaves the images without a box out of the training split only: the evaluation split
    keeps every image (its false positives on empty images count), and a held-out split is drawn from all images,
    so the same images are evaluated whatever ``keep_empty`` is."""
    train_src, val_src = resolve_sources(cfg)
    train_full = open_dataset(train_src, cfg)
    if train_transform is None:
        train_transform = train_sample_transform(cfg)
    eval_transform = build_eval_transform(cfg)
    val_full = _open_eval_source(cfg, train_src, val_src, train_full)
    if val_full is not None:
        if val_full.class_names != train_full.class_names:
            raise ValueError(f"{val_src}: categories {val_full.class_names[1:]} differ from {train_src}'s "
                             f"{train_full.class_names[1:]}")
        train_idx, val_idx = list(range(len(train_full))), list(range(len(val_full)))
    else:
        val_full = train_full
        train_idx, val_idx = held_out_split(len(train_full), cfg.data.val_fraction, cfg.train.seed)
    if not cfg.data.keep_empty:
        train_idx = _without_empty_images(train_full, train_idx)
    _require_images(cfg, train_full, train_idx, val_full, val_idx)
    return DataSplits(
        train=TransformedSubset(train_full, train_idx, train_transform),
        val=TransformedSubset(val_full, val_idx, eval_transform),
        class_names=train_full.class_names,
        label_to_category_id=train_full.label_to_category_id,
        val_gt=val_full.coco_gt(),
        val_image_ids=[val_full.image_ids[i] for i in val_idx],
        val_source_kind=val_full.source_kind,
        load_report=_log_load_reports(train_full, val_full),
    )


def _without_empty_images(dataset: DetectionDataset, indices: list[int]) -> list[int]:
    """``indices`` less the images without a training box (``data.keep_empty: false``), counted in the source's
    load report."""
    usable = [has_training_box(dataset.records[i], dataset.keep_crowd) for i in indices]
    dataset.load_report.note("empty_images_dropped", [dataset.image_ids[i] for i, u in zip(indices, usable) if not u])
    return [i for i, u in zip(indices, usable) if u]


def _open_eval_source(cfg: Config, train_src: str, val_src: str | None, train_full: DetectionDataset
                      ) -> DetectionDataset | None:
    """The evaluation dataset when it is not a held-out part of the training source (None then)."""
    if val_src is not None:
        return train_full if val_src == train_src else open_dataset(val_src, cfg)
    if source_kind(train_src) == "voc" and _voc_val_split_exists(train_src, cfg.data.val_split) \
            and cfg.data.val_split != cfg.data.voc_split:
        from multibox.data.voc import VOCDetection
        val_full = VOCDetection(train_src, split=cfg.data.val_split, class_names=train_full.class_names[1:],
                                keep_difficult=cfg.data.keep_difficult)
        val_full.max_image_pixels = int(cfg.data.max_image_pixels)
        return val_full
    return None


def _log_load_reports(train_full: DetectionDataset, val_full: DetectionDataset) -> dict[str, dict[str, int]]:
    """One ``data policy (SOURCE): ...`` line per source file; returns the counts, ``{"train": {...}}`` plus
    ``"val"`` when evaluation reads another source (a held-out split is counted with its source, once)."""
    sources = {"train": train_full} if val_full is train_full else {"train": train_full, "val": val_full}
    for dataset in sources.values():
        phrases = dataset.load_report.describe()
        if phrases:
            log.info("data policy (%s): %s", dataset.source_name, ", ".join(phrases))
    return {name: {k: int(v) for k, v in sorted(ds.load_report.items()) if v} for name, ds in sources.items()}


def _require_images(cfg: Config, train_full: DetectionDataset, train_idx: list[int], val_full: DetectionDataset,
                    val_idx: list[int]) -> None:
    """Refuse a split without images, or whose every image file is missing (one line: how many, a few names, where
    they were looked for); a source missing only some gets one summary warning and no line per image."""
    for role, dataset, indices in (("training", train_full, train_idx), ("evaluation", val_full, val_idx)):
        if not indices:
            raise InputError(f"{dataset.source_name}: no images for {role}: {_why_empty(cfg, dataset, role)}")
    sources = {id(d): d for d in (train_full, val_full)}   # a held-out split: one source, looked at once
    missing = {key: set(d.missing_images(range(len(d)))) for key, d in sources.items()}
    for role, dataset, indices in (("training", train_full, train_idx), ("evaluation", val_full, val_idx)):
        gone = missing[id(dataset)]
        if gone.issuperset(indices):
            raise InputError(f"{dataset.source_name}: none of the {len(indices)} {role} images was found "
                             f"({_examples(dataset, sorted(indices))}; looked under {dataset.image_locations()})"
                             + ("; point data.image_root at the folder that holds them (--set data.image_root=DIR)"
                                if isinstance(dataset, CocoDetection) else ""))
    for key, dataset in sources.items():
        gone = sorted(missing[key])
        if gone:
            log.warning("%s: %d of its %d images not found (%s; looked under %s): skipped in training and "
                        "evaluation; `multibox check-data %s` lists every problem", dataset.source_name, len(gone),
                        len(dataset), _examples(dataset, gone), dataset.image_locations(), dataset.source_name)
            dataset.mark_reported(gone)


def _why_empty(cfg: Config, dataset: DetectionDataset, role: str) -> str:
    report = dataset.load_report
    dropped = report.get("empty_images_dropped", 0)
    if role == "training" and dropped:   # only the training split drops them (build_splits)
        which = "images" if dropped == len(dataset) else "training images"
        return f"all {dropped} of its {which} have no usable box and data.keep_empty is false"
    if len(dataset) and role == "training":   # a held-out split took every image
        return (f"all {len(dataset)} of its images went to the held-out evaluation split (data.val_fraction = "
                f"{cfg.data.val_fraction:g}, at least one image); add images, lower data.val_fraction or give a "
                "separate evaluation set (--val-data)")
    if report.get("skipped_at_conversion"):
        return (f"all {report['skipped_at_conversion']} of its images were unreadable when it was converted "
                "(its manifest.json lists them)")
    return "the source lists none"


def _examples(dataset: DetectionDataset, indices: list[int]) -> str:
    names = [repr(dataset.records[i].file_name) for i in indices[:MAX_EXAMPLES]]
    return "e.g. " + ", ".join(names) + (", ..." if len(indices) > len(names) else "")


class EpochShuffleSampler(Sampler[int]):
    """Training order for one of ``world_size`` ranks (a ``DistributedSampler`` whose order is independent of
    the world size).

    Epoch ``e`` draws one permutation of the dataset from a generator seeded with ``seed + e`` (the same
    permutation a ``DataLoader(shuffle=True)`` reseeded that way draws, so single-process runs keep their
    order); the tail that does not divide by ``world_size`` is dropped and rank ``r`` takes ``perm[r::world_size]``.
    With per-rank batch B, global batch s is then ``perm[s*B*W : (s+1)*B*W]`` for every world size W: N ranks
    with batch B/N see exactly the batches of one process with batch B (training gives each rank
    ``train.batch_size / N``: the global batch is the setting). Call :meth:`set_epoch` every epoch.

    ``keyed=True`` yields :class:`SampleIndex` (the index with its epoch and seed: per-sample augmentation
    seeds). ``set_epoch(e, start=k)`` skips this rank's first ``k`` samples of epoch ``e`` (a run resumed in
    the middle of an epoch: ``k`` = batches done x per-rank batch size); the next ``set_epoch`` resets it.
    """

    def __init__(self, num_samples: int, world_size: int = 1, rank: int = 0, seed: int = 0, keyed: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_samples, self.world_size, self.rank, self.seed, self.epoch = num_samples, world_size, rank, seed, 0
        self.keyed, self.start = bool(keyed), 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples // self.world_size:
            raise ValueError(f"cannot start epoch {epoch} at sample {start} of {self.num_samples // self.world_size}")
        self.epoch, self.start = int(epoch), int(start)

    def permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=g)   # the DataLoader's worker-seed draw comes first
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self):
        perm = self.permutation()
        usable = self.num_samples - self.num_samples % self.world_size
        mine = perm[:usable][self.rank::self.world_size][self.start:]
        if self.keyed:
            return iter([SampleIndex(i, self.epoch, self.seed) for i in mine])
        return iter(mine)

    def __len__(self) -> int:
        return self.num_samples // self.world_size - self.start


def _init_worker(worker_id: int) -> None:
    """A loader worker: Python's RNG seeded from torch's per-worker seed; SIGINT ignored, because a terminal's
    Ctrl-C reaches the whole process group and the training process, which saves and stops on it
    (:mod:`multibox.engine.interrupt`), still needs its workers until the batch in progress is done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                drop_last: bool = False, sampler=None, collate_fn: Callable | None = None) -> DataLoader:
    """``collate_fn`` defaults to :func:`collate_detection` (``data.pipeline: batched``: ``BatchAugment.collate``)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate_fn or collate_detection, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      worker_init_fn=_init_worker, generator=generator)
