"""Simulated post-training quantisation of weights and activations (W8A8) and its evaluation.

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
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor, nn

from ofe.checkpoint import QUANT_PARTIAL, load_final_model, recorded_hash
from ofe.config import PROTOCOLS, QuantConfig, RunConfig  # noqa: F401 (QuantConfig: re-exported)
from ofe.model import GPT, Attention
from ofe.parallel import resolve_device
from ofe.results import atomic_write_json, provenance, write_parquet

Protocol = Literal["static_per_tensor", "dynamic_per_token"]

# What each protocol quantises, in words, for the report (kept beside `_static_sites`, which is the truth).
QUANTISED_TENSORS = {
    "static_per_tensor": (
        "weights of every linear layer (symmetric, per tensor); activations (asymmetric, per tensor, static "
        "ranges) at the input and output of every linear layer (Q, K and V after their bias), the attention "
        "scores and probabilities, every norm's output, both residual sums of every block (the stream "
        "entering block 0 is the embeddings sum), the stream entering the unembedding; the tied LM head "
        "stays in full precision"
    ),
    "dynamic_per_token": (
        "weights of every linear layer (symmetric, per output channel); the input of every linear layer "
        "(symmetric, one dynamic range per token); nothing else"
    ),
}


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
class _Site:
    module: nn.Module
    where: Literal["input", "output"]
    observer: RangeObserver | None = None
    hook: Callable | None = field(default=None, repr=False)


def _static_sites(model: GPT) -> dict[str, _Site]:
    """Every activation the static protocol quantises, by a readable name: as in Qualcomm's W8A8
    protocol, the inputs and outputs of every linear layer, the attention scores (logits before the
    softmax) and probabilities, every norm's output, the residual sums and the embeddings sum."""
    sites: dict[str, _Site] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            sites[f"{name}:in"] = _Site(m, "input")
            if not name.endswith("attn.qkv"):  # its output is quantised after the Q/K bias, below
                sites[f"{name}:out"] = _Site(m, "output")
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and not name.endswith(("q_norm", "k_norm")):
            sites[f"{name}:out"] = _Site(m, "output")
        elif isinstance(m, Attention):
            sites[f"{name}.qkv_out:out"] = _Site(m.qkv_out, "output")
            sites[f"{name}.scores:out"] = _Site(m.scores, "output")
            sites[f"{name}.probs:out"] = _Site(m.probs, "output")
    for i, blk in enumerate(model.blocks):
        sites[f"blocks.{i}.input:out"] = _Site(blk.input, "output")  # residual sum (embeddings at 0)
        sites[f"blocks.{i}.mid:out"] = _Site(blk.mid, "output")  # residual sum after attention
    sites["unembed_pre_norm:out"] = _Site(model.unembed_pre_norm, "output")
    if model.embed_norm is not None:
        sites["embed_norm:in"] = _Site(model.embed_norm, "input")  # the embeddings sum itself
    return sites


def _hook(site: _Site, fn: Callable[[Tensor], Tensor | None]):
    if site.where == "input":
        def pre(_m, args):
            out = fn(args[0])
            return None if out is None else (out, *args[1:])
        return site.module.register_forward_pre_hook(pre)

    def post(_m, _args, output):
        return fn(output)
    return site.module.register_forward_hook(post)


def quantised_copy(model: GPT, protocol: str, bits: int, cfg: QuantConfig,
                   calib_inputs: list[Tensor]) -> GPT:
    """A fake-quantised copy of `model` (the original is untouched), with hooks that quantise
    activations as the protocol says; static ranges are calibrated on `calib_inputs`."""
    q = copy.deepcopy(model).eval()
    per_channel = protocol == "dynamic_per_token"
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(quantise_weight(m.weight, bits, per_channel, cfg.weight_range))
    if protocol == "dynamic_per_token":
        for m in q.modules():
            if isinstance(m, nn.Linear):
                _hook(_Site(m, "input"), lambda x: quantise_per_token(x, bits))
        return q

    for m in q.modules():  # the fused SDPA kernel never shows the scores and probabilities
        if isinstance(m, Attention):
            m.explicit = True
    sites = _static_sites(q)
    handles = []
    for site in sites.values():
        site.observer = RangeObserver(cfg.percentile)
        handles.append(_hook(site, lambda x, obs=site.observer: obs(x)))
    with torch.no_grad():
        for idx in calib_inputs:  # observe in full precision
            q(idx)
    for h in handles:
        h.remove()
    for site in sites.values():
        scale, zp = asymmetric_params(site.observer.lo, site.observer.hi, bits)
        # plain floats: no tensor of the host's, so the activation's device and dtype are used as they are
        _hook(site, lambda x, s=scale, z=zp: fake_quant(x, s, z, 0, 2**bits - 1))
    return q


@torch.no_grad()
def perplexity(model: GPT, batches: list[tuple[Tensor, Tensor]]) -> float:
    model.eval()
    losses = [model(x, y)[1].item() for x, y in batches]
    return math.exp(sum(losses) / len(losses))


# ---- one run ----------------------------------------------------------------------------------------

QUANT_SCHEMA = pa.schema([("protocol", pa.string()), ("bits", pa.int64()), ("ppl_fp", pa.float64()),
                          ("ppl_q", pa.float64()), ("delta", pa.float64())])
QUANT_COLUMNS = QUANT_SCHEMA.names


