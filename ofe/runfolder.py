"""A run folder's file names, said once (RESULTS/runs/<run_id>/, and a checkpoint study's
RESULTS/checkpoints/<ckpt_id>/, which an inspection fills with the same tables).

Training writes its checkpoints, then metrics.parquet, then summary.json (last: it marks the run
finished); quantising a finished run writes quant.parquet (rows kept in quant.partial.json meanwhile);
the head that launches the job writes config.json, job.json and, when the job fails, error.txt, and
holds .launch.lock while it waits. Files of another config are moved aside into stale/.

The one reader of such a folder: its summary, whose config its files are of (`recorded_hash`, the run
identity the trainer compares; `config_mismatch`, the plan-level hash aggregation compares), its state
from the files alone (`examine`), and a finished run's final model. No torch at import: aggregation
and the report read this module.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ofe.config import config_hash
from ofe.io import atomic_write_json

if TYPE_CHECKING:
    import torch

CHECKPOINT, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"  # the resumable state, and the one before it
SHARDED, SHARDED_PREV = "checkpoint.dcp", "checkpoint.prev.dcp"  # the same, as an fsdp run's sharded folders
METRICS, SUMMARY = "metrics.parquet", "summary.json"  # what a run measured; its summary (written last)
QUANT, QUANT_PARTIAL = "quant.parquet", "quant.partial.json"  # int8 rows; those measured so far
INSPECT = "inspect.json"  # a finished inspection's summary (`ofe inspect`; written last)
CONFIG = "config.json"  # the run's config, as the job reads it
JOB, ERROR, LOCK = "job.json", "error.txt", ".launch.lock"  # the submitted job; its failure; the head's lock
MEMBER_RESULT = "job-result.json"  # how this run's part of a packed job ended (`ofe.cluster.pack`)
STALE = "stale"  # the folder files of another config are moved aside into
# the tracker runs this run is mirrored to (ofe.track: backend, project, run id, last step logged), and the
# workflow's tracking settings `ofe launch` writes beside config.json for the job to read (ofe.plan.tracking)
TRACKING, TRACKING_SETTINGS = "tracking.json", "tracking-settings.json"

FINISHED = ("completed", "diverged")  # the statuses training writes into summary.json
OUTPUTS = (SUMMARY, METRICS, QUANT, ERROR)  # the files whose presence a folder's state is read from


def brief(e: BaseException) -> str:
    """One line of an exception: a table of runs shows one line per run."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def read_summary(folder: Path) -> Any:
    """The folder's summary.json as parsed, whatever it holds; OSError or ValueError where it cannot be
    read. json.loads takes NaN and Infinity: summaries written before they were strict JSON carry them."""
    return json.loads((folder / SUMMARY).read_text())


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    """summary.json, written last of a run's files (atomically): its presence marks the run finished."""
    atomic_write_json(folder / SUMMARY, summary)


def read_json(path: Path) -> Any:
    """A JSON file as parsed, or None where it is absent or unreadable (a record that can be rebuilt)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_tracking(folder: Path) -> dict[str, Any]:
    """RUN/tracking.json: {"config_hash": the run identity, "runs": [one entry per tracker destination]}
    ({} when absent or unreadable: the tracker then starts a new run rather than fail the job)."""
    record = read_json(Path(folder) / TRACKING)
    return record if isinstance(record, dict) and isinstance(record.get("runs"), list) else {}


def write_tracking(folder: Path, record: dict[str, Any]) -> None:
    atomic_write_json(Path(folder) / TRACKING, record)


def read_tracking_settings(folder: Path) -> dict[str, Any]:
    """RUN/tracking-settings.json, the settings the run is tracked with ({"backend": "none"} when absent)."""
    settings = read_json(Path(folder) / TRACKING_SETTINGS)
    return settings if isinstance(settings, dict) and settings.get("backend") else {"backend": "none"}


# ---- whose results: the config-hash checks -------------------------------------------------------------

def recorded_hash(record: dict[str, Any]) -> str | None:
    """The run identity a summary or a Parquet file's metadata records (`ofe.config.run_identity`), or
    the hash of the config it records (outputs written before identities were recorded); None when it
    records neither. The trainer compares these: the same config on another device is another run."""
    if record.get("config_hash"):
        return record["config_hash"]
    return config_hash(record["config"]) if isinstance(record.get("config"), dict) else None


def finished_summary(folder: Path, want: str) -> dict[str, Any] | None:
    """The folder's summary if it exists and records run identity `want`: only then is that run finished."""
    try:
        summary = read_summary(folder)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and recorded_hash(summary) == want else None


