"""The probe's attention-weight metrics (sinks, sparsity) and massive activations through the real model and
trainer: the rows appear at the right layers and sites, the values are those of the model's own attention
weights, and probing, which switches the attention to its explicit path, leaves training untouched."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from ofe.config import ModelConfig
from ofe.core import probe
from ofe.core.model import GPT
from ofe.train import trainer as train_mod
from ofe.train.trainer import train
from tests.helpers.runs import tiny_run

SINK_METRICS = {"sink_rate", "first_token_attention", "attention_sparsity"}
MASSIVE_METRICS = {"massive_top1", "massive_top2", "massive_top3", "massive_median", "massive_ratio"}


def _model(**fields) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{"n_layer": 2, "d_model": 32, "n_head": 2, "context": 16, **fields}))


def test_collect_puts_each_attention_back_on_its_own_path():
    model = _model()
    model.blocks[1].attn.explicit = True  # as in a quantised copy
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    acts = probe.collect(model, idx)
    assert [b.attn.explicit for b in model.blocks] == [False, True]
    assert set(acts.attention) == {0, 1}

    def fail(*_a):
        raise RuntimeError("boom")

    handle = model.blocks[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        probe.collect(model, idx)
    handle.remove()
    assert [b.attn.explicit for b in model.blocks] == [False, True]


def test_probe_attention_rows_are_those_of_the_models_own_weights():
    """The same weights taken whole from an explicit forward, and reduced by hand (Gu et al.'s mean over
    every query of the first key's weight; zeros among the causal entries)."""
    model = _model(qk_norm="rms")
    with torch.no_grad():  # block 0's keys all zero (its k bias starts at 0): uniform attention, a closed form
        model.blocks[0].attn.qkv.weight[32:64] = 0.0
    idx = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    rows = {(layer, site, m): v for layer, site, m, v in probe.probe(model, idx)}
    whole = {}
    handles = [b.attn.probs.register_forward_hook(lambda _m, _i, out, i=i: whole.__setitem__(i, out))
               for i, b in enumerate(model.blocks)]
    for b in model.blocks:
        b.attn.explicit = True
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    for i, p in whole.items():
        assert p.shape == (3, 2, 16, 16)
        alpha = p[:, :, :, 0].sum(dim=-1) / 16  # (B, H)
        assert rows[(i, "attention", "first_token_attention")] == pytest.approx(alpha.mean().item(), rel=1e-6)
        assert rows[(i, "attention", "sink_rate")] == pytest.approx((alpha > 0.3).float().mean().item())
        causal = torch.ones(16, 16, dtype=torch.bool).tril()
        zeros = (p[:, :, causal] == 0).sum().item()
        assert rows[(i, "attention", "attention_sparsity")] == pytest.approx(zeros / (3 * 2 * 136))
    # block 0's keys are all zero, so every query spreads its weight evenly over the keys it sees:
    # alpha_0 = mean over q of 1 / (q + 1), the harmonic number H_16 / 16 = 0.211
    assert rows[(0, "attention", "first_token_attention")] == pytest.approx(
        sum(1 / (q + 1) for q in range(16)) / 16, rel=1e-6)
    assert rows[(0, "attention", "sink_rate")] == 0.0 and rows[(0, "attention", "attention_sparsity")] == 0.0


def test_the_explicit_path_measures_the_stream_the_fused_kernel_computes():
    model = _model()
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    fused = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, key=key: fused.__setitem__(key, out))
               for key, m in probe.stream_sites(model).items()]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    streams = probe.collect(model, idx).streams
    assert streams.keys() == fused.keys()
    for key, x in streams.items():
        torch.testing.assert_close(x, fused[key], rtol=1e-5, atol=1e-6)


def _rows(path) -> pd.DataFrame:
    return pd.read_parquet(path / "metrics.parquet")


