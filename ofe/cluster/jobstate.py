"""One scheduler query per poll interval for the whole workflow, shared by every process that asks.

The workflow's dispatcher (`ofe.cluster.dispatch`) watches every SLURM job of the sweep; the rules of a
restarted head deciding whether to re-attach, `ofe status` and `ofe cancel` ask too. Asking
`squeue`/`sacct` per job makes N scheduler calls per poll with N jobs in flight, the RPC flood cluster
admins complain about. Instead the jobs to follow are registered in a shared folder
(RESULTS/.ofe-status/waiting/) and their states are read from one cache file there; whichever process
finds the cache older than the poll interval refreshes it, under a file lock, with one `squeue` for all
of the user's jobs (array tasks one per line) and one `sacct` for the registered ones that have left the
queue. A failed query keeps the last known states, backs off, and is never read as "job gone": waiting
goes on until the scheduler answers again. The cache also keeps the whole queue listing, which
re-attaching rules and `ofe cancel` read.
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

from ofe.io import atomic_write_json
from ofe.runfolder import MEMBER_RESULT

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


def queue_listing() -> dict[str, str]:
    """Every job of the user in the controller's queue ({job id: state}), in one squeue call; raises
    RuntimeError if it fails."""
    # -a: also jobs in hidden partitions or ones the user's groups cannot use; a job missing from the
    # listing is taken as gone, so the listing must hold every job of the user
    # -r: one line per array task ("123_4"), pending ones included, not one "123_[4-7]" line
    ok, text = _run(["squeue", "-h", "-a", "-r", "-u", getpass.getuser(), "-o", "%i|%T"])
    if not ok:
        raise RuntimeError(text)
    listing = {}
    for line in text.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id and state:
            listing[job_id] = state
    return listing


def query(job_ids: list[str], listing: dict[str, str] | None = None) -> dict[str, str]:
    """States of `job_ids` in at most two scheduler calls (one when the queue `listing` is given);
    raises RuntimeError if a call fails."""
    listing = queue_listing() if listing is None else listing
    wanted = set(job_ids)
    states = {j: s for j, s in listing.items() if j in wanted}
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
        # the folder is made on first use: a head that only checks a local job leaves nothing behind
        self.folder, self.max_age_s = Path(folder), max_age_s

    def read(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / CACHE).read_text())
        except (OSError, ValueError):
            return {"time": 0.0, "states": {}, "failures": 0, "next_try": 0.0}

    def register(self, job_id: str) -> None:
        """Include `job_id` in every query until `unregister`ed (the dispatcher's jobs)."""
        (self.folder / WAITING).mkdir(parents=True, exist_ok=True)
        (self.folder / WAITING / str(job_id)).touch()

    def unregister(self, job_id: str) -> None:
        (self.folder / WAITING / str(job_id)).unlink(missing_ok=True)

    def state(self, job_id: str) -> str:
        """The job's last known state ('UNKNOWN' before the scheduler has said anything of it)."""
        data = self.read()
        if not self._stale(data):
            return data["states"].get(job_id, "UNKNOWN")
        with self._locked():
            data = self.read()
            if self._stale(data):
                data = self._refresh(data, job_id)
        return data["states"].get(job_id, "UNKNOWN")

    def queue(self, since: float) -> dict[str, str] | None:
        """The user's whole queue as one squeue listed it at or after `since` and less than max_age_s
        ago, taken now (one query shared by every caller, under the lock) when the cached one is not;
        None while the scheduler fails and the shared back-off lasts. With `since` the job's submission
        time, a job absent from the listing has left the queue: it is no longer pending or running."""
        data = self.read()
        if self._listed(data, since):
            return data["queue"]
        with self._locked():
            data = self.read()
            if self._listed(data, since):
                return data["queue"]
            if time.time() < data.get("next_try", 0.0):
                return None
            data = self._refresh(data, None)
        return data["queue"] if data["failures"] == 0 else None

    def _listed(self, data: dict[str, Any], since: float) -> bool:
        return "queue" in data and data["time"] >= since and time.time() - data["time"] < self.max_age_s

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / LOCK).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one refresher; the others read what it wrote
            yield

    def _stale(self, data: dict[str, Any]) -> bool:
        # A job registered since the last query waits for the next one (as UNKNOWN, so live): asking
        # at once for each newcomer would make one query per job again when many start together.
        now = time.time()
        return now >= data.get("next_try", 0.0) and now - data["time"] >= self.max_age_s

    def _refresh(self, data: dict[str, Any], job_id: str | None) -> dict[str, Any]:
        waiting = self.folder / WAITING
        ids = {p.name for p in waiting.iterdir()} if waiting.is_dir() else set()
        ids = sorted(ids | ({str(job_id)} if job_id is not None else set()))
        now = time.time()  # before squeue runs: the listing is at least this recent
        try:
            listing = queue_listing()
            states = query(ids, listing)
        except RuntimeError as e:
            failures = data.get("failures", 0) + 1
            delay = min(self.max_age_s * 2 ** failures, MAX_BACKOFF_S)
            print(f"[ofe] SLURM status query failed ({e}); keeping the last known states, next try in "
                  f"{delay:.0f} s", flush=True)
            data = {**data, "failures": failures, "next_try": now + delay, "tried": now, "error": str(e)}
        else:
            # `queue` is the whole listing: a re-attaching head reads any job's state from it
            data = {"time": now, "states": {**data["states"], **states}, "queue": listing, "failures": 0,
                    "next_try": 0.0, "tried": now, "error": None}
        atomic_write_json(self.folder / CACHE, data)
        return data


