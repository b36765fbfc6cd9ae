"""Per-run files -> the tidy tables the report reads.

- results/runs.parquet: one row per planned run: grid columns, studies, status, summary figures.
- results/metrics.parquet: every run's metric rows joined with its grid columns.
- results/quant.parquet: every run's int8 rows (protocol, bits, ppl_fp, ppl_q, delta) with its grid
  columns and kurtosis (mean over layers at the last step, and peak).
Runs that have not finished are listed too (status `failed` with the last line of their error, or
`missing`), so a partial grid still aggregates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ofe.results import METRIC_SCHEMA, provenance, write_parquet

GRID_TYPES = {"scale": pa.string(), "block": pa.string(), "beta": pa.float64(), "optimizer": pa.string(),
              "lr": pa.float64(), "seed": pa.int64()}
SUMMARY_FIELDS = {"final_train_loss": pa.float64(), "final_val_loss": pa.float64(),
                  "tokens_per_s": pa.float64(), "wall_s": pa.float64(), "steps_done": pa.int64()}
KURTOSIS_SITES = ("block_input", "unembed_input")


def _grid_schema(grid_columns: list[str]) -> list[tuple[str, pa.DataType]]:
    return [(c, GRID_TYPES.get(c, pa.float64())) for c in grid_columns]


def run_status(run_dir: Path) -> tuple[str, dict[str, Any], str | None]:
    """(status, summary, last error line) of one run folder."""
    summary_path, error_path = run_dir / "summary.json", run_dir / "error.txt"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        return summary["status"], summary, None
    if error_path.exists():
        lines = [ln for ln in error_path.read_text().splitlines() if ln.strip()]
        return "failed", {}, lines[-1] if lines else "unknown error"
    return "missing", {}, None


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


def _with_grid(table: pa.Table, run: dict[str, Any], grid_columns: list[str]) -> pa.Table:
    """Prepend run_id and the grid columns (constant within a run) to one run's table."""
    for c, typ in reversed([("run_id", pa.string())] + _grid_schema(grid_columns)):
        value = run["run_id"] if c == "run_id" else run["grid"].get(c)
        table = table.add_column(0, pa.field(c, typ), _repeat(value, typ, len(table)))
    return table


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pd.DataFrame:
    if tables:
        return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]).to_pandas()
    return schema.empty_table().to_pandas()


def aggregate(plan: dict[str, Any], results_dir: Path | str,
              out_dir: Path | str | None = None) -> dict[str, pd.DataFrame]:
    """Read the run folders under `results_dir`/runs; write runs.parquet, metrics.parquet and
    quant.parquet to `out_dir` (default `results_dir`)."""
    from ofe.quant import QUANT_SCHEMA

    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    grid_columns: list[str] = plan["grid_columns"]
    run_rows, metric_tables, quant_tables = [], [], []
    for run in plan["runs"]:
        run_dir = results_dir / "runs" / run["run_id"]
        status, summary, error = run_status(run_dir)
        peak = final_mean = math.nan
        if summary and (run_dir / "metrics.parquet").exists():
            table = pq.read_table(run_dir / "metrics.parquet", schema=METRIC_SCHEMA)
            peak, final_mean = kurtosis_summary(table)
            metric_tables.append(_with_grid(table, run, grid_columns))
        if (run_dir / "quant.parquet").exists():
            q = pq.read_table(run_dir / "quant.parquet", schema=QUANT_SCHEMA)
            for name, value, typ in (("mean_kurtosis", final_mean, pa.float64()),
                                     ("peak_kurtosis", peak, pa.float64()), ("status", status, pa.string())):
                q = q.append_column(pa.field(name, typ), _repeat(value, typ, len(q)))
            quant_tables.append(_with_grid(q, run, grid_columns))
        run_rows.append({
            "run_id": run["run_id"], **{c: run["grid"].get(c) for c in grid_columns},
            "studies": run["studies"], "status": status, "peak_kurtosis": peak,
            "final_mean_kurtosis": final_mean, "error": error,
            **{f: summary.get(f) for f in SUMMARY_FIELDS},
        })

    id_and_grid = [("run_id", pa.string())] + _grid_schema(grid_columns)
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
    meta = {"studies": plan["studies"], "grid_columns": grid_columns, "config": plan["config"],
            "provenance": provenance()}
    for name, df in frames.items():
        write_parquet(df, out_dir / f"{name}.parquet", schemas[name], meta)
    return frames
