"""Submit one training run through submitit and wait for it (the body of the workflow's train rule).

The job is a submitit `Checkpointable`: on preemption or time-out submitit requeues the same call,
and `ofe.train.train` resumes from the run's own checkpoint, so the requeued job is idempotent.
The executor comes from the workflow config's `launcher` section: `local` (a subprocess; also used
by the tests, since submitit's `debug` executor opens a debugger when the job raises) or `slurm`.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any

import submitit

from ofe.config import RunConfig
from ofe.results import atomic_write_json, atomic_write_text

ERROR = "error.txt"


class TrainJob(submitit.helpers.Checkpointable):
    """Callable submitted to the cluster; its default `checkpoint` resubmits the same arguments."""

    def __call__(self, config_path: str, out_dir: str) -> dict[str, Any]:
        from ofe.train import load_run_config, train

        return train(load_run_config(config_path), out_dir)


def make_executor(folder: Path, launcher: dict[str, Any], name: str) -> submitit.AutoExecutor:
    cluster = launcher.get("cluster", "local")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {"timeout_min": int(launcher.get("timeout_min", 120)), "name": name}
    if cluster == "slurm":
        params.update({f"slurm_{k}": v for k, v in launcher.get("slurm", {}).items()})
    executor.update_parameters(**params)
    return executor


def _echo_new(path: Path, offset: int) -> int:
    """Print what the job appended to its log since `offset` (progress in the rule's log)."""
    if not path.exists():
        return offset
    with path.open("r", errors="replace") as f:
        f.seek(offset)
        chunk = f.read()
    if chunk:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return offset + len(chunk.encode())


def launch(cfg: RunConfig, out_dir: Path | str, launcher: dict[str, Any]) -> dict[str, Any]:
    """Write the run's config.json, submit the training job, stream its log, return its summary.

    Raises RuntimeError with the job's traceback (also saved to DIR/error.txt) if the job fails.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ERROR).unlink(missing_ok=True)
    config_path = out / "config.json"
    atomic_write_text(config_path, cfg.to_json())
    executor = make_executor(out / "submitit", launcher, name=f"ofe:{out.name}")
    job = executor.submit(TrainJob(), str(config_path.resolve()), str(out.resolve()))
    atomic_write_json(out / "job.json", {"job_id": job.job_id, "cluster": launcher.get("cluster", "local"),
                                         "submitted": time.time()})
    print(f"[ofe] submitted job {job.job_id} for {out} (log: {job.paths.stdout})", flush=True)
    offset, poll = 0, float(launcher.get("poll_s", 2.0))
    while not job.done():
        offset = _echo_new(job.paths.stdout, offset)
        time.sleep(poll)
    _echo_new(job.paths.stdout, offset)
    try:
        return job.result()
    except Exception as e:  # submitit's FailedJobError carries the remote traceback
        text = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        atomic_write_text(out / ERROR, text)
        raise RuntimeError(f"training job {job.job_id} for {out} failed:\n{e}") from None
