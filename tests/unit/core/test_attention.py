"""The attention variants (ofe/core/attention.py, `model.attention`) against transcriptions of their authors'
code and against closed forms, on random inputs with the causal mask; and their taps.

Each `ref_*` function below is transcribed from the authors' public code (cited per function), with only
what ofe's model does not have left out (rotary embeddings, KV groups, caches, dropout): it is the
independent expectation, sharing no code with ofe.core.attention.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ofe.config import ModelConfig
from ofe.core.attention import Attention, causal_mask, clipped_softmax, sink_softmax, softpick

SMALL = dict(n_layer=2, d_model=32, n_head=2, context=16)
B, T, C, H, HD = 2, 16, 32, 2, 16
VARIANTS = ("softmax", "clipped_softmax", "gated_headwise", "gated_elementwise", "softmax1", "learned_sink",
            "softpick")


def attention(kind: str, seed: int = 0, **over) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(ModelConfig(**{**SMALL, "attention": kind, **over}))
    with torch.no_grad():  # weights far from the 0.02 init, so the variants really differ from each other
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if p.dim() == 2 else 1.0))
    return attn


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed))


def _qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, T, H, hd) from the module's weights, written out (no QK-norm in these configs)."""
    q, k, v = (x @ attn.qkv.weight.T).split(C, dim=2)
    if attn.qk_bias is not None:
        q, k = q + attn.qk_bias[:C], k + attn.qk_bias[C:]
    return tuple(t.reshape(B, T, H, HD) for t in (q, k, v))


# ---- transcriptions of the authors' code ------------------------------------------------------------

def ref_clipped_softmax(data, dim=1, eta=1.1, gamma=-0.1):
    # Qualcomm-AI-research/outlier-free-transformers, transformers_language/models/softmax.py (eta is zeta)
    sm_out = torch.nn.functional.softmax(data, dim=dim)
    stretched_out = sm_out * (eta - gamma) + gamma
    return torch.clip(stretched_out, 0, 1)


def ref_opt_attention(q, k, v, softmax_fn):
    """Qualcomm-AI-research/outlier-free-transformers, transformers_language/models/opt_attention.py,
    OPTAttentionWithExtras.forward: queries scaled first, bmm over (B*H), HF's additive causal mask
    (finfo.min above the diagonal), a floor at finfo.min, softmax_fn, bmm with v. q, k, v: (B, T, H, hd)."""
    bsz, tgt_len, nh, hd = q.shape
    query_states = (q * hd**-0.5).transpose(1, 2).reshape(bsz * nh, tgt_len, hd)
    key_states = k.transpose(1, 2).reshape(bsz * nh, tgt_len, hd)
    value_states = v.transpose(1, 2).reshape(bsz * nh, tgt_len, hd)
    attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
    attention_mask = torch.full((tgt_len, tgt_len), torch.finfo(q.dtype).min).triu(1)[None, None]
    attn_weights = attn_weights.view(bsz, nh, tgt_len, tgt_len) + attention_mask
    attn_weights = torch.max(attn_weights, torch.tensor(torch.finfo(attn_weights.dtype).min))
    attn_weights = softmax_fn(attn_weights.view(bsz * nh, tgt_len, tgt_len), dim=-1)
    attn_output = torch.bmm(attn_weights, value_states)
    return attn_output.view(bsz, nh, tgt_len, hd).transpose(1, 2).reshape(bsz, tgt_len, nh * hd)


