"""Optimisers by name and the LR schedule (docs/science.md section 3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ofe.config import OptimConfig
from ofe.core.muon import Muon


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: never norm gains, biases or residual gains (the public code's rule)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def muon_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """`param_groups` with each group marked for Muon or AdamW (the `muon` key; see `MuonWithAdamW`).

    Muon: the 2-D hidden matrices, i.e. the blocks' linear weights (attention qkv and proj, MLP fc and
    proj). AdamW: the token and position embeddings (and so the head, tied to the token embedding) and
    every 1-D parameter (norm gains, biases, trainable residual gains beta). This is Keller Jordan's
    split: orthogonalising an update gives a linear map the same step along every input direction (steepest
    descent in the spectral norm), whereas an embedding's inputs are one-hot, so its rows are independent
    lookups that want a per-entry step, Adam's; a vector has no matrix to orthogonalise.
    Weight decay follows `param_groups`: all matrices (embeddings included, as under adamw), no vectors.
    """
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]  # deduplicated: the tied head is wte
    hidden = [p for p in params if p.dim() == 2 and id(p) not in embeddings]
    other_matrices = [p for p in params if p.dim() >= 2 and (id(p) in embeddings or p.dim() > 2)]
    vectors = [p for p in params if p.dim() < 2]
    return [
        {"params": hidden, "weight_decay": weight_decay, "muon": True},
        {"params": other_matrices, "weight_decay": weight_decay, "muon": False},
        {"params": vectors, "weight_decay": 0.0, "muon": False},
    ]


# Muon's own hyperparameters, at the values of Keller Jordan's reference and torch.optim.Muon's defaults
# (Nesterov momentum 0.95, 5 quintic Newton-Schulz steps). Constants rather than OptimConfig fields:
# every OptimConfig field is part of every run's config hash, so a new field would make every finished
# run look like another config and train again.
MUON_MOMENTUM = 0.95
MUON_NS_STEPS = 5
# "match_rms_adamw" (Moonshot's "Muon is Scalable for LLM Training") multiplies the LR by
# 0.2 sqrt(max(rows, cols)), so that an orthogonalised update (RMS ~ 1/sqrt(max(rows, cols))) has RMS
# ~ 0.2 lr, the RMS of a typical AdamW update: Muon's matrices and AdamW's embeddings and vectors then
# want the same LR. That is what the trainer gives them (one LR written into every param group), and it
# keeps the `lr` axis and the schedule meaning the same thing for muon as for adamw. Keller's "original"
# (sqrt(max(1, rows / cols))) wants an LR ~0.02 for Muon and far less for AdamW (torch's example: 3e-4):
# two LRs, which the grid and the trainer do not have.
MUON_ADJUST_LR = "match_rms_adamw"


class MuonWithAdamW:
    """Muon for the groups marked `muon: True` and AdamW for the others, as one optimiser.

    Muon is torch.optim.Muon with its Newton-Schulz iteration in fp32 on CPU (`ofe.core.muon`); its state is
    torch's, so checkpoints of runs made with torch.optim.Muon itself load.

    It has what the trainer uses of an optimiser: `param_groups` (the two optimisers' groups, the same
    dicts, so `group["lr"] = lr` reaches both), `step`, `zero_grad`, and `state_dict` /
    `load_state_dict` as plain dicts of tensors and numbers (a checkpoint loads with
    `torch.load(weights_only=True)`). A group without the `muon` key is split per parameter: 2-D to Muon,
    the rest to AdamW (torch.optim.Muon's own example); without module names that cannot tell an
    embedding from a linear layer, hence `muon_param_groups` for a model.
    """

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, momentum: float = MUON_MOMENTUM, ns_steps: int = MUON_NS_STEPS) -> None:
        items = list(params)
        groups = items if items and isinstance(items[0], dict) else [{"params": items}]
        muon_groups: list[dict[str, Any]] = []
        adamw_groups: list[dict[str, Any]] = []
        for group in groups:
            rest = {k: v for k, v in group.items() if k not in ("params", "muon")}
            ps = list(group["params"])
            flags = [p.dim() == 2 if group.get("muon") is None else bool(group["muon"]) for p in ps]
            to_muon = [p for p, f in zip(ps, flags) if f]
            to_adamw = [p for p, f in zip(ps, flags) if not f]
            muon_groups += [{"params": to_muon, **rest}] if to_muon else []
            adamw_groups += [{"params": to_adamw, **rest}] if to_adamw else []
        # Only a side with parameters is built (torch refuses an empty optimiser); state_dict names them.
        self.parts: dict[str, torch.optim.Optimizer] = {}
        if muon_groups:
            self.parts["muon"] = Muon(
                muon_groups, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                ns_steps=ns_steps, adjust_lr_fn=MUON_ADJUST_LR)
        if adamw_groups:
            self.parts["adamw"] = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps,
                                                    weight_decay=weight_decay)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.parts.values() for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:  # evaluated once for both halves, as one optimiser would
            with torch.enable_grad():
                loss = closure()
        for opt in self.parts.values():
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.parts):
            raise ValueError(f"optimizer state holds {sorted(state)}, this optimiser is {sorted(self.parts)}")
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])

    def __repr__(self) -> str:
        return f"MuonWithAdamW({', '.join(f'{k}: {v!r}' for k, v in self.parts.items())})"


OPTIMIZERS = ("adamw", "adafactor", "soap", "rotated_adafactor", "muon")


def make_optimizer(name: str, params: Iterable, **hp: Any) -> torch.optim.Optimizer | MuonWithAdamW:
    """An optimiser by grid name, with hyperparameters from config (docs/science.md section 3).

    adamw: torch's AdamW. soap: pytorch-optimizer's SOAP (Adam in Shampoo's eigenbasis; it follows
    the reference nikhilvyas/SOAP: eigh at the first step, which makes no update, power iteration +
    QR refresh every `precondition_frequency` steps, plain Adam for 1-D parameters and dimensions above
    `max_precond_dim`, decoupled weight decay). adafactor / rotated_adafactor: `ofe.core.factored`.
    muon: torch's Muon (Newton-Schulz in fp32 on CPU, `ofe.core.muon`) for hidden matrices, AdamW for the rest
    (`MuonWithAdamW`, `muon_param_groups`).
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
        from ofe.core.factored import FactoredAdam

        return FactoredAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=wd,
                            rotate=name == "rotated_adafactor", **precond)
    if name == "muon":
        return MuonWithAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd,
                             momentum=hp.get("momentum", MUON_MOMENTUM),
                             ns_steps=hp.get("ns_steps", MUON_NS_STEPS))
    raise ValueError(f"optimizer: {name!r} is not known; choose one of {list(OPTIMIZERS)}")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer | MuonWithAdamW:
    groups = muon_param_groups if cfg.name == "muon" else param_groups
    return make_optimizer(
        cfg.name, groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
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
