"""`python -m ofe dispatch`: the one process per workflow that submits SLURM jobs and watches them.

Every waiting train (or inspect) rule hands its run over through RESULTS/.ofe-status (`ofe.cluster.spool`)
and blocks on a lock; this process
- gathers the runs handed over together (until none has arrived for `gather_s`, at most MAX_GATHER_S),
- packs runs of a scale with `pack: N` into jobs of N (`ofe.cluster.pack`) and submits the jobs of one
  kind and resources as one SLURM job array when `array: true` (submitit's batch; at most
  `slurm.array_parallelism` tasks at once), else one sbatch per job,
- writes each run's RUN/job.json (its own array task, or its packed job and place in it), so a
  restarted head re-attaches to it and `ofe status` and `ofe cancel` find it,
- asks the scheduler once per poll for all its jobs (the shared `StatusCache`) and, when a run's job has
  ended (its result file, a packed member's own result, or a final state twice), writes the run's ended
  record and lets the run's lock go, which wakes its waiter.

Started by the first waiter that finds none alive (`ensure`), it exits once it has had nothing in hand for
IDLE_S. Only one runs per status folder (dispatch.lock); if it dies, every lock it held is freed by the
kernel, each waiter wakes, finds no ended record and hands its run over to a new one, re-attaching to
its recorded job.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ofe.cluster import spool
from ofe.cluster.jobstate import StatusCache, is_live, pid_alive
from ofe.io import atomic_write_json
from ofe.runfolder import JOB

MAX_GATHER_S = 120.0  # a steady trickle of runs is still submitted at least this often
IDLE_S = 60.0
TICK_S = 0.1  # how soon a handed-over run is taken: its waiter is a 20 MB Python process until then
SETTLE_POLLS = 2  # a requeue passes through states that look final for a moment


@dataclass
class Entry:
    """A run in the dispatcher's hands: its request, the lock its waiter blocks on, and its job."""

    request: dict[str, Any]
    lock: IO[str]
    job: dict[str, Any] | None = None
    settled: int = 0
    arrived: float = field(default_factory=time.time)

    @property
    def key(self) -> str:
        return self.request["key"]

    def release(self) -> None:
        self.lock.close()  # closing the file lets the flock go


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [ofe dispatch] {msg}", flush=True)


def ensure(status_dir: Path) -> None:
    """Start a dispatcher for `status_dir` unless one is alive (a second one started at the same moment
    finds the lock taken and exits at once)."""
    if spool.dispatcher_alive(status_dir):
        return
    status_dir.mkdir(parents=True, exist_ok=True)
    with (status_dir / spool.DISPATCH_LOG).open("ab") as out:
        # its own session: a Ctrl-C meant for the head's terminal does not stop it mid-submission
        subprocess.Popen([sys.executable, "-m", "ofe", "dispatch", "--status-dir", str(status_dir)],
                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                         close_fds=True)


