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


OPTIMIZERS = ("adamw", "adafactor", "soap", "rotated_adafactor")


def make_optimizer(name: str, params: Iterable, **hp: Any) -> torch.optim.Optimizer:
    """An optimiser by grid name, with hyperparameters from config (PAPER.md section 3).

    adamw: torch's AdamW. soap: pytorch-optimizer's SOAP (Adam in Shampoo's eigenbasis; it follows
    the reference nikhilvyas/SOAP: eigh at the first step, which makes no update, power iteration +
    QR refresh every `precondition_frequency` steps, plain Adam for 1-D parameters and dimensions above
    `max_precond_dim`, decoupled weight decay). adafactor / rotated_adafactor: `ofe.factored`.
    """
    lr, betas = hp["lr"], tuple(hp.get("betas", (0.9, 0.999)))
    eps, wd = hp.get("eps", 1e-8), hp.get("weight_decay", 0.0)
    precond = {k: hp[k] for k in ("precondition_frequency", "max_precond_dim", "shampoo_beta") if k in hp}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if name == "soap":
        from pytorch_optimizer import SOAP

        return SOAP(params, lr=lr, betas=betas, eps=eps, weight_decay=wd,
                    precondition_frequency=precond.get("precondition_frequency", 10),
                    max_precondition_dim=precond.get("max_precond_dim", 10000),
                    shampoo_beta=precond.get("shampoo_beta"))
    if name in ("adafactor", "rotated_adafactor"):
        from ofe.factored import FactoredAdam

        return FactoredAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=wd,
                            rotate=name == "rotated_adafactor", **precond)
    raise ValueError(f"optimizer: {name!r} is not known; choose one of {list(OPTIMIZERS)}")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return make_optimizer(
        cfg.name, param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
        weight_decay=cfg.weight_decay, precondition_frequency=cfg.precondition_frequency,
        max_precond_dim=cfg.max_precond_dim, shampoo_beta=cfg.shampoo_beta,
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
