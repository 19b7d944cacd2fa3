"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of plain types and tensors: ``format``, ``version``, ``model`` (state dict), ``config``
(the resolved config as a dict), ``class_names`` (index 0 = background), ``category_ids`` (the data's COCO
``category_id`` of labels 1..C, :mod:`multibox.data.categories`) and, for training checkpoints (``last.pt``, see
:mod:`multibox.engine.fit`), ``optimizer``, ``scaler`` (fp16 loss scaling, or None), ``epoch`` (epochs completed),
``step`` (next global step), ``progress`` (the position inside the epoch and its running sums, the non-finite
counter), ``best``, ``rng`` (torch / python / CUDA states, every rank's under ``per_rank``) and the batch geometry
(``steps_per_epoch``, ``world_size``, ``batch_size``) a mid-epoch resume must match.

Writing: temporary file in the same folder, fsync, rename, fsync of the folder (:func:`save_checkpoint`, through
:func:`multibox.io.atomic_write_bytes`).
Reading: refused before unpickling unless it is a torch zip archive with stored (uncompressed) records, then
``torch.load(weights_only=True)``, then field types checked (:func:`load_checkpoint`); every failure is a
:class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import io
import os  # noqa: F401  (tests patch multibox.checkpoint.os.fdopen: the os module atomic_write_bytes writes through)
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from multibox.errors import MultiboxError
from multibox.io import atomic_write_bytes

FORMAT = "multibox-checkpoint"
VERSION = 1


class CheckpointError(MultiboxError, RuntimeError):
    """A checkpoint that cannot be used: missing, damaged, forged (refused) or not a multibox training state."""


class CheckpointWriteError(MultiboxError, OSError):
    """A checkpoint could not be written (full disk, quota, I/O error); the previous file at the path is intact."""


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a crash, a kill or a full
    disk mid-write leaves the previous checkpoint intact (and no temporary file after an exception).

    The payload is serialised in memory first, so that a failed write reports the system's error (``No space
    left on device``) rather than torch's stream-writer message. Raises :class:`CheckpointWriteError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    try:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        # KeyboardInterrupt / SystemExit pass through unwrapped; atomic_write_bytes removes its temporary file.
        atomic_write_bytes(path, buffer.getbuffer())
    except Exception as err:
        raise CheckpointWriteError(getattr(err, "errno", None) or 0,
                                   f"{path}: could not write the checkpoint ({type(err).__name__}: {err}); the "
                                   f"previous {path.name}, if any, is unchanged") from err


def _check_archive(path: Path) -> None:
    """Refuse, before unpickling anything, what ``torch.save`` never writes: a legacy (non-zip) format, whose
    reader allocates storages of the sizes the file declares, and compressed records (a zip bomb)."""
    try:
        is_zip = zipfile.is_zipfile(path)   # raises BadZipFile itself on some forged end records
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint (damaged zip directory: {err})") from None
    if not is_zip:
        raise CheckpointError(f"{path}: not a multibox checkpoint (not a torch.save zip archive; "
                              "legacy pickle formats are refused)")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except Exception as err:   # BadZipFile, struct / value errors from a forged directory
        raise CheckpointError(f"{path}: not a readable checkpoint (damaged zip directory: {err})") from None
    compressed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(f"{path}: refused: record {compressed[0]!r} is compressed, which torch.save never "
                              "writes (decompression-bomb guard)")
    if sum(i.file_size for i in infos) > path.stat().st_size:
        raise CheckpointError(f"{path}: not a readable checkpoint (its records claim more bytes than the file has)")


def _check_fields(payload: dict, path: Path) -> None:
    """The fields every consumer reads, with their types (so a forged file fails here, naming the field)."""
    model = payload.get("model")
    if model is not None and not (isinstance(model, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items())):
        raise CheckpointError(f"{path}: field 'model' must map parameter names to tensors")
    if "config" in payload and not isinstance(payload["config"], dict):
        raise CheckpointError(f"{path}: field 'config' must be a mapping, got {type(payload['config']).__name__}")
    names = payload.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{path}: field 'class_names' must be a list of strings")
    version = payload.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: field 'version' must be an integer, got {version!r}")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers only, never code from the file.

    Every failure is a :class:`CheckpointError` naming the file: missing, not a torch zip archive, compressed
    records, a pickle that names any other class or function (refused: it could run code), damaged data, a
    payload that is not a multibox checkpoint or whose fields have the wrong types.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_archive(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        detail = next((line.strip() for line in text.splitlines()
                       if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line), None)
        if detail is not None:
            raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain "
                                  f"containers, which could run code ({detail})") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(text)})") from None
    except Exception as err:   # RuntimeError (zip reader), EOFError, ValueError, MemoryError, ... from damaged data
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: "
                              f"{_first_line(str(err))})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a multibox checkpoint (use `multibox import-weights` for other formats)")
    _check_fields(payload, path)
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload['version']} is newer than this multibox")
    return payload


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else "no detail"
