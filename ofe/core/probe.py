"""Forward hooks that collect activations at the model's probe sites and hand them to the metrics.

Sites (docs/science.md section 1, "where and when"): the residual stream entering every block (layers
0..L-1), the tensor fed to the unembedding before and after a final norm (layer L), the queries and
keys of every attention (for attention entropy) and its attention weights (for sinks and sparsity).
Hooks store tensors, except the attention weights: a (B, H, T, T) tensor per layer is too large to keep
for every layer, so their hook reduces them at once to `metrics.AttentionSummary` (a pure function of
`ofe.core.metrics`). Everything else is computed after the forward pass, in fp32.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from ofe.core import metrics
from ofe.core.attention import SOFTMAX_SHAPED
from ofe.core.model import GPT

Row = tuple[int, str, str, float]  # (layer, site, metric, value)


def stream_sites(model: GPT) -> dict[tuple[int, str], nn.Module]:
    """(layer, site) -> the nn.Identity whose output is that residual-stream tensor."""
    L = len(model.blocks)
    sites = {(i, "block_input"): b.input for i, b in enumerate(model.blocks)}
    sites[(L, "unembed_input_pre_norm")] = model.unembed_pre_norm
    sites[(L, "unembed_input")] = model.unembed_input
    return sites


@contextlib.contextmanager
def _collect(modules: dict, store: dict, reduce: Callable[[Tensor], Any] = lambda t: t) -> Iterator[None]:
    def hook(key):
        def fn(_module: nn.Module, _inp: tuple, out: Tensor) -> None:
            store[key] = reduce(out.detach())
        return fn

    handles = [m.register_forward_hook(hook(key)) for key, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def explicit_attention(model: GPT) -> Iterator[None]:
    """Every attention on its explicit path, whose `probs` tap shows the weights (the fused kernel never
    forms them), and each back to the path it was on, whatever happens: training keeps its kernel."""
    attns = [b.attn for b in model.blocks]
    before = [a.explicit for a in attns]
    try:
        for a in attns:
            a.explicit = True
        yield
    finally:
        for a, was in zip(attns, before):
            a.explicit = was


class Activations(NamedTuple):
    streams: dict  # {(layer, site): stream tensor}
    qk: dict  # {(layer, 'q' | 'k'): tensor}
    attention: dict  # {layer: metrics.AttentionSummary}


@torch.no_grad()
def collect(model: nn.Module, idx: Tensor) -> Activations:
    """Run one forward pass on `idx` (B, T) and return the tensors at every probe site. Under FSDP
    every process must run this forward (it all-gathers each block's weights), even those that then
    compute nothing. The attention runs its explicit path here (equal to the fused kernel up to
    rounding); the training step's path is restored before it returns."""
    streams: dict = {}
    qk: dict = {}
    attention: dict = {}
    attn_taps = {}
    for i, b in enumerate(model.blocks):
        attn_taps[(i, "q")] = b.attn.q_site
        attn_taps[(i, "k")] = b.attn.k_site
    probs_taps = {i: b.attn.probs for i, b in enumerate(model.blocks)}
    was_training = model.training
    model.eval()
    try:
        with (_collect(stream_sites(model), streams), _collect(attn_taps, qk),
              _collect(probs_taps, attention, metrics.summarise_attention), explicit_attention(model)):
            model(idx)
    finally:
        model.train(was_training)
    return Activations(streams, qk, attention)


def compute(model: nn.Module, activations: Activations, max_corr_tokens: int = 256) -> list[Row]:
    """Every metric at every site, in fp32 (`ofe.core.metrics` upcasts), from `collect`'s tensors."""
    streams, qk, attention = activations
    rows: list[Row] = []
    for (layer, site), x in streams.items():
        for name, fn in metrics.STREAM_METRICS.items():
            value = fn(x, max_corr_tokens) if name == "token_correlation" else fn(x)
            rows.append((layer, site, name, value))
        if site in metrics.MASSIVE_SITES:
            rows.extend((layer, site, name, value) for name, value in metrics.massive_activations(x).items())
    for i, b in enumerate(model.blocks):
        if b.attn.kind in SOFTMAX_SHAPED:  # any other weight function's entropy would be a softmax it never computes
            ent = metrics.attention_entropy(qk[(i, "q")], qk[(i, "k")], b.attn.logit_cap)
            rows.append((i, "attention", "attention_entropy", ent))
        rows.extend((i, "attention", name, value) for name, value in metrics.attention_metrics(attention[i]).items())
    return rows


def probe(model: GPT, idx: Tensor, max_corr_tokens: int = 256) -> list[Row]:
    """Run one forward pass on `idx` (B, T) and return every metric at every site."""
    return compute(model, collect(model, idx), max_corr_tokens)
