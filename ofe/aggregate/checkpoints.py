"""Checkpoint folders (RESULTS/checkpoints/<ckpt_id>/, written by `ofe inspect`) -> the tables the report's
checkpoint studies read, beside runs.parquet:

- checkpoints.parquet         one row per planned checkpoint: model, revision, step, status, summary figures
                              (its earliest super weight among them: layer, row, col and value, null where
                              none was found or the inspection predates the scan)
- checkpoint_metrics.parquet  every completed checkpoint's per-layer metric rows
- checkpoint_quant.parquet    every completed checkpoint's int8 rows, with its kurtosis summary

As for runs, a checkpoint that has not finished is listed (`failed` with the last line of its error, or
`missing`), and one whose files cannot be trusted (unreadable, the wrong schema, or measured on another
model, revision, batches, batch size, context or quant settings than the plan's) is `corrupt` with the
reason and contributes no rows.
The step is the plan's (from a `stepN` revision or the entry's `step`), null where unknown.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from ofe.aggregate.read import READ_ERRORS, CorruptRun, read_table, run_status
from ofe.io import METRIC_SCHEMA, QUANT_SCHEMA, read_metadata, write_parquet
from ofe.runfolder import ERROR, INSPECT, METRICS, QUANT, brief
from ofe.plan.studies import measure_settings

ID_FIELDS = [("ckpt_id", pa.string()), ("model", pa.string()), ("label", pa.string()),
             ("revision", pa.string()), ("order", pa.int64()), ("step", pa.int64())]
KURTOSIS = [("max_kurtosis", pa.float64()), ("mean_kurtosis", pa.float64())]
# inspect.json's `super_weight` (`ofe.pretrained.superweight.headline`), flattened into columns
SUPER_WEIGHT = {"super_weight_layer": ("layer", pa.int64()), "super_weight_row": ("row", pa.int64()),
                "super_weight_col": ("col", pa.int64()), "super_weight_value": ("weight", pa.float64())}
SUMMARY = [("status", pa.string()), ("error", pa.string()), ("architecture", pa.string()),
           ("n_params", pa.int64()), ("n_layers", pa.int64()), ("resolved_commit", pa.string()),
           ("ppl_fp", pa.float64()), ("val_loss", pa.float64()), *KURTOSIS, ("wall_s", pa.float64()),
           *((name, kind) for name, (_, kind) in SUPER_WEIGHT.items())]


def schemas() -> dict[str, pa.Schema]:
    metric_fields = [(n, t) for n, t in zip(METRIC_SCHEMA.names, METRIC_SCHEMA.types) if n != "step"]
    return {
        "checkpoints": pa.schema([*ID_FIELDS[:1], ("studies", pa.list_(pa.string())), *ID_FIELDS[1:],
                                  ("tokens", pa.int64()), *SUMMARY]),
        "checkpoint_metrics": pa.schema([*ID_FIELDS, *metric_fields]),
        "checkpoint_quant": pa.schema([*ID_FIELDS, *zip(QUANT_SCHEMA.names, QUANT_SCHEMA.types), *KURTOSIS]),
    }


def kurtosis(metrics: pd.DataFrame) -> tuple[float, float]:
    """(max over the residual-stream sites and layers, mean over the decoder layers' inputs) of kurtosis."""
    kurt = metrics[metrics.metric == "kurtosis"]
    stream = kurt[kurt.site.isin(["block_input", "unembed_input"])].value
    inputs = kurt[kurt.site == "block_input"].value
    return (float(stream.max()) if len(stream) else math.nan, float(inputs.mean()) if len(inputs) else math.nan)


def _read_inspect(folder: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """inspect.json of a finished inspection of the planned model and revision, or CorruptRun."""
    try:
        summary = json.loads((folder / INSPECT).read_text())
    except READ_ERRORS as e:
        raise CorruptRun(f"{INSPECT}: {brief(e)}") from e
    if not isinstance(summary, dict) or summary.get("status") != "completed":
        raise CorruptRun(f"{INSPECT}: not the summary of a completed inspection")
    # the job is given the model's name as the config spells it, and inspect.json records it so
    if (summary.get("model"), summary.get("revision")) != (ckpt["model"], ckpt["revision"]):
        raise CorruptRun(f"{INSPECT}: measured {summary.get('model')!r} at {summary.get('revision')!r}, "
                         f"not the planned {ckpt['model']!r} at {ckpt['revision']!r}; rerun it")
    return summary


def _check_settings(meta: dict[str, Any], plan: dict[str, Any]) -> None:
    """CorruptRun if the tables were measured with other settings than the plan's (batches, batch size,
    context where the plan sets one, the quant section): Snakemake reruns an inspection whose settings
    changed, but not when it has lost track of the folder (moved, .snakemake/ removed)."""
    got = meta.get("inspect", {})
    planned = measure_settings(plan["inspect"]) if "inspect" in plan else {}  # plans before checkpoint studies
    want = {k: v for k, v in planned.items() if v is not None}
    wrong = [f"{k} {got.get(k)} (planned {v})" for k, v in want.items() if got.get(k) != v]
    # compared as JSON: a plan built in this process holds tuples where the file's metadata holds lists
    if "quant" in plan and json.dumps(meta.get("quant"), sort_keys=True) != json.dumps(plan["quant"], sort_keys=True):
        wrong.append("other quant settings than the planned")
    if wrong:
        raise CorruptRun(f"{METRICS}: measured with {', '.join(wrong)}; rerun it")


def read_checkpoint(folder: Path, ckpt: dict[str, Any], plan: dict[str, Any] | None = None) -> dict[str, Any]:
    """Status, summary figures and tables of one checkpoint folder (absent tables where not completed),
    checked against the `plan`'s settings where given."""
    if not (folder / INSPECT).exists():  # error.txt: failed with its last line; else not run yet
        status, _, error = run_status(folder) if (folder / ERROR).exists() else ("missing", {}, None)
        return {"status": status, "error": error}
    try:
        summary = _read_inspect(folder, ckpt)
        metrics = read_table(folder / METRICS, METRIC_SCHEMA, None).to_pandas()
        quant = read_table(folder / QUANT, QUANT_SCHEMA, None).to_pandas()
        meta = read_metadata(folder / METRICS)
        if plan is not None:
            _check_settings(meta, plan)
        info = meta.get("inspect", {})
    except (CorruptRun, *READ_ERRORS) as e:  # the metadata, read after the tables, can still be damaged
        return {"status": "corrupt", "error": f"corrupt: {e if isinstance(e, CorruptRun) else brief(e)}"}
    peak, mean = kurtosis(metrics)
    # tokens seen only where the step is known (an unknown step reads as 0 in inspect.json)
    tokens = summary.get("tokens") if ckpt["step"] is not None else None
    if tokens is None or not isinstance(tokens, int) or tokens < 0:
        metrics["tokens"], tokens = None, None
    sw = summary.get("super_weight") if isinstance(summary.get("super_weight"), dict) else {}
    return {"status": "completed", "error": None, "architecture": info.get("architecture"),
            "n_params": info.get("n_params"), "n_layers": info.get("n_layers"),
            "resolved_commit": summary.get("resolved_commit"), "ppl_fp": summary.get("ppl_fp"),
            "val_loss": math.log(summary["ppl_fp"]) if summary.get("ppl_fp") else None,
            "max_kurtosis": peak, "mean_kurtosis": mean, "wall_s": summary.get("wall_s"),
            "tokens": tokens, **{name: sw.get(key) for name, (key, _) in SUPER_WEIGHT.items()},
            "metrics": metrics, "quant": quant}


def aggregate_checkpoints(plan: dict[str, Any], results_dir: Path, out_dir: Path,
                          meta: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Read every planned checkpoint's folder; write the three tables (empty where the plan has none)."""
    schema = schemas()
    rows, metric_frames, quant_frames = [], [], []
    for ckpt in plan.get("checkpoints", []):
        got = read_checkpoint(results_dir / "checkpoints" / ckpt["ckpt_id"], ckpt, plan)
        ids = {name: ckpt[name] for name, _ in ID_FIELDS}
        rows.append({**ids, "studies": ckpt["studies"], "tokens": got.get("tokens"),
                     **{name: got.get(name) for name, _ in SUMMARY}})
        if got["status"] == "completed":
            metric_frames.append(got["metrics"].drop(columns="step").assign(**ids))
            quant_frames.append(got["quant"].assign(**ids, max_kurtosis=got["max_kurtosis"],
                                                    mean_kurtosis=got["mean_kurtosis"]))
    frames = {"checkpoints": pa.Table.from_pylist(rows, schema["checkpoints"]).to_pandas()}
    for name, parts in (("checkpoint_metrics", metric_frames), ("checkpoint_quant", quant_frames)):
        table = (pa.Table.from_pandas(pd.concat(parts, ignore_index=True)[schema[name].names], schema[name],
                                      preserve_index=False)
                 if parts else schema[name].empty_table())
        frames[name] = table.to_pandas()
    for name, df in frames.items():
        write_parquet(df, out_dir / f"{name}.parquet", schema[name], meta)
    return frames
