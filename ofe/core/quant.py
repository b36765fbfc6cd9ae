"""Simulated post-training quantisation of weights and activations (W8A8): primitives and protocols.

Two protocols (docs/science.md section 5), both round-to-nearest fake quantisation on a copy of the model:
- `static_per_tensor`, the paper's likely protocol (Qualcomm's outlier-free-transformers pipeline):
  weights symmetric per-tensor (range by MSE search, or absmax); activations asymmetric per-tensor with
  static ranges calibrated on a few training batches (running min-max of the 99.999th percentiles), at
  the input and output of every linear layer (Q, K and V after their bias), the attention scores and
  probabilities, every residual sum (`Block.input`, `Block.mid`, `GPT.unembed_pre_norm`: the embedding
  sum enters block 0), the embeddings sum before an embedding norm, and norm outputs (`_static_sites`).
  The (tied) LM head stays in full precision.
- `dynamic_per_token`, the forgiving one (SmoothQuant's fake_quant): per-output-channel weights, dynamic
  per-token symmetric activations, at linear-layer inputs only.
A third, `torchao_dynamic`, is not simulated: it runs `dynamic_per_token`'s recipe (absmax weights) with
torchao's real int8 kernels (`ofe.core.torchao_int8`, 8 bits only).

What each protocol quantises, in words, is `ofe.io.QUANTISED_TENSORS` (torch-free, for the report);
evaluating a finished run under every protocol is `ofe.train.quantise`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ofe.config import QuantConfig
from ofe.core.attention import Attention
from ofe.core.hooks import first_tensor, layer_input
from ofe.core.model import GPT
from ofe.core.osp import SingleScaleRMSNorm

Protocol = Literal["static_per_tensor", "dynamic_per_token", "torchao_dynamic"]

# ---- primitives -------------------------------------------------------------------------------------

def fake_quant(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """Round-to-nearest onto the integer grid [qmin, qmax] and back: (clamp(round(x/s) + z) - z) * s."""
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def symmetric_limits(bits: int) -> tuple[int, int]:
    """Signed symmetric grid, e.g. [-127, 127] at 8 bits (no -128, so zero is exactly representable)."""
    q = 2 ** (bits - 1) - 1
    return -q, q


def symmetric_scale(x: Tensor, bits: int, per_channel: bool = False, method: str = "absmax") -> Tensor:
    """Scale of a symmetric grid for x: per tensor, or per row (output channel) of a weight matrix.
    `mse` searches the clipping ratio that minimises the squared error (per tensor or per row)."""
    qmin, qmax = symmetric_limits(bits)
    amax = x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True) if per_channel else x.abs().amax()
    amax = amax.clamp_min(1e-12)
    if method == "absmax":
        return amax / qmax
    best_scale, best_err = amax / qmax, None
    for ratio in torch.linspace(0.2, 1.0, 81).tolist():
        scale = amax * ratio / qmax
        err = (fake_quant(x, scale, 0.0, qmin, qmax) - x).pow(2)
        err = err.sum(dim=tuple(range(1, x.dim())), keepdim=True) if per_channel else err.sum()
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.minimum(err, best_err)
    return best_scale


def quantise_weight(w: Tensor, bits: int, per_channel: bool, method: str = "absmax") -> Tensor:
    qmin, qmax = symmetric_limits(bits)
    return fake_quant(w, symmetric_scale(w, bits, per_channel, method), 0.0, qmin, qmax)


def quantise_per_token(x: Tensor, bits: int) -> Tensor:
    """Dynamic symmetric quantisation with one scale per token (the last dimension is the width)."""
    qmin, qmax = symmetric_limits(bits)
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
    return fake_quant(x, scale, 0.0, qmin, qmax)


def asymmetric_params(lo: float, hi: float, bits: int) -> tuple[float, float]:
    """(scale, zero point) of an unsigned grid [0, 2^bits - 1] covering [lo, hi] and 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / (2**bits - 1)
    return scale, float(round(-lo / scale))


class RangeObserver:
    """Running min-max of per-batch low/high percentiles (static activation calibration)."""

    def __init__(self, percentile: float) -> None:
        self.q = percentile / 100
        self.lo, self.hi = math.inf, -math.inf

    def __call__(self, x: Tensor) -> None:
        flat = x.detach().float().flatten()
        lo, hi = -upper_quantile(-flat, self.q), upper_quantile(flat, self.q)
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)


def upper_quantile(flat: Tensor, q: float) -> float:
    """torch.quantile(flat, q) (linear interpolation) for q >= 0.5, from the top n(1-q)+2 values
    alone: torch.quantile sorts the whole tensor, which made calibrating on the attention scores
    (B x H x T x T values per layer) 75% of a run's quantisation time. No size limit either."""
    n = flat.numel()
    pos = q * (n - 1)
    i = math.floor(pos)
    top = torch.topk(flat, min(n - i, n)).values  # descending: top[-1] has ascending rank i
    below, above = top[-1].item(), top[-2].item() if top.numel() > 1 else top[-1].item()
    return below + (pos - i) * (above - below)


