"""The two simulated W8A8 protocols of `ofe.core.quant`, generically, on any transformers causal LM.

Same primitives, hook sites and recipe as `ofe.core.quant` (`fake_quant`, `RangeObserver`, `asymmetric_params`,
`quantise_weight`, `quantise_per_token`, `Site`), on a deep copy so the original model is untouched:

- `static_per_tensor`: weights of every linear layer (`nn.Linear`, and GPT-2's `Conv1D`, whose weight
  is stored transposed) symmetric per tensor; activations asymmetric per tensor with static ranges,
  calibrated on separate batches (running min-max of the percentiles), at the input and output of every
  linear layer, every LayerNorm/RMSNorm output, the residual stream entering and leaving every decoder
  layer, and the attention scores (before the mask) and probabilities. The scores and probabilities
  are reached through transformers' AttentionInterface: the copy runs `quantising_attention`, ofe's
  transcription of the eager attention with two taps. It is used only where it reproduces the model's
  own eager logits on a calibration batch (a self-check); otherwise scores and probabilities stay in
  full precision and the metadata says so.
- `dynamic_per_token`: weights per output channel, and the input of every linear layer with one
  dynamic symmetric range per token. Nothing else.
- `torchao_dynamic`: the same layers with torchao's real int8 kernels (`ofe.core.torchao_int8`; absmax
  weight ranges, 8 bits only). torchao quantises nn.Linear only, so the copy's Conv1D layers (GPT-2) are
  first turned into the equivalent nn.Linear (`conv1d_to_linear`).

In both, the LM head (the output embeddings) and the logits stay in full precision, as in ofe's
protocol; the input embeddings are not quantised either (they are looked up, not multiplied).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ofe.config import QuantConfig
from ofe.core.quant import (RangeObserver, Site, asymmetric_params, fake_quant, quantise_per_token,
                            quantise_weight)
from ofe.pretrained import hf

ATTENTION_NAME = "ofe_quant"  # the name `quantising_attention` is registered under


def is_linear(m: nn.Module) -> bool:
    """nn.Linear, or a Conv1D as GPT-2 uses (a linear layer with a transposed (in, out) weight)."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def is_norm(m: nn.Module) -> bool:
    """torch's norms and the families' own classes (LlamaRMSNorm, ...), matched by name."""
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith(("LayerNorm", "RMSNorm"))


def quantise_linear_weight(m: nn.Module, bits: int, per_channel: bool, method: str) -> None:
    """In place; per output channel means per row of nn.Linear's (out, in) weight, per column of Conv1D's."""
    w = m.weight
    if type(m).__name__ == "Conv1D":
        w.copy_(quantise_weight(w.T, bits, per_channel, method).T)
    else:
        w.copy_(quantise_weight(w, bits, per_channel, method))


