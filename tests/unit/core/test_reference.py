"""Our OP model against the public code of He et al. 2024 (github.com/bobby-he/simplified_transformers).

`reference_logits` is an independent transcription of that code's forward pass for its OP config
(model/op.yaml over model/default.yaml), written from reading `simplified_transformers/model_utils.py`
(myGPT2Block, myGPT2Attention, myGPT2MLP, MyConv1D, RMSNorm) and the HF GPT2LMHeadModel it patches
(run_clm.py: only the blocks are replaced, so GPT-2's embeddings, final LayerNorm and tied head stay).
Weights are kept in the reference's own layout (Conv1D: x @ W + b with W of shape (in, out)), so the
copy from our model is a mapping that a wrong transpose or slice would break.

The check is meaningful: the same comparison must fail for the placements this project used before
(the first LayerNorm on the embedding stream, torch's RMSNorm with eps inside the root, no Q/K bias).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ofe.config import ModelConfig
from ofe.core.model import GPT
from ofe.plan import presets

D, L, H, T = 64, 3, 4, 16
LN_EPS = 1e-5  # HF GPT2Config.layer_norm_epsilon: the reference's LayerNorms and its QK RMSNorm
Params = dict[str, Tensor]


# ---- the transcription ---------------------------------------------------------------------------

def _conv1d(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """MyConv1D: addmm(bias, x, W), W stored (in, out); a bias=False layer has a frozen zero bias."""
    return x @ w if b is None else x @ w + b


def _rmsnorm(x: Tensor, scale: Tensor, eps: float = LN_EPS) -> Tensor:
    """The reference's RMSNorm: the 2-norm over sqrt(d) is the rms; eps is added outside the root."""
    rms = x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5
    return scale * (x / (rms + eps))


def _attention(h: Tensor, p: Params, prefix: str) -> Tensor:
    """myGPT2Attention with qk_norm_type rmsnorm, dot_norm none, attn_mat gains 1 / 0, no centring."""
    B, S, d = h.shape
    hd = d // H
    q, k = _conv1d(h, p[prefix + "qk_attn.weight"], p[prefix + "qk_attn.bias"]).split(d, dim=2)
    v = _conv1d(h, p[prefix + "v_attn.weight"])  # bias=False

    def split_heads(t: Tensor) -> Tensor:
        return t.view(B, S, H, hd).permute(0, 2, 1, 3)

    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    q, k = _rmsnorm(q, p[prefix + "q_norm.scale"]), _rmsnorm(k, p[prefix + "k_norm.scale"])
    w = q @ k.transpose(-1, -2) / v.size(-1) ** 0.5  # scale_attn_weights (GPT-2's default)
    causal = torch.tril(torch.ones(S, S, dtype=torch.bool))
    w = torch.where(causal, w, torch.finfo(w.dtype).min)  # the reference masks with finfo.min
    w = F.softmax(w, dim=-1)
    out = (w @ v).permute(0, 2, 1, 3).reshape(B, S, d)
    return _conv1d(out, p[prefix + "c_proj.weight"])  # bias=False


def reference_logits(p: Params, idx: Tensor) -> Tensor:
    """GPT2LMHeadModel with its blocks replaced by myGPT2Block(norm_type none, norm_position pre)."""
    h = p["wte.weight"][idx] + p["wpe.weight"][: idx.shape[1]]  # embd_pdrop 0
    for i in range(L):
        pre = f"h.{i}."
        skip = h
        # norm_type none: "always use LN in first layer" (ln_1 of block 0), on the attention input only
        a_in = F.layer_norm(h, (D,), p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], LN_EPS) if i == 0 else h
        h = p[pre + "attn_block_resid_gain"] * _attention(a_in, p, pre + "attn.") + 1.0 * skip
        skip = h  # ln_2 is the identity
        mlp = _conv1d(F.relu(_conv1d(h, p[pre + "mlp.c_fc.weight"])), p[pre + "mlp.c_proj.weight"])
        h = p[pre + "mlp_block_resid_gain"] * mlp + 1.0 * skip  # leaky_relu with slope 0: ReLU
    h = F.layer_norm(h, (D,), p["ln_f.weight"], p["ln_f.bias"], LN_EPS)
    return h @ p["wte.weight"].T  # lm_head tied to wte, no bias


# ---- our model <-> the reference's parameters -------------------------------------------------------

