"""The model's variants against their definitions (PAPER.md section 2), and every preset trains."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from ofe import presets
from ofe.config import ModelConfig
from ofe.model import GPT, Block

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


def test_op_blocks_hold_no_norm_modules_except_qk_norm():
    model = GPT(preset_config("op"))
    for blk in model.blocks:
        norms = [name for name, m in blk.named_modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
        assert sorted(norms) == ["attn.k_norm", "attn.q_norm"]
        assert blk.norm1 is None and blk.norm2 is None
    assert model.final_norm is None  # the paper's OP: no final norm
    assert isinstance(model.embed_norm, nn.LayerNorm)  # the public code's embedding LN
    assert isinstance(GPT(preset_config("op_final_norm")).final_norm, nn.LayerNorm)


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
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    fc = model.blocks[0].mlp.fc.weight.std().item()
    proj = model.blocks[0].mlp.proj.weight.std().item()
    assert fc == pytest.approx(0.02, rel=0.1)
    assert proj == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.1)  # GPT-2 residual scaling


def test_mlp_is_relu_without_biases():
    model = GPT(preset_config("pre_ln"))
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    mlp = model.blocks[0].mlp
    x = _x(5)
    with torch.no_grad():
        assert torch.allclose(mlp(x), torch.relu(x @ mlp.fc.weight.T) @ mlp.proj.weight.T, atol=1e-5)


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
    if scale == "130m":  # PAPER.md section 4
        assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.context) == (12, 768, 12, 128)