def is_live(state: str) -> bool:
    """UNKNOWN counts as live: a job the scheduler has not (yet) answered for is never taken as gone."""
    return state in LIVE_STATES or state == "UNKNOWN"


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


def live_job(record: Path, cache: StatusCache, tries: int = 6) -> dict[str, Any] | None:
    """The job recorded in `record` (RUN/job.json) if it is still pending or running, else None.

    A SLURM job's state comes from the shared `cache`'s queue listing, so the N rules of a restarted
    head share one squeue instead of asking one each. A failing scheduler is waited out with the
    cache's back-off and, after `tries` failed queries, raises SchedulerUnavailable: reading a failed
    query as "job gone" would submit a duplicate."""
    if not record.exists():
        return None
    info = json.loads(record.read_text())
    if (Path(info["folder"]) / f"{info['job_id']}_0_result.pkl").exists():
        return None  # the job has returned (or failed): a job still COMPLETING in squeue is not live
    if info.get("pack") and _member_ended(record.parent, str(info["job_id"])):
        return None  # this run's part of a packed job is over, though its neighbours may still run
    if info["cluster"] == "slurm":
        # a listing older than the submission could miss the job (older records lack the time)
        since = float(info.get("submitted") or record.stat().st_mtime)
        return info if _slurm_state(cache, str(info["job_id"]), since, tries) in LIVE_STATES else None
    if not info.get("pid"):
        return None
    # a record without a start time (older ofe) can only be checked by pid
    return info if pid_alive(int(info["pid"]), info.get("pid_start")) else None


def _member_ended(folder: Path, job_id: str) -> bool:
    try:
        result = json.loads((folder / MEMBER_RESULT).read_text())
    except (OSError, ValueError):
        return False
    return result.get("job_id") == job_id


def _slurm_state(cache: StatusCache, job_id: str, since: float, tries: int) -> str:
    """The job's state in a queue listing taken after `since` ('GONE' when it has left the queue)."""
    start = time.time()
    # a record written on a host whose clock runs ahead must not make every listing look too old
    since = min(since, start)
    while True:
        listing = cache.queue(since)
        if listing is not None:
            return listing.get(job_id, "GONE")
        data = cache.read()
        # failures counted before this call began (another head's) do not end it without a try of its own
        if data.get("failures", 0) >= tries and data.get("tried", 0.0) >= start:
            raise SchedulerUnavailable(f"cannot tell the state of SLURM job {job_id} after {data['failures']} "
                                       f"failed queries ({data.get('error')}); not resubmitting. Check the "
                                       f"scheduler, then rerun.")
        time.sleep(max(data.get("next_try", 0.0) - time.time(), 0.1))
