"""What an evaluation was: the checkpoint, the data, the thresholds and the evaluator.

:func:`eval_provenance` gives the record that ``eval.json`` carries (``multibox eval`` and a training run's
``save_best`` alike) and that ``index.html`` shows::

    {"checkpoint": {"path", "sha256", "epoch"},          # a run's best.pt: {"path": "best.pt", "epoch"}
     "data": {"source", "kind", "split", "images", "id"},  # id: 8 hex digits naming the evaluated set
     "thresholds": {"score_threshold", "nms_threshold", "max_per_class", "max_per_image", "pre_nms_top_k",
                    "iou_thresholds", "max_detections"},
     "evaluator": "faster" | "pycocotools"}

:func:`eval_destination` names the files of an evaluation beside its checkpoint so that one never replaces
another: ``eval.json`` (and the report in the folder itself) for the checkpoint's own evaluation split,
``eval-<data>.json`` and the folder ``eval-<data>/`` for other data; ``<data>`` is the source's stem and the
data id. A name already taken by another checkpoint of the folder gets the checkpoint's stem too.
:func:`check_replaceable` refuses to write over the evaluation of another checkpoint or other data.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from multibox.config import Config
from multibox.data.build import DataSplits
from multibox.errors import InputError
from multibox.evaluation.coco import CocoEvalResult
from multibox.io import file_sha256

__all__ = ["check_replaceable", "checkpoint_record", "data_record", "eval_destination", "eval_provenance",
           "evaluation_data_key", "run_checkpoint_record"]

# pycocotools' maxDets, behind eval.json's AR1 / AR10 / AR100 (and AP: at most 100 detections per image).
COCO_MAX_DETECTIONS = (1, 10, 100)


def checkpoint_record(path: str | os.PathLike, epoch: int | None = None) -> dict[str, Any]:
    """``{"path", "sha256", "epoch"}`` of a checkpoint file: its absolute path, the sha256 of its bytes and the
    epoch it holds (none when unknown: imported weights)."""
    record: dict[str, Any] = {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}
    if epoch is not None:
        record["epoch"] = int(epoch)
    return record


def run_checkpoint_record(name: str, epoch: int) -> dict[str, Any]:
    """``{"path", "epoch"}`` of a training run's own checkpoint, named relative to the run folder that holds it and
    its eval.json. Not hashed: torch.save's bytes differ between runs that end with equal weights (a resumed run
    and an uninterrupted one), whose eval.json files are otherwise equal."""
    return {"path": name, "epoch": int(epoch)}


def _resolved(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def evaluation_data_key(cfg: Config) -> dict[str, Any]:
    """The config values that decide which images evaluation scores, against which ground truth (paths
    resolved): equal keys, equal evaluation sets. Computed without touching the data (the demo set included)."""
    d = cfg.data
    # Not data.keep_empty: it filters the training split only, the evaluation split keeps its empty images.
    key: dict[str, Any] = {"voc_split": d.voc_split, "keep_difficult": d.keep_difficult,
                           "image_root": _resolved(d.image_root)}
    if d.val_path:                 # every image of the validation source
        key["source"] = _resolved(d.val_path)
    elif d.path == "synth":        # the demo's own validation split
        key.update(source=_resolved(Path(d.synth_root) / "val" / "annotations.json"), images=d.synth_val_images,
                   seed=cfg.train.seed)
    else:                          # a VOC test split of the source, else a held-out part of it
        key.update(source=_resolved(d.path), val_split=d.val_split, val_fraction=d.val_fraction,
                   seed=cfg.train.seed)
    return key


def _data_id(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(evaluation_data_key(cfg), sort_keys=True).encode()).hexdigest()[:8]


def data_record(cfg: Config, splits: DataSplits) -> dict[str, Any]:
    """``{"source", "kind", "split", "images", "id"}``: the evaluated source (an absolute path), which of its images
    (``split``, in words), how many, and the id of the set (:func:`evaluation_data_key`); VOC data: ``voc_split``
    too."""
    full = getattr(splits.val, "dataset", None)
    held_out = full is not None and full is getattr(splits.train, "dataset", None) and len(splits.val) < len(full)
    if held_out:
        split = f"held out: {cfg.data.val_fraction:g} of the images (seed {cfg.train.seed})"
    else:
        split = "every image"
    record = {"source": evaluation_data_key(cfg)["source"], "kind": splits.val_source_kind, "split": split,
              "images": len(splits.val_image_ids), "id": _data_id(cfg)}
    if splits.val_source_kind == "voc" and getattr(full, "split", None):
        record["split"] += f" of VOC split {full.split}"
        record["voc_split"] = full.split
    return record


def eval_provenance(cfg: Config, splits: DataSplits, result: CocoEvalResult,
                    checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The record ``eval.json`` carries besides the metrics (see the module docstring); ``checkpoint`` from
    :func:`checkpoint_record` or :func:`run_checkpoint_record`."""
    e = cfg.eval
    thresholds = {"score_threshold": e.score_threshold, "nms_threshold": e.nms_threshold,
                  "max_per_class": e.max_per_class, "max_per_image": e.max_per_image, "pre_nms_top_k": e.pre_nms_top_k,
                  "iou_thresholds": [round(float(t), 4) for t in result.iou_thresholds],
                  "max_detections": list(COCO_MAX_DETECTIONS)}
    return {"checkpoint": dict(checkpoint), "data": data_record(cfg, splits), "thresholds": thresholds,
            "evaluator": result.backend}


