"""Adafactor with momentum, optionally in Shampoo's eigenbasis ("rotated Adafactor", docs/science.md section 3).

torch.optim.Adafactor uses relative step sizes and no momentum, so it is a different algorithm from
its rotated counterpart; the optimiser study compares diagonal and rotated preconditioning with
everything else equal, so both variants are this one class:

- `rotate=False` (`adafactor`): Adam's first moment, Adafactor's factored second moment
  v ~ row (x) col / mean(row) for matrices, plain Adam for 1-D parameters.
- `rotate=True` (`rotated_adafactor`): the same, run on G' = Q_L^T G Q_R, where Q_L, Q_R are the
  eigenbases of EMAs of G G^T and G^T G (as in SOAP, refreshed by eigh every `precondition_frequency`
  steps; the first step only builds them and makes no update). Dimensions above `max_precond_dim`
  are not rotated, and their statistic is never formed: an embedding of a 52,000-token vocabulary is
  rotated on its d side only, with no vocab x vocab Gram (10.8 GB in fp32).
Weight decay is decoupled (AdamW-style).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def _eigenbasis(mat: Tensor) -> Tensor:
    """Eigenvectors by descending eigenvalue (fp32 eigh; the tiny ridge makes a zero matrix valid)."""
    eye = torch.eye(mat.shape[0], device=mat.device, dtype=torch.float32)
    _, q = torch.linalg.eigh(mat.float() + 1e-30 * eye)
    return q.flip(1).to(mat.dtype)


def _gram(g: Tensor, side: str) -> Tensor:
    """The statistic of one side of a matrix gradient: G G^T (rows, 'L') or G^T G (columns, 'R')."""
    return g @ g.T if side == "L" else g.T @ g


class FactoredAdam(torch.optim.Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rotate: bool = False,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        shampoo_beta: float | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rotate=rotate,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        shampoo_beta=shampoo_beta)
        super().__init__(params, defaults)

    def _rotated_dims(self, p: Tensor, group: dict) -> list[bool]:
        return [group["rotate"] and p.dim() == 2 and n <= group["max_precond_dim"] for n in p.shape]

    def _project(self, x: Tensor, qs: list[Tensor | None], back: bool = False) -> Tensor:
        """x -> Q_L^T x Q_R (or back: Q_L x Q_R^T); a None basis leaves that dimension alone."""
        ql, qr = qs
        if ql is not None:
            x = (ql if back else ql.T) @ x
        if qr is not None:
            x = x @ (qr.T if back else qr)
        return x

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else beta2
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                rotated = self._rotated_dims(p, group)
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    if p.dim() == 2:
                        state["row"] = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
                        state["col"] = torch.zeros(p.shape[1], dtype=p.dtype, device=p.device)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    if any(rotated):
                        for name, side in zip(("L", "R"), rotated):
                            if side:  # only a rotated side's Gram: the other may be vocab x vocab
                                state[name] = _gram(g, name) * (1 - shampoo_beta)
                                state["Q" + name] = _eigenbasis(state[name])
                        continue  # like SOAP: the first step only builds the eigenbases
                state["step"] += 1
                t = state["step"].item()
                qs = [state.get("QL"), state.get("QR")]
                gp = self._project(g, qs)
                state["exp_avg"].lerp_(g, 1 - beta1)
                mp = self._project(state["exp_avg"], qs)
                if p.dim() == 2:
                    sq = gp.square() + 1e-30
                    state["row"].lerp_(sq.mean(dim=1), 1 - beta2)
                    state["col"].lerp_(sq.mean(dim=0), 1 - beta2)
                    v = torch.outer(state["row"], state["col"]) / state["row"].mean()
                else:
                    state["exp_avg_sq"].lerp_(gp.square(), 1 - beta2)
                    v = state["exp_avg_sq"]
                bc1, bc2 = 1 - beta1**t, 1 - beta2**t
                update = (mp / bc1) / ((v / bc2).sqrt() + group["eps"])
                p.add_(self._project(update, qs, back=True), alpha=-group["lr"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                if any(rotated):
                    for name, side in zip(("L", "R"), rotated):
                        if side:
                            state[name].lerp_(_gram(g, name), 1 - shampoo_beta)
                    if int(t) % group["precondition_frequency"] == 0:
                        for name in ("L", "R"):
                            if name in state:
                                state["Q" + name] = _eigenbasis(state[name])
        return loss

