"""A GPT-style causal decoder where every block variant of He et al. 2024 is a config field.

Reading order: make_norm -> RefRMSNorm -> Attention -> MLP -> Block -> GPT. As in the paper's public
code (a HF GPT-2 whose blocks it replaces): learned positions, tied embeddings, a ReLU MLP (4d) without
biases, trainable zero-initialised biases on the query and key projections only (`qk_bias`), QK-RMSNorm
as gain * x / (rms(x) + 1e-5) (`qk_norm='rms'`), and every matrix, embeddings included, drawn from
N(0, 0.02^2) with no depth scaling (GPT-2's is `scale_residual_init`, off by default). Its norm-free
blocks keep one LayerNorm, on block 0's attention input (`first_norm`). `tests/unit/core/test_reference.py`
checks the OP forward pass against a transcription of that code.

The probe taps the `nn.Identity` sites (`Block.input`, `Block.mid`, `GPT.unembed_pre_norm`,
`GPT.unembed_input`, `Attention.q_site`, `Attention.k_site`, and on the explicit attention path
`Attention.scores`, `Attention.probs`) with forward hooks; the model itself knows nothing of metrics,
quantisation or training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ofe.config import ModelConfig, NormKind
from ofe.core.osp import EmbedProj, SingleScaleRMSNorm

QK_NORM_EPS = 1e-5  # the public code's layer_norm_epsilon (HF GPT-2's default), used by its QK-norm


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


class RefRMSNorm(nn.Module):
    """The public code's RMSNorm: weight * x / (rms(x) + eps), eps added outside the square root.

    torch's nn.RMSNorm puts eps inside (x * rsqrt(mean(x^2) + eps)); the two differ where rms(x) is
    small, which is where QK-norm matters at initialisation (queries of a 0.02-init projection).
    """

    def __init__(self, dim: int, eps: float = QK_NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # 'weight', as nn.RMSNorm: 1-D, so never decayed

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # the mean of squares in fp32: under bf16 autocast it would lose the small rms
        rms = xf.pow(2).mean(-1, keepdim=True).sqrt()
        return (self.weight * (xf / (rms + self.eps))).to(x.dtype)


def make_qk_norm(kind: str, head_dim: int) -> nn.Module | None:
    """The QK-norm of `ModelConfig.qk_norm`: 'rms' (the public code's), 'rms_torch' or 'none'."""
    if kind == "rms":
        return RefRMSNorm(head_dim)
    if kind == "rms_torch":
        return nn.RMSNorm(head_dim)
    return None


class Attention(nn.Module):
    """Causal multi-head self-attention; optional Q/K bias, QK-RMSNorm and tanh logit cap.

    Two paths compute the same function: torch's fused SDPA kernel (the default), and an explicit one
    (`explicit = True`, or whenever `logit_cap` is set, since SDPA cannot cap logits) that shows the
    pre-softmax logits at `scores` and the attention probabilities at `probs`, for quantisation.
    """

    explicit: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        # The public code's QK projection is a Conv1D with a trainable bias and its V projection has
        # none, so the bias is a parameter of its own over [q | k] rather than qkv's bias over [q | k | v].
        self.qk_bias = nn.Parameter(torch.zeros(2 * cfg.d_model)) if cfg.qk_bias else None
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm = make_qk_norm(cfg.qk_norm, self.head_dim)
        self.k_norm = make_qk_norm(cfg.qk_norm, self.head_dim)
        self.logit_cap = cfg.logit_cap
        self.explicit = False  # a plain attribute: quantisation switches it on in its copy of the model
        self.q_site, self.k_site = nn.Identity(), nn.Identity()  # probe taps (attention entropy)
        self.scores, self.probs = nn.Identity(), nn.Identity()  # quantisation taps (explicit path only)
        self.qkv_out = nn.Identity()  # quantisation tap: the projection's output, bias included

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x)
        if self.qk_bias is not None:
            qkv = qkv + F.pad(self.qk_bias, (0, C))  # no bias on v
        q, k, v = self.qkv_out(qkv).split(C, dim=2)
        # (B, T, C) -> (B, H, T, hd)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.q_site(_apply(self.q_norm, q)), self.k_site(_apply(self.k_norm, k))
        if self.explicit or self.logit_cap is not None:
            y = self._explicit_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # fused kernel
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(mask(scores(cap(q k^T / sqrt(hd))))) v, every intermediate a tensor a hook can see."""
        T = q.shape[-2]
        logits = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, T)
        if self.logit_cap is not None:
            logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
        # the tap comes before the mask, so a quantiser never sees (or ranges over) the -inf entries
        logits = self.scores(logits)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        probs = self.probs(logits.masked_fill(~mask, float("-inf")).softmax(dim=-1))
        return probs @ v


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