def _data_tag(record: Mapping[str, Any]) -> str:
    """``<stem of the source>[-<VOC split>]-<data id>``, safe as a file name."""
    source = Path(record["source"])
    stem = source.stem if source.suffix.lower() == ".json" else source.name
    if record.get("voc_split"):
        stem += f"-{record['voc_split']}"
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)[:40]}-{record['id']}"


def _recorded(path: Path) -> dict[str, Any] | None:
    """An existing eval JSON, when it records its provenance (None: no such file, not JSON, or written before
    eval.json said what it evaluated: nothing to compare, so it may be replaced)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("data"), dict) else None


def _checkpoint_path(body: Mapping[str, Any], folder: Path) -> Path | None:
    """The checkpoint an eval JSON in ``folder`` names (a run's ``best.pt`` relative to it), resolved."""
    entry = body.get("checkpoint")
    path = entry.get("path") if isinstance(entry, Mapping) else None
    return (folder / path).resolve() if isinstance(path, str) else None


def _other_checkpoint(path: Path, checkpoint: Path) -> bool:
    body = _recorded(path)
    found = None if body is None else _checkpoint_path(body, path.parent)
    return found is not None and found != checkpoint.resolve()


def eval_destination(folder: str | os.PathLike, checkpoint: str | os.PathLike, own_split: bool,
                     record: Mapping[str, Any]) -> tuple[Path, Path]:
    """``(eval JSON, report folder)`` for the evaluation of ``checkpoint`` on the data of ``record``
    (:func:`data_record`) beside the checkpoint, in ``folder`` (see the module docstring)."""
    folder, checkpoint = Path(folder), Path(checkpoint)
    name = "eval" if own_split else f"eval-{_data_tag(record)}"
    if _other_checkpoint(folder / f"{name}.json", checkpoint):
        name = f"eval-{checkpoint.stem}" + ("" if own_split else f"-{_data_tag(record)}")
    return folder / f"{name}.json", folder if name == "eval" else folder / name


def check_replaceable(path: str | os.PathLike, provenance: Mapping[str, Any]) -> None:
    """Raise :class:`InputError` when the eval JSON ``path`` holds the evaluation of another checkpoint file or of
    other data; the same evaluation run again (other thresholds, a checkpoint retrained in place) may replace it."""
    path = Path(path)
    body = _recorded(path)
    if body is None:
        return
    ckpt, data = _checkpoint_path(body, path.parent), body["data"]
    if ckpt != _checkpoint_path(provenance, path.parent) or data.get("id") != provenance["data"]["id"]:
        raise InputError(f"{path} holds the evaluation of {ckpt or 'another checkpoint'} on "
                         f"{data.get('source', 'other data')} ({data.get('split', 'unknown images')}): choose "
                         "another --out for this one")