def test_new_rows_in_metrics_parquet_at_their_layers_and_sites(data_dir, tmp_path):
    train(tiny_run(data_dir), tmp_path)  # 2 layers, logged at steps 0, 4, 8, 12
    df = _rows(tmp_path)
    steps = [0, 4, 8, 12]

    def where(names):
        part = df[df.metric.isin(names)]
        assert sorted(part.step.unique()) == steps and set(part.metric) == set(names)
        return set(zip(part.layer, part.site))

    assert where(SINK_METRICS) == {(0, "attention"), (1, "attention")}
    assert where(MASSIVE_METRICS) == {(0, "block_input"), (1, "block_input"), (2, "unembed_input_pre_norm")}
    assert where({"kurtosis_osp"}) == {(0, "block_input"), (1, "block_input"), (2, "unembed_input_pre_norm"),
                                       (2, "unembed_input")}
    assert len(df[df.metric == "sink_rate"]) == 2 * len(steps)  # one row per layer and logged step
    value = df.set_index(["step", "layer", "site", "metric"]).value
    for step in steps:
        for layer in (0, 1):
            assert 0 <= value[(step, layer, "attention", "sink_rate")] <= 1
            # softmax weights: the first token's share is at least 1/T on average (query 0's is 1)
            assert 1 / 32 <= value[(step, layer, "attention", "first_token_attention")] <= 1
        for layer, site in [(0, "block_input"), (2, "unembed_input_pre_norm")]:
            top = [value[(step, layer, site, f"massive_top{k}")] for k in (1, 2, 3)]
            median = value[(step, layer, site, "massive_median")]
            assert top[0] >= top[1] >= top[2] >= median > 0
            assert value[(step, layer, site, "massive_ratio")] == pytest.approx(top[0] / median)
    assert (df[df.metric == "kurtosis_osp"].value >= 0).all()


def test_probing_leaves_the_training_trajectory_bitwise_identical(data_dir, tmp_path, monkeypatch):
    """Losses, gradient norms and validation losses of a run that probes every 2 steps against the same
    run that never probes (the probe's forward switches the attention to its explicit path and back)."""
    cfg = tiny_run(data_dir, train={"log_every": 2})
    train(cfg, tmp_path / "probed")
    monkeypatch.setattr(train_mod.Trainer, "log_probe", lambda self: math.nan)
    train(cfg, tmp_path / "unprobed")
    probed, unprobed = _rows(tmp_path / "probed"), _rows(tmp_path / "unprobed")
    assert (probed.metric == "sink_rate").any() and not (unprobed.metric == "sink_rate").any()
    for site, metric in [("train", "loss"), ("train", "grad_norm"), ("val", "loss")]:
        a = probed[(probed.site == site) & (probed.metric == metric)].reset_index(drop=True)
        b = unprobed[(unprobed.site == site) & (unprobed.metric == metric)].reset_index(drop=True)
        assert len(a) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=True)


@pytest.mark.parametrize("kind", ["softmax1", "learned_sink", "clipped_softmax", "softpick"])
def test_attention_entropy_only_where_the_weights_are_softmax_shaped(kind):
    """softmax1 / learned_sink: the real tokens' weights renormalised are softmax(q k^T / sqrt(hd)) (the sink
    only adds to the denominator), so the entropy from q and k is theirs, computed here by hand from the
    weights the model itself applies. clipped_softmax and softpick weigh tokens otherwise: no entropy row."""
    model = _model(attention=kind)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    rows = {(layer, site, m): v for layer, site, m, v in probe.probe(model, idx)}
    if kind in ("clipped_softmax", "softpick"):
        assert not any(m == "attention_entropy" for _layer, _site, m in rows)
        assert (0, "attention", "sink_rate") in rows  # the other attention rows stay
        return
    whole = {}
    handles = [b.attn.probs.register_forward_hook(lambda _m, _i, out, i=i: whole.__setitem__(i, out))
               for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    for i, p in whole.items():
        w = p.double() / p.double().sum(dim=-1, keepdim=True)
        ent = -torch.special.xlogy(w, w).sum(dim=-1).mean().item()
        assert rows[(i, "attention", "attention_entropy")] == pytest.approx(ent, rel=1e-5)