def serve(status_dir: Path | str, idle_s: float = IDLE_S) -> int:
    """The dispatcher's loop; returns when it has been idle for `idle_s` (or another one is running)."""
    status_dir = Path(status_dir).resolve()
    status_dir.mkdir(parents=True, exist_ok=True)
    me = (status_dir / spool.DISPATCH_LOCK).open("a")
    deadline = time.time() + 3  # waiters probe the lock for an instant; ride over their probes
    while True:
        try:
            fcntl.flock(me, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() > deadline:
                return 0  # another dispatcher holds it
            time.sleep(0.05)
    env = spool.slurm_free_env(dict(os.environ))
    os.environ.clear()
    os.environ.update(env)
    log(f"started (pid {os.getpid()}) for {status_dir}")
    entries: dict[str, Entry] = {}
    cache: StatusCache | None = None
    busy, next_poll = time.time(), 0.0
    while True:
        _take(status_dir, entries)
        _submit_ready(status_dir, entries)
        now = time.time()
        submitted = [e for e in entries.values() if e.job is not None]
        if submitted and now >= next_poll:
            poll = min(float(e.request.get("poll_s", 15)) for e in submitted)
            if cache is None or cache.max_age_s != poll:
                cache = StatusCache(status_dir, max_age_s=poll)
            _check(status_dir, entries, cache)
            next_poll = now + poll
            _write_state(status_dir, entries)
        if entries or any((status_dir / spool.REQUESTS).glob("*.json")):
            busy = now
        elif now - busy > idle_s:
            log("nothing in hand: exiting")
            return 0
        time.sleep(TICK_S)


def _write_state(status_dir: Path, entries: dict[str, Entry]) -> None:
    """What `ofe status` shows of the dispatcher: runs gathered, runs submitted and their jobs."""
    jobs = sorted({str(e.job["job_id"]) for e in entries.values() if e.job is not None})
    atomic_write_json(status_dir / spool.DISPATCH_STATE, {
        "pid": os.getpid(), "time": time.time(), "gathering": sum(e.job is None for e in entries.values()),
        "waiting": sum(e.job is not None for e in entries.values()), "jobs": jobs})


def _take(status_dir: Path, entries: dict[str, Entry]) -> None:
    """Take in hand every new request whose waiter is alive: lock its hold file (the waiter blocks on it)."""
    for path in sorted((status_dir / spool.REQUESTS).glob("*.json")):
        req = spool.read_json(path)
        if req is None:
            continue
        old = entries.get(req["key"])
        if old is not None and old.request["token"] == req["token"]:
            continue
        if not pid_alive(int(req["pid"]), req.get("pid_start")):
            log(f"dropping the request for {req['out']}: its waiter (pid {req['pid']}) is gone")
            path.unlink(missing_ok=True)
            continue
        lock = spool.hold_path(status_dir, req["token"]).open("a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        if old is not None:  # its waiter handed it over again (it found this dispatcher's answer missing)
            old.release()
        entry = Entry(req, lock)
        if req["action"] == "watch":
            entry.job = req["job"]
            log(f"watching job {entry.job['job_id']} for {req['out']}")
        entries[req["key"]] = entry
        path.unlink(missing_ok=True)


def _submit_ready(status_dir: Path, entries: dict[str, Entry]) -> None:
    pending = [e for e in entries.values() if e.job is None]
    if not pending:
        return
    now = time.time()
    gather = max(float(e.request.get("gather_s", 10)) for e in pending)
    if now - max(e.arrived for e in pending) < gather and now - min(e.arrived for e in pending) < MAX_GATHER_S:
        return
    groups: dict[str, list[Entry]] = {}
    for e in pending:
        r = e.request
        if not pid_alive(int(r["pid"]), r.get("pid_start")):  # its rule was stopped while it was gathered
            log(f"not submitting {r['out']}: its waiter (pid {r['pid']}) is gone")
            e.release()
            entries.pop(e.key, None)
            continue
        shape = {k: v for k, v in r["params"].items() if k != "name"}
        key = [r["kind"], shape, r["pack"], r["array"], r.get("cwd")]
        groups.setdefault(json.dumps(key, sort_keys=True), []).append(e)
    for group in groups.values():
        try:
            _submit_group(status_dir, group)
        except Exception as e:  # sbatch refused (a bad partition, a limit): every run of the group fails
            text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            log(f"submission of {len(group)} run(s) failed: {text}")
            for entry in group:
                _end(status_dir, entries, entry, {"outcome": "submit_error", "error": text})


def _units(group: list[Entry]) -> list[list[Entry]]:
    pack = int(group[0].request["pack"])
    return [group[i:i + pack] for i in range(0, len(group), pack)]


def _submit_group(status_dir: Path, group: list[Entry]) -> None:
    import submitit

    from ofe.cluster.jobs import InspectJob, TrainJob
    from ofe.cluster.pack import PackJob, member_log

    first = group[0].request
    if first.get("cwd"):  # a job starts where it was submitted from: the workflow's folder, as its paths are
        os.chdir(first["cwd"])
    pack, units = int(first["pack"]), _units(group)
    params = dict(first["params"])
    if pack > 1:  # the scale's resources are per run: the job holds the pack's
        params["cpus_per_task"] = int(params.get("cpus_per_task", 1)) * pack
        if "mem_gb" in params:
            params["mem_gb"] = float(params["mem_gb"]) * pack
    many = first["array"] and len(units) > 1
    if pack > 1 or many:
        params["name"] = f"{first['prefix']}{first['scale'] or first['kind']}-" + (
            f"pack{pack}" if pack > 1 else "") + (f"x{len(units)}" if many else "")
    folder = status_dir / "submitit" / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**params)

    def call(unit: list[Entry]) -> tuple[Any, tuple]:
        r = unit[0].request
        if pack > 1:
            return PackJob(), ([{"out": e.request["out"], "config": e.request["args"][0],
                                 "quant": e.request["args"][2]} for e in unit],)
        return (TrainJob() if r["kind"] == "train" else InspectJob()), tuple(r["args"])

    calls = [call(unit) for unit in units]
    if many:
        with executor.batch():
            jobs = [executor.submit(fn, *args) for fn, args in calls]
    else:
        jobs = []
        for unit, (fn, args) in zip(units, calls):
            if pack == 1:
                executor.update_parameters(name=unit[0].request["params"]["name"])
            jobs.append(executor.submit(fn, *args))
    submitted = time.time()
    for unit, job in zip(units, jobs):
        for index, entry in enumerate(unit):
            record = {"job_id": str(job.job_id), "cluster": "slurm", "folder": str(folder), "submitted": submitted,
                      "stdout": str(member_log(folder, job.job_id, index) if pack > 1 else job.paths.stdout),
                      "token": entry.request["token"], "digest": entry.request["digest"]}
            if pack > 1:
                record["pack"] = {"size": len(unit), "index": index}
            atomic_write_json(Path(entry.request["out"]) / JOB, record)
            entry.job = record
    log(f"submitted {len(group)} run(s) as {len(jobs)} job(s)" + (" in one array" if many else "")
        + (f" of {pack} runs each" if pack > 1 else "") + f": {', '.join(sorted({str(j.job_id) for j in jobs}))}")


def _check(status_dir: Path, entries: dict[str, Entry], cache: StatusCache) -> None:
    """One poll: the runs whose jobs have ended get their ended record and their lock back."""
    from ofe.cluster.pack import member_result

    watched = {str(e.job["job_id"]) for e in entries.values() if e.job is not None}
    for job_id in watched:
        cache.register(job_id)
    for entry in [e for e in entries.values() if e.job is not None]:
        job = entry.job
        job_id = str(job["job_id"])
        if job.get("pack"):
            mine = member_result(entry.request["out"])
            if mine is not None and mine.get("job_id") == job_id:
                _end(status_dir, entries, entry, {"outcome": "member"})
                continue
        elif (Path(job["folder"]) / f"{job_id}_0_result.pkl").exists():
            _end(status_dir, entries, entry, {"outcome": "result"})
            continue
        state = cache.state(job_id)
        entry.settled = 0 if is_live(state) else entry.settled + 1
        if entry.settled >= SETTLE_POLLS:
            _end(status_dir, entries, entry, {"outcome": "state", "state": state})
    for job_id in watched - {str(e.job["job_id"]) for e in entries.values() if e.job is not None}:
        cache.unregister(job_id)


def _end(status_dir: Path, entries: dict[str, Entry], entry: Entry, record: dict[str, Any]) -> None:
    r = entry.request
    spool.write_ended(status_dir, r["key"], {**record, "token": r["token"], "digest": r["digest"],
                                             "job": entry.job})
    entry.release()
    entries.pop(r["key"], None)
    log(f"{r['out']}: {record['outcome']}" + (f" ({record['state']})" if "state" in record else "")
        + (f" of job {entry.job['job_id']}" if entry.job else ""))
