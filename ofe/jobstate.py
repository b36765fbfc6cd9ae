"""One scheduler query per poll interval for the whole workflow, shared by every waiting rule.

Each train rule waits in its own process on its own SLURM job (which trains the run, then quantises
it). Asking `squeue`/`sacct` from each of them makes N scheduler calls per poll with N jobs in flight,
the RPC flood cluster admins complain about. Instead every waiter registers its job id in a shared
folder (RESULTS/.ofe-status/) and reads the states from one cache file there; whichever waiter finds
the cache older than the poll interval refreshes it, under a file lock, with one `squeue` for all of
the user's jobs and one `sacct` for the registered ones that have left the queue. A failed query keeps
the last known states, backs off, and is never read as "job gone": waiting goes on until the scheduler
answers again.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

from ofe.results import atomic_write_json

# States in which a job may still produce a result. PREEMPTED is followed by a requeue.
LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
               "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED"}
CACHE, LOCK, WAITING = "slurm-status.json", "slurm-status.lock", "waiting"
MAX_BACKOFF_S = 300.0


def _run(cmd: list[str]) -> tuple[bool, str]:
    """(succeeded, stdout or the error text)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{cmd[0]}: {e}"
    if out.returncode:
        return False, f"{cmd[0]}: exit {out.returncode}: {out.stderr.strip()[-300:]}"
    return True, out.stdout


def query(job_ids: list[str]) -> dict[str, str]:
    """States of `job_ids` in at most two scheduler calls; raises RuntimeError if a call fails."""
    ok, text = _run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T"])
    if not ok:
        raise RuntimeError(text)
    wanted, states = set(job_ids), {}
    for line in text.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id in wanted:
            states[job_id] = state
    gone = sorted(wanted - set(states))
    if gone:  # left the queue: accounting knows how they ended
        ok, text = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(gone)])
        if not ok:
            raise RuntimeError(text)
        for line in text.splitlines():
            job_id, _, state = line.strip().partition("|")
            if job_id in wanted and state:
                states[job_id] = state.split()[0]  # "CANCELLED by 123" -> CANCELLED
    return states


class StatusCache:
    """The shared cache of job states in `folder` (RESULTS/.ofe-status)."""

    def __init__(self, folder: Path | str, max_age_s: float) -> None:
        self.folder, self.max_age_s = Path(folder), max_age_s
        (self.folder / WAITING).mkdir(parents=True, exist_ok=True)

    def read(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / CACHE).read_text())
        except (OSError, ValueError):
            return {"time": 0.0, "states": {}, "failures": 0, "next_try": 0.0}

    @contextlib.contextmanager
    def waiting(self, job_id: str) -> Iterator[None]:
        """Register `job_id` for the shared query while the caller waits on it."""
        mark = self.folder / WAITING / str(job_id)
        mark.touch()
        try:
            yield
        finally:
            mark.unlink(missing_ok=True)

    def state(self, job_id: str) -> str:
        """The job's last known state ('UNKNOWN' before the scheduler has said anything of it)."""
        data = self.read()
        if not self._stale(data):
            return data["states"].get(job_id, "UNKNOWN")
        with (self.folder / LOCK).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one refresher; the others read what it wrote
            data = self.read()
            if self._stale(data):
                data = self._refresh(data, job_id)
        return data["states"].get(job_id, "UNKNOWN")

    def _stale(self, data: dict[str, Any]) -> bool:
        # A job registered since the last query waits for the next one (as UNKNOWN, so live): asking
        # at once for each newcomer would make one query per job again when many start together.
        now = time.time()
        return now >= data.get("next_try", 0.0) and now - data["time"] >= self.max_age_s

    def _refresh(self, data: dict[str, Any], job_id: str) -> dict[str, Any]:
        ids = sorted({p.name for p in (self.folder / WAITING).iterdir()} | {str(job_id)})
        now = time.time()
        try:
            states = query(ids)
        except RuntimeError as e:
            failures = data.get("failures", 0) + 1
            delay = min(self.max_age_s * 2 ** failures, MAX_BACKOFF_S)
            print(f"[ofe] SLURM status query failed ({e}); keeping the last known states, next try in "
                  f"{delay:.0f} s", flush=True)
            data = {**data, "failures": failures, "next_try": now + delay, "error": str(e)}
        else:
            data = {"time": now, "states": {**data["states"], **states}, "failures": 0, "next_try": 0.0,
                    "error": None}
        atomic_write_json(self.folder / CACHE, data)
        return data


def is_live(state: str) -> bool:
    """UNKNOWN counts as live: a job the scheduler has not (yet) answered for is never taken as gone."""
    return state in LIVE_STATES or state == "UNKNOWN"


def wait_for(cache: StatusCache, job_id: str, result_path: Path, poll_s: float,
             on_poll: Any = None, settle_polls: int = 2) -> str:
    """Wait until the job's result file exists or the scheduler reports it ended (the same terminal
    state on `settle_polls` polls: a requeue passes through states that look final for a moment).
    `on_poll()` runs every poll (log streaming). Returns the last state seen."""
    seen, state = 0, "UNKNOWN"
    with cache.waiting(job_id):
        while True:
            if on_poll is not None:
                on_poll()
            if result_path.exists():
                return state
            state = cache.state(job_id)
            seen = 0 if is_live(state) else seen + 1
            if seen >= settle_polls:
                return state
            time.sleep(poll_s)


def slurm_state(job_id: str, tries: int = 6, backoff_s: float = 2.0) -> str:
    """One job's state, asked directly (to decide whether to re-attach): the controller's queue first
    (sacct lags a just-submitted job by seconds), then accounting. 'UNKNOWN' only when both answered
    and neither knows the job. A failing command is retried with exponential back-off, then
    SchedulerUnavailable: reading a failed query as "job gone" would submit a duplicate."""
    delay, error = backoff_s, ""
    for attempt in range(tries):
        ok, text = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
        # squeue exits 1 with "Invalid job id" once the controller has purged a finished job
        if ok and text.split():
            return text.split()[0]
        if ok or "invalid job id" in text.lower():
            ok, text = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"])
            if ok:
                return text.split()[0] if text.split() else "UNKNOWN"
        error = text
        if attempt < tries - 1:
            print(f"[ofe] querying SLURM for job {job_id} failed ({error}); retrying in {delay:.0f} s",
                  flush=True)
            time.sleep(delay)
            delay *= 2
    raise SchedulerUnavailable(f"cannot tell the state of SLURM job {job_id} after {tries} tries "
                               f"({error}); not resubmitting. Check the scheduler, then rerun.")


class SchedulerUnavailable(RuntimeError):
    """squeue/sacct kept failing: the job's state is unknown, which is never the same as "gone"."""


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid it
    identifies a process, since pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name, which may hold spaces


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether the process is running and, when its start time was recorded, is the same process."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is not alive
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except OSError:
        return True
    return start_time is None or process_start_time(pid) == start_time


def live_job(record: Path) -> dict[str, Any] | None:
    """The job recorded in `record` (RUN/job.json) if it is still pending or running, else None."""
    if not record.exists():
        return None
    info = json.loads(record.read_text())
    if (Path(info["folder"]) / f"{info['job_id']}_0_result.pkl").exists():
        return None  # the job has returned (or failed): a job still COMPLETING in squeue is not live
    if info["cluster"] == "slurm":
        return info if slurm_state(info["job_id"]) in LIVE_STATES else None
    if not info.get("pid"):
        return None
    # a record without a start time (older ofe) can only be checked by pid
    return info if pid_alive(int(info["pid"]), info.get("pid_start")) else None
