"""Transformers glue for `ofe inspect`: load any causal LM on CPU in fp32, find its decoder layers and
final norm, probe its residual stream, and turn every way loading can fail into one message that names
the model and says what to do.

transformers is optional (the `hf` extra). It is imported inside functions only, never when `ofe` is
imported, so training, quantisation and the report work without it; `require_transformers` says how
to install it.

Probe sites match `ofe.core.probe` (the training metrics), so an inspected checkpoint and a trained run
land in the same long table: layer l < L, site `block_input` is the hidden state entering decoder layer
l (layer 0's is the embeddings, positions included where the model adds them), and layer L carries the
tensor entering the final norm (`unembed_input_pre_norm`) and leaving it (`unembed_input`).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ofe.core import metrics
from ofe.core.hooks import dotted_attr, first_tensor, layer_input
from ofe.plan.studies import looks_like_path

INSTALL_HINT = "pip install -e '.[hf]'"

# Where the decoder layers and the final norm sit under `model.base_model`, by family:
# GPT-NeoX/Pythia `layers` + `final_layer_norm`, OPT `decoder.layers` + `decoder.final_layer_norm`,
# GPT-2 (and GPT-J, GPT-Neo, Falcon, Bloom) `h` + `ln_f`, Llama (and Mistral, Qwen, Gemma) `layers` + `norm`.
LAYER_PATHS = ("layers", "h", "decoder.layers", "blocks")
FINAL_NORM_PATHS = ("final_layer_norm", "ln_f", "norm", "norm_f", "decoder.final_layer_norm", "decoder.norm")
HF_LIBRARIES = ("transformers", "tokenizers", "huggingface_hub", "safetensors")

Row = tuple[int, str, str, float]  # (layer, site, metric, value), as ofe.core.probe


class InspectError(Exception):
    """Bad input to `ofe inspect`; the message names the model and what to do."""


def require_transformers() -> Any:
    """The transformers module, or an InspectError saying how to install it."""
    from ofe.core.torchao_int8 import quiet_torchao_import

    quiet_torchao_import()  # transformers imports torchao, where installed (the int8 extra), with its noise
    try:
        import transformers
    except ImportError as e:
        raise InspectError(f"inspecting a pretrained model needs transformers, which is not installed: "
                           f"{INSTALL_HINT}") from e
    return transformers


# ---- where the model comes from -----------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A model as named on the command line, resolved: a local folder, or a hub name (and revision)
    whose files are in the cache or can be downloaded."""

    name: str
    revision: str | None
    local: bool
    path: str  # the absolute folder for a local model, else the hub name
    commit: str | None  # the hub commit the revision resolved to (None for a local folder)
    cache_dir: str | None = None


def resolve_source(name: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Source:
    """Check that `name` (at `revision`) can be loaded without loading it; raise InspectError if not."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if revision is not None:
            raise InspectError(f"{name}: --revision {revision} applies to a hub name, and this is a local "
                               "folder; drop --revision, or pass the hub name with --revision")
        if not (folder / "config.json").exists():
            raise InspectError(f"{name}: this folder has no config.json; pass a folder written by "
                               "save_pretrained (config.json, weights and tokenizer files)")
        return Source(name, None, True, str(folder.resolve()), None)
    if folder.exists() or looks_like_path(name):
        raise InspectError(f"{name}: no such model folder; check the path, or pass a hub name such as "
                           "EleutherAI/pythia-160m")
    require_transformers()
    from transformers.utils.hub import cached_file, extract_commit_hash

    with explain_load_errors(name, revision):
        config_file = cached_file(name, "config.json", revision=revision,
                                  cache_dir=str(cache_dir) if cache_dir else None)
    return Source(name, revision, False, name, extract_commit_hash(config_file, None),
                  str(cache_dir) if cache_dir else None)


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


@contextlib.contextmanager
def explain_load_errors(name: str, revision: str | None) -> Iterator[None]:
    """Turn transformers' and the hub's errors into one InspectError naming the model and the fix.
    transformers wraps the hub's typed errors in OSError; the original is in the exception chain."""
    try:
        yield
    except InspectError:
        raise
    except (OSError, ValueError) as e:
        from huggingface_hub import errors as hub

        at = f" at revision {revision}" if revision else ""
        kinds = list(_chain(e))
        if any(isinstance(x, hub.RevisionNotFoundError) for x in kinds):
            msg = (f"{name}: revision {revision!r} does not exist on the hub; list the branches and tags on "
                   f"https://huggingface.co/{name} (Pythia's checkpoints are step0 ... step143000), or drop "
                   "--revision")
        elif any(isinstance(x, hub.GatedRepoError) for x in kinds):
            msg = f"{name} is gated: accept its licence on https://huggingface.co/{name} and log in (hf auth login)"
        elif any(isinstance(x, hub.RepositoryNotFoundError) for x in kinds):
            msg = (f"{name} is neither a local folder nor a model on the hub (or it is private); check the "
                   "name, or pass a local path")
        elif (any(isinstance(x, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled, ConnectionError))
                  for x in kinds) or "couldn't connect" in str(e).lower()):
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
            msg = (f"{name}{at} is not in the local cache and the network is off/unreachable{offline}; download "
                   f"it on a machine with network (hf download {name}"
                   f"{f' --revision {revision}' if revision else ''}), or pass a local path")
        else:
            msg = f"{name}{at}: could not be loaded: {e}"
        raise InspectError(msg) from e


