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

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import submitit

from ofe.config import RunConfig
from ofe.results import atomic_write_json, atomic_write_text

ERROR, JOB = "error.txt", "job.json"
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


def _slurm_state(job_id: str) -> str:
    """The job's state: the controller's queue first (sacct lags a just-submitted job by seconds),
    then accounting for jobs that have left the queue."""
    for cmd in (["squeue", "-h", "-j", str(job_id), "-o", "%T"],
                ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"]):
        out = subprocess.run(cmd, capture_output=True, text=True)
        states = out.stdout.split()
        if out.returncode == 0 and states:
            return states[0]
    return "UNKNOWN"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


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
    return info if info.get("pid") and _pid_alive(int(info["pid"])) else None


def _wait_local_pid(info: dict[str, Any], out: Path, poll: float) -> dict[str, Any]:
    """Wait for a local job started by an earlier (killed) head process, then read its summary."""
    log, offset = Path(info["stdout"]), 0
    while _pid_alive(int(info["pid"])):
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


def launch(cfg: RunConfig, out_dir: Path | str, launcher: dict[str, Any]) -> dict[str, Any]:
    """Write the run's config.json, submit the training job (or re-attach to the recorded one),
    stream its log, and return its summary.

    Raises RuntimeError with the job's traceback (also saved to DIR/error.txt) if the job fails.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
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
