"""AdamW with decoupled weight decay (none on biases and norms) and warmup + decay schedules."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tunelab.config import TrainConfig
from tunelab.errors import TunelabError


def build_optimizer(model: nn.Module, cfg: TrainConfig, kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (fused into one kernel with `train.fused_optimizer`), or bitsandbytes' paged AdamW (CUDA only:
    optimizer state pages to CPU memory under pressure instead of failing) when the method asks for it."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise TunelabError("the method left no trainable parameter", fix="check the method's settings")
    if kind != "adamw":
        import bitsandbytes as bnb

        paged = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
        return paged[kind](groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    # fused: one kernel updates every tensor (CPU and CUDA); None lets torch choose its default (foreach)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                             fused=True if cfg.fused_optimizer else None)


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return int(cfg.warmup * total) if isinstance(cfg.warmup, float) else int(cfg.warmup)


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> LambdaLR:
    warm = warmup_steps(cfg, total)
    return LambdaLR(opt, lambda s: lr_factor(s, total, warm, cfg.scheduler, cfg.min_lr_ratio))