# ---- loading ------------------------------------------------------------------------------------------

def physical_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def memory_needed_gb(n_params: int) -> float:
    """fp32 weights twice: the model and the one quantised copy alive at a time (activations of the
    small probe batches are not counted)."""
    return 2 * 4 * n_params / 1e9


def load_causal_lm(src: Source, max_memory_gb: float | None = None) -> tuple[nn.Module, Any, int]:
    """(model in eval mode, fp32 on CPU, eager attention; its tokenizer; its parameter count).

    The architecture and the memory estimate are checked on a meta-device copy built from the config
    alone, so a model that cannot be inspected fails before any weight is read."""
    transformers = require_transformers()
    kw: dict[str, Any] = {"revision": src.revision, "cache_dir": src.cache_dir}
    with explain_load_errors(src.name, src.revision):
        config = transformers.AutoConfig.from_pretrained(src.path, **kw)
    arch = type(config).__name__
    try:
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    except (ValueError, KeyError) as e:  # transformers' message lists every causal LM class: too long
        raise InspectError(f"{src.name}: {arch} (model_type {getattr(config, 'model_type', '?')!r}) is not a "
                           "causal language model that transformers' AutoModelForCausalLM knows; ofe inspect "
                           "needs a decoder-only LM such as GPT-NeoX/Pythia, OPT, GPT-2 or Llama") from e
    decoder_layers(skeleton, src.name)  # unknown architecture: stop before loading weights
    n_params = sum(p.numel() for p in skeleton.parameters())
    del skeleton
    limit = max_memory_gb if max_memory_gb is not None else physical_memory_gb()
    need = memory_needed_gb(n_params)
    if need > limit:
        raise InspectError(f"{src.name}: {n_params:,} parameters need about {need:.3g} GB in fp32 "
                           f"(the model and its quantised copy), above the limit of {limit:.3g} GB "
                           "(--max-memory-gb; in a checkpoint study, inspect.mem_gb); inspect it on a "
                           "machine with more memory and a higher limit, or pick a smaller model")
    with explain_load_errors(src.name, src.revision):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            src.path, dtype=torch.float32, attn_implementation="eager", **kw)
        tokenizer = transformers.AutoTokenizer.from_pretrained(src.path, **kw)
    return model.eval(), tokenizer, n_params


