"""Submit one run through submitit and wait for it: the body of the workflow's train rule (the head's
side; what the job runs on its node is `ofe.cluster.jobs`).

The job trains the run, then quantises it (int8 perplexity, `ofe.train.quantise`), so on a cluster the model is
evaluated on the node and GPU it was trained on, never on the login node, and a run costs one queue
wait. It is a submitit `Checkpointable`: on preemption or time-out submitit requeues the same call;
`ofe.train.trainer.train` resumes from the run's own checkpoint, and a run whose final checkpoint is already
written only rewrites its files, so a requeued job (or one rerun because `quant:` changed) never trains
again. The executor comes from the `launcher` settings: `local` (a subprocess; also what the tests use,
since submitit's `debug` executor opens a debugger when the job raises; it sees the launching process's
GPUs, `LocalGpus`) or `slurm`.

On SLURM the run is handed over to the workflow's one dispatcher (`ofe.cluster.handover`,
`ofe.cluster.dispatch`), which submits the runs handed over together as job arrays or packed jobs and
asks the scheduler once per poll for all of them; the waiting rule blocks on a lock in a small `flock`
process meanwhile. Local jobs are submitted and waited on here.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ofe.cluster.handover import fail, hand_over
from ofe.cluster.jobstate import StatusCache, live_job, pid_alive, process_start_time
from ofe.config import ConfigError, RunConfig, check_micro_batch
from ofe.io import atomic_write_json, atomic_write_text
from ofe.runfolder import CONFIG, ERROR, INSPECT, JOB, LOCK, QUANT, SUMMARY, TRACKING_SETTINGS

# Cluster-specific settings a site sets in the environment rather than in any file of this repo.
SLURM_ENV = {"partition": "OFE_SLURM_PARTITION", "account": "OFE_SLURM_ACCOUNT",
             "qos": "OFE_SLURM_QOS", "constraint": "OFE_SLURM_CONSTRAINT"}
LOCK_FD_ENV = "OFE_RUN_LOCK_FD"
GENERIC = ("timeout_min", "mem_gb", "cpus_per_task", "gpus_per_node", "tasks_per_node", "nodes")



def local_gpus(gpus_per_node: int | None, visible: str | None) -> tuple[str | None, int | None]:
    """(CUDA_VISIBLE_DEVICES for a local job, or None to leave it unset; how many GPUs the job must count
    there, or None) from the launcher's gpus_per_node and the launching process's own mask (`visible`;
    None: unset, every GPU). No gpus_per_node: the job sees what the launching process sees. N: the first
    N of the devices listed there, indices or UUIDs (ConfigError when fewer are listed), or with no mask
    0..N-1, which the job counts (`LocalGpus`): only there can the machine have fewer than asked for.
    A listed device that does not exist fails in training, as any job given GPUs it cannot use does
    (`ofe.train.parallel.resolve_device`)."""
    if gpus_per_node is None:
        return visible, None
    n = int(gpus_per_node)
    if n == 0:
        return "", None
    if visible is None:
        return ",".join(str(i) for i in range(n)), n
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    if len(devices) < n:
        raise ConfigError(f"launcher gpus_per_node: {n}, but this process sees {len(devices)} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={visible!r}); lower gpus_per_node, remove it, or make more "
                          f"GPUs visible")
    return ",".join(devices[:n]), None


@dataclass
class Work:
    """One job for `launch_work`: what it runs (`kind`, `args`), its name and resources, and the files
    it leaves when it finishes (the first one's JSON is what the launcher returns)."""

    args: tuple  # JSON values: the job's callable (`kind`) is built where it is submitted
    name: str
    kind: str  # "train" (`ofe.cluster.jobs.TrainJob`) or "inspect" (`InspectJob`)
    scale: str  # the launcher's per-scale resources it gets ("" for none)
    done: tuple[str, ...]
    what: str  # "training" or "inspection", for messages
    resources: dict[str, Any] = field(default_factory=dict)  # over the launcher's and the scale's
    before_submit: Callable[[dict[str, Any]], None] | None = None  # checks/writes once params are known
    call: Any = None  # a local job's callable other than `kind`'s (a test's probe)


def executor_parameters(launcher: dict[str, Any], scale: str, name: str,
                        resources: dict[str, Any] | None = None) -> dict[str, Any]:
    """submitit parameters for one job: launcher defaults, then the run's scale's resources (then the
    job's own `resources`), then partition/account/QoS/constraint from the launcher or the OFE_SLURM_*
    environment variables."""
    cluster = launcher.get("cluster", "local")
    merged = {"timeout_min": 120, **{k: launcher[k] for k in GENERIC if k in launcher},
              **launcher.get("scales", {}).get(scale, {}), **(resources or {})}
    params: dict[str, Any] = {k: v for k, v in merged.items() if k in GENERIC}
    params["name"] = name
    if cluster == "slurm":
        slurm = dict(launcher.get("slurm") or {})
        for key, env in SLURM_ENV.items():
            if os.environ.get(env):
                slurm[key] = os.environ[env]
        params.update({f"slurm_{k}": v for k, v in slurm.items() if v not in (None, "")})
    else:  # the local executor knows no memory or CPU reservations; gpus_per_node is for `local_gpus`
        params = {k: v for k, v in params.items() if k in ("timeout_min", "name", "tasks_per_node", "gpus_per_node")}
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


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold RUN/.launch.lock while a head submits and waits, so two heads (two Snakemake invocations
    with --nolock, or from two working copies) never train one run. flock is released by the kernel
    when the holder dies, so a killed head leaves no stale lock."""
    with (out / LOCK).open("a+") as f:
        if _inherited_lock(out / LOCK):  # this process was started by `flock` for the same rule
            yield
            return
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
        # the descriptor is handed on when the waiter becomes a `flock` process (`ofe.cluster.handover`),
        # so the folder stays locked while it waits and the command it runs again adopts the lock
        os.environ[LOCK_FD_ENV] = f"{f.fileno()}:{os.getpid()}"
        try:
            yield
        finally:
            os.environ.pop(LOCK_FD_ENV, None)
            fcntl.flock(f, fcntl.LOCK_UN)


def _inherited_lock(path: Path) -> bool:
    """Whether this process inherited an open descriptor of `path` through exec (the waiter's `flock`):
    it shares the lock its first process took, so locking again would refuse the rule its own folder."""
    fd, _, owner = os.environ.get(LOCK_FD_ENV, "").partition(":")
    if not fd or owner == str(os.getpid()):  # the process that took the lock is refused, as any other
        return False
    try:
        held, there = os.fstat(int(fd)), path.stat()
    except (OSError, ValueError):
        return False
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


def launch(cfg: RunConfig, out_dir: Path | str, launcher: dict[str, Any], status_dir: Path | str | None = None,
           quant: dict[str, Any] | None = None, exec_wait: bool = False,
           tracking: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the run's config.json, submit the job that trains it (and quantises it, given the `quant`
    settings), or re-attach to the recorded one, stream its log, and return its summary. The run
    folder is locked meanwhile (`run_lock`). `status_dir` is the workflow's shared scheduler-status
    cache (default: inside the run folder). `tracking`: the resolved tracking settings
    (`ofe.plan.tracking`), written beside config.json for the job (none: the file is removed).

    Raises RuntimeError with the job's traceback (also saved to DIR/error.txt) if the job fails.
    `exec_wait` (the CLI): on SLURM this process is replaced by a `flock` waiting on the dispatcher
    (`ofe.cluster.handover`), which runs the same command line again when the job has ended.
    """
    out = Path(out_dir).resolve()
    config_path = out / CONFIG

    def before_submit(params: dict[str, Any]) -> None:
        # the processes are known only here: refuse now, not after a queue wait, a batch they cannot split
        check_micro_batch(cfg.train, int(params.get("tasks_per_node", 1)) * int(params.get("nodes", 1)))
        atomic_write_text(config_path, cfg.to_json())
        if tracking and tracking.get("backend", "none") != "none":
            atomic_write_json(out / TRACKING_SETTINGS, tracking)
        else:  # tracking switched off since the last submission
            (out / TRACKING_SETTINGS).unlink(missing_ok=True)

    name = launcher.get("job_name_prefix", "ofe-") + ("_".join(map(str, cfg.grid.values())) or out.name)
    done = (SUMMARY, QUANT) if quant is not None else (SUMMARY,)
    work = Work((str(config_path), str(out), quant), name, "train", cfg.grid.get("scale", ""), done,
                "training", before_submit=before_submit)
    return launch_work(work, out, launcher, status_dir, exec_wait)


def launch_inspect(ckpt: dict[str, Any], out_dir: Path | str, launcher: dict[str, Any], settings: dict[str, Any],
                   data: dict[str, Any], quant: dict[str, Any], status_dir: Path | str | None = None,
                   exec_wait: bool = False) -> dict[str, Any]:
    """`launch` for one checkpoint of a checkpoint study (`ofe.plan.studies`): an `InspectJob` with the
    `inspect:` section's resources, re-attached and waited on like a training job; returns inspect.json.
    The memory the job is given (inspect.mem_gb, else the launcher's on SLURM) is the limit the model's
    weights are checked against before they are read."""
    from ofe.plan.studies import job_resources

    out = Path(out_dir).resolve()
    resources = job_resources(settings)
    memory = resources.get("mem_gb") or (launcher.get("mem_gb") if launcher.get("cluster") == "slurm" else None)
    name = launcher.get("job_name_prefix", "ofe-") + "inspect_" + ckpt["ckpt_id"].replace("/", "_")
    work = Work((ckpt, str(out), settings, data, quant, memory), name, "inspect", "", (INSPECT,),
                "inspection", resources)
    return launch_work(work, out, launcher, status_dir, exec_wait)


def launch_work(work: Work, out: Path, launcher: dict[str, Any], status_dir: Path | str | None,
                exec_wait: bool = False) -> dict[str, Any]:
    """Submit `work` from its folder `out` (or re-attach to its recorded job) under the folder's lock."""
    out.mkdir(parents=True, exist_ok=True)
    status = Path(status_dir) if status_dir else out / ".ofe-status"
    with run_lock(out):
        if launcher.get("cluster", "local") == "slurm":
            params = executor_parameters(launcher, work.scale, work.name, work.resources)
            return hand_over(work, out, params, launcher, status, exec_wait)
        return _launch_local(work, out, launcher, status)


def _launch_local(work: Work, out: Path, launcher: dict[str, Any], status_dir: Path) -> dict[str, Any]:
    poll = float(launcher.get("poll_s", 2.0))
    cluster = launcher.get("cluster", "local")
    info = live_job(out / JOB, StatusCache(status_dir, max_age_s=poll))
    if info is not None and info["cluster"] != "local":
        raise RuntimeError(f"{out} has a live {info['cluster']} job {info['job_id']} (job.json); wait for it with "
                           f"the {info['cluster']} launcher, or cancel it (python -m ofe cancel), then rerun")
    if info is not None:
        print(f"[ofe] waiting for local job {info['job_id']} for {out}", flush=True)
        try:
            return _wait_local_pid(info, out, poll, work.done)
        except RuntimeError as e:
            raise fail(out, info["job_id"], e, work.what) from None
    else:
        (out / ERROR).unlink(missing_ok=True)
        folder = out / "submitit" / time.strftime("%Y%m%dT%H%M%S")  # one folder per submission
        params = executor_parameters(launcher, work.scale, work.name, work.resources)
        # submitit (and asyncio with it) only here: a SLURM waiter, one per run in flight, never imports it
        import submitit

        from ofe.cluster.jobs import InspectJob, LocalGpus, TrainJob

        call = work.call or (TrainJob() if work.kind == "train" else InspectJob())
        # the GPUs it may use, never the local executor's mask (`LocalGpus`)
        call = LocalGpus(call, *local_gpus(params.pop("gpus_per_node", None), os.environ.get("CUDA_VISIBLE_DEVICES")))
        if work.before_submit is not None:
            work.before_submit(params)
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        executor.update_parameters(**params)
        job = executor.submit(call, *work.args)
        record = {"job_id": str(job.job_id), "cluster": cluster, "folder": str(folder),
                  "stdout": str(job.paths.stdout), "submitted": time.time()}
        record["pid"] = int(job.job_id)  # the local executor's job id is the process id
        # -1: the job had already ended, so no later process with this pid is taken for it
        record["pid_start"] = process_start_time(record["pid"]) or -1
        atomic_write_json(out / JOB, record)
        print(f"[ofe] submitted {cluster} {work.what} job {job.job_id} for {out} (log: {job.paths.stdout})",
              flush=True)
    offset = [0]

    def echo() -> None:
        offset[0] = _echo_new(job.paths.stdout, offset[0])

    while not job.done():
        echo()
        time.sleep(poll)
    echo()
    try:
        return job.results()[0]  # rank 0 writes the summary (one result per task)
    except Exception as e:  # submitit's FailedJobError carries the remote traceback
        raise fail(out, job.job_id, e, work.what) from None


def _wait_local_pid(info: dict[str, Any], out: Path, poll: float, done: tuple[str, ...]) -> dict[str, Any]:
    """Wait for a local job started by an earlier (killed) head process, then read what it left."""
    log, offset = Path(info["stdout"]), 0
    while pid_alive(int(info["pid"]), info.get("pid_start")):
        offset = _echo_new(log, offset)
        time.sleep(poll)
    _echo_new(log, offset)
    missing = [f for f in done if not (out / f).exists()]
    if not missing:
        return json.loads((out / done[0]).read_text())
    raise RuntimeError(f"local job {info['job_id']} for {out} ended without {', '.join(missing)}; see {log}")


def cancel(results_dir: Path | str, dry_run: bool = False, max_age_s: float = 10.0) -> list[str]:
    """Cancel every pending or running job of this workflow's run folders (Ctrl-C of Snakemake does
    not cancel jobs already on SLURM: that is what makes re-attach possible). The jobs' states come
    from one queue listing, the workflow's shared one when a waiting head took it in the last
    `max_age_s`, never from one query per job."""
    cancelled = []
    cache = StatusCache(Path(results_dir) / ".ofe-status", max_age_s=max_age_s)
    paths = [p for sub in ("runs", "checkpoints") for p in sorted(Path(results_dir, sub).rglob(JOB))]
    seen: set[tuple[str, str]] = set()
    for path in paths:  # training jobs, then the checkpoint studies' inspection jobs
        info = live_job(path, cache)
        if info is None:
            continue
        cancelled.append(f"{info['cluster']} job {info['job_id']} ({path.parent})")
        if dry_run or (info["cluster"], str(info["job_id"])) in seen:  # a packed job holds several runs
            continue
        seen.add((info["cluster"], str(info["job_id"])))
        if info["cluster"] == "slurm":
            subprocess.run(["scancel", str(info["job_id"])], check=False)
        else:
            os.kill(int(info["pid"]), signal.SIGTERM)
    return cancelled
