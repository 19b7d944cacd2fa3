"""From ``data.*`` config keys to datasets and loaders: resolve the source, hold out a split, attach transforms."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Config
from .coco import CocoDetection, collate_detection
from .transforms import EvalTransform, TrainTransform


class TransformedSubset(Dataset):
    """``dataset[indices[i]]`` passed through ``transform``."""

    def __init__(self, dataset: CocoDetection, indices: Sequence[int], transform: Callable):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, target = self.dataset[self.indices[i]]
        return self.transform(image, target)


@dataclass
class DataSplits:
    """The training and evaluation sets, and what evaluation needs to score the latter against its ground truth."""

    train: Dataset
    val: Dataset
    class_names: list[str]                 # index 0 = "background"
    label_to_category_id: dict[int, int]
    val_gt: Any                            # COCO JSON path (or dict) of the evaluation set's ground truth
    val_image_ids: list[int]


def resolve_sources(cfg: Config) -> tuple[str, str | None]:
    """The training and (optional) validation annotation files; ``synth`` generates the demo dataset once."""
    if cfg.data.path == "synth":
        from .synth import generate_demo_splits
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


def build_splits(cfg: Config, train_transform: Callable | None = None) -> DataSplits:
    train_src, val_src = resolve_sources(cfg)
    train_full = CocoDetection(train_src, image_root=cfg.data.image_root)
    size, mean, std = cfg.model.image_size, cfg.data.mean, cfg.data.std
    if train_transform is None:
        crop_rule = None if cfg.data.crop_rule == "none" else cfg.data.crop_rule
        train_transform = TrainTransform(size=size, mean=mean, std=std, crop_rule=crop_rule,
                                         flip_p=cfg.data.flip_p, jitter=tuple(cfg.data.jitter))
    eval_transform = EvalTransform(size=size, mean=mean, std=std)
    if val_src is not None:
        val_full = CocoDetection(val_src, image_root=cfg.data.image_root)
        if val_full.class_names != train_full.class_names:
            raise ValueError(f"{val_src}: categories differ from {train_src}")
        train_idx, val_idx = list(range(len(train_full))), list(range(len(val_full)))
        val_gt = val_src
    else:
        val_full = train_full
        train_idx, val_idx = held_out_split(len(train_full), cfg.data.val_fraction, cfg.train.seed)
        val_gt = train_src
    return DataSplits(
        train=TransformedSubset(train_full, train_idx, train_transform),
        val=TransformedSubset(val_full, val_idx, eval_transform),
        class_names=train_full.class_names,
        label_to_category_id=train_full.label_to_category_id,
        val_gt=val_gt,
        val_image_ids=[val_full.image_ids[i] for i in val_idx],
    )


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                drop_last: bool = False, sampler=None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=collate_detection, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      worker_init_fn=_seed_worker, generator=generator)
