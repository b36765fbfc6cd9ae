"""Per-run files -> the tidy tables the report reads.

- results/runs.parquet: one row per planned run: grid columns, studies, status, summary figures.
- results/metrics.parquet: every run's metric rows joined with its grid columns.
- results/quant.parquet: every run's int8 rows (protocol, bits, ppl_fp, ppl_q, delta) with its grid
  columns and kurtosis (mean over layers at the last step, and peak).
Runs that have not finished are listed too (status `failed` with the last line of their error, or
`missing`), so a partial grid still aggregates. A run whose files cannot be trusted (unreadable, empty,
the wrong schema, written for another config than the plan's, or outputs without the summary.json
that marks them final) is `corrupt`, with the reason in its `error` cell, and contributes no rows:
one bad folder never stops the others from aggregating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ofe.aggregate.checkpoints import aggregate_checkpoints
from ofe.aggregate.read import CorruptRun, check_config, read_table, run_status
from ofe.config import config_hash
from ofe.io import METRIC_SCHEMA, QUANT_SCHEMA, provenance, write_parquet
from ofe.plan.validate import format_value  # text labels spelt as in run folder names
from ofe.runfolder import FINISHED, METRICS, QUANT, SUMMARY

GRID_TYPES = {"scale": pa.string(), "block": pa.string(), "beta": pa.float64(), "optimizer": pa.string(),
              "lr": pa.float64(), "seed": pa.int64()}
SUMMARY_FIELDS = {"final_train_loss": pa.float64(), "final_val_loss": pa.float64(),
                  "tokens_per_s": pa.float64(), "wall_s": pa.float64(), "steps_done": pa.int64()}
KURTOSIS_SITES = ("block_input", "unembed_input")


# ---- grid columns ------------------------------------------------------------------------------------

def _infer_type(values: list[Any]) -> pa.DataType:
    """The Arrow type of an extra grid column from its planned values. Lists (e.g. `optim.betas`) and
    mixed values become text labels: the report groups, colours and tabulates by grid columns, and a
    list cell is unhashable in pandas and unreadable in a legend; the exact values stay in the config."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return pa.float64()  # never set: any type holds nulls; float64 is what older tables had
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    return pa.string()


def grid_schema(plan: dict[str, Any]) -> list[tuple[str, pa.DataType]]:
    """(column, Arrow type) of every grid column: the fixed axes' known types, an extra axis (any swept
    config key) typed from its values across the plan's runs."""
    return [(c, GRID_TYPES.get(c) or _infer_type([r["grid"].get(c) for r in plan["runs"]]))
            for c in plan["grid_columns"]]


def _grid_values(run: dict[str, Any], schema: list[tuple[str, pa.DataType]]) -> dict[str, Any]:
    """The run's grid labels, converted to their column's type (text columns take any value as a label)."""
    values = {c: run["grid"].get(c) for c, _ in schema}
    return {c: format_value(values[c]) if values[c] is not None and pa.types.is_string(typ) else values[c]
            for c, typ in schema}


