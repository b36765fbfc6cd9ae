"""torch.optim.Muon with its Newton-Schulz iteration in fp32 on CPU (bf16 elsewhere, as torch's).

torch's `_zeropower_via_newtonschulz` always casts the update to bfloat16. On a GPU that is what makes
Muon cheap. On a CPU, bf16 matmuls are faster than fp32 only with AMX: measured with oneDNN limited to
each instruction set on this project's AMX host (1 thread, 256x1024 @ 1024x256), bf16 took 60-70x fp32's
time with AVX2 only (torch's scalar fallback), 6x with AVX512, 1.6x with AVX512-BF16 and 0.1x with AMX.
So on CPU the iteration runs in fp32, the same iteration at a higher precision, one dtype for every
CPU run whatever the host. (On an AMX host this makes Muon's step slower: docs/benchmarks.md.)

Only `step` is overridden: the constructor, the param groups' keys and the state (one
`momentum_buffer` per parameter) are torch's, so a state_dict of torch.optim.Muon loads here and back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim._muon import _adjust_lr  # torch's LR adjustment itself: the same LR by construction


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 is slower there without AMX, and fp32 is the more exact iteration); bf16 on
    accelerators, torch's choice."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def zeropower_via_newtonschulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                               eps: float, dtype: torch.dtype) -> torch.Tensor:
    """torch's `_zeropower_via_newtonschulz` (Keller Jordan's quintic iteration) in `dtype`.

    X <- G / ||G||_F (wide orientation), then `steps` times X <- a X + (b A + c A^2) X with A = X X^T.
    With dtype=bfloat16 this is torch's function operation for operation (the same result bit for bit).
    """
    if grad.ndim != 2:
        raise ValueError(f"Newton-Schulz needs a 2-D matrix, got shape {tuple(grad.shape)}")
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix is then the smaller one
        x = x.T
    # out of place: in fp32 `grad.to` returns grad itself, which may be the momentum buffer
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz dtype follows each parameter's device (`newton_schulz_dtype`).

    The rest is torch's `_single_tensor_muon`: momentum lerp, Nesterov, decoupled weight decay by
    lr * weight_decay, then the orthogonalised update times torch's adjusted LR.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)  # torch's: checks, and creates the buffers
            lr, momentum = float(group["lr"]), group["momentum"]
            for param, grad, buf in zip(params, grads, bufs):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"],
                                                    group["eps"], newton_schulz_dtype(param.device))
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss
