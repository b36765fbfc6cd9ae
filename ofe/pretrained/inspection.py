"""`ofe inspect`: the training metrics and the int8 evaluation of any pretrained causal LM, or of a
finished `ofe` run re-measured on other data.

Outputs in OUT, each written atomically (`ofe.io`), in the schemas training and quantisation use,
so a checkpoint of a public model and an `ofe` run can be read by the same code:
- metrics.parquet  METRIC_SCHEMA: per layer and site, every metric of the training probe, each the mean
                   over --batches held-out batches of its value on one batch (training's probe measures
                   one batch); plus (layer -1, site "val", metric "loss"), the fp evaluation loss.
                   step = the revision's training step when it reads `stepN` (Pythia), else 0 (an `ofe`
                   run: its last step); tokens = step x tokens per step where known (an `ofe` run,
                   Pythia's 1024 x 2048), else -1.
- quant.parquet    QUANT_SCHEMA: fp perplexity and each protocol x bit width (`ofe.pretrained.quant` for a
                   pretrained model, `ofe.core.quant` itself for an `ofe` run).
- inspect.json     written last: its presence means OUT is complete. Besides the summary figures, the
                   super-weight scan (`ofe.pretrained.superweight`: every layer's down-projection peaks,
                   each super weight found, the earliest as `super_weight`) and `notes`: what could not
                   be measured (attention weights a model did not return, a family without a known down
                   projection), which also go into both tables' metadata.
Both Parquet files carry the model (name, revision, resolved commit), the data and the provenance.

Data: the stdlib corpus of `ofe.core.data` by default (an `ofe` run: its own data section), a DataConfig
(`--data-config`), or a text file, tokenised with the model's own tokenizer; documents are taken in a
fixed shuffled order and cut into non-overlapping windows of context + 1 tokens. Metric and evaluation
batches come from the validation split, calibration batches from the training split (a text file:
evaluation windows from its start, calibration windows after them), so ranges are never calibrated on
the batches they are scored on.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ofe.config import ConfigError, DataConfig, QuantConfig
from ofe.io import (HF_NOT_QUANTISED, HF_QUANTISED_TENSORS, METRIC_SCHEMA, QUANT_COLUMNS, QUANT_SCHEMA,
                    QUANTISED_TENSORS, atomic_write_json, library_versions, provenance, write_parquet)
from ofe.plan import studies
from ofe.pretrained import superweight
from ofe.pretrained.hf import HF_LIBRARIES, InspectError
from ofe.runfolder import INSPECT, METRICS, QUANT, SUMMARY, final_checkpoint, load_final_model, read_summary

# Tokens per optimiser step of public training runs whose revisions name the step.
TOKENS_PER_STEP = {"EleutherAI/pythia": 1024 * 2048}
DEFAULT_CONTEXT = 256  # eager attention keeps B x H x T^2 probabilities per layer: 256 keeps that small


@dataclass(frozen=True)
class Settings:
    """How much data, in what shape; every field a command-line option of `ofe inspect`."""

    batches: int = 4  # metric batches (held out)
    batch_size: int = 8
    context: int | None = None  # None: 256 capped at the model's positions (an `ofe` run: its context)
    threads: int | None = None


def revision_step(revision: str | None) -> int:
    """Pythia-style revision names carry the training step: 'step1000' -> 1000; anything else -> 0
    (`ofe.plan.studies.revision_step`, which says None there, with 0 for the unknown step)."""
    return studies.revision_step(revision) or 0


# ---- data ---------------------------------------------------------------------------------------------

Encode = Callable[[str], np.ndarray]  # one document -> its token ids followed by the EOS token


def hf_encoder(tokenizer: Any) -> Encode:
    """Documents as a pretrained model saw them in training: its own tokens without added specials
    (a BOS per document would be noise inside a packed window), each document ended by EOS."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (tokenizer.bos_token_id or 0)

    def encode(text: str) -> np.ndarray:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray([*ids, eos], dtype=np.int64)
    return encode


def _stream(texts: list[str], encode: Encode, need: int) -> np.ndarray:
    """Tokens of `texts` in a fixed shuffled order (not the corpus's alphabetical one), only as many
    documents as it takes to reach `need` tokens."""
    from ofe.core.data import FIXED_STREAM

    order = list(range(len(texts)))
    random.Random(FIXED_STREAM).shuffle(order)
    parts, total = [], 0
    for i in order:
        if total >= need:
            break
        parts.append(encode(texts[i]))
        total += parts[-1].size
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _windows(tokens: np.ndarray, n_batches: int, batch_size: int, context: int, what: str,
             why: str) -> list[Tensor]:
    n = n_batches * batch_size * (context + 1)
    if tokens.size < n:
        raise InspectError(f"data: the {what} gives {tokens.size} tokens, and {n_batches} batches ({why}) of "
                           f"{batch_size} x (context {context} + 1) need {n}; use more data, or lower "
                           "--batches, --batch-size, --context or the quant batches")
    w = torch.from_numpy(tokens[:n].astype(np.int64)).view(n_batches, batch_size, context + 1)
    return list(w.unbind(0))


