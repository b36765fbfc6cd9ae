"""Reading a finished folder's files, checked, for both aggregations (training runs, `ofe.aggregate.runs`, and
checkpoint studies, `ofe.aggregate.checkpoints`): a folder's status from its summary and error files, its
Parquet tables with their schema and config checked. What cannot be trusted raises `CorruptRun`, whose
message is the reason the runs table shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ofe.config import config_hash
from ofe.io import METADATA_KEY
from ofe.runfolder import ERROR, METRICS, QUANT, SUMMARY

FINISHED = ("completed", "diverged")  # the statuses training writes into summary.json
# What reading a damaged file raises (pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors);
# anything else is a bug here and should fail loudly, not be blamed on a run folder.
READ_ERRORS = (OSError, ValueError, TypeError, KeyError, pa.ArrowException)


class CorruptRun(Exception):
    """A run folder whose files cannot be trusted; the message (file: what is wrong) is the reason shown."""


def brief(e: BaseException) -> str:
    """One line of an exception: the runs table shows one line per run."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def read_summary(path: Path) -> dict[str, Any]:
    """A finished run's summary.json, or CorruptRun saying why it is not one."""
    try:
        # json.loads takes NaN and Infinity: summaries written before they were strict JSON carry them
        summary = json.loads(path.read_text())
    except READ_ERRORS as e:
        raise CorruptRun(f"{SUMMARY}: {brief(e)}") from e
    if not isinstance(summary, dict):
        raise CorruptRun(f"{SUMMARY}: not a JSON object but {type(summary).__name__}")
    if "status" not in summary:
        raise CorruptRun(f"{SUMMARY}: no status")
    if summary["status"] not in FINISHED:
        raise CorruptRun(f"{SUMMARY}: status {summary['status']!r} is not one of {list(FINISHED)}")
    return summary


def run_status(run_dir: Path) -> tuple[str, dict[str, Any], str | None]:
    """(status, summary, last error line or corrupt reason) of one run folder."""
    summary_path, error_path = run_dir / SUMMARY, run_dir / ERROR
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
            lines = [f"{ERROR}: {brief(e)}"]
        return "failed", {}, lines[-1] if lines else "unknown error"
    # Training writes metrics.parquet, then summary.json; quantisation runs after both. Outputs without
    # the summary were stopped between those writes or damaged: not known to be final. A run in
    # progress has only the launcher's files, checkpoints and logs, and stays `missing`.
    outputs = [name for name in (METRICS, QUANT) if (run_dir / name).exists()]
    if outputs:
        return "corrupt", {}, (f"corrupt: {SUMMARY}: missing, though {' and '.join(outputs)} "
                               f"exist{'s' if len(outputs) == 1 else ''}")
    return "missing", {}, None


def check_config(record: dict[str, Any], want: str | None, where: str) -> None:
    """CorruptRun if a file records another config than the planned one (hash `want`): its numbers must
    never be shown under this run's labels. Nothing to compare where either side records none."""
    config = record.get("config")
    if config is not None and not isinstance(config, dict):
        raise CorruptRun(f"{where}: its config is not a mapping but {type(config).__name__}")
    # the hash is computed afresh, not read from the file, so both sides use today's definition
    have = config_hash(config) if config is not None else record.get("config_hash")
    if want is not None and have is not None and have != want:
        raise CorruptRun(f"{where}: results belong to another config (hash {have}, planned {want}); rerun it")


def read_table(path: Path, schema: pa.Schema, want: str | None) -> pa.Table:
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
            check_config(meta if isinstance(meta, dict) else {}, want, path.name)
            return f.read(columns=schema.names).select(schema.names)
    except READ_ERRORS as e:
        raise CorruptRun(f"{path.name}: {brief(e)}") from e
