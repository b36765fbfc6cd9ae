"""The int8 protocols on transformers models (`ofe.pretrained.quant`): the quantising attention reproduces
each family's eager attention, every tensor the static protocol names lands on its grid, the original
model is untouched, and an attention ofe cannot transcribe is left in full precision, and said so."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from ofe.config import QuantConfig
from ofe.core.hooks import first_tensor, layer_input
from ofe.core.quant import quantise_weight, symmetric_scale
from ofe.pretrained import hf, quant as hf_quant
from tests.helpers import hf_models

pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("no_network")


def _windows(n: int = 2, b: int = 2, t: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (b, t + 1), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_quantising_attention_reproduces_eager_attention(family):
    model = hf_models.build(family)
    q = hf_models.build(family)
    q.load_state_dict(model.state_dict())
    idx = _windows()[0][:, :-1]
    assert hf_quant.switch_attention(model, q, idx) is None
    tapped = [m for m in q.modules() if isinstance(getattr(m, "ofe_scores", None), nn.Identity)]
    assert len(tapped) == hf_models.LAYERS  # one attention per decoder layer, all found
    with torch.no_grad():
        torch.testing.assert_close(q(input_ids=idx).logits, model(input_ids=idx).logits, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "eager"  # the original keeps its own attention


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_static_protocol_puts_every_named_tensor_on_its_grid(family):
    """At 3 bits each quantised tensor takes at most 8 values: linear inputs and outputs (GPT-2's are
    Conv1D), norm outputs, the stream entering and leaving each layer, attention scores and probabilities."""
    model = hf_models.build(family)
    calib, bits = _windows(), 3
    q, info = hf_quant.quantised_copy(model, "static_per_tensor", bits, QuantConfig(), calib)
    assert info["attention_not_quantised"] is None
    sites = hf_quant.static_sites(q)
    assert info["sites"] == len(sites)
    names = set(sites)
    layers = hf.decoder_layers(q)
    assert {f"layers.{i}:{w}" for i in range(hf_models.LAYERS) for w in ("in", "out")} <= names
    assert sum(n.endswith(".scores:out") for n in names) == hf_models.LAYERS
    assert sum(n.endswith(".probs:out") for n in names) == hf_models.LAYERS
    assert not any(n.startswith("lm_head") for n in names)  # the head stays in full precision
    seen: dict[str, torch.Tensor] = {}
    for name, site in sites.items():  # registered after the quantisers: they see what the next op sees
        if site.where == "output":
            site.module.register_forward_hook(
                lambda _m, _a, out, name=name: seen.__setitem__(name, first_tensor(out).detach()))
        else:
            site.module.register_forward_pre_hook(
                lambda _m, a, k, name=name: seen.__setitem__(name, layer_input(a, k).detach()), with_kwargs=True)
    with torch.no_grad():
        q(input_ids=_windows(seed=1)[0][:, :-1])
    assert set(seen) == names
    for name, tensor in seen.items():
        assert tensor.unique().numel() <= 2**bits, name
    n_linear = sum(hf_quant.is_linear(m) for m in layers.modules())
    assert n_linear >= 4 * hf_models.LAYERS and all(f"{n}:in" in names for n, m in q.named_modules()
                                                     if hf_quant.is_linear(m) and m is not q.get_output_embeddings())


@pytest.mark.parametrize("protocol", ["static_per_tensor", "dynamic_per_token"])
def test_quantising_leaves_the_original_model_untouched(protocol):
    model = hf_models.build("gpt_neox")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = _windows(seed=2)[0][:, :-1]
    with torch.no_grad():
        logits = model(input_ids=idx).logits
        q, _ = hf_quant.quantised_copy(model, protocol, 4, QuantConfig(), _windows())
        assert not torch.equal(q(input_ids=idx).logits, logits)  # the copy is quantised ...
        assert torch.equal(model(input_ids=idx).logits, logits)  # ... the original is not, nor hooked
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(q.get_output_embeddings().weight, model.get_output_embeddings().weight)


def test_dynamic_protocol_quantises_linear_inputs_per_token_and_weights_per_channel():
    model = hf_models.build("llama")
    q, info = hf_quant.quantised_copy(model, "dynamic_per_token", 3, QuantConfig(weight_range="absmax"), [])
    assert info["sites"] == sum(hf_quant.is_linear(m) for m in q.modules()) - 1  # all but the LM head
    fc = q.model.layers[0].mlp.down_proj
    assert all(row.unique().numel() <= 7 for row in fc.weight)  # 3-bit symmetric grid: 7 values per channel
    seen = {}
    fc.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        q(input_ids=_windows()[0][:, :-1])
    assert all(tok.unique().numel() <= 7 for tok in seen["x"].reshape(-1, seen["x"].shape[-1]))


def test_conv1d_weights_are_quantised_per_output_channel():
    """GPT-2's Conv1D stores its weight as (in, out): its output channels are columns."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(6, 4)  # nf = 6 outputs, nx = 4 inputs
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 6) * torch.tensor([1, 10, 100, 1, 10, 100.0]))
        w = conv.weight.clone()
        hf_quant.quantise_linear_weight(conv, 8, True, "absmax")
    torch.testing.assert_close(conv.weight, quantise_weight(w.T, 8, True, "absmax").T)
    scales = symmetric_scale(w.T, 8, per_channel=True).flatten()
    torch.testing.assert_close(scales, w.abs().amax(dim=0) / 127)


