"""Outlier-feature metrics: pure fp32 functions of an activation tensor (docs/science.md section 1).

The stream metrics take X of shape (..., d): all leading dimensions are tokens, the last is the width
(`massive_activations` alone needs the sequences apart: (B, T, d)). The attention metrics take the
attention weights (..., T, T) or queries and keys. Nothing here knows about models, hooks or files.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def _tokens_by_width(x: Tensor) -> Tensor:
    """(..., d) -> (n, d) in fp32: metrics are defined over tokens x neurons, in full precision."""
    return x.detach().reshape(-1, x.shape[-1]).float()


def kurtosis(x: Tensor) -> float:
    """The paper's Kurt(X) = mean_j(s_j^4) / mean_j(s_j^2)^2, s_j = RMS of neuron j over tokens.

    Uncentred (docs/science.md section 1): 1 when every neuron has the same RMS, d when one neuron carries
    everything; i.i.d. Gaussian X gives about 1 + 2/n.
    """
    s2 = _tokens_by_width(x).pow(2).mean(dim=0)  # (d,) squared RMS per neuron
    return (s2.pow(2).mean() / s2.mean().pow(2)).item()


def rms_sq_variance_centred(x: Tensor) -> float:
    """The public code's variant (docs/science.md section 1): centre each token across width, then the
    unbiased variance over neurons of s_j^2 / mean(s^2). Equals d/(d-1) * (Kurt(centred X) - 1):
    0 for equal neurons. Not comparable with `kurtosis`; logged so the two are never confused.
    """
    xt = _tokens_by_width(x)
    xc = xt - xt.mean(dim=1, keepdim=True)
    s2 = xc.pow(2).mean(dim=0)
    return (s2 / s2.mean()).var(unbiased=True).item()


def max_median_ratio(x: Tensor) -> float:
    """MMR as the public code computes it: centre each token across the width, then the mean over tokens
    of max_j |X[t, j]| / median_j |X[t, j]|."""
    xt = _tokens_by_width(x)
    return max_median_ratio_uncentred(xt - xt.mean(dim=1, keepdim=True))


def max_median_ratio_uncentred(x: Tensor) -> float:
    """MMR without centring: mean over tokens of max_j |X[t, j]| / median_j |X[t, j]| (about 5 for
    Gaussian, d=768). Differs from the centred one on spiky activations; kept under its own name."""
    a = _tokens_by_width(x).abs()
    return (a.max(dim=1).values / a.median(dim=1).values).mean().item()


def _width_centred_normalised(x: Tensor, max_tokens: int) -> Tensor:
    """The public code's normalisation for its Gram statistics: width-centred, divided by global RMS."""
    xt = subsample_tokens(x, max_tokens)
    xc = xt - xt.mean(dim=1, keepdim=True)
    return xc / (xc.pow(2).mean().sqrt() + 1e-8)


def _off_diagonal_rms(gram: Tensor) -> float:
    n = gram.shape[0]
    if n < 2:
        return math.nan
    off = gram.pow(2).sum() - gram.diagonal().pow(2).sum()
    return (off / (n * (n - 1))).sqrt().item()


def feature_correlation_rms(x: Tensor, max_tokens: int = 1024) -> float:
    """RMS of the off-diagonal entries of the feature Gram Xn^T Xn / n (the public code's
    `feat_corr_rms`, Xn as in `token_correlation`): how strongly neurons co-activate. d x d, so it
    costs d^2 n: fine at the probe's cadence up to d of a few thousand."""
    xn = _width_centred_normalised(x, max_tokens)
    return _off_diagonal_rms(xn.T @ xn / xn.shape[0])


def token_correlation_rms(x: Tensor, max_tokens: int = 256) -> float:
    """RMS of the off-diagonal entries of the token Gram Xn Xn^T / d (the public code's
    `batch_corr_rms`); `token_correlation` is their mean."""
    xn = _width_centred_normalised(x, max_tokens)
    return _off_diagonal_rms(xn @ xn.T / xn.shape[1])


def rms(x: Tensor) -> float:
    """Global RMS of X: the scale of the residual stream."""
    return _tokens_by_width(x).pow(2).mean().sqrt().item()


def subsample_tokens(x: Tensor, max_tokens: int) -> Tensor:
    """Evenly spaced rows of the (n, d) view, at most `max_tokens` of them (deterministic)."""
    xt = _tokens_by_width(x)
    n = xt.shape[0]
    if n <= max_tokens:
        return xt
    idx = torch.linspace(0, n - 1, max_tokens).round().long()
    return xt[idx]


def token_correlation(x: Tensor, max_tokens: int = 256) -> float:
    """Signal propagation: mean off-diagonal entry of Xn Xn^T / d, with Xn the width-centred X divided
    by its global RMS (the public code's version, docs/science.md section 1). Near 1 means rank collapse.
    Tokens are subsampled because the Gram matrix is n x n.
    """
    xt = subsample_tokens(x, max_tokens)
    n, d = xt.shape
    if n < 2:
        return math.nan
    xc = xt - xt.mean(dim=1, keepdim=True)
    xn = xc / xc.pow(2).mean().sqrt()
    gram = xn @ xn.T / d
    off_diag = gram.sum() - gram.diagonal().sum()
    return (off_diag / (n * (n - 1))).item()


def attention_entropy(q: Tensor, k: Tensor, logit_cap: float | None = None) -> float:
    """Mean Shannon entropy (nats) of causal attention rows, from queries and keys of shape
    (B, H, T, hd) as the attention sees them (after any QK-norm). Entropy collapse is what QK-norm
    prevents (docs/science.md section 2); `logit_cap` applies the same tanh soft-cap the model uses.
    """
    q, k = q.detach().float(), k.detach().float()
    t = q.shape[-2]
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if logit_cap is not None:
        logits = logit_cap * torch.tanh(logits / logit_cap)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    ent = -(logp.exp() * logp.masked_fill(~causal, 0.0)).sum(dim=-1)  # (B, H, T)
    return ent.mean().item()