@dataclass
class Batches:
    probe: list[Tensor]  # (B, T+1) windows: metrics on [:, :-1]
    evals: list[Tensor]  # perplexity (held out, like probe)
    calib: list[Tensor]  # static ranges (the training split)
    description: dict[str, Any]


def load_batches(data: DataConfig | None, text_file: Path | None, encode: Encode, settings: Settings,
                 context: int, quant: QuantConfig) -> Batches:
    """Windows of the configured data: text file, DataConfig, or (default) the stdlib corpus."""
    B = settings.batch_size
    n_val = max(settings.batches, quant.eval_batches)
    n_calib = quant.calib_batches if "static_per_tensor" in quant.protocols else 0
    why_val = f"the larger of --batches {settings.batches} and quant eval_batches {quant.eval_batches}"
    why_calib = f"quant calib_batches {quant.calib_batches}"
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise InspectError(f"--text-file {path}: no such file")
        raw = path.read_bytes()
        tokens = encode(raw.decode("utf-8", errors="replace"))
        val_n = n_val * B * (context + 1)
        val = _windows(tokens, n_val, B, context, f"text file {path}", why_val)
        calib = _windows(tokens[val_n:], n_calib, B, context, f"text file {path} after the held-out windows",
                         why_calib) if n_calib else []
        desc = {"text_file": str(path.resolve()), "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
    else:
        from ofe.core.data import load_splits

        cfg = data or DataConfig()
        try:
            train_texts, val_texts = load_splits(cfg)
        except ValueError as e:
            raise InspectError(str(e)) from e
        need_val, need_calib = n_val * B * (context + 1), n_calib * B * (context + 1)
        val = _windows(_stream(val_texts, encode, need_val), n_val, B, context, "validation split", why_val)
        calib = _windows(_stream(train_texts, encode, need_calib), n_calib, B, context, "training split",
                         why_calib) if n_calib else []
        desc = {"data_config": asdict(cfg), "cache_id": cfg.cache_id}
    return Batches(val[: settings.batches], val[: quant.eval_batches], calib, desc)


# ---- the two sources ----------------------------------------------------------------------------------

@dataclass
class Target:
    """What is inspected, behind one interface: a pretrained model (`ofe.pretrained.hf`) or an `ofe` run."""

    kind: str  # "hf" or "run"
    model: torch.nn.Module
    encode: Encode
    vocab_size: int
    context_limit: int | None
    step: int
    tokens_per_step: int | None
    meta: dict[str, Any]
    probe: Callable[[Tensor], list]
    perplexity: Callable[[torch.nn.Module, list[Tensor]], float]
    quantise: Callable[..., tuple[torch.nn.Module, dict[str, Any]]]
    quantised_tensors: dict[str, str]
    default_data: DataConfig | None = None
    # one forward pass on the super-weight prompt, hooked (`ofe.pretrained.superweight.scan`'s report)
    superweight: Callable[[], dict[str, Any]] | None = None
    # a note when the probe logged no attention metrics at some layers, from the layers it logged them at
    attention_note: Callable[[set[int]], str | None] = lambda _layers: None


def hf_target(name: str, revision: str | None, cache_dir: Path | None, max_memory_gb: float | None) -> Target:
    from ofe.pretrained import hf, quant as hf_quant

    src = hf.resolve_source(name, revision, cache_dir)
    model, tokenizer, n_params = hf.load_causal_lm(src, max_memory_gb)
    per_step = next((v for k, v in TOKENS_PER_STEP.items() if not src.local and name.startswith(k)), None)
    meta = {"kind": "hf", "model": name, "path": src.path, "local": src.local, "revision": revision,
            "resolved_commit": src.commit, "architecture": type(model).__name__, "n_params": n_params,
            "n_layers": len(hf.decoder_layers(model)), "final_norm": hf.final_norm(model) is not None,
            "model_config": model.config.to_dict()}
    # the authors' prompt as their code tokenises it: the model's tokenizer with its default special tokens
    prompt = tokenizer(superweight.PROMPT, return_tensors="pt")["input_ids"]

    def scan() -> dict[str, Any]:
        return superweight.scan(hf.decoder_layers(model), model.config.model_type,
                                lambda: hf.forward(model, prompt))

    return Target("hf", model, hf_encoder(tokenizer), hf.vocab_size(model), hf.context_limit(model),
                  revision_step(revision), per_step, meta, lambda x: hf.probe(model, x), hf.perplexity,
                  hf_quant.quantised_copy, {**HF_QUANTISED_TENSORS, "not_quantised": HF_NOT_QUANTISED},
                  superweight=scan, attention_note=lambda layers: hf.missing_attention_note(model, layers))


def run_target(run_dir: Path) -> Target:
    """A finished `ofe` run: its final checkpoint and config, loaded as `ofe.train.quantise.quantise_run` loads them
    (`checkpoint.pt`, or an fsdp run's sharded `checkpoint.dcp`)."""
    from ofe.config import RunConfig
    from ofe.core import probe, quant
    from ofe.core.model import GPT

    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY).exists():
        raise InspectError(f"--run {run_dir}: no summary.json, so not a finished ofe run; train it to the end "
                           "first (python -m ofe train), or pass a run folder")
    summary = read_summary(run_dir)
    if summary.get("status") != "completed":
        raise InspectError(f"--run {run_dir}: the run {summary.get('status')} at step {summary.get('steps_done')}"
                           " and has no final model to inspect; inspect a completed run")
    cfg = RunConfig.from_dict(summary["config"])
    sharded = cfg.train.parallel == "fsdp"
    final = final_checkpoint(run_dir, sharded)
    if not final.exists():
        kind = "train.parallel: fsdp, sharded" if sharded else f"train.parallel: {cfg.train.parallel}"
        raise InspectError(f"--run {run_dir}: the run completed but its final checkpoint {final.name} ({kind}) "
                           "is missing; it was moved or deleted: restore it, or train the run again")
    model = GPT(cfg.model)
    load_final_model(run_dir, model, sharded=sharded)
    model.eval()
    tok = _run_tokenizer(cfg.data.tokenizer)

    def encode(text: str) -> np.ndarray:
        return tok.encode_docs([text]).astype(np.int64)  # the document and its EOS, as `prepare` writes

    def ppl(m: torch.nn.Module, windows: list[Tensor]) -> float:
        return quant.perplexity(m, [(w[:, :-1], w[:, 1:]) for w in windows])

    def quantise(m: torch.nn.Module, protocol: str, bits: int, qcfg: QuantConfig, calib: list[Tensor]):
        return (quant.quantised_copy(m, protocol, bits, qcfg, [w[:, :-1] for w in calib]),
                {"protocol": protocol, "bits": bits})

    def scan() -> dict[str, Any]:
        # the prompt alone (without the EOS `encode` ends a document with), cut to the model's positions
        prompt = torch.from_numpy(encode(superweight.PROMPT)[:-1])[None]
        return superweight.scan(model.blocks, "ofe", lambda: model(prompt[:, :cfg.model.context]))

    meta = {"kind": "run", "model": str(run_dir.resolve()), "run_dir": str(run_dir.resolve()),
            "config": summary["config"], "config_hash": summary.get("config_hash"),
            "n_params": model.num_params(), "run_status": summary["status"]}
    return Target("run", model, encode, cfg.model.vocab_size, cfg.model.context, summary["steps_done"],
                  cfg.train.batch_size * cfg.model.context, meta, lambda x: probe.probe(model, x), ppl,
                  quantise, QUANTISED_TENSORS, default_data=cfg.data, superweight=scan)


