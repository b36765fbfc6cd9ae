"""Quantising a finished run: its int8 (W8A8) perplexity under every protocol and bit width
(`ofe.core.quant`), written to RUN/quant.parquet, resumable row by row (`PartialRows`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from ofe.config import QuantConfig, RunConfig
from ofe.core.model import GPT
from ofe.core.quant import perplexity, quantised_copy
from ofe.io import QUANT_COLUMNS, QUANT_SCHEMA, atomic_write_json, provenance, write_parquet
from ofe.runfolder import QUANT, QUANT_PARTIAL, load_final_model, read_summary, recorded_hash
from ofe.train.parallel import local_rank, resolve_device


def quantise_run(run_dir: Path | str, cfg: QuantConfig, device: torch.device | str | None = None) -> pd.DataFrame:
    """Evaluate a finished run's final checkpoint in full precision and under every protocol and bit
    width; write RUN/quant.parquet (config, quant settings and provenance in its metadata).

    It runs in fp32 on `device`, by default the one the run trained on (`train.device`, resolved as
    training resolves it): on a cluster, the job's GPU. Each protocol x bits row is kept in
    RUN/quant.partial.json as soon as it is measured, so a requeued job computes only the rows missing
    there; rows of another run identity or other quant settings are discarded."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    run_cfg = RunConfig.from_dict(summary["config"])
    wanted = cfg.pairs()  # torchao_dynamic at 8 bits only
    if summary["status"] == "completed":
        done = _evaluate(run_dir, run_cfg, cfg, recorded_hash(summary), device)
        rows = [done[key] for key in wanted]
    else:  # a diverged run has no model worth quantising: keep the row, with NaN perplexities
        rows = [(p, b, math.nan, math.nan, math.nan) for p, b in wanted]
    df = pd.DataFrame(rows, columns=QUANT_COLUMNS)
    # the run's identity (ofe.config.run_identity), so a GPU run's table is not taken for another run's
    meta = {"config": summary["config"], "config_hash": summary.get("config_hash"), "quant": asdict(cfg),
            "status": summary["status"], "provenance": provenance()}
    write_parquet(df, run_dir / QUANT, QUANT_SCHEMA, meta)
    (run_dir / QUANT_PARTIAL).unlink(missing_ok=True)  # every row of it is in quant.parquet now
    return df


def _evaluate(run_dir: Path, run_cfg: RunConfig, cfg: QuantConfig, identity: str | None,
              device: torch.device | str | None) -> dict[tuple[str, int], tuple]:
    """Every (protocol, bits) row of the completed run: those already in the partial file, then the rest,
    each added to it as it is measured."""
    from ofe.core.data import FIXED_STREAM, TokenData

    partial = PartialRows(run_dir / QUANT_PARTIAL, identity, asdict(cfg))
    todo = [pb for pb in cfg.pairs() if pb not in partial.rows]
    if partial.rows:
        print(f"[ofe] {run_dir}: resuming the int8 evaluation from {QUANT_PARTIAL}: {len(partial.rows)} of "
              f"{len(partial.rows) + len(todo)} rows done", flush=True)
    if not todo:
        return partial.rows
    if device is None:
        device = resolve_device(run_cfg.train.device, local_rank())
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
    new row); `ofe.train.checkpoint.prepare_run_dir` moves a file of another identity aside, as other outputs."""

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
