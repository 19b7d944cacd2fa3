"""How predict, eval and bench run a trained network: precision, memory layout and compilation.

One place, so that ``multibox predict``, ``multibox eval``, :class:`multibox.api.Detector` and ``multibox bench``
all run the same fast path (the fast path is checked against the plain one in ``tests/test_inference.py``).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import Config

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training: ``train.amp_dtype`` on CUDA when ``train.amp``, otherwise None (fp32)."""
    if not cfg.train.amp or device.type != "cuda":
        return None
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.train.amp_dtype]


def inference_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of inference (``eval.precision``); None = fp32.

    ``auto`` follows training (bf16 autocast on CUDA, fp32 on the CPU). ``bf16`` on the CPU is opt-in: it halves the
    convolution time on CPUs with native bf16 (AVX512-BF16, AMX) and is slow on others."""
    precision = cfg.eval.precision
    if precision == "auto":
        return training_amp_dtype(cfg, device)
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


def add_inference_arguments(parser) -> None:
    """``--precision`` and ``--compile`` for the commands that run a trained network (eval, predict)."""
    parser.add_argument("--precision", choices=["auto", *PRECISIONS],
                        help="inference autocast (default: the checkpoint's eval.precision, usually auto)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the network (worth it for many images of one size)")


def apply_inference_arguments(cfg: Config, precision: str | None, compile_: bool | None) -> Config:
    if precision is not None:
        cfg.eval.precision = precision
    if compile_ is not None:
        cfg.eval.compile = compile_
    return cfg
