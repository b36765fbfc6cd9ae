"""Submit one training run through submitit and wait for it (the body of the workflow's train rule).

The job is a submitit `Checkpointable`: on preemption or time-out submitit requeues the same call,
and `ofe.train.train` resumes from the run's own checkpoint, so a requeued job is idempotent.
The executor comes from the `launcher` settings: `local` (a subprocess; also what the tests use, since
submitit's `debug` executor opens a debugger when the job raises) or `slurm`.

Re-attach: the submitted job is recorded in RUN/job.json. If the Snakemake head is killed and started
again while that job is still pending or running, `launch` waits on it instead of submitting a
duplicate. Every submission gets its own submitit folder, so a job id reused after Slurm's state was
wiped can never pick up an old result.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import submitit

from ofe.config import RunConfig
from ofe.results import atomic_write_json, atomic_write_text

ERROR, JOB, LOCK = "error.txt", "job.json", ".launch.lock"
LIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                     "COMPLETING", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
# Cluster-specific settings a site sets in the environment rather than in any file of this repo.
SLURM_ENV = {"partition": "OFE_SLURM_PARTITION", "account": "OFE_SLURM_ACCOUNT",
             "qos": "OFE_SLURM_QOS", "constraint": "OFE_SLURM_CONSTRAINT"}
GENERIC = ("timeout_min", "mem_gb", "cpus_per_task", "gpus_per_node", "tasks_per_node", "nodes")


class TrainJob(submitit.helpers.Checkpointable):
    """Callable submitted to the cluster; its default `checkpoint` resubmits the same arguments."""

    def __call__(self, config_path: str, out_dir: str) -> dict[str, Any]:
        from ofe.train import load_run_config, train

        if submitit.JobEnvironment().num_tasks > 1:  # data parallel: RANK, WORLD_SIZE, MASTER_* for DDP
            submitit.helpers.TorchDistributedEnvironment().export()
        return train(load_run_config(config_path), out_dir)


def executor_parameters(launcher: dict[str, Any], scale: str, name: str) -> dict[str, Any]:
    """submitit parameters for one run: launcher defaults, then the run's scale's resources, then
    partition/account/QoS/constraint from the launcher or the OFE_SLURM_* environment variables."""
    cluster = launcher.get("cluster", "local")
    merged = {"timeout_min": 120, **{k: launcher[k] for k in GENERIC if k in launcher},
              **launcher.get("scales", {}).get(scale, {})}
    params: dict[str, Any] = {k: v for k, v in merged.items() if k in GENERIC}
    params["name"] = name
    if cluster == "slurm":
        slurm = dict(launcher.get("slurm") or {})
        for key, env in SLURM_ENV.items():
            if os.environ.get(env):
                slurm[key] = os.environ[env]
        params.update({f"slurm_{k}": v for k, v in slurm.items() if v not in (None, "")})
    else:  # the local executor knows no memory or CPU reservations
        params = {k: v for k, v in params.items() if k in ("timeout_min", "name", "tasks_per_node")}
    return params


def _echo_new(path: Path, offset: int) -> int:
    """Print what the job appended to its log since `offset` (progress in the rule's log)."""
    if not path.exists():
        return offset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    if chunk:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(chunk)


class SchedulerUnavailable(RuntimeError):
    """squeue/sacct kept failing: the job's state is unknown, which is never the same as "gone"."""


def _query(cmd: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _slurm_state(job_id: str, tries: int = 6, backoff_s: float = 2.0) -> str:
    """The job's state: the controller's queue first (sacct lags a just-submitted job by seconds),
    then accounting for jobs that have left the queue. 'UNKNOWN' only when both answered and neither
    knows the job. A failing command is retried with exponential back-off, then SchedulerUnavailable:
    reading a failed query as "job gone" would submit a duplicate of a job that is still running."""
    delay, last_error = backoff_s, ""
    for attempt in range(tries):
        squeue = _query(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
        # squeue exits 1 with "Invalid job id" once the controller has purged a finished job
        purged = squeue is not None and "invalid job id" in squeue.stderr.lower()
        if squeue is not None and (squeue.returncode == 0 or purged):
            if squeue.returncode == 0 and squeue.stdout.split():
                return squeue.stdout.split()[0]
            sacct = _query(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"])
            if sacct is not None and sacct.returncode == 0:
                states = sacct.stdout.split()
                return states[0] if states else "UNKNOWN"
            last_error = "sacct: " + (sacct.stderr.strip() if sacct is not None else "did not run")
        else:
            last_error = "squeue: " + (squeue.stderr.strip() if squeue is not None else "did not run")
        if attempt < tries - 1:
            print(f"[ofe] querying SLURM for job {job_id} failed ({last_error}); retrying in {delay:.0f} s",
                  flush=True)
            time.sleep(delay)
            delay *= 2
    raise SchedulerUnavailable(f"cannot tell the state of SLURM job {job_id} after {tries} tries "
                               f"({last_error}); not resubmitting. Check the scheduler, then rerun.")


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid it
    identifies a process, since pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the command name, which may hold spaces


def _pid_alive(pid: int, start_time: int | None = None) -> bool:
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


def live_job(out: Path) -> dict[str, Any] | None:
    """The recorded job of a run folder if it is still pending or running, else None."""
    path = out / JOB
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    if (Path(info["folder"]) / f"{info['job_id']}_0_result.pkl").exists():
        return None  # the job has returned (or failed): a job still COMPLETING in squeue is not live
    if info["cluster"] == "slurm":
        return info if _slurm_state(info["job_id"]) in LIVE_SLURM_STATES else None
    if not info.get("pid"):
        return None
    # a record without a start time (older ofe) can only be checked by pid
    return info if _pid_alive(int(info["pid"]), info.get("pid_start")) else None


def _wait_local_pid(info: dict[str, Any], out: Path, poll: float) -> dict[str, Any]:
    """Wait for a local job started by an earlier (killed) head process, then read its summary."""
    log, offset = Path(info["stdout"]), 0
    while _pid_alive(int(info["pid"]), info.get("pid_start")):
        offset = _echo_new(log, offset)
        time.sleep(poll)
    _echo_new(log, offset)
    summary = out / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    raise RuntimeError(f"local job {info['job_id']} for {out} ended without a summary; see {log}")


def _fail(out: Path, job_id: str, e: BaseException) -> RuntimeError:
    atomic_write_text(out / ERROR, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    return RuntimeError(f"training job {job_id} for {out} failed:\n{e}")


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold RUN/.launch.lock while a head submits and waits, so two heads (two Snakemake invocations
    with --nolock, or from two working copies) never train one run. flock is released by the kernel
    when the holder dies, so a killed head leaves no stale lock."""
    path = out / LOCK
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RuntimeError(f"{out} is being launched by another ofe process ({holder}); "
                               f"wait for it, or stop it, then rerun") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def launch(cfg: RunConfig, out_dir: Path | str, launcher: dict[str, Any]) -> dict[str, Any]:
    """Write the run's config.json, submit the training job (or re-attach to the recorded one),
    stream its log, and return its summary; the run folder is locked meanwhile (`run_lock`).

    Raises RuntimeError with the job's traceback (also saved to DIR/error.txt) if the job fails.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        return _launch(cfg, out, launcher)


def _launch(cfg: RunConfig, out: Path, launcher: dict[str, Any]) -> dict[str, Any]:
    poll = float(launcher.get("poll_s", 2.0))
    cluster = launcher.get("cluster", "local")
    info = live_job(out)
    if info is not None and info["cluster"] == "slurm":
        print(f"[ofe] re-attaching to SLURM job {info['job_id']} for {out}", flush=True)
        job = submitit.SlurmJob(folder=info["folder"], job_id=str(info["job_id"]))
    elif info is not None:
        print(f"[ofe] waiting for local job {info['job_id']} for {out}", flush=True)
        try:
            return _wait_local_pid(info, out, poll)
        except RuntimeError as e:
            raise _fail(out, info["job_id"], e) from None
    else:
        (out / ERROR).unlink(missing_ok=True)
        config_path = out / "config.json"
        atomic_write_text(config_path, cfg.to_json())
        folder = out / "submitit" / time.strftime("%Y%m%dT%H%M%S")  # one folder per submission
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        name = launcher.get("job_name_prefix", "ofe-") + ("_".join(map(str, cfg.grid.values())) or out.name)
        executor.update_parameters(**executor_parameters(launcher, cfg.grid.get("scale", ""), name))
        job = executor.submit(TrainJob(), str(config_path), str(out))
        record = {"job_id": str(job.job_id), "cluster": cluster, "folder": str(folder),
                  "stdout": str(job.paths.stdout), "submitted": time.time()}
        if cluster == "local":
            record["pid"] = int(job.job_id)  # the local executor's job id is the process id
            # -1: the job had already ended, so no later process with this pid is taken for it
            record["pid_start"] = process_start_time(record["pid"]) or -1
        atomic_write_json(out / JOB, record)
        print(f"[ofe] submitted {cluster} job {job.job_id} for {out} (log: {job.paths.stdout})", flush=True)
    offset = 0
    while not job.done():
        offset = _echo_new(job.paths.stdout, offset)
        time.sleep(poll)
    _echo_new(job.paths.stdout, offset)
    try:
        return job.results()[0]  # rank 0 writes the summary (one result per task)
    except Exception as e:  # submitit's FailedJobError carries the remote traceback
        raise _fail(out, job.job_id, e) from None


def cancel(results_dir: Path | str, dry_run: bool = False) -> list[str]:
    """Cancel every pending or running job of this workflow's run folders (Ctrl-C of Snakemake does
    not cancel jobs already on SLURM: that is what makes re-attach possible)."""
    cancelled = []
    for path in sorted(Path(results_dir, "runs").rglob(JOB)):
        info = live_job(path.parent)
        if info is None:
            continue
        cancelled.append(f"{info['cluster']} job {info['job_id']} ({path.parent})")
        if dry_run:
            continue
        if info["cluster"] == "slurm":
            subprocess.run(["scancel", str(info["job_id"])], check=False)
        else:
            os.kill(int(info["pid"]), signal.SIGTERM)
    return cancelled
