"""The memory plan's count of the model's tensors (`ofe.plan.memory`): every parameter and buffer of
`ofe.core.model.GPT` by name and shape, what FSDP shards of each, and the optimisers' state per tensor
(formulas in `ofe.plan.memory`'s docstring)."""

from __future__ import annotations

import math

from ofe.config import ModelConfig

FP32 = 4
Shape = tuple[int, ...]


def _norm_params(kind: str, name: str, d: int) -> list[tuple[str, Shape]]:
    """ofe.core.model.make_norm's parameters: LayerNorm weight + bias, RMSNorm weight, SRMS none,
    single-scale RMSNorm one scalar (a 1-element vector)."""
    if kind == "layernorm":
        return [(f"{name}.weight", (d,)), (f"{name}.bias", (d,))]
    if kind == "rmsnorm":
        return [(f"{name}.weight", (d,))]
    if kind == "single_scale":
        return [(f"{name}.weight", (1,))]
    return []


def _embed_proj_params(m: ModelConfig, name: str) -> list[tuple[str, Shape]]:
    """An OSP embedding projection (ofe.core.osp.EmbedProj): a d x d weight and a d bias, if on."""
    d = m.d_model
    return [(f"{name}.weight", (d, d)), (f"{name}.bias", (d,))] if m.embed_proj else []


def param_shapes(m: ModelConfig) -> list[tuple[str, Shape]]:
    """Every parameter of `ofe.core.model.GPT(m)` by name and shape (the tied head is wte itself)."""
    d, hd, f = m.d_model, m.d_model // m.n_head, m.mlp_ratio * m.d_model
    out: list[tuple[str, Shape]] = [("wte.weight", (m.vocab_size, d)), ("wpe.weight", (m.context, d))]
    if m.first_norm == "embed_stream":
        out += _norm_params("layernorm", "embed_norm", d)
    out += _embed_proj_params(m, "embed_proj_in")
    for i in range(m.n_layer):
        b = f"blocks.{i}"
        first_ln = i == 0 and m.first_norm == "block0_attn_input"
        out += _norm_params("layernorm" if first_ln else m.norm, f"{b}.norm1", d)
        out += _norm_params(m.norm, f"{b}.norm2", d)
        out.append((f"{b}.attn.qkv.weight", (3 * d, d)))
        if m.qk_bias:
            out.append((f"{b}.attn.qk_bias", (2 * d,)))
        out.append((f"{b}.attn.proj.weight", (d, d)))
        if (w := gate_width(m)):  # ofe.core.attention's gate: a linear layer with the queries' bias
            out += [(f"{b}.attn.gate.weight", (w, d))] + ([(f"{b}.attn.gate.bias", (w,))] if m.qk_bias else [])
        out += [(f"{b}.attn.sinks", (m.n_head,))] if m.attention == "learned_sink" else []
        if m.qk_norm != "none":  # RefRMSNorm and nn.RMSNorm both carry one gain over the head dimension
            out += [(f"{b}.attn.q_norm.weight", (hd,)), (f"{b}.attn.k_norm.weight", (hd,))]
        out += [(f"{b}.mlp.fc.weight", (f, d)), (f"{b}.mlp.proj.weight", (d, f))]
        if m.beta_trainable:
            out.append((f"{b}.beta", (2,)))
    out += _norm_params(m.final_norm, "final_norm", d)
    return out + _embed_proj_params(m, "embed_proj_out")


def buffer_shapes(m: ModelConfig) -> list[tuple[str, Shape]]:
    """The model's buffers: each block's fixed residual gains (absent when they are trainable)."""
    return [] if m.beta_trainable else [(f"blocks.{i}.beta", (2,)) for i in range(m.n_layer)]


def gate_width(m: ModelConfig) -> int:  # the attention gate's outputs: one per head or per channel, or 0
    return {"gated_headwise": m.n_head, "gated_elementwise": m.d_model}.get(m.attention, 0)


def explicit_attention(m: ModelConfig) -> bool:  # the T x T path: a logit cap, or weights SDPA cannot compute
    return m.logit_cap is not None or m.attention not in ("softmax", "gated_headwise", "gated_elementwise")


def numel(shape: Shape) -> int:
    return math.prod(shape)


def shard(shape: Shape, processes: int) -> Shape:
    """One process's part of a tensor FSDP2 shards over `processes`: ceil(rows / N) rows."""
    return (math.ceil(shape[0] / processes), *shape[1:]) if processes > 1 else shape


def is_muon_param(name: str, shape: Shape) -> bool:
    """ofe.core.optim.muon_param_groups' split: 2-D weights outside the embeddings go to Muon."""
    return len(shape) == 2 and not name.startswith(("wte.", "wpe."))


def optimizer_state_bytes(name: str, pname: str, shape: Shape, max_precond_dim: int,
                          full_shape: Shape | None = None) -> int:
    """Bytes of optimiser state for one parameter tensor (`shape`: the part this process holds;
    `full_shape`: the whole tensor, which decides what is rotated). Formulas in the module docstring."""
    n, full = numel(shape), full_shape or shape
    rotated = sum(FP32 * k * k for k in full if k <= max_precond_dim) if len(full) == 2 else 0
    if name == "adamw" or (name == "muon" and not is_muon_param(pname, full)):
        return 2 * FP32 * n + FP32
    if name == "muon":
        return FP32 * n
    if name == "soap":
        return 2 * FP32 * n + 2 * rotated  # statistics GG and eigenbases Q
    if name in ("adafactor", "rotated_adafactor"):
        second = FP32 * (shape[0] + shape[1]) if len(shape) == 2 else FP32 * n
        rot = 2 * rotated if name == "rotated_adafactor" else 0
        return FP32 + FP32 * n + second + rot
    raise ValueError(f"optimizer: {name!r} has no memory formula")