def _run_tokenizer(name: str) -> Any:
    """The run's own tokenizer (`ofe.core.data.Tokenizer`); a transformers one may be missing or uncached."""
    from ofe.core.data import Tokenizer

    if name == "bytes":
        return Tokenizer(name)
    from ofe.pretrained import hf

    hf.require_transformers()
    with hf.explain_load_errors(name, None):
        try:
            return Tokenizer(name)
        except ConfigError as e:  # not cached, not on the hub: it names data.tokenizer and how to fill the cache
            raise InspectError(str(e)) from e


# ---- the command --------------------------------------------------------------------------------------

def inspect(out: Path | str, *, model: str | None = None, revision: str | None = None,
            run: Path | str | None = None, data: DataConfig | None = None, text_file: Path | str | None = None,
            settings: Settings | None = None, quant: QuantConfig | None = None,
            max_memory_gb: float | None = None, cache_dir: Path | str | None = None,
            step: int | None = None) -> dict[str, Any]:
    """Inspect `model` (a hub name or folder, at `revision`) or the `ofe` run folder `run`; write
    OUT/metrics.parquet, OUT/quant.parquet and OUT/inspect.json; return inspect.json's content.
    `step` is the checkpoint's training step where its revision does not carry it (a local folder)."""
    settings, quant = settings or Settings(), quant or QuantConfig()
    if (model is None) == (run is None):
        raise InspectError("pass exactly one of --model NAME_OR_PATH and --run RUN_DIR")
    if run is not None and revision is not None:
        raise InspectError(f"--revision {revision} names a hub revision; an ofe run has one final checkpoint: "
                           "drop --revision")
    if data is not None and text_file is not None:
        raise InspectError("pass at most one of --data-config and --text-file")
    out = Path(out)
    if run is not None and out.resolve() == Path(run).resolve():
        raise InspectError(f"--out {out} is the run folder itself; its metrics.parquet and quant.parquet are "
                           "the run's own: pass another --out")
    t0 = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    target = (hf_target(model, revision, Path(cache_dir) if cache_dir else None, max_memory_gb)
              if model is not None else run_target(Path(run)))
    limit = target.context_limit
    if settings.context is None:  # a run is measured at its own context; a pretrained model at 256 at most
        context = limit if target.kind == "run" and limit else min(limit or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    elif limit is not None and settings.context > limit:
        raise InspectError(f"--context {settings.context}: {target.meta['model']} has {limit} positions; "
                           f"pass at most {limit}")
    else:
        context = settings.context
    batches = load_batches(data if (data or text_file) else target.default_data,
                           Path(text_file) if text_file else None, target.encode, settings, context, quant)
    top = max(int(w.max()) for w in batches.probe + batches.evals + batches.calib)
    if top >= target.vocab_size:
        raise InspectError(f"{target.meta['model']}: its tokenizer produced id {top}, beyond the model's "
                           f"{target.vocab_size} embeddings; the tokenizer does not belong to this model")

    step = target.step if step is None else step
    tokens = step * target.tokens_per_step if target.tokens_per_step else (0 if step == 0 else -1)
    sums: dict[tuple[int, str, str], list[float]] = {}
    for w in batches.probe:
        for layer, site, metric, value in target.probe(w[:, :-1]):
            sums.setdefault((layer, site, metric), []).append(value)
    rows = [(step, tokens, layer, site, metric, float(np.mean(v))) for (layer, site, metric), v in sums.items()]
    notes = [n for n in [target.attention_note({layer for layer, site, _ in sums if site == "attention"})] if n]
    sw_scan = target.superweight() if target.superweight else None
    if sw_scan and sw_scan["note"]:
        notes.append(sw_scan["note"])
    for note in notes:
        print(f"[ofe] inspect {target.meta['model']}: note: {note}", flush=True)

    ppl_fp = target.perplexity(target.model, batches.evals)
    rows.append((step, tokens, -1, "val", "loss", math.log(ppl_fp)))
    qrows, qinfo = [], []
    for protocol, bits in quant.pairs():  # torchao_dynamic at 8 bits only
        qmodel, info = target.quantise(target.model, protocol, bits, quant, batches.calib)
        ppl_q = target.perplexity(qmodel, batches.evals)
        del qmodel  # one quantised copy alive at a time (the memory estimate counts one)
        qrows.append((protocol, bits, ppl_fp, ppl_q, ppl_q - ppl_fp))
        qinfo.append(info)
        print(f"[ofe] inspect {target.meta['model']}: {protocol} W{bits}A{bits}: ppl {ppl_fp:.3f} -> "
              f"{ppl_q:.3f}", flush=True)

    meta = {"inspect": {**target.meta, "step": step, "tokens": tokens, "context": context,
                        "batch_size": settings.batch_size, "batches": settings.batches, "notes": notes},
            "data": batches.description, "quant": asdict(quant), "quantised_tensors": target.quantised_tensors,
            "quant_runs": qinfo, "provenance": {**provenance(), **_hf_versions()}}
    if target.kind == "run":
        meta["config"] = target.meta["config"]  # where training's own files keep the run config
    metrics_df = pd.DataFrame(rows, columns=METRIC_SCHEMA.names).sort_values(["layer", "site", "metric"])
    (out / INSPECT).unlink(missing_ok=True)  # a previous inspection's marker must not vouch for these
    write_parquet(metrics_df, out / METRICS, METRIC_SCHEMA, meta)
    write_parquet(pd.DataFrame(qrows, columns=QUANT_COLUMNS), out / QUANT, QUANT_SCHEMA, meta)
    kurt = metrics_df[metrics_df.metric == "kurtosis"].value
    summary = {"status": "completed", "model": target.meta["model"], "kind": target.kind,
               "revision": revision, "resolved_commit": target.meta.get("resolved_commit"), "step": step,
               "tokens": tokens, "ppl_fp": ppl_fp, "max_kurtosis": float(kurt.max()) if len(kurt) else None,
               "quant": [dict(zip(QUANT_COLUMNS, r)) for r in qrows],
               # the earliest super weight (None: none found), and the whole scan: every layer's peaks
               "super_weight": superweight.headline(sw_scan) if sw_scan else None, "super_weight_scan": sw_scan,
               "notes": notes,
               "wall_s": round(time.perf_counter() - t0, 3), "provenance": meta["provenance"]}
    atomic_write_json(out / INSPECT, summary)  # last: marks OUT complete
    return summary


def _hf_versions() -> dict[str, Any]:
    return {"hf_libraries": library_versions(HF_LIBRARIES)}
