"""AdamW with two parameter groups: weight decay on the weight matrices (embedding included), none on
A_log, D, norm weights and biases (Mamba practice)."""

from __future__ import annotations

import torch
from torch import nn

from ..model import is_ssm_parameter
from .config import OptimConfig


def no_decay(name: str, p: nn.Parameter) -> bool:
    """A_log, D and every 1-D parameter (norm weights, biases) are not decayed."""
    return p.dim() < 2 or is_ssm_parameter(name)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """Fused AdamW on CUDA (one kernel for every parameter), the multi-tensor one elsewhere."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type == "cuda":
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)
