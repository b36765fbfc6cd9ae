"""Metrics against closed forms and an independent NumPy reference (docs/science.md section 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ofe.core import metrics


def test_kurtosis_of_gaussian_is_one_plus_two_over_n():
    # s_j^2 ~ chi2_n / n: mean 1, variance 2/n, so E[s^4] / E[s^2]^2 = 1 + 2/n.
    g = torch.Generator().manual_seed(0)
    n, d = 64, 20000
    x = torch.randn(n, d, generator=g)
    assert metrics.kurtosis(x) == pytest.approx(1 + 2 / n, abs=0.004)


def test_kurtosis_bounds_equal_neurons_and_single_neuron():
    d = 96
    signs = torch.randint(0, 2, (50, d), generator=torch.Generator().manual_seed(1)) * 2.0 - 1
    assert metrics.kurtosis(signs * 3.0) == pytest.approx(1.0, abs=1e-6)  # every RMS equal
    one = torch.zeros(50, d)
    one[:, 7] = torch.randn(50)
    assert metrics.kurtosis(one) == pytest.approx(d, rel=1e-5)  # one neuron carries everything


def test_planted_outlier_neuron_matches_closed_form():
    # d-1 neurons of RMS 1 and one of RMS a: Kurt = ((d-1 + a^4)/d) / ((d-1 + a^2)/d)^2.
    d, a = 768, 30.0
    x = torch.randint(0, 2, (256, d), generator=torch.Generator().manual_seed(2)) * 2.0 - 1
    x[:, 100] *= a
    expected = ((d - 1 + a**4) / d) / ((d - 1 + a**2) / d) ** 2
    assert expected == pytest.approx(224.1, abs=0.1)  # the paper (He et al. 2024): "about 230" with Gaussian X
    assert metrics.kurtosis(x) == pytest.approx(expected, rel=1e-5)


def test_kurtosis_matches_numpy_reference_and_ignores_leading_shape():
    rng = np.random.default_rng(3)
    x = rng.standard_t(df=3, size=(4, 16, 40)).astype(np.float32)
    flat = x.reshape(-1, 40).astype(np.float64)
    s2 = (flat**2).mean(axis=0)
    ref = (s2**2).mean() / s2.mean() ** 2
    assert metrics.kurtosis(torch.from_numpy(x)) == pytest.approx(ref, rel=1e-5)
    # bf16 input is measured in fp32
    assert metrics.kurtosis(torch.from_numpy(x).bfloat16()) == pytest.approx(ref, rel=2e-2)


def test_centred_variant_relation_to_kurtosis():
    # var_j(s_j^2 / mean s^2), unbiased, of the width-centred X == d/(d-1) (Kurt(centred X) - 1).
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(200, 50)) * rng.uniform(0.1, 5, size=50) + 2.0)
    d = x.shape[1]
    xc = x - x.mean(dim=1, keepdim=True)
    assert metrics.rms_sq_variance_centred(x) == pytest.approx(d / (d - 1) * (metrics.kurtosis(xc) - 1), rel=1e-6)
    # and it is 0, not 1, for equal neurons: a different scale from the paper's Kurt
    s = torch.randint(0, 2, (10, 4), generator=torch.Generator().manual_seed(5)) * 2.0 - 1
    pairs = torch.stack([s, -s], dim=2).reshape(10, 8)  # every token's width-mean is 0, every |x| is 1
    assert metrics.rms_sq_variance_centred(pairs) == pytest.approx(0.0, abs=1e-12)
    assert metrics.kurtosis(pairs) == pytest.approx(1.0)


def test_max_median_ratio_of_known_matrix():
    x = torch.tensor([[1.0, -2.0, 3.0, 4.0, 100.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    # uncentred: row 1: max 100 / median 3; row 2: 2 / 2 = 1
    assert metrics.max_median_ratio_uncentred(x) == pytest.approx((100 / 3 + 1) / 2)


def test_rms():
    assert metrics.rms(torch.full((3, 4), -2.0)) == pytest.approx(2.0)


def test_token_correlation_extremes():
    g = torch.Generator().manual_seed(6)
    row = torch.randn(1, 64, generator=g)
    assert metrics.token_correlation(row.repeat(100, 1)) == pytest.approx(1.0, abs=1e-5)  # rank collapse
    indep = torch.randn(300, 512, generator=g)
    assert abs(metrics.token_correlation(indep, max_tokens=300)) < 0.01


def test_token_correlation_subsamples_evenly():
    x = torch.randn(1000, 16)
    sub = metrics.subsample_tokens(x, 10)
    assert sub.shape == (10, 16)
    assert torch.equal(sub[0], x[0]) and torch.equal(sub[-1], x[-1])


def test_attention_entropy_of_uniform_attention():
    # q = 0 gives equal logits: row t attends uniformly to t+1 keys, entropy log(t+1).
    B, H, T, hd = 2, 3, 10, 4
    q = torch.zeros(B, H, T, hd)
    k = torch.randn(B, H, T, hd)
    expected = sum(math.log(t + 1) for t in range(T)) / T
    assert metrics.attention_entropy(q, k) == pytest.approx(expected, rel=1e-6)


def test_attention_entropy_collapses_with_peaked_logits():
    T = 8
    k = torch.zeros(1, 1, T, 2)
    k[..., 0, 0] = 1.0  # only key 0 matches the queries
    q = torch.zeros(1, 1, T, 2)
    q[..., 0] = 1000.0
    assert metrics.attention_entropy(q, k) == pytest.approx(0.0, abs=1e-4)
    # the tanh cap bounds the logits, so entropy rises again
    assert metrics.attention_entropy(q, k, logit_cap=1.0) > 0.5


def test_max_median_ratio_centres_each_token_across_the_width():
    """One token [1, 1, 1, 5]: uncentred max/median = 5/1; centred (mean 2) = |3| / median(1,1,1,3) = 3."""
    from ofe.core.metrics import max_median_ratio, max_median_ratio_uncentred

    x = torch.tensor([[1.0, 1.0, 1.0, 5.0]])
    assert max_median_ratio_uncentred(x) == pytest.approx(5.0)
    assert max_median_ratio(x) == pytest.approx(3.0)


def test_correlation_rms_closed_forms():
    """Features f1 = a, f2 = -a, f3 = 0 across 4 tokens (each token width-centred already): after the
    division by the global RMS the feature Gram's (1,2) entry is -1.5 (the public code normalises by the
    global RMS, not per feature, so entries are not confined to [-1, 1]) and 0 elsewhere. Tokens: two
    equal ones and one orthogonal to them, so the RMS (1/sqrt 3) and the mean (1/3) of the token Gram's
    off-diagonal entries differ."""
    from ofe.core.metrics import feature_correlation_rms, token_correlation, token_correlation_rms

    a = torch.tensor([1.0, -1.0, 2.0, -2.0])
    x = torch.stack([a, -a, torch.zeros(4)], dim=1)  # (4 tokens, 3 features); each row sums to 0
    # Xn = x / rms(x), rms^2 = mean(x^2) = 2 * mean(a^2) / 3 = 5/3; Gram_12 = -mean(a^2)/rms^2 = -1.5
    g12 = -2.5 / (5 / 3)
    assert feature_correlation_rms(x) == pytest.approx(math.sqrt(2 * g12**2 / 6), rel=1e-6)
    # identical tokens (up to a common shape) -> every token Gram entry equal -> rms == |mean|
    same = torch.tensor([[1.0, -1.0, 0.0]]).repeat(5, 1)
    assert token_correlation_rms(same) == pytest.approx(abs(token_correlation(same)), rel=1e-6)
    assert token_correlation_rms(same) == pytest.approx(1.0, rel=1e-6)
    # t1 = t2 = [1,-1,0,0], t3 = [0,0,1,-1]: global RMS 1/sqrt 2, so Xn = sqrt 2 x and the Gram / d has
    # entries 1 for (1,2) and (2,1), 0 for the four others: RMS sqrt(2/6), mean 2/6
    t = torch.tensor([[1.0, -1.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]])
    assert token_correlation_rms(t) == pytest.approx(math.sqrt(1 / 3), rel=1e-6)
    assert token_correlation(t) == pytest.approx(1 / 3, rel=1e-6)