def quantise_run(run_dir: Path | str, cfg: QuantConfig, device: torch.device | str | None = None) -> pd.DataFrame:
    """Evaluate a finished run's final checkpoint in full precision and under every protocol and bit
    width; write RUN/quant.parquet (config, quant settings and provenance in its metadata).

    It runs in fp32 on `device`, by default the one the run trained on (`train.device`, resolved as
    training resolves it): on a cluster, the job's GPU. Each protocol x bits row is kept in
    RUN/quant.partial.json as soon as it is measured, so a requeued job computes only the rows missing
    there; rows of another run identity or other quant settings are discarded."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    run_cfg = RunConfig.from_dict(summary["config"])
    wanted = [(p, b) for p in cfg.protocols for b in cfg.bits]
    if summary["status"] == "completed":
        done = _evaluate(run_dir, run_cfg, cfg, recorded_hash(summary), device)
        rows = [done[key] for key in wanted]
    else:  # a diverged run has no model worth quantising: keep the row, with NaN perplexities
        rows = [(p, b, math.nan, math.nan, math.nan) for p, b in wanted]
    df = pd.DataFrame(rows, columns=QUANT_COLUMNS)
    # the run's identity (ofe.config.run_identity), so a GPU run's table is not taken for another run's
    meta = {"config": summary["config"], "config_hash": summary.get("config_hash"), "quant": asdict(cfg),
            "status": summary["status"], "provenance": provenance()}
    write_parquet(df, run_dir / "quant.parquet", QUANT_SCHEMA, meta)
    (run_dir / QUANT_PARTIAL).unlink(missing_ok=True)  # every row of it is in quant.parquet now
    return df


def _evaluate(run_dir: Path, run_cfg: RunConfig, cfg: QuantConfig, identity: str | None,
              device: torch.device | str | None) -> dict[tuple[str, int], tuple]:
    """Every (protocol, bits) row of the completed run: those already in the partial file, then the rest,
    each added to it as it is measured."""
    from ofe.data import FIXED_STREAM, TokenData

    partial = PartialRows(run_dir / QUANT_PARTIAL, identity, asdict(cfg))
    todo = [(p, b) for p in cfg.protocols for b in cfg.bits if (p, b) not in partial.rows]
    if partial.rows:
        print(f"[ofe] {run_dir}: resuming the int8 evaluation from {QUANT_PARTIAL}: {len(partial.rows)} of "
              f"{len(partial.rows) + len(todo)} rows done", flush=True)
    if not todo:
        return partial.rows
    if device is None:
        device = resolve_device(run_cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device(device)
    if device.type == "cpu":  # the run's CPU budget; on a GPU the host threads hardly matter
        torch.set_num_threads(run_cfg.train.threads)
    model = GPT(run_cfg.model)  # fp32, and evaluated without autocast
    load_final_model(run_dir, model, sharded=run_cfg.train.parallel == "fsdp")  # fsdp: sharded folder
    model.to(device)
    data = TokenData(run_cfg.data_dir, run_cfg.model.context, run_cfg.train.batch_size)
    calib = [data.batch("train", [FIXED_STREAM, 2, i])[0].to(device) for i in range(cfg.calib_batches)]
    evals = [(x.to(device), y.to(device)) for x, y in data.val_batches(cfg.eval_batches)]
    # the rows kept were measured on this model and these batches: their full-precision perplexity holds
    ppl_fp = next(iter(partial.rows.values()))[2] if partial.rows else perplexity(model, evals)
    for protocol, bits in todo:
        qmodel = quantised_copy(model, protocol, bits, cfg, calib)
        ppl_q = perplexity(qmodel, evals)
        del qmodel  # one quantised copy in memory at a time
        partial.add((protocol, bits, ppl_fp, ppl_q, ppl_q - ppl_fp))
        print(f"[ofe] {run_dir}: {protocol} W{bits}A{bits}: ppl {ppl_fp:.3f} -> {ppl_q:.3f}", flush=True)
    return partial.rows


class PartialRows:
    """The rows of an int8 evaluation in progress, in a JSON file written atomically after each row,
    with the run identity (the summary's config hash) and the quant settings they were measured with.
    Rows of another identity or other settings are not loaded (the file is overwritten at the first
    new row); `ofe.checkpoint.prepare_run_dir` moves a file of another identity aside, as other outputs."""

    def __init__(self, path: Path, identity: str | None, settings: dict) -> None:
        self.path, self.identity, self.settings = path, identity, settings
        self.rows: dict[tuple[str, int], tuple] = {}
        if not path.exists():
            return
        try:
            record = json.loads(path.read_text())
            rows = {(r[0], r[1]): (r[0], r[1], *map(float, r[2:])) for r in record["rows"]}
        except (ValueError, KeyError, TypeError, IndexError) as e:  # its rows can be measured again
            print(f"[ofe] {path} is unreadable ({type(e).__name__}: {e}): its rows are measured again", flush=True)
            return
        if record.get("config_hash") != identity:
            print(f"[ofe] {path} holds rows of run {record.get('config_hash')}, this run is {identity}: "
                  "they are measured again", flush=True)
        elif record.get("quant") != json.loads(json.dumps(settings)):  # as JSON: tuples are lists there
            print(f"[ofe] {path} holds rows measured with other quant settings: they are measured again",
                  flush=True)
        else:
            self.rows = rows

    def add(self, row: tuple) -> None:
        self.rows[(row[0], row[1])] = row
        # non-finite perplexities as the strings float() reads back ("nan", "inf"): strict JSON has none
        rows = [[p, b, *(v if math.isfinite(v) else str(v) for v in values)]
                for p, b, *values in self.rows.values()]
        atomic_write_json(self.path, {"config_hash": self.identity, "quant": self.settings, "rows": rows})
