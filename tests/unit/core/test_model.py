"""The model's variants against their definitions (He et al. 2024, section 2), and every preset trains."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from ofe.config import ConfigError, ModelConfig
from ofe.core.attention import Attention, RefRMSNorm
from ofe.core.model import GPT, Block
from ofe.plan import presets

SMALL = dict(n_layer=2, d_model=32, n_head=2, context=16)


def preset_config(block: str, **over) -> ModelConfig:
    return ModelConfig(**{**SMALL, **presets.BLOCKS[block]()["model"], **over})


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_pre_norm_block_is_x_plus_beta_branch(beta):
    torch.manual_seed(0)
    blk = Block(preset_config("pre_ln", beta=beta)).eval()
    x = _x()
    with torch.no_grad():
        h = x + beta * blk.attn(nn.functional.layer_norm(x, (32,), blk.norm1.weight, blk.norm1.bias))
        expected = h + beta * blk.mlp(nn.functional.layer_norm(h, (32,), blk.norm2.weight, blk.norm2.bias))
        assert torch.allclose(blk(x), expected, atol=1e-5)
    if beta == 0.0:
        assert torch.equal(blk(x), x)  # branches switched off: the identity


def test_beta_really_scales_the_branch():
    torch.manual_seed(0)
    cfg = preset_config("op")
    a, b = Block(cfg), Block(replace(cfg, beta=0.4))
    b.load_state_dict({k: v for k, v in a.state_dict().items() if k != "beta"}, strict=False)
    x = _x(1)
    with torch.no_grad():
        branch_a = a.attn(x)  # OP has no pre-norm: the attention branch sees x itself
        branch_b = b.attn(x)
        assert torch.allclose(branch_a, branch_b)
        ha, hb = x + 0.2 * branch_a, x + 0.4 * branch_b
        assert torch.allclose(a(x), ha + 0.2 * a.mlp(ha), atol=1e-5)
        assert torch.allclose(b(x), hb + 0.4 * b.mlp(hb), atol=1e-5)


def test_trainable_beta_is_a_parameter_and_fixed_beta_is_not():
    fixed = Block(preset_config("op"))
    trainable = Block(preset_config("op", beta_trainable=True))
    assert "beta" not in dict(fixed.named_parameters())
    assert dict(trainable.named_parameters())["beta"].tolist() == pytest.approx([0.2, 0.2])


def test_op_blocks_hold_only_qk_norms_and_a_block0_attention_input_ln():
    model = GPT(preset_config("op"))
    for i, blk in enumerate(model.blocks):
        norms = [name for name, m in blk.named_modules() if isinstance(m, (nn.LayerNorm, RefRMSNorm))]
        assert sorted(norms) == ["attn.k_norm", "attn.q_norm"] + (["norm1"] if i == 0 else [])
        assert blk.norm2 is None and (i == 0 or blk.norm1 is None)
    assert isinstance(model.blocks[0].norm1, nn.LayerNorm)  # the public code's first-layer LN
    assert model.embed_norm is None  # ... which leaves the residual stream un-normalised
    assert model.final_norm is None  # the paper's OP: no final norm
    assert isinstance(GPT(preset_config("op_final_norm")).final_norm, nn.LayerNorm)


def test_block0_ln_normalises_the_attention_input_only():
    """first_norm 'block0_attn_input': the stream (and block 0's MLP input) keeps the raw embedding sum;
    'embed_stream' normalises the stream itself."""
    torch.manual_seed(0)
    model = GPT(preset_config("op")).eval()
    idx = torch.randint(0, 256, (2, 16))
    seen = {}
    model.blocks[0].input.register_forward_hook(lambda m, i, o: seen.setdefault("stream", o))
    model.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, a: seen.setdefault("attn_in", a[0]))
    with torch.no_grad():
        model(idx)
        raw = model.wte(idx) + model.wpe(torch.arange(16))
    assert torch.equal(seen["stream"], raw)
    assert torch.allclose(seen["attn_in"], nn.functional.layer_norm(raw, (32,)), atol=1e-5)
    stream = GPT(preset_config("op", first_norm="embed_stream"))
    assert isinstance(stream.embed_norm, nn.LayerNorm) and stream.blocks[0].norm1 is None


def test_no_norm_preset_keeps_the_block0_ln_and_normed_blocks_refuse_it():
    model = GPT(preset_config("no_norm"))
    assert isinstance(model.blocks[0].norm1, nn.LayerNorm) and model.blocks[1].norm1 is None
    with pytest.raises(ConfigError, match="model.first_norm"):
        preset_config("pre_ln", first_norm="block0_attn_input")


def test_post_ln_block_output_is_normalised():
    torch.manual_seed(0)
    blk = Block(preset_config("post_ln")).eval()
    with torch.no_grad():
        y = blk(_x(2) * 7 + 3)
    assert torch.allclose(y.mean(-1), torch.zeros(2, 16), atol=1e-5)  # LN with its initial gain 1, bias 0
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3)


def test_norm_kinds():
    assert isinstance(Block(preset_config("pre_rms")).norm1, nn.RMSNorm)
    srms = Block(preset_config("pre_srms")).norm1
    assert isinstance(srms, nn.RMSNorm) and srms.weight is None  # no trainable gain
    assert Block(preset_config("no_norm")).norm1 is None


def test_qk_norm_normalises_queries_and_keys_per_head():
    torch.manual_seed(0)
    attn = Block(preset_config("op")).attn
    seen = {}
    attn.q_site.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    attn(_x(3) * 50)
    q = seen["q"]  # (B, H, T, hd), RMS 1 over the head dimension at the initial gain
    assert torch.allclose(q.pow(2).mean(-1).sqrt(), torch.ones(q.shape[:-1]), atol=1e-3)


def test_capped_attention_equals_sdpa_when_the_cap_is_far():
    torch.manual_seed(0)
    plain = Block(preset_config("pre_ln")).attn
    capped = Block(preset_config("pre_ln", logit_cap=1e6)).attn
    capped.load_state_dict(plain.state_dict())
    x = _x(4)
    with torch.no_grad():
        assert torch.allclose(plain(x), capped(x), atol=1e-5)
        causal_check = plain(x[:, :5])  # causality: a prefix's outputs ignore later tokens
        assert torch.allclose(causal_check, plain(x)[:, :5], atol=1e-5)


def test_tied_embeddings_and_init_scale():
    model = GPT(preset_config("pre_ln"))
    idx = torch.randint(0, 256, (2, 16))
    logits, _ = model(idx)
    with torch.no_grad():
        h = model.final_norm(model.blocks[1](model.blocks[0](model.wte(idx) + model.wpe(torch.arange(16)))))
    assert torch.allclose(logits, h @ model.wte.weight.T, atol=1e-5)
    # the public code: every matrix, embeddings and output projections included, from N(0, 0.02^2)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
    assert torch.equal(model.blocks[0].attn.qk_bias, torch.zeros(64))
    gpt2 = GPT(preset_config("pre_ln", scale_residual_init=True))  # GPT-2's depth scaling, on request
    assert gpt2.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert gpt2.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.1)
    assert gpt2.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.1)


def test_mlp_is_relu_without_biases_and_only_queries_and_keys_have_one():
    model = GPT(preset_config("pre_ln"))
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    biases = [n for n, _ in model.named_parameters() if "bias" in n and "norm" not in n]
    assert biases == [f"blocks.{i}.attn.qk_bias" for i in range(2)]
    assert not any("qk_bias" in n for n, _ in GPT(preset_config("pre_ln", qk_bias=False)).named_parameters())
    mlp = model.blocks[0].mlp
    x = _x(5)
    with torch.no_grad():
        assert torch.allclose(mlp(x), torch.relu(x @ mlp.fc.weight.T) @ mlp.proj.weight.T, atol=1e-5)


def test_qk_bias_shifts_queries_and_keys_not_values():
    torch.manual_seed(0)
    attn = Attention(preset_config("pre_ln"))
    seen = {}
    attn.q_site.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    attn.k_site.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    x = _x(6)
    with torch.no_grad():
        attn.qk_bias.copy_(torch.randn(64))
        y = attn(x)
        q, k, v = (x @ attn.qkv.weight.T).split(32, dim=2)
        q, k = q + attn.qk_bias[:32], k + attn.qk_bias[32:]
        q, k, v = (t.view(2, 16, 2, 16).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        expected = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert torch.allclose(seen["q"], q) and torch.allclose(seen["k"], k)
        assert torch.allclose(y, attn.proj(expected.transpose(1, 2).reshape(2, 16, 32)), atol=1e-6)


def test_qk_norm_kinds_and_the_public_codes_eps_placement():
    """'rms': gain * x / (rms(x) + 1e-5), as the public code; 'rms_torch': torch's x * rsqrt(ms + eps)."""
    ref = Attention(preset_config("op")).q_norm
    assert isinstance(ref, RefRMSNorm)
    assert isinstance(Attention(preset_config("op", qk_norm="rms_torch")).q_norm, nn.RMSNorm)
    assert Attention(preset_config("op", qk_norm="none")).q_norm is None
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(7)) * 1e-4  # small: eps placement shows
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 2.0, 16))
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        torch.testing.assert_close(ref(x), ref.weight * x / (rms + 1e-5), rtol=1e-6, atol=0)
        inside = ref.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        assert not torch.allclose(ref(x), inside, rtol=1e-2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("qk_norm", ["none", "rms", "rms_torch"])
def test_explicit_attention_equals_sdpa(qk_norm):
    torch.manual_seed(0)
    attn = Attention(preset_config("op", qk_norm=qk_norm))
    x = _x(8) * 3
    taps = {}
    attn.scores.register_forward_hook(lambda m, i, o: taps.__setitem__("scores", o))
    attn.probs.register_forward_hook(lambda m, i, o: taps.__setitem__("probs", o))
    with torch.no_grad():
        fused = attn(x)
        assert not taps  # the fused path shows neither
        attn.explicit = True
        explicit = attn(x)
    assert _rel(explicit, fused) < 1e-6
    scores, probs = taps["scores"], taps["probs"]  # (B, H, T, T)
    assert torch.isfinite(scores).all()  # the tap is before the causal mask
    assert torch.equal(probs.triu(1), torch.zeros_like(probs))
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 16))


