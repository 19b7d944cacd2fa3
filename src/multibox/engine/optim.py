"""The optimizer and the fp16 loss scaler of a training run."""
from __future__ import annotations

import torch
from torch import nn

from multibox.config import Config
from multibox.runtime import training_amp_dtype


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Momentum SGD (the tutorial and the paper) or AdamW over the trainable parameters; BatchNorm's scale and shift
    get no weight decay (as MindSpore's default decay filter). Frozen parameters (``requires_grad=False``: the VGG16
    stages a pretrained run does not train) are left out, so that neither weight decay nor momentum moves them."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if id(p) not in norm_params]
    no_decay = [p for p in trainable if id(p) in norm_params]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr_init, momentum=cfg.train.momentum)
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.train.lr_init)
    raise ValueError(f"unknown train.optimizer {cfg.train.optimizer!r}")


def make_grad_scaler(cfg: Config, device: torch.device) -> "torch.amp.GradScaler | None":
    """Loss scaling for fp16 autocast on CUDA (bf16 and fp32 need none)."""
    if training_amp_dtype(cfg, device) != torch.float16:
        return None
    return torch.amp.GradScaler("cuda")