def _pairs(model: GPT) -> list[tuple[str, Tensor, bool]]:
    """(reference name, our tensor or a view of it, transposed?) for every reference parameter that our
    model holds. A model without some part (no Q/K bias, no first-layer LN) just lacks its pairs."""
    out: list[tuple[str, Tensor, bool]] = [("wte.weight", model.wte.weight, False),
                                           ("wpe.weight", model.wpe.weight, False)]
    first_ln = model.blocks[0].norm1 if model.blocks[0].norm1 is not None else model.embed_norm
    if first_ln is not None:  # where our model keeps it; the reference's is block 0's ln_1
        out += [("h.0.ln_1.weight", first_ln.weight, False), ("h.0.ln_1.bias", first_ln.bias, False)]
    for i, blk in enumerate(model.blocks):
        pre, a = f"h.{i}.", blk.attn
        out += [(pre + "attn.qk_attn.weight", a.qkv.weight[: 2 * D], True),
                (pre + "attn.v_attn.weight", a.qkv.weight[2 * D:], True),
                (pre + "attn.c_proj.weight", a.proj.weight, True),
                (pre + "attn.q_norm.scale", a.q_norm.weight, False),
                (pre + "attn.k_norm.scale", a.k_norm.weight, False),
                (pre + "mlp.c_fc.weight", blk.mlp.fc.weight, True),
                (pre + "mlp.c_proj.weight", blk.mlp.proj.weight, True),
                (pre + "attn_block_resid_gain", blk.beta[0:1], False),
                (pre + "mlp_block_resid_gain", blk.beta[1:2], False)]
        if a.qk_bias is not None:
            out.append((pre + "attn.qk_attn.bias", a.qk_bias, False))
    if model.final_norm is not None:
        out += [("ln_f.weight", model.final_norm.weight, False), ("ln_f.bias", model.final_norm.bias, False)]
    return out


def to_reference(model: GPT) -> Params:
    return {name: (t.T if transposed else t).detach().clone() for name, t, transposed in _pairs(model)}


@torch.no_grad()
def load_reference(model: GPT, p: Params) -> None:
    for name, t, transposed in _pairs(model):
        t.copy_(p[name].T if transposed else p[name])


def op_model(**over) -> GPT:
    """Our op_final_norm preset (the public code's OP: it keeps GPT-2's final LN) at a small size."""
    overrides = presets.op_final_norm(L)["model"]
    return GPT(ModelConfig(**{**overrides, "n_layer": L, "d_model": D, "n_head": H, "context": T, **over}))


@torch.no_grad()
def _stress(model: GPT, seed: int, qk_shrink: float = 1e-3) -> None:
    """Parameters that make every part of the forward pass show. The vectors that start at 0 or 1 (Q/K
    bias, norm gains and biases) move off their init, so a dropped or misplaced one changes the output;
    the query and key projections (weights and bias) shrink by `qk_shrink`, so queries and keys have an
    rms of 6e-6 to 2e-4, near the QK-norm's eps of 1e-5, where the eps placement decides the attention
    pattern. (At the plain init their rms is 2e-3 to 0.2 and torch's nn.RMSNorm, with its default eps,
    matches the reference's logits to 6e-6: inside the tolerance, so a test there could not tell.)
    The other matrices keep the reference init N(0, 0.02^2)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            noise = torch.randn(p.shape, generator=g)
            p.copy_(0.01 * noise if name.endswith("bias") else 1.0 + 0.2 * noise)
    for blk in model.blocks:
        blk.attn.qkv.weight[: 2 * D] *= qk_shrink
        if blk.attn.qk_bias is not None:
            blk.attn.qk_bias *= qk_shrink


def _rel_max(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def faithful() -> tuple[Params, Tensor, Tensor]:
    """The reference's parameters (copied from our model), some token ids, and our model's logits."""
    torch.manual_seed(0)
    model = op_model().eval()
    _stress(model, seed=1)
    idx = torch.randint(0, model.cfg.vocab_size, (3, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(idx)[0]
    return to_reference(model), idx, ours


# ---- the checks -------------------------------------------------------------------------------------

def test_op_final_norm_equals_the_public_codes_op_forward(faithful):
    p, idx, ours = faithful
    assert {"h.0.ln_1.weight", "h.0.attn.qk_attn.bias", "ln_f.weight"} <= set(p)  # every part is mapped
    assert "h.1.ln_1.weight" not in p  # one first-layer LN only
    with torch.no_grad():
        ref = reference_logits(p, idx)
    assert _rel_max(ours, ref) < 1e-5


def test_the_same_holds_at_initialisation_with_the_fused_and_explicit_attention():
    """Untouched init (zero Q/K bias, unit gains): the regime of a run's first steps, on both attention
    paths (the explicit one is what int8 evaluation runs)."""
    torch.manual_seed(3)
    model = op_model().eval()
    idx = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = reference_logits(to_reference(model), idx)
        assert _rel_max(model(idx)[0], ref) < 1e-5
        for blk in model.blocks:
            blk.attn.explicit = True
        assert _rel_max(model(idx)[0], ref) < 1e-5


VARIANTS: dict[str, Callable[[], GPT]] = {
    "first LN on the embedding stream": lambda: op_model(first_norm="embed_stream"),
    "torch's RMSNorm, eps inside the root": lambda: op_model(qk_norm="rms_torch"),
    "no Q/K bias": lambda: op_model(qk_bias=False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_comparison_catches_the_old_placements(faithful, variant):
    """With the reference's parameters loaded, each old variant misses the reference by over 100 times
    the tolerance (the faithful model, loaded the same way, reproduces its logits: the load path is not
    the difference)."""
    p, idx, ours = faithful
    with torch.no_grad():
        ref = reference_logits(p, idx)
        reloaded = op_model().eval()
        load_reference(reloaded, p)
        assert _rel_max(reloaded(idx)[0], ours) < 1e-6
        model = VARIANTS[variant]().eval()
        load_reference(model, p)
        assert _rel_max(model(idx)[0], ref) > 1e-3