def conv1d_to_linear(q: nn.Module) -> None:
    """Replace every Conv1D of `q` (in place) by the nn.Linear that computes the same: Conv1D's (in, out)
    weight transposed, its bias. The LM head is never a Conv1D, so the set of layers is unchanged."""
    for name, m in list(q.named_modules()):
        if type(m).__name__ != "Conv1D":
            continue
        n_in, n_out = m.weight.shape
        linear = nn.Linear(n_in, n_out, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(m.weight.T)
            if m.bias is not None:
                linear.bias.copy_(m.bias)
        parent, _, attr = name.rpartition(".")
        setattr(q.get_submodule(parent) if parent else q, attr, linear)


# ---- attention with taps ------------------------------------------------------------------------------

class _Unsupported(Exception):
    """The model asked for an attention feature `quantising_attention` does not transcribe."""


_discovered: list[nn.Module] | None = None  # attention modules seen, while `_discover` is active


def quantising_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[Tensor, Tensor]:
    """The families' eager attention (softmax(q k^T * scaling + mask) v, grouped K/V heads repeated),
    with `module.ofe_scores` applied to the scores before the mask (as `ofe.core.model` taps them, so a range
    never spans the mask's large negatives) and `module.ofe_probs` to the probabilities."""
    for feature in ("softcap", "sinks", "s_aux"):  # they change the arithmetic below (a sliding window
        if kwargs.get(feature) is not None:        # lives in the mask, which the model builds)
            raise _Unsupported(feature)
    if _discovered is not None and not any(m is module for m in _discovered):
        _discovered.append(module)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each K/V head serves n_rep query heads
        n_rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    scores = _tap(module, "ofe_scores", scores)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = _tap(module, "ofe_probs", probs)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _tap(module: nn.Module, name: str, x: Tensor) -> Tensor:
    tap = getattr(module, name, None)
    return tap(x) if tap is not None else x


def register_attention() -> None:
    """Register `quantising_attention` (with the eager additive mask) under ATTENTION_NAME; idempotent."""
    hf.require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, quantising_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


@contextlib.contextmanager
def _discover() -> Iterator[list[nn.Module]]:
    global _discovered
    _discovered = []
    try:
        yield _discovered
    finally:
        _discovered = None


@torch.no_grad()
def switch_attention(model: nn.Module, q: nn.Module, inputs: Tensor, rtol: float = 1e-4) -> str | None:
    """Make the copy `q` (still full precision) run `quantising_attention` with identity taps on every
    attention module it calls; None if its logits on `inputs` match `model`'s, else the reason it does
    not, with `q` back on eager attention and no taps."""
    register_attention()
    reference = hf.forward(model, inputs).logits
    try:
        q.set_attn_implementation(ATTENTION_NAME)
        with _discover() as modules:
            logits = hf.forward(q, inputs).logits
        err = ((logits - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
        reason = None if modules else "no attention module called the AttentionInterface"
        if reason is None and not err <= rtol:
            reason = f"ofe's attention does not reproduce the model's eager logits (relative error {err:.2g})"
    except _Unsupported as e:
        reason, modules = f"the model's attention uses {e.args[0]}, which ofe's transcription lacks", []
    except (ValueError, AttributeError) as e:  # the model cannot switch its attention implementation
        reason, modules = f"the attention implementation cannot be switched ({e})", []
    if reason is not None:
        q.set_attn_implementation("eager")
        return reason
    for m in modules:  # identity taps: the hooks attach to these (nn.Identity has no parameters)
        m.ofe_scores, m.ofe_probs = nn.Identity(), nn.Identity()
    return None


# ---- the protocols ------------------------------------------------------------------------------------

def static_sites(q: nn.Module) -> dict[str, Site]:
    """Every activation the static protocol quantises, by a readable name (see `ofe.io.HF_QUANTISED_TENSORS`)."""
    head = q.get_output_embeddings()
    sites: dict[str, Site] = {}
    for name, m in q.named_modules():
        if m is head:
            continue
        if is_linear(m):
            sites[f"{name}:in"] = Site(m, "input")
            sites[f"{name}:out"] = Site(m, "output")
        elif is_norm(m) and not name.endswith(("q_norm", "k_norm")):  # QK-norms act per head, as in ofe
            sites[f"{name}:out"] = Site(m, "output")
        elif isinstance(getattr(m, "ofe_scores", None), nn.Module):
            sites[f"{name}.scores:out"] = Site(m.ofe_scores, "output")
            sites[f"{name}.probs:out"] = Site(m.ofe_probs, "output")
    for i, layer in enumerate(hf.decoder_layers(q)):
        sites[f"layers.{i}:in"] = Site(layer, "input")  # the residual stream (embeddings at layer 0)
        sites[f"layers.{i}:out"] = Site(layer, "output")
    return sites


def quantised_copy(model: nn.Module, protocol: str, bits: int, cfg: QuantConfig,
                   calib: list[Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """A fake-quantised copy of `model` and what was quantised ({"sites": n, "attention": reason or
    None}); static ranges are calibrated on `calib`, batches of (B, T+1) windows (inputs: [:, :-1])."""
    q = copy.deepcopy(model).eval()
    info: dict[str, Any] = {"protocol": protocol, "bits": bits, "attention_not_quantised": None}
    if protocol == "torchao_dynamic":
        from ofe.core import torchao_int8  # lazily: torchao is optional, and slow and noisy to import

        conv1d_to_linear(q)
        info["sites"] = torchao_int8.quantise_in_place(q, bits, skip=q.get_output_embeddings())
        return q, info
    if protocol == "static_per_tensor":
        info["attention_not_quantised"] = switch_attention(model, q, calib[0][:, :-1])
    per_channel = protocol == "dynamic_per_token"
    head = q.get_output_embeddings()
    linears = [m for m in q.modules() if is_linear(m) and m is not head]
    with torch.no_grad():
        for m in linears:
            quantise_linear_weight(m, bits, per_channel, cfg.weight_range)
    if protocol == "dynamic_per_token":
        for m in linears:
            Site(m, "input").attach(lambda x: quantise_per_token(x, bits))
        info["sites"] = len(linears)
        return q, info

    sites = static_sites(q)
    for site in sites.values():
        site.observer = RangeObserver(cfg.percentile)
        site.attach(lambda x, obs=site.observer: obs(x))
    with torch.no_grad():
        for w in calib:  # observe in full precision activations (weights already quantised, as ofe.core.quant)
            hf.forward(q, w[:, :-1])
    for site in sites.values():  # each site's quantiser replaces its observer
        scale, zp = asymmetric_params(site.observer.lo, site.observer.hi, bits)
        site.attach(lambda x, s=scale, z=zp: fake_quant(x, torch.tensor(s), z, 0, 2**bits - 1))
    info["sites"] = len(sites)
    return q, info
