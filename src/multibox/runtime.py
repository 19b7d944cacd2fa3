"""Where and how the networks run: device, seeding and determinism, precision (autocast), memory layout and
compilation.

One place, so that training, ``multibox predict``, ``multibox eval``, :class:`multibox.inference.detector.Detector`
and ``multibox bench`` all run the same fast path (checked against the plain one in ``tests/inference/test_inference.py``).
"""
from __future__ import annotations

import contextlib
import os
import random

import torch
from torch import nn

from multibox.config import Config
from multibox.errors import MultiboxError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # keys: config.PRECISION_NAMES


class DeviceError(MultiboxError, RuntimeError):
    """A device that is not there (``cuda`` without a GPU, ``cuda:3`` on a machine with two) or not a device."""


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; anything else as ``torch.device`` reads it,
    checked to exist (:class:`DeviceError` otherwise, before any work starts)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise DeviceError(f"device {name!r}: no CUDA GPU is available here (torch {torch.__version__}); "
                              "use cpu or auto")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 .. cuda:{count - 1}")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"device {name!r}: MPS is not available here; use cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_mode(enabled: bool, threads: int = 0):
    """Deterministic kernels (an error where torch has none), no cuDNN autotuning and a fixed number of CPU threads
    (``threads``, default 1: reductions split over threads round differently) while the block runs; the previous
    settings are restored on exit (in-process callers, tests). Does nothing unless ``enabled``."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS (read at CUDA init)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.set_num_threads(threads or 1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_num_threads(saved[2])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[3], saved[4]


@contextlib.contextmanager
def cpu_threads(threads: int):
    """``torch.set_num_threads(threads)`` while the block runs (0: leave torch's setting), restored on exit, so that
    an in-process caller (a notebook, a test) keeps its own."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; None: plain fp32. Training asks for it on CUDA only; inference only when
    ``eval.precision`` says so, on any device (bf16 convolutions are ~2x faster on CPUs with native bf16)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def training_amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training: ``train.amp_dtype`` on CUDA when ``train.amp``, otherwise None (fp32)."""
    if not cfg.train.amp or device.type != "cuda":
        return None
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.train.amp_dtype]


def inference_dtype(cfg: Config) -> torch.dtype | None:
    """The autocast dtype of inference (``eval.precision``), the same on every device; None = fp32.

    ``auto`` is fp32 on every device, whatever training's autocast was: evaluation (``multibox eval``, the
    evaluation inside training) must not move its AP with the device (bf16 moves scores by ~1e-3, which reorders
    near-ties and crosses thresholds), and ``multibox predict`` / :func:`multibox.load` use the same rule so that
    scoring ``detections.json`` gives ``multibox eval``'s numbers. ``bf16`` / ``fp16`` are opt-in, on the CPU too
    (bf16 halves the convolution time on CPUs with native bf16, AVX512-BF16 or AMX, and is slow on others)."""
    precision = cfg.eval.precision
    if precision == "auto":
        return None
    if precision not in PRECISIONS:
        raise ValueError(f"eval.precision must be auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def compile_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` for inference with fixed shapes (one compilation per batch shape).

    Freezing turns the weights into constants, so inductor can pre-pack them for oneDNN and fold the layout
    conversions; on CUDA, CUDA graphs also remove the per-kernel launch cost that dominates at batch 1."""
    options = {"freezing": True}
    if device.type == "cuda":
        options["triton.cudagraphs"] = True
    return torch.compile(model, dynamic=False, options=options)


def prepare_for_inference(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """The network on ``device`` in eval mode, NHWC when ``train.channels_last`` (in place, as ``nn.Module.to``),
    compiled when ``eval.compile``.

    The returned module has the network's attributes (``anchors_cxcywh``) whether compiled or not."""
    model = model.eval().to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return compile_for_inference(model, device) if cfg.eval.compile else model


def apply_inference_arguments(cfg: Config, precision: str | None, compile_: bool | None) -> Config:
    if precision is not None:
        cfg.eval.precision = precision
    if compile_ is not None:
        cfg.eval.compile = compile_
    return cfg