def test_logit_cap_takes_the_explicit_path_and_caps_the_scores():
    attn = Attention(preset_config("pre_ln", logit_cap=0.5))
    seen = {}
    attn.scores.register_forward_hook(lambda m, i, o: seen.__setitem__("scores", o))
    with torch.no_grad():
        attn(_x(9) * 100)
    assert not attn.explicit and seen["scores"].abs().max() <= 0.5


@pytest.mark.parametrize("block", sorted(presets.BLOCKS))
def test_every_block_preset_trains(block):
    torch.manual_seed(0)
    model = GPT(preset_config(block))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (4, 17), generator=g)
    losses = []
    for _ in range(8):  # one fixed batch: the loss must fall as the model memorises it
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("scale", sorted(presets.SCALES))
def test_scale_presets_build_valid_configs(scale):
    cfg = ModelConfig(**presets.SCALES[scale]()["model"])
    assert cfg.d_model % cfg.n_head == 0
    if scale == "130m":  # He et al. 2024, section 4
        assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.context) == (12, 768, 12, 128)
    for block in presets.BLOCKS:
        ModelConfig(**presets.resolve(scale, block)["model"])


@pytest.mark.parametrize("scale, beta", [("tiny", 0.2), ("130m", 0.2), ("350m", 0.2 * math.sqrt(0.5)),
                                         ("1.2b", 0.2 * math.sqrt(0.5))])
def test_op_beta_is_the_public_codes_at_12_layers_and_shrinks_as_one_over_sqrt_depth(scale, beta):
    for block in ("op", "op_final_norm"):
        assert presets.resolve(scale, block)["model"]["beta"] == pytest.approx(beta, rel=1e-12)
    assert presets.resolve(scale, "pre_ln")["model"].get("beta", 1.0) == 1.0
    assert presets.op()["model"]["beta"] == 0.2 and presets.op(48)["model"]["beta"] == pytest.approx(0.1)
