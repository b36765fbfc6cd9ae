"""The SLURM integration tests' helpers: the localhost cluster's availability, sacct/squeue views of a
test's jobs (by its unique job-name prefix), a tiny workflow folder for the slurm profile, and a counting
wrapper around `sbatch`."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from ofe.plan import grid
from tests.helpers import REPO
from tests.helpers.workflow import SNAKEMAKE  # noqa: F401  (re-exported for the SLURM tests)

HOW = "start a local cluster with `sudo scripts/slurm-localhost.sh start` (.ci/run does)"


def slurm_up() -> bool:
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
        acct = subprocess.run(["sacct", "-n", "-X"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ping.returncode == 0 and "UP" in ping.stdout and acct.returncode == 0


def sacct_jobs(name_prefix: str) -> pd.DataFrame:
    """Every job (not step) whose name starts with the prefix: JobID, JobName, State."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,JobName%200,State", "-S", "now-1hours"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    df = pd.DataFrame(rows, columns=["job_id", "name", "state"])
    return df[df.name.str.startswith(name_prefix)]


def queued_jobs(name_prefix: str) -> list[str]:
    """States of the prefix's jobs in the controller's queue (squeue: no accounting lag)."""
    out = subprocess.run(["squeue", "-h", "-o", "%j|%T"], capture_output=True, text=True, check=True).stdout
    return [line.split("|")[1] for line in out.splitlines() if line.startswith(name_prefix)]


def settled_jobs(name_prefix: str, expected: int = 1, timeout: float = 60) -> pd.DataFrame:
    """sacct's view once at least `expected` jobs of the prefix are recorded and none is still pending,
    running or completing (the result file can appear a moment before SLURM marks the job done, and
    accounting lags the controller by seconds)."""
    deadline = time.time() + timeout
    while True:
        jobs = sacct_jobs(name_prefix)
        live = jobs.state.isin(["PENDING", "RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING"])
        if (len(jobs) >= expected and not live.any()) or time.time() > deadline:
            return jobs
        time.sleep(1)


def launcher(prefix: str) -> dict:
    return {"cluster": "slurm", "job_name_prefix": prefix, "poll_s": 1,
            "scales": {"tiny": {"cpus_per_task": 1, "mem_gb": 2, "timeout_min": 10}}}


def workflow_dir(tmp_path: Path, prefix: str, steps: int = 20) -> Path:
    config = {
        "data": {"source": "stdlib", "max_documents": 120},
        "quant": {"bits": [8], "calib_batches": 1, "eval_batches": 1},
        "defaults": {
            "block": "pre_ln", "scale": "tiny", "optimizer": "adamw", "lr": 1.0e-2, "seed": 0,
            "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "context": 32},
            "train": {"steps": steps, "batch_size": 4, "log_every": 5, "eval_every": 10, "checkpoint_every": 5},
        },
        "studies": {"norms": {"grid": {"block": ["pre_ln", "op"]}}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "launcher.yaml").write_text(yaml.safe_dump(launcher(prefix)))
    return tmp_path


def planned_hash(workdir: Path, run_id: str) -> str:
    """The config hash of one planned run of the workflow in `workdir` (its plan, computed here)."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    return grid.expand(config, REPO / "workflow" / "schemas" / "config.schema.yaml")[run_id].config.config_hash()


def snakemake_cmd(workdir: Path, *extra: str) -> list[str]:
    # the test's own launcher file replaces the profile's (same key), keeping the profile's other settings
    return [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--profile",
            str(REPO / "profiles" / "slurm"), "--config", f"launcher_file={workdir / 'launcher.yaml'}",
            "--latency-wait", "5", *extra]


def run_snakemake(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_cmd(workdir, *extra), capture_output=True, text=True, timeout=900)


def counting_sbatch(tmp_path: Path) -> tuple[dict[str, str], Callable[[], list[str]]]:
    """(an environment whose PATH starts with an `sbatch` that logs each submission's job name, then runs
    the real sbatch; the names logged so far, one per sbatch call, in order).

    The name is read from the command line (--job-name=, -J) or the submitted script's #SBATCH lines, so
    jobs submitted by processes that inherit the environment (a head job's own submissions) count too.
    A call that named no job logs '?'."""
    real = shutil.which("sbatch")
    if real is None:
        raise FileNotFoundError("sbatch is not on PATH")
    bin_dir, log = tmp_path / "counting-sbatch", tmp_path / "sbatch-calls.txt"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
name=""
prev=""
for a in "$@"; do
    case "$a" in
        --job-name=*) name="${{a#--job-name=}}" ;;
        *) if [ "$prev" = "-J" ] || [ "$prev" = "--job-name" ]; then name="$a"
           elif [ -z "$name" ] && [ -f "$a" ]; then
               name=$(sed -n -e 's/^#SBATCH --job-name=//p' -e 's/^#SBATCH -J *//p' "$a" | head -n 1)
           fi ;;
    esac
    prev="$a"
done
echo "${{name:-?}}" >> '{log}'
exec '{real}' "$@"
""")
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def names() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    return env, names