def decoder_layers(model: nn.Module, name: str = "model") -> nn.ModuleList:
    """The ModuleList of decoder layers under `model.base_model`, or an InspectError."""
    base = getattr(model, "base_model", model)
    for path in LAYER_PATHS:
        layers = dotted_attr(base, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise InspectError(f"{name}: {type(model).__name__} has no list of decoder layers (looked for "
                       f"{', '.join('base_model.' + p for p in LAYER_PATHS)}); ofe inspect supports "
                       "decoder-only causal LMs such as GPT-NeoX/Pythia, OPT, GPT-2 and Llama")


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm between the last decoder layer and the unembedding, if the model has one."""
    base = getattr(model, "base_model", model)
    for path in FINAL_NORM_PATHS:
        norm = dotted_attr(base, path)
        if isinstance(norm, nn.Module):
            return norm
    return None


def context_limit(model: nn.Module) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocab_size(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[0]


def forward(model: nn.Module, idx: Tensor, **kw: Any) -> Any:
    """The model on packed windows: no padding (every token sees every earlier one, EOS included), no
    cache. The all-ones mask is explicit so that a tokenizer whose pad id is its EOS raises no warning."""
    return model(input_ids=idx, attention_mask=torch.ones_like(idx), use_cache=False, **kw)


ATTENTION_METRICS = ("attention_entropy", "sink_rate", "first_token_attention", "attention_sparsity")


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """The model on transformers' eager attention while probing, and back on its own afterwards: only the
    eager path forms the attention weights (SDPA and flash kernels return none for `output_attentions`).
    `load_causal_lm` loads eager already; this covers a model loaded otherwise. A model that cannot switch
    stays as it is, and returns no weights: `probe` then logs no attention metrics, and `ofe inspect`
    says so (`missing_attention_note`)."""
    before = getattr(model.config, "_attn_implementation", None)
    switched = False
    if before != "eager" and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            switched = model.config._attn_implementation == "eager"
        except (ValueError, ImportError, NotImplementedError):  # transformers refuses the switch
            pass
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(before)


def missing_attention_note(model: nn.Module, layers: set[int]) -> str | None:
    """What `ofe inspect` records when the probe logged no attention metrics at some decoder layers."""
    missing = sorted(set(range(len(decoder_layers(model)))) - layers)
    if not missing:
        return None
    impl = getattr(model.config, "_attn_implementation", None)
    return (f"no attention metrics ({', '.join(ATTENTION_METRICS)}) at layers {missing}: the model returned no "
            f"attention weights there (attention implementation {impl!r}; transformers returns them only from "
            "its eager attention); every other metric is complete")


@torch.no_grad()
def probe(model: nn.Module, idx: Tensor, max_corr_tokens: int = 256) -> list[Row]:
    """One forward pass on `idx` (B, T); the training probe's metrics (`ofe.core.probe.compute`) under the
    same names: every metric of `ofe.core.metrics.STREAM_METRICS` at every residual site, massive
    activations at `metrics.MASSIVE_SITES`, and attention entropy, sink rate, first-token attention and
    sparsity from the eager attention weights the model returns. Hooks only store tensors."""
    layers, norm = decoder_layers(model), final_norm(model)
    L = len(layers)
    store: dict[tuple[int, str], Tensor] = {}

    def pre(i: int):
        def fn(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = layer_input(args, kwargs)
            if x is not None:
                store[(i, "block_input")] = x.detach()
        return fn

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    if norm is not None:
        handles.append(norm.register_forward_pre_hook(
            lambda _m, args: store.__setitem__((L, "unembed_input_pre_norm"), args[0].detach())))
        handles.append(norm.register_forward_hook(
            lambda _m, _a, out: store.__setitem__((L, "unembed_input"), first_tensor(out).detach())))
    else:  # no final norm: the last layer's output is what the unembedding sees, under both names
        def last(_m: nn.Module, _a: tuple, out: Any) -> None:
            store[(L, "unembed_input_pre_norm")] = store[(L, "unembed_input")] = first_tensor(out).detach()
        handles.append(layers[-1].register_forward_hook(last))
    try:
        with eager_attention(model):
            out = forward(model, idx, output_attentions=True)
    finally:
        for h in handles:
            h.remove()

    rows: list[Row] = []
    for (layer, site), x in sorted(store.items()):
        for metric, fn in metrics.STREAM_METRICS.items():
            value = fn(x, max_corr_tokens) if metric == "token_correlation" else fn(x)
            rows.append((layer, site, metric, value))
        if site in metrics.MASSIVE_SITES:
            rows.extend((layer, site, metric, value) for metric, value in metrics.massive_activations(x).items())
    # transformers returns every layer's (B, H, T, T) weights at once (no hook can reduce them earlier);
    # an empty tuple, or None per layer, where the attention cannot form them
    for i, probs in enumerate(getattr(out, "attentions", None) or ()):
        if probs is not None:
            rows.append((i, "attention", "attention_entropy", metrics.attention_entropy_from_probs(probs)))
            summary = metrics.summarise_attention(probs)
            rows.extend((i, "attention", metric, value) for metric, value in metrics.attention_metrics(summary).items())
    return rows


@torch.no_grad()
def perplexity(model: nn.Module, windows: list[Tensor]) -> float:
    """exp(mean next-token cross-entropy) over batches of (B, T+1) token windows, computed here rather
    than by the model's `labels=` so every family is scored the same way (fp32, no padding)."""
    model.eval()
    losses = []
    for w in windows:
        logits = forward(model, w[:, :-1]).logits
        losses.append(torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)).item())
    return math.exp(sum(losses) / len(losses))
