"""Massive activations, attention sinks and sparsity, and OSP's kurtosis against planted cases with closed
forms, and against transcriptions of the authors' public code (docs/science.md section 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ofe.core import metrics


# ---- massive activations (Sun et al. 2024, locuslab/massive-activations) ---------------------------

def _signs(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)) * 2.0 - 1


def test_one_planted_massive_activation_is_top1_over_a_known_median():
    # every |h| is 1 except one entry of 2500 (token 0, channel 7) in each sequence
    x = _signs(3, 16, 32, seed=0)
    x[:, 0, 7] = -2500.0
    got = metrics.massive_activations(x)
    assert got == pytest.approx({"massive_top1": 2500.0, "massive_top2": 1.0, "massive_top3": 1.0,
                                 "massive_median": 1.0, "massive_ratio": 2500.0})


def test_massive_statistics_are_per_sequence_then_averaged():
    # sequence 0: 1000, 50, 20 over a floor of |1|; sequence 1: 600, 40, 10 over a floor of |3|.
    # Per sequence, then averaged (Sun et al.'s code): tops 800, 45, 15, median 2, ratio 800 / 2.
    x = _signs(2, 4, 8, seed=1)
    x[1] *= 3
    for b, (i, j, v) in [(0, (0, 3, 1000.0)), (0, (2, 5, -50.0)), (0, (1, 1, 20.0)),
                         (1, (3, 0, -600.0)), (1, (0, 0, 40.0)), (1, (2, 7, 10.0))]:
        x[b, i, j] = v
    got = metrics.massive_activations(x)
    assert got == pytest.approx({"massive_top1": 800.0, "massive_top2": 45.0, "massive_top3": 15.0,
                                 "massive_median": 2.0, "massive_ratio": 400.0})
    # over the pooled batch the median would be 1 or 3 and the ratio 1000 / median: not what is logged
    assert got["massive_ratio"] != pytest.approx(1000.0)


def test_massive_median_is_torchs_lower_middle_value_and_2d_is_one_sequence():
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0]])  # 4 entries: numpy's median would be 2.5
    got = metrics.massive_activations(x)
    assert got["massive_median"] == 2.0 and got["massive_top1"] == 4.0 and got["massive_ratio"] == 2.0


def test_massive_activations_match_a_transcription_of_the_public_code():
    # lib/plot_utils_llm.py + main_llm.py (exp2): per sequence, sort |feat| flattened, take the first
    # three and torch.median(|feat|); np.mean over sequences. Here the batch's sequences are theirs.
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_t(df=2, size=(5, 12, 24)).astype(np.float32))
    stats = []
    for seq in x:
        feat_abs = seq.unsqueeze(0).abs()
        sort_res = torch.sort(feat_abs.flatten(), descending=True)
        stats.append([*sort_res.values[:3].tolist(), torch.median(feat_abs).item()])
    mean = np.mean(np.array(stats), axis=0)
    got = metrics.massive_activations(x)
    want = [got["massive_top1"], got["massive_top2"], got["massive_top3"], got["massive_median"]]
    np.testing.assert_allclose(want, mean, rtol=1e-6)
    assert got["massive_ratio"] == pytest.approx(mean[0] / mean[3], rel=1e-6)


# ---- attention sinks and sparsity (Gu et al. 2024, sail-sg/Attention-Sink) --------------------------

def _planted_attention(first: list[float], t: int = 4) -> torch.Tensor:
    """(1, H, T, T) causal weights: query 0 on itself; every later query puts first[h] on key 0 and the
    rest evenly on keys 1..q."""
    probs = torch.zeros(1, len(first), t, t, dtype=torch.float64)
    for h, w in enumerate(first):
        probs[0, h, 0, 0] = 1.0
        for q in range(1, t):
            probs[0, h, q, 0] = w
            probs[0, h, q, 1:q + 1] = (1 - w) / q
    return probs


def test_sink_rate_and_first_token_mass_of_a_planted_attention():
    # alpha_0 = (1 + (T - 1) w) / T with query 0's own weight of 1 included (Gu et al.'s sum / (T - k)):
    # w = 0.9, 0.2, 0.1, 0.0 at T = 4 give 0.925, 0.4, 0.325, 0.25. The third head's later queries put only
    # 0.1 on the first token, but query 0 lifts its mean above 0.3: it counts, as in their code.
    s = metrics.summarise_attention(_planted_attention([0.9, 0.2, 0.1, 0.0]))
    np.testing.assert_allclose(s.first_token[0].numpy(), [0.925, 0.4, 0.325, 0.25], rtol=1e-6)
    got = metrics.attention_metrics(s)
    assert got["sink_rate"] == pytest.approx(3 / 4)
    assert got["first_token_attention"] == pytest.approx((0.925 + 0.4 + 0.325 + 0.25) / 4)
    assert got["attention_sparsity"] == pytest.approx(3 / 40)  # w = 0: 3 zeros among 4 heads' 10 causal entries
    assert metrics.attention_metrics(s, epsilon=0.5)["sink_rate"] == pytest.approx(1 / 4)


def test_sink_rate_matches_a_transcription_of_the_public_code():
    # eval_sink_open_source.py, compute_attention_sink: ratios = arange(T, 0, -1) along the key axis,
    # importance = (A / ratios).sum(dim=-2), metric = (importance > eps).mean(dim=(samples, layers, heads)).
    g = torch.Generator().manual_seed(3)
    n_samples, n_layers, n_heads, t = 3, 2, 6, 16
    logits = torch.randn(n_samples, n_layers, n_heads, t, t, generator=g) * 2
    logits[..., 0] += torch.randn(n_samples, n_layers, n_heads, 1, generator=g) * 3  # some heads sink
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    ratios = torch.arange(t, 0, -1)[None, None, None, :].expand(n_samples, n_layers, n_heads, t, t).to(scores)
    importance = (scores / ratios).sum(dim=-2)
    theirs = (importance > 0.3).to(torch.float).mean(dim=(0, 1, 2))[0].item()  # key 0, as a fraction
    # ours: one layer at a time, the batch's sequences as their samples; their layer mean of equal-sized layers
    per_layer = [metrics.attention_metrics(metrics.summarise_attention(scores[:, layer]))
                 for layer in range(n_layers)]
    assert 0 < theirs < 1  # the planted case has sinks and non-sinks
    assert np.mean([m["sink_rate"] for m in per_layer]) == pytest.approx(theirs)
    assert np.mean([m["first_token_attention"] for m in per_layer]) == pytest.approx(
        importance[..., 0].mean().item(), rel=1e-6)


def test_attention_sparsity_counts_exact_zeros_among_causal_entries_only():
    # the planted head with w = 0: queries 1..3 put nothing on key 0, 3 zeros of the 10 causal entries;
    # the 6 masked entries above the diagonal are zero too and are not counted
    s = metrics.summarise_attention(_planted_attention([0.0, 0.5]))
    assert int(s.zeros) == 3 and s.causal == 2 * 10
    assert metrics.attention_metrics(s)["attention_sparsity"] == pytest.approx(3 / 20)
    # rows that need not sum to 1 (softpick's rectified weights): B = 2 sequences, H = 1, T = 3, 12 causal
    # entries; the zeros at (query, key) (1, 0), (2, 2) and (1, 0), (1, 1), (2, 0), (2, 2): 6
    w = torch.tensor([[1.0, 0, 0], [0.0, 1.0, 0], [0.5, 0.5, 0.0]])
    v = torch.tensor([[1.0, 0, 0], [0.0, 0.0, 0], [0.0, 0.5, 0.0]])
    probs = torch.stack([w, v]).unsqueeze(1)
    assert metrics.attention_metrics(metrics.summarise_attention(probs))["attention_sparsity"] == pytest.approx(6 / 12)


def test_summarise_attention_refuses_non_square_weights():
    with pytest.raises(ValueError, match="square"):
        metrics.summarise_attention(torch.zeros(1, 1, 3, 4))


# ---- OSP's kurtosis (Park et al. 2025, dmis-lab/Outlier-Safe-Pre-Training) --------------------------

def test_osp_kurtosis_of_planted_tokens():
    # a spike token (d at one channel, 0 elsewhere): raw m4 = d^3, unbiased centred variance d, so
    # d^3 / d^2 - 3 = d - 3; an alternating +-1 token: m4 = 1, variance d / (d - 1), excess < 0 -> 0
    d = 8
    spike = torch.zeros(d)
    spike[5] = d
    alternating = torch.tensor([1.0, -1.0] * (d // 2))
    assert metrics.kurtosis_osp(spike[None]) == pytest.approx(d - 3)
    assert metrics.kurtosis_osp(alternating[None]) == 0.0
    assert metrics.kurtosis_osp(torch.stack([spike, alternating])) == pytest.approx((d - 3) / 2)
    # the paper's Kurt of the same two tokens measures something else (neuron RMS over tokens)
    assert metrics.kurtosis(torch.stack([spike, alternating])) != pytest.approx((d - 3) / 2)


def test_osp_kurtosis_matches_a_transcription_of_the_public_code():
    # evaluate_kurtosis.py: x = hidden_state.float(); ((x**4).mean(-1) / x.std(-1) ** 4 - 3).relu().mean()
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_t(df=5, size=(2, 32, 64)).astype(np.float32))
    theirs = ((x**4).mean(-1) / x.std(-1) ** 4 - 3).relu().mean().item()
    assert metrics.kurtosis_osp(x) == pytest.approx(theirs, rel=1e-6)
    assert metrics.kurtosis_osp(x.bfloat16()) == pytest.approx(theirs, rel=5e-2)  # bf16 measured in fp32


def test_osp_kurtosis_gaussian_floor():
    # clipping at 0 keeps the sampling noise of Gaussian tokens: about sqrt(24 / d) / sqrt(2 pi) for large d
    x = torch.randn(8000, 2048, generator=torch.Generator().manual_seed(5))
    assert metrics.kurtosis_osp(x) == pytest.approx(0.04, abs=0.004)


def test_osp_kurtosis_and_the_papers_kurt_part_ways_on_a_one_token_spike():
    # docs/science.md section 1: an outlier channel raises both; one huge entry in one token dominates its
    # channel's RMS (Kurt) but moves the per-token mean (OSP) by 1/4096 of that token's value
    g = torch.Generator().manual_seed(6)
    channel = torch.randn(4096, 128, generator=g)
    channel[:, 3] *= 30
    spike = torch.randn(4096, 128, generator=g)
    spike[0, 3] = 1000.0
    assert metrics.kurtosis(channel) == pytest.approx(99, abs=1.5)
    assert metrics.kurtosis_osp(channel) == pytest.approx(63, abs=2)
    assert metrics.kurtosis(spike) == pytest.approx(56, abs=1)
    assert metrics.kurtosis_osp(spike) == pytest.approx(0.17, abs=0.02)  # the Gaussian floor, 0.14, and 125/4096
