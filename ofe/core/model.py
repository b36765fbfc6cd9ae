"""A GPT-style causal decoder where every block variant of He et al. 2024 is a config field.

Reading order: make_norm -> MLP -> Block -> GPT; the attention, its variants (`model.attention`) and the
QK-norm are in `ofe.core.attention`. As in the paper's public code (a HF GPT-2 whose blocks it replaces):
learned positions, tied embeddings, a ReLU MLP (4d) without biases, trainable zero-initialised biases on
the query and key projections only (`qk_bias`), QK-RMSNorm as gain * x / (rms(x) + 1e-5)
(`qk_norm='rms'`), and every matrix, embeddings included, drawn from N(0, 0.02^2) with no depth scaling
(GPT-2's is `scale_residual_init`, off by default). Its norm-free blocks keep one LayerNorm, on block 0's
attention input (`first_norm`). `tests/unit/core/test_reference.py` checks the OP forward pass against a
transcription of that code.

The probe taps the `nn.Identity` sites (`Block.input`, `Block.mid`, `GPT.unembed_pre_norm`,
`GPT.unembed_input`, and `ofe.core.attention.Attention`'s) with forward hooks; the model itself knows
nothing of metrics, quantisation or training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ofe.config import ModelConfig, NormKind
from ofe.core.attention import Attention
from ofe.core.osp import EmbedProj, SingleScaleRMSNorm


def make_norm(kind: NormKind, dim: int) -> nn.Module | None:
    """A norm layer of the given kind, or None for 'none' (so OP blocks hold no norm module)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim)
    if kind == "srms":
        return nn.RMSNorm(dim, elementwise_affine=False)
    if kind == "single_scale":
        return SingleScaleRMSNorm()  # OSP's SSNorm: one scalar gain, whatever the width
    return None


def _apply(norm: nn.Module | None, x: Tensor) -> Tensor:
    return x if norm is None else norm(x)


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
    With norm 'none' both are the same un-normalised residual block (no norm module exists), except
    that the first block (`first=True`) with first_norm 'block0_attn_input' has norm1, a LayerNorm,
    on its attention input only.
    """

    def __init__(self, cfg: ModelConfig, first: bool = False) -> None:
        super().__init__()
        # Without block norms pre and post are one block; 'pre' keeps block 0's LN on the branch input.
        self.post = cfg.norm_position == "post" and cfg.norm != "none"
        self.norm1, self.norm2 = make_norm(cfg.norm, cfg.d_model), make_norm(cfg.norm, cfg.d_model)
        if first and cfg.first_norm == "block0_attn_input":
            self.norm1 = nn.LayerNorm(cfg.d_model)  # the public code's "always use LN in first layer"
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
    """Token + learned position embeddings -> [embedding projection] -> [embed_stream norm] -> blocks ->
    [final norm] -> [head projection] -> tied head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        # first_norm 'embed_stream' normalises the stream itself; 'block0_attn_input' lives in blocks[0]
        self.embed_norm = nn.LayerNorm(cfg.d_model) if cfg.first_norm == "embed_stream" else None
        # OSP's EmbProj (model.embed_proj): orthogonal d x d maps after the embedding and before the head
        self.embed_proj_in = EmbedProj(cfg.d_model) if cfg.embed_proj else None
        self.blocks = nn.ModuleList(Block(cfg, first=i == 0) for i in range(cfg.n_layer))
        self.final_norm = make_norm(cfg.final_norm, cfg.d_model)
        self.embed_proj_out = EmbedProj(cfg.d_model) if cfg.embed_proj else None
        self.unembed_pre_norm, self.unembed_input = nn.Identity(), nn.Identity()  # probe taps
        self._init_weights()

    def _init_weights(self) -> None:
        """Every matrix from N(0, std^2); biases stay at zero and norm gains at one (torch's defaults).
        The embedding projections keep the orthogonal weights they were built with (OSP's init)."""
        for name, p in self.named_parameters():
            if name.endswith(".weight") and p.dim() == 2 and not name.startswith("embed_proj"):
                std = self.cfg.embed_init_std if name.startswith(("wte", "wpe")) else self.cfg.init_std
                if self.cfg.scale_residual_init and name.endswith("proj.weight"):
                    std /= math.sqrt(2 * self.cfg.n_layer)  # GPT-2: the residual sum grows with depth
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx, targets: (B, T) token ids -> logits (B, T, V) and the mean cross-entropy (or None)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        # OSP projects the token embedding; ours has learned positions too, both tables trained by AdamW
        # under muon, so the projection takes their sum (docs/model.md, "OSP's recipe")
        x = _apply(self.embed_norm, _apply(self.embed_proj_in, self.wte(idx) + self.wpe(pos)))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.unembed_input(_apply(self.final_norm, self.unembed_pre_norm(x)))
        logits = _apply(self.embed_proj_out, x) @ self.wte.weight.T  # tied embeddings: (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