def ref_gpt_oss_sdpa(Q, K, V, S, sm_scale):
    # openai/gpt-oss, gpt_oss/torch/model.py, sdpa (sliding_window 0): one sequence, Q (T, H, q_mult, hd)
    n_tokens, n_heads, q_mult, d_head = Q.shape
    K = K[:, :, None, :].expand(-1, -1, q_mult, -1)
    V = V[:, :, None, :].expand(-1, -1, q_mult, -1)
    S = S.reshape(n_heads, q_mult, 1, 1).expand(-1, -1, n_tokens, -1)
    mask = torch.triu(Q.new_full((n_tokens, n_tokens), -float("inf")), diagonal=1)
    QK = torch.einsum("qhmd,khmd->hmqk", Q, K)
    QK *= sm_scale
    QK += mask[None, None, :, :]
    QK = torch.cat([QK, S], dim=-1)
    W = torch.softmax(QK, dim=-1)
    W = W[..., :-1]
    attn = torch.einsum("hmqk,khmd->qhmd", W, V)
    return attn.reshape(n_tokens, -1)


def ref_softpick(x, dim=-1, eps=1e-8):
    # zaydzuhri/softpick-attention, naive_softpick_attn.py, softpick
    x_m = torch.max(x, dim=dim, keepdim=True).values
    x_m_e_m = torch.exp(-x_m)
    x_e_1 = torch.exp(x - x_m) - x_m_e_m
    r_x_e_1 = F.relu(x_e_1)
    a_x_e_1 = torch.where(x.isfinite(), torch.abs(x_e_1), 0)
    return r_x_e_1 / (torch.sum(a_x_e_1, dim=dim, keepdim=True) + eps)


def ref_naive_softpick_attn(q, k, v):
    # zaydzuhri/softpick-attention, naive_softpick_attn.py, naive_softpick_attn (head_first=False, the
    # einops rearrange 'b t h d -> b h t d' written as a transpose)
    scale = 1.0 / (q.shape[-1] ** 0.5)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q_len, k_len = q.shape[-2], k.shape[-2]
    mask = torch.tril(torch.ones(k_len, k_len))
    wei = torch.matmul(q, k.transpose(2, 3)) * scale
    wei = wei.masked_fill(mask[k_len - q_len:k_len, :k_len] == 0, float("-inf"))
    wei = ref_softpick(wei.float(), dim=-1).to(q.dtype)
    o = torch.matmul(wei, v)
    return o.transpose(1, 2), wei


def ref_qwen_gated_attention(x, q_proj, k_proj, v_proj, o_proj, num_heads, head_dim, headwise):
    """qiuzh20/gated_attention, modeling_qwen3.py, Qwen3Attention.forward with num_key_value_heads =
    num_heads (one group), no QK-norm, no rotary embedding: the gate is extra output columns of q_proj,
    split per head after the query, sigmoid-multiplied into the attention output before o_proj.
    Projections are (weight, bias or None)."""
    bsz, q_len, _ = x.shape
    num_key_value_groups = 1
    query_states = F.linear(x, *q_proj)
    key_states = F.linear(x, *k_proj)
    value_states = F.linear(x, *v_proj)
    query_states = query_states.view(bsz, q_len, num_heads, -1)
    if headwise:
        query_states, gate_score = torch.split(
            query_states, [head_dim * num_key_value_groups, num_key_value_groups], dim=-1)
        gate_score = gate_score.reshape(bsz, q_len, -1, 1)
    else:
        query_states, gate_score = torch.split(
            query_states, [head_dim * num_key_value_groups, head_dim * num_key_value_groups], dim=-1)
        gate_score = gate_score.reshape(bsz, q_len, -1, head_dim)
    query_states = query_states.reshape(bsz, q_len, -1, head_dim).transpose(1, 2)
    key_states = key_states.view(bsz, q_len, -1, head_dim).transpose(1, 2)
    value_states = value_states.view(bsz, q_len, -1, head_dim).transpose(1, 2)
    attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(head_dim)
    causal_mask_ = torch.full((q_len, q_len), torch.finfo(x.dtype).min).triu(1)  # HF's 4-D causal mask
    attn_weights = attn_weights + causal_mask_
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    attn_output = attn_output * torch.sigmoid(gate_score)
    attn_output = attn_output.reshape(bsz, q_len, -1)
    return F.linear(attn_output, *o_proj)


