"""The files through which the waiting rules and the workflow's dispatcher talk (RESULTS/.ofe-status).

On SLURM a waiting train rule does not submit or poll itself (`ofe.cluster.dispatch`): it leaves a
*request* for its run, the dispatcher takes the run's *hold* lock while the run is in its hands, and
writes the run's *ended* record when the job has ended, then lets the lock go. The rule waits by
blocking on that lock in a `flock` process (about 2 MB), not in Python (about 28 MB), so hundreds of
runs in flight cost the head little. A dispatcher that dies releases every lock, which wakes the
waiters; each then finds no ended record and hands its run over again (re-attaching to its job).

    requests/<key>.json   what to submit, or which recorded job to watch (written by the waiter)
    hold/<token>.lock     held (exclusively) by the dispatcher while the request `token` is in hand
    ended/<key>.json      how the job ended (written by the dispatcher, read once by the waiter)
    dispatch.lock         held by the live dispatcher for its whole life (flock: freed when it dies)
    dispatch.log          the dispatcher's own log
    dispatch.json         what it has in hand, at its last poll (`ofe status` shows it)

A run's key is derived from its folder; a request's token is new for every hand-over, so the waiter of
a new hand-over never waits on the lock its previous `flock` process still holds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from ofe.io import atomic_write_json
# the packed member's result, read by the dispatcher; a record written atomically, or None (absent, unreadable)
from ofe.runfolder import MEMBER_RESULT, read_json  # noqa: F401

REQUESTS, HOLD, ENDED = "requests", "hold", "ended"
DISPATCH_LOCK, DISPATCH_LOG, DISPATCH_STATE = "dispatch.lock", "dispatch.log", "dispatch.json"


def run_key(out: Path | str) -> str:
    """The name under which a run folder's request and ended record are kept."""
    return hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:20]


def new_token() -> str:
    return uuid.uuid4().hex


def digest(payload: Any) -> str:
    """What a job was asked to do (its callable's arguments and resources): an ended record is only taken
    for the request it answers, never for an earlier one of another config or quant setting."""
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def request_path(status_dir: Path, key: str) -> Path:
    return status_dir / REQUESTS / f"{key}.json"


def ended_path(status_dir: Path, key: str) -> Path:
    return status_dir / ENDED / f"{key}.json"


def hold_path(status_dir: Path, token: str) -> Path:
    return status_dir / HOLD / f"{token}.lock"


def write_request(status_dir: Path, request: dict[str, Any]) -> None:
    path = request_path(status_dir, request["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    hold_path(status_dir, request["token"]).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**request, "time": time.time()})


def write_ended(status_dir: Path, key: str, record: dict[str, Any]) -> None:
    path = ended_path(status_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**record, "time": time.time()})


def held(path: Path) -> bool:
    """Whether another process holds an exclusive lock on `path` (a shared probe, let go at once)."""
    try:
        with path.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def dispatcher_alive(status_dir: Path) -> bool:
    return held(status_dir / DISPATCH_LOCK)


def dispatcher_line(status_dir: Path) -> str | None:
    """One line for `ofe status`: whether the workflow's dispatcher runs and what it has in hand."""
    if not (status_dir / DISPATCH_LOG).exists():
        return None  # this workflow never ran on SLURM
    log = status_dir / DISPATCH_LOG
    if not dispatcher_alive(status_dir):
        return f"dispatcher: not running (a waiting rule starts it; log: {log})"
    state = read_json(status_dir / DISPATCH_STATE) or {}
    if not state:
        return f"dispatcher: running; log: {log}"
    jobs = state.get("jobs", [])
    return (f"dispatcher: running (pid {state.get('pid')}): {state.get('waiting', 0)} run(s) in "
            f"{len(jobs)} SLURM job(s), {state.get('gathering', 0)} being gathered, as of "
            f"{time.time() - state.get('time', time.time()):.0f} s ago; log: {log}")


def slurm_free_env(env: dict[str, str]) -> dict[str, str]:
    """The environment without the variables SLURM sets inside a job. A dispatcher started by a head that
    itself runs as a SLURM job (`ofe head`) would otherwise hand its own job's SLURM_* and SBATCH_*
    settings (CPUs, memory, job id) to every job it submits (sbatch exports the environment)."""
    keep = {"SLURM_CONF"}
    return {k: v for k, v in env.items()
            if k in keep or not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}


def pid_record() -> dict[str, Any]:
    """The waiting process, so that the dispatcher never submits for a waiter that has died meanwhile."""
    from ofe.cluster.jobstate import process_start_time

    return {"pid": os.getpid(), "pid_start": process_start_time(os.getpid())}
