"""Data-parallel helpers for ``torchrun`` (torch.distributed): set-up from the environment, rank queries, collectives.

Launch (one machine, N processes)::

    torchrun --nproc_per_node=N -m multibox train --config ssd300-vgg16 --data shards/train --val-data shards/val

``train.batch_size`` is the global batch, whatever N is: each process takes ``train.batch_size / N`` images per
step (:func:`per_rank_batch`; a batch that does not divide by N is refused), so a preset's learning rate, which is
set for its batch, holds for any number of processes, and a run takes the same steps per epoch with 1 or N.

Several machines (run the same command on each; ``--node_rank`` 0..M-1, rendezvous at one host's address)::

    torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 \\
             --rdzv_id=JOB_ID -m multibox train ...

Without the torchrun variables (``WORLD_SIZE`` unset or 1) everything here is a no-op and training runs in one
process. The backend is NCCL for CUDA devices and gloo for CPU training (``train.dist_backend`` overrides).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from multibox.errors import InputError

__all__ = ["DistEnv", "per_rank_batch", "init_distributed", "cleanup", "is_distributed", "is_main", "rank",
           "world_size", "barrier",
           "all_gather_object", "broadcast_object", "broadcast_buffers", "all_reduce_sum", "unwrap"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (``world_size == 1``: not distributed)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def per_rank_batch(global_batch: int, world: int) -> int:
    """Each of ``world`` processes' share of the global batch ``train.batch_size``; :class:`InputError` when it
    does not divide (an uneven split would change the images of a global batch and the per-rank shapes)."""
    if global_batch % world:
        lower, upper = global_batch - global_batch % world, global_batch + world - global_batch % world
        raise InputError(f"train.batch_size = {global_batch} is the global batch and must divide by the {world} "
                         f"processes (each takes batch_size / {world}): use "
                         + (f"{lower} or {upper}" if lower else f"{upper}"))
    return global_batch // world


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str = "cpu", backend: str = "auto", timeout_s: float = 1800) -> DistEnv:
    """Join the process group described by torchrun's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``); returns a single-process :class:`DistEnv` when there is none.

    On CUDA, also selects the device ``cuda:LOCAL_RANK``.
    """
    world = env_world_size()
    if world <= 1:
        return DistEnv()
    rank_, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank_, local, world, backend)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (e.g. BatchNorm running statistics) into every rank's ``module``."""
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf, src=src)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity when not distributed); returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel wrapper (the module itself when it is not wrapped)."""
    return getattr(model, "module", model)