def test_attention_it_cannot_transcribe_stays_in_full_precision(tmp_path):
    """Gemma 2 soft-caps its attention logits: the static protocol quantises everything else, records why
    scores and probabilities were left alone, and still evaluates."""
    model = hf_models.build("gemma2")
    q, info = hf_quant.quantised_copy(model, "static_per_tensor", 8, QuantConfig(), _windows())
    assert "softcap" in info["attention_not_quantised"]
    assert q.config._attn_implementation == "eager"
    assert not any(n.endswith((".scores:out", ".probs:out")) for n in hf_quant.static_sites(q))
    ppl_fp, ppl_q = hf.perplexity(model, _windows(seed=3)), hf.perplexity(q, _windows(seed=3))
    assert abs(ppl_q - ppl_fp) / ppl_fp < 0.02


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_torchao_quantises_the_layers_the_simulated_dynamic_protocol_does(family):
    """torchao_dynamic on a transformers model: every linear layer but the LM head, GPT-2's Conv1D included
    (turned into the nn.Linear computing the same), the same set as dynamic_per_token's; the original is
    untouched and the head stays in full precision."""
    from ofe.core.torchao_int8 import int8_weight_layers

    model = hf_models.build(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sim, sim_info = hf_quant.quantised_copy(model, "dynamic_per_token", 8, QuantConfig(weight_range="absmax"), [])
    hooked = sorted(n for n, m in sim.named_modules() if hf_quant.is_linear(m) and m._forward_pre_hooks)
    q, info = hf_quant.quantised_copy(model, "torchao_dynamic", 8, QuantConfig(), [])
    assert sorted(int8_weight_layers(q)) == hooked and info["sites"] == sim_info["sites"] == len(hooked)
    assert type(q.get_output_embeddings().weight) is torch.nn.Parameter  # not an Int8Tensor
    idx = _windows(seed=3)[0][:, :-1]
    with torch.no_grad():
        ref = model(input_ids=idx).logits
        err = (q(input_ids=idx).logits - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05  # int8, not broken: the copy computes the model's function, quantised
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_conv1d_becomes_the_linear_layer_that_computes_the_same():
    model = hf_models.build("gpt2")
    q = hf_models.build("gpt2")
    q.load_state_dict(model.state_dict())
    hf_quant.conv1d_to_linear(q)
    assert not any(type(m).__name__ == "Conv1D" for m in q.modules())
    idx = _windows(seed=4)[0][:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(q(input_ids=idx).logits, model(input_ids=idx).logits, rtol=1e-5, atol=1e-5)
