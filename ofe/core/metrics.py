"""Outlier-feature metrics: pure fp32 functions of an activation tensor (docs/science.md section 1).

Every function takes X of shape (..., d): all leading dimensions are tokens, the last is the width.
Nothing here knows about models, hooks or files.
"""

from __future__ import annotations

import math

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
}
