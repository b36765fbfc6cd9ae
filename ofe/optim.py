"""Optimisers by name and the LR schedule (PAPER.md section 3)."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ofe.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: never norm gains, biases or residual gains (the public code's rule)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(name: str, params: Iterable, **hp: Any) -> torch.optim.Optimizer:
    """An optimiser by grid name, with hyperparameters from config."""
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=hp["lr"], betas=tuple(hp.get("betas", (0.9, 0.999))), eps=hp.get("eps", 1e-8),
            weight_decay=hp.get("weight_decay", 0.0),
        )
    raise ValueError(f"optimizer: {name!r} is not known; choose one of ['adamw']")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return make_optimizer(
        cfg.name, param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup over warmup_frac of the run, then decay to min_lr_frac * lr.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    warmup = int(cfg.warmup_frac * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.decay == "constant" or total <= warmup + 1:
        return cfg.lr
    progress = min(1.0, (step - warmup) / (total - warmup - 1))
    if cfg.decay == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1 - progress
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * shape)