# ---- each variant equals its transcription ----------------------------------------------------------

def test_clipped_softmax_is_qualcomms():
    for zeta, gamma in [(1.0, None), (1.0, -0.1), (1.03, -0.03), (1.1, 0.0)]:
        attn, x = attention("clipped_softmax", clip_zeta=zeta, clip_gamma=gamma), _x(1) * 3
        g = gamma if gamma is not None else -12 / 16  # their OPT setting: gamma = -alpha / T, alpha 12
        q, k, v = _qkv(attn, x)
        fn = lambda d, dim: ref_clipped_softmax(d, dim=dim, eta=zeta, gamma=g)  # noqa: E731
        with torch.no_grad():
            torch.testing.assert_close(attn(x), attn.proj(ref_opt_attention(q, k, v, fn)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["softmax1", "learned_sink"])
def test_sink_attention_is_gpt_oss(kind):
    attn, x = attention(kind), _x(2) * 3
    if kind == "softmax1":
        assert not any("sinks" in name for name in attn.state_dict())  # a constant logit 0: no state
        sinks = torch.zeros(H)
    else:
        sinks = attn.sinks
        assert sinks.requires_grad and sinks.abs().min() > 0  # set at random above
    q, k, v = _qkv(attn, x)
    with torch.no_grad():
        ref = torch.stack([ref_gpt_oss_sdpa(q[b, :, :, None, :], k[b], v[b], sinks, HD**-0.5) for b in range(B)])
        torch.testing.assert_close(attn(x), attn.proj(ref), rtol=1e-5, atol=1e-5)


def test_softpick_attention_is_the_authors():
    attn, x = attention("softpick"), _x(3) * 3
    seen = {}
    attn.probs.register_forward_hook(lambda _m, _a, out: seen.__setitem__("probs", out))
    q, k, v = _qkv(attn, x)
    with torch.no_grad():
        out, wei = ref_naive_softpick_attn(q, k, v)
        torch.testing.assert_close(attn(x), attn.proj(out.reshape(B, T, C)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["probs"], wei, rtol=1e-5, atol=1e-7)
    past = causal_mask(T)
    assert ((wei == 0) & past).sum() > 0.3 * past.sum()  # rectified: exact zeros among the real tokens too


@pytest.mark.parametrize("qk_bias", [False, True])
@pytest.mark.parametrize("kind", ["gated_headwise", "gated_elementwise"])
def test_gated_attention_is_qwens(kind, qk_bias):
    attn, x = attention(kind, qk_bias=qk_bias), _x(4)
    headwise = kind == "gated_headwise"
    w_gate = attn.gate.weight.view(H, 1 if headwise else HD, C)
    w_q = attn.qkv.weight[:C].view(H, HD, C)
    q_weight = torch.cat([w_q, w_gate], dim=1).reshape(-1, C)  # per head: its query rows, then its gate rows
    q_bias = k_bias = None
    if qk_bias:
        assert attn.gate.bias is not None  # the gate is part of Qwen's query projection: it shares its bias
        q_bias = torch.cat([attn.qk_bias[:C].view(H, HD), attn.gate.bias.view(H, -1)], dim=1).reshape(-1)
        k_bias = attn.qk_bias[C:]
    else:
        assert attn.gate.bias is None
    with torch.no_grad():
        ref = ref_qwen_gated_attention(x, (q_weight, q_bias), (attn.qkv.weight[C:2 * C], k_bias),
                                       (attn.qkv.weight[2 * C:], None), (attn.proj.weight, None), H, HD, headwise)
        torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)
        attn.explicit = True  # the quantisers' path: the same function
        torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_the_gate_starts_like_qwens_zero_bias_and_the_blocks_matrix_init():
    from ofe.core.model import GPT
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL, attention="gated_elementwise"))
    gate = model.blocks[0].attn.gate
    assert torch.equal(gate.bias, torch.zeros(C))  # nn.Linear's uniform bias init replaced by Qwen's zeros
    assert abs(gate.weight.std().item() - 0.02) < 0.003  # N(0, 0.02^2), Qwen's initializer_range