def attention_entropy_from_probs(probs: Tensor) -> float:
    """Mean Shannon entropy (nats) of attention rows given the probabilities themselves, (..., T_q, T_k)
    (what a pretrained model's eager attention returns). Masked entries are exactly 0 and contribute
    0 log 0 = 0, so on the same attention this equals `attention_entropy`."""
    p = probs.detach().float()
    return -torch.special.xlogy(p, p).sum(dim=-1).mean().item()


def kurtosis_osp(x: Tensor) -> float:
    """Outlier-Safe Pre-Training's excess kurtosis (Park et al. 2025, docs/science.md section 1): per
    token, the raw fourth moment over the width divided by the fourth power of the token's (centred,
    unbiased) standard deviation, minus 3; negative values clipped to 0; then the mean over tokens.
    The clipping leaves a floor from sampling noise: i.i.d. Gaussian tokens score 0.14 at d = 128 and
    0.04 at d = 2048 (simulated; tending to sqrt(24 / d) / sqrt(2 pi))."""
    xt = _tokens_by_width(x)
    per_token = xt.pow(4).mean(dim=1) / xt.std(dim=1).pow(4) - 3
    return per_token.clamp(min=0).mean().item()


# ---- massive activations (Sun et al. 2024) -------------------------------------------------------

MASSIVE_TOP_K = 3  # Sun et al. plot the three largest magnitudes of each layer against the median


def massive_activations(x: Tensor) -> dict[str, float]:
    """The largest |X| entries against the median |X|, as Sun et al.'s public code computes them
    (docs/science.md section 1): per sequence, the top 1..3 of |X| and its median over all (token, width)
    entries of that sequence (torch's median: the lower middle value), each averaged over sequences;
    `massive_ratio` is the averaged top-1 over the averaged median. X is (B, T, d), or (T, d) for one
    sequence."""
    a = x.detach().float().abs()
    a = a.reshape(-1, a.shape[-2] * a.shape[-1])  # (sequences, T d)
    top = a.topk(MASSIVE_TOP_K, dim=1).values.mean(dim=0)
    median = a.median(dim=1).values.mean()
    out = {f"massive_top{i + 1}": top[i].item() for i in range(MASSIVE_TOP_K)}
    out["massive_median"] = median.item()
    out["massive_ratio"] = (top[0] / median).item()
    return out


# ---- attention sinks and sparsity (Gu et al. 2024), from the attention weights -------------------

SINK_EPSILON = 0.3  # Gu et al.'s threshold on a head's mean attention to the first token


class AttentionSummary(NamedTuple):
    """What the attention metrics need of one layer's (B, H, T, T) weights: small enough to keep for
    every layer while the forward pass goes on (a probe hook reduces the weights to it)."""

    first_token: Tensor  # (B, H): each head's mean weight on key 0 over all T queries (Gu et al.'s alpha_0)
    zeros: Tensor  # 0-d: exactly-zero weights among the causal entries (key <= query)
    causal: int  # the number of causal entries, B H T (T + 1) / 2


def summarise_attention(probs: Tensor) -> AttentionSummary:
    """Reduce attention weights (..., T, T) (query, key; the weights that multiply v) to an
    `AttentionSummary`. Gu et al. score key k by sum_q A[q, k] / (T - k), the mean over the T - k queries
    that can see it; for the first key that is the mean over every query, the first one (whose only
    weight is on itself) included, as in their code."""
    p = probs.detach()
    t = p.shape[-1]
    if p.shape[-2] != t:
        raise ValueError(f"expected square attention weights (..., T, T), got {tuple(p.shape)}")
    causal = torch.ones(t, t, dtype=torch.bool, device=p.device).tril()
    first = p[..., :, 0].float().mean(dim=-1)
    zeros = ((p == 0) & causal).sum()
    return AttentionSummary(first, zeros, int(causal.sum().item()) * (p.numel() // (t * t)))


def attention_metrics(summary: AttentionSummary, epsilon: float = SINK_EPSILON) -> dict[str, float]:
    """`sink_rate`: the share of (sequence, head) pairs whose mean weight on the first token exceeds
    epsilon (Gu et al.'s metric at k = 0, a fraction here where they print percent);
    `first_token_attention`: that mean weight averaged over sequences and heads; `attention_sparsity`:
    the share of exactly-zero weights among the causal entries (softpick's rectified weights)."""
    first = summary.first_token.float()
    return {
        "sink_rate": (first > epsilon).float().mean().item(),
        "first_token_attention": first.mean().item(),
        "attention_sparsity": summary.zeros.item() / summary.causal,
    }


# The metrics the probe logs at every residual-stream site, by name (the name is the Parquet value).
STREAM_METRICS = {
    "kurtosis": kurtosis,
    "rms_sq_variance_centred": rms_sq_variance_centred,
    "max_median_ratio": max_median_ratio,
    "max_median_ratio_uncentred": max_median_ratio_uncentred,
    "token_correlation": token_correlation,
    "token_correlation_rms": token_correlation_rms,
    "feature_correlation_rms": feature_correlation_rms,
    "rms": rms,
    "kurtosis_osp": kurtosis_osp,
}
# Massive activations are measured on the stream entering each block and on the last block's output:
# together, every block's output, which is where Sun et al. hook (their layers 1..L).
MASSIVE_SITES = ("block_input", "unembed_input_pre_norm")
