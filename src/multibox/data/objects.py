"""The objects of a dataset as the network sees them, read from the annotations (no image is decoded).

Default-box analysis and fitting (:mod:`multibox.core.anchor_fit`) need every trained box in network units:
the boxes training keeps (:func:`~multibox.data.coco.trained_rows`: crowd left out, degenerate boxes dropped,
the rest clipped), mapped onto the model's input as ``data.resize`` maps the image: divided by the image size
when it is stretched, by the :func:`~multibox.core.resize.placement` when it is letterboxed. Images whose
annotation gives no size (MindRecord files without their instances JSON) are left out: reading each one's header
would make one pass over the data per image on sources that only read in order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from multibox.config import Config
from multibox.core.boxes import xyxy_to_cxcywh, xyxy_to_ltwh
from multibox.core.resize import as_hw, pixels_to_input
from multibox.data.coco import DetectionDataset, trained_rows

log = logging.getLogger("multibox.data")


@dataclass(frozen=True)
class ObjectTable:
    """N objects of a dataset, image by image.

    ``boxes_cxcywh``: (N, 4) float64, normalised to [0, 1] (network units); ``bbox_ltwh``: (N, 4) the same boxes
    in the image's pixels (as trained: clipped to the image); ``image_index``: (N,) the dataset index of each
    object's image; ``ann_id``: (N,) its annotation id; ``labels``: (N,) contiguous labels; ``area_px``: (N,) the
    annotation's ``area`` in image pixels (COCO's size buckets; the box's area where none is given); ``files``: the
    file of each dataset index in ``image_index``.
    """

    boxes_cxcywh: Tensor
    bbox_ltwh: Tensor
    image_index: Tensor
    ann_id: Tensor
    labels: Tensor
    area_px: Tensor
    files: dict[int, str]

    def __len__(self) -> int:
        return int(self.boxes_cxcywh.shape[0])

    def of_images(self, indices: list[int]) -> "ObjectTable":
        """The objects of the dataset images ``indices`` only (in this table's order)."""
        keep = torch.isin(self.image_index, torch.as_tensor(indices, dtype=torch.int64))
        images = set(self.image_index[keep].tolist())
        return ObjectTable(self.boxes_cxcywh[keep], self.bbox_ltwh[keep], self.image_index[keep], self.ann_id[keep],
                           self.labels[keep], self.area_px[keep], {i: f for i, f in self.files.items() if i in images})


def letterbox_input(cfg: Config) -> tuple[int, int] | None:
    """The (H, W) input that ``cfg`` letterboxes images into; None when it stretches them."""
    return as_hw(cfg.model.image_size) if cfg.data.resize == "letterbox" else None


def object_table(dataset: DetectionDataset, indices: list[int] | None = None,
                 letterbox_hw: tuple[int, int] | None = None) -> ObjectTable:
    """The trained objects of ``dataset`` (of its ``indices``, default all), in network units: stretched onto
    the input, or letterboxed into the ``letterbox_hw`` input (:func:`letterbox_input`)."""
    rows: list[tuple[np.ndarray, ...]] = []
    files: dict[int, str] = {}
    unsized = 0
    for index in range(len(dataset)) if indices is None else indices:
        record = dataset.records[index]
        if not record.num_boxes:
            continue
        if record.width <= 0 or record.height <= 0:
            unsized += 1
            continue
        keep, xyxy, labels = trained_rows(record, dataset.category_id_to_label, record.width, record.height,
                                          dataset.keep_crowd)
        if not len(xyxy):
            continue
        scale, offset = pixels_to_input((record.height, record.width), letterbox_hw or (1, 1),
                                        letterbox_hw is not None)
        areas = np.where(record.areas[keep] > 0, record.areas[keep], np.prod(record.bbox_ltwh[keep, 2:], axis=1))
        network_xyxy = xyxy * scale.numpy() + offset.numpy()
        rows.append((xyxy_to_cxcywh(network_xyxy), xyxy_to_ltwh(xyxy), np.full(len(xyxy), index),
                     record.ann_ids[keep], labels, areas))
        files[index] = dataset.describe(index)
    if unsized:
        log.warning("%d images whose annotations give no image size are left out of the default-box analysis",
                    unsized)
    columns = [np.concatenate(c) for c in zip(*rows)] if rows else \
        [np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
         np.zeros(0)]
    boxes, ltwh, image, ann, labels, area = (torch.from_numpy(np.ascontiguousarray(c)) for c in columns)
    return ObjectTable(boxes.double(), ltwh.double(), image.long(), ann.long(), labels.long(), area.double(), files)