def _summary_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's figures for runs.parquet. A value of the wrong type would fail the write of the
    whole table, so it makes this one run corrupt instead."""
    out = {}
    for name, typ in SUMMARY_FIELDS.items():
        value, integral = summary.get(name), typ == pa.int64()
        if value is None:
            out[name] = None
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (integral and not float(value).is_integer())):
            raise CorruptRun(f"{SUMMARY}: {name}: {value!r} is not {'an integer' if integral else 'a number'}")
        out[name] = int(value) if integral else float(value)
    return out


@dataclass
class RunFiles:
    """One run folder, checked: its status, the reason or error line, and what it contributes."""

    status: str
    error: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    metrics: pa.Table | None = None
    quant: pa.Table | None = None


def read_run(run_dir: Path, planned_config: dict[str, Any] | None = None) -> RunFiles:
    """Status, summary figures and tables of one run folder. Only a finished run whose files all read
    back, for the planned config, contributes rows; a finished run that fails a check is `corrupt`."""
    status, summary, error = run_status(run_dir)
    if status not in FINISHED:
        return RunFiles(status, error)
    want = config_hash(planned_config) if planned_config is not None else None
    try:
        check_config(summary, want, SUMMARY)
        figures = _summary_figures(summary)
        if not (run_dir / METRICS).exists():
            raise CorruptRun(f"{METRICS}: missing, though {SUMMARY} says the run {status}")
        metrics = read_table(run_dir / METRICS, METRIC_SCHEMA, want)
        quant = (read_table(run_dir / QUANT, QUANT_SCHEMA, want)
                 if (run_dir / QUANT).exists() else None)
    except CorruptRun as e:
        return RunFiles("corrupt", f"corrupt: {e}")
    return RunFiles(status, None, figures, metrics, quant)


# ---- the tables --------------------------------------------------------------------------------------

def kurtosis_summary(metrics: pa.Table) -> tuple[float, float]:
    """(peak over steps and layers, mean over layers at the last logged step) of the paper's Kurt at
    the residual-stream sites (block inputs and the unembedding input); non-finite values ignored.
    Arrow compute, not pandas: this runs once per run, 1,000s of times per aggregation."""
    mask = pc.and_(pc.equal(metrics["metric"], "kurtosis"),
                   pc.is_in(metrics["site"], value_set=pa.array(KURTOSIS_SITES)))
    k = metrics.filter(mask)
    values, steps = k["value"].to_numpy(), k["step"].to_numpy()
    finite = np.isfinite(values)
    values, steps = values[finite], steps[finite]
    if values.size == 0:
        return math.nan, math.nan
    return float(values.max()), float(values[steps == steps.max()].mean())


def _repeat(value: Any, typ: pa.DataType, n: int) -> pa.Array:
    """A column of n copies of one value."""
    return pa.array([value], typ).take(np.zeros(n, dtype=np.int64))


def _with_grid(table: pa.Table, run_id: str, labels: dict[str, Any],
               grid: list[tuple[str, pa.DataType]]) -> pa.Table:
    """Prepend run_id and the grid columns (constant within a run) to one run's table."""
    for c, typ in reversed([("run_id", pa.string())] + grid):
        value = run_id if c == "run_id" else labels[c]
        table = table.add_column(0, pa.field(c, typ), _repeat(value, typ, len(table)))
    return table


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pd.DataFrame:
    if tables:
        return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]).to_pandas()
    return schema.empty_table().to_pandas()


def aggregate(plan: dict[str, Any], results_dir: Path | str,
              out_dir: Path | str | None = None) -> dict[str, pd.DataFrame]:
    """Read the run folders under `results_dir`/runs; write runs.parquet, metrics.parquet and
    quant.parquet to `out_dir` (default `results_dir`), and the checkpoint studies' tables
    (`ofe.aggregate.checkpoints`)."""
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    grid = grid_schema(plan)
    run_rows, metric_tables, quant_tables = [], [], []
    for run in plan["runs"]:
        got = read_run(results_dir / "runs" / run["run_id"], run.get("config"))
        labels = _grid_values(run, grid)
        peak = final_mean = math.nan
        if got.metrics is not None:
            peak, final_mean = kurtosis_summary(got.metrics)
            metric_tables.append(_with_grid(got.metrics, run["run_id"], labels, grid))
        if got.quant is not None:
            q = got.quant
            for name, value, typ in (("mean_kurtosis", final_mean, pa.float64()),
                                     ("peak_kurtosis", peak, pa.float64()), ("status", got.status, pa.string())):
                q = q.append_column(pa.field(name, typ), _repeat(value, typ, len(q)))
            quant_tables.append(_with_grid(q, run["run_id"], labels, grid))
        run_rows.append({
            "run_id": run["run_id"], **labels, "studies": run["studies"], "status": got.status,
            "peak_kurtosis": peak, "final_mean_kurtosis": final_mean, "error": got.error,
            **{f: got.figures.get(f) for f in SUMMARY_FIELDS},
        })

    id_and_grid = [("run_id", pa.string())] + grid
    schemas = {
        "runs": pa.schema(id_and_grid + [
            ("studies", pa.list_(pa.string())), ("status", pa.string()), ("peak_kurtosis", pa.float64()),
            ("final_mean_kurtosis", pa.float64()), ("error", pa.string()), *SUMMARY_FIELDS.items(),
        ]),
        "metrics": pa.schema(id_and_grid + list(zip(METRIC_SCHEMA.names, METRIC_SCHEMA.types))),
        "quant": pa.schema(id_and_grid + list(zip(QUANT_SCHEMA.names, QUANT_SCHEMA.types)) + [
            ("mean_kurtosis", pa.float64()), ("peak_kurtosis", pa.float64()), ("status", pa.string())]),
    }
    frames = {
        "runs": pa.Table.from_pylist(run_rows, schemas["runs"]).to_pandas(),
        "metrics": _concat(metric_tables, schemas["metrics"]),
        "quant": _concat(quant_tables, schemas["quant"]),
    }
    meta = {"studies": plan["studies"], "grid_columns": plan["grid_columns"], "config": plan["config"],
            "provenance": provenance()}
    for name, df in frames.items():
        write_parquet(df, out_dir / f"{name}.parquet", schemas[name], meta)
    return {**frames, **aggregate_checkpoints(plan, results_dir, out_dir, meta)}
