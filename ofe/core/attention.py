"""Causal self-attention and its variants (`ModelConfig.attention`; docs/science.md section 2).

One `Attention` module holds every variant; they differ only in how the logits become the weights that
multiply v, and in the gate after it:
- softmax: softmax(x) on torch's fused SDPA kernel (the default; He et al. 2024's models);
- clipped_softmax: clip((zeta - gamma) softmax(x) + gamma, 0, 1) (Bondarenko et al. 2023);
- gated_headwise / gated_elementwise: softmax attention, then times sigmoid(x_in W_g + b_g), one gate per head
  or per channel, before the output projection (Qiu et al. 2025, position G1);
- softmax1 / learned_sink: softmax over the real tokens plus one sink logit s per head whose probability
  is dropped, exp(x_i) / (exp(s) + sum_j exp(x_j)); s = 0 (E. Miller's softmax1) or trainable (gpt-oss);
- softpick: relu(exp(x_i) - 1) / (sum_j |exp(x_j) - 1| + eps) (Zuhri et al. 2025).

The weight functions (`clipped_softmax`, `sink_softmax`, `softpick`) take the logits and the causal mask
and are tested against transcriptions of their authors' code (tests/unit/core/test_attention.py).
Masked (future) entries get weight 0 and, for softpick and the sinks, add nothing to a denominator.

Taps (`nn.Identity` sites the probe and the quantisers hook): `q_site`, `k_site` (queries and keys as the
logits see them), `qkv_out` (the projection's output, bias included), and on the explicit path `scores`
(the logits before the mask) and `probs` (the weights that multiply v: for the gated variants before the
gate, for the sinks the real tokens' weights only, so a row sums to less than 1); `gate_out` (the sigmoid
gate, gated variants only; `gate` is its linear layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ofe.config import AttentionKind, ModelConfig

QK_NORM_EPS = 1e-5  # the public code's layer_norm_epsilon (HF GPT-2's default), used by its QK-norm
# The authors' causal-LM setting: gamma = -alpha / T with alpha 12 at their block size T = 512 (the OPT
# scripts' --alpha 12 and OPTAttentionWithExtras' max_seq_length=block_size); ofe's T is model.context.
CLIP_ALPHA = 12.0
SOFTPICK_EPS = 1e-8  # the authors' eps, added to the max-shifted denominator as their code does
# Variants whose weights are softmax's: they keep the fused kernel unless a tap or the logit cap needs the
# explicit path (a gate after the kernel changes nothing inside it).
FUSED: tuple[str, ...] = ("softmax", "gated_headwise", "gated_elementwise")
# Variants whose weights on the real tokens, renormalised, are softmax(q k^T / sqrt(hd)): the probe's
# attention_entropy (computed from q and k) is theirs. softmax1 and learned_sink only add a sink's mass to the
# denominator; clipped_softmax and softpick weigh tokens differently, and have no entropy row.
SOFTMAX_SHAPED: tuple[str, ...] = (*FUSED, "softmax1", "learned_sink")


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


def causal_mask(T: int, device: torch.device | str | None = None) -> Tensor:
    """(T, T) bool, True where query t may attend to key s (s <= t)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def clip_gamma(cfg: ModelConfig) -> float:
    """The clipped softmax's gamma: `clip_gamma`, or the authors' -alpha / T at T = context."""
    return cfg.clip_gamma if cfg.clip_gamma is not None else -CLIP_ALPHA / cfg.context


def clipped_softmax(logits: Tensor, mask: Tensor, zeta: float, gamma: float) -> Tensor:
    """clip((zeta - gamma) * softmax(x) + gamma, 0, 1) over the last dimension. With gamma < 0 a weight can
    reach exactly 0 at finite logits (and with zeta > 1 exactly 1), so a head can attend to nothing without
    pushing its logits apart; masked entries have softmax 0, hence gamma <= 0, hence 0 after the clip."""
    p = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.clip(p * (zeta - gamma) + gamma, 0.0, 1.0)