def config_mismatch(record: dict[str, Any], want: str | None) -> str | None:
    """Why a file's `record` (a summary, a Parquet file's metadata) is not of the planned config (hash
    `want`), or None. The plan-level hash of the config it records is computed afresh, not read from the
    file, so both sides use today's definition and a device or dtype does not count; nothing to compare
    where either side records none."""
    config = record.get("config")
    if config is not None and not isinstance(config, dict):
        return f"its config is not a mapping but {type(config).__name__}"
    have = config_hash(config) if config is not None else record.get("config_hash")
    if want is not None and have is not None and have != want:
        return f"results belong to another config (hash {have}, planned {want}); rerun it"
    return None


# ---- a folder's state -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Folder:
    """What a run folder's files say, from the files alone (a live job is the caller's to ask).

    state: `completed` or `diverged` (a readable summary of a finished run), `failed` (error.txt, no
    summary), `corrupt` (a summary that is not a finished run's, or outputs without the summary written
    after them), `missing` (none of these: not started, or running). `reason`: why it is corrupt
    ("<file>: what is wrong"). `error`: error.txt's last non-blank line as written ("" when it has none,
    None when there is no error.txt). `summary`: summary.json as parsed, whatever it holds (None when
    absent or unreadable). `files`: which of OUTPUTS exist."""

    state: str
    reason: str | None = None
    error: str | None = None
    summary: Any = None
    files: frozenset[str] = frozenset()

    @property
    def finished(self) -> dict[str, Any] | None:
        """The summary of a finished run (state completed or diverged), else None."""
        return self.summary if self.state in FINISHED else None


def _error_line(path: Path) -> str:
    try:  # a log: bytes that are not UTF-8 still tell what went wrong
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError as e:
        return f"{ERROR}: {brief(e)}"
    return lines[-1] if lines else ""


def _summary_problem(summary: Any) -> str | None:
    if not isinstance(summary, dict):
        return f"{SUMMARY}: not a JSON object but {type(summary).__name__}"
    if "status" not in summary:
        return f"{SUMMARY}: no status"
    if summary["status"] not in FINISHED:
        return f"{SUMMARY}: status {summary['status']!r} is not one of {list(FINISHED)}"
    return None


def examine(folder: Path) -> Folder:
    """The state of one run folder (see `Folder`), read in the order the files are written."""
    files = frozenset(name for name in OUTPUTS if (folder / name).exists())
    error = _error_line(folder / ERROR) if ERROR in files else None
    if SUMMARY in files:
        try:
            summary = read_summary(folder)
        except (OSError, ValueError) as e:
            return Folder("corrupt", f"{SUMMARY}: {brief(e)}", error, files=files)
        problem = _summary_problem(summary)
        return Folder("corrupt" if problem else summary["status"], problem, error, summary, files)
    if error is not None:
        return Folder("failed", error=error, files=files)
    # Training writes metrics.parquet, then summary.json; quantisation runs after both. Outputs without
    # the summary were stopped between those writes or damaged: not known to be final. A run in
    # progress has only the launcher's files, checkpoints and logs, and stays `missing`.
    outputs = [name for name in (METRICS, QUANT) if name in files]
    if outputs:
        return Folder("corrupt", f"{SUMMARY}: missing, though {' and '.join(outputs)} "
                                 f"exist{'s' if len(outputs) == 1 else ''}", files=files)
    return Folder("missing", files=files)


# ---- a finished run's final model ---------------------------------------------------------------------

def final_checkpoint(folder: Path, sharded: bool) -> Path:
    """Where a finished run's final weights are: checkpoint.pt, or an fsdp run's sharded checkpoint.dcp."""
    return folder / (SHARDED if sharded else CHECKPOINT)


def load_final_model(folder: Path, model: torch.nn.Module, sharded: bool = False) -> None:
    """Load a finished run's final weights into `model` (an unsharded GPT, one process), from
    `checkpoint.pt` or, for an fsdp run, the whole model from the sharded `checkpoint.dcp` (DCP reads
    only the model's keys, skipping the optimiser's). torch is imported here: aggregation and the report
    read this module and must not import it."""
    import torch

    path = final_checkpoint(folder, sharded)
    if not sharded:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        return
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    # no_dist: this process alone, in a process group or not
    with warnings.catch_warnings():  # DCP warns that it loads in one process: what is meant here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    model.load_state_dict(state["model"])
