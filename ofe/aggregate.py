"""Per-run files -> the tidy tables the report reads.

- results/runs.parquet: one row per planned run: grid columns, studies, status, summary figures.
- results/metrics.parquet: every run's metric rows joined with its grid columns.
Runs that have not finished are listed too (status `failed` with the last line of their error, or
`missing`), so a partial grid still aggregates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
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


def aggregate(plan: dict[str, Any], results_dir: Path | str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build and write runs.parquet and metrics.parquet under `results_dir`; returns both frames."""
    results_dir = Path(results_dir)
    grid_columns: list[str] = plan["grid_columns"]
    run_rows, metric_tables = [], []
    for run in plan["runs"]:
        run_dir = results_dir / "runs" / run["run_id"]
        status, summary, error = run_status(run_dir)
        peak = math.nan
        if summary and (run_dir / "metrics.parquet").exists():
            table = pq.read_table(run_dir / "metrics.parquet", schema=METRIC_SCHEMA)
            df = table.to_pandas()
            k = df[(df.metric == "kurtosis") & df.site.isin(KURTOSIS_SITES)].value
            k = k[k.map(math.isfinite)]
            peak = float(k.max()) if len(k) else math.nan
            for c, typ in [("run_id", pa.string())] + _grid_schema(grid_columns):
                value = run["run_id"] if c == "run_id" else run["grid"].get(c)
                table = table.append_column(pa.field(c, typ), pa.array([value] * len(table), typ))
            metric_tables.append(table)
        run_rows.append({
            "run_id": run["run_id"], **{c: run["grid"].get(c) for c in grid_columns},
            "studies": run["studies"], "status": status, "peak_kurtosis": peak, "error": error,
            **{f: summary.get(f) for f in SUMMARY_FIELDS},
        })

    id_and_grid = [("run_id", pa.string())] + _grid_schema(grid_columns)
    runs_schema = pa.schema(id_and_grid + [
        ("studies", pa.list_(pa.string())), ("status", pa.string()), ("peak_kurtosis", pa.float64()),
        ("error", pa.string()), *SUMMARY_FIELDS.items(),
    ])
    metrics_schema = pa.schema(id_and_grid + list(zip(METRIC_SCHEMA.names, METRIC_SCHEMA.types)))
    runs = pd.DataFrame(run_rows, columns=runs_schema.names)
    if metric_tables:
        metrics = pa.concat_tables([t.select(metrics_schema.names) for t in metric_tables]).to_pandas()
    else:
        metrics = pd.DataFrame({n: pd.Series(dtype=object) for n in metrics_schema.names})
    meta = {"studies": plan["studies"], "grid_columns": grid_columns, "config": plan["config"],
            "provenance": provenance()}
    write_parquet(runs, results_dir / "runs.parquet", runs_schema, meta)
    write_parquet(metrics, results_dir / "metrics.parquet", metrics_schema, meta)
    return runs, metrics
