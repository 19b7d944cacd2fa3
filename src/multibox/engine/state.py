"""What a training run keeps on disk to continue: the checkpoint payload, the RNG states, the restore of
``last.pt`` (:func:`restore_training_state`) and ``metrics.jsonl`` (:class:`RunLog`, :func:`rewind_log`)."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from multibox import distributed as mbdist
from multibox.checkpoint import CheckpointError, load_checkpoint
from multibox.config import Config
from multibox.data.categories import category_ids_of
from multibox.engine.loop import EpochProgress, NonFiniteTrainingError
from multibox.io import atomic_write_text


def checkpoint_payload(cfg: Config, model: nn.Module, class_names: list[str], category_ids: Sequence[int] | None = None,
                       **state) -> dict:
    """A checkpoint: the SSD's weights (unwrapped from DistributedDataParallel), the config, the class names, the
    data's category id of each label 1..C (``category_ids[label - 1]``; None: the fallback of
    :func:`multibox.data.categories.category_ids_of`, which training never relies on) and ``state`` (training
    checkpoints: optimizer, scaler, epoch, step, best, rng, progress, geometry)."""
    return {"model": mbdist.unwrap(model).state_dict(), "config": cfg.to_dict(), "class_names": class_names,
            "category_ids": category_ids_of(class_names, None if category_ids is None else list(category_ids)),
            **state}


def check_finite_weights(model: nn.Module) -> None:
    """Raise :class:`NonFiniteTrainingError` if a parameter or floating buffer holds NaN / inf (such weights are
    never written over a good checkpoint)."""
    model = mbdist.unwrap(model)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteTrainingError(f"the weights became non-finite ({name}); the checkpoint was not written")


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_rng(device: torch.device) -> dict:
    """This process's RNG states; distributed: rank 0's, with every rank's under ``per_rank`` (a collective)."""
    mine = _rng_state(device)
    if not mbdist.is_distributed():
        return mine
    per_rank = mbdist.all_gather_object(mine)
    return {**per_rank[0], "per_rank": per_rank}


def _restore_rng(rng: dict, device: torch.device, rank: int) -> None:
    per_rank = rng.get("per_rank")
    if per_rank is not None:
        if rank >= len(per_rank):   # resumed with more processes (at an epoch boundary): keep the seeded state
            return
        rng = per_rank[rank]
    torch.set_rng_state(rng["torch"].cpu())
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


TRAINING_FIELDS = {"model": dict, "optimizer": dict, "epoch": int, "step": int, "best": dict, "rng": dict}


def restore_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: "torch.amp.GradScaler | None", device: torch.device, rank: int,
                           geometry: dict) -> tuple[dict, EpochProgress]:
    """Load ``path`` (a ``last.pt``) into model, optimizer, scaler and the RNGs; returns (state, progress).

    Raises :class:`CheckpointError` naming the field for a checkpoint that is not a training state, whose weights
    do not fit the model of ``config.yaml``, or that stopped inside an epoch whose batches no longer match
    (``geometry``: steps_per_epoch, world_size, batch_size).
    """
    state = load_checkpoint(path, map_location="cpu")   # load_state_dict copies onto the model's device
    for key, kind in TRAINING_FIELDS.items():
        if not isinstance(state.get(key), kind) or (kind is int and isinstance(state.get(key), bool)):
            raise CheckpointError(f"{path}: not a training checkpoint: field {key!r} missing or not "
                                  f"{kind.__name__} (use it with `multibox eval` / `predict`, or start a new run)")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and isinstance(state.get("scaler"), dict):
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        raise CheckpointError(f"{path}: does not fit the model / optimizer of this run's config.yaml "
                              f"({str(err).strip().splitlines()[0]})") from None
    progress = EpochProgress()
    if isinstance(state.get("progress"), dict):
        try:
            progress = EpochProgress.from_dict(state["progress"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{path}: field 'progress' is malformed ({err!r})") from None
    if progress.batch:
        saved = {k: state.get(k) for k in geometry}
        if saved != geometry:
            raise CheckpointError(f"{path} stopped inside epoch {state['epoch'] + 1} (batch {progress.batch}) with "
                                  f"{saved}; this run has {geometry}: the rest of that epoch is not the same batches. "
                                  "Resume with the same data, batch size and number of processes")
    try:
        _restore_rng(state["rng"], device, rank)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: field 'rng' is malformed ({err!r})") from None
    return state, progress


def last_good_message(out: Path) -> str:
    """Where the last good state is, for the message of a stopped run."""
    try:
        state = load_checkpoint(out / "last.pt")
    except CheckpointError:
        return "No checkpoint had been written yet"
    return (f"{out / 'last.pt'} holds the last good state (epoch {state.get('epoch', 0) + 1}, step "
            f"{state.get('step')}): fix the cause, then continue with `multibox train --resume {out}`")


class RunLog:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def rewind_log(path: Path, completed_epochs: int, step: int) -> None:
    """Drop the ``metrics.jsonl`` records written after the checkpoint a run resumes from (they will be written
    again), atomically; unparsable lines (a record cut by a kill) go too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if record.get("kind") in ("epoch", "eval") and "epoch" in record:
            keep = record["epoch"] <= completed_epochs
        else:
            keep = "step" not in record or record["step"] < step
        if keep:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