# ---- protocols on a model ---------------------------------------------------------------------------

@dataclass
class Site:
    """One tensor a protocol quantises, in ofe's GPT or a transformers model: the input or the output of
    `module`, the range observed there (static protocol), and the hook now on it."""
    module: nn.Module
    where: Literal["input", "output"]
    observer: RangeObserver | None = None
    handle: RemovableHandle | None = field(default=None, repr=False)

    def attach(self, fn: Callable[[Tensor], Tensor | None]) -> None:
        """Hook `fn` onto the site's tensor (replacing it unless `fn` returns None), in place of the hook
        the site had. Inputs may be positional or `hidden_states=`; outputs a tensor or a tuple led by one."""
        if self.handle is not None:
            self.handle.remove()
        if self.where == "input":
            def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
                x = layer_input(args, kwargs)
                out = None if x is None else fn(x)
                if out is None:
                    return None
                if args and args[0] is x:
                    return (out, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": out}
            self.handle = self.module.register_forward_pre_hook(pre, with_kwargs=True)
            return

        def post(_m: nn.Module, _args: tuple, output: Any) -> Any:
            out = fn(first_tensor(output))
            if out is None:
                return None
            return (out, *output[1:]) if isinstance(output, tuple) else out
        self.handle = self.module.register_forward_hook(post)


def _static_sites(model: GPT) -> dict[str, Site]:
    """Every activation the static protocol quantises, by a readable name: as in Qualcomm's W8A8
    protocol, the inputs and outputs of every linear layer, the attention scores (logits before the
    softmax) and probabilities, every norm's output, the residual sums and the embeddings sum."""
    sites: dict[str, Site] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            sites[f"{name}:in"] = Site(m, "input")
            if not name.endswith("attn.qkv"):  # its output is quantised after the Q/K bias, below
                sites[f"{name}:out"] = Site(m, "output")
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm, SingleScaleRMSNorm)) and not name.endswith(("q_norm", "k_norm")):
            sites[f"{name}:out"] = Site(m, "output")
        elif isinstance(m, Attention):
            sites[f"{name}.qkv_out:out"] = Site(m.qkv_out, "output")
            sites[f"{name}.scores:out"] = Site(m.scores, "output")
            sites[f"{name}.probs:out"] = Site(m.probs, "output")
    for i, blk in enumerate(model.blocks):
        sites[f"blocks.{i}.input:out"] = Site(blk.input, "output")  # residual sum (embeddings at 0)
        sites[f"blocks.{i}.mid:out"] = Site(blk.mid, "output")  # residual sum after attention
    sites["unembed_pre_norm:out"] = Site(model.unembed_pre_norm, "output")
    if model.embed_norm is not None:
        sites["embed_norm:in"] = Site(model.embed_norm, "input")  # the embeddings sum itself
    return sites


def quantised_copy(model: GPT, protocol: str, bits: int, cfg: QuantConfig,
                   calib_inputs: list[Tensor]) -> GPT:
    """A fake-quantised copy of `model` (the original is untouched), with hooks that quantise
    activations as the protocol says; static ranges are calibrated on `calib_inputs`. `torchao_dynamic`:
    a copy whose linear layers run torchao's int8 kernels (`cfg.weight_range` does not apply: absmax)."""
    if protocol == "torchao_dynamic":
        from ofe.core import torchao_int8  # lazily: torchao is optional, and slow and noisy to import

        return torchao_int8.quantised_copy(model, bits)[0]
    q = copy.deepcopy(model).eval()
    per_channel = protocol == "dynamic_per_token"
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(quantise_weight(m.weight, bits, per_channel, cfg.weight_range))
    if protocol == "dynamic_per_token":
        for m in q.modules():
            if isinstance(m, nn.Linear):
                Site(m, "input").attach(lambda x: quantise_per_token(x, bits))
        return q

    for m in q.modules():  # the fused SDPA kernel never shows the scores and probabilities
        if isinstance(m, Attention):
            m.explicit = True
    sites = _static_sites(q)
    for site in sites.values():
        site.observer = RangeObserver(cfg.percentile)
        site.attach(lambda x, obs=site.observer: obs(x))
    with torch.no_grad():
        for idx in calib_inputs:  # observe in full precision
            q(idx)
    for site in sites.values():  # each site's quantiser replaces its observer
        scale, zp = asymmetric_params(site.observer.lo, site.observer.hi, bits)
        # plain floats: no tensor of the host's, so the activation's device and dtype are used as they are
        site.attach(lambda x, s=scale, z=zp: fake_quant(x, s, z, 0, 2**bits - 1))
    return q


@torch.no_grad()
def perplexity(model: GPT, batches: list[tuple[Tensor, Tensor]]) -> float:
    model.eval()
    losses = [model(x, y)[1].item() for x, y in batches]
    return math.exp(sum(losses) / len(losses))
