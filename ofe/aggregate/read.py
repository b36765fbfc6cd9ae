"""Reading a finished folder's files, checked, for both aggregations (training runs, `ofe.aggregate.runs`,
and checkpoint studies, `ofe.aggregate.checkpoints`): a folder's status (`ofe.runfolder.examine`) as the
tables show it, its Parquet tables with their schema and config checked. What cannot be trusted raises
`CorruptRun`, whose message is the reason the runs table shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ofe.io import METADATA_KEY
from ofe.runfolder import brief, config_mismatch, examine

# What reading a damaged file raises (pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors);
# anything else is a bug here and should fail loudly, not be blamed on a run folder.
READ_ERRORS = (OSError, ValueError, TypeError, KeyError, pa.ArrowException)


class CorruptRun(Exception):
    """A run folder whose files cannot be trusted; the message (file: what is wrong) is the reason shown."""


def run_status(run_dir: Path) -> tuple[str, dict[str, Any], str | None]:
    """(status, summary, last error line or corrupt reason) of one run folder (`ofe.runfolder.examine`),
    as the runs table shows them."""
    folder = examine(run_dir)
    if folder.state == "corrupt":
        return "corrupt", {}, f"corrupt: {folder.reason}"
    if folder.state == "failed":
        return "failed", {}, folder.error or "unknown error"
    return folder.state, folder.finished or {}, None


def check_config(record: dict[str, Any], want: str | None, where: str) -> None:
    """CorruptRun if a file records another config than the planned one (hash `want`): its numbers must
    never be shown under this run's labels (`ofe.runfolder.config_mismatch`)."""
    why = config_mismatch(record, want)
    if why is not None:
        raise CorruptRun(f"{where}: {why}")


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
