"""The pretrained probe's attention and massive-activation metrics (`ofe.pretrained.hf.probe`): equal to ones
recomputed here from the attention weights and hidden states the model itself returns; a model on SDPA probed
on eager attention and given its own back; a model that returns no attention weights measured on everything
else, with a note in inspect.json and the tables' metadata."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from ofe.config import QuantConfig
from ofe.core import metrics
from ofe.io import read_metadata
from ofe.pretrained import hf
from ofe.pretrained.inspection import Settings, inspect
from tests.helpers import hf_models

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("no_network")

PER_SITE = set(metrics.STREAM_METRICS)
MASSIVE = {"massive_top1", "massive_top2", "massive_top3", "massive_median", "massive_ratio"}
NO_QUANT = dict(settings=Settings(batches=2, batch_size=2, context=32), quant=QuantConfig(protocols=()))


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_sink_metrics_and_massive_activations_equal_ones_from_the_models_own_outputs(family):
    """Sink rate, first-token attention and sparsity against the attention weights the model returns,
    and massive activations against its hidden states, each recomputed here by its definition, head by
    head and sequence by sequence. Queries and keys are scaled up (`sharpen_attention`) so that heads
    fall on both sides of Gu et al.'s 0.3 and some weights underflow to exactly 0."""
    model = hf_models.sharpen_attention(hf_models.build(family), family)
    B, T = 4, 12
    idx = torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(0))
    rows = {(layer, site, m): v for layer, site, m, v in hf.probe(model, idx)}
    with torch.no_grad():
        out = model(input_ids=idx, output_hidden_states=True, output_attentions=True, use_cache=False)
    for i, p in enumerate(out.attentions):
        H = p.shape[1]
        alpha = [[sum(p[b, h, q, 0].item() for q in range(T)) / T for h in range(H)] for b in range(B)]
        above = sum(a > 0.3 for row in alpha for a in row)
        zeros = sum(int((p[b, h, q, : q + 1] == 0).sum()) for b in range(B) for h in range(H) for q in range(T))
        assert rows[(i, "attention", "sink_rate")] == pytest.approx(above / (B * H))
        assert rows[(i, "attention", "first_token_attention")] == pytest.approx(
            sum(map(sum, alpha)) / (B * H), rel=1e-5)
        assert rows[(i, "attention", "attention_sparsity")] == pytest.approx(zeros / (B * H * T * (T + 1) / 2))
    # heads on both sides of 0.3 somewhere, and weights at exactly 0: the metrics are not at a trivial value
    rates = [rows[(i, "attention", "sink_rate")] for i in range(hf_models.LAYERS)]
    assert any(0 < r < 1 for r in rates)
    assert any(rows[(i, "attention", "attention_sparsity")] > 0 for i in range(hf_models.LAYERS))
    for i in range(hf_models.LAYERS):
        h = out.hidden_states[i].abs()
        top1 = sum(h[b].max().item() for b in range(B)) / B
        median = sum(h[b].flatten().sort().values[(h[b].numel() - 1) // 2].item() for b in range(B)) / B
        assert rows[(i, "block_input", "massive_top1")] == pytest.approx(top1, rel=1e-6)
        assert rows[(i, "block_input", "massive_median")] == pytest.approx(median, rel=1e-6)
        assert rows[(i, "block_input", "massive_ratio")] == pytest.approx(top1 / median, rel=1e-6)


def test_a_model_on_sdpa_is_probed_on_eager_attention_and_given_back_its_own():
    model = hf_models.build("gpt2")
    model.set_attn_implementation("sdpa")
    idx = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    rows = {(layer, site, m): v for layer, site, m, v in hf.probe(model, idx)}
    assert model.config._attn_implementation == "sdpa"
    eager = {(layer, site, m): v for layer, site, m, v in hf.probe(hf_models.build("gpt2"), idx)}
    assert rows.keys() == eager.keys()
    assert all(rows[k] == pytest.approx(eager[k], rel=1e-4, abs=1e-6) for k in rows)


def _cannot_return_attentions(model):
    """A model whose attention implementation forms no weights and cannot be switched (as transformers
    refuses for a model without an eager path)."""
    model.set_attn_implementation("sdpa")

    def refuse(_implementation, **_kw):
        raise ValueError("this model supports no other attention implementation")
    model.set_attn_implementation = refuse
    return model


def test_a_model_that_returns_no_attentions_gets_the_other_metrics_and_a_note(tmp_path, monkeypatch):
    model = _cannot_return_attentions(hf_models.build("llama"))
    rows = hf.probe(model, torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1)))
    assert not [r for r in rows if r[1] == "attention"]
    assert {m for _, site, m, _ in rows if site == "block_input"} == PER_SITE | MASSIVE

    load = hf.load_causal_lm

    def load_without_attentions(*args, **kwargs):
        loaded, tokenizer, n = load(*args, **kwargs)
        return _cannot_return_attentions(loaded), tokenizer, n
    monkeypatch.setattr(hf, "load_causal_lm", load_without_attentions)
    saved = hf_models.save(hf_models.build("llama"), tmp_path / "llama")
    summary = inspect(tmp_path / "out", model=str(saved), text_file=hf_models.text_file(tmp_path), **NO_QUANT)
    df = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    assert "attention" not in set(df.site) and set(df[df.site == "block_input"].metric) == PER_SITE | MASSIVE
    assert summary["notes"] == [
        "no attention metrics (attention_entropy, sink_rate, first_token_attention, attention_sparsity) at layers "
        "[0, 1]: the model returned no attention weights there (attention implementation 'sdpa'; transformers "
        "returns them only from its eager attention); every other metric is complete"]
    assert read_metadata(tmp_path / "out" / "metrics.parquet")["inspect"]["notes"] == summary["notes"]
