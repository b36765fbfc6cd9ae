"""A GPT-style causal decoder where every block variant of PAPER.md section 2 is a config field.

Reading order: make_norm -> Attention -> MLP -> Block -> GPT. Learned positions, tied embeddings,
ReLU MLP (4d) without biases, N(0, 0.02^2) init, as in the paper's public code. The probe taps the
`nn.Identity` sites (`Block.input`, `Block.mid`, `GPT.unembed_pre_norm`, `GPT.unembed_input`, `Attention.q_site`,
`Attention.k_site`) with forward hooks; the model itself knows nothing of metrics or training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ofe.config import ModelConfig, NormKind


def make_norm(kind: NormKind, dim: int) -> nn.Module | None:
    """A norm layer of the given kind, or None for 'none' (so OP blocks hold no norm module)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim)
    if kind == "srms":
        return nn.RMSNorm(dim, elementwise_affine=False)
    return None


def _apply(norm: nn.Module | None, x: Tensor) -> Tensor:
    return x if norm is None else norm(x)


class Attention(nn.Module):
    """Causal multi-head self-attention; optional QK-RMSNorm and tanh logit cap (entropy regulation)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # QK-norm: RMSNorm over the head dimension with a learnable gain (PAPER.md section 2).
        self.q_norm = nn.RMSNorm(self.head_dim) if cfg.qk_norm == "rms" else None
        self.k_norm = nn.RMSNorm(self.head_dim) if cfg.qk_norm == "rms" else None
        self.logit_cap = cfg.logit_cap
        self.q_site, self.k_site = nn.Identity(), nn.Identity()  # probe taps (attention entropy)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, hd)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.q_site(_apply(self.q_norm, q)), self.k_site(_apply(self.k_norm, k))
        if self.logit_cap is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # fused kernel
        else:
            y = self._capped_attention(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)

    def _capped_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Explicit attention, since SDPA cannot apply cap * tanh(logits / cap) before the softmax."""
        T = q.shape[-2]
        logits = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, T)
        logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~mask, float("-inf"))
        return logits.softmax(dim=-1) @ v


class MLP(nn.Module):
    """ReLU MLP of width mlp_ratio * d, without biases (the public code's)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)))


class Block(nn.Module):
    """One transformer block.

    pre:  x = x + beta_attn * attn(norm1(x));  x = x + beta_mlp * mlp(norm2(x))
    post: x = norm1(x + beta_attn * attn(x));  x = norm2(x + beta_mlp * mlp(x))
    With norm 'none' both are the same un-normalised residual block (no norm module exists).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.post = cfg.norm_position == "post"
        self.norm1, self.norm2 = make_norm(cfg.norm, cfg.d_model), make_norm(cfg.norm, cfg.d_model)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        beta = torch.full((2,), float(cfg.beta))  # [attention branch, MLP branch]
        if cfg.beta_trainable:
            self.beta = nn.Parameter(beta)
        else:
            self.register_buffer("beta", beta)
        self.input = nn.Identity()  # probe tap: the residual stream entering the block
        self.mid = nn.Identity()  # tap: the residual sum between the two branches (quantisation)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input(x)
        if self.post:
            x = self.mid(_apply(self.norm1, x + self.beta[0] * self.attn(x)))
            return _apply(self.norm2, x + self.beta[1] * self.mlp(x))
        x = self.mid(x + self.beta[0] * self.attn(_apply(self.norm1, x)))
        return x + self.beta[1] * self.mlp(_apply(self.norm2, x))


class GPT(nn.Module):
    """Token + learned position embeddings -> [embed norm] -> blocks -> [final norm] -> tied head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.embed_norm = make_norm(cfg.embed_norm, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.final_norm = make_norm(cfg.final_norm, cfg.d_model)
        self.unembed_pre_norm, self.unembed_input = nn.Identity(), nn.Identity()  # probe taps
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith(".weight") and p.dim() == 2:
                std = self.cfg.embed_init_std if name.startswith(("wte", "wpe")) else self.cfg.init_std
                if self.cfg.scale_residual_init and name.endswith("proj.weight"):
                    std /= math.sqrt(2 * self.cfg.n_layer)  # GPT-2: the residual sum grows with depth
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx, targets: (B, T) token ids -> logits (B, T, V) and the mean cross-entropy (or None)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = _apply(self.embed_norm, self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.unembed_input(_apply(self.final_norm, self.unembed_pre_norm(x)))
        logits = x @ self.wte.weight.T  # tied embeddings: (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
