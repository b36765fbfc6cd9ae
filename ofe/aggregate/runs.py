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

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ofe.config import config_hash
from ofe.io import METADATA_KEY, METRIC_SCHEMA, QUANT_SCHEMA, provenance, write_parquet
from ofe.plan.validate import format_value  # text labels spelt as in run folder names

GRID_TYPES = {"scale": pa.string(), "block": pa.string(), "beta": pa.float64(), "optimizer": pa.string(),
              "lr": pa.float64(), "seed": pa.int64()}
SUMMARY_FIELDS = {"final_train_loss": pa.float64(), "final_val_loss": pa.float64(),
                  "tokens_per_s": pa.float64(), "wall_s": pa.float64(), "steps_done": pa.int64()}
KURTOSIS_SITES = ("block_input", "unembed_input")
FINISHED = ("completed", "diverged")  # the statuses training writes into summary.json
# What reading a damaged file raises (pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors);
# anything else is a bug here and should fail loudly, not be blamed on a run folder.
READ_ERRORS = (OSError, ValueError, TypeError, KeyError, pa.ArrowException)


class CorruptRun(Exception):
    """A run folder whose files cannot be trusted; the message (file: what is wrong) is the reason shown."""


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


# ---- reading one run folder --------------------------------------------------------------------------

def _brief(e: BaseException) -> str:
    """One line of an exception: the runs table shows one line per run."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def read_summary(path: Path) -> dict[str, Any]:
    """A finished run's summary.json, or CorruptRun saying why it is not one."""
    try:
        # json.loads takes NaN and Infinity: summaries written before they were strict JSON carry them
        summary = json.loads(path.read_text())
    except READ_ERRORS as e:
        raise CorruptRun(f"summary.json: {_brief(e)}") from e
    if not isinstance(summary, dict):
        raise CorruptRun(f"summary.json: not a JSON object but {type(summary).__name__}")
    if "status" not in summary:
        raise CorruptRun("summary.json: no status")
    if summary["status"] not in FINISHED:
        raise CorruptRun(f"summary.json: status {summary['status']!r} is not one of {list(FINISHED)}")
    return summary


def run_status(run_dir: Path) -> tuple[str, dict[str, Any], str | None]:
    """(status, summary, last error line or corrupt reason) of one run folder."""
    summary_path, error_path = run_dir / "summary.json", run_dir / "error.txt"
    if summary_path.exists():
        try:
            summary = read_summary(summary_path)
        except CorruptRun as e:
            return "corrupt", {}, f"corrupt: {e}"
        return summary["status"], summary, None
    if error_path.exists():
        try:  # a log: bytes that are not UTF-8 still tell what went wrong
            lines = [ln for ln in error_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError as e:
            lines = [f"error.txt: {_brief(e)}"]
        return "failed", {}, lines[-1] if lines else "unknown error"
    # Training writes metrics.parquet, then summary.json; quantisation runs after both. Outputs without
    # the summary were stopped between those writes or damaged: not known to be final. A run in
    # progress has only the launcher's files, checkpoints and logs, and stays `missing`.
    outputs = [name for name in ("metrics.parquet", "quant.parquet") if (run_dir / name).exists()]
    if outputs:
        return "corrupt", {}, (f"corrupt: summary.json: missing, though {' and '.join(outputs)} "
                               f"exist{'s' if len(outputs) == 1 else ''}")
    return "missing", {}, None


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
            raise CorruptRun(f"summary.json: {name}: {value!r} is not {'an integer' if integral else 'a number'}")
        out[name] = int(value) if integral else float(value)
    return out


def _check_config(record: dict[str, Any], want: str | None, where: str) -> None:
    """CorruptRun if a file records another config than the planned one (hash `want`): its numbers must
    never be shown under this run's labels. Nothing to compare where either side records none."""
    config = record.get("config")
    if config is not None and not isinstance(config, dict):
        raise CorruptRun(f"{where}: its config is not a mapping but {type(config).__name__}")
    # the hash is computed afresh, not read from the file, so both sides use today's definition
    have = config_hash(config) if config is not None else record.get("config_hash")
    if want is not None and have is not None and have != want:
        raise CorruptRun(f"{where}: results belong to another config (hash {have}, planned {want}); rerun it")


def _read_table(path: Path, schema: pa.Schema, want: str | None) -> pa.Table:
    """One of a run's Parquet files, checked: readable, with the expected columns and types (pyarrow
    reads a file lacking them as columns of nulls, silently), and written for the planned config."""
    try:
        with pq.ParquetFile(path) as f:
            have = f.schema_arrow
            wrong = [f"{c.name} is {have.field(c.name).type}, expected {c.type}" if c.name in have.names
                     else f"no column {c.name}" for c in schema
                     if c.name not in have.names or have.field(c.name).type != c.type]
            if wrong:
                raise CorruptRun(f"{path.name}: wrong schema: {'; '.join(wrong)}")
            meta = json.loads((have.metadata or {}).get(METADATA_KEY) or b"{}")
            _check_config(meta if isinstance(meta, dict) else {}, want, path.name)
            return f.read(columns=schema.names).select(schema.names)
    except READ_ERRORS as e:
        raise CorruptRun(f"{path.name}: {_brief(e)}") from e


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
        _check_config(summary, want, "summary.json")
        figures = _summary_figures(summary)
        if not (run_dir / "metrics.parquet").exists():
            raise CorruptRun(f"metrics.parquet: missing, though summary.json says the run {status}")
        metrics = _read_table(run_dir / "metrics.parquet", METRIC_SCHEMA, want)
        quant = (_read_table(run_dir / "quant.parquet", QUANT_SCHEMA, want)
                 if (run_dir / "quant.parquet").exists() else None)
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
    from ofe.aggregate.checkpoints import aggregate_checkpoints  # it builds on this module's readers

    return {**frames, **aggregate_checkpoints(plan, results_dir, out_dir, meta)}