# ---- closed forms -----------------------------------------------------------------------------------

def _logits(seed: int = 5, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(B, H, T, T, generator=torch.Generator().manual_seed(seed)) * scale, causal_mask(T)


def _softmax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~mask, float("-inf")).softmax(-1)


def test_softpick_closed_forms():
    x, mask = _logits()
    assert torch.equal(softpick(torch.zeros(B, H, T, T), mask), torch.zeros(B, H, T, T))  # exp(0) - 1 = 0
    # one row, by hand: exp(x) - 1 = [2, -1/2, 0] -> [2/2.5, 0, 0]; a masked entry adds nothing
    row = torch.tensor([[math.log(3), math.log(0.5), 0.0, 5.0]])
    torch.testing.assert_close(softpick(row, torch.tensor([[True, True, True, False]])),
                               torch.tensor([[0.8, 0.0, 0.0, 0.0]]))
    p = softpick(x, mask)
    assert torch.equal(p.masked_fill(mask, 0), torch.zeros_like(p))  # nothing above the diagonal
    assert (p.sum(-1) <= 1 + 1e-6).all() and (p >= 0).all()  # sum relu <= sum |.|
    assert torch.isfinite(softpick(x + 100, mask)).all()  # exp(100) overflows fp32: shifted by the row max


def test_softpick_rows_of_very_negative_logits_have_zero_weights_and_gradients():
    # By the formula, a row whose logits are all negative has weights relu(exp(x) - 1) = 0 and, relu being
    # inactive everywhere, zero gradients. The release shifts by the row max m: exp(-m) overflows fp32 for
    # m < -88.7 (0/inf forward, NaN backward), which ended a Pre-LN training run.
    row = torch.tensor([[-95.0, 0.0], [-95.0, -96.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    p = softpick(row, mask)
    p.sum().backward()
    assert torch.equal(p, torch.zeros(2, 2)) and torch.equal(row.grad, torch.zeros(2, 2))
    ref = torch.tensor([[-95.0, 0.0], [-95.0, -96.0]], requires_grad=True)
    ref_softpick(ref.masked_fill(~mask, float("-inf")), dim=-1).sum().backward()
    assert ref.grad.isnan().any()  # the release's own formula, for the record
    # one row mixing both regimes: the release's values and gradients wherever they are finite
    x = torch.tensor([[3.0, -1.0, 0.5, -200.0]], requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    full = torch.ones(1, 4, dtype=torch.bool)
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (softpick(x, full) * w).sum().backward()
    (ref_softpick(y, dim=-1) * w).sum().backward()
    torch.testing.assert_close(softpick(x, full), ref_softpick(y, dim=-1))
    torch.testing.assert_close(x.grad, y.grad)


def test_sink_closed_forms():
    x, mask = _logits()
    torch.testing.assert_close(sink_softmax(x, mask, torch.full((H,), -1e4)), _softmax(x, mask))  # no sink
    # softmax1 on zero logits: query t sees t + 1 tokens and the sink, each exp(0): 1 / (t + 2) each
    p = sink_softmax(torch.zeros(B, H, T, T), mask, torch.zeros(H))
    expected = (1.0 / (torch.arange(T) + 2.0))[:, None].expand(T, T).tril()
    torch.testing.assert_close(p, expected.expand(B, H, T, T))
    # the sink's share: 1 - sum_j p_j = exp(s) / (exp(s) + sum_j exp(x_j))
    s = torch.tensor([0.5, -1.0])
    share = 1 - sink_softmax(x, mask, s).sum(-1)
    z = x.masked_fill(~mask, float("-inf")).exp().sum(-1)
    torch.testing.assert_close(share, s.exp()[None, :, None] / (s.exp()[None, :, None] + z))


def test_clipped_softmax_closed_forms():
    x, mask = _logits()
    torch.testing.assert_close(clipped_softmax(x, mask, 1.0, 0.0), _softmax(x, mask))  # no stretch: softmax
    # uniform rows of n tokens: clip((1 + 0.1) / n - 0.1, 0, 1): 1 for n = 1, 0.45 for n = 2, 0 past n = 11
    p = clipped_softmax(torch.zeros(B, H, T, T), mask, 1.0, -0.1)
    n = torch.arange(1, T + 1, dtype=torch.float32)
    torch.testing.assert_close(p[0, 0].diagonal(), (1.1 / n - 0.1).clamp(0, 1))
    assert torch.equal(p[..., 11:, :], torch.zeros_like(p[..., 11:, :]))  # a head attends to nothing
    assert ModelConfig(context=512, attention="clipped_softmax").clip_gamma is None
    assert Attention(ModelConfig(**{**SMALL, "context": 512}, attention="clipped_softmax")).clip_gamma == -12 / 512


@pytest.mark.parametrize("kind", ["gated_headwise", "gated_elementwise"])
def test_an_open_gate_is_no_gate_and_a_shut_one_is_no_attention(kind):
    gated, plain, x = attention(kind), attention("softmax"), _x(6)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("gate")})
    with torch.no_grad():
        gated.gate.bias.fill_(1e4)  # sigmoid = 1 exactly in fp32
        torch.testing.assert_close(gated(x), plain(x), rtol=1e-6, atol=1e-6)
        gated.gate.bias.fill_(-1e4)
        assert torch.equal(gated(x), torch.zeros(B, T, C))
        gated.gate.weight.zero_()
        gated.gate.bias.zero_()  # sigmoid(0): the attention halved
        torch.testing.assert_close(gated(x), plain(x) / 2, rtol=1e-6, atol=1e-6)


# ---- taps -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", VARIANTS)
def test_every_variant_shows_its_scores_and_the_weights_that_multiply_v(kind):
    attn, x = attention(kind), _x(7) * 0.3  # logits of order 1: every row leaves the sink a visible share
    taps = {}
    for name in ("scores", "probs", *(("gate_out",) if kind.startswith("gated") else ())):
        getattr(attn, name).register_forward_hook(lambda _m, _a, out, n=name: taps.__setitem__(n, out))
    attn.explicit = True
    with torch.no_grad():
        y = attn(x)
        q, k, v = (t.transpose(1, 2) for t in _qkv(attn, x))
        scores, probs = taps["scores"], taps["probs"]
        torch.testing.assert_close(scores, q @ k.transpose(-1, -2) / math.sqrt(HD))  # before the mask: finite
        assert torch.equal(probs.triu(1), torch.zeros_like(probs))
        out = (probs @ v).transpose(1, 2)  # the tap's weights times v is the attention output ...
        if kind.startswith("gated"):  # ... before the gate, which the gate tap shows
            gate = taps["gate_out"]
            assert gate.shape == (B, T, H, 1 if kind == "gated_headwise" else HD) and ((gate > 0) & (gate < 1)).all()
            out = out * gate
        torch.testing.assert_close(y, attn.proj(out.reshape(B, T, C)), rtol=1e-5, atol=1e-6)
    rows = probs.sum(-1)
    if kind in ("softmax", "gated_headwise", "gated_elementwise"):
        torch.testing.assert_close(rows, torch.ones_like(rows))
    elif kind in ("softmax1", "learned_sink"):  # the real tokens' weights only: the sink keeps the rest
        assert (rows < 1).all() and (rows > 0).all()
    else:  # clipped and rectified weights: in [0, 1], rows at most 1 (up to the stretch), exact zeros
        assert ((probs >= 0) & (probs <= 1)).all() and (rows <= 1 + 1e-6).all()
        assert ((probs == 0) & causal_mask(T)).any()  # exact zeros at finite logits