def sink_softmax(logits: Tensor, mask: Tensor, sinks: Tensor) -> Tensor:
    """exp(x_i) / (exp(s_h) + sum_j exp(x_j)): softmax over the real tokens and one sink logit s_h per head
    (`sinks`, shape (H,), logits (B, H, T, T)), the sink's own weight dropped. As gpt-oss computes it: the
    sink as one more column of the logits, a softmax, that column removed."""
    B, H, T, _ = logits.shape
    s = sinks.to(logits.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
    x = torch.cat([logits.masked_fill(~mask, float("-inf")), s], dim=-1)
    return x.softmax(dim=-1)[..., :-1]


def softpick(logits: Tensor, mask: Tensor, eps: float = SOFTPICK_EPS) -> Tensor:
    """relu(exp(x_i) - 1) / (sum_j |exp(x_j) - 1| + eps) over the unmasked entries, computed as the authors'
    release does: numerator and denominator times exp(-m), so no exp overflows (exp(x - m) - exp(-m)).
    A masked entry would add |0 - exp(-m)| to the denominator: it is zeroed.

    m is the row's maximum clamped at 0, where the release takes the maximum itself: a row whose logits
    are all below -88.7 then has exp(-m) = inf in fp32 (and bf16), weights 0/inf = 0 but NaN gradients,
    which ended a Pre-LN run of configs/attention.yaml (all of one query's logits < -92 at step 62). With
    m <= 0 every weight is exactly 0 (relu(exp(x) - 1) = 0 for x <= 0) and so is its gradient, whatever
    the shift, and for m > 0 the shift is the release's: every finite value of the release is unchanged."""
    future = ~mask
    x = logits.masked_fill(future, float("-inf"))
    m = x.amax(dim=-1, keepdim=True).clamp_min(0.0)  # every query sees at least itself: finite
    e = torch.exp(x - m) - torch.exp(-m)  # (exp(x) - 1) exp(-m); -exp(-m) where masked
    return F.relu(e) / (e.abs().masked_fill(future, 0.0).sum(dim=-1, keepdim=True) + eps)


class Attention(nn.Module):
    """Causal multi-head self-attention; optional Q/K bias, QK-RMSNorm, tanh logit cap, and the weight
    function and gate of `cfg.attention`.

    Two paths: torch's fused SDPA kernel for softmax and the gated variants (softmax inside), and an
    explicit one that shows the logits at `scores` and the weights at `probs` (for quantisation and
    probes). The explicit path runs when `explicit` is set, when `logit_cap` is set (SDPA cannot cap
    logits), and always for clipped_softmax, softmax1, learned_sink and softpick, which SDPA cannot compute.
    """

    explicit: bool = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.kind: AttentionKind = cfg.attention
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
        # Only a variant's own modules are built: a softmax model draws the same initial weights as before.
        if self.kind in ("gated_headwise", "gated_elementwise"):
            # Qwen's gate is extra output columns of its query projection (modeling_qwen3.py), so it has a
            # bias exactly when the queries do (ofe: qk_bias), zero-initialised, and its weight is drawn
            # like every matrix (GPT._init_weights: N(0, init_std^2), as Qwen's initializer_range 0.02).
            # A Linear of its own computes the same map and lets the quantisers see it as a linear layer.
            # Not named '*proj': scale_residual_init's depth scaling is for the residual branches' outputs.
            width = self.n_head if self.kind == "gated_headwise" else cfg.d_model
            self.gate = nn.Linear(cfg.d_model, width, bias=cfg.qk_bias)
            if self.gate.bias is not None:
                nn.init.zeros_(self.gate.bias)  # nn.Linear's own bias init is uniform, Qwen's zero
            self.gate_out = nn.Identity()  # tap: the sigmoid gate, (B, T, H, 1) or (B, T, H, hd)
        if self.kind == "learned_sink":
            # gpt-oss's per-head sink logit. Zero-initialised, not HF's N(0, 0.02^2): it starts at exactly
            # softmax1 (a logit of order 0.02 otherwise), and no draw for it shifts the other weights' draws.
            self.sinks = nn.Parameter(torch.zeros(cfg.n_head))  # 1-D: AdamW, never decayed, under every optimiser
        self.clip_zeta, self.clip_gamma = cfg.clip_zeta, clip_gamma(cfg)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x)
        if self.qk_bias is not None:
            qkv = qkv + F.pad(self.qk_bias, (0, C))  # no bias on v
        q, k, v = self.qkv_out(qkv).split(C, dim=2)
        # (B, T, C) -> (B, H, T, hd)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.q_site(_apply(self.q_norm, q)), self.k_site(_apply(self.k_norm, k))
        if self.explicit or self.logit_cap is not None or self.kind not in FUSED:
            y = self._explicit_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # fused kernel
        y = y.transpose(1, 2)  # (B, T, H, hd)
        if self.kind in ("gated_headwise", "gated_elementwise"):
            # the gate reads the attention's input x (after the block's norm, if any), as Qwen's q_proj does
            y = y * self.gate_out(torch.sigmoid(self.gate(x)).view(B, T, self.n_head, -1))
        return self.proj(y.contiguous().view(B, T, C))  # (B, T, C)

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """weights(mask, scores(cap(q k^T / sqrt(hd)))) v, every intermediate a tensor a hook can see."""
        logits = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, T)
        if self.logit_cap is not None:
            logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
        # the tap comes before the mask, so a quantiser never sees (or ranges over) the -inf entries
        logits = self.scores(logits)
        mask = causal_mask(q.shape[-2], q.device)
        probs = self.probs(self._weights(logits, mask))
        return probs.to(v.dtype) @ v

    def _weights(self, logits: Tensor, mask: Tensor) -> Tensor:
        """The attention weights of this variant. The new variants normalise in fp32 (as their authors'
        code upcasts, and as autocast does for softmax), whatever the logits' dtype."""
        if self.kind in FUSED:
            return logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        if self.kind == "clipped_softmax":
            return clipped_softmax(logits.float(), mask, self.clip_zeta, self.clip_gamma)
        if self.kind in ("softmax1", "learned_sink"):
            # softmax1 is the same mechanism with the logit fixed at 0: a constant, so no state of its own
            sinks = self.sinks if self.kind == "learned_sink" else logits.new_zeros(self.n_head)
            return sink_softmax(logits.float(), mask, sinks)
        return softpick(logits.float(), mask)
